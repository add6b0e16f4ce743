#!/usr/bin/env python3
"""Helpers for bench/run.sh.

  report.py fsync FILE N        time N appends of 200 bytes + os.fsync on FILE;
                                prints "p50_us p99_us"
  report.py table WORKDIR       print the results table from WORKDIR/results.tsv,
                                meta, statuses.tsv and notes
"""

import os
import statistics
import sys
import time

# Rows in the order they are printed; anything else found goes last.
ORDER = ["direct", "floor", "nginx", "base", "taskgate", "taskgate-shared", "base-never", "taskgate-never", "taskgate-w1", "taskgate-w2"]


def fsync_probe(path, n):
    rec = b"x" * 199 + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(n):
            t = time.perf_counter_ns()
            os.write(fd, rec)
            os.fsync(fd)
            samples.append((time.perf_counter_ns() - t) / 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    samples.sort()
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"{p50:.0f} {p99:.0f}")


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n").split("\t") for l in f if l.strip()]
    head, rows = lines[0], lines[1:]
    return [dict(zip(head, r)) for r in rows]


def read_meta(path):
    meta = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                meta[k] = v
    return meta


def fmt_num(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def spread(values, digits=0):
    if len(values) < 2:
        return ""
    return f"[{min(values):,.{digits}f}–{max(values):,.{digits}f}]"


def table(workdir):
    rows = read_tsv(os.path.join(workdir, "results.tsv"))
    meta = read_meta(os.path.join(workdir, "meta"))
    statuses = {}
    spath = os.path.join(workdir, "statuses.tsv")
    if os.path.exists(spath):
        for r in read_tsv(spath):
            key = (r["config"], int(r["conns"]))
            statuses.setdefault(key, {})
            statuses[key][r["status"]] = statuses[key].get(r["status"], 0) + int(r["count"])

    # (config, conns) -> aggregated figures over rounds
    groups = {}
    for r in rows:
        key = (r["config"], int(r["conns"]))
        groups.setdefault(key, []).append(r)
    agg = {}
    for key, rs in groups.items():
        ok = [r for r in rs if int(r["requests"]) > 0]
        rps = [int(r["requests"]) / (int(r["duration_us"]) / 1e6) for r in ok]
        p50 = [float(r["p50_us"]) for r in ok]
        p99 = [float(r["p99_us"]) for r in ok]
        cpu = [float(r["cpu_us"]) / int(r["requests"]) for r in ok if r["cpu_us"] != "-"]
        rss = [int(r["rss_kb"]) for r in rs if r["rss_kb"] != "-"]
        audit = [int(r["audit_bytes"]) / int(r["requests"]) for r in ok if r["audit_bytes"] != "-"]
        agg[key] = {
            "rps": rps,
            "p50": p50,
            "p99": p99,
            "cpu": statistics.median(cpu) if cpu else None,
            "rss_mib": max(rss) / 1024 if rss else None,
            "audit_b": statistics.median(audit) if audit else None,
            "non2xx": sum(int(r["non2xx"]) for r in rs),
            "sockerr": sum(int(r["sockerr"]) for r in rs),
            "died": any(r["alive"] == "no" for r in rs),
            "rounds": len(rs),
        }

    def med(key, field):
        a = agg.get(key)
        return statistics.median(a[field]) if a and a[field] else None

    conns_levels = sorted({k[1] for k in agg}, reverse=True)
    configs = [c for c in ORDER if any(k[0] == c for k in agg)]
    configs += sorted({k[0] for k in agg} - set(configs))

    print()
    print(
        f"taskgate vs NGINX, {meta.get('nproc', '?')} cores, wrk {meta.get('wrk_threads', '?')} thread(s), "
        f"{meta.get('rounds', '?')} round(s) x {meta.get('duration', '?')}; median over rounds [min–max]"
    )
    print(
        f"one fsync (200-byte append + fsync) on {meta.get('fs', '?')}: "
        f"p50 {meta.get('fsync_p50_us', '?')} µs, p99 {meta.get('fsync_p99_us', '?')} µs"
    )
    print()
    hdr = (
        f"{'config':<15}{'conns':>5}  {'req/s':>9} {'[min–max]':<19}{'p50 µs':>8} {'[min–max]':<15}"
        f"{'p99 µs':>8} {'[min–max]':<17}{'+p50 µs':>8}{'RSS MiB':>8}{'CPU µs/req':>11}"
        f"{'÷nginx':>8}{'÷direct':>8}  non-2xx/err"
    )
    print(hdr)
    print("-" * len(hdr))
    for conns in conns_levels:
        direct = ("direct", conns)
        nginx = ("nginx", conns)
        for cfg in configs:
            key = (cfg, conns)
            a = agg.get(key)
            if a is None:
                continue
            rps = med(key, "rps")
            p50 = med(key, "p50")
            added = None
            if cfg != "direct" and p50 is not None and med(direct, "p50") is not None:
                added = p50 - med(direct, "p50")
            vs_nginx = rps / med(nginx, "rps") if cfg not in ("direct", "nginx") and rps and med(nginx, "rps") else None
            vs_direct = rps / med(direct, "rps") if cfg != "direct" and rps and med(direct, "rps") else None
            errs = f"{a['non2xx']}/{a['sockerr']}"
            if a["died"]:
                errs += " DIED"
            print(
                f"{cfg:<15}{conns:>5}  {fmt_num(rps):>9} {spread(a['rps']):<19}"
                f"{fmt_num(p50):>8} {spread(a['p50']):<15}"
                f"{fmt_num(med(key, 'p99')):>8} {spread(a['p99']):<17}"
                f"{fmt_num(added):>8}{fmt_num(a['rss_mib'], 1):>8}{fmt_num(a['cpu'], 1):>11}"
                f"{fmt_num(vs_nginx, 2):>8}{fmt_num(vs_direct, 2):>8}  {errs}"
            )
        print()

    print("+p50 = p50 minus direct p50 at the same connections; ÷ = req/s ratio at the same connections.")
    print("CPU and RSS: the proxy process (nginx: its worker); for 'direct', the upstream's worker.")
    print("non-2xx/err = wrk's non-2xx responses / socket errors, summed over rounds.")

    # The targets of DESIGN.md, from the medians.
    fs = meta.get("fsync_p50_us")
    fs = float(fs) if fs not in (None, "", "?") else None
    hi = max(conns_levels) if conns_levels else None
    lo = min(conns_levels) if conns_levels else None
    print()
    print("DESIGN.md targets (medians):")

    def line(label, value, target, ok):
        verdict = "-" if ok is None else ("ok" if ok else "MISSED")
        print(f"  {label:<52}{value:>22}   target {target:<22}{verdict}")

    tg, tgn, ng = ("taskgate", hi), ("taskgate-never", lo), ("nginx", hi)
    if med(tg, "rps") and med(ng, "rps"):
        r = med(tg, "rps") / med(ng, "rps")
        line(f"throughput @{hi}: taskgate(always) ÷ nginx", f"{r:.2f}", ">= 1.00", r >= 1.0)

    def added(cfg, conns):
        p, d = med((cfg, conns), "p50"), med(("direct", conns), "p50")
        return None if p is None or d is None else p - d

    ng_add = added("nginx", lo)
    if ng_add is not None:
        never_add = added("taskgate-never", lo)
        if never_add is not None:
            line(f"added p50 @{lo}: taskgate(never) vs nginx", f"{never_add:.0f} vs {ng_add:.0f} µs",
                 f"<= {ng_add:.0f} µs", never_add <= ng_add)
        always_add = added("taskgate", lo)
        if always_add is not None:
            lim = ng_add + (fs or 0)
            line(f"added p50 @{lo}: taskgate(always) vs nginx + 1 fsync",
                 f"{always_add:.0f} vs {ng_add:.0f}+{fs or 0:.0f} µs", f"<= {lim:.0f} µs", always_add <= lim)
    if med(tg, "p99") and med(ng, "p99"):
        a, b = med(tg, "p99"), med(ng, "p99")
        line(f"p99 @{hi}: taskgate(always) vs nginx", f"{a:.0f} vs {b:.0f} µs", f"<= {b:.0f} µs", a <= b)
    tg_rss = [a["rss_mib"] for k, a in agg.items() if k[0].startswith("taskgate") and a["rss_mib"]]
    if tg_rss:
        line("max RSS under load, any taskgate variant", f"{max(tg_rss):.1f} MiB", "<= 16 MiB", max(tg_rss) <= 16)
    ng_cpu, tg_cpu = agg.get(ng, {}).get("cpu"), agg.get(tg, {}).get("cpu")
    if ng_cpu and tg_cpu:
        line(f"CPU per request @{hi}: taskgate(always) vs nginx", f"{tg_cpu:.1f} vs {ng_cpu:.1f} µs",
             "(watch; ~18 µs nginx)", None)

    # What the proxies answered, and whether the audit log was written.
    notes = []
    for (cfg, conns), st in sorted(statuses.items()):
        other = {s: n for s, n in st.items() if not s.startswith("200")}
        if other:
            shown = ", ".join(f"{s} x{n}" for s, n in sorted(other.items(), key=lambda x: -x[1]))
            why = " (499: wrk closed connections with requests in flight when a run ended)" if set(other) == {"499"} else ""
            notes.append(f"  {cfg} @{conns}: answered {shown} (from its access log){why}")
    no_audit = sorted({cfg for (cfg, _), a in agg.items()
                       if cfg.startswith("taskgate") and a["audit_b"] is not None and a["audit_b"] < 1})
    if no_audit:
        notes.append(f"  audit log not written by {', '.join(no_audit)} (0 B/request): "
                     "this build does no audit, so fsync = always/never measure the same thing")
    audit_b = {cfg: a["audit_b"] for (cfg, c), a in agg.items() if cfg.startswith("taskgate") and a["audit_b"]}
    for cfg, b in sorted(audit_b.items()):
        notes.append(f"  {cfg}: audit log grew {b:.0f} B/request")
    for (cfg, conns), a in sorted(agg.items()):
        if a["died"]:
            notes.append(f"  {cfg} @{conns}: the process was gone after a run (see its stderr in the work dir)")
    npath = os.path.join(workdir, "notes")
    if os.path.exists(npath):
        with open(npath, encoding="utf-8") as f:
            notes += ["  " + n.strip() for n in f if n.strip()]
    if notes:
        print()
        print("Notes:")
        for n in dict.fromkeys(notes):
            print(n)


def main(argv):
    if len(argv) == 4 and argv[1] == "fsync":
        fsync_probe(argv[2], int(argv[3]))
    elif len(argv) == 3 and argv[1] == "table":
        table(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
