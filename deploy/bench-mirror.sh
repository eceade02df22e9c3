#!/usr/bin/env bash
# deploy/bench-mirror.sh — the cross-region mirror benchmark: two regions (seoul, tokyo),
# each with its own Kafka, Redis and `dtfed run`, tokyo dialling seoul through the
# project's WAN relay (dtfed-wan-relay: this kernel has no netem).
#
#   deploy/bench-mirror.sh
#   BENCH_DURATION=5 BENCH_CUT_SECS=10 deploy/bench-mirror.sh     # a short run, minutes
#
# Builds --release, makes the federation CA and the two region certificates (dtfed certs),
# starts everything under .dtfed/bench-mirror/ (fresh each time), waits for the link, then
# for every one-way delay of BENCH_DELAYS (relay command `delay MS`):
#
#   paced    publishers on seoul at BENCH_RATE, subscribers on tokyo: achieved msg/s,
#            mirror records/s and MB/s (tokyo's /status offsets, tokyo Kafka's mirror
#            segments), remote delivery p50/p99/p99.9 (tokyo delivery − send, one clock),
#            delivered/expected, order violations, duplicates; goal p99 ≤ delay + 25 ms.
#   max      publishers flat out (BENCH_MAX_INFLIGHT unanswered publishes each; the
#            per-connection publish limit is BENCH_PUBLISH_LIMIT): origin ingest and
#            mirrored records/s; goal 270 ms ≥ 0.8 × 0 ms.
#   catchup  (delays in BENCH_CATCHUP_DELAYS) steady BENCH_CATCHUP_RATE, the bench writes
#            `cut` to the relay, BENCH_CUT_SECS later `heal`, and times until tokyo's
#            subscribers have everything and deliveries are live again: catch-up rate =
#            backlog / catch-up seconds, as a multiple of the ingest rate; goal ≥ 5×.
#
# Before each run it waits until tokyo has mirrored every record seoul holds, and after it
# logs the relay's packet counters (`stats`) and the cross-region hop alone (tokyo's
# /status append_age: mirror append acked − origin record timestamp, over the run). Prints markdown tables (also in
# target/bench/mirror-results.md; raw JSON lines in target/bench/mirror-results.jsonl; logs
# under .dtfed/bench-mirror/, every run's own summary in runs.log there). Everything it
# started is stopped on exit, by PID.
#
# Environment (defaults in brackets):
#   BENCH_CLIENTS [200] publishers   BENCH_ROOMS [50]   BENCH_RATE [2000 msg/s]
#   BENCH_SUBSCRIBERS [= clients] subscribers of the paced runs (on tokyo)
#   BENCH_DURATION [30 s] measured window   BENCH_WARMUP [5 s]   BENCH_BODY_BYTES [100]
#   BENCH_DELAYS ["0 35 270"] one-way ms    BENCH_RUNS ["paced max catchup"]
#   BENCH_MAX_DURATION [= duration]  BENCH_MAX_INFLIGHT [8]  BENCH_MAX_SUBSCRIBERS [= rooms]
#   BENCH_PUBLISH_LIMIT [100000] client.publish_rate_per_sec and _burst of both regions
#   BENCH_CATCHUP_DELAYS [= delays]   BENCH_CATCHUP_RATE [= rate]   BENCH_CUT_SECS [60]
#   BENCH_CATCHUP_PRECUT [10 s, at most the duration] steady window before the cut
#   BENCH_CATCHUP_SUBSCRIBERS [= rooms]
#   BENCH_CATCHUP_MAX [5 x cut + 30 s] give up this long after the heal if not live again
#   BENCH_NO_BUILD=1  use the binaries already in target/release
#   BENCH_BROKER_WARMUP [30 s] paced load seoul → tokyo this long, unrecorded, before the
#                     runs: brokers just started are still compiling their hot paths
#   DTFED_KAFKA_PROFILE [production] both brokers' JVM profile (deploy/kafka.sh), recorded
#
# Exit status: 0 when every run passed the bench's correctness checks (no order
# violations, no duplicates, >= 99.9 % delivered, catch-up finished); 1 otherwise; 2 when
# the setup failed (e.g. the link never came up). Missed performance goals are reported
# in the table, not in the exit status.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CLIENTS=${BENCH_CLIENTS:-200}
ROOMS=${BENCH_ROOMS:-50}
RATE=${BENCH_RATE:-2000}
SUBSCRIBERS=${BENCH_SUBSCRIBERS:-$CLIENTS}
DURATION=${BENCH_DURATION:-30}
WARMUP=${BENCH_WARMUP:-5}
BODY_BYTES=${BENCH_BODY_BYTES:-100}
DELAYS=${BENCH_DELAYS:-0 35 270}
RUNS=${BENCH_RUNS:-paced max catchup}
MAX_DURATION=${BENCH_MAX_DURATION:-$DURATION}
MAX_INFLIGHT=${BENCH_MAX_INFLIGHT:-8}
MAX_SUBSCRIBERS=${BENCH_MAX_SUBSCRIBERS:-$ROOMS}
PUBLISH_LIMIT=${BENCH_PUBLISH_LIMIT:-100000}
CATCHUP_DELAYS=${BENCH_CATCHUP_DELAYS:-$DELAYS}
CATCHUP_RATE=${BENCH_CATCHUP_RATE:-$RATE}
CUT_SECS=${BENCH_CUT_SECS:-60}
CATCHUP_SUBSCRIBERS=${BENCH_CATCHUP_SUBSCRIBERS:-$ROOMS}
# The goal (catch-up >= 5x ingest) means caught up within cut/5 s: 5 x cut + 30 s is ample.
CATCHUP_MAX=${BENCH_CATCHUP_MAX:-$(awk "BEGIN { print int(5 * $CUT_SECS + 30) }")}
if [[ -n ${BENCH_CATCHUP_PRECUT:-} ]]; then
    CATCHUP_PRECUT=$BENCH_CATCHUP_PRECUT
