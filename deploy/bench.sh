#!/usr/bin/env bash
# deploy/bench.sh — dtfed against the classic Redis-Pub/Sub-only relay, same load, side by side.
#
#   deploy/bench.sh
#
# Builds --release (dtfed, dtfed-bench, redis-relay), starts Kafka and Redis under
# .dtfed/bench/ (deploy/kafka.sh, deploy/redis.sh), one `dtfed run` and one `redis-relay`,
# then runs dtfed-bench with the same parameters against the relay and against dtfed, then
# an idle-connection memory run against each, and prints a markdown table (also written to
# target/bench/results.md; raw JSON lines in target/bench/results.jsonl). Everything it
# started is stopped on exit, by PID.
#
# Environment (defaults in brackets):
#   BENCH_CLIENTS [1000]  BENCH_ROOMS [100]  BENCH_RATE [5000 msg/s]  BENCH_DURATION [30 s]
#   BENCH_WARMUP [5 s]    BENCH_BODY_BYTES [100]
#   BENCH_IDLE_CONNECTIONS [10000]  (0 skips the memory runs)   BENCH_IDLE_ROOMS [1000]
#   BENCH_KAFKA_PORT, BENCH_REDIS_PORT  (default: the first free port from 19392 / 16392)
#   BENCH_NO_BUILD=1      use the binaries already in target/release
#   BENCH_BROKER_WARMUP [30 s]  load dtfed (and so Kafka) this long, unrecorded, before
#                         anything is measured: a broker just started is still compiling
#                         its hot paths (C2) and would take a core for it mid-run
#   BENCH_DTFED_ENV       NAME=value words put in dtfed's environment only (experiments)
#   DTFED_KAFKA_PROFILE [production]  the broker's JVM profile (deploy/kafka.sh); it is
#                         recorded with every result
#
#   BENCH_RAMP="2000 4000 ..."  ramp mode instead of one rate: each server is run at each
#                         rate in turn (BENCH_DURATION each) until it falls behind (last
#                         delivery > 1 s after the last publish, or delivery p99 > 100 ms);
#                         the table then says each server's highest rate that kept up.
#
# Exit status: 0 when every run passed its checks (no order violations, no duplicates,
# >= 99.9 % of expected deliveries, the server did not fall behind: its last delivery came
# at most 0.5 s after the last publish), 1 otherwise; the table is printed either way. In
# ramp mode a server falling behind ends its ramp and is not a failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

CLIENTS=${BENCH_CLIENTS:-1000}
ROOMS=${BENCH_ROOMS:-100}
RATE=${BENCH_RATE:-5000}
DURATION=${BENCH_DURATION:-30}
WARMUP=${BENCH_WARMUP:-5}
BODY_BYTES=${BENCH_BODY_BYTES:-100}
IDLE=${BENCH_IDLE_CONNECTIONS:-10000}
IDLE_ROOMS=${BENCH_IDLE_ROOMS:-1000}
KAFKA_PROFILE=${DTFED_KAFKA_PROFILE:-production}

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release
WORK=$ROOT/.dtfed/bench
OUT=$TARGET/bench
RUNID=$(date +%Y%m%d%H%M%S)-$$

log() { echo "bench.sh: $*" >&2; }
die() {
    echo "bench.sh: error: $*" >&2
    exit 2
}

for v in CLIENTS ROOMS RATE DURATION WARMUP BODY_BYTES IDLE IDLE_ROOMS; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "BENCH_$v must be a number, got '${!v}'"
done

port_open() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_open "$p" || port_open "$((p + 1))"; do p=$((p + 2)); done
    echo "$p"
}

# ------------------------------------------------------------------ cleanup

DTFED_PID=""
RELAY_PID=""
KAFKA_STARTED=""
REDIS_STARTED=""

