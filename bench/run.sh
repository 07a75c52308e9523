#!/usr/bin/env bash
# linkid benchmark harness (issue 4). One command from the repository root:
#
#   bench/run.sh
#
# Installs wrk when missing (Debian's package), builds the release binaries,
# then in one run on this machine, with the same wrk threads, connections and
# duration for every row, measures:
#   1. baseline   a bare warp server (examples/baseline.rs), fixed 205-byte JSON
#   2. list-small   linkid: authenticated GET of a random seeded user's linked
#                   identities, LINKS (10,000) links stored
#   3. providers    linkid: authenticated GET identity providers
#   3b. lookup-small linkid: the login-time reverse lookup (GET
#                   /linked-identities?provider_id=&linked_user_id=) of a
#                   random link, LINKS links stored (beside row 2)
#   4. list-big     as list-small with BIG_LINKS (1,000,000) links stored
#   5. write-group  linkid write mix (POST a new link, then DELETE it; a new
#                   user and remote id for every link) with group commit
#                   (database.max_batch as configured, 256 by default)
#   6. write-single the same with LINKID_DATABASE__MAX_BATCH=1 (one commit
#                   per request), same build
#   6b. write-hooked the write-group mix with a webhook attached: every
#                   change is delivered to a local receiver that answers 204
#                   at once (examples/webhook_sink.rs); target: throughput
#                   within 10 % of write-group
#   7. lookup-big   as lookup-small with BIG_LINKS links stored
#   7b. lookup-big-cached  the same with database.row_cache_bytes =
#                   BIG_CACHE_BYTES, sized to hold every one of those
#                   answers, filled by a pass over every link first
#                   (CACHE_FILL seconds of lookups in seed order)
#   8. feed         linkid: GET /linked-identities/events, a random `after`,
#                   pages of 100, from BIG_LINKS events (made by an import)
#   and, on a throwaway PostgreSQL (scripts/pg-cluster.sh; PG=0 skips them):
#   9. pg-list, pg-list-x2   the list row with one instance, and with two
#                   instances on the same database (two wrk, half the
#                   connections each, at once; figures summed)
#  10. pg-write, pg-write-x2 the write mix, likewise (group commit,
#                   database.max_batch as configured); pg-write-single the
#                   same instance with LINKID_DATABASE__MAX_BATCH=1 (one
#                   transaction per write). After the write rows, the feed
#                   is checked against the stored links (every user's last
#                   event says what is stored).
#  11. pg-lookup-big, pg-feed as 7 and 8 on PostgreSQL
# Besides: `linkid import` of BIG_LINKS lines (an export of the big
# database) into an empty database on each backend: seconds and peak RSS.
# and prints throughput, p50/p99 latency, the server's peak RSS (VmHWM) and
# CPU, each linkid figure's ratio to the baseline, and the targets of issue 4.
# The same report is written to bench/RESULTS.md.
#
# Settings (environment):
#   DURATION=10s     measured time per scenario (wrk -d; "10" means 10s)
#   WARMUP=2s        unmeasured load before each measurement (0 to skip)
#   CONNECTIONS=64   wrk connections, every scenario (the write target needs 64)
#   THREADS=1        wrk threads, every scenario
#   LINKS=10000      links seeded for list-small, providers and the write DBs
#   BIG_LINKS=1000000  links seeded for list-big
#   BIG_CACHE_BYTES=402653184  database.row_cache_bytes of lookup-big-cached
#                    (384 MiB: about 265 bytes an answer, 1,000,000 answers)
#   CACHE_FILL=60s   the pass that fills that cache before its warm-up (the
#                    report says when it asked for fewer than BIG_LINKS)
#   PORT=18700       first loopback port; scenarios use PORT .. PORT+18
#   OUT=bench/out    scratch directory (databases, key, logs, raw wrk output);
#                    emptied at the start, so it must be one this script made
#   RESULTS=bench/RESULTS.md   where the report goes
#   WAIT_IDLE=300    before each scenario, wait up to this many seconds for
#                    the machine to be idle (other load skews the figures; the
#                    report says when it was not idle)
#   ROUNDS=1         measured runs per scenario (same server); the run with
#                    the median throughput is reported, with the spread
#   STRICT=1         exit 3 when a target is missed (default: report only)
#   PG=0             skip the PostgreSQL rows (default 1: installs PostgreSQL
#                    through scripts/pg-cluster.sh when it is missing)
#   LOG_LEVEL=info   linkid's log.level (default info, the shipped default:
#                    one line per request, into OUT/NAME.server.log)
#   SCENARIOS=a,b    run only these rows (names as in the report's first
#                    column ids: baseline, list-small, providers,
#                    lookup-small, list-big,
#                    write-group, write-single, write-hooked, lookup-big,
#                    lookup-big-cached, feed, pg-list,
#                    pg-list-x2, pg-write, pg-write-single, pg-write-x2,
#                    pg-lookup-big, pg-feed; default: all). The baseline
#                    always runs.
#
# Exit status: 0 when every scenario ran clean; 1 when a scenario saw a
# non-2xx answer or a socket error, or a server failed (the report is still
# written, marked INVALID); 3 with STRICT=1 and a missed target.
# Only loopback addresses are used.

set -euo pipefail
case ${1:-} in
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds_of() { # "10", "10s", "2m" -> seconds
    local v=$1
    case $v in
        *m) echo $(( ${v%m} * 60 )) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}

DURATION_S=$(seconds_of "${DURATION:-10s}")
WARMUP_S=$(seconds_of "${WARMUP:-2s}")
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
LINKS=${LINKS:-10000}
BIG_LINKS=${BIG_LINKS:-1000000}
BIG_CACHE_BYTES=${BIG_CACHE_BYTES:-402653184}
CACHE_FILL_S=$(seconds_of "${CACHE_FILL:-60s}")
PORT=${PORT:-18700}
OUT=${OUT:-bench/out}
RESULTS=${RESULTS:-bench/RESULTS.md}
STRICT=${STRICT:-0}
WAIT_IDLE=${WAIT_IDLE:-300}
ROUNDS=${ROUNDS:-1}
PG=${PG:-1}
SCENARIOS=${SCENARIOS:-all}
LOG_LEVEL=${LOG_LEVEL:-info}
WRK_TIMEOUT=10s
RSS_LIMIT_KIB=65536 # 64 MiB

for n in DURATION_S WARMUP_S CONNECTIONS THREADS LINKS BIG_LINKS PORT WAIT_IDLE ROUNDS PG; do
    [[ ${!n} =~ ^[0-9]+$ ]] || { echo "bench: $n must be a whole number (got '${!n}')" >&2; exit 2; }
done
(( DURATION_S > 0 )) || { echo "bench: DURATION must be at least 1s" >&2; exit 2; }
(( ROUNDS > 0 )) || { echo "bench: ROUNDS must be at least 1" >&2; exit 2; }

