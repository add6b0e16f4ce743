#!/usr/bin/env python3
"""Slow clients: N connections to 127.0.0.1:PORT, each sending the benchmark
PUT's head at once and then its body one byte at a time, for a bounded time.

Each connection sends one request, the one put.lua sends (the vendor page's
example body, `Content-Type: application/json`, a `Content-Length` for the
whole body, a user id per connection taken in turn from BENCH_USERS ids),
then the body at one byte per --interval. There is no reconnecting: a
connection that gets an answer (a proxy's 408 once its header/body timeout
has passed, say) or is closed by the peer stays finished. After --seconds
every connection is closed and one line goes to stdout:

    SLOW conns=<opened> answered=<n> statuses=<status:count,...> ...

Connections are opened in batches (--batch, --batch-pause) so as not to
overflow the listen backlog. Connects and closes have timeouts and the whole
run is capped, so it never hangs.

    slowclients.py --port 18481                   # 500 connections, 8 s
    slowclients.py --port 18490 --conns 100 --seconds 4 --interval 0.05
"""

import argparse
import asyncio
import os
import resource
import sys
import time

HOST = "127.0.0.1"   # the only host this client loads
BODY = (
    '{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1, '
    '"maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0", '
    '"remark": "API-test", "end_action": 1}'
).encode()
TASK = "f232d184-dd54-42a0-8ace-0bf8d660f4cc"
# Pacing: the connections are spread over this many phases of one interval,
# so the bytes go out as a steady trickle, not one burst per interval.
PHASES = 10


def head(n: int, users: int) -> bytes:
    u = n % users
    path = f"/agent-api/user/{u:08x}-0000-4000-8000-{u:012x}/task/{TASK}"
    return (
        f"PUT {path} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()


class Conn:
    __slots__ = ("n", "reader", "writer", "sent", "status", "answer_s", "peer_closed", "error",
                 "task")

    def __init__(self, n, reader, writer):
        self.n = n
        self.reader = reader
        self.writer = writer
        self.sent = 0              # body bytes written
        self.status = None         # the answer's status code, if any
        self.answer_s = None       # when it came, seconds from the start
        self.peer_closed = False   # EOF or reset from the other side
        self.error = None
        self.task = None

    @property
    def sending(self):
        return (self.status is None and not self.peer_closed and self.error is None
                and self.sent < len(BODY) and not self.writer.transport.is_closing())


async def watch(c: Conn, started: float):
    """Reads the one answer (its head), then waits for the peer to close."""
    try:
        raw = await c.reader.readuntil(b"\r\n\r\n")
        line = raw.split(b"\r\n", 1)[0].split(b" ", 2)
        c.status = int(line[1]) if len(line) > 1 and line[1].isdigit() else 0
        c.answer_s = time.monotonic() - started
        while await c.reader.read(65536):
            pass
        c.peer_closed = True
    except asyncio.IncompleteReadError:
        c.peer_closed = True       # closed with no (complete) answer head
    except asyncio.LimitOverrunError:
        c.error = "head too long"
    except (ConnectionError, OSError) as e:
        c.peer_closed = True
        c.error = type(e).__name__


async def pace(conns, interval: float, deadline: float):
    """Every interval/PHASES, one byte to each connection of the phase due."""
    step = interval / PHASES
    k = 0
    next_t = time.monotonic()
    while True:
        phase = k % PHASES
        for c in list(conns):
            if c.n % PHASES == phase and c.sending:
                try:
                    c.writer.write(BODY[c.sent:c.sent + 1])
                    c.sent += 1
                except (ConnectionError, OSError, RuntimeError) as e:
                    c.error = type(e).__name__
        k += 1
        next_t += step
        now = time.monotonic()
        if now >= deadline:
            return
        if next_t < now - interval:
            next_t = now           # fell behind (CPU starved): never catch up in a burst
        await asyncio.sleep(max(0.0, min(next_t, deadline) - now))


async def connect(n, args, started, conns, failures):
    remaining = args.deadline - time.monotonic()
    if remaining <= 0:
        return
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, args.port), timeout=min(args.connect_timeout, remaining))
    except (asyncio.TimeoutError, OSError) as e:
        key = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
        failures[key] = failures.get(key, 0) + 1
        return
    c = Conn(n, reader, writer)
    writer.write(head(n, args.users))
    c.task = asyncio.create_task(watch(c, started))
    conns.append(c)


