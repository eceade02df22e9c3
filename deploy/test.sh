#!/usr/bin/env bash
# deploy/test.sh — the test command: install what is missing, fetch Kafka, build, test.
#
#   deploy/test.sh                         # everything
#   deploy/test.sh -p dtfed-tests          # extra args go to `cargo test`
#   deploy/test.sh -p dtfed-proto -- room  # ... including test-binary args after --
#   deploy/test.sh --deps-only             # only install / fetch (used by .ci/run)
#
# Installs with apt-get (as root, only what is missing): redis-server, cmake,
# build-essential, a JDK 17, Maven, python3, Node.js with npm, chromium. Then
# `deploy/kafka.sh fetch` (Kafka 4.3.1 from Maven Central, cached in ~/.cache/dtfed),
# `npm ci` in every Node package the tests use (`clients/js`, `tests/node/*`: real client
# libraries and a real browser driven by puppeteer-core, never a downloaded one),
# `cargo build --workspace --all-targets` (the integration tests run the built `dtfed`
# binary), and `cargo test`.
#
# Tests run with --test-threads=${DTFED_TEST_THREADS:-2}: integration tests start real
# Kafka/Redis/dtfed processes and this is a 2-core machine. Runnable again and again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== test.sh: %s\n' "$*" >&2; }
die() {
    echo "test.sh: error: $*" >&2
    exit 1
}

install_missing() {
    local pkgs=()
    command -v redis-server >/dev/null || pkgs+=(redis-server)
    command -v cmake >/dev/null || pkgs+=(cmake)
    { command -v cc >/dev/null && command -v c++ >/dev/null && command -v make >/dev/null; } ||
        pkgs+=(build-essential)
    command -v java >/dev/null || pkgs+=(openjdk-17-jdk-headless)
    command -v mvn >/dev/null || pkgs+=(maven)
    command -v python3 >/dev/null || pkgs+=(python3)
    command -v node >/dev/null || pkgs+=(nodejs)
    command -v npm >/dev/null || pkgs+=(npm)
    command -v chromium >/dev/null || pkgs+=(chromium)
    ((${#pkgs[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        die "missing tools: ${pkgs[*]}; install them with: sudo apt-get install -y ${pkgs[*]}"
    fi
    command -v apt-get >/dev/null || die "missing tools: ${pkgs[*]}, and no apt-get to install them"
    log "installing ${pkgs[*]}"
    # Keep packaged services (redis-server) from starting on their default ports.
    local made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    } || rc=$?
    [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${pkgs[*]} failed (exit $rc)"
}

# `npm ci` where a package-lock.json is, unless node_modules already matches it.
install_node_packages() {
    local lock dir
    for lock in clients/js/package-lock.json tests/node/*/package-lock.json; do
        [[ -f $lock ]] || continue
        dir=$(dirname "$lock")
        if [[ -f $dir/node_modules/.package-lock.json && $dir/node_modules/.package-lock.json -nt $lock ]]; then
            continue
        fi
        log "npm ci in $dir"
        (cd "$dir" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) ||
            die "npm ci in $dir failed"
    done
}

t0=$SECONDS
deps_only=""
args=()
for a in "$@"; do
    if [[ $a == --deps-only ]]; then deps_only=1; else args+=("$a"); fi
done

install_missing
log "Kafka: deploy/kafka.sh fetch"
bash deploy/kafka.sh fetch
install_node_packages
[[ -n $deps_only ]] && exit 0

# Split our args: cargo's, then the test binaries' (after --).
cargo_args=()
bin_args=()
seen_dashes=""
for a in "${args[@]+"${args[@]}"}"; do
    if [[ -z $seen_dashes && $a == -- ]]; then
        seen_dashes=1
    elif [[ -n $seen_dashes ]]; then
        bin_args+=("$a")
    else
        cargo_args+=("$a")
    fi
done
scope=(--workspace)
for a in "${cargo_args[@]+"${cargo_args[@]}"}"; do
    case $a in -p | --package | -p* | --package=*) scope=() ;; esac
done
threads=(--test-threads="${DTFED_TEST_THREADS:-2}")
for a in "${bin_args[@]+"${bin_args[@]}"}"; do
    case $a in --test-threads*) threads=() ;; esac
done

export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
log "build: cargo build --workspace --all-targets"
cargo build --workspace --all-targets
# --no-fail-fast: every test binary runs, so one run shows every failure.
log "test: cargo test --no-fail-fast ${scope[*]+"${scope[*]}"} ${cargo_args[*]+"${cargo_args[*]}"} -- ${threads[*]+"${threads[*]}"} ${bin_args[*]+"${bin_args[*]}"}"
cargo test --no-fail-fast "${scope[@]+"${scope[@]}"}" "${cargo_args[@]+"${cargo_args[@]}"}" -- \
    "${threads[@]+"${threads[@]}"}" "${bin_args[@]+"${bin_args[@]}"}"
log "done in $((SECONDS - t0)) s"