# want NAME...: whether any of these rows is to run (SCENARIOS).
want() {
    [[ $SCENARIOS == all ]] && return 0
    local n
    for n in "$@"; do [[ ",$SCENARIOS," == *",$n,"* ]] && return 0; done
    return 1
}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mbench: %s\033[0m\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
ensure_wrk() {
    command -v wrk >/dev/null 2>&1 && return
    command -v apt-get >/dev/null 2>&1 || die "wrk is missing and there is no apt-get: install wrk and run again"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    say "installing wrk (Debian package)"
    if ! apt-cache policy wrk 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        "${sudo[@]}" apt-get update -qq
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq wrk >/dev/null
    command -v wrk >/dev/null 2>&1 || die "could not install wrk"
}
ensure_wrk
command -v curl >/dev/null 2>&1 || die "curl is needed for the health checks"
[[ -x /usr/bin/time ]] || {
    say "installing GNU time (Debian package), to measure the imports' peak RSS"
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq time >/dev/null || die "could not install time"
}

say "building release binaries (linkid, examples/baseline, examples/webhook_sink)"
cargo build --release --quiet --bin linkid --example baseline --example webhook_sink
LINKID=target/release/linkid
BASELINE=target/release/examples/baseline
SINK=target/release/examples/webhook_sink

# $OUT is emptied: only when this script made it (or it is empty).
if [[ -d $OUT && ! -e $OUT/.linkid-bench ]] && [[ -n $(ls -A "$OUT" 2>/dev/null) ]]; then
    die "$OUT exists and was not made by bench/run.sh; remove it or set OUT to another directory"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.linkid-bench"
export BENCH_DIR=bench
KEY="$OUT/root.key"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- servers
declare -a STARTED=()
PG_DIR=
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n $PG_DIR ]]; then scripts/pg-cluster.sh stop "$PG_DIR" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# start_server NAME PORT COMMAND... ; sets SERVER_PID
start_server() {
    local name=$1 port=$2
    shift 2
    port_busy "$port" && die "port $port is in use; set PORT to a free range"
    "$@" >"$OUT/$name.server.log" 2>&1 &
    SERVER_PID=$!
    STARTED+=("$SERVER_PID")
    local i
    for ((i = 0; i < 300; i++)); do
        curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/healthz" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || die "$name server exited at start; see $OUT/$name.server.log"
        sleep 0.1
    done
    die "$name server did not answer /healthz on 127.0.0.1:$port within 30 s"
}

# stop_server PID EXPECTED_STATUS NAME: SIGTERM, wait, check the exit status
stop_server() {
    local pid=$1 expected=$2 name=$3 rc=0
    kill -TERM "$pid"
    wait "$pid" || rc=$?
    if [[ $rc -ne $expected ]]; then
        echo "bench: $name server exited with status $rc after SIGTERM (expected $expected); see $OUT/$name.server.log" >&2
        INVALID+=("$name: server exit status $rc after SIGTERM")
    fi
}

linkid_env() { # linkid_env PORT DBPATH -> env assignments
    echo "LINKID_SERVER__ADDR=127.0.0.1:$1" "LINKID_DATABASE__PATH=$2" \
        "LINKID_AUTH__PRIVATE_KEY_FILE=$KEY" "LINKID_LOG__LEVEL=$LOG_LEVEL" "LINKID_LOG__FORMAT=text"
}

pg_env() { # pg_env PORT DBNAME -> env assignments for a server on PostgreSQL
    echo "LINKID_SERVER__ADDR=127.0.0.1:$1" "LINKID_DATABASE__URL=$(pg_url "$2")" \
        "LINKID_AUTH__PRIVATE_KEY_FILE=$KEY" "LINKID_LOG__LEVEL=$LOG_LEVEL" "LINKID_LOG__FORMAT=text"
}

cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
vmhwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# CPU ticks the whole machine spent busy (user, nice, system, irq, softirq, steal)
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# CPU ticks of the benchmark's PostgreSQL: its postmaster (with its children
# that ended) and the children running now; 0 when there is none.
PG_POSTMASTER=
pg_ticks() {
    [[ -n $PG_POSTMASTER ]] || { echo 0; return; }
    {
        sed 's/^.*) //' "/proc/$PG_POSTMASTER/stat" | awk '{print $12 + $13 + $14 + $15}'
        awk -v pm="$PG_POSTMASTER" '$4 == pm {print $14 + $15}' /proc/[0-9]*/stat 2>/dev/null
    } | awk '{s += $1} END {print s + 0}'
}

# ---------------------------------------------------------------- measuring
declare -A RPS P50 P99 MEAN RSS CPU CPUREQ WRKCPU OTHER BYTES REQS ERRS NOTE SERVER SPREAD PGCPU PGCPUREQ
declare -a ORDER=() INVALID=() BUSY=()

field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }

# errors_in LINE: every non-2xx answer and socket error wrk reported
errors_in() {
    local line=$1 s k n
    s=$(field "$line" status_errors)
    k=$(field "$line" socket_errors)
    n=$(field "$line" non2xx)
    # write.lua counts every non-2xx exactly; elsewhere wrk's status > 399
    echo $(( ${n:-${s:-0}} + ${k:-0} ))
}

