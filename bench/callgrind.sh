#!/usr/bin/env bash
# Instructions per request, counted by callgrind: a figure that does not move
# with the machine's load (bench/README.md, "Instructions per request").
#
# Starts, on 127.0.0.1 and from a temporary directory, the bench's upstream
# (NGINX answering from memory) and then each target under
# `valgrind --tool=callgrind`, one after the other: WARM sequential PUTs
# (put.lua's body and paths, BENCH_USERS user ids in turn) fill the residue
# cache with instrumentation off, then N PUTs are counted. Prints one line
# per target: user-space instructions per request over all of its threads
# (the kernel is not counted), and the part spent in SHA-256.
#
# valgrind's CPU hides the SHA extensions, so under it the sha2 crate falls
# back to its portable code: the SHA-256 column is what that costs here, far
# more than the SHA-NI code a real run uses (`perf` shows it). Compare the
# "without SHA-256" column between builds.
#
# Environment (defaults in brackets):
#   N [2000]  WARM [1100]  BENCH_USERS [1024]
#   TARGETS ["taskgate floor"]: taskgate (fsync never), taskgate-always,
#            floor, base (BASE_BIN, fsync never)
#   TASKGATE_BIN [target/release/taskgate]  FLOOR_BIN [target/release/examples/floor]
#   BASE_BIN   another taskgate binary, for the `base` target
#   PORT_BASE [18580]: upstream +0, targets +1, admin +2
# Build first: cargo build --release --bin taskgate --example floor
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
N=${N:-2000}
WARM=${WARM:-1100}
BENCH_USERS=${BENCH_USERS:-1024}
TARGETS=${TARGETS:-"taskgate floor"}
TASKGATE_BIN=${TASKGATE_BIN:-$repo/target/release/taskgate}
FLOOR_BIN=${FLOOR_BIN:-$repo/target/release/examples/floor}
BASE_BIN=${BASE_BIN:-}
PORT_BASE=${PORT_BASE:-18580}
UPSTREAM_PORT=$PORT_BASE
PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
TOKEN="bench-token-not-secret"

die() { echo "callgrind.sh: $*" >&2; exit 1; }
for tool in valgrind callgrind_control callgrind_annotate nginx python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

workdir=$(mktemp -d "${TMPDIR:-/tmp}/taskgate-callgrind.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$workdir"
}
trap cleanup EXIT

# render TEMPLATE OUT KEY=VALUE... (lib.sh)
source "$here/lib.sh"

# wait_port PORT PID: until something listens there (or the process died).
wait_port() {
    local i
    for i in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# The load: sequential PUTs on one keep-alive connection, every answer checked.
cat >"$workdir/load.py" <<'EOF'
import http.client, re, sys
n, port, users, lua = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
src = open(lua, encoding="utf-8").read()
body = re.search(r"wrk\.body = '(.*)'", src).group(1).encode()
task = re.search(r'local task = "([0-9a-f-]+)"', src).group(1)
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
for i in range(1, n + 1):
    u = i % users
    c.request("PUT", "/agent-api/user/%08x-0000-4000-8000-%012x/task/%s" % (u, u, task),
              body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit("request %d: status %d" % (i, r.status))
EOF

mkdir -p "$workdir/upstream/tmp"
temp_paths=""
for m in client_body proxy fastcgi uwsgi scgi; do temp_paths+="    ${m}_temp_path tmp/$m;"$'\n'; done
render "$here/upstream.nginx.conf" "$workdir/upstream/nginx.conf" \
    "UPSTREAM_PORT=$UPSTREAM_PORT" "TOKEN=$TOKEN" "TEMP_PATHS=$temp_paths"
nginx -p "$workdir/upstream/" -e "$workdir/upstream/error.log" -c "$workdir/upstream/nginx.conf" \
    -g 'daemon off;' >"$workdir/upstream/stdout" 2>&1 &
pids+=($!)
wait_port "$UPSTREAM_PORT" "$!" || die "the upstream did not start (port $UPSTREAM_PORT taken?)"

# count NAME CMD...: runs CMD under callgrind, prints the line for NAME.
count() {
    local name=$1 pid out total sha
    shift
    out=$workdir/$name.callgrind
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "$@" \
        >"$workdir/$name.stdout" 2>"$workdir/$name.stderr" &
    pid=$!
    pids+=("$pid")
    wait_port "$PORT" "$pid" || { tail -5 "$workdir/$name.stderr" >&2; die "$name did not start"; }
    python3 "$workdir/load.py" "$WARM" "$PORT" "$BENCH_USERS" "$here/put.lua"
    callgrind_control -i on "$pid" >/dev/null
    python3 "$workdir/load.py" "$N" "$PORT" "$BENCH_USERS" "$here/put.lua"
    callgrind_control -i off "$pid" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
    callgrind_annotate --auto=no "$out" >"$out.txt" 2>/dev/null
    total=$(awk '/PROGRAM TOTALS/ && !t {gsub(",", "", $1); t = $1} END {print t}' "$out.txt")
    sha=$(awk '/sha2::sha256/ {gsub(",", "", $1); s += $1} END {print s + 0}' "$out.txt")
    [[ -n $total ]] || die "$name: no callgrind totals"
    printf '%-16s %10d %10d %12d\n' "$name" $((total / N)) $((sha / N)) $(((total - sha) / N))
}

serve() {  # serve NAME BIN FSYNC
    local dir=$workdir/$1
    mkdir -p "$dir/audit"
    render "$here/taskgate.toml" "$dir/taskgate.toml" \
        "PORT=$PORT" "ADMIN_PORT=$ADMIN_PORT" "UPSTREAM_PORT=$UPSTREAM_PORT" \
        "AUDIT_PATH=$dir/audit/audit.jsonl" "FSYNC=$3" "WORKERS=1"
    TASKGATE_UPSTREAM_TOKEN=$TOKEN count "$1" "$2" serve --config "$dir/taskgate.toml"
}

echo "instructions per request (callgrind; $N sequential PUTs after $WARM to warm up)"
printf '%-16s %10s %10s %12s\n' target all SHA-256 "without SHA-256"
for t in $TARGETS; do
    case $t in
        taskgate) serve taskgate "$TASKGATE_BIN" never ;;
        taskgate-always) serve taskgate-always "$TASKGATE_BIN" always ;;
        base) [[ -n $BASE_BIN ]] || die "base needs BASE_BIN"; serve base "$BASE_BIN" never ;;
        floor) FLOOR_TOKEN=$TOKEN count floor "$FLOOR_BIN" "$PORT" "$UPSTREAM_PORT" ;;
        *) die "unknown target $t" ;;
    esac
done
