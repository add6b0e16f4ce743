#!/usr/bin/env python3
"""Boundary corpus: openapi/taskgate.yaml's body schema against the gateway.

Schemathesis explores what the schema describes; a rule the schema lacks
(a missing `maxLength`, a missing `pattern`) it may never probe. This sends
each rule's edge, on both sides, as literal bytes, and fails on any body where
the schema's verdict and the gateway's differ.

usage: boundaries.py BASE_URL        (TASKGATE_OPENAPI names the document)
"""

import http.client
import json
import sys
import urllib.parse

from taskgate_schema import gateway_verdict, reason_of, schema_verdict, show

USER = "5832d184-dd53-42a0-8ace-0bf8d660f4cc"
TASK = "f232d184-dd54-42a0-8ace-0bf8d660f4cc"
LINE = "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0"
SUB = "5b55bcca-d653-4a58-8f9a-437fb0601f8e"
I64_MAX = 2**63 - 1

# The vendor page's example, as its keys come.
EXAMPLE = (
    '{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1, '
    '"maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0", '
    '"remark": "API-test", "end_action": 1}'
)
REQUIRED = ["caller_line_id", "destination_extension", "dial_time_id", "maximumcall", "name"]
IDS = [
    "bridge_group_id",
    "destination_extension",
    "dial_time_id",
    "call_pause_second",
    "auto_recycle_rule_id",
    "end_action",
    "llm_intention_id",
]
MINIMAL = {
    "caller_line_id": LINE,
    "destination_extension": 297,
    "dial_time_id": 5,
    "maximumcall": 1,
    "name": "测试任务",
}


def with_raw(key, literal, base=None):
    """MINIMAL with `key` set to a JSON literal written as given (so `3.0`
    stays `3.0`), or removed when literal is None."""
    body = dict(base if base is not None else MINIMAL)
    body.pop(key, None)
    parts = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in body.items()]
    if literal is not None:
        parts.append(f"{json.dumps(key)}: {literal}")
    return "{" + ", ".join(parts) + "}"


def corpus():
    yield "vendor example", EXAMPLE
    yield "minimal", with_raw("remark", None)
    for key in REQUIRED:
        yield f"{key} missing", with_raw(key, None)
    yield "empty object", "{}"
    for key in IDS:
        for literal in ["0", "-1", str(I64_MAX), str(I64_MAX + 1), "3.0", "1e2", '"3"', "null", "true"]:
            yield f"{key} = {literal}", with_raw(key, literal)
    for literal in ["0", "1", "-1", str(I64_MAX), str(I64_MAX + 1), "1.0", '"1"', "null"]:
        yield f"maximumcall = {literal}", with_raw("maximumcall", literal)
    for n in [0, 1, 255, 256]:
        yield f"name of {n} ASCII", with_raw("name", json.dumps("a" * n))
        yield f"name of {n} CJK", with_raw("name", json.dumps("任" * n, ensure_ascii=False))
    yield "name of 255 astral", with_raw("name", json.dumps("😀" * 255, ensure_ascii=False))
    yield "name of 256 astral", with_raw("name", json.dumps("😀" * 256, ensure_ascii=False))
    yield "name of 255 escaped astral", with_raw("name", json.dumps("😀" * 255))
    for literal in ["1", "null", "[]", '{"a": 1}']:
        yield f"name = {literal}", with_raw("name", literal)
    for literal in ['""', '"第一个任务"', "1", "null", "false"]:
        yield f"remark = {literal}", with_raw("remark", literal)
    uuids = {
        "canonical": LINE,
        "upper case": LINE.upper(),
        "braces": "{" + LINE + "}",
        "no dashes": LINE.replace("-", ""),
        "urn": "urn:uuid:" + LINE,
        "short": LINE[:-1],
        "long": LINE + "0",
        "non-hex": LINE[:-1] + "g",
        "final newline": LINE + "\n",
        "dash moved": LINE[:7] + "-" + LINE[7] + LINE[9:],
        "empty": "",
    }
    for key in ["caller_line_id", "sub_user_id"]:
        for label, value in uuids.items():
            yield f"{key} {label}", with_raw(key, json.dumps(value))
        for literal in ["null", "1", "[]"]:
            yield f"{key} = {literal}", with_raw(key, literal)
    yield "sub_user_id canonical (another)", with_raw("sub_user_id", json.dumps(SUB))
    for literal in ["0", "1", "2", "3", "4", "5", "6", "-1", "1.0", '"1"', "null", str(2**64)]:
        yield f"task_type = {literal}", with_raw("task_type", literal)
    for literal in ["true", "false", '"false"', "0", "null"]:
        yield f"elasticity_type = {literal}", with_raw("elasticity_type", literal)
    for elasticity in ["true", "false"]:
        for end_action in ["1", "0", "-1", "null"]:
            base = json.loads(with_raw("elasticity_type", elasticity))
            yield (
                f"elasticity_type {elasticity} with end_action {end_action}",
                with_raw("end_action", end_action, base),
            )
    for key in ["maximumCall", "colour", "", "Name", "task-type"]:
        yield f"unknown field {key!r}", with_raw(key, "1")
    yield "every field", json.dumps(
        dict(
            MINIMAL,
            sub_user_id=SUB,
            bridge_group_id=1,
            remark="r",
            call_pause_second=10,
            auto_recycle_rule_id=2,
            elasticity_type=False,
            end_action=3,
            llm_intention_id=4,
            task_type=5,
        ),
        ensure_ascii=False,
    )
    for label, raw in {
        "array": "[]",
        "string": '"x"',
        "number": "1",
        "null": "null",
        "empty": "",
        "two objects": EXAMPLE + EXAMPLE,
        "cut off": EXAMPLE[:-1],
        "repeated key": EXAMPLE[:-1] + ', "maximumcall": 900}',
        "NaN": with_raw("maximumcall", "NaN"),
        "lone surrogate": with_raw("remark", '"\\ud800"'),
        "trailing comma": EXAMPLE[:-1] + ",}",
    }.items():
        yield f"not JSON: {label}", raw


def send(base, raw):
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request(
            "PUT",
            f"/agent-api/user/{USER}/task/{TASK}",
            body=raw.encode("utf-8", "surrogatepass"),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        content = resp.read()
        return resp.status, content, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def main():
    base = sys.argv[1]
    disagreements = 0
    counts = {}
    for label, raw in corpus():
        status, content, headers = send(base, raw)
        gateway = gateway_verdict(status, reason_of(content), "ratelimit-limit" in headers)
        schema, errors = schema_verdict(raw.encode("utf-8", "surrogatepass"))
        counts[gateway] = counts.get(gateway, 0) + 1
        if gateway != schema:
            disagreements += 1
            print(
                f"DISAGREE {label}: gateway {gateway} (HTTP {status}: {show(content)}), "
                f"schema {schema} ({'; '.join(errors) or 'no errors'}); body: {show(raw)}"
            )
    total = sum(counts.values())
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=str))
    print(f"boundaries: {total} bodies ({summary}); {total - disagreements} agree, {disagreements} disagree")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
