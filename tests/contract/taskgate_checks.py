"""Schemathesis checks of taskgate's own, loaded with SCHEMATHESIS_HOOKS.

The stock checks prove that every answer matches openapi/taskgate.yaml. These
prove that the document's request-body schema *is* the gateway's validator:
for every task update sent, the JSON Schema's verdict on the bytes actually
sent and the gateway's verdict agree.

- the gateway answered 422 `validation_failed`: the schema must refuse the body;
- the gateway let the body past validation (200, the vendor's own answer, or a
  refusal by a later stage: rate limit, residue rule, audit, forward): the
  schema must accept it;
- the gateway answered 400 `invalid_json` to a body that is one JSON object
  without repeated keys: the body stage is stricter than JSON.

Integers are judged as taskgate judges them: only JSON integer literals count
(JSON Schema would call `3.0` an integer; taskgate and this check do not).

At the end of the run it also insists that both verdicts were exercised, so a
run that never reached the validator cannot pass silently.
"""

import json
import os

import schemathesis
import yaml
from jsonschema import Draft202012Validator, validators

DOCUMENT = os.environ.get("TASKGATE_OPENAPI", "openapi/taskgate.yaml")
TASK_ROUTE = "/agent-api/user/{user_id}/task/{task_id}"

# Reasons a request only gets after its body passed validation.
AFTER_VALIDATION = {
    "unknown_caller_line",
    "residue_exceeded",
    "rate_limited",
    "residue_unavailable",
    "audit_unavailable",
    "shared_state_unavailable",
    "upstream_unreachable",
    "upstream_timeout",
}

with open(DOCUMENT, encoding="utf-8") as f:
    _doc = yaml.safe_load(f)

_documented_statuses = {
    int(code)
    for code in _doc["paths"][TASK_ROUTE]["put"]["responses"]
    if code != "default"
}

_TaskgateValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)
    ),
)
# The body schema, with the document's components beside it so its `$ref`s
# ("#/components/schemas/...") resolve.
_body_validator = _TaskgateValidator(
    {"$ref": "#/components/schemas/TaskUpdate", "components": _doc["components"]}
)


class _NotJson(Exception):
    pass


def _pairs(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _NotJson("repeated key")
    return dict(pairs)


def _reject_constant(name):
    raise _NotJson(f"{name} is not JSON")


def _strings_are_utf8(value):
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate raises
    elif isinstance(value, dict):
        for k, v in value.items():
            _strings_are_utf8(k)
            _strings_are_utf8(v)
    elif isinstance(value, list):
        for v in value:
            _strings_are_utf8(v)


def _parse(raw):
    """The body as one JSON object, or None when it is not one."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_pairs,
            parse_constant=_reject_constant,
        )
        _strings_are_utf8(value)
    except (ValueError, UnicodeError, _NotJson, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _reason(response):
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        reason = body["data"].get("reason")
        return reason if isinstance(reason, str) else None
    return None


def _schema_errors(body):
    return sorted(
        f"{'/'.join(str(p) for p in e.absolute_path) or '(body)'}: {e.message}"
        for e in _body_validator.iter_errors(body)
    )


def _show(raw):
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text if len(text) <= 400 else text[:400] + "…"


@schemathesis.check
class body_verdict_matches_schema:
    """The document's body schema and the gateway's validator agree."""

    def __init__(self):
        self.seen = set()

    def after_response(self, ctx, response, case):
        if case.operation.path != TASK_ROUTE or case.method.upper() != "PUT":
            return
        status = response.status_code
        reason = _reason(response)
        if reason is not None and status not in _documented_statuses:
            raise AssertionError(
                f"taskgate answered {status} {reason!r} itself, a status the document does not list"
            )
        raw = response.request.body
        body = _parse(raw)
        if reason == "validation_failed":
            if body is not None and not _schema_errors(body):
                raise AssertionError(
                    "the gateway refused a body the schema accepts (422 validation_failed: "
                    f"{response.content.decode('utf-8', 'replace')}); body: {_show(raw)}"
                )
            self.seen.add("refused")
        elif (status < 300 and reason is None) or reason in AFTER_VALIDATION or (
            reason is None and status >= 300
        ):
            if body is None:
                raise AssertionError(
                    f"the gateway let a body that is not one JSON object past validation ({status}): {_show(raw)}"
                )
            errors = _schema_errors(body)
            if errors:
                raise AssertionError(
                    f"the gateway accepted a body the schema refuses ({status} {reason or ''}): "
                    f"{'; '.join(errors)}; body: {_show(raw)}"
                )
            self.seen.add("accepted")
        elif reason == "invalid_json" and body is not None:
            raise AssertionError(
                f"the gateway called one JSON object invalid_json: {_show(raw)}"
            )

    def after_run(self, ctx):
        missing = {"accepted", "refused"} - self.seen
        if missing:
            raise AssertionError(
                "the run never saw the validator "
                + " or ".join(sorted(missing))
                + " a body: the contract test exercised too little"
            )
