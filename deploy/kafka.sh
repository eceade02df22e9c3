#!/usr/bin/env bash
# deploy/kafka.sh — a real, single-node Apache Kafka (KRaft) for local regions and tests.
#
# Kafka comes from Maven Central (org.apache.kafka:kafka_2.13 + kafka-tools and their
# runtime dependencies, plus a log4j2 backend), so no tarball download is needed.
#
#   deploy/kafka.sh fetch
#       Resolve the jars into $DTFED_CACHE/kafka-<ver>/lib (default cache ~/.cache/dtfed).
#       Idempotent: a marker file records a completed fetch; a second run is instant.
#   deploy/kafka.sh run   --port P [--controller-port C] --dir D [--profile test|production]
#                         [--heap SIZE] [--node-id N --voters V --cluster-id ID]
#       Fetch if needed, write D/server.properties, format D/data once (never again: a
#       restart with the same dir keeps the data), then exec the broker in the foreground
#       (the caller's PID is the broker's JVM). Logs go to D/server.log; the profile and
#       the JVM flags used are written to D/profile.
#
#       --profile (default $DTFED_KAFKA_PROFILE, else test) says how the JVM runs:
#       test        fast start for tests: C1 JIT only, Serial GC, 256 MB heap, log cleaner
#                   dedupe buffer 16 MB. Cheap on a small machine, but young-GC pauses of
#                   a few ms every fraction of a second under load: never benchmark on it.
#       production  how a broker serving players runs: C2 JIT, G1 with a 5 ms pause goal
#                   and a fixed young generation (3/8 of the heap), 1 GB heap pre-touched,
#                   explicit GC off, Kafka's default cleaner buffer.
#                   Benchmarks and deploy/region.sh use it (docs/BENCHMARKS.md).
#       --heap overrides the profile's heap size.
#   deploy/kafka.sh start ...same args as run...
#       run in the background (nohup), PID in D/kafka.pid; wait until the broker has logged
#       "Kafka Server started" and its port accepts TCP (timeout $DTFED_KAFKA_START_TIMEOUT,
#       default 90 s). Already running for that dir: says so, exits 0.
#   deploy/kafka.sh stop --dir D
#       SIGTERM the PID in D/kafka.pid, wait up to 20 s, then SIGKILL. Touches nothing else.
#   deploy/kafka.sh classpath
#       Print the classpath (for ad-hoc tools, e.g.
#       java -cp "$(deploy/kafka.sh classpath)" org.apache.kafka.tools.TopicCommand ...).
#
# The controller port defaults to P+1. Everything listens on 127.0.0.1 only.
#
# A cluster of several nodes (each broker+controller): start every node with its own
# --port, --controller-port, --dir and --node-id, and the same --voters
# (`1@127.0.0.1:C1,2@127.0.0.1:C2,3@127.0.0.1:C3`) and --cluster-id (22 characters of
# URL-safe base64). With three voters or more, internal topics and new topics get
# replication factor 3 and min.insync.replicas 2; a node is ready once a quorum is up.
set -euo pipefail