elif awk "BEGIN { exit !($DURATION < 10) }" 2>/dev/null; then
    CATCHUP_PRECUT=$DURATION
else
    CATCHUP_PRECUT=10
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release
WORK=$ROOT/.dtfed/bench-mirror
OUT=$TARGET/bench
RESULTS=$OUT/mirror-results.jsonl
REPORT=$OUT/mirror-results.md

log() { echo "bench-mirror.sh: $*" >&2; }
die() {
    echo "bench-mirror.sh: error: $*" >&2
    exit 2
}

for v in CLIENTS ROOMS RATE SUBSCRIBERS DURATION WARMUP BODY_BYTES MAX_DURATION MAX_INFLIGHT \
    MAX_SUBSCRIBERS PUBLISH_LIMIT CATCHUP_RATE CUT_SECS CATCHUP_SUBSCRIBERS CATCHUP_MAX \
    CATCHUP_PRECUT; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "BENCH_$v must be a number, got '${!v}'"
done
for d in $DELAYS $CATCHUP_DELAYS; do
    [[ $d =~ ^[0-9]+$ ]] || die "delays are whole milliseconds, got '$d'"
done
for r in $RUNS; do
    [[ $r =~ ^(paced|max|catchup)$ ]] || die "BENCH_RUNS takes paced, max, catchup; got '$r'"
done
want_run() { [[ " $RUNS " == *" $1 "* ]]; }
command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
command -v curl >/dev/null || die "curl is needed"

