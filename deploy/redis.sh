#!/usr/bin/env bash
# deploy/redis.sh — a local Redis (Debian's redis-server) for regions and tests.
#
#   deploy/redis.sh run   --port P --dir D [--persist]
#       exec redis-server in the foreground (the caller's PID is Redis'), bound to
#       127.0.0.1 only, working dir D, logging to stdout. No persistence unless --persist
#       (then append-only file in D, fsync every second).
#   deploy/redis.sh start --port P --dir D [--persist]
#       run in the background, PID in D/redis.pid, log in D/redis.log; waits until Redis
#       answers PING (timeout 30 s). Already running for that dir: says so, exits 0.
#   deploy/redis.sh stop --dir D
#       SIGTERM the PID in D/redis.pid, wait up to 20 s, then SIGKILL.
#   deploy/redis.sh install
#       apt-get install redis-server if it is missing (needs root).
set -euo pipefail

START_TIMEOUT=${DTFED_REDIS_START_TIMEOUT:-30}
STOP_TIMEOUT=20

die() {
    echo "redis.sh: error: $*" >&2
    exit 1
}
log() { echo "redis.sh: $*" >&2; }

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

ensure_redis() {
    command -v redis-server >/dev/null && return 0
    if [[ $(id -u) -ne 0 ]]; then
        die "redis-server is not installed and this is not root: install it with 'sudo apt-get install -y redis-server'"
    fi
    command -v apt-get >/dev/null || die "redis-server is not installed and there is no apt-get to install it"
    log "redis-server missing: installing it with apt-get"
    # Keep the package's own service from starting a Redis on 6379.
    local made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
    } >&2 || rc=$?
    [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install redis-server failed (exit $rc)"
    command -v redis-server >/dev/null || die "redis-server still not found after apt-get install"
}

PORT=""
DIR=""
PERSIST=""

parse_args() {
    while (($#)); do
        case $1 in
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        --persist) PERSIST=1; shift ;;
        -h | --help) usage 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
        esac
    done
}

need_port_dir() {
    [[ -n $PORT ]] || die "--port is required"
    [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
    [[ -n $DIR ]] || die "--dir is required"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
}

need_dir() {
    [[ -n $DIR ]] || die "--dir is required"
    [[ -d $DIR ]] || die "no such directory: $DIR"
    DIR=$(cd "$DIR" && pwd)
}

port_open() {
    (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Does Redis on port $1 answer PING?
redis_ping() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf 'PING\r\n' >&3
        IFS= read -r -t 2 reply <&3
        [[ $reply == +PONG* ]]
    ) 2>/dev/null
}

# Is PID $1 alive, not a zombie, and a redis-server on our port (not a recycled pid)?
pid_is_ours() {
    local pid=$1 state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
    [[ $state != Z && $state != gone ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'redis' || return 1
}

do_run() {
    need_port_dir
    ensure_redis
    local persist=(--save "" --appendonly no)
    if [[ -n $PERSIST ]]; then
        persist=(--save "" --appendonly yes --appendfsync everysec)
    fi
    exec redis-server --port "$PORT" --bind 127.0.0.1 --protected-mode yes \
        --dir "$DIR" --daemonize no --logfile "" --pidfile "" \
        "${persist[@]}" --databases 16 --tcp-keepalive 60
}

do_start() {
    need_port_dir
    ensure_redis
    local pidfile=$DIR/redis.pid pid
    if [[ -f $pidfile ]] && pid_is_ours "$(cat "$pidfile")"; then
        log "already running for $DIR (pid $(cat "$pidfile"))"
        return 0
    fi
    if port_open "$PORT"; then
        die "port 127.0.0.1:$PORT is already in use by another process"
    fi
    local args=(run --port "$PORT" --dir "$DIR")
    [[ -n $PERSIST ]] && args+=(--persist)
    nohup bash "$0" "${args[@]}" >>"$DIR/redis.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidfile"
    local deadline=$((SECONDS + START_TIMEOUT))
    until redis_ping "$PORT"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$DIR/redis.log" >&2 || true
            rm -f "$pidfile"
            die "redis-server exited during start-up on 127.0.0.1:$PORT (log above)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$DIR/redis.log" >&2 || true
            die "redis-server (pid $pid) did not answer PING on 127.0.0.1:$PORT within ${START_TIMEOUT}s"
        fi
        sleep 0.05
    done
    log "Redis ready on 127.0.0.1:$PORT (pid $pid, dir $DIR)"
}

do_stop() {
    need_dir
    local pidfile=$DIR/redis.pid pid
    if [[ ! -f $pidfile ]]; then
        log "not running (no $pidfile)"
        return 0
    fi
    pid=$(cat "$pidfile")
    if ! pid_is_ours "$pid"; then
        log "not running (pid $pid from $pidfile is gone)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while pid_is_ours "$pid"; do
        if ((SECONDS >= deadline)); then
            log "pid $pid still alive ${STOP_TIMEOUT}s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.05
    done
    rm -f "$pidfile"
    log "stopped (pid $pid)"
}

cmd=${1:-}
[[ -n $cmd ]] || usage 2
shift
case $cmd in
run) parse_args "$@"; do_run ;;
start) parse_args "$@"; do_start ;;
stop) parse_args "$@"; do_stop ;;
install) ensure_redis; log "redis-server: $(command -v redis-server)" ;;
-h | --help | help) usage 0 ;;
*) die "unknown command '$cmd' (run|start|stop|install)" ;;
esac
