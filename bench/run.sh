#!/usr/bin/env bash
# taskgate against NGINX, side by side, in one run on one machine
# (DESIGN.md "Performance targets"). See bench/README.md.
#
# Starts, all on 127.0.0.1 and all from a temporary directory:
#   upstream   NGINX answering the vendor's task-update PUT and init GET from memory
#   nginx      NGINX as the reference proxy (token, per-user limit_req, JSON log)
#   taskgate*  taskgate, full pipeline, in variants (fsync always/never, workers)
# then drives each with the same wrk PUT load, interleaved over rounds, and
# prints one table. Only the processes it started are stopped, by PID.
#
# Environment (defaults in brackets):
#   ROUNDS [3]  DURATION [10s]  WARMUP [1s]  CONNS ["32 1"]  WRK_THREADS [1]
#   TARGETS     ["direct nginx taskgate taskgate-never taskgate-w1 taskgate-w2"];
#               taskgate-w1 is skipped (it is `taskgate`: one worker is the default);
#               taskgate-shared is `taskgate` with [shared] on a loopback
#               redis-server this script starts (port PORT_BASE+9)
#   PORT_BASE [18480]: upstream +0, nginx +1, taskgate variants +10.., admin +20..
#   UPSTREAM_PORT, NGINX_PORT   override single ports
#   BENCH_TMPDIR [$TMPDIR or /tmp]: where the work dir (and the audit log) goes;
#               put it on the disk you want fsync measured on
#   KEEP_TMP [0]  1 keeps the work dir (logs, configs, raw results)
#   SKIP_BUILD [0]  1 uses the existing release binary
#   CARGO_TARGET_DIR  where the release binary is (as cargo uses it)
#   TASKGATE_BIN  a taskgate binary to run instead (then nothing is built)
#   NGINX_ACCESS_LOG_BUFFER [""]  e.g. "buffer=64k flush=1s" (default: one write per request)
#   BASE_BIN    another taskgate binary (e.g. an older commit's release build);
#               the targets `base` and `base-never` run it with the `taskgate` and
#               `taskgate-never` configs, interleaved in the same rounds, for a
#               before/after comparison in one run
#   SLOW_CLIENTS [500]  after the rounds, each proxy (nginx, taskgate*, base*)
#               once more: this many connections sending the PUT body one byte
#               per SLOW_INTERVAL (slowclients.py) while wrk drives
#               SLOW_WRK_CONNS [32] connections, both for SLOW_SECONDS [8];
#               RSS is sampled throughout. 0 skips the phase.
#   SLOW_INTERVAL [0.1]  seconds between two body bytes of a slow client
# The open-file limit (ulimit -n) is raised to at least 4096 for them.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true   # `&` in a rendered value stays `&`

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
CONNS=${CONNS:-"32 1"}
WRK_THREADS=${WRK_THREADS:-1}
PERF=${PERF:-0}
PERF_DIR=${PERF_DIR:-$PWD/perf}
PERF_FREQ=${PERF_FREQ:-499}
TARGETS=${TARGETS:-"direct floor nginx taskgate taskgate-never taskgate-w1 taskgate-w2"}
DEFAULT_WORKERS=1   # taskgate's default runtime.worker_threads
PORT_BASE=${PORT_BASE:-18480}
UPSTREAM_PORT=${UPSTREAM_PORT:-$PORT_BASE}
NGINX_PORT=${NGINX_PORT:-$((PORT_BASE + 1))}
BENCH_TMPDIR=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
NGINX_ACCESS_LOG_BUFFER=${NGINX_ACCESS_LOG_BUFFER:-}
TASKGATE_BIN=${TASKGATE_BIN:-}
SLOW_CLIENTS=${SLOW_CLIENTS:-500}
SLOW_SECONDS=${SLOW_SECONDS:-8}
SLOW_INTERVAL=${SLOW_INTERVAL:-0.1}
SLOW_WRK_CONNS=${SLOW_WRK_CONNS:-32}
[[ $SLOW_CLIENTS =~ ^[0-9]+$ ]] || { echo "SLOW_CLIENTS must be a number" >&2; exit 2; }
[[ $SLOW_SECONDS =~ ^[1-9][0-9]*$ ]] || { echo "SLOW_SECONDS must be whole seconds (> 0)" >&2; exit 2; }
[[ $SLOW_WRK_CONNS =~ ^[0-9]+$ ]] || { echo "SLOW_WRK_CONNS must be a number" >&2; exit 2; }