# run_wrk OUTFILE SECONDS SCRIPT URL [wrk args...] -> the BENCH line, plus
# wrk_cpu_s= (wrk's own user+system CPU seconds)
run_wrk() {
    local out=$1 secs=$2 script=$3 url=$4 line
    shift 4
    local TIMEFORMAT='%U %S'
    { time wrk -t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" --timeout "$WRK_TIMEOUT" --latency \
        -s "$script" "$@" "$url" >"$out" 2>&1; } 2>"$out.cpu" || die "wrk failed; see $out"
    line=$(grep '^BENCH ' "$out") || die "wrk printed no result line; see $out"
    echo "$line wrk_cpu_s=$(awk '{print $1 + $2}' "$out.cpu")"
}

# measure NAME SERVER_LABEL PID SCRIPT URL [wrk args...]
measure() {
    local name=$1 label=$2 pid=$3 script=$4 url=$5
    shift 5
    local line errs t0 t1 s0 s1
    if (( WARMUP_S > 0 )); then
        line=$(BENCH_RUN_ID="w$RUN_ID" run_wrk "$OUT/$name.warmup.txt" "$WARMUP_S" "$script" "$url" "$@")
        errs=$(errors_in "$line")
        (( errs == 0 )) || INVALID+=("$name (warm-up): $errs non-2xx answers or socket errors: $line")
    fi
    # ROUNDS measured runs against the same server; the one with the median
    # throughput is reported, errors are counted over all of them.
    local -a lines=() srv=() sys=() pgs=()
    local r all_rps="" pick p0 p1
    errs=0
    for ((r = 1; r <= ROUNDS; r++)); do
        s0=$(busy_ticks)
        t0=$(cpu_ticks "$pid")
        p0=$(pg_ticks)
        line=$(BENCH_RUN_ID="m$r-$RUN_ID" run_wrk "$OUT/$name.wrk$r.txt" "$DURATION_S" "$script" "$url" "$@")
        t1=$(cpu_ticks "$pid")
        p1=$(pg_ticks)
        s1=$(busy_ticks)
        lines+=("$line")
        srv+=($((t1 - t0)))
        sys+=($((s1 - s0)))
        pgs+=($((p1 - p0)))
        errs=$((errs + $(errors_in "$line")))
        all_rps+="$(field "$line" rps) "
    done
    pick=$(for ((r = 0; r < ROUNDS; r++)); do echo "$(field "${lines[$r]}" rps) $r"; done |
        sort -n | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2) {print $2}')
    line=${lines[$pick]}
    t0=0 t1=${srv[$pick]} s0=0 s1=${sys[$pick]}
    pg_cpu "$name" "${pgs[$pick]}" "$(field "$line" requests)" "$(field "$line" duration_us)"
    SPREAD[$name]=$(tr ' ' '\n' <<<"$all_rps" | awk 'NF {v = $1 + 0; if (min == "" || v < min) min = v; if (v > max) max = v}
        END {printf "%.0f–%.0f", min, max}')
    ORDER+=("$name")
    SERVER[$name]=$label
    RPS[$name]=$(field "$line" rps)
    P50[$name]=$(field "$line" p50_us)
    P99[$name]=$(field "$line" p99_us)
    MEAN[$name]=$(field "$line" mean_us)
    ERRS[$name]=$errs
    RSS[$name]=$(vmhwm_kib "$pid")
    local requests duration_us bytes wrk_cpu
    requests=$(field "$line" requests)
    duration_us=$(field "$line" duration_us)
    bytes=$(field "$line" bytes)
    wrk_cpu=$(field "$line" wrk_cpu_s)
    REQS[$name]=$requests
    CPU[$name]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v d="$duration_us" 'BEGIN {printf "%.2f", (t / hz) / (d / 1e6)}')
    CPUREQ[$name]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$requests" 'BEGIN {printf "%.1f", r ? (t / hz) * 1e6 / r : 0}')
    WRKCPU[$name]=$(awk -v w="$wrk_cpu" -v d="$duration_us" 'BEGIN {printf "%.2f", w / (d / 1e6)}')
    # Everything else the machine did meanwhile (should be about 0).
    OTHER[$name]=$(awk -v s=$((s1 - s0 - ${pgs[$pick]})) -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v w="$wrk_cpu" -v d="$duration_us" \
        'BEGIN {o = ((s - t) / hz - w) / (d / 1e6); if (o < 0) o = 0; printf "%.2f", o}')
    BYTES[$name]=$(awk -v b="$bytes" -v r="$requests" 'BEGIN {printf "%.0f", r ? b / r : 0}')
    NOTE[$name]=$(field "$line" statuses)
    if (( errs != 0 )); then
        INVALID+=("$name: $errs non-2xx answers or socket errors: $line")
        printf '\033[1;31m%s: %s NON-2XX ANSWERS OR SOCKET ERRORS\033[0m\n' "$name" "$errs" >&2
    fi
    if awk -v o="${OTHER[$name]}" 'BEGIN {exit !(o > 0.2)}'; then
        BUSY+=("$name: other processes used ${OTHER[$name]} cores")
    fi
    printf '    %-13s %10.0f req/s  p50 %7.2f ms  p99 %7.2f ms  peak RSS %6.1f MiB  CPU: server %s, wrk %s, other %s cores\n' \
        "$name" "${RPS[$name]}" "$(ms "${P50[$name]}")" "$(ms "${P99[$name]}")" \
        "$(mib "${RSS[$name]}")" "${CPU[$name]}" "${WRKCPU[$name]}" "${OTHER[$name]}" >&2
}

# pg_cpu NAME TICKS REQUESTS DURATION_US: PostgreSQL's CPU for a row.
pg_cpu() {
    [[ -n $PG_POSTMASTER ]] || return 0
    PGCPU[$1]=$(awk -v t="$2" -v hz="$CLK_TCK" -v d="$4" 'BEGIN {printf "%.2f", (t / hz) / (d / 1e6)}')
    PGCPUREQ[$1]=$(awk -v t="$2" -v hz="$CLK_TCK" -v r="$3" 'BEGIN {printf "%.1f", r ? (t / hz) * 1e6 / r : 0}')
}

# measure2 NAME LABEL PID1 PID2 SCRIPT URL1 URL2 [wrk args...]: two servers
# on one database, loaded at once by two wrk with half the connections each
# (one round). Requests, throughput and CPU are summed; latencies are the
# slower wrk's; peak RSS is the larger server's.
measure2() {
    local name=$1 label=$2 pid1=$3 pid2=$4 script=$5 url1=$6 url2=$7
    shift 7
    local half=$((CONNECTIONS / 2)) line1 line2 errs t0 t1 u0 u1 s0 s1
    if (( WARMUP_S > 0 )); then
        local w1 w2
        ( CONNECTIONS=$half BENCH_RUN_ID="w1$RUN_ID" run_wrk "$OUT/$name.warmup1.txt" "$WARMUP_S" "$script" "$url1" "$@" >/dev/null ) &
        w1=$!
        ( CONNECTIONS=$half BENCH_RUN_ID="w2$RUN_ID" run_wrk "$OUT/$name.warmup2.txt" "$WARMUP_S" "$script" "$url2" "$@" >/dev/null ) &
        w2=$!
        wait "$w1" "$w2" # (not a bare wait: the servers are children too)
    fi
    s0=$(busy_ticks) t0=$(cpu_ticks "$pid1") u0=$(cpu_ticks "$pid2")
    local p0 p1
    p0=$(pg_ticks)
    local m1 m2
    ( CONNECTIONS=$half BENCH_RUN_ID="m1$RUN_ID" run_wrk "$OUT/$name.wrk1.txt" "$DURATION_S" "$script" "$url1" "$@" >"$OUT/$name.line1" ) &
    m1=$!
    ( CONNECTIONS=$half BENCH_RUN_ID="m2$RUN_ID" run_wrk "$OUT/$name.wrk2.txt" "$DURATION_S" "$script" "$url2" "$@" >"$OUT/$name.line2" ) &
    m2=$!
    wait "$m1" "$m2"
    t1=$(cpu_ticks "$pid1") u1=$(cpu_ticks "$pid2") s1=$(busy_ticks)
    p1=$(pg_ticks)
    line1=$(cat "$OUT/$name.line1") line2=$(cat "$OUT/$name.line2")
    [[ -n $line1 && -n $line2 ]] || die "$name: wrk gave no result; see $OUT/$name.wrk1.txt and .wrk2.txt"
    errs=$(( $(errors_in "$line1") + $(errors_in "$line2") ))
    local sum max requests duration_us server_ticks wrk_cpu
    sum() { awk -v a="$(field "$line1" "$1")" -v b="$(field "$line2" "$1")" 'BEGIN {printf "%.1f", a + b}'; }
    max() { awk -v a="$(field "$line1" "$1")" -v b="$(field "$line2" "$1")" 'BEGIN {printf "%.0f", (a > b ? a : b)}'; }
    requests=$(sum requests)
    duration_us=$(max duration_us)
    server_ticks=$(( (t1 - t0) + (u1 - u0) ))
    wrk_cpu=$(sum wrk_cpu_s)
    ORDER+=("$name")
    SERVER[$name]=$label
    RPS[$name]=$(sum rps)
    SPREAD[$name]="$(printf %.0f "$(field "$line1" rps)") + $(printf %.0f "$(field "$line2" rps)")"
    P50[$name]=$(max p50_us)
    P99[$name]=$(max p99_us)
    MEAN[$name]=$(max mean_us)
    ERRS[$name]=$errs
    RSS[$name]=$(awk -v a="$(vmhwm_kib "$pid1")" -v b="$(vmhwm_kib "$pid2")" 'BEGIN {print (a > b ? a : b)}')
    REQS[$name]=$(printf %.0f "$requests")
    CPU[$name]=$(awk -v t=$server_ticks -v hz="$CLK_TCK" -v d="$duration_us" 'BEGIN {printf "%.2f", (t / hz) / (d / 1e6)}')
    CPUREQ[$name]=$(awk -v t=$server_ticks -v hz="$CLK_TCK" -v r="$requests" 'BEGIN {printf "%.1f", r ? (t / hz) * 1e6 / r : 0}')
    WRKCPU[$name]=$(awk -v w="$wrk_cpu" -v d="$duration_us" 'BEGIN {printf "%.2f", w / (d / 1e6)}')
    pg_cpu "$name" $((p1 - p0)) "$requests" "$duration_us"
    OTHER[$name]=$(awk -v s=$((s1 - s0 - (p1 - p0))) -v t=$server_ticks -v hz="$CLK_TCK" -v w="$wrk_cpu" -v d="$duration_us" \
        'BEGIN {o = ((s - t) / hz - w) / (d / 1e6); if (o < 0) o = 0; printf "%.2f", o}')
    BYTES[$name]=$(awk -v b="$(sum bytes)" -v r="$requests" 'BEGIN {printf "%.0f", r ? b / r : 0}')
    NOTE[$name]="$(field "$line1" statuses) / $(field "$line2" statuses)"
    if (( errs != 0 )); then
        INVALID+=("$name: $errs non-2xx answers or socket errors: $line1 / $line2")
        printf '\033[1;31m%s: %s NON-2XX ANSWERS OR SOCKET ERRORS\033[0m\n' "$name" "$errs" >&2
    fi
    printf '    %-13s %10.0f req/s  p50 %7.2f ms  p99 %7.2f ms  peak RSS %6.1f MiB  CPU: servers %s, wrk %s, other %s cores\n' \
        "$name" "${RPS[$name]}" "$(ms "${P50[$name]}")" "$(ms "${P99[$name]}")" \
        "$(mib "${RSS[$name]}")" "${CPU[$name]}" "${WRKCPU[$name]}" "${OTHER[$name]}" >&2
}

# timed_import NAME ENV... -- FILE: `linkid import FILE` into an empty
# database; records wall seconds and peak RSS.
declare -A IMPORT_SECS IMPORT_RSS IMPORT_LINES
declare -a IMPORTS=()
timed_import() {
    local name=$1 file
    shift
    local -a envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    file=$2
    /usr/bin/time -f '%e %M' -o "$OUT/$name.time" env "${envs[@]}" LINKID_AUTH__PRIVATE_KEY_FILE="$KEY" \
        LINKID_LOG__LEVEL=warn "$LINKID" import "$file" >"$OUT/$name.log" 2>&1 \
        || die "$name: the import failed; see $OUT/$name.log"
    IMPORTS+=("$name")
    IMPORT_SECS[$name]=$(awk '{print $1}' "$OUT/$name.time")
    IMPORT_RSS[$name]=$(awk '{print $2}' "$OUT/$name.time")
    IMPORT_LINES[$name]=$(wc -l <"$file")
    say "$name: $(cat "$OUT/$name.log") in ${IMPORT_SECS[$name]} s, peak RSS $(mib "${IMPORT_RSS[$name]}") MiB"
}

ms() { awk -v v="$1" 'BEGIN {printf "%.2f", v / 1000}'; }
mib() { awk -v v="$1" 'BEGIN {printf "%.1f", v / 1024}'; }
commas() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "n/a"; else printf "%.2f", a / b}'; }