KAFKA_VERSION=4.3.1
LOG4J_VERSION=2.25.4 # the log4j version kafka-server 4.3.1 depends on
SLF4J_VERSION=1.7.36 # the slf4j-api version Kafka 4.3.1 is built against
DEP_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
CACHE_ROOT=${DTFED_CACHE:-$HOME/.cache/dtfed}
KAFKA_HOME=$CACHE_ROOT/kafka-$KAFKA_VERSION
LIB=$KAFKA_HOME/lib
MARKER=$KAFKA_HOME/fetch.complete
START_TIMEOUT=${DTFED_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=20
READY_LINE='Kafka Server started'

die() {
    echo "kafka.sh: error: $*" >&2
    exit 1
}
log() { echo "kafka.sh: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

# ---------------------------------------------------------------- fetch

write_pom() {
    cat >"$1/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dtfed.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <!-- kafka-topics, console consumer/producer, ... The Connect runtime (Jetty,
           Jersey) is only needed by the connect-plugin-path tool: left out. -->
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
      <exclusions>
        <exclusion><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId></exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <!-- slf4j 1.x binding (Kafka logs through slf4j-api 1.7) -->
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

write_log4j_config() {
    # kafka.logs.dir is set per broker (-Dkafka.logs.dir=D), so one file serves all.
    cat >"$1" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN" shutdownHook="disable">
  <Appenders>
    <File name="server" fileName="${sys:kafka.logs.dir}/server.log" append="true" immediateFlush="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.metrics" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
    <Logger name="kafka.server.KafkaConfig" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
  </Loggers>
</Configuration>
EOF
}

fetched() {
    local jsa
    jsa=$(cds_archive)
    [[ -f $MARKER && -d $LIB && (-f $jsa || -f $jsa.failed) ]]
}

do_fetch() {
    command -v java >/dev/null || die "java not found: install a JDK 17 (apt-get install -y openjdk-17-jdk-headless)"
    fetched && return 0
    mkdir -p "$KAFKA_HOME"
    # Several tests or scripts may fetch at once: one fetch, the others wait for it.
    exec 9>"$KAFKA_HOME/.fetch.lock"
    flock 9
    if fetched; then
        exec 9>&-
        return 0
    fi
    if [[ -f $MARKER && -d $LIB ]]; then
        # Jars there, but no archive for this JVM (it was upgraded): just make one.
        make_cds_archive
        exec 9>&-
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install -y maven)"
    log "fetching Kafka $KAFKA_VERSION and its runtime dependencies from Maven Central into $LIB"
    local t0 work
    t0=$(date +%s)
    work=$(mktemp -d "$KAFKA_HOME/.fetch.XXXXXX")
    write_pom "$work"
    if ! (cd "$work" && mvn -B -q -f pom.xml "$DEP_PLUGIN:copy-dependencies" \
        -DoutputDirectory="$work/lib" -DincludeScope=runtime >"$work/mvn.log" 2>&1); then
        tail -n 40 "$work/mvn.log" >&2 || true
        rm -rf "$work"
        die "Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log above)"
    fi
    [[ -f $work/lib/kafka_2.13-$KAFKA_VERSION.jar ]] || die "Maven ran but kafka_2.13-$KAFKA_VERSION.jar is missing in $work/lib"
    write_log4j_config "$work/lib/log4j2.xml"
    rm -rf "$LIB" "$KAFKA_HOME"/kafka-cds-*.jsa*
    mv "$work/lib" "$LIB"
    rm -rf "$work"
    log "fetched $(find "$LIB" -name '*.jar' | wc -l) jars in $(($(date +%s) - t0)) s"
    make_cds_archive
    ls "$LIB" >"$MARKER"
    exec 9>&-
}

classpath() {
    # Jars only, in a fixed order: the class-data-sharing archive is only used when the
    # classpath is the one it was dumped with (and CDS refuses directories on it).
    local cp="" jar
    for jar in "$LIB"/*.jar; do
        cp+=${cp:+:}$jar
    done
    printf '%s' "$cp"
}

# A dynamic AppCDS archive of the classes a broker loads while starting: cuts the broker
# start from ~2.1 s to ~1.3 s here. It is made once, at fetch, by starting a throwaway
# broker; it is named after the JVM, so a JVM upgrade makes a new one. Best effort: if it
# cannot be made, brokers start without it.
cds_archive() {
    local java_bin
    java_bin=$(readlink -f "$(command -v java)")
    printf '%s/kafka-cds-%s.jsa' "$KAFKA_HOME" "$(stat -c '%s-%Y' "$java_bin")"
}

free_port_pair() {
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((20000 + RANDOM % 40000))
        if ! port_open "$p" && ! port_open "$((p + 1))"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

make_cds_archive() {
    local jsa work port pid i
    jsa=$(cds_archive)
    [[ -f $jsa || -f $jsa.failed ]] && return 0
    work=$(mktemp -d "$KAFKA_HOME/.cds.XXXXXX")
    port=$(free_port_pair) || {
        rm -rf "$work"
        return 0
    }
    log "making the class-data-sharing archive (one-off, ~10 s): $jsa"
    DTFED_KAFKA_CDS_DUMP="$jsa.tmp" bash "$0" run --port "$port" --dir "$work" >"$work/run.out" 2>&1 9>&- &
    pid=$!
    for ((i = 0; i < 600; i++)); do
        grep -qsF "$READY_LINE" "$work/server.log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [[ -s $jsa.tmp ]] && grep -qsF "$READY_LINE" "$work/server.log"; then
        mv "$jsa.tmp" "$jsa"
    else
        log "warning: could not make the CDS archive (brokers will start without it); see $jsa.failed"
        cat "$work/run.out" >"$jsa.failed" 2>/dev/null || true
        rm -f "$jsa.tmp"
    fi
    rm -rf "$work"
}

# ---------------------------------------------------------------- run / start / stop

PORT=""
CPORT=""
DIR=""
HEAP=""
PROFILE=${DTFED_KAFKA_PROFILE:-test}
NODE_ID=1
VOTERS=""
CLUSTER_ID=""

parse_args() {
    while (($#)); do
        case $1 in
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --controller-port) CPORT=${2:?--controller-port needs a value}; shift 2 ;;
        --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        --heap) HEAP=${2:?--heap needs a value}; shift 2 ;;
        --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
        --node-id) NODE_ID=${2:?--node-id needs a value}; shift 2 ;;
        --voters) VOTERS=${2:?--voters needs a value}; shift 2 ;;
        --cluster-id) CLUSTER_ID=${2:?--cluster-id needs a value}; shift 2 ;;
        -h | --help) usage 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
        esac
    done
}

need_port_dir() {
    [[ -n $PORT ]] || die "--port is required"
    [[ -n $DIR ]] || die "--dir is required"
    [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
    [[ -n $CPORT ]] || CPORT=$((PORT + 1))
    case $PROFILE in
    test) [[ -n $HEAP ]] || HEAP=256m ;;
    production) [[ -n $HEAP ]] || HEAP=1g ;;
    *) die "--profile must be test or production, got '$PROFILE'" ;;
    esac
    [[ $CPORT =~ ^[0-9]+$ ]] || die "--controller-port must be a number, got '$CPORT'"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
}

need_dir() {
    [[ -n $DIR ]] || die "--dir is required"
    [[ -d $DIR ]] || die "no such directory: $DIR"
    DIR=$(cd "$DIR" && pwd)
}

write_properties() {
    [[ $NODE_ID =~ ^[0-9]+$ ]] || die "--node-id must be a number, got '$NODE_ID'"
    [[ -n $VOTERS ]] || VOTERS="$NODE_ID@127.0.0.1:$CPORT"
    local voters rf=1 min_isr=1
    voters=$(tr ',' '\n' <<<"$VOTERS" | grep -c .)
    if ((voters >= 3)); then
        rf=3
        min_isr=2
    fi
    cat >"$DIR/server.properties" <<EOF
# Written by deploy/kafka.sh: KRaft broker+controller on loopback (node $NODE_ID of $voters).
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DIR/data
num.partitions=1
auto.create.topics.enable=false
default.replication.factor=$rf
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr
group.initial.rebalance.delay.ms=0
# After a crash (SIGKILL) the restarted broker must wait for its old registration's
# session to expire before it can register again: 9 s by default, 2 s here.
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
# classic group protocol: let clients ask for short sessions (fast owner hand-over)
group.min.session.timeout.ms=1000
# KIP-848 consumer group protocol: sessions and heartbeats are set by the broker
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
# small machine
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
    if [[ $PROFILE == test ]]; then
        # The cleaner (it compacts __consumer_offsets) takes a 128 MB dedupe buffer by
        # default: half of the test heap. 16 MB is plenty for test-sized topics.
        echo "log.cleaner.dedupe.buffer.size=16777216" >>"$DIR/server.properties"
    fi
}

random_cluster_id() {
    # A Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 chars). Like
    # Kafka's own Uuid.randomUuid, never one starting with '-' (a command-line option).
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        [[ $id == -* ]] || break
    done
    printf '%s' "$id"
}

# A JVM size (512m, 1g, 1024M) in MB; nothing if it is not one.
heap_mb() {
    local v=${1,,}
    case $v in
    *g) [[ ${v%g} =~ ^[0-9]+$ ]] && echo $((${v%g} * 1024)) ;;
    *m) [[ ${v%m} =~ ^[0-9]+$ ]] && echo "${v%m}" ;;
    esac
    return 0
}

# The JVM flags of the profile (see the header), into JVM_PROFILE_OPTS. Tools (the storage
# formatter) always run with the test flags: they start, work a second and exit.
profile_opts() { # main class
    case $PROFILE:$1 in
    production:kafka.Kafka)
        JVM_PROFILE_OPTS=("-Xms$HEAP" "-Xmx$HEAP" -XX:+AlwaysPreTouch -XX:+UseG1GC
            -XX:MaxGCPauseMillis=5 -XX:InitiatingHeapOccupancyPercent=35
            -XX:+DisableExplicitGC)
        # A fixed young generation, 3/8 of the heap. Left to itself, G1 shrinks eden to
        # ~50 MB to chase the 5 ms goal and then collects about once a second under chat
        # load, each pause ~10 ms on a busy 2-core host: ~1 % of publishes waited for one,
        # which was the ack's p99. With 384 MB it collects ~7x less often (measured,
        # docs/BENCHMARKS.md: 5,000 msg/s delivery p99 77 -> 16 ms in paired runs).
        local mb
        mb=$(heap_mb "$HEAP")
        [[ -n $mb ]] && JVM_PROFILE_OPTS+=("-Xmn$((mb * 3 / 8))m")
        ;;
    *) JVM_PROFILE_OPTS=(-Xms128m "-Xmx${HEAP:-256m}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1) ;;
    esac
}

java_cmd() {
    # $1 = main class; rest = args. The profile's flags (see the header), class data
    # sharing, then $DTFED_KAFKA_JVM_OPTS, appended so that it overrides the profile.
    local main=$1 jsa cds=()
    shift
    jsa=$(cds_archive)
    if [[ -n ${DTFED_KAFKA_CDS_DUMP:-} && $main == kafka.Kafka ]]; then
        cds=("-XX:ArchiveClassesAtExit=$DTFED_KAFKA_CDS_DUMP" -Xlog:cds=off -Xlog:cds+dynamic=off)
    elif [[ -f $jsa ]]; then
        cds=("-XX:SharedArchiveFile=$jsa")
    fi
    local extra=()
    # Only the broker takes them: a collector chosen there would clash with the tools' own.
    [[ $main == kafka.Kafka ]] && read -r -a extra <<<"${DTFED_KAFKA_JVM_OPTS:-}"
    profile_opts "$main"
    JAVA_CMD=(java "${JVM_PROFILE_OPTS[@]}" -Xshare:auto
        "${cds[@]}" -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
        -Dkafka.logs.dir="$DIR" -Dlog4j2.configurationFile="$LIB/log4j2.xml"
        "${extra[@]}" -cp "$(classpath)" "$main" "$@")
}

do_run() {
    need_port_dir
    [[ -n ${DTFED_KAFKA_CDS_DUMP:-} ]] || do_fetch
    command -v java >/dev/null || die "java not found: install a JDK 17"
    write_properties
    if [[ ! -f $DIR/data/meta.properties ]]; then
        local id
        id=${CLUSTER_ID:-$(random_cluster_id)}
        log "formatting $DIR/data (cluster id $id)"
        java_cmd kafka.tools.StorageTool format -t "$id" -c "$DIR/server.properties" --ignore-formatted
        if ! "${JAVA_CMD[@]}" >"$DIR/format.log" 2>&1; then
            cat "$DIR/format.log" >&2
            die "formatting the storage in $DIR/data failed (log above)"
        fi
    fi
    java_cmd kafka.Kafka "$DIR/server.properties"
    {
        echo "profile=$PROFILE"
        echo "heap=$HEAP"
        echo "jvm_opts=${JVM_PROFILE_OPTS[*]} ${DTFED_KAFKA_JVM_OPTS:-}"
        echo "jvm=$(java -version 2>&1 | head -n 1)"
    } >"$DIR/profile"
    exec "${JAVA_CMD[@]}"
}

# Is PID $1 alive and one of ours for $DIR (not a recycled pid)?
pid_is_ours() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    local state
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
    [[ $state != Z && $state != gone ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR" || return 1
}

port_open() {
    (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

do_start() {
    need_port_dir
    local pidfile=$DIR/kafka.pid
    if [[ -f $pidfile ]] && pid_is_ours "$(cat "$pidfile")"; then
        log "already running for $DIR (pid $(cat "$pidfile"))"
        return 0
    fi
    if port_open "$PORT"; then
        die "port 127.0.0.1:$PORT is already in use by another process"
    fi
    do_fetch
    local t0 offset=0 pid
    t0=$(date +%s%N)
    [[ -f $DIR/server.log ]] && offset=$(stat -c %s "$DIR/server.log")
    nohup bash "$0" run --port "$PORT" --controller-port "$CPORT" --dir "$DIR" --heap "$HEAP" \
        --profile "$PROFILE" --node-id "$NODE_ID" ${VOTERS:+--voters "$VOTERS"} \
        ${CLUSTER_ID:+--cluster-id "$CLUSTER_ID"} \
        >>"$DIR/kafka.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidfile"
    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "broker (pid $pid) exited during start-up; last lines of $DIR/kafka.out and server.log:"
            tail -n 20 "$DIR/kafka.out" >&2 || true
            tail -n 30 "$DIR/server.log" >&2 2>/dev/null || true
            rm -f "$pidfile"
            die "Kafka failed to start on 127.0.0.1:$PORT"
        fi
        if [[ -f $DIR/server.log ]] &&
            tail -c "+$((offset + 1))" "$DIR/server.log" | grep -qF "$READY_LINE" &&
            port_open "$PORT"; then
            break
        fi
        if ((SECONDS >= deadline)); then
            log "broker (pid $pid) not ready after ${START_TIMEOUT}s; last lines of $DIR/server.log:"
            tail -n 30 "$DIR/server.log" >&2 2>/dev/null || true
            tail -n 10 "$DIR/kafka.out" >&2 || true
            die "Kafka did not become ready on 127.0.0.1:$PORT within ${START_TIMEOUT}s (still running as pid $pid; stop it with: $0 stop --dir $DIR)"
        fi
        sleep 0.2
    done
    local ms=$((($(date +%s%N) - t0) / 1000000))
    log "Kafka $KAFKA_VERSION ready on 127.0.0.1:$PORT (controller $CPORT, pid $pid, dir $DIR) in ${ms} ms"
}

do_stop() {
    need_dir
    local pidfile=$DIR/kafka.pid pid
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
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    log "stopped (pid $pid)"
}

cmd=${1:-}
[[ -n $cmd ]] || usage 2
shift
case $cmd in
fetch) do_fetch; log "Kafka $KAFKA_VERSION is in $LIB" ;;
classpath) do_fetch; classpath; echo ;;
run) parse_args "$@"; do_run ;;
start) parse_args "$@"; do_start ;;
stop) parse_args "$@"; do_stop ;;
-h | --help | help) usage 0 ;;
*) die "unknown command '$cmd' (fetch|run|start|stop|classpath)" ;;
esac