# Not a secret: the fast upstream checks it so that a proxy which forgets
# to inject it shows up as non-2xx.
TOKEN="bench-token-not-secret"
USER_ID="5832d184-dd53-42a0-8ace-0bf8d660f4cc"
TASK_ID="f232d184-dd54-42a0-8ace-0bf8d660f4cc"
TASK_PATH="/agent-api/user/$USER_ID/task/$TASK_ID"
BODY='{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1, "maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0", "remark": "API-test", "end_action": 1}'

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------
# Processes we started, stopped on any exit.

pids=()
sampler_pid=""
load_pids=()   # the slow-client phase's load generators while they run
workdir=""

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    [[ -n $sampler_pid ]] && pids+=("$sampler_pid")
    pids=("${load_pids[@]}" "${pids[@]}")
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $workdir && -d $workdir ]]; then
        if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
            log "work dir kept: $workdir"
        else
            rm -rf "$workdir"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Tools.

sudo_if_needed() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root (or sudo) to run: $*"
    fi
}

install_tools() {
    local missing=()
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v python3 >/dev/null || missing+=(python3)
    command -v curl >/dev/null || missing+=(curl)
    if [[ " $TARGETS " == *" taskgate-shared "* ]]; then
        command -v redis-server >/dev/null || missing+=(redis-server)
    fi
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing from Debian packages: ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} yourself"
    sudo_if_needed apt-get update -qq
    local pkgs=() m
    for m in "${missing[@]}"; do
        if [[ $m == nginx ]]; then
            # nginx-light is enough (rewrite, map, limit_req, proxy, upstream keepalive).
            if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
        else
            pkgs+=("$m")
        fi
    done
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

build() {
    local target_dir=${CARGO_TARGET_DIR:-target}
    [[ $target_dir == /* ]] || target_dir=$repo/$target_dir
    FLOOR_BIN=${FLOOR_BIN:-$target_dir/release/examples/floor}
    if [[ -n $TASKGATE_BIN ]]; then
        # A binary given from outside: run it as it is, build nothing.
        [[ $TASKGATE_BIN == */* ]] || TASKGATE_BIN=$(command -v "$TASKGATE_BIN" || echo "$TASKGATE_BIN")
        [[ -x $TASKGATE_BIN ]] || die "TASKGATE_BIN=$TASKGATE_BIN is not an executable"
        log "using TASKGATE_BIN=$TASKGATE_BIN (not building)"
        return 0
    fi
    TASKGATE_BIN=$target_dir/release/taskgate
    if [[ $SKIP_BUILD != 1 ]]; then
        log "cargo build --release (taskgate and the floor forwarder)"
        (cd "$repo" && cargo build --release --quiet --bin taskgate --example floor)
    fi
    [[ -x $TASKGATE_BIN ]] || die "no binary at $TASKGATE_BIN (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-unset})"
}

# ---------------------------------------------------------------------------
# Ports and processes.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_port_free() {
    if port_open "$1"; then
        die "port $1 is in use; choose others with PORT_BASE=... (or UPSTREAM_PORT/NGINX_PORT)"
    fi
}

# wait_port PORT PID NAME: until PORT accepts, for at most 10 s, while PID lives.
wait_port() {
    local port=$1 pid=$2 name=$3
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$workdir/$name/stderr" >&2 || true; die "$name exited at start"; }
        port_open "$port" && return 0
        sleep 0.1
    done
    die "$name did not listen on 127.0.0.1:$port within 10 s"
}

# The nginx temp directories that exist in this build, under the prefix, so
# nothing is written outside the work dir.
nginx_temp_paths() {
    local v m
    v=$("$NGINX" -V 2>&1)
    echo "    client_body_temp_path tmp/body;"
    echo "    proxy_temp_path tmp/proxy;"
    for m in fastcgi uwsgi scgi; do
        [[ $v == *"--without-http_${m}_module"* ]] || echo "    ${m}_temp_path tmp/$m;"
    done
}

# render TEMPLATE OUT KEY=VALUE... (lib.sh)
source "$here/lib.sh"

declare -A PORT ADMIN_PORT PID_OF MEASURE_PIDS