RUN_ID=$(date +%s)-$$
FSYNC_GROUP_US=? FSYNC_SINGLE_US=? LIST_BODY_BYTES=?
# The first mint makes the root key, in $OUT.
TOKEN=$(env LINKID_AUTH__PRIVATE_KEY_FILE="$KEY" LINKID_LOG__LEVEL=warn "$LINKID" token mint --admin 2>"$OUT/mint.log") \
    || die "cannot mint a token; see $OUT/mint.log"
AUTH="Authorization: Bearer $TOKEN"
API=/api/admin/users/v4/users

# ---------------------------------------------------------------- data
seed() { # seed DBPATH N
    env LINKID_DATABASE__PATH="$1" LINKID_AUTH__PRIVATE_KEY_FILE="$KEY" LINKID_LOG__LEVEL=warn \
        "$LINKID" seed --links "$2" >"$1.seed.log" 2>&1 || die "seeding $1 failed; see $1.seed.log"
}
say "seeding $LINKS links (list, providers, writes) and $BIG_LINKS links (list-big, lookup-big, the imports)"
mkdir -p "$OUT/db-small" "$OUT/db-big" "$OUT/db-write-group" "$OUT/db-write-single" "$OUT/db-write-hooked"
seed "$OUT/db-small/linkid.db" "$LINKS"
SEED_SECS=? BIG_DB_MIB=?
if want list-big lookup-big lookup-big-cached feed pg-feed; then
    SEED_START=$(date +%s.%N)
    seed "$OUT/db-big/linkid.db" "$BIG_LINKS"
    SEED_SECS=$(awk -v a="$SEED_START" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    BIG_DB_MIB=$(du -m "$OUT/db-big/linkid.db" | cut -f1)
fi
want write-group && seed "$OUT/db-write-group/linkid.db" "$LINKS"
want write-single && seed "$OUT/db-write-single/linkid.db" "$LINKS"
want write-hooked && seed "$OUT/db-write-hooked/linkid.db" "$LINKS"

# What one durable write costs on this disk now: 4 KiB appends, each synced
# (run just before each write scenario; other disk traffic makes it vary).
fsync_us() {
    dd if=/dev/zero of="$OUT/fsync.probe" bs=4k count=500 oflag=dsync 2>&1 |
        awk -F', ' '/copied/ {split($3, t, " "); printf "%.0f", t[1] * 1e6 / 500}'
    rm -f "$OUT/fsync.probe"
}

# Is anything else busy? Other load skews every row: before each scenario,
# wait (up to WAIT_IDLE seconds) for a second in which the machine is idle,
# and say in the report when it never was.
wait_idle() { # wait_idle NAME
    local waited=0 s0 other
    while :; do
        s0=$(busy_ticks)
        sleep 1
        other=$(awk -v s=$(( $(busy_ticks) - s0 )) -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", s / hz}')
        awk -v o="$other" 'BEGIN {exit !(o > 0.15)}' || return 0
        if (( waited == 0 )); then
            echo "bench: the machine is busy ($other cores in use by other processes); waiting up to ${WAIT_IDLE}s for it to be idle" >&2
        fi
        waited=$((waited + 1))
        if (( waited >= WAIT_IDLE )); then
            echo "bench: warning: still busy ($other cores) before $1; measuring anyway, figures will be skewed" >&2
            BUSY+=("before $1: other processes used $other cores")
            return 0
        fi
    done
}

# ---------------------------------------------------------------- scenarios
say "scenarios: ${DURATION_S}s each after ${WARMUP_S}s warm-up, wrk -t$THREADS -c$CONNECTIONS"

# 1. baseline
port=$PORT
wait_idle baseline
start_server baseline "$port" "$BASELINE" "$port"
BASE_BODY=$(curl -fsS "http://127.0.0.1:$port/")
measure baseline "examples/baseline" "$SERVER_PID" bench/get.lua "http://127.0.0.1:$port/"
stop_server "$SERVER_PID" 143 baseline # no signal handler: killed by SIGTERM

# 2. list, LINKS links
if want list-small; then
    port=$((PORT + 1))
    wait_idle list-small
    start_server list-small "$port" env $(linkid_env "$port" "$OUT/db-small/linkid.db") "$LINKID" serve
    probe=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$port$API/seed-user-1233/linked-identities") \
        || die "the list request fails before the load starts; see $OUT/list-small.server.log"
    [[ $probe == *'"linked_user_id":"seed-remote-1233"'* ]] || die "unexpected list answer: $probe"
    LIST_BODY_BYTES=${#probe}
    export BENCH_USERS=$LINKS
    measure list-small "linkid" "$SERVER_PID" bench/list.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 list-small
fi

# 3. identity providers
if want providers; then
    port=$((PORT + 2))
    wait_idle providers
    start_server providers "$port" env $(linkid_env "$port" "$OUT/db-small/linkid.db") "$LINKID" serve
    probe=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$port$API/identity-providers") \
        || die "the identity providers request fails before the load starts"
    measure providers "linkid" "$SERVER_PID" bench/get.lua "http://127.0.0.1:$port$API/identity-providers" -H "$AUTH"
    stop_server "$SERVER_PID" 0 providers
fi

# lookup_row NAME PORT DATABASE LINKS: the login-time reverse lookup of a
# random seeded link, against a server on DATABASE (seeded with LINKS links).
# lookup_row NAME PORT DB LINKS [CACHE_BYTES]: with CACHE_BYTES, the server's
# row cache has that size and a pass over every link in seed order fills it
# before the warm-up.
lookup_row() {
    local name=$1 port=$2 db=$3 links=$4 cache=${5:-} probe line
    wait_idle "$name"
    start_server "$name" "$port" env $(linkid_env "$port" "$db") \
        ${cache:+LINKID_DATABASE__ROW_CACHE_BYTES=$cache} "$LINKID" serve
    probe=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$port/api/admin/users/v4/linked-identities?provider_id=okta&linked_user_id=seed-remote-1") \
        || die "the lookup fails before the load starts"
    [[ $probe == *'"user_id":"seed-user-1"'* ]] || die "unexpected lookup answer: $probe"
    export BENCH_USERS=$links BENCH_PROVIDERS=azure-ad,okta,corporate-saml
    if [[ -n $cache ]]; then
        say "$name: filling the row cache ($CACHE_FILL_S s of lookups in seed order)"
        line=$(BENCH_SEQUENTIAL=1 BENCH_RUN_ID="f$RUN_ID" run_wrk "$OUT/$name.fill.txt" "$CACHE_FILL_S" \
            bench/lookup.lua "http://127.0.0.1:$port/" -H "$AUTH")
        (( $(errors_in "$line") == 0 )) || INVALID+=("$name (cache fill): $line")
        say "$name: the fill made $(field "$line" requests) lookups"
        (( $(field "$line" requests) >= links )) ||
            BUSY+=("$name: the cache fill asked for $(field "$line" requests) of the $links links (raise CACHE_FILL)")
    fi
    measure "$name" "linkid" "$SERVER_PID" bench/lookup.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 "$name"
}

# 3b. reverse lookup, LINKS links (the lookup beside the list of row 2)
if want lookup-small; then
    lookup_row lookup-small $((PORT + 14)) "$OUT/db-small/linkid.db" "$LINKS"
fi

# 4. list, BIG_LINKS links
if want list-big; then
    port=$((PORT + 3))
    wait_idle list-big
    start_server list-big "$port" env $(linkid_env "$port" "$OUT/db-big/linkid.db") "$LINKID" serve
    probe=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$port$API/seed-user-$((BIG_LINKS - 1))/linked-identities") \
        || die "the list request (big database) fails before the load starts"
    [[ $probe == *"seed-remote-$((BIG_LINKS - 1))"* ]] || die "unexpected list answer: $probe"
    export BENCH_USERS=$BIG_LINKS
    measure list-big "linkid" "$SERVER_PID" bench/list.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 list-big
fi

# 5. write mix, group commit (the configured default)
if want write-group; then
    port=$((PORT + 4))
    wait_idle write-group
    FSYNC_GROUP_US=$(fsync_us)
    start_server write-group "$port" env $(linkid_env "$port" "$OUT/db-write-group/linkid.db") "$LINKID" serve
    measure write-group "linkid" "$SERVER_PID" bench/write.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 write-group
fi

# 6. write mix, one commit per request
if want write-single; then
    port=$((PORT + 5))
    wait_idle write-single
    FSYNC_SINGLE_US=$(fsync_us)
    start_server write-single "$port" env $(linkid_env "$port" "$OUT/db-write-single/linkid.db") \
        LINKID_DATABASE__MAX_BATCH=1 "$LINKID" serve
    measure write-single "linkid max_batch=1" "$SERVER_PID" bench/write.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 write-single
fi

# 6b. write mix, group commit, with a webhook delivering every change to a
# local receiver (examples/webhook_sink.rs) that answers 204 at once
HOOK_DELIVERED=?
if want write-hooked; then
    port=$((PORT + 15))
    sink_port=$((PORT + 16))
    wait_idle write-hooked
    port_busy "$sink_port" && die "port $sink_port is in use; set PORT to a free range"
    (umask 077 && echo "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD" >"$OUT/bench.whsec")
    printf '[[webhooks]]\nid = "bench"\nurl = "http://127.0.0.1:%s/hooks"\nsecret_file = "%s"\n' \
        "$sink_port" "$(realpath "$OUT/bench.whsec")" >"$OUT/hooked.toml"
    "$SINK" "$sink_port" >"$OUT/write-hooked.sink.log" 2>&1 &
    SINK_PID=$!
    STARTED+=("$SINK_PID")
    start_server write-hooked "$port" env $(linkid_env "$port" "$OUT/db-write-hooked/linkid.db") \
        "$LINKID" --config "$OUT/hooked.toml" serve
    measure write-hooked "linkid + webhook" "$SERVER_PID" bench/write.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 write-hooked
    kill -TERM "$SINK_PID" && wait "$SINK_PID" || true
    HOOK_DELIVERED=$(sed -n 's/.*answered \([0-9]*\) deliveries.*/\1/p' "$OUT/write-hooked.sink.log")
fi

# 7. reverse lookup, BIG_LINKS links
if want lookup-big; then
    lookup_row lookup-big $((PORT + 6)) "$OUT/db-big/linkid.db" "$BIG_LINKS"
fi

# 7b. the same with a row cache that holds every answer
if want lookup-big-cached; then
    lookup_row lookup-big-cached $((PORT + 17)) "$OUT/db-big/linkid.db" "$BIG_LINKS" "$BIG_CACHE_BYTES"
fi

# The import: an export of the big database into an empty one (its events
# feed the feed row).
if want feed pg-feed; then
    say "exporting $BIG_LINKS links, importing them into an empty database"
    env LINKID_DATABASE__PATH="$OUT/db-big/linkid.db" LINKID_AUTH__PRIVATE_KEY_FILE="$KEY" LINKID_LOG__LEVEL=warn \
        "$LINKID" export --out "$OUT/links.jsonl" 2>"$OUT/export.log" || die "the export failed; see $OUT/export.log"
    mkdir -p "$OUT/db-feed"
    timed_import import-sqlite LINKID_DATABASE__PATH="$OUT/db-feed/linkid.db" -- "$OUT/links.jsonl"
fi

# 8. the change feed
if want feed; then
    port=$((PORT + 7))
    wait_idle feed
    start_server feed "$port" env $(linkid_env "$port" "$OUT/db-feed/linkid.db") "$LINKID" serve
    export BENCH_EVENTS=$BIG_LINKS BENCH_LIMIT=100
    measure feed "linkid" "$SERVER_PID" bench/feed.lua "http://127.0.0.1:$port/" -H "$AUTH"
    stop_server "$SERVER_PID" 0 feed
fi

# 9.-11. PostgreSQL
if (( PG )) && want pg-list pg-list-x2 pg-write pg-write-single pg-write-x2 pg-lookup-big pg-feed; then
    say "starting a throwaway PostgreSQL (scripts/pg-cluster.sh)"
    PG_DIR=$(mktemp -d /tmp/linkid-bench-pg.XXXXXX)
    pg_exports=$(scripts/pg-cluster.sh start "$PG_DIR" 2>"$OUT/pg-cluster.log") || die "cannot start PostgreSQL; see $OUT/pg-cluster.log"
    eval "$pg_exports"
    PG_ADMIN_URL=$LINKID_TEST_PG_URL
    unset LINKID_TEST_PG_URL LINKID_TEST_PG_CA LINKID_TEST_PG_DIR
    pg_url() { sed "s#/postgres\$#/$1#" <<<"$PG_ADMIN_URL"; }
    PG_VERSION=$(psql "$PG_ADMIN_URL" -Atc "SHOW server_version")
    PG_POSTMASTER=$(head -1 "$PG_DIR/data/postmaster.pid")
    for db in bench_small bench_big bench_write bench_feed; do
        psql "$PG_ADMIN_URL" -qc "CREATE DATABASE $db" || die "cannot create database $db"
    done
    pg_seed() { # pg_seed DBNAME N
        env LINKID_DATABASE__URL="$(pg_url "$1")" LINKID_AUTH__PRIVATE_KEY_FILE="$KEY" LINKID_LOG__LEVEL=warn \
            "$LINKID" seed --links "$2" >"$OUT/$1.seed.log" 2>&1 || die "seeding $1 failed; see $OUT/$1.seed.log"
    }
    say "seeding PostgreSQL: $LINKS links (list, writes) and $BIG_LINKS links (lookup)"
    want pg-list pg-list-x2 && pg_seed bench_small "$LINKS"
    want pg-write pg-write-single pg-write-x2 && pg_seed bench_write "$LINKS"
    PG_SEED_SECS=?
    if want pg-lookup-big; then
        PG_SEED_START=$(date +%s.%N)
        pg_seed bench_big "$BIG_LINKS"
        PG_SEED_SECS=$(awk -v a="$PG_SEED_START" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    fi
    want pg-feed && timed_import import-postgres LINKID_DATABASE__URL="$(pg_url bench_feed)" -- "$OUT/links.jsonl"
    # The seeds and the import leave millions of fresh rows: vacuum them and
    # checkpoint now, so that autovacuum and a checkpoint do not run in the
    # middle of a measured row (with shared_buffers at 32 MB, a backend that
    # must evict a dirty page waits for the WAL to reach the disk, which the
    # checkpoint keeps busy: requests stalled for seconds).
    say "vacuuming and checkpointing PostgreSQL before the measured rows"
    for db in bench_small bench_big bench_write bench_feed; do
        psql "$(pg_url "$db")" -qc "VACUUM ANALYZE" || die "cannot vacuum database $db"
    done
    psql "$PG_ADMIN_URL" -qc "CHECKPOINT" || die "cannot checkpoint PostgreSQL"

    if want pg-list pg-list-x2; then
        export BENCH_USERS=$LINKS
        port=$((PORT + 8))
        wait_idle pg-list
        start_server pg-list "$port" env $(pg_env "$port" bench_small) "$LINKID" serve
        curl -fsS -H "$AUTH" "http://127.0.0.1:$port$API/seed-user-1233/linked-identities" | grep -q seed-remote-1233 \
            || die "the list request on PostgreSQL fails before the load starts"
        measure pg-list "linkid, PostgreSQL" "$SERVER_PID" bench/list.lua "http://127.0.0.1:$port/" -H "$AUTH"
        first=$SERVER_PID
        start_server pg-list-x2 "$((port + 1))" env $(pg_env "$((port + 1))" bench_small) "$LINKID" serve
        wait_idle pg-list-x2
        measure2 pg-list-x2 "2 × linkid, PostgreSQL" "$first" "$SERVER_PID" bench/list.lua \
            "http://127.0.0.1:$port/" "http://127.0.0.1:$((port + 1))/" -H "$AUTH"
        stop_server "$SERVER_PID" 0 pg-list-x2
        stop_server "$first" 0 pg-list
    fi

    if want pg-write pg-write-x2; then
        port=$((PORT + 10))
        wait_idle pg-write
        start_server pg-write "$port" env $(pg_env "$port" bench_write) "$LINKID" serve
        measure pg-write "linkid, PostgreSQL" "$SERVER_PID" bench/write.lua "http://127.0.0.1:$port/" -H "$AUTH"
        first=$SERVER_PID
        if want pg-write-x2; then
            start_server pg-write-x2 "$((port + 1))" env $(pg_env "$((port + 1))" bench_write) "$LINKID" serve
            wait_idle pg-write-x2
            measure2 pg-write-x2 "2 × linkid, PostgreSQL" "$first" "$SERVER_PID" bench/write.lua \
                "http://127.0.0.1:$port/" "http://127.0.0.1:$((port + 1))/" -H "$AUTH"
            stop_server "$SERVER_PID" 0 pg-write-x2
        fi
        stop_server "$first" 0 pg-write
    fi
    if want pg-write-single; then
        port=$((PORT + 18))
        wait_idle pg-write-single
        start_server pg-write-single "$port" env $(pg_env "$port" bench_write) LINKID_DATABASE__MAX_BATCH=1 "$LINKID" serve
        measure pg-write-single "linkid max_batch=1, PostgreSQL" "$SERVER_PID" bench/write.lua "http://127.0.0.1:$port/" -H "$AUTH"
        stop_server "$SERVER_PID" 0 pg-write-single
    fi
    if want pg-write pg-write-single pg-write-x2; then
        # Replaying the feed gives the stored links: for each user with
        # events, the last one says whether a link is stored and which;
        # the seeded links have none.
        PG_FEED_EVENTS=$(psql "$(pg_url bench_write)" -Atc "SELECT count(*) FROM events")
        PG_FEED_MISMATCHES=$(psql "$(pg_url bench_write)" -Atc "
            WITH last AS (SELECT DISTINCT ON (user_id) user_id, type, linked_user_id, linked_username
                          FROM events ORDER BY user_id, seq DESC)
            SELECT (SELECT count(*) FROM last FULL JOIN linked_identities AS s USING (user_id)
                    WHERE (s.user_id IS NULL) <> (last.type IS NOT DISTINCT FROM 'UNLINKED')
                       OR s.user_id IS NOT NULL AND last.type IS NULL AND s.user_id NOT LIKE 'seed-user-%'
                       OR last.type IN ('LINKED', 'UPDATED') AND
                          (s.linked_user_id, s.linked_username) IS DISTINCT FROM (last.linked_user_id, last.linked_username))")
        (( PG_FEED_MISMATCHES == 0 )) ||
            INVALID+=("pg-write: the feed and the stored links disagree for $PG_FEED_MISMATCHES user(s)")
    fi

    if want pg-lookup-big; then
        port=$((PORT + 12))
        wait_idle pg-lookup-big
        start_server pg-lookup-big "$port" env $(pg_env "$port" bench_big) "$LINKID" serve
        export BENCH_USERS=$BIG_LINKS
        measure pg-lookup-big "linkid, PostgreSQL" "$SERVER_PID" bench/lookup.lua "http://127.0.0.1:$port/" -H "$AUTH"
        stop_server "$SERVER_PID" 0 pg-lookup-big
    fi

    if want pg-feed; then
        port=$((PORT + 13))
        wait_idle pg-feed
        start_server pg-feed "$port" env $(pg_env "$port" bench_feed) "$LINKID" serve
        measure pg-feed "linkid, PostgreSQL" "$SERVER_PID" bench/feed.lua "http://127.0.0.1:$port/" -H "$AUTH"
        stop_server "$SERVER_PID" 0 pg-feed
    fi
fi

# ---------------------------------------------------------------- report
declare -A LABEL=(
    [baseline]="baseline GET (bare warp, fixed JSON)"
    [list-small]="GET list, $(commas "$LINKS") links stored"
    [providers]="GET identity providers"
    [list-big]="GET list, $(commas "$BIG_LINKS") links stored"
    [write-group]="write mix POST+DELETE, group commit"
    [write-single]="write mix POST+DELETE, max_batch=1"
    [write-hooked]="write mix POST+DELETE, group commit, a webhook attached"
    [lookup-small]="GET reverse lookup, $(commas "$LINKS") links stored"
    [lookup-big]="GET reverse lookup, $(commas "$BIG_LINKS") links stored"
    [lookup-big-cached]="GET reverse lookup, $(commas "$BIG_LINKS") links, row cache $(( BIG_CACHE_BYTES / 1048576 )) MiB"
    [feed]="GET events (100 a page), $(commas "$BIG_LINKS") stored"
    [pg-list]="PostgreSQL: GET list, $(commas "$LINKS") links"
    [pg-list-x2]="PostgreSQL, 2 instances: GET list"
    [pg-write]="PostgreSQL: write mix POST+DELETE"
    [pg-write-x2]="PostgreSQL, 2 instances: write mix"
    [pg-write-single]="PostgreSQL: write mix, max_batch=1"
    [pg-lookup-big]="PostgreSQL: GET reverse lookup, $(commas "$BIG_LINKS") links"
    [pg-feed]="PostgreSQL: GET events (100 a page)"
)

table() {
    echo "| scenario | server | req/s | p50 ms | p99 ms | peak RSS MiB | req/s ÷ base | p50 ÷ base | p99 ÷ base | RSS ÷ base | non-2xx + socket errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local n b=baseline
    for n in "${ORDER[@]}"; do
        printf '| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
            "${LABEL[$n]}" "${SERVER[$n]}" "${RPS[$n]}" "$(ms "${P50[$n]}")" "$(ms "${P99[$n]}")" \
            "$(mib "${RSS[$n]}")" \
            "$(ratio "${RPS[$n]}" "${RPS[$b]}")" "$(ratio "${P50[$n]}" "${P50[$b]}")" \
            "$(ratio "${P99[$n]}" "${P99[$b]}")" "$(ratio "${RSS[$n]}" "${RSS[$b]}")" "${ERRS[$n]}"
    done
}

cpu_table() {
    echo "| scenario | requests | req/s over $ROUNDS round(s) | mean ms | server CPU (cores) | server CPU µs/request | PostgreSQL CPU (cores) | PostgreSQL CPU µs/request | wrk CPU (cores) | other CPU (cores) | bytes/response |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local n
    for n in "${ORDER[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$n]}" "${REQS[$n]}" "${SPREAD[$n]}" "$(ms "${MEAN[$n]}")" \
            "${CPU[$n]}" "${CPUREQ[$n]}" "${PGCPU[$n]:-—}" "${PGCPUREQ[$n]:-—}" "${WRKCPU[$n]}" "${OTHER[$n]}" "${BYTES[$n]}"
    done
}

MISSED=0
verdict() { # verdict AWK_CONDITION -> met / **MISSED**
    if awk "BEGIN {exit !($1)}"; then echo "met"; else echo "**MISSED**"; fi
}

# has NAME...: whether every one of these rows was measured.
has() {
    local n
    for n in "$@"; do [[ -n ${RPS[$n]:-} ]] || return 1; done
}

targets() {
    local b=baseline r v
    echo "| target | measured | verdict |"
    echo "|---|---|---|"
    # Issue 12: an authenticated read within 2.5 × bare warp's server CPU
    # per request, at least half its throughput, p99 within 2 ×.
    for n in list-small providers lookup-small lookup-big lookup-big-cached; do
        has "$n" || continue
        r=$(ratio "${CPUREQ[$n]}" "${CPUREQ[$b]}")
        v=$(verdict "$r <= 2.5")
        echo "| ${LABEL[$n]}: server CPU per request ≤ 2.5 × baseline | $r × (${CPUREQ[$n]} vs ${CPUREQ[$b]} µs) | $v |"
    done
    if has write-group; then
        v=$(verdict "${CPUREQ[write-group]} <= 25")
        echo "| ${LABEL[write-group]}: server CPU per request ≤ 25 µs | ${CPUREQ[write-group]} µs | $v |"
    fi
    if has write-group write-hooked; then
        r=$(ratio "${RPS[write-hooked]}" "${RPS[write-group]}")
        v=$(verdict "$r >= 0.9")
        echo "| writes with a webhook attached: throughput ≥ 0.90 × without (issue 22) | $r × ($(printf %.0f "${RPS[write-hooked]}") vs $(printf %.0f "${RPS[write-group]}") req/s; $HOOK_DELIVERED deliveries answered) | $v |"
    fi
    if has write-group write-single; then
        r=$(ratio "${RPS[write-group]}" "${RPS[write-single]}")
        v=$(verdict "$r >= 4")
        echo "| writes: group commit ≥ 4 × one commit per request (issue 12) | $r × | $v |"
    fi
    for n in list-small providers lookup-small lookup-big lookup-big-cached; do
        has "$n" || continue
        r=$(ratio "${RPS[$n]}" "${RPS[$b]}")
        v=$(verdict "$r >= 0.5")
        echo "| ${LABEL[$n]}: throughput ≥ 0.50 × baseline | $r × ($(printf %.0f "${RPS[$n]}") vs $(printf %.0f "${RPS[$b]}") req/s$(awk -v a="${RPS[$n]}" -v b="${RPS[$b]}" 'BEGIN {if (a < 0.5 * b) printf "; needs %.2f × more", 0.5 * b / a}')) | $v |"
        r=$(ratio "${P99[$n]}" "${P99[$b]}")
        v=$(verdict "$r <= 2.0")
        echo "| ${LABEL[$n]}: p99 ≤ 2 × baseline | $r × ($(ms "${P99[$n]}") vs $(ms "${P99[$b]}") ms) | $v |"
    done
    if has write-group write-single; then
        r=$(ratio "${RPS[write-group]}" "${RPS[write-single]}")
        v=$(verdict "$r >= 5")
        echo "| writes, $CONNECTIONS connections: group commit ≥ 5 × one commit per request | $r × ($(printf %.0f "${RPS[write-group]}") vs $(printf %.0f "${RPS[write-single]}") req/s) | $v |"
    fi
    # Issue 21: group commit on PostgreSQL.
    if has pg-write pg-write-single; then
        r=$(ratio "${RPS[pg-write]}" "${RPS[pg-write-single]}")
        v=$(verdict "$r >= 4")
        echo "| PostgreSQL writes: group commit ≥ 4 × max_batch=1 (issue 21) | $r × ($(printf %.0f "${RPS[pg-write]}") vs $(printf %.0f "${RPS[pg-write-single]}") req/s) | $v |"
    fi
    if has pg-write; then
        r=$(ratio "${RPS[pg-write]}" 3750)
        v=$(verdict "$r >= 4")
        echo "| PostgreSQL writes ≥ 4 × 3,750 req/s (main before issue 21, if the machine allows) | $r × ($(printf %.0f "${RPS[pg-write]}") req/s; PostgreSQL's own CPU ${PGCPU[pg-write]:-?} cores) | $v |"
    fi
    if has pg-write pg-write-x2; then
        r=$(ratio "${RPS[pg-write-x2]}" "${RPS[pg-write]}")
        v=$(verdict "$r >= 0.9")
        echo "| PostgreSQL writes: two instances ≥ 0.9 × one (issue 21) | $r × ($(printf %.0f "${RPS[pg-write-x2]}") vs $(printf %.0f "${RPS[pg-write]}") req/s) | $v |"
    fi
    if has pg-write write-group; then
        r=$(ratio "${CPUREQ[pg-write]}" "${CPUREQ[write-group]}")
        v=$(verdict "$r <= 1.5")
        echo "| linkid CPU per write on PostgreSQL ≤ 1.5 × on SQLite with group commit (issue 21) | $r × (${CPUREQ[pg-write]} vs ${CPUREQ[write-group]} µs) | $v |"
    fi
    if [[ -n ${PG_FEED_MISMATCHES:-} ]]; then
        v=$(verdict "$PG_FEED_MISMATCHES == 0")
        echo "| PostgreSQL writes: the feed and the stored links agree at the end (issue 21) | $PG_FEED_MISMATCHES user(s) disagree, over $PG_FEED_EVENTS events | $v |"
    fi
    if has list-big; then
        v=$(verdict "${RSS[list-big]} < $RSS_LIMIT_KIB")
        echo "| peak RSS < 64 MiB with $(commas "$BIG_LINKS") links stored | $(mib "${RSS[list-big]}") MiB (database file $BIG_DB_MIB MiB) | $v |"
    fi
    if has list-big list-small; then
        r=$(awk -v a="${P50[list-big]}" -v b="${P50[list-small]}" 'BEGIN {printf "%+.1f", (a / b - 1) * 100}')
        v=$(verdict "${P50[list-big]} <= 1.10 * ${P50[list-small]}")
        echo "| list p50 with $(commas "$BIG_LINKS") links within 10 % of $(commas "$LINKS") | $r % ($(ms "${P50[list-big]}") vs $(ms "${P50[list-small]}") ms) | $v |"
        r=$(awk -v a="${P99[list-big]}" -v b="${P99[list-small]}" 'BEGIN {printf "%+.1f", (a / b - 1) * 100}')
        local t
        t=$(awk -v a="${RPS[list-big]}" -v b="${RPS[list-small]}" 'BEGIN {printf "%+.1f", (a / b - 1) * 100}')
        echo "| (for reference) list p99 and throughput, $(commas "$BIG_LINKS") vs $(commas "$LINKS") links | p99 $r % ($(ms "${P99[list-big]}") vs $(ms "${P99[list-small]}") ms), throughput $t % | — |"
    fi
}

CPU_MODEL=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
FS=$(df -PT "$OUT" | awk 'NR == 2 {print $2 " on " $1}')
GIT=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
git diff --quiet HEAD -- . ":(exclude)bench/RESULTS.md" 2>/dev/null || GIT="$GIT + uncommitted changes"
EXTRA_ENV=$(env | grep '^LINKID_' | cut -d= -f1 | tr '\n' ' ' || true)
GROUP_BATCH=$(awk -F'= *' '/^max_batch/ {print $2; exit}' config.toml 2>/dev/null || echo "?")
POOL=$(awk -F'= *' '/^pool_size/ {print $2; exit}' config.toml 2>/dev/null || echo "?")

import_table() {
    echo "| import of an export into an empty database | lines | seconds | lines/s | peak RSS MiB |"
    echo "|---|---:|---:|---:|---:|"
    local n
    for n in "${IMPORTS[@]}"; do
        printf '| %s | %s | %s | %s | %s |\n' "$n" "$(commas "${IMPORT_LINES[$n]}")" "${IMPORT_SECS[$n]}" \
            "$(awk -v l="${IMPORT_LINES[$n]}" -v s="${IMPORT_SECS[$n]}" 'BEGIN {printf "%.0f", s ? l / s : 0}')" \
            "$(mib "${IMPORT_RSS[$n]}")"
    done
}

TABLE=$(table)
IMPORT_TABLE=$(import_table)
CPU_TABLE=$(cpu_table)
TARGETS=$(targets)
grep -q 'MISSED' <<<"$TARGETS" && MISSED=1

{
    echo "# linkid benchmark results"
    echo
    echo "Produced by \`bench/run.sh\` (issue 4). Every row comes from this one run on one machine;"
    echo "the load generator (wrk) shares the machine's cores with the server."
    echo
    if ((${#INVALID[@]})); then
        echo "> **INVALID RUN** — unexpected answers or failures:"
        printf '> - %s\n' "${INVALID[@]}"
        echo
    fi
    if [[ $SCENARIOS != all ]]; then
        echo "> Only some rows were run: \`SCENARIOS=$SCENARIOS\` (and the baseline, which always runs)."
        echo
    fi
    if ((${#BUSY[@]})); then
        echo "> **Warning: the machine was not idle** — the figures are skewed by other load:"
        printf '> - %s\n' "${BUSY[@]}"
        echo
    fi
    echo "## Machine and settings"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- cores (\`nproc\`): $(nproc); CPU: $CPU_MODEL; memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); kernel $(uname -r)"
    echo "- database directory: $OUT ($FS); one synced 4 KiB append (dd oflag=dsync, 500 in a row) took $FSYNC_GROUP_US µs just before the group-commit row and $FSYNC_SINGLE_US µs just before the one-commit-per-request row"
    echo "- build: \`cargo build --release\`, $(rustc --version 2>/dev/null), linkid at commit $GIT"
    echo "- load generator: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION_S}s --timeout $WRK_TIMEOUT --latency\`, after a ${WARMUP_S}s warm-up per scenario with the same settings; $ROUNDS measured run(s) per scenario, the median-throughput run reported"
    echo "- each scenario runs against a freshly started server; peak RSS is that process's VmHWM after warm-up and measurement; server CPU is its user+system time during the measured ${DURATION_S}s"
    echo "- linkid: log level $LOG_LEVEL (one line per request at info, written to the server's log file), database.pool_size $POOL (config.toml), WAL with synchronous = FULL; group commit = database.max_batch $GROUP_BATCH (config.toml), one commit per request = LINKID_DATABASE__MAX_BATCH=1"
    echo "- data: $(commas "$LINKS") seeded links (users seed-user-0 .. seed-user-$((LINKS - 1)), spread over the linkable providers) for the list, providers and write rows; $(commas "$BIG_LINKS") for the big list row ($BIG_DB_MIB MiB database, seeded in $SEED_SECS s by \`linkid seed\`)"
    echo "- list requests: a random seeded user per request (bench/list.lua); the baseline body is ${#BASE_BODY} bytes, linkid's list answer for seed-user-1233 is $LIST_BODY_BYTES bytes"
    echo "- write mix (bench/write.lua): POST a link to okta for a new user with a new remote id (JSON body, Content-Type: application/json), and once it is answered 201, DELETE it; every answer's status is counted (statuses seen: group ${NOTE[write-group]:-?}; single ${NOTE[write-single]:-?})"
    echo "- admin token minted by \`linkid token mint --admin\` for this run"
    echo "- reverse lookup (bench/lookup.lua): a random seeded link per request, by provider_id and linked_user_id; feed (bench/feed.lua): a random \`after\`, limit 100, from the events an import of $(commas "$BIG_LINKS") lines recorded"
    (( PG )) && echo "- PostgreSQL ${PG_VERSION:-?} on loopback, a throwaway cluster from scripts/pg-cluster.sh (fsync on, shared_buffers 32 MB); its server processes' CPU is not in the server columns (it has columns of its own; the postmaster, its children, and those that ended); $(commas "$BIG_LINKS") links seeded in ${PG_SEED_SECS:-?} s; \`-x2\` rows: two linkid processes on one database, each loaded by its own wrk with $((CONNECTIONS / 2)) connections at the same time (one round), throughput and server CPU summed, latency of the slower wrk, RSS of the larger process"
    [[ -n $EXTRA_ENV ]] && echo "- inherited environment also set: $EXTRA_ENV"
    echo
    echo "## Results"
    echo
    echo "Ratios are to the baseline row (÷ base). Latencies are wrk's, over every request of the measured run."
    echo
    echo "$TABLE"
    echo
    echo "Where the time goes: CPU of the server process (all threads), of wrk, and of anything else on the machine, over each measured run."
    echo
    echo "$CPU_TABLE"
    echo
    echo "Imports (\`linkid import\` of an export of the $(commas "$BIG_LINKS")-link database, one transaction, with an event per link):"
    echo
    echo "$IMPORT_TABLE"
    echo
    echo "## Targets (issues 4, 12 and 21)"
    echo
    echo "$TARGETS"
    echo
    echo "Raw wrk output and server logs: \`$OUT/\` (not committed)."
} >"$RESULTS"

echo
cat "$RESULTS"
echo
say "written to $RESULTS"

if ((${#INVALID[@]})); then
    printf '\033[1;31mbench: INVALID RUN: %d problem(s):\033[0m\n' "${#INVALID[@]}" >&2
    printf '  - %s\n' "${INVALID[@]}" >&2
    exit 1
fi
if [[ $STRICT == 1 && $MISSED == 1 ]]; then
    say "some targets were missed (STRICT=1)"
    exit 3
fi
exit 0
