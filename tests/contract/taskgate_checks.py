"""Schemathesis checks of taskgate's own, loaded with SCHEMATHESIS_HOOKS.

The stock checks prove that every answer matches openapi/taskgate.yaml. This
one proves that the document's request-body schema *is* the gateway's
validator: for every task update schemathesis sends, the schema's verdict on
the bytes actually sent and the gateway's verdict agree.

- 422 `validation_failed`: the schema must refuse the body;
- past validation (200, the vendor's own answer, or a refusal by a later
  stage: rate limit, residue rule, audit, forward): the schema must accept it;
- 400 `invalid_json`: the body must not be one JSON object.

It also fails an answer that carries taskgate's `data.reason` with a status
the document does not list (those would otherwise pass as `default`, the
vendor's pass-through), and, at the end of the run, a run in which the
validator never both accepted and refused a body.

`dry_run_answer_matches_schema`: the 200 schema is "the vendor's envelope or
the dry-run answer", which any envelope passes; this pins it down. A 200 to
`X-Taskgate-Dry-Run: true`/`1` must be `DryRunAnswer` exactly, any other 200
must not be a dry-run answer, and the run must have seen both.
"""

import json

import schemathesis

from taskgate_schema import (
    DOC,
    TASK_ROUTE,
    gateway_verdict,
    reason_of,
    schema_errors,
    schema_verdict,
    show,
)

_documented_statuses = {
    int(code) for code in DOC["paths"][TASK_ROUTE]["put"]["responses"] if code != "default"
}


@schemathesis.check
class body_verdict_matches_schema:
    """The document's body schema and the gateway's validator agree."""

    def __init__(self):
        self.seen = set()

    def after_response(self, ctx, response, case):
        if case.operation.path != TASK_ROUTE or case.method.upper() != "PUT":
            return
        status = response.status_code
        reason = reason_of(response.content)
        if reason is not None and status not in _documented_statuses:
            raise AssertionError(
                f"taskgate answered {status} {reason!r} itself, a status the document does not list"
            )
        gateway = gateway_verdict(status, reason, "ratelimit-limit" in response.headers)
        if gateway is None:
            return
        raw = response.request.body
        schema, errors = schema_verdict(raw)
        if gateway == "not json":
            if schema != "not json":
                raise AssertionError(f"the gateway called one JSON object invalid_json: {show(raw)}")
            return
        if gateway != schema:
            answer = response.content.decode("utf-8", "replace")
            raise AssertionError(
                f"the gateway {gateway} a body (HTTP {status}: {show(answer)}) that the schema "
                f"{schema} ({'; '.join(errors) or 'no schema errors'}); body: {show(raw)}"
            )
        self.seen.add(gateway)

    def after_run(self, ctx):
        missing = {"accepted", "refused"} - self.seen
        if missing:
            raise AssertionError(
                "the validator never "
                + " or ".join(sorted(missing))
                + " a body in this run: the contract test exercised too little"
            )


@schemathesis.check
class dry_run_answer_matches_schema:
    """A dry run's 200 is the documented dry-run answer; no other 200 is."""

    def __init__(self):
        self.seen = set()

    def after_response(self, ctx, response, case):
        if case.operation.path != TASK_ROUTE or case.method.upper() != "PUT":
            return
        if response.status_code != 200:
            return
        dry = response.request.headers.get("X-Taskgate-Dry-Run") in ("true", "1")
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"a 200 that is not JSON: {show(response.content)}")
        if dry:
            errors = schema_errors("DryRunAnswer", body)
            if errors:
                raise AssertionError(
                    f"a dry run's 200 is not DryRunAnswer ({'; '.join(errors)}): {show(response.content)}"
                )
            self.seen.add("dry run")
        else:
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, dict) and "dry_run" in data:
                raise AssertionError(
                    f"an update without a dry-run header got a dry-run answer: {show(response.content)}"
                )
            self.seen.add("forwarded")

    def after_run(self, ctx):
        missing = {"dry run", "forwarded"} - self.seen
        if missing:
            raise AssertionError(
                "no 200 for: " + ", ".join(sorted(missing)) + ": the contract test exercised too little"
            )
