#!/usr/bin/env bash
# Two reference-server nodes on one PostgreSQL: the fleet generator's agents connect to node B,
# configs are pushed through node A's API (`PUT /api/v1/configs/fleet`), and the time until
# every agent's APPLIED is answered is measured across nodes; node B's RSS per agent is
# measured with the store attached. Starts its own PostgreSQL on loopback (Debian's
# postgresql: initdb/postgres; as root it runs them as the postgres user), stops everything
# at the end.
#
#   bash benches/nodes.sh [fleet flags]      (default: --agents 1000 --phases connect,config)
#
# The storm phase is per node (the API given to the generator is node A's, which holds no
# agent): use benches/fleet.sh for it. BENCHMARKS.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release -p opamp --example fleet
cargo build --release -p opamp-reference-server
bin="$CARGO_TARGET_DIR/release"

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -n 1)
[ -x "$pgbin/initdb" ] || pgbin=$(dirname "$(command -v initdb)")
work=$(mktemp -d)
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$work"
    as_pg=(runuser -u postgres --)
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
"${as_pg[@]}" "$pgbin/initdb" -D "$work/data" -U opamp --auth=trust -E UTF8 >/dev/null
"${as_pg[@]}" "$pgbin/postgres" -D "$work/data" -p "$pg_port" -k "$work" -h 127.0.0.1 \
    -c max_connections=100 >"$work/pg.log" 2>&1 &
pg=$!
pids=("$pg")
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
    if "${as_pg[@]}" "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U opamp -d postgres -c 'select 1' >/dev/null 2>&1; then break; fi
    sleep 0.1
done
"${as_pg[@]}" "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U opamp -d postgres -c 'CREATE DATABASE fleet' >/dev/null
db="postgres://opamp@127.0.0.1:$pg_port/fleet"

ulimit -n "$(ulimit -Hn)"
a_opamp=$(free_port); a_ui=$(free_port); b_opamp=$(free_port); b_ui=$(free_port)
RUST_LOG=warn "$bin/opamp-reference-server" --database "$db" --node-id node-a \
    --opamp-addr "127.0.0.1:$a_opamp" --ui-addr "127.0.0.1:$a_ui" >"$work/node-a.log" 2>&1 &
pids+=("$!")
RUST_LOG=warn "$bin/opamp-reference-server" --database "$db" --node-id node-b \
    --opamp-addr "127.0.0.1:$b_opamp" --ui-addr "127.0.0.1:$b_ui" >"$work/node-b.log" 2>&1 &
node_b=$!
pids+=("$node_b")
for port in "$a_ui" "$b_ui"; do
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
done
echo "nodes.sh: PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on :$pg_port; node A :$a_opamp (API :$a_ui), node B :$b_opamp (API :$b_ui); $(nproc) cores"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--agents 1000 --phases connect,config)
"$bin/examples/fleet" --url "ws://127.0.0.1:$b_opamp/v1/opamp" --api "http://127.0.0.1:$a_ui" \
    --server-pid "$node_b" "${args[@]}"
rows=$("${as_pg[@]}" "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U opamp -d fleet -At \
    -c "select node, count(*), sum(connected) from agents group by node")
echo "nodes.sh: agents in the store by node (node|rows|connected): $rows"