port_open() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A TCP port P with P+1 free too (Kafka's controller), starting at $1.
free_tcp_pair() {
    local p=$1
    while port_open "$p" || port_open "$((p + 1))"; do p=$((p + 2)); done
    echo "$p"
}
udp_used() { [[ -n $(ss -Hunl "sport = :$1" 2>/dev/null) ]]; }
# A free UDP port from $1 on, not in the ports given after it.
free_udp() {
    local p=$1 x taken
    shift
    while :; do
        taken=""
        for x in "$@"; do [[ $x == "$p" ]] && taken=1; done
        if [[ -z $taken ]] && ! udp_used "$p"; then break; fi
        p=$((p + 1))
    done
    echo "$p"
}

# ------------------------------------------------------------------ cleanup

SEOUL_PID=""
TOKYO_PID=""
RELAY_PID=""
RELAY_FD=""
STARTED_INFRA=()

# stop_pid and cleanup run from the EXIT trap.
# shellcheck disable=SC2317
stop_pid() { # name pid
    local name=$1 pid=$2 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) still alive 15 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317
cleanup() {
    local rc=$? d
    trap - EXIT INT TERM
    stop_pid "dtfed tokyo" "$TOKYO_PID"
    stop_pid "dtfed seoul" "$SEOUL_PID"
    if [[ -n $RELAY_FD ]]; then exec {RELAY_FD}>&- || true; fi
    stop_pid dtfed-wan-relay "$RELAY_PID"
    wait 2>/dev/null || true
    for d in "${STARTED_INFRA[@]}"; do
        case $d in
        */kafka) deploy/kafka.sh stop --dir "$d" || true ;;
        */redis) deploy/redis.sh stop --dir "$d" || true ;;
        esac
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ build

if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    log "building --release (dtfed, dtfed-bench, dtfed-wan-relay)"
    cargo build --release -p dtfed -p dtfed-tests -p dtfed-regions --bins >&2
fi
for b in dtfed dtfed-bench dtfed-wan-relay; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing (build with: cargo build --release -p dtfed -p dtfed-tests -p dtfed-regions --bins)"
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------------ fresh work dir, certs

mkdir -p "$WORK" "$OUT"
# Leftovers of an interrupted run in our own dirs: stop them (the scripts check the PIDs).
for r in seoul tokyo; do
    if [[ -f $WORK/$r/kafka/kafka.pid ]]; then deploy/kafka.sh stop --dir "$WORK/$r/kafka" || true; fi
    if [[ -f $WORK/$r/redis/redis.pid ]]; then deploy/redis.sh stop --dir "$WORK/$r/redis" || true; fi
done
rm -rf "$WORK/seoul" "$WORK/tokyo" "$WORK/certs" "$WORK/relay"
mkdir -p "$WORK/seoul" "$WORK/tokyo" "$WORK/relay"

CERTS=$WORK/certs
"$BIN/dtfed" certs init --dir "$CERTS" >&2
for r in seoul tokyo; do
    "$BIN/dtfed" certs issue --dir "$CERTS" --region "$r" >&2
done
for f in ca.crt seoul.crt seoul.key tokyo.crt tokyo.key; do
    [[ -s $CERTS/$f ]] || die "dtfed certs did not write $CERTS/$f"
done

# ------------------------------------------------------------------ Kafka, Redis (both regions)

SEOUL_KAFKA_PORT=$(free_tcp_pair 19492)
TOKYO_KAFKA_PORT=$(free_tcp_pair $((SEOUL_KAFKA_PORT + 2)))
SEOUL_REDIS_PORT=$(free_tcp_pair 16492)
TOKYO_REDIS_PORT=$(free_tcp_pair $((SEOUL_REDIS_PORT + 2)))
SEOUL_QUIC_PORT=$(free_udp 17492)
TOKYO_QUIC_PORT=$(free_udp $((SEOUL_QUIC_PORT + 1)) "$SEOUL_QUIC_PORT")