# stop_pid and cleanup run from the EXIT trap.
# shellcheck disable=SC2317
stop_pid() { # name pid
    local name=$1 pid=$2 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) still alive 10 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid redis-relay "$RELAY_PID"
    stop_pid dtfed "$DTFED_PID"
    wait 2>/dev/null || true
    if [[ -n $KAFKA_STARTED ]]; then deploy/kafka.sh stop --dir "$WORK/kafka" || true; fi
    if [[ -n $REDIS_STARTED ]]; then deploy/redis.sh stop --dir "$WORK/redis" || true; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ build

if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    log "building --release (dtfed, dtfed-bench, redis-relay)"
    cargo build --release -p dtfed -p dtfed-tests --bins >&2
fi
for b in dtfed dtfed-bench redis-relay; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing (build with: cargo build --release -p dtfed -p dtfed-tests --bins)"
done

# 10,000 idle connections need as many descriptors in dtfed and in the generator: raise the
# soft limit before starting anything (children inherit it).
need_fds=$((IDLE > CLIENTS ? IDLE : CLIENTS))
need_fds=$((need_fds + 1024))
hard=$(ulimit -Hn)
if [[ $hard != unlimited && $hard -lt $need_fds ]]; then
    log "warning: the hard limit on open files is $hard, below the $need_fds this run needs; raise it (e.g. ulimit -Hn $need_fds as root) or lower BENCH_IDLE_CONNECTIONS"
fi
ulimit -n "$hard" 2>/dev/null || ulimit -n "$need_fds" 2>/dev/null || true
log "open files limit: $(ulimit -n)"

# ------------------------------------------------------------------ Kafka, Redis

mkdir -p "$WORK" "$OUT"
# Leftovers of an interrupted run in our own dirs: stop them (the scripts check the PIDs).
if [[ -f $WORK/kafka/kafka.pid ]]; then deploy/kafka.sh stop --dir "$WORK/kafka" || true; fi
if [[ -f $WORK/redis/redis.pid ]]; then deploy/redis.sh stop --dir "$WORK/redis" || true; fi
rm -rf "$WORK/kafka" "$WORK/redis"

KAFKA_PORT=${BENCH_KAFKA_PORT:-$(free_port 19392)}
REDIS_PORT=${BENCH_REDIS_PORT:-$(free_port 16392)}
KAFKA_STARTED=1
deploy/kafka.sh start --port "$KAFKA_PORT" --dir "$WORK/kafka" --profile "$KAFKA_PROFILE"
REDIS_STARTED=1
deploy/redis.sh start --port "$REDIS_PORT" --dir "$WORK/redis"
KAFKA_PID=$(cat "$WORK/kafka/kafka.pid")
REDIS_PID=$(cat "$WORK/redis/redis.pid")

# ------------------------------------------------------------------ dtfed

CONFIG=$WORK/dtfed.toml
cat >"$CONFIG" <<EOF
region = "bench"
[client]
listen = "127.0.0.1:0"
auth = "none"
max_connections = 20000
outbound_queue = 4096
publish_rate_per_sec = 1000
publish_burst = 1000
[admin]
listen = "127.0.0.1:0"
[kafka]
brokers = "127.0.0.1:$KAFKA_PORT"
local_topic = "bench.$RUNID"
partitions = 8
fanout_group = "bench-$RUNID"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT"
key_prefix = "bench-$RUNID"
EOF

