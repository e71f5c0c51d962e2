#!/usr/bin/env bash
# Runs the reference server with agents connected: 3 over WebSocket, 2 over plain HTTP.
# Open http://127.0.0.1:4321/ ; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p opamp-reference-server -p opamp-reference-agent
bin="${CARGO_TARGET_DIR:-target}/release"
state=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$state"' EXIT
# The demo's desired state lives in target/demo.db (kept between runs; delete it to start over).
"$bin/opamp-reference-server" --database "sqlite://${CARGO_TARGET_DIR:-target}/demo.db" "$@" &
sleep 1
"$bin/opamp-reference-agent" --endpoint ws://127.0.0.1:4320/v1/opamp --count 3 --name demo-ws-agent \
    --heartbeat 5 --state-dir "$state/ws" 2>/dev/null &
"$bin/opamp-reference-agent" --endpoint http://127.0.0.1:4320/v1/opamp --count 2 --name demo-http-agent \
    --heartbeat 5 --state-dir "$state/http" 2>/dev/null &
echo "web UI: http://127.0.0.1:4321/  (Ctrl-C to stop)"
wait