log "starting Kafka (seoul :$SEOUL_KAFKA_PORT, tokyo :$TOKYO_KAFKA_PORT) and Redis (seoul :$SEOUL_REDIS_PORT, tokyo :$TOKYO_REDIS_PORT)"
deploy/kafka.sh fetch >&2
STARTED_INFRA+=("$WORK/seoul/kafka" "$WORK/tokyo/kafka" "$WORK/seoul/redis" "$WORK/tokyo/redis")
# The two brokers start side by side (each takes ~10-20 s on this box).
KAFKA_PROFILE=${DTFED_KAFKA_PROFILE:-production}
deploy/kafka.sh start --port "$SEOUL_KAFKA_PORT" --dir "$WORK/seoul/kafka" --profile "$KAFKA_PROFILE" >"$WORK/seoul/kafka-start.log" 2>&1 &
k1=$!
deploy/kafka.sh start --port "$TOKYO_KAFKA_PORT" --dir "$WORK/tokyo/kafka" --profile "$KAFKA_PROFILE" >"$WORK/tokyo/kafka-start.log" 2>&1 &
k2=$!
deploy/redis.sh start --port "$SEOUL_REDIS_PORT" --dir "$WORK/seoul/redis" >&2
deploy/redis.sh start --port "$TOKYO_REDIS_PORT" --dir "$WORK/tokyo/redis" >&2
kafka_ok=1
wait "$k1" || { cat "$WORK/seoul/kafka-start.log" >&2; kafka_ok=""; }
wait "$k2" || { cat "$WORK/tokyo/kafka-start.log" >&2; kafka_ok=""; }
[[ -n $kafka_ok ]] || die "a Kafka broker did not start (logs above)"
cat "$WORK/seoul/kafka-start.log" "$WORK/tokyo/kafka-start.log" >&2
SEOUL_KAFKA_PID=$(cat "$WORK/seoul/kafka/kafka.pid")
TOKYO_KAFKA_PID=$(cat "$WORK/tokyo/kafka/kafka.pid")
SEOUL_REDIS_PID=$(cat "$WORK/seoul/redis/redis.pid")
TOKYO_REDIS_PID=$(cat "$WORK/tokyo/redis/redis.pid")

# ------------------------------------------------------------------ the WAN relay

# tokyo → relay → seoul. Its stdin is a FIFO this script keeps open (fd RELAY_FD), so
# `delay MS` can be sent from here and `cut`/`heal` from dtfed-bench (--relay-ctl); its
# answers (`ok ...`) go to relay.out.
RELAY_CTL=$WORK/relay/ctl
RELAY_OUT=$WORK/relay/relay.out
mkfifo "$RELAY_CTL"
log "starting dtfed-wan-relay towards seoul's federation port $SEOUL_QUIC_PORT/udp"
"$BIN/dtfed-wan-relay" --listen 127.0.0.1:0 --upstream "127.0.0.1:$SEOUL_QUIC_PORT" \
    <"$RELAY_CTL" >"$RELAY_OUT" 2>"$WORK/relay/relay.log" &
RELAY_PID=$!
exec {RELAY_FD}>"$RELAY_CTL"
RELAY_ADDR=""
for ((i = 0; i < 100; i++)); do
    RELAY_ADDR=$(sed -n 's/^listening \([^ ]*\) .*/\1/p' "$RELAY_OUT" | head -n1)
    [[ -n $RELAY_ADDR ]] && break
    kill -0 "$RELAY_PID" 2>/dev/null || { cat "$WORK/relay/relay.log" >&2; die "the relay exited"; }
    sleep 0.1
done
[[ -n $RELAY_ADDR ]] || die "the relay did not print its listening line (log: $WORK/relay/relay.log)"
log "relay listening on $RELAY_ADDR (pid $RELAY_PID)"

# relay_cmd CMD...: send one command, wait for its `ok` answer.
relay_cmd() {
    local before after line i
    before=$(wc -l <"$RELAY_OUT")
    echo "$*" >&"$RELAY_FD"
    for ((i = 0; i < 50; i++)); do
        after=$(wc -l <"$RELAY_OUT")
        if ((after > before)); then
            line=$(tail -n +"$((before + 1))" "$RELAY_OUT" | head -n1)
            [[ $line == ok* ]] || die "relay answered '$line' to '$*'"
            log "relay: $line"
            return 0
        fi
        sleep 0.1
    done
    die "no answer from the relay to '$*'"
}

