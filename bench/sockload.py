#!/usr/bin/env python3
"""A small, bounded HTTP/1.1 load client that speaks to a Unix socket or a
TCP port on 127.0.0.1 (wrk cannot open a Unix socket).

Each connection is kept alive and sends the vendor page's example PUT, one
request at a time, taking BENCH_USERS user ids in turn (the paths put.lua
uses). The run stops after --requests answers or --seconds, whichever comes
first, and prints one JSON line: requests, seconds, statuses, p50/p99 in µs.
With --not-found every request goes to a path the router refuses (404): the
listener and the HTTP layer, without the pipeline and the upstream behind them.

    sockload.py --unix /path/to.sock --conns 8 --requests 20000 --seconds 10
    sockload.py --tcp 127.0.0.1:18490 --conns 1 --requests 5000
"""

import argparse
import asyncio
import json
import os
import sys
import time

BODY = (
    '{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1, '
    '"maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0", '
    '"remark": "API-test", "end_action": 1}'
).encode()
TASK = "f232d184-dd54-42a0-8ace-0bf8d660f4cc"


def request(n: int, users: int, not_found: bool) -> bytes:
    u = n % users
    path = f"/agent-api/user/{u:08x}-0000-4000-8000-{u:012x}/task/{TASK}"
    if not_found:
        # Refused by the router: the listener and HTTP layer alone.
        path = "/agent-api/not-a-route"
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def worker(args, state, latencies, statuses):
    if args.unix:
        reader, writer = await asyncio.open_unix_connection(args.unix)
    else:
        host, port = args.tcp.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
    try:
        while state["sent"] < args.requests and time.monotonic() < state["deadline"]:
            n = state["sent"]
            state["sent"] += 1
            t0 = time.perf_counter_ns()
            writer.write(request(n, args.users, args.not_found))
            status = await read_response(reader)
            latencies.append((time.perf_counter_ns() - t0) // 1000)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", help="path of the Unix socket")
    where.add_argument("--tcp", help="127.0.0.1:PORT")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--requests", type=int, default=10000, help="stop after this many answers")
    p.add_argument("--seconds", type=float, default=10.0, help="stop after this long")
    p.add_argument("--users", type=int, default=int(os.environ.get("BENCH_USERS", "1024")))
    p.add_argument("--not-found", action="store_true",
                   help="send to a path the router refuses (404): no pipeline, no upstream")
    args = p.parse_args()
    if args.tcp and not args.tcp.startswith("127.0.0.1:"):
        p.error("--tcp must be 127.0.0.1:PORT: this client only loads the local machine")
    if not (1 <= args.conns <= 256 and 1 <= args.requests <= 10_000_000 and 0 < args.seconds <= 600):
        p.error("--conns 1..256, --requests 1..10000000, --seconds up to 600")

    state = {"sent": 0, "deadline": time.monotonic() + args.seconds}
    latencies, statuses = [], {}
    started = time.monotonic()
    await asyncio.gather(*(worker(args, state, latencies, statuses) for _ in range(args.conns)))
    seconds = time.monotonic() - started
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0

    print(json.dumps({
        "requests": len(latencies),
        "seconds": round(seconds, 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
    }))
    return 0 if set(statuses) <= ({404} if args.not_found else {200}) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
