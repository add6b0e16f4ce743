#!/usr/bin/env python3
"""Splits a taskgate CPU profile into pipeline stages.

    perf script -i perf/taskgate.data -F comm,period,ip,sym | bench/stages.py --cpu-us 60.5

reads `perf script` samples (call chains, software clock) and assigns each
sample to the first stage whose rule matches its thread or a frame of its
stack, then prints µs per request for each stage: the sample share times the
process CPU per request. the profiled run's CPU µs per request (from the same run's table) scales the
shares to µs.
"""
import argparse
import re
import sys
from collections import Counter

# (stage, thread name or None, frame pattern or None, whole names); first
# match wins. Thread rules come first: those threads do one job each. A
# pattern is matched against each frame's own path (generic arguments
# stripped: they name the caller's types), or, with "whole names", against
# the whole name: hyper's dispatcher is one function told apart only by its
# `dispatch::Client` / `dispatch::Server` argument.
RULES = [
    ("audit sync thread (write, fdatasync, wake-ups)", "taskgate-audit", None, False),
    ("access-log thread", "access-log", None, False),
    ("redis round trips", None, r"^redis::|^taskgate::shared::", False),
    ("audit on the worker (encode, hash, queue, wait)", None, r"^taskgate::audit::", False),
    ("client path to the upstream (hyper-util, kernel TCP)", None,
     r"dispatch::Client|role::Client|hyper_util::client::legacy|hyper::client::conn|pipeline::forward::send|hyper_rustls",
     True),
    ("residue, rate limit, access log, metrics", None,
     r"^taskgate::(pipeline::residue|pipeline::rate_limit|access_log|pipeline::access|metrics)|prometheus_client|governor",
     False),
    ("body, validation, JSON", None, r"^taskgate::pipeline::(validate|body)|serde_json|vendor_envelope", False),
    ("pipeline glue (request id, records, response headers)", None, r"^taskgate::pipeline::", False),
    ("server path (read, parse, write back, kernel TCP)", None,
     r"dispatch::Server|role::Server|hyper::server|hyper_util::server|taskgate::server::|^floor::", True),
    ("tokio scheduling, park/unpark, timers", None,
     r"^tokio::runtime|^tokio::time|epoll_wait|futex|schedule|^tokio_util::task", False),
]
OTHER = "other (allocator, syscalls outside a stage, ...)"


def samples(stream):
    """Yields (comm, period, frames) per sample of `perf script` output."""
    head, frames = None, []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if head:
                yield head[0], head[1], frames
            head, frames = None, []
        elif not line.startswith((" ", "\t")):
            parts = line.split()
            period = next((int(p) for p in reversed(parts) if p.isdigit()), 1)
            head = (parts[0], period)
        else:
            frames.append(line.strip())
    if head:
        yield head[0], head[1], frames


def path(frame):
    """The function's own path, without the generic arguments (which name
    the callers' types and would match their stages)."""
    name = frame.split(None, 1)[-1].replace(" (inlined)", "")
    if name.startswith("<"):
        name = name[1:]
        cut = [i for i in (name.find(" as "), name.find("<")) if i >= 0]
    else:
        cut = [i for i in (name.find("<"),) if i >= 0]
    return name[: min(cut)] if cut else name


def classify(comm, frames, compiled):
    paths = [path(f) for f in frames]
    for stage, thread, pattern, whole in compiled:
        if thread is not None and comm.startswith(thread):
            return stage
        if pattern is not None and any(pattern.search(p) for p in (frames if whole else paths)):
            return stage
    return OTHER


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-us", type=float, required=True, help="CPU µs per request of the profiled run")
    args = ap.parse_args()
    compiled = [(s, t, re.compile(p) if p else None, w) for s, t, p, w in RULES]
    totals, kernel = Counter(), Counter()
    for comm, period, frames in samples(sys.stdin):
        stage = classify(comm, frames, compiled)
        totals[stage] += period
        # A sample whose innermost frame is a kernel address was in the kernel.
        if frames and frames[0].split()[0].startswith("ffff"):
            kernel[stage] += period
    whole = sum(totals.values()) or 1
    order = [s for s, _, _, _ in RULES] + [OTHER]
    us = args.cpu_us / whole
    print("| stage | share | µs/request | of which in the kernel |")
    print("|---|---|---|---|")
    for stage in order:
        if totals[stage]:
            print(f"| {stage} | {totals[stage] / whole * 100:.1f} % | {totals[stage] * us:.1f} | {kernel[stage] * us:.1f} |")
    print(f"| total | 100 % | {args.cpu_us:.1f} | {sum(kernel.values()) * us:.1f} |")


if __name__ == "__main__":
    main()
