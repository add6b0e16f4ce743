#!/usr/bin/env bash
# The Unix-socket data listener against TCP: taskgate's CPU time per request
# with the same config on each kind of listener, driven by the same bounded
# client (sockload.py; wrk cannot open a Unix socket), interleaved over
# rounds. See bench/README.md, "Unix socket against TCP".
#
# Starts, all from a temporary directory and on 127.0.0.1 only:
#   upstream    NGINX answering the vendor's PUT and init GET from memory
#   tcp         taskgate, listen = 127.0.0.1:PORT
#   unix        taskgate, listen = unix:WORKDIR/unix/taskgate.sock
# and stops only the processes it started, by PID.
#
# Environment (defaults in brackets):
#   ROUNDS [3]  REQUESTS [20000] per run  MAX_SECONDS [15] per run
#   CONNS ["1 8"]  FSYNC [never] (the listener, not the disk, is measured)
#   KINDS ["update not_found"]: the full pipeline (an admitted PUT, forwarded)
#               and a PUT the router refuses (404: the listener and HTTP alone)
#   PORT_BASE [18580]: upstream +0, tcp +1, admin ports +2 and +3
#   BENCH_TMPDIR [$TMPDIR or /tmp]  KEEP_TMP [0]  SKIP_BUILD [0]
#   CARGO_TARGET_DIR  where the release binary is (as cargo uses it)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-20000}
MAX_SECONDS=${MAX_SECONDS:-15}
CONNS=${CONNS:-"1 8"}
FSYNC=${FSYNC:-never}
KINDS=${KINDS:-"update not_found"}
PORT_BASE=${PORT_BASE:-18580}
BENCH_TMPDIR=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
UPSTREAM_PORT=$PORT_BASE
TCP_PORT=$((PORT_BASE + 1))
TOKEN="bench-token-not-secret"   # the fast upstream checks it; not a secret

log() { printf '[socket-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

pids=()
workdir=""
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $workdir && -d $workdir ]]; then
        if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then log "work dir kept: $workdir"; else rm -rf "$workdir"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in python3 curl; do command -v "$tool" >/dev/null || die "$tool is needed"; done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx is needed for the upstream (bench/run.sh can install it)"

target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$repo/$target_dir
BIN=$target_dir/release/taskgate
if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release"
    (cd "$repo" && cargo build --release --quiet)
fi
[[ -x $BIN ]] || die "no binary at $BIN"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$UPSTREAM_PORT" "$TCP_PORT" $((PORT_BASE + 2)) $((PORT_BASE + 3)); do
    port_open "$p" && die "port $p is in use; choose others with PORT_BASE=..."
done

# until_ready PID NAME CHECK...: runs CHECK until it succeeds, for at most 10 s.
until_ready() {
    local pid=$1 name=$2
    shift 2
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$workdir/$name/stderr" >&2 || true; die "$name exited at start"; }
        "$@" && return 0
        sleep 0.1
    done
    die "$name was not ready within 10 s"
}

