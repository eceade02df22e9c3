#!/usr/bin/env bash
# deploy/region.sh — a whole local region: Kafka + Redis + N dtfed daemons, on loopback.
#
#   deploy/region.sh start  --name N --base-port P [--daemons 2] [--release]
#                           [--peer M:Q]... [--certs DIR] [--admin-token T]
#   deploy/region.sh stop   --name N
#   deploy/region.sh status --name N
#   deploy/region.sh clean  --name N      # stop, then delete .dtfed/N (Kafka data too)
#   deploy/region.sh topology N M...      # the `dtfed drill --topology` file, on stdout
#
# Everything lives in .dtfed/N/ of the repository: kafka/ (data, server.log), redis/,
# dtfed-<i>/ (dtfed.toml, dtfed.log, dtfed.pid). Ports, from the base port P:
#
#   Kafka P (controller P+1), Redis P+2, daemon i: client P+10*i, admin P+10*i+1,
#   QUIC (federation) P+10*i+2
#
# --peer M:Q (repeatable) federates with the local region M of base port Q (same --daemons):
# certificates are made once in .dtfed/certs/ (or --certs DIR) with `dtfed certs`. --admin-token sets every
# daemon's admin.token (the drill endpoints need one). `topology` lists the regions with
# their URLs and the commands that stop, start and kill them.
#
# Kafka runs with the production profile (deploy/kafka.sh: C2, G1, 1 GB heap) unless
# $DTFED_KAFKA_PROFILE says otherwise.
#
# The dtfed binary is $DTFED_BIN, else target/release/dtfed, else target/debug/dtfed
# (built with cargo if none exists; --release builds and uses the release one).
# `start` is idempotent (running parts are left alone, Kafka data is kept); `stop` stops
# only the PIDs in this region's pid files.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$ROOT/deploy
STOP_TIMEOUT=30 # dtfed drains for up to 20 s (--grace) after SIGTERM

die() {
    echo "region.sh: error: $*" >&2
    exit 1
}
log() { echo "region.sh: $*" >&2; }