# start_nginx NAME TEMPLATE PORT: one nginx instance with its own prefix.
start_nginx() {
    local name=$1 tmpl=$2 port=$3 dir=$workdir/$1 pid
    mkdir -p "$dir/tmp"
    render "$here/$tmpl" "$dir/nginx.conf" \
        "UPSTREAM_PORT=$UPSTREAM_PORT" "NGINX_PORT=$NGINX_PORT" "TOKEN=$TOKEN" \
        "TEMP_PATHS=$(nginx_temp_paths)" "ACCESS_LOG_BUFFER=$NGINX_ACCESS_LOG_BUFFER"
    "$NGINX" -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" -t >"$dir/stderr" 2>&1 ||
        { cat "$dir/stderr" >&2; die "$name: nginx -t failed"; }
    "$NGINX" -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;' \
        >"$dir/stdout" 2>"$dir/stderr" &
    pid=$!
    pids+=("$pid")
    wait_port "$port" "$pid" "$name"
    PORT[$name]=$port
    PID_OF[$name]=$pid
    # CPU and memory are the worker's (the master only supervises). The
    # port answers once the master listens, maybe before it has forked.
    local workers=""
    for _ in $(seq 50); do
        workers=$(children "$pid")
        [[ -n $workers ]] && break
        sleep 0.1
    done
    [[ -n $workers ]] || die "$name: no worker process under $pid"
    MEASURE_PIDS[$name]=$workers
}

# children PID: the PIDs whose parent is PID (no procps needed).
children() {
    local f stat rest fields out=""
    for f in /proc/[0-9]*/stat; do
        { stat=$(<"$f"); } 2>/dev/null || continue
        rest=${stat##*) }
        read -ra fields <<<"$rest"
        [[ ${fields[1]} == "$1" ]] && out+="${f//[!0-9]/} "
    done
    echo "$out"
}

# start_redis: a private, non-persistent redis-server for taskgate-shared.
start_redis() {
    local port=$((PORT_BASE + 9)) dir=$workdir/redis pid
    check_port_free "$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
        >"$dir/log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_port "$port" "$pid" redis
    REDIS_PORT=$port
}

# start_taskgate NAME FSYNC WORKERS INDEX [BINARY] [EXTRA_TOML]
start_taskgate() {
    local name=$1 fsync=$2 workers=$3 i=$4 dir=$workdir/$1 pid bin=${5:-$TASKGATE_BIN} extra=${6:-}
    local port=$((PORT_BASE + 10 + i)) admin=$((PORT_BASE + 20 + i))
    check_port_free "$port"
    check_port_free "$admin"
    mkdir -p "$dir/audit"
    render "$here/taskgate.toml" "$dir/taskgate.toml" \
        "PORT=$port" "ADMIN_PORT=$admin" "UPSTREAM_PORT=$UPSTREAM_PORT" \
        "AUDIT_PATH=$dir/audit/audit.jsonl" "FSYNC=$fsync" "WORKERS=$workers"
    [[ -n $extra ]] && printf '%s\n' "$extra" >>"$dir/taskgate.toml"
    TASKGATE_UPSTREAM_TOKEN=$TOKEN "$bin" serve --config "$dir/taskgate.toml" \
        >>"$dir/access.log" 2>"$dir/stderr" &
    pid=$!
    pids+=("$pid")
    wait_port "$port" "$pid" "$name"
    PORT[$name]=$port
    ADMIN_PORT[$name]=$admin
    PID_OF[$name]=$pid
    MEASURE_PIDS[$name]=$pid
}

# start_floor INDEX: the bare hyper forwarder (bench/floor.rs), the floor the
# HTTP path is compared with.
start_floor() {
    local i=$1 port=$((PORT_BASE + 10 + $1)) dir=$workdir/floor pid
    [[ -x $FLOOR_BIN ]] || die "no floor forwarder at $FLOOR_BIN (cargo build --release --example floor)"
    check_port_free "$port"
    mkdir -p "$dir"
    FLOOR_TOKEN=$TOKEN "$FLOOR_BIN" "$port" "$UPSTREAM_PORT" >"$dir/stdout" 2>"$dir/stderr" &
    pid=$!
    pids+=("$pid")
    wait_port "$port" "$pid" floor
    PORT[floor]=$port
    PID_OF[floor]=$pid
    MEASURE_PIDS[floor]=$pid
}

# metrics_note NAME: what taskgate's own counters say about the whole run
# (residue misses are init GETs upstream), as one line for the notes.
metrics_note() {
    local name=$1 m
    m=$(curl -sS --max-time 5 "http://127.0.0.1:${ADMIN_PORT[$name]}/metrics" 2>/dev/null) || {
        echo "$name: /metrics did not answer"
        return 0
    }
    m=$(grep -E '^taskgate_(requests_total|upstream_requests_total|residue_lookups_total|audit_records_total|audit_fsync_seconds_count|audit_fsync_seconds_sum)[{ ]' <<<"$m" |
        sed -E 's/^taskgate_//; s/_total//; s/\{([^}]*)\}/{\1}/; s/"//g' | tr '\n' ' ' || true)
    echo "$name metrics (whole run, warm-up included): ${m:-none found}"
}

# Proves the whole chain answers the vendor's success envelope before any load.
sanity_put() {
    local name=$1 port=$2 out code
    local auth=()
    [[ $name == direct ]] && auth=(-H "Authorization: Bearer $TOKEN")
    out=$(curl -sS -o "$workdir/sanity.body" -w '%{http_code}' -X PUT "${auth[@]}" \
        -H 'Content-Type: application/json' --data-binary "$BODY" \
        "http://127.0.0.1:$port$TASK_PATH") || die "$name: curl failed"
    code=$out
    if [[ $code != 200 ]] || ! grep -q '修改成功' "$workdir/sanity.body"; then
        log "$name answered HTTP $code: $(head -c 300 "$workdir/sanity.body")"
        [[ -f $workdir/$name/stderr ]] && tail -n 20 "$workdir/$name/stderr" >&2
        die "$name: sanity PUT did not get the vendor's success answer"
    fi
}

# ---------------------------------------------------------------------------
# Measuring.

CLK_TCK=$(getconf CLK_TCK)

# machine_ticks: "TOTAL IDLE" jiffies of all CPUs (/proc/stat; iowait counts
# as idle). A closed-loop run that leaves the machine idle is held by waits
# (windows, hand-offs, the disk), not by CPU.
machine_ticks() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system + idle + iowait + irq + softirq + steal)) $((idle + iowait))"
}