# wait_listening NAME PID OUTFILE LOGFILE: the `listening ...` line, or die with the log.
wait_listening() {
    local name=$1 pid=$2 out=$3 logf=$4 deadline=$((SECONDS + 90)) line
    while :; do
        line=$(grep -m1 '^listening ' "$out" 2>/dev/null || true)
        [[ -n $line ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$logf" >&2 || true
            die "$name exited during start-up (log above, full log in $logf)"
        fi
        ((SECONDS < deadline)) || {
            tail -n 30 "$logf" >&2 || true
            die "$name did not print its listening line within 90 s (log: $logf)"
        }
        sleep 0.1
    done
    echo "$line"
}

# start_dtfed: sets DTFED_PID, DTFED_CLIENT, DTFED_ADMIN once /readyz answers 200.
start_dtfed() {
    local line deadline
    log "starting dtfed (config $CONFIG, log $WORK/dtfed.log)"
    # shellcheck disable=SC2086 # BENCH_DTFED_ENV is a list of NAME=value words
    env ${BENCH_DTFED_ENV:-} DTFED_LOG="${DTFED_LOG:-info}" "$BIN/dtfed" run --config "$CONFIG" >"$WORK/dtfed.out" 2>>"$WORK/dtfed.log" &
    DTFED_PID=$!
    line=$(wait_listening dtfed "$DTFED_PID" "$WORK/dtfed.out" "$WORK/dtfed.log")
    echo "dtfed: $line"
    DTFED_CLIENT=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' <<<"$line")
    DTFED_ADMIN=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' <<<"$line")
    [[ -n $DTFED_CLIENT && -n $DTFED_ADMIN ]] || die "cannot parse dtfed's listening line: $line"
    deadline=$((SECONDS + 120))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$DTFED_ADMIN/readyz" || true) == 200 ]]; do
        kill -0 "$DTFED_PID" 2>/dev/null || {
            tail -n 30 "$WORK/dtfed.log" >&2
            die "dtfed exited before it was ready (log above)"
        }
        ((SECONDS < deadline)) || {
            curl -s --max-time 2 "http://$DTFED_ADMIN/readyz" >&2 || true
            die "dtfed not ready (GET http://$DTFED_ADMIN/readyz != 200) within 120 s"
        }
        sleep 0.2
    done
    log "dtfed ready (pid $DTFED_PID)"
}

# start_relay: sets RELAY_PID, RELAY_CLIENT.
start_relay() {
    local line
    log "starting redis-relay (log $WORK/relay.log)"
    "$BIN/redis-relay" --listen 127.0.0.1:0 --redis "redis://127.0.0.1:$REDIS_PORT" \
        --prefix "relay-$RUNID" >"$WORK/relay.out" 2>>"$WORK/relay.log" &
    RELAY_PID=$!
    line=$(wait_listening redis-relay "$RELAY_PID" "$WORK/relay.out" "$WORK/relay.log")
    echo "redis-relay: $line"
    RELAY_CLIENT=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' <<<"$line")
}

start_dtfed
start_relay

# ------------------------------------------------------------------ runs

RESULTS=$OUT/results.jsonl
: >"$RESULTS"
FAILED=0
LOAD=(--clients "$CLIENTS" --rooms "$ROOMS" --rate "$RATE" --duration "$DURATION"
    --warmup "$WARMUP" --body-bytes "$BODY_BYTES" --json "$RESULTS")

bench() { # label, args...
    local label=$1
    shift
    log "run: $label"
    if ! "$BIN/dtfed-bench" --label "$label" "$@"; then
        log "run $label FAILED (see above)"
        FAILED=1
    fi
}

BROKER="kafka profile: $(tr '\n' ' ' <"$WORK/kafka/profile" 2>/dev/null || echo unknown)"
log "$BROKER"
LOAD+=(--note "$BROKER")
RELAY_RUN=(--url "ws://$RELAY_CLIENT/ws" --pid "$RELAY_PID" --infra-pid "$REDIS_PID" --infra-name redis)
DTFED_RUN=(--url "ws://$DTFED_CLIENT/ws" --pid "$DTFED_PID" --metrics "http://$DTFED_ADMIN"
    --infra-pid "$REDIS_PID" --infra-name redis --infra-pid "$KAFKA_PID" --infra-name kafka)

BROKER_WARMUP=${BENCH_BROKER_WARMUP:-30}
if [[ $BROKER_WARMUP != 0 ]]; then
    log "warming the broker up: ${BROKER_WARMUP} s of load on dtfed, not recorded"
    "$BIN/dtfed-bench" --label broker-warmup --url "ws://$DTFED_CLIENT/ws" --clients "$CLIENTS" \
        --rooms "$ROOMS" --rate "$RATE" --duration "$BROKER_WARMUP" --warmup 1 \
        --body-bytes "$BODY_BYTES" >/dev/null || log "(the warm-up run did not pass; going on)"
    sleep 2
fi

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
RAMP_SUMMARY=""
if [[ -n ${BENCH_RAMP:-} ]]; then
    # ramp NAME args...: raise the rate until the server falls behind; the highest rate
    # that kept up goes in RAMP_SUMMARY.
    ramp() {
        local name=$1 best=0 r
        shift
        for r in $BENCH_RAMP; do
            log "ramp: $name at $r msg/s"
            if "$BIN/dtfed-bench" --label "$name@$r" "$@" --clients "$CLIENTS" --rooms "$ROOMS" \
                --rate "$r" --duration "$DURATION" --warmup "$WARMUP" --body-bytes "$BODY_BYTES" \
                --max-drain 1 --max-p99-ms 100 --note "$BROKER" --json "$RESULTS"; then
                best=$r
            else
                log "ramp: $name fell behind (or failed) at $r msg/s"
                break
            fi
            sleep 2
        done
        RAMP_SUMMARY+="| $name | $best |"$'\n'
    }
    ramp redis-relay "${RELAY_RUN[@]}"
    ramp dtfed "${DTFED_RUN[@]}"
else
    bench redis-relay "${RELAY_RUN[@]}" "${LOAD[@]}"
    sleep 2
    bench dtfed "${DTFED_RUN[@]}" "${LOAD[@]}"
fi
if ((IDLE > 0)); then
    # Fresh processes, so memory freed by the load runs (and kept by the allocator) does not
    # hide the cost of the idle connections.
    stop_pid redis-relay "$RELAY_PID"
    stop_pid dtfed "$DTFED_PID"
    wait 2>/dev/null || true
    RELAY_PID="" DTFED_PID=""
    start_dtfed
    start_relay
    sleep 2
    IDLE_ARGS=(--idle-connections "$IDLE" --rooms "$IDLE_ROOMS" --idle-hold 5 --json "$RESULTS")
    bench redis-relay-idle --url "ws://$RELAY_CLIENT/ws" --pid "$RELAY_PID" "${IDLE_ARGS[@]}"
    bench dtfed-idle --url "ws://$DTFED_CLIENT/ws" --pid "$DTFED_PID" "${IDLE_ARGS[@]}"
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ table

{
    echo "## dtfed vs redis-relay — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Same load against both: $CLIENTS clients, $ROOMS rooms, $RATE msg/s, ${BODY_BYTES}-byte bodies," \
        "${WARMUP} s warm-up + ${DURATION} s measured; one process each, Kafka 1 broker and Redis on" \
        "the same host ($(nproc) cores, load average $LOAD_BEFORE before, $LOAD_AFTER after)." \
        "Latencies in ms; server CPU/RSS is the daemon or relay process alone, infra CPU is Redis" \
        "(+ Kafka for dtfed). The relay acks after PUBLISH (nothing durable); dtfed acks after" \
        "Kafka acks=all and delivers through Kafka → fan-out owner → Redis."
    echo
    echo "Broker: $BROKER"
    echo
    if [[ -n $RAMP_SUMMARY ]]; then
        echo "Ramp over $BENCH_RAMP msg/s (${DURATION} s each): the highest rate at which each server kept up"
        echo "(last delivery ≤ 1 s after the last publish, delivery p99 ≤ 100 ms, nothing lost):"
        echo
        echo "| server | max msg/s kept up |"
        echo "|---|---:|"
        printf '%s' "$RAMP_SUMMARY"
        echo
        "$BIN/dtfed-bench" --report "$RESULTS"
    else
        "$BIN/dtfed-bench" --report "$RESULTS" --baseline redis-relay
    fi
} | tee "$OUT/results.md"
log "written $OUT/results.md and $RESULTS"
exit "$FAILED"