# ------------------------------------------------------------------ the two daemons

# write_config REGION KAFKA_PORT REDIS_PORT QUIC_PORT PEER PEER_ADDR
write_config() {
    cat >"$WORK/$1/dtfed.toml" <<EOF
region = "$1"
[client]
listen = "127.0.0.1:0"
auth = "none"
max_connections = 20000
outbound_queue = 4096
publish_rate_per_sec = $PUBLISH_LIMIT
publish_burst = $PUBLISH_LIMIT
[admin]
listen = "127.0.0.1:0"
[kafka]
brokers = "127.0.0.1:$2"
local_topic = "dtfed.local"
partitions = 8
fanout_group = "bench"
[redis]
url = "redis://127.0.0.1:$3"
key_prefix = "bench"
[federation]
listen = "127.0.0.1:$4"
ca_cert = "$CERTS/ca.crt"
cert = "$CERTS/$1.crt"
key = "$CERTS/$1.key"
[[federation.peers]]
name = "$5"
addrs = ["$6"]
topic = "dtfed.local"
partitions = 8
EOF
}
write_config seoul "$SEOUL_KAFKA_PORT" "$SEOUL_REDIS_PORT" "$SEOUL_QUIC_PORT" tokyo "127.0.0.1:$TOKYO_QUIC_PORT"
write_config tokyo "$TOKYO_KAFKA_PORT" "$TOKYO_REDIS_PORT" "$TOKYO_QUIC_PORT" seoul "$RELAY_ADDR"

# start_dtfed REGION: sets <REGION>_PID, _CLIENT, _ADMIN (upper case) once /readyz is 200.
start_dtfed() {
    local r=$1 R pid line client admin deadline
    R=${r^^}
    log "starting dtfed $r (config $WORK/$r/dtfed.toml, log $WORK/$r/dtfed.log)"
    DTFED_LOG=${DTFED_LOG:-info} "$BIN/dtfed" run --config "$WORK/$r/dtfed.toml" --grace 5 \
        >"$WORK/$r/dtfed.out" 2>>"$WORK/$r/dtfed.log" &
    pid=$!
    printf -v "${R}_PID" '%s' "$pid"
    deadline=$((SECONDS + 90))
    until line=$(grep -m1 '^listening ' "$WORK/$r/dtfed.out" 2>/dev/null); do
        kill -0 "$pid" 2>/dev/null || {
            tail -n 30 "$WORK/$r/dtfed.log" >&2
            die "dtfed $r exited during start-up (log above)"
        }
        ((SECONDS < deadline)) || die "dtfed $r printed no listening line within 90 s (log: $WORK/$r/dtfed.log)"
        sleep 0.1
    done
    log "dtfed $r: $line"
    client=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' <<<"$line")
    admin=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' <<<"$line")
    [[ -n $client && -n $admin ]] || die "cannot parse dtfed $r's listening line: $line"
    printf -v "${R}_CLIENT" '%s' "$client"
    printf -v "${R}_ADMIN" '%s' "$admin"
    deadline=$((SECONDS + 120))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$admin/readyz" || true) == 200 ]]; do
        kill -0 "$pid" 2>/dev/null || {
            tail -n 30 "$WORK/$r/dtfed.log" >&2
            die "dtfed $r exited before it was ready (log above)"
        }
        ((SECONDS < deadline)) || die "dtfed $r not ready (GET http://$admin/readyz != 200) within 120 s"
        sleep 0.2
    done
    log "dtfed $r ready (pid $pid)"
}
start_dtfed seoul
start_dtfed tokyo

status() { curl -s --max-time 3 "http://$1/status"; }

