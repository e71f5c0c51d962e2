#!/usr/bin/env bash
# Fleet benchmark: builds in release, starts the reference server with its soft file limit
# raised to the hard one, runs the load generator against it, and stops the server.
# Everything is on loopback and every phase is bounded; the run stops by itself.
#
#   benches/fleet.sh --agents 10000 --procs 2          # all phases
#   benches/fleet.sh --agents 19900 --procs 2 --phases connect,hold
#   benches/fleet.sh --agents 10000 --procs 2 --transport http   # plain-HTTP polling agents
#
# Flags go to the generator (`fleet --help`). Environment: CARGO_TARGET_DIR (default target),
# OPAMP_PORT (14320) and UI_PORT (14321), SERVER_LOG (RUST_LOG of the server, default warn),
# SERVER_LOG_FILE (default /tmp/opamp-fleet-server.log).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
OPAMP_PORT="${OPAMP_PORT:-14320}"
UI_PORT="${UI_PORT:-14321}"
LOG="${SERVER_LOG_FILE:-/tmp/opamp-fleet-server.log}"

cargo build --release -p opamp --example fleet
cargo build --release -p opamp-reference-server
bin="$CARGO_TARGET_DIR/release/examples"
server_bin="$CARGO_TARGET_DIR/release/opamp-reference-server"
# A new database per run (the server's store attached, as operators run it).
db_dir=$(mktemp -d)

ulimit -n "$(ulimit -Hn)"
echo "fleet.sh: file limit soft $(ulimit -Sn) hard $(ulimit -Hn); $(nproc) cores; $(uptime)"
RUST_LOG="${SERVER_LOG:-warn}" "$server_bin" \
    --opamp-addr "127.0.0.1:$OPAMP_PORT" --ui-addr "127.0.0.1:$UI_PORT" \
    --database "${FLEET_DATABASE:-sqlite://$db_dir/opamp-server.db}" >"$LOG" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$db_dir"' EXIT

for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$UI_PORT") 2>/dev/null; then break; fi
    sleep 0.1
done

"$bin/fleet" --url "ws://127.0.0.1:$OPAMP_PORT/v1/opamp" --api "http://127.0.0.1:$UI_PORT" \
    --server-pid "$server" "$@"
echo "fleet.sh: server log (last lines of $LOG):"
tail -n 5 "$LOG" || true
