#!/usr/bin/env bash
# Our reference server (with its SQLite store) and a minimal server on opamp-go's server
# library (tests/interop/opampgo/baseline, opamp-go as pinned in tests/interop/opampgo/go.mod)
# under the same load from the fleet generator, one after the other in one run: admission
# (connect time), RSS per idle agent, status messages per second and server CPU per message.
#
#   bash benches/vs-opampgo.sh [--agents N] [--procs K] [--duration SECS]
#                                                   (default 10000 agents, 2 processes, 10 s)
#
# Builds the Go baseline with the interop peers' Go caches (target/interop/go); needs Go and
# the Go module proxy on the first run. BENCHMARKS.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
agents=10000 procs=2 duration=10
while [ $# -gt 0 ]; do
    case "$1" in
        --agents) agents=$2; shift 2 ;;
        --procs) procs=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        *) echo "usage: vs-opampgo.sh [--agents N] [--procs K] [--duration SECS]" >&2; exit 2 ;;
    esac
done
cargo build --release -p opamp --example fleet
cargo build --release -p opamp-reference-server
bin="$CARGO_TARGET_DIR/release"
# shellcheck source=tests/interop/goenv.sh
source tests/interop/goenv.sh

(cd tests/interop/opampgo && go build -trimpath -o "$repo/$CARGO_TARGET_DIR/release/opampgo-baseline" ./baseline)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # name, then the server command; prints the generator's lines
    local name=$1 port=$2; shift 2
    "$@" >"$work/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    "$bin/examples/fleet" --url "ws://127.0.0.1:$port/v1/opamp" --api "http://127.0.0.1:1" \
        --server-pid "$pid" --agents "$agents" --procs "$procs" --duration "$duration" \
        --phases connect,throughput >"$work/$name.fleet" 2>&1 || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "== $name"
    grep -E "connected|RSS per agent|throughput:" "$work/$name.fleet" | sed 's/^fleet: /  /'
}

p=$(free_port); u=$(free_port)
run ours "$p" env RUST_LOG=warn "$bin/opamp-reference-server" --opamp-addr "127.0.0.1:$p" \
    --ui-addr "127.0.0.1:$u" --database "sqlite://$work/ours.db"
p=$(free_port)
run opamp-go "$p" "$bin/opampgo-baseline" --listen "127.0.0.1:$p"