# The link tokyo → seoul is up and tokyo runs seoul's mirror tasks.
deadline=$((SECONDS + 90))
while :; do
    st=$(status "$TOKYO_ADMIN" || true)
    links=$(jq -r '[.links // [] | .[] | select(.region == "seoul")
        | select(.state == "connected" or .state == "up" or .connected == true)] | length' <<<"$st" 2>/dev/null || echo 0)
    tasks=$(jq -r '[.mirror // [] | .[] | select(.origin == "seoul")] | length' <<<"$st" 2>/dev/null || echo 0)
    if ((links > 0 && tasks > 0)); then break; fi
    if ((SECONDS >= deadline)); then
        echo "$st" | jq . >&2 2>/dev/null || echo "$st" >&2
        tail -n 20 "$WORK/tokyo/dtfed.log" >&2
        die "tokyo has no connected link to seoul with mirror tasks after 90 s (its /status above: is [federation] wired in this dtfed?)"
    fi
    sleep 1
done
log "link tokyo → seoul up, $tasks mirror tasks of seoul in tokyo"

# Records of seoul's local topic (Σ high watermarks, from seoul's fan-out owner, refreshed
# every second) and how many of them tokyo has mirrored (Σ mirrored_offset + 1: origin
# offsets are dense). "" when unknown.
seoul_end() {
    status "$SEOUL_ADMIN" | jq -r '[.fanout.partitions // [] | .[] | select(.topic == "dtfed.local")
        | .high_watermark] | if length == 0 or any(. == null or . < 0) then "" else add end' 2>/dev/null || true
}
tokyo_mirrored() {
    status "$TOKYO_ADMIN" | jq -r '[.mirror // [] | .[] | select(.origin == "seoul")
        | ((.mirrored_offset // -1) + 1)] | if length == 0 then "" else add end' 2>/dev/null || true
}
# Wait (up to 300 s) until tokyo has mirrored everything seoul holds, so a run never starts
# with the previous one's records still on the way (its baseline would be wrong). tokyo's
# own lag_records is no help here: it is relative to the high watermark seoul last
# reported over the link, so it reads 0 while records are still coming.
wait_mirror_idle() {
    local deadline=$((SECONDS + 300)) said=$((SECONDS + 10)) want have
    while :; do
        want=$(seoul_end)
        have=$(tokyo_mirrored)
        if [[ -n $want && -n $have ]] && ((have >= want)); then
            sleep 1.5 # one more statistics interval: the high watermark may have been stale
            want=$(seoul_end)
            have=$(tokyo_mirrored)
            [[ -n $want && -n $have ]] && ((have >= want)) && return 0
        fi
        if ((SECONDS >= deadline)); then
            log "warning: tokyo has mirrored ${have:-?} of seoul's ${want:-?} records after 300 s; going on"
            return 0
        fi
        if ((SECONDS >= said)); then
            log "waiting for tokyo to mirror the previous run: ${have:-?} of ${want:-?} records"
            said=$((SECONDS + 10))
        fi
        sleep 0.5
    done
}

# ------------------------------------------------------------------ runs

SEOUL_WS="ws://$SEOUL_CLIENT/ws"
TOKYO_WS="ws://$TOKYO_CLIENT/ws"
COMMON=(--url "$SEOUL_WS" --sub-url "$TOKYO_WS" --rooms "$ROOMS" --body-bytes "$BODY_BYTES"
    --mirror-status "http://$TOKYO_ADMIN" --mirror-origin seoul
    --mirror-log-dir "$WORK/tokyo/kafka/data"
    --pid "$SEOUL_PID" --pid "$TOKYO_PID"
    --infra-pid "$SEOUL_KAFKA_PID" --infra-pid "$TOKYO_KAFKA_PID"
    --infra-pid "$SEOUL_REDIS_PID" --infra-pid "$TOKYO_REDIS_PID")

# First messages across: the mirror topics get created, the tasks find their tails.
log "probe: one room, a few messages seoul → tokyo"
probe_ok=""
for ((i = 0; i < 6; i++)); do
    if "$BIN/dtfed-bench" --label probe --url "$SEOUL_WS" --sub-url "$TOKYO_WS" --clients 2 \
        --rooms 1 --rate 20 --duration 2 --warmup 0 --drain-timeout 10 \
        >"$WORK/probe.log" 2>&1; then
        probe_ok=1
        break
    fi
    sleep 5
done
[[ -n $probe_ok ]] || {
    tail -n 30 "$WORK/probe.log" >&2
    die "messages published on seoul do not reach tokyo's subscribers (probe output above)"
}
log "probe passed: seoul → tokyo delivers"
BROKER="kafka profile: $(tr '\n' ' ' <"$WORK/seoul/kafka/profile" 2>/dev/null || echo unknown)"
log "$BROKER"
BROKER_WARMUP=${BENCH_BROKER_WARMUP:-30}
if [[ $BROKER_WARMUP != 0 ]]; then
    log "warming both brokers up: ${BROKER_WARMUP} s of paced load seoul → tokyo, not recorded"
    "$BIN/dtfed-bench" --label broker-warmup --url "$SEOUL_WS" --sub-url "$TOKYO_WS" \
        --clients "$CLIENTS" --subscribers "$SUBSCRIBERS" --rooms "$ROOMS" --rate "$RATE" \
        --duration "$BROKER_WARMUP" --warmup 1 --body-bytes "$BODY_BYTES" >"$WORK/warmup.log" 2>&1 ||
        log "(the warm-up run did not pass; going on)"
fi

: >"$RESULTS"
: >"$WORK/runs.log"
: >"$WORK/hops.md"
FAILED=0
# The cross-region hop alone: tokyo's mirror tasks count, per record, its age (ack of the
# mirror append − the origin's record timestamp) in fixed buckets (/status
# .mirror[].append_age). ages prints the bucket counts summed over seoul's tasks; age_window
# BEFORE AFTER the quantiles of what was counted in between (bucket upper bounds, so upper
# estimates). A task restarted during the run undercounts; never below zero.
ages() {
    status "$TOKYO_ADMIN" | jq -c '[.mirror // [] | .[] | select(.origin == "seoul")
        | .append_age.counts // empty] | if length == 0 then [] else transpose | map(add) end' \
        2>/dev/null || echo '[]'
}
age_window() {
    local le
    le=$(status "$TOKYO_ADMIN" | jq -c '[.mirror // [] | .[] | .append_age.le_ms // empty][0] // []' 2>/dev/null || echo '[]')
    jq -rn --argjson a "${1:-[]}" --argjson b "${2:-[]}" --argjson le "$le" '
        ($b | to_entries | map(.value - ($a[.key] // 0) | if . < 0 then 0 else . end)) as $d
        | ($d | add // 0) as $n
        | def q($p): ((($p * $n) | ceil) as $r | if $r < 1 then 1 else $r end) as $r
            | reduce range(0; $d | length) as $i ({s: 0, v: null};
                if .v == null then .s += $d[$i] | (if .s >= $r then .v = ($le[$i] // "> \($le[-1])") else . end) else . end)
            | .v;
        if $n == 0 then "no records" else
            "\($n) records, p50 <= \(q(0.5)) ms, p99 <= \(q(0.99)) ms, p99.9 <= \(q(0.999)) ms" end' 2>/dev/null ||
        echo "unknown"
}

bench() { # label, args...
    local label=$1 before after hop
    shift
    wait_mirror_idle
    sleep 1
    log "run: $label"
    before=$(ages)
    # Each run's own summary goes to stderr (and runs.log); stdout is the final table.
    if ! "$BIN/dtfed-bench" --label "$label" "${COMMON[@]}" --json "$RESULTS" "$@" |
        tee -a "$WORK/runs.log" >&2; then
        log "run $label FAILED (see above)"
        FAILED=1
    fi
    after=$(ages)
    hop=$(age_window "$before" "$after")
    log "$label: cross-region hop (seoul record ts → tokyo mirror append acked): $hop"
    echo "| $label | $hop |" >>"$WORK/hops.md"
    # The relay's packet counters so far (drops would show here).
    relay_cmd stats
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$SECONDS
for d in $DELAYS; do
    relay_cmd delay "$d"
    if want_run paced; then
        bench "paced-${d}ms" --delay-ms "$d" --clients "$CLIENTS" --subscribers "$SUBSCRIBERS" \
            --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP"
    fi
    if want_run max; then
        bench "max-${d}ms" --delay-ms "$d" --clients "$CLIENTS" --subscribers "$MAX_SUBSCRIBERS" \
            --flat-out --inflight "$MAX_INFLIGHT" --duration "$MAX_DURATION" --warmup "$WARMUP"
    fi
    if want_run catchup && [[ " $CATCHUP_DELAYS " == *" $d "* ]]; then
        bench "catchup-${d}ms" --delay-ms "$d" --clients "$CLIENTS" \
            --subscribers "$CATCHUP_SUBSCRIBERS" --rate "$CATCHUP_RATE" \
            --duration "$CATCHUP_PRECUT" --warmup "$WARMUP" --catchup --cut-secs "$CUT_SECS" \
            --catchup-max "$CATCHUP_MAX" --relay-ctl "$RELAY_CTL" --relay-out "$RELAY_OUT"
    fi
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$((SECONDS - T0))

# ------------------------------------------------------------------ table

{
    echo "## dtfed cross-region mirror — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Two regions on one host ($(nproc) cores, shared; load average $LOAD_BEFORE before," \
        "$LOAD_AFTER after; runs took ${ELAPSED} s): seoul and tokyo, each with its own Kafka" \
        "(1 broker, 8 partitions), Redis and one \`dtfed run\`; tokyo pulls seoul's partitions" \
        "over QUIC through \`dtfed-wan-relay\` (one-way delay each direction, no jitter or loss)." \
        "Publishers ($CLIENTS, ${BODY_BYTES}-byte bodies, $ROOMS rooms) on seoul, subscribers on" \
        "tokyo, one bench process: *remote* latency = delivery in tokyo − send to seoul, on" \
        "one clock. Paced: $RATE msg/s, $SUBSCRIBERS subscribers, ${WARMUP} s warm-up +" \
        "${DURATION} s. Max: $MAX_INFLIGHT publishes in flight per publisher, $MAX_SUBSCRIBERS" \
        "subscribers, ${MAX_DURATION} s. Catch-up: R = $CATCHUP_RATE msg/s, cut ${CUT_SECS} s," \
        "$CATCHUP_SUBSCRIBERS subscribers. *mirror rec/s*: tokyo's \`/status\` mirror offsets" \
        "(sampled every 100 ms); *mirror MB/s*: growth of \`dtfed.mirror.seoul\` segments in" \
        "tokyo's Kafka; *mirror behind*: records seoul acked that tokyo has not mirrored yet." \
        "Catch-up: *backlog delivered* = heal → every message sent before the heal delivered in" \
        "tokyo (its rate is the goal's catch-up rate); *live again* = heal → no undelivered" \
        "message older than 1.5 × the pre-cut p99.9 for 1 s; *link back* = heal → the first" \
        "record mirrored after it."
    echo
    echo "Brokers: $BROKER"
    echo
    "$BIN/dtfed-bench" --report "$RESULTS" --mirror
    echo
    echo "Cross-region hop alone (tokyo \`/status\` \`append_age\`: mirror append acknowledged −"
    echo "origin record timestamp; bucket upper bounds), per run:"
    echo
    echo "| run | records, quantiles |"
    echo "| --- | --- |"
    cat "$WORK/hops.md"
} | tee "$REPORT"
log "written $REPORT and $RESULTS"
exit "$FAILED"
