#!/usr/bin/env bash
# Runs the reference server with agents connected: 3 over WebSocket, 2 over plain HTTP.
# Open http://127.0.0.1:4321/ ; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example server --example agent
bin="${CARGO_TARGET_DIR:-target}/release/examples"
state=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$state"' EXIT
"$bin/server" "$@" &
sleep 1
"$bin/agent" --endpoint ws://127.0.0.1:4320/v1/opamp --count 3 --name demo-ws-agent \
    --heartbeat 5 --state-dir "$state/ws" 2>/dev/null &
"$bin/agent" --endpoint http://127.0.0.1:4320/v1/opamp --count 2 --name demo-http-agent \
    --heartbeat 5 --state-dir "$state/http" 2>/dev/null &
echo "web UI: http://127.0.0.1:4321/  (Ctrl-C to stop)"
wait