# cpu_ticks PID...: utime+stime summed (the process's threads included).
cpu_ticks() {
    local pid stat rest total=0 f
    for pid in "$@"; do
        stat=$(<"/proc/$pid/stat") || return 1
        rest=${stat##*) }          # fields from 3 on; comm may hold spaces
        read -ra f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# rss_sampler OUT PID...: every 0.1 s, the summed VmRSS in kB, one per line.
rss_sampler() {
    local out=$1 pid kb sum line
    shift
    while :; do
        sum=0
        for pid in "$@"; do
            kb=0
            while read -r line; do
                [[ $line == VmRSS:* ]] && { read -r _ kb _ <<<"$line"; break; }
            done 2>/dev/null <"/proc/$pid/status" || true
            sum=$((sum + kb))
        done
        echo "$sum" >>"$out"
        sleep 0.1
    done
}

dir_bytes() { du -sb "$1" 2>/dev/null | cut -f1; }

# Status (and taskgate's reason) counts from an access log, then empties it
# so a long run does not fill the disk. OUT defaults to statuses.tsv.
log_statuses() {
    local name=$1 conns=$2 round=$3 file=$4 out=${5:-$workdir/statuses.tsv}
    [[ -f $file ]] || return 0
    { grep -oE '"status":[0-9]+(,"reason":"[a-z_]+")?' "$file" || true; } |
        sed -E 's/"status":([0-9]+)(,"reason":"([a-z_]+)")?/\1 \3/; s/ $//' |
        sort | uniq -c |
        while read -r count status; do
            printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$conns" "$round" "$status" "$count"
        done >>"$out"
    : >"$file"
}

# run_wrk NAME CONNS ROUND DURATION: one load run; appends a results row
# unless ROUND is "warmup".
run_wrk() {
    local name=$1 conns=$2 round=$3 duration=$4
    local port=${PORT[$name]} threads=$WRK_THREADS
    ((threads > conns)) && threads=$conns
    local mpids
    read -ra mpids <<<"${MEASURE_PIDS[$name]}"
    local auth=()
    [[ $name == direct ]] && auth=(-H "Authorization: Bearer $TOKEN")
    local rssfile=$workdir/rss.samples audit_before=- audit_after=-
    : >"$rssfile"
    [[ -d $workdir/$name/audit ]] && audit_before=$(dir_bytes "$workdir/$name/audit")

    rss_sampler "$rssfile" "${mpids[@]}" &
    sampler_pid=$!
    # PERF=1: the first round at the highest connection count is profiled
    # (software clock, dwarf stacks); its figures carry perf's overhead.
    local perf_pid=""
    if [[ $PERF == 1 && $round == 1 && $conns == "${PERF_CONNS:-${CONNS%% *}}" ]]; then
        mkdir -p "$PERF_DIR"
        local what
        if [[ -n ${PERF_ARGS:-} ]]; then
            read -ra what <<<"$PERF_ARGS"
        else
            what=(-e cpu-clock -F "$PERF_FREQ" --call-graph dwarf,16384
                -p "$(tr ' ' ',' <<<"${MEASURE_PIDS[$name]}" | sed 's/,$//')")
        fi
        perf record -q -o "$PERF_DIR/$name.data" "${what[@]}" >"$PERF_DIR/$name.log" 2>&1 &
        perf_pid=$!
        pids+=("$perf_pid")
    fi
    local t0 t1 m0 m1 out
    m0=$(machine_ticks)
    t0=$(cpu_ticks "${mpids[@]}")
    out=$(wrk -t"$threads" -c"$conns" -d"$duration" --latency -s "$here/put.lua" "${auth[@]}" \
        "http://127.0.0.1:$port$TASK_PATH" 2>&1) || { echo "$out" >&2; die "wrk failed against $name"; }
    t1=$(cpu_ticks "${mpids[@]}" 2>/dev/null || echo "")
    m1=$(machine_ticks)
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        log "profile of $name @$conns: $PERF_DIR/$name.data"
    fi
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""

    local alive=yes
    kill -0 "${PID_OF[$name]}" 2>/dev/null || alive=no
    [[ $alive == no ]] && log "!! $name is no longer running"
    [[ $round == warmup ]] && {
        [[ -f $workdir/$name/access.log ]] && : >"$workdir/$name/access.log"
        return 0
    }

    local bench
    bench=$(grep '^BENCH ' <<<"$out") || { echo "$out" >&2; die "no BENCH line from wrk ($name)"; }
    declare -A r
    local kv
    for kv in ${bench#BENCH }; do r[${kv%%=*}]=${kv#*=}; done
    local cpu_us=- rss_kb
    [[ -n $t1 ]] && cpu_us=$(((t1 - t0) * 1000000 / CLK_TCK))
    rss_kb=$(sort -n "$rssfile" | tail -n 1)
    [[ -d $workdir/$name/audit ]] && audit_after=$(dir_bytes "$workdir/$name/audit")
    local audit_bytes=-
    [[ $audit_before != - ]] && audit_bytes=$((audit_after - audit_before))
    local sockerr=$((r[connect] + r[read] + r[write] + r[timeout]))
    local idle_pct=- mt0 mi0 mt1 mi1
    read -r mt0 mi0 <<<"$m0"
    read -r mt1 mi1 <<<"$m1"
    ((mt1 > mt0)) && idle_pct=$(((mi1 - mi0) * 100 / (mt1 - mt0)))

    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$name" "$conns" "$round" "${r[requests]}" "${r[duration_us]}" "${r[p50_us]}" "${r[p99_us]}" \
        "${rss_kb:--}" "$cpu_us" "${r[non2xx]}" "$sockerr" "$audit_bytes" "$alive" "$idle_pct" \
        >>"$workdir/results.tsv"
    log_statuses "$name" "$conns" "$round" "$workdir/$name/access.log"
    printf '  %-15s c=%-3s %9.0f req/s  p50 %7.0f µs  p99 %7.0f µs  non-2xx %s  errors %s\n' \
        "$name" "$conns" "$(echo "${r[requests]} ${r[duration_us]}" | awk '{print $1 / ($2 / 1e6)}')" \
        "${r[p50_us]}" "${r[p99_us]}" "${r[non2xx]}" "$sockerr" >&2
}

# run_slow NAME: SLOW_CLIENTS connections sending the PUT body one byte per
# SLOW_INTERVAL (slowclients.py, one request each, no reconnecting) and wrk
# at SLOW_WRK_CONNS connections, side by side for SLOW_SECONDS, while the
# measured PIDs' RSS is sampled; appends a row to slow.tsv.
run_slow() {
    local name=$1 port=${PORT[$1]} mpids
    read -ra mpids <<<"${MEASURE_PIDS[$name]}"
    local rssfile=$workdir/rss.samples slowout=$workdir/$name/slow.out wrkout=$workdir/$name/slow.wrk
    local threads=$WRK_THREADS
    ((threads > SLOW_WRK_CONNS)) && threads=$SLOW_WRK_CONNS
    : >"$rssfile"
    : >"$wrkout"

    rss_sampler "$rssfile" "${mpids[@]}" &
    sampler_pid=$!
    local slow_pid wrk_pid="" slow_rc=0 wrk_rc=0
    # slowclients.py stops by itself after SLOW_SECONDS; timeout is the backstop.
    timeout -k 2 $((SLOW_SECONDS + 20)) python3 "$here/slowclients.py" --port "$port" \
        --conns "$SLOW_CLIENTS" --seconds "$SLOW_SECONDS" --interval "$SLOW_INTERVAL" \
        >"$slowout" 2>"$slowout.err" &
    slow_pid=$!
    load_pids+=("$slow_pid")
    if ((SLOW_WRK_CONNS > 0)); then
        timeout -k 2 $((SLOW_SECONDS + 20)) wrk -t"$threads" -c"$SLOW_WRK_CONNS" -d"${SLOW_SECONDS}s" \
            --latency -s "$here/put.lua" "http://127.0.0.1:$port$TASK_PATH" >"$wrkout" 2>&1 &
        wrk_pid=$!
        load_pids+=("$wrk_pid")
    fi
    wait "$slow_pid" || slow_rc=$?
    [[ -n $wrk_pid ]] && { wait "$wrk_pid" || wrk_rc=$?; }
    load_pids=()
    sleep 0.5   # the proxy logs the connections the clients just closed
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""

    local alive=yes
    kill -0 "${PID_OF[$name]}" 2>/dev/null || alive=no
    [[ $alive == no ]] && log "!! $name is no longer running"

    declare -A s=() r=()
    local line kv
    line=$(grep '^SLOW ' "$slowout" || true)
    if [[ -z $line ]]; then
        log "!! $name: no SLOW line from slowclients.py (exit $slow_rc): $(head -c 300 "$slowout.err")"
    fi
    for kv in ${line#SLOW }; do s[${kv%%=*}]=${kv#*=}; done
    if [[ -n $wrk_pid ]]; then
        line=$(grep '^BENCH ' "$wrkout" || true)
        [[ -z $line ]] && log "!! $name: no BENCH line from wrk (exit $wrk_rc): $(tail -n 3 "$wrkout" | tr '\n' ' ')"
        for kv in ${line#BENCH }; do r[${kv%%=*}]=${kv#*=}; done
    fi
    local rss_kb sockerr=-
    rss_kb=$(sort -n "$rssfile" | tail -n 1)
    [[ -n ${r[requests]:-} ]] && sockerr=$((r[connect] + r[read] + r[write] + r[timeout]))

    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$name" "$SLOW_CLIENTS" "${s[conns]:-0}" "${s[answered]:-0}" "${s[statuses]:--}" \
        "${s[closed_unanswered]:--}" "${s[open_at_end]:--}" "${s[first_answer_s]:--}" "${s[last_answer_s]:--}" \
        "${rss_kb:--}" "$SLOW_WRK_CONNS" "${r[requests]:--}" "${r[duration_us]:--}" "${r[p99_us]:--}" \
        "${r[non2xx]:--}" "$sockerr" "$alive" >>"$workdir/slow.tsv"
    log_statuses "$name" slow slow "$workdir/$name/access.log" "$workdir/slow-statuses.tsv"
    printf '  %-15s %s/%s slow conns held, answered %s (%s), RSS %s MiB; wrk c=%s %s req/s, non-2xx %s\n' \
        "$name" "${s[conns]:-0}" "$SLOW_CLIENTS" "${s[answered]:-0}" "${s[statuses]:--}" \
        "$(awk -v k="${rss_kb:-0}" 'BEGIN { printf "%.1f", k / 1024 }')" "$SLOW_WRK_CONNS" \
        "$(awk -v n="${r[requests]:-0}" -v d="${r[duration_us]:-0}" 'BEGIN { printf "%.0f", (d > 0 ? n / (d / 1e6) : 0) }')" \
        "${r[non2xx]:--}" >&2
}

# raise_nofile: 500 slow clients + wrk, through nginx, need two descriptors
# each (client and upstream side) in the proxy, and one each in the client.
raise_nofile() {
    local want=4096 need soft hard
    need=$((2 * (SLOW_CLIENTS + SLOW_WRK_CONNS) + 256))
    ((need > want)) && want=$need
    soft=$(ulimit -Sn)
    [[ $soft == unlimited ]] && return 0
    ((soft >= want)) && return 0
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < want)); then want=$hard; fi
    ulimit -Sn "$want" 2>/dev/null || true
    soft=$(ulimit -Sn)
    log "open-file limit (ulimit -n) now $soft"
    if ((SLOW_CLIENTS > 0 && soft < need)); then
        die "ulimit -n is $soft (hard $hard), too low for SLOW_CLIENTS=$SLOW_CLIENTS; raise it or lower SLOW_CLIENTS"
    fi
}

# ---------------------------------------------------------------------------

main() {
    install_tools
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    build
    raise_nofile   # before any process starts, so that they inherit it

    check_port_free "$UPSTREAM_PORT"
    check_port_free "$NGINX_PORT"
    local nproc
    nproc=$(nproc)
    mkdir -p "$BENCH_TMPDIR"
    workdir=$(mktemp -d "$BENCH_TMPDIR/taskgate-bench.XXXXXX")
    local fs
    fs=$(stat -f -c %T "$workdir")
    log "work dir $workdir ($fs)"
    case $fs in
        tmpfs | ramfs) echo "the work dir is on $fs, where fsync costs nothing; set BENCH_TMPDIR to a directory on disk" >>"$workdir/notes" ;;
    esac
    printf 'config\tconns\tround\trequests\tduration_us\tp50_us\tp99_us\trss_kb\tcpu_us\tnon2xx\tsockerr\taudit_bytes\talive\tidle_pct\n' >"$workdir/results.tsv"
    printf 'config\tconns\tround\tstatus\tcount\n' >"$workdir/statuses.tsv"
    printf 'config\tslow_wanted\tslow_conns\tanswered\tstatuses\tclosed_unanswered\topen_at_end\tfirst_answer_s\tlast_answer_s\trss_kb\twrk_conns\trequests\tduration_us\tp99_us\tnon2xx\tsockerr\talive\n' >"$workdir/slow.tsv"
    printf 'config\tconns\tround\tstatus\tcount\n' >"$workdir/slow-statuses.tsv"

    # Which targets, in the order they take turns.
    local targets=() t
    for t in $TARGETS; do
        case $t in
            direct | floor | nginx | taskgate | taskgate-never) targets+=("$t") ;;
            base | base-never)
                [[ -x ${BASE_BIN:-} ]] || die "target '$t' needs BASE_BIN, an executable taskgate"
                targets+=("$t")
                ;;
            taskgate-shared) targets+=("$t") ;;
            taskgate-w[0-9]*)
                if [[ ${t#taskgate-w} == "$DEFAULT_WORKERS" ]]; then
                    echo "$t not run: it is the same as 'taskgate' ($DEFAULT_WORKERS worker, the default)" >>"$workdir/notes"
                else
                    targets+=("$t")
                fi
                ;;
            *) die "unknown target '$t' in TARGETS" ;;
        esac
    done

    log "starting the fast upstream on 127.0.0.1:$UPSTREAM_PORT"
    start_nginx upstream upstream.nginx.conf "$UPSTREAM_PORT"
    PORT[direct]=$UPSTREAM_PORT
    PID_OF[direct]=${PID_OF[upstream]}
    MEASURE_PIDS[direct]=${MEASURE_PIDS[upstream]}

    local i=0
    for t in "${targets[@]}"; do
        case $t in
            direct) ;;
            floor) start_floor "$i" ;;
            nginx)
                log "starting nginx on 127.0.0.1:$NGINX_PORT"
                start_nginx nginx anchor.nginx.conf "$NGINX_PORT"
                ;;
            taskgate) start_taskgate "$t" always "$DEFAULT_WORKERS" "$i" ;;
            taskgate-never) start_taskgate "$t" never "$DEFAULT_WORKERS" "$i" ;;
            taskgate-w*) start_taskgate "$t" always "${t#taskgate-w}" "$i" ;;
            base) start_taskgate "$t" always "$DEFAULT_WORKERS" "$i" "$BASE_BIN" ;;
            base-never) start_taskgate "$t" never "$DEFAULT_WORKERS" "$i" "$BASE_BIN" ;;
            taskgate-shared)
                [[ -n ${REDIS_PORT:-} ]] || start_redis
                start_taskgate "$t" always "$DEFAULT_WORKERS" "$i" "$TASKGATE_BIN" \
                    "$(printf '[shared]\nredis_url = "redis://127.0.0.1:%s/0"' "$REDIS_PORT")"
                ;;
        esac
        [[ $t == taskgate* || $t == base* ]] && log "started $t on 127.0.0.1:${PORT[$t]}"
        i=$((i + 1))
        sanity_put "$t" "${PORT[$t]}"
    done

    log "one fsync on this disk (200 x 200-byte append + fsync)"
    local fsync_p50 fsync_p99
    read -r fsync_p50 fsync_p99 < <(python3 "$here/report.py" fsync "$workdir/fsync-probe" 200)
    {
        echo "nproc=$nproc"
        echo "rounds=$ROUNDS"
        echo "duration=$DURATION"
        echo "wrk_threads=$WRK_THREADS"
        echo "fs=$fs"
        echo "fsync_p50_us=$fsync_p50"
        echo "fsync_p99_us=$fsync_p99"
        echo "slow_clients=$SLOW_CLIENTS"
        echo "slow_seconds=$SLOW_SECONDS"
        echo "slow_interval=$SLOW_INTERVAL"
        echo "slow_wrk_conns=$SLOW_WRK_CONNS"
    } >"$workdir/meta"

    local max_conns=0 c
    for c in $CONNS; do ((c > max_conns)) && max_conns=$c; done
    log "warm-up: $WARMUP at $max_conns connections each"
    for t in "${targets[@]}"; do run_wrk "$t" "$max_conns" warmup "$WARMUP"; done

    local round
    for round in $(seq "$ROUNDS"); do
        for c in $CONNS; do
            log "round $round/$ROUNDS, $c connection(s), $DURATION each"
            for t in "${targets[@]}"; do run_wrk "$t" "$c" "$round" "$DURATION"; done
        done
    done

    # Slow clients under load: every proxy once more, `direct` excepted.
    # They must fit under the proxies' caps: taskgate's limits.max_connections
    # (4,096 by default) and max_inflight (1,024: a slow sender is in flight
    # from its head on), nginx's worker_connections (4,096, two per proxied
    # request); with the defaults, 500 + 32 fit in all three.
    if ((SLOW_CLIENTS > 0)); then
        ((SLOW_CLIENTS + SLOW_WRK_CONNS > 1000)) &&
            echo "slow phase: $SLOW_CLIENTS + $SLOW_WRK_CONNS connections is more than taskgate's default max_inflight (1024) leaves room for; the excess is refused with 503" >>"$workdir/notes"
        log "slow clients: $SLOW_CLIENTS sending 1 byte / ${SLOW_INTERVAL}s + wrk at $SLOW_WRK_CONNS connections, ${SLOW_SECONDS}s each"
        for t in "${targets[@]}"; do
            [[ $t == direct ]] && continue
            run_slow "$t"
        done
    fi

    echo "load: BENCH_USERS=${BENCH_USERS:-1024} user ids in turn (1 = one fixed path, where taskgate's per-line serialisation queues every update)" >>"$workdir/notes"
    for t in "${targets[@]}"; do
        [[ $t == taskgate* || $t == base* ]] || continue
        metrics_note "$t" >>"$workdir/notes"
        if grep -qiE '"level":"(ERROR|WARN)"|panick' "$workdir/$t/stderr"; then
            echo "$t stderr has errors/warnings, e.g.: $(grep -iE '"level":"(ERROR|WARN)"|panick' "$workdir/$t/stderr" | head -n 1 | cut -c1-200)" >>"$workdir/notes"
        fi
    done
    python3 "$here/report.py" table "$workdir"
}

main "$@"
