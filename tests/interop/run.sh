#!/usr/bin/env bash
# The interop tests: every third-party peer against our code, in one run.
#
#   bash tests/interop/run.sh [--only PEER]...   (PEER, repeatable or comma-separated:
#       python-node   run_interop.py: PyPI and npm clients, reference agents, browser UI
#       collector supervisor our-supervisor opampgo-client opampgo-server java   peers.py)
#
# Installs the pinned peers first (install.sh: cached, a second run builds nothing), builds
# examples/server and examples/agent, then prints one line per check,
#   PASS peer=NAME transport=ws|http check=...   or   FAIL peer=NAME ... check=...: reason,
# and closes with `interop: N passed, M failed` over all peers. Fails, never skips: exit 1 if
# any check failed or none ran. Every peer runs on loopback with free ports, is stopped by its
# PID, and each part is bounded in time (timeout below).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

all=(python-node collector supervisor our-supervisor opampgo-client opampgo-server java)
only=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only) [[ $# -ge 2 ]] || { echo "run.sh: --only needs a peer" >&2; exit 2; }
                IFS=, read -ra more <<<"$2"; only+=("${more[@]}"); shift 2 ;;
        --only=*) IFS=, read -ra more <<<"${1#--only=}"; only+=("${more[@]}"); shift ;;
        *) echo "usage: run.sh [--only PEER]... (peers: ${all[*]})" >&2; exit 2 ;;
    esac
done
[[ ${#only[@]} -gt 0 ]] || only=("${all[@]}")
go_peers=()
run_pynode=0
for p in "${only[@]}"; do
    case " ${all[*]} " in *" $p "*) ;; *) echo "run.sh: unknown peer '$p' (peers: ${all[*]})" >&2; exit 2 ;; esac
    if [[ $p == python-node ]]; then run_pynode=1; else go_peers+=("$p"); fi
done

out="${OPAMP_INTEROP_TARGET:-$repo/target/interop}"
log="$(mktemp -d "${TMPDIR:-/tmp}/opamp-interop-run.XXXXXX")"
trap 'rm -rf "$log"' EXIT
failed_setup=0

echo "== interop: installing the pinned peers (cached under $out and .cache/interop)"
install_args=()
[[ ${#go_peers[@]} -eq 0 ]] && install_args=(--no-go-java)
[[ $run_pynode == 0 ]] && install_args=(--only-go-java)
t0=$SECONDS
if ! timeout 2400 bash "$here/install.sh" "${install_args[@]}"; then
    echo "FAIL peer=all transport=ws,http check=install: tests/interop/install.sh failed"
    failed_setup=1
fi
echo "  (install took $((SECONDS - t0)) s)"

echo "== interop: building the reference server and agent"
if ! cargo build --locked -p opamp-reference-server -p opamp-reference-agent \
    || ! cargo build --locked -p opamp-supervisor-program --bin opamp-supervisor; then
    echo "FAIL peer=all transport=ws,http check=build: cargo build of the examples failed"
    failed_setup=1
fi
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"

if [[ $failed_setup == 0 && $run_pynode == 1 ]]; then
    echo "== interop: Python, Node, reference agents, browser UI (run_interop.py)"
    timeout 900 python3 "$here/run_interop.py" --server "$bin/opamp-reference-server" --agent "$bin/opamp-reference-agent" \
        | tee "$log/pynode.out" || true
fi
if [[ $failed_setup == 0 && ${#go_peers[@]} -gt 0 ]]; then
    echo "== interop: ${go_peers[*]} (peers.py)"
    onlies=()
    for p in "${go_peers[@]}"; do onlies+=(--only "$p"); done
    timeout 1500 python3 "$here/peers.py" --server "$bin/opamp-reference-server" --agent "$bin/opamp-reference-agent" \
        --supervisor "${CARGO_TARGET_DIR:-$repo/target}/debug/opamp-supervisor" \
        --bin "$out/bin" --java-cp "$out/java/classpath.txt" \
        --collector-version "$(sed -n 's/^const version = "\(.*\)"/\1/p' "$here/collector/main.go")" \
        "${onlies[@]}" | tee "$log/peers.out" || true
fi

# A part that was cut short by its timeout (or crashed) has fewer lines, not fewer failures:
# each part must also have ended on its own, which `check` lines alone cannot show.
cat "$log"/*.out 2>/dev/null >"$log/all" || true
passed=$(grep -c '^PASS ' "$log/all" || true)
failed=$(grep -c '^FAIL ' "$log/all" || true)
if [[ $run_pynode == 1 && $failed_setup == 0 ]] && ! grep -q 'run_interop.py: ' "$log/pynode.out"; then
    echo "FAIL peer=python-node transport=ws,http check=run_interop.py finished: it was cut short"
    failed=$((failed + 1))
fi
if [[ ${#go_peers[@]} -gt 0 && $failed_setup == 0 ]] && ! grep -q 'peers.py: ' "$log/peers.out"; then
    echo "FAIL peer=${go_peers[*]} transport=ws,http check=peers.py finished: it was cut short"
    failed=$((failed + 1))
fi
failed=$((failed + failed_setup))
echo "interop: $passed passed, $failed failed"
[[ $failed == 0 && $passed -gt 0 ]]
