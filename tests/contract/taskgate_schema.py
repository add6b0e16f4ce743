"""openapi/taskgate.yaml's task-update body schema, judged as taskgate judges.

Shared by the schemathesis checks (taskgate_checks.py) and the boundary
corpus (boundaries.py). Two departures from a stock JSON Schema validator,
both taskgate's rules: only JSON integer literals are integers (JSON Schema
would call `3.0` one), and a body is JSON only when it is one object with no
repeated key, no NaN/Infinity and no lone surrogate.
"""

import json
import os

import yaml
from jsonschema import Draft202012Validator, validators

DOCUMENT = os.environ.get("TASKGATE_OPENAPI", "openapi/taskgate.yaml")
TASK_ROUTE = "/agent-api/user/{user_id}/task/{task_id}"

with open(DOCUMENT, encoding="utf-8") as f:
    DOC = yaml.safe_load(f)

_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)
    ),
)
# The body schema with the document's components beside it, so that its
# `$ref`s ("#/components/schemas/...") resolve.
_body = _Validator({"$ref": "#/components/schemas/TaskUpdate", "components": DOC["components"]})


def schema_errors(name, value):
    """What components/schemas/NAME finds wrong with a value ([] if none)."""
    v = _Validator({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]})
    return sorted(
        f"{'/'.join(str(p) for p in e.absolute_path) or '(value)'}: {e.message}"
        for e in v.iter_errors(value)
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


def parse_object(raw):
    """The body as one JSON object, or None when it is not one."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_reject_constant
        )
        _strings_are_utf8(value)
    except (ValueError, UnicodeError, _NotJson, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def body_errors(body):
    """What the schema finds wrong with a parsed body ([] when it accepts it)."""
    return sorted(
        f"{'/'.join(str(p) for p in e.absolute_path) or '(body)'}: {e.message}"
        for e in _body.iter_errors(body)
    )


def reason_of(content):
    """`data.reason` of a taskgate answer, or None (the vendor's answers have none)."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        reason = body["data"].get("reason")
        return reason if isinstance(reason, str) else None
    return None


# Reasons a request only gets after its body passed validation.
AFTER_VALIDATION = frozenset(
    {
        "unknown_caller_line",
        "residue_exceeded",
        "rate_limited",
        "residue_unavailable",
        "audit_unavailable",
        "shared_state_unavailable",
        "upstream_unreachable",
        "upstream_timeout",
    }
)


def gateway_verdict(status, reason, admitted):
    """'refused' (422 validation_failed), 'accepted' (past validation),
    'not json' (400 invalid_json) or None (decided before the body stage, an
    overload that says nothing about the body, or an answer that is not
    taskgate's). `admitted`: the answer carries `RateLimit-Limit`, as every
    forwarded update's answer does (the vendor's, whatever its status)."""
    if reason == "validation_failed":
        return "refused"
    if reason == "invalid_json":
        return "not json"
    if reason in AFTER_VALIDATION or (reason is None and admitted):
        return "accepted"
    return None


def schema_verdict(raw):
    body = parse_object(raw)
    if body is None:
        return "not json", ["not one JSON object"]
    errors = body_errors(body)
    return ("refused" if errors else "accepted"), errors


def show(raw, limit=300):
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text if len(text) <= limit else text[:limit] + "…"