render() {
    local in=$1 out=$2 kv text
    shift 2
    text=$(<"$in")
    for kv in "$@"; do text=${text//@${kv%%=*}@/${kv#*=}}; done
    printf '%s\n' "$text" >"$out"
}

mkdir -p "$BENCH_TMPDIR"
workdir=$(mktemp -d "$BENCH_TMPDIR/taskgate-socket-bench.XXXXXX")
log "work dir $workdir"

# The upstream: the same NGINX as bench/run.sh's.
mkdir -p "$workdir/upstream/tmp"
temp_paths="    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;"
v=$("$NGINX" -V 2>&1)
for m in fastcgi uwsgi scgi; do
    [[ $v == *"--without-http_${m}_module"* ]] || temp_paths+=$'\n'"    ${m}_temp_path tmp/$m;"
done
render "$here/upstream.nginx.conf" "$workdir/upstream/nginx.conf" \
    "UPSTREAM_PORT=$UPSTREAM_PORT" "TOKEN=$TOKEN" "TEMP_PATHS=$temp_paths"
"$NGINX" -p "$workdir/upstream/" -e "$workdir/upstream/error.log" -c "$workdir/upstream/nginx.conf" \
    -g 'daemon off;' >"$workdir/upstream/stdout" 2>"$workdir/upstream/stderr" &
pids+=($!)
until_ready "$!" upstream port_open "$UPSTREAM_PORT"

declare -A PID_OF
SOCK=$workdir/unix/taskgate.sock
# start NAME ADMIN_PORT [TASKGATE_LISTEN]: bench/taskgate.toml, one worker.
start() {
    local name=$1 admin=$2 listen=${3:-}
    mkdir -p "$workdir/$name/audit"
    render "$here/taskgate.toml" "$workdir/$name/taskgate.toml" \
        "PORT=$TCP_PORT" "ADMIN_PORT=$admin" "UPSTREAM_PORT=$UPSTREAM_PORT" \
        "AUDIT_PATH=$workdir/$name/audit/audit.jsonl" "FSYNC=$FSYNC" "WORKERS=1"
    local env=(TASKGATE_UPSTREAM_TOKEN="$TOKEN")
    [[ -n $listen ]] && env+=(TASKGATE_LISTEN="$listen")
    env "${env[@]}" "$BIN" serve --config "$workdir/$name/taskgate.toml" \
        >>"$workdir/$name/access.log" 2>"$workdir/$name/stderr" &
    pids+=($!)
    PID_OF[$name]=$!
}
# The TCP instance first (the unix one's config names the same port, which
# TASKGATE_LISTEN replaces), each ready before the next starts.
start tcp $((PORT_BASE + 2))
until_ready "${PID_OF[tcp]}" tcp port_open "$TCP_PORT"
mkdir -p "$workdir/unix"
start unix $((PORT_BASE + 3)) "unix:$SOCK"
until_ready "${PID_OF[unix]}" unix test -S "$SOCK"

# load NAME CONNS REQUESTS [KIND]: one sockload run against NAME's listener.
load() {
    local name=$1 conns=$2 n=$3 kind=${4:-update} where
    if [[ $name == unix ]]; then where=(--unix "$SOCK"); else where=(--tcp "127.0.0.1:$TCP_PORT"); fi
    [[ $kind == not_found ]] && where+=(--not-found)
    python3 "$here/sockload.py" "${where[@]}" --conns "$conns" --requests "$n" --seconds "$MAX_SECONDS"
}

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local stat rest f
    stat=$(<"/proc/$1/stat")
    rest=${stat##*) }
    read -ra f <<<"$rest"
    echo $((f[11] + f[12]))
}

for name in tcp unix; do
    out=$(load "$name" 1 1) || die "$name: the sanity request failed: $out"
    load "$name" 1 1 not_found >/dev/null || die "$name: the 404 sanity request failed"
    log "$name answers: $out"
    load "$name" 8 2000 >/dev/null || die "$name: warm-up failed"
    : >"$workdir/$name/access.log"
done

printf 'kind\tlistener\tconns\tround\trequests\tseconds\tcpu_us\tp50_us\tp99_us\tvcsw\n' >"$workdir/results.tsv"
# Voluntary context switches of all the process's threads (a thread that
# blocks: epoll_wait, a futex).
vcsw() {
    local f total=0 line
    for f in /proc/"$1"/task/*/status; do
        while read -r line; do
            [[ $line == voluntary_ctxt_switches:* ]] && total=$((total + ${line##*[[:space:]]}))
        done <"$f"
    done
    echo "$total"
}
for kind in $KINDS; do
for conns in $CONNS; do
    for round in $(seq "$ROUNDS"); do
        # Alternate who goes first, so neither always runs on a warmer machine.
        order=(tcp unix)
        ((round % 2 == 0)) && order=(unix tcp)
        for name in "${order[@]}"; do
            t0=$(cpu_ticks "${PID_OF[$name]}")
            c0=$(vcsw "${PID_OF[$name]}")
            out=$(load "$name" "$conns" "$REQUESTS" "$kind") || die "$name: unexpected answers: $out"
            t1=$(cpu_ticks "${PID_OF[$name]}")
            c1=$(vcsw "${PID_OF[$name]}")
            python3 - "$kind" "$name" "$conns" "$round" "$(((t1 - t0) * 1000000 / CLK_TCK))" "$((c1 - c0))" "$out" \
                >>"$workdir/results.tsv" <<'EOF'
import json, sys
kind, name, conns, rnd, cpu_us, vcsw, out = sys.argv[1:]
r = json.loads(out)
print("\t".join(map(str, [kind, name, conns, rnd, r["requests"], r["seconds"], cpu_us, r["p50_us"], r["p99_us"], vcsw])))
EOF
            log "$(tail -n 1 "$workdir/results.tsv")"
            : >"$workdir/$name/access.log"
        done
    done
done
done

python3 - "$workdir/results.tsv" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def med(xs): return statistics.median(xs)
print("| requests | listener | conns | req/s | CPU µs/req median [min–max] | p50 µs | p99 µs | voluntary switches/req |")
print("|---|---|---|---|---|---|---|---|")
per = {}
keys = {(r["kind"], int(r["conns"]), r["listener"]) for r in rows}
for (kind, conns, name) in sorted(keys, key=lambda k: (k[0] != "update", k[1], k[2])):
    rs = [r for r in rows if (r["kind"], int(r["conns"]), r["listener"]) == (kind, conns, name)]
    rps = [int(r["requests"]) / float(r["seconds"]) for r in rs]
    cpu = [int(r["cpu_us"]) / int(r["requests"]) for r in rs]
    cs = [int(r["vcsw"]) / int(r["requests"]) for r in rs]
    per[(kind, conns, name)] = med(cpu)
    print(f"| {kind} | {name} | {conns} | {med(rps):,.0f} | {med(cpu):.1f} [{min(cpu):.1f}–{max(cpu):.1f}] "
          f"| {med(int(r['p50_us']) for r in rs):.0f} | {med(int(r['p99_us']) for r in rs):.0f} | {med(cs):.2f} |")
print()
for (kind, conns) in sorted({(k, c) for k, c, _ in per}, key=lambda k: (k[0] != "update", k[1])):
    if (kind, conns, "tcp") in per and (kind, conns, "unix") in per:
        u, t = per[(kind, conns, "unix")], per[(kind, conns, "tcp")]
        print(f"{kind}, {conns} conn(s): unix − tcp = {u - t:+.1f} µs/req (unix ÷ tcp = {u / t:.2f})")
EOF
