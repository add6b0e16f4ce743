#!/usr/bin/env python3
"""Helpers for bench/run.sh.

  report.py fsync FILE N        time N appends of 200 bytes + os.fsync on FILE;
                                prints "p50_us p99_us"
  report.py table WORKDIR       print the results table from WORKDIR/results.tsv,
                                meta, statuses.tsv, slow.tsv (the slow-client
                                phase), slow-statuses.tsv and notes
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
        # Older results.tsv files have no idle column.
        idle = [int(r["idle_pct"]) for r in ok if r.get("idle_pct", "-") not in ("-", "", None)]
        agg[key] = {
            "rps": rps,
            "p50": p50,
            "p99": p99,
            "cpu": statistics.median(cpu) if cpu else None,
            "cpu_all": cpu,
            "rss_mib": max(rss) / 1024 if rss else None,
            "audit_b": statistics.median(audit) if audit else None,
            "idle": statistics.median(idle) if idle else None,
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
        f"{'p99 µs':>8} {'[min–max]':<17}{'+p50 µs':>8}{'RSS MiB':>8}{'CPU µs/req':>11} {'[min–max]':<13}"
        f"{'÷nginx':>8}{'÷direct':>8}{'idle %':>7}  non-2xx/err"
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
                f"{fmt_num(added):>8}{fmt_num(a['rss_mib'], 1):>8}{fmt_num(a['cpu'], 1):>11} {spread(a['cpu_all'], 1):<13}"
                f"{fmt_num(vs_nginx, 2):>8}{fmt_num(vs_direct, 2):>8}{fmt_num(a['idle']):>7}  {errs}"
            )
        print()

    print("+p50 = p50 minus direct p50 at the same connections; ÷ = req/s ratio at the same connections.")
    print("CPU and RSS: the proxy process (nginx: its worker); for 'direct', the upstream's worker.")
    print("idle % = the whole machine's idle CPU during the run (wrk and the upstream included); a")
    print("  closed-loop run that leaves it idle is held by waits, not by CPU.")
    print("non-2xx/err = wrk's non-2xx responses / socket errors, summed over rounds.")

    # The slow-client phase: one row per proxy.
    slow = {}
    slow_path = os.path.join(workdir, "slow.tsv")
    if os.path.exists(slow_path):
        for r in read_tsv(slow_path):
            slow[r["config"]] = r
    rss_load = {}
    for (cfg, _), a in agg.items():
        if a["rss_mib"] is not None:
            rss_load[cfg] = max(rss_load.get(cfg, 0), a["rss_mib"])

    def slow_rss(r):
        return int(r["rss_kb"]) / 1024 if r["rss_kb"] not in ("-", "", "0") else None

    if slow:
        any_row = next(iter(slow.values()))
        wrk_c = any_row["wrk_conns"]
        print()
        print(
            f"With slow clients: {any_row['slow_wanted']} connections each sending the PUT body "
            f"one byte per {meta.get('slow_interval', '?')} s, alongside wrk at {wrk_c} connections, "
            f"{meta.get('slow_seconds', '?')} s per proxy"
        )
        print()
        shdr = (
            f"{'config':<15}{'held':>6}{'answered':>10}  {'statuses':<16}{'answer s':>12}"
            f"{'RSS MiB':>9}{'RSS slow MiB':>14}{'wrk req/s':>11}{'p99 µs':>9}  non-2xx/err"
        )
        print(shdr)
        print("-" * len(shdr))
        slow_configs = [c for c in ORDER if c in slow] + sorted(set(slow) - set(ORDER))
        for cfg in slow_configs:
            r = slow[cfg]
            rps = None
            if r["requests"] not in ("-", "") and r["duration_us"] not in ("-", "", "0"):
                rps = int(r["requests"]) / (int(r["duration_us"]) / 1e6)
            p99 = float(r["p99_us"]) if r["p99_us"] not in ("-", "") else None
            when = "-"
            if r["first_answer_s"] != "-":
                when = f"{float(r['first_answer_s']):.1f}–{float(r['last_answer_s']):.1f}"
            errs = f"{r['non2xx']}/{r['sockerr']}"
            if r["alive"] == "no":
                errs += " DIED"
            print(
                f"{cfg:<15}{r['slow_conns'] + '/' + r['slow_wanted']:>6}{r['answered']:>10}  "
                f"{r['statuses']:<16}{when:>12}{fmt_num(rss_load.get(cfg), 1):>9}"
                f"{fmt_num(slow_rss(r), 1):>14}{fmt_num(rps):>11}{fmt_num(p99):>9}  {errs}"
            )
        print()
        print("held = slow connections opened / asked for (one request each, never reopened);")
        print("answered = those the proxy answered before the end (408: its header/body timeout),")
        print("'answer s' = when, in seconds from the start. RSS MiB = the max over the rounds above;")
        print("RSS slow MiB = the max during this phase. wrk req/s, p99, non-2xx/err: wrk's, in this phase.")

    # The targets of DESIGN.md, from the medians.
    fs = meta.get("fsync_p50_us")
    fs = float(fs) if fs not in (None, "", "?") else None
    hi = max(conns_levels) if conns_levels else None
    lo = min(conns_levels) if conns_levels else None
    print()
    print("DESIGN.md performance milestones (medians; the goal column is where DESIGN.md is headed):")

    def line(label, value, target, ok, goal=""):
        verdict = "-" if ok is None else ("ok" if ok else "MISSED")
        print(f"  {label:<50}{value:>26}   milestone {target:<16}{verdict:<7}{goal}")

    tg, tgn, ng = ("taskgate", hi), ("taskgate-never", hi), ("nginx", hi)

    def ratio(a, b):
        return a / b if a is not None and b else None

    r = ratio(med(tg, "rps"), med(ng, "rps"))
    if r is not None:
        line(f"req/s @{hi}: taskgate(always) ÷ nginx", f"{r:.2f}", ">= 0.65", r >= 0.65, "goal >= 1.0")
    r = ratio(med(tgn, "rps"), med(ng, "rps"))
    if r is not None:
        line(f"req/s @{hi}: taskgate(never) ÷ nginx", f"{r:.2f}", ">= 0.75", r >= 0.75, "goal >= 1.0")
    ng_cpu, tg_cpu = agg.get(ng, {}).get("cpu"), agg.get(tg, {}).get("cpu")
    if ng_cpu and tg_cpu:
        line(f"CPU µs/req @{hi}: taskgate(always) ÷ nginx", f"{tg_cpu:.1f} / {ng_cpu:.1f} = {tg_cpu / ng_cpu:.2f}",
             "<= 1.5", tg_cpu / ng_cpu <= 1.5, "goal <= 1.0")

    def added(cfg, conns):
        p, d = med((cfg, conns), "p50"), med(("direct", conns), "p50")
        return None if p is None or d is None else p - d

    ng_add = added("nginx", lo)
    never_add, always_add = added("taskgate-never", lo), added("taskgate", lo)
    if ng_add and never_add is not None:
        line(f"added p50 @{lo}: taskgate(never) ÷ nginx's", f"{never_add:.0f} / {ng_add:.0f} = {never_add / ng_add:.1f}",
             "<= 1.5", never_add / ng_add <= 1.5, "goal <= 1.0")
    if fs and never_add is not None and always_add is not None:
        f = (always_add - never_add) / fs
        line(f"added p50 @{lo}: taskgate(always) - (never)", f"{always_add - never_add:.0f} µs = {f:.2f} fsyncs",
             "<= 1.2 fsyncs", f <= 1.2, "goal 1 fsync")
    if med(tg, "p99") and med(ng, "p99"):
        a, b = med(tg, "p99"), med(ng, "p99")
        line(f"p99 @{hi}: taskgate(always) ÷ nginx", f"{a:.0f} / {b:.0f} = {a / b:.1f}", "<= 1.5", a / b <= 1.5,
             "goal <= 1.0")
    tg_rss = [a["rss_mib"] for k, a in agg.items() if k[0].startswith("taskgate") and a["rss_mib"]]
    tg_slow = {cfg: r for cfg, r in slow.items() if cfg.startswith("taskgate")}
    tg_slow_rss = [slow_rss(r) for r in tg_slow.values() if slow_rss(r) is not None]
    if tg_rss and tg_slow_rss:
        wanted = max(int(r["slow_wanted"]) for r in tg_slow.values())
        # The second half only counts if every slow connection was really held.
        held = all(int(r["slow_conns"]) == int(r["slow_wanted"]) for r in tg_slow.values())
        ok = max(tg_rss) <= 16 and max(tg_slow_rss) <= 24
        line(f"max RSS under load / {wanted} slow clients, taskgate",
             f"{max(tg_rss):.1f} / {max(tg_slow_rss):.1f} MiB", "<= 16 / <= 24", 
             ok if held else (False if max(tg_rss) > 16 else None), "goal <= 16 / <= 16")
        if not held:
            print("    (not every slow connection was opened: the slow-client figure is not a full test)")
    elif tg_rss:
        line("max RSS under load, any taskgate variant", f"{max(tg_rss):.1f} MiB", "<= 16 MiB", max(tg_rss) <= 16)
    fl = ("floor", hi)
    if med(fl, "rps") and med(ng, "rps"):
        fl_cpu = agg.get(fl, {}).get("cpu")
        cpu = f", CPU {fl_cpu:.1f} µs/req" if fl_cpu else ""
        print(f"  (the floor, a bare hyper forwarder: {med(fl, 'rps') / med(ng, 'rps'):.2f} × nginx's req/s @{hi}{cpu})")

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
    sspath = os.path.join(workdir, "slow-statuses.tsv")
    if os.path.exists(sspath):
        per = {}
        for r in read_tsv(sspath):
            per.setdefault(r["config"], {})
            per[r["config"]][r["status"]] = per[r["config"]].get(r["status"], 0) + int(r["count"])
        for cfg, st in sorted(per.items()):
            shown = ", ".join(f"{s} x{n}" for s, n in sorted(st.items(), key=lambda x: -x[1]))
            why = ""
            if cfg == "nginx" and "400" in st:
                why = "; 400: slow clients closed mid-body at the end"
            notes.append(f"  {cfg} slow-client phase: answered {shown} (from its access log; wrk's requests included{why})")
    for cfg, r in sorted(slow.items()):
        if int(r["slow_conns"]) < int(r["slow_wanted"]):
            notes.append(f"  {cfg} slow-client phase: only {r['slow_conns']} of {r['slow_wanted']} connections opened")
        if r["alive"] == "no":
            notes.append(f"  {cfg}: the process was gone after the slow-client phase")
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