usage() {
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

NAME=""
BASE=""
DAEMONS=2
RELEASE=""
PEERS=()
ADMIN_TOKEN=""
CERTS=$ROOT/.dtfed/certs

parse_args() {
    while (($#)); do
        case $1 in
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --base-port) BASE=${2:?--base-port needs a value}; shift 2 ;;
        --daemons) DAEMONS=${2:?--daemons needs a value}; shift 2 ;;
        --release) RELEASE=1; shift ;;
        --peer) PEERS+=("${2:?--peer needs NAME:BASE_PORT}"); shift 2 ;;
        --admin-token) ADMIN_TOKEN=${2:?--admin-token needs a value}; shift 2 ;;
        --certs) CERTS=${2:?--certs needs a directory}; shift 2 ;;
        -h | --help) usage 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
        esac
    done
    [[ -n $NAME ]] || die "--name is required"
    [[ $NAME =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "--name must be lowercase letters, digits and '-', got '$NAME'"
    [[ $DAEMONS =~ ^[1-9]$ ]] || die "--daemons must be 1..9, got '$DAEMONS'"
    local p
    for p in "${PEERS[@]+"${PEERS[@]}"}"; do
        [[ $p =~ ^[a-z0-9][a-z0-9-]*:[0-9]+$ ]] || die "--peer takes NAME:BASE_PORT, got '$p'"
        [[ ${p%%:*} != "$NAME" ]] || die "--peer $p: a region is not its own peer"
    done
    DIR=$ROOT/.dtfed/$NAME
}

need_base() {
    [[ -n $BASE ]] || die "--base-port is required"
    if ! [[ $BASE =~ ^[0-9]+$ ]] || ((BASE < 1024 || BASE + 10 * DAEMONS + 1 > 65535)); then
        die "--base-port must leave room for the region's ports (1024..$((65534 - 10 * DAEMONS)))"
    fi
}

port_open() {
    (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# HTTP status of GET http://127.0.0.1:$1$2 ("" if no answer).
http_status() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
        IFS=' ' read -r -t 3 _ status _ <&3
        echo "$status"
    ) 2>/dev/null || true
}

dtfed_bin() {
    if [[ -n ${DTFED_BIN:-} ]]; then
        [[ -x $DTFED_BIN ]] || die "DTFED_BIN=$DTFED_BIN is not an executable"
        echo "$DTFED_BIN"
        return
    fi
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    if [[ -n $RELEASE ]]; then
        if [[ ! -x $target/release/dtfed ]]; then
            log "building dtfed (release)"
            (cd "$ROOT" && cargo build --release -p dtfed >&2)
        fi
        echo "$target/release/dtfed"
        return
    fi
    if [[ -x $target/release/dtfed ]]; then
        echo "$target/release/dtfed"
    elif [[ -x $target/debug/dtfed ]]; then
        echo "$target/debug/dtfed"
    else
        log "no dtfed binary yet: cargo build -p dtfed"
        (cd "$ROOT" && cargo build -p dtfed >&2)
        echo "$target/debug/dtfed"
    fi
}

# pid from file $1 if that process is alive and its command line contains $2.
live_pid() {
    local file=$1 needle=$2 pid state
    [[ -f $file ]] || return 1
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
    [[ $state != Z && $state != gone ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle" || return 1
    echo "$pid"
}

write_config() {
    local i=$1 file=$2
    cat >"$file" <<EOF
# Written by deploy/region.sh for region "$NAME", daemon $i. See deploy/examples/region.toml.
region = "$NAME"
node = "$NAME-$i"

[client]
listen = "127.0.0.1:$((BASE + 10 * i))"
max_frame_bytes = 65536
max_connections = 10000
outbound_queue = 1024
publish_rate_per_sec = 50
publish_burst = 100
allowed_origins = []
auth = "none"
jwt_secret = ""
jwt_rooms_claim = "rooms"

[admin]
listen = "127.0.0.1:$((BASE + 10 * i + 1))"
token = "$ADMIN_TOKEN"

[kafka]
brokers = "127.0.0.1:$BASE"
local_topic = "dtfed.local"
partitions = 8
replication_factor = 1
publish_timeout_ms = 5000
fanout_group = "dtfed-fanout"
session_timeout_ms = 6000

[redis]
url = "redis://127.0.0.1:$((BASE + 2))"
key_prefix = "dtfed"

[history]
max_messages = 1000
max_age_secs = 86400
EOF
    ((${#PEERS[@]})) || return 0
    local certs=$CERTS p j addrs
    cat >>"$file" <<EOF

[federation]
listen = "127.0.0.1:$((BASE + 10 * i + 2))"
ca_cert = "$certs/ca.crt"
cert = "$certs/$NAME.crt"
key = "$certs/$NAME.key"
EOF
    for p in "${PEERS[@]}"; do
        addrs=""
        for ((j = 1; j <= DAEMONS; j++)); do
            addrs+="${addrs:+, }\"127.0.0.1:$((${p#*:} + 10 * j + 2))\""
        done
        printf '\n[[federation.peers]]\nname = "%s"\naddrs = [%s]\n' "${p%%:*}" "$addrs" >>"$file"
    done
}

# The federation CA and this region's certificate, made once in .dtfed/certs/.
make_certs() {
    ((${#PEERS[@]})) || return 0
    local bin=$1 certs=$CERTS
    mkdir -p "$certs"
    (
        # Regions started side by side must not both make a CA.
        flock 9
        [[ -f $certs/ca.crt ]] || "$bin" certs init --dir "$certs" >&2
        [[ -f $certs/$NAME.crt ]] || "$bin" certs issue --dir "$certs" --region "$NAME" >&2
    ) 9>"$certs/.lock"
}

start_daemon() {
    local i=$1 bin=$2 d=$DIR/dtfed-$1 pid client admin
    client=$((BASE + 10 * i))
    admin=$((BASE + 10 * i + 1))
    mkdir -p "$d"
    if pid=$(live_pid "$d/dtfed.pid" "$d/dtfed.toml"); then
        log "dtfed $NAME-$i already running (pid $pid)"
        return 0
    fi
    port_open "$client" && die "port $client (dtfed $NAME-$i client) is already in use"
    port_open "$admin" && die "port $admin (dtfed $NAME-$i admin) is already in use"
    write_config "$i" "$d/dtfed.toml"
    "$bin" check-config "$d/dtfed.toml" >/dev/null || die "dtfed rejected $d/dtfed.toml (see above)"
    NO_COLOR=1 nohup "$bin" run --config "$d/dtfed.toml" >>"$d/dtfed.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$d/dtfed.pid"
    local deadline=$((SECONDS + 60))
    until [[ $(http_status "$admin" /readyz) == 200 ]]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$d/dtfed.log" >&2 || true
            rm -f "$d/dtfed.pid"
            die "dtfed $NAME-$i exited during start-up (log above: $d/dtfed.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$d/dtfed.log" >&2 || true
            die "dtfed $NAME-$i (pid $pid) not ready within 60 s: /readyz on 127.0.0.1:$admin is '$(http_status "$admin" /readyz)'"
        fi
        sleep 0.2
    done
    log "dtfed $NAME-$i ready (pid $pid)"
}

stop_pid() { # pidfile needle what
    local file=$1 needle=$2 what=$3 pid
    if ! pid=$(live_pid "$file" "$needle"); then
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while live_pid "$file" "$needle" >/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$what (pid $pid) still running ${STOP_TIMEOUT}s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$file"
    log "stopped $what (pid $pid)"
}

do_start() {
    need_base
    mkdir -p "$DIR"
    echo "$BASE $DAEMONS" >"$DIR/ports"
    # What `topology` prints as this region's start command.
    printf '%q ' --name "$NAME" --base-port "$BASE" --daemons "$DAEMONS" >"$DIR/start-args"
    [[ -z $RELEASE ]] || printf '%q ' --release >>"$DIR/start-args"
    local p
    for p in "${PEERS[@]+"${PEERS[@]}"}"; do printf '%q ' --peer "$p" >>"$DIR/start-args"; done
    [[ -z $ADMIN_TOKEN ]] || printf '%q ' --admin-token "$ADMIN_TOKEN" >>"$DIR/start-args"
    ((${#PEERS[@]} == 0)) || printf '%q ' --certs "$CERTS" >>"$DIR/start-args"
    local bin
    bin=$(dtfed_bin)
    [[ -x $bin ]] || die "no dtfed binary at $bin"
    make_certs "$bin"
    bash "$DEPLOY/redis.sh" start --port "$((BASE + 2))" --dir "$DIR/redis"
    bash "$DEPLOY/kafka.sh" start --port "$BASE" --controller-port "$((BASE + 1))" --dir "$DIR/kafka" \
        --profile "${DTFED_KAFKA_PROFILE:-production}"
    local i
    for ((i = 1; i <= DAEMONS; i++)); do
        start_daemon "$i" "$bin"
    done
    echo
    echo "region $NAME is up ($DIR):"
    echo "  Kafka  127.0.0.1:$BASE    Redis redis://127.0.0.1:$((BASE + 2))"
    local client page
    for ((i = 1; i <= DAEMONS; i++)); do
        client=$((BASE + 10 * i))
        page="chat page http://127.0.0.1:$client/"
        [[ $(http_status "$client" /) == 200 ]] || page="(no chat page from 'dtfed run': 'dtfed demo' has one)"
        echo "  $NAME-$i  ws ws://127.0.0.1:$client/ws?name=<you>   $page"
        echo "           admin http://127.0.0.1:$((client + 1))/status  /metrics  /readyz"
    done
    echo "  logs: $DIR/*/ (dtfed.log, kafka/server.log, redis/redis.log)"
    echo "  stop: deploy/region.sh stop --name $NAME"
}

do_stop() {
    [[ -d $DIR ]] || {
        log "no region '$NAME' in $DIR"
        return 0
    }
    local d
    for d in "$DIR"/dtfed-*; do
        [[ -d $d ]] || continue
        stop_pid "$d/dtfed.pid" "$d/dtfed.toml" "dtfed $(basename "$d")"
    done
    [[ -d $DIR/kafka ]] && bash "$DEPLOY/kafka.sh" stop --dir "$DIR/kafka"
    [[ -d $DIR/redis ]] && bash "$DEPLOY/redis.sh" stop --dir "$DIR/redis"
    log "region $NAME stopped"
}

do_status() {
    [[ -d $DIR ]] || die "no region '$NAME' in $DIR"
    local pid d
    if pid=$(live_pid "$DIR/kafka/kafka.pid" "$DIR/kafka"); then echo "kafka   running pid $pid"; else echo "kafka   stopped"; fi
    if pid=$(live_pid "$DIR/redis/redis.pid" redis); then echo "redis   running pid $pid"; else echo "redis   stopped"; fi
    for d in "$DIR"/dtfed-*; do
        [[ -d $d ]] || continue
        if pid=$(live_pid "$d/dtfed.pid" "$d/dtfed.toml"); then
            echo "$(basename "$d") running pid $pid  $(grep -E '^listen' "$d/dtfed.toml" | tr '\n' ' ')"
        else
            echo "$(basename "$d") stopped"
        fi
    done
}

do_topology() {
    (($#)) || die "topology needs the names of the regions"
    local name dir base daemons i ws admin token
    echo "# Written by deploy/region.sh topology $*, for dtfed drill --topology."
    for name in "$@"; do
        dir=$ROOT/.dtfed/$name
        [[ -f $dir/ports && -f $dir/start-args ]] || die "no region '$name' started in $dir"
        read -r base daemons <"$dir/ports"
        ws=""
        admin=""
        for ((i = 1; i <= daemons; i++)); do
            ws+="${ws:+, }\"ws://127.0.0.1:$((base + 10 * i))/ws\""
            admin+="${admin:+, }\"http://127.0.0.1:$((base + 10 * i + 1))\""
        done
        token=$(sed -n 's/^token = "\(.*\)"$/\1/p' "$dir/dtfed-1/dtfed.toml" | head -n 1)
        printf '\n[[region]]\nname = "%s"\nws = [%s]\nadmin = [%s]\nadmin_token = "%s"\n' \
            "$name" "$ws" "$admin" "$token"
        printf 'stop = "%s stop --name %s"\n' "$DEPLOY/region.sh" "$name"
        printf 'start = "%s start %s"\n' "$DEPLOY/region.sh" "$(cat "$dir/start-args")"
        # shellcheck disable=SC2016 # the drill runs it: $(...) expands then
        printf 'kill = "kill -9 $(cat %s)"\n' "$dir/dtfed-1/dtfed.pid"
    done
}

cmd=${1:-}
[[ -n $cmd ]] || usage 2
shift
case $cmd in
-h | --help | help) usage 0 ;;
start) parse_args "$@"; do_start ;;
stop) parse_args "$@"; do_stop ;;
status) parse_args "$@"; do_status ;;
clean) parse_args "$@"; do_stop; rm -rf "$DIR"; log "removed $DIR" ;;
topology) do_topology "$@" ;;
*) die "unknown command '$cmd' (start|stop|status|clean|topology)" ;;
esac