async def close_all(conns, timeout: float):
    for c in conns:
        if c.task:
            c.task.cancel()
        c.writer.close()

    async def closed(c):
        try:
            await c.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    try:
        await asyncio.wait_for(asyncio.gather(*(closed(c) for c in conns), return_exceptions=True),
                               timeout)
    except asyncio.TimeoutError:
        pass
    for c in conns:
        if not c.writer.transport.is_closing() or c.writer.transport.get_write_buffer_size():
            c.writer.transport.abort()
    await asyncio.gather(*(c.task for c in conns if c.task), return_exceptions=True)


async def run(args):
    started = time.monotonic()
    args.deadline = started + args.seconds
    conns, failures = [], {}
    pacer = asyncio.create_task(pace(conns, args.interval, args.deadline))
    connect_s = None
    try:
        for first in range(0, args.conns, args.batch):
            if time.monotonic() >= args.deadline:
                break
            last = min(args.conns, first + args.batch)
            await asyncio.gather(*(connect(n, args, started, conns, failures)
                                   for n in range(first, last)))
            if last < args.conns:
                await asyncio.sleep(args.batch_pause)
        connect_s = time.monotonic() - started
        await asyncio.wait_for(pacer, timeout=max(0.0, args.deadline - time.monotonic()) + 1.0)
    except asyncio.TimeoutError:
        pass
    finally:
        pacer.cancel()
        await asyncio.gather(pacer, return_exceptions=True)
        open_at_end = sum(1 for c in conns if c.status is None and not c.peer_closed
                          and c.error is None)
        await close_all(conns, 2.0)
    elapsed = time.monotonic() - started

    statuses = {}
    for c in conns:
        if c.status is not None:
            statuses[c.status] = statuses.get(c.status, 0) + 1
    answers = sorted(c.answer_s for c in conns if c.answer_s is not None)
    fields = [
        ("conns", len(conns)),
        ("wanted", args.conns),
        ("answered", sum(statuses.values())),
        ("statuses", ",".join(f"{s}:{n}" for s, n in sorted(statuses.items())) or "-"),
        ("closed_unanswered", sum(1 for c in conns if c.status is None and c.peer_closed)),
        ("open_at_end", open_at_end),
        ("connect_failed", sum(failures.values())),
        ("connect_errors", ",".join(f"{k}:{n}" for k, n in sorted(failures.items())) or "-"),
        ("body_bytes", sum(c.sent for c in conns)),
        ("body_len", len(BODY)),
        ("first_answer_s", f"{answers[0]:.2f}" if answers else "-"),
        ("last_answer_s", f"{answers[-1]:.2f}" if answers else "-"),
        ("connect_s", f"{connect_s:.2f}" if connect_s is not None else "-"),
        ("seconds", f"{elapsed:.2f}"),
    ]
    print("SLOW " + " ".join(f"{k}={v}" for k, v in fields), flush=True)
    return 0 if conns else 2


def raise_nofile(need: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help=f"the port on {HOST}")
    p.add_argument("--conns", type=int, default=500, help="connections (one request each)")
    p.add_argument("--seconds", type=float, default=8.0, help="stop and close everything after this long")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between two body bytes")
    p.add_argument("--batch", type=int, default=50, help="connections opened at once")
    p.add_argument("--batch-pause", type=float, default=0.02, help="seconds between batches")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--users", type=int, default=int(os.environ.get("BENCH_USERS", "1024")))
    args = p.parse_args()
    if not (1 <= args.port <= 65535 and 1 <= args.conns <= 20000 and 0 < args.seconds <= 600
            and 0.001 <= args.interval <= 60 and 1 <= args.batch and 0 <= args.batch_pause <= 10
            and 0 < args.connect_timeout <= 60 and args.users >= 1):
        p.error("--port 1..65535, --conns 1..20000, --seconds up to 600, --interval 0.001..60, "
                "--batch >= 1, --batch-pause 0..10, --connect-timeout up to 60, --users >= 1")
    soft = raise_nofile(args.conns + 64)
    if soft < args.conns + 16:
        print(f"slowclients: open-file limit {soft} is too low for {args.conns} connections "
              "(ulimit -n)", file=sys.stderr)
        return 2

    async def capped():
        # A last guard: whatever happens, the run ends a little after --seconds.
        return await asyncio.wait_for(run(args), timeout=args.seconds + 10)

    try:
        return asyncio.run(capped())
    except asyncio.TimeoutError:
        print(f"SLOW conns=0 wanted={args.conns} answered=0 statuses=- error=overran", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
