#!/usr/bin/env bash
# Checks both interop agent scripts end to end against tools/mock_server.py
# (no Rust server involved): each of COUNT agents connects, reports its
# description, gets a pushed config and reports APPLIED with its hash, then gets
# a config containing INVALID and reports FAILED with the expected message; the
# agents are then stopped with SIGTERM and must exit 0.
# Usage: tests/interop/tools/selftest.sh [py|node|both] (after install.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${OPAMP_INTEROP_CACHE:-$repo/.cache/interop}"
py="$cache/venv/bin/python"
count="${COUNT:-3}"
[[ -x "$py" ]] || { echo "selftest: $py missing: run tests/interop/install.sh" >&2; exit 1; }
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

run_one() {
    local kind="$1" log="$work/$1"
    "$py" "$here/tools/mock_server.py" --brief --port 0 --port-file "$log.port" \
        --push '{"level":"debug"}' --push '{"level":"INVALID"}' \
        --expect-agents "$count" --timeout 30 --linger 2 >"$log.mock.out" 2>"$log.mock.err" &
    local mock=$!; pids+=("$mock")
    for _ in $(seq 100); do [[ -s "$log.port" ]] && break; sleep 0.1; done
    [[ -s "$log.port" ]] || { echo "selftest: mock server did not start" >&2; cat "$log.mock.err" >&2; return 1; }
    local url="http://127.0.0.1:$(cat "$log.port")/v1/opamp"
    if [[ "$kind" == py ]]; then
        "$py" "$here/python_agent.py" --endpoint "$url" --count "$count" --name-prefix py-agent 2>"$log.agent.err" &
    else
        node "$here/node_agent.mjs" --endpoint "$url" --count "$count" --name-prefix node-agent 2>"$log.agent.err" &
    fi
    local agent=$!; pids+=("$agent")
    # Wait for the mock to see every expectation met (or time out), then stop the agents while it lingers.
    for _ in $(seq 320); do
        grep -q -e "expectations met" -e TIMEOUT "$log.mock.err" && break
        kill -0 "$agent" 2>/dev/null || break
        sleep 0.1
    done
    local arc=0 mrc=0
    if kill -0 "$agent" 2>/dev/null; then kill -TERM "$agent"; fi
    wait "$agent" || arc=$?
    wait "$mock" || mrc=$?
    cat "$log.mock.out"
    cat "$log.mock.err" "$log.agent.err" >&2
    if [[ $mrc -ne 0 || $arc -ne 0 ]]; then
        echo "selftest: $kind FAILED (mock rc=$mrc, agent rc=$arc)" >&2
        return 1
    fi
    echo "selftest: $kind passed" >&2
}

what="${1:-both}"
passed=0 failed=0
for kind in py node; do
    [[ "$what" == both || "$what" == "$kind" ]] || continue
    if run_one "$kind"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
