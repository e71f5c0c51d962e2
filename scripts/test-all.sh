#!/usr/bin/env bash
# Runs every check and test of the workspace: what CI runs, and what a contributor runs.
# Needs Go, Java 17 with Maven, Python, Node and Chromium for the interop peers
# (tests/interop/run.sh installs and builds the pinned peers; .ci/run installs Chromium and
# Maven on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."

# A machine without rustfmt or clippy says so and runs the rest.
if cargo fmt --version >/dev/null 2>&1; then
    echo "== fmt";     cargo fmt --all -- --check
else
    echo "== fmt: rustfmt is not installed on this machine; skipped"
fi
if cargo clippy --version >/dev/null 2>&1; then
    echo "== clippy";  cargo clippy --workspace --all-targets --locked -- -D warnings
else
    echo "== clippy: clippy is not installed on this machine; skipped"
fi
echo "== doc";     RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== facade without default features"
cargo check -p opamp --no-default-features --locked

echo "== feature combinations and what they keep out of the build"
bash scripts/check-features.sh
echo "== tests";   cargo test --workspace --locked

echo "== MSRV"
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
msrv_toolchain=$(rustup toolchain list 2>/dev/null | awk '{print $1}' | grep -E "^${msrv//./\\.}(\.0)?-" | head -n 1 || true)
if [ -n "$msrv_toolchain" ]; then
    cargo "+$msrv_toolchain" check --workspace --all-targets --locked
else
    echo "MSRV: Rust toolchain $msrv is not installed; checking only that no dependency needs a newer Rust"
    python3 scripts/check_msrv_deps.py
fi

echo "== fuzz: every target for a short bounded time (bash scripts/fuzz.sh SECONDS for longer)"
bash scripts/fuzz.sh 10

echo "== hostile probes: the rows of docs/hostile-input.md fixed for issue #9 (the full run: see that file)"
cargo build --locked -p opamp-reference-server -p opamp-reference-agent
bins="${CARGO_TARGET_DIR:-target}/debug"
python3 tests/hostile/probe.py --server "$bins/opamp-reference-server" --agent "$bins/opamp-reference-agent" --check \
    --only ws-duplicate-uid,ws-silent-upgrades,ws-60-of-64,tiny-attributes,client-restart \
    --out "${CARGO_TARGET_DIR:-target}/hostile-ci.md"

echo "== interop: third-party peers (Collector, supervisor, opamp-go, Java, Python, Node, browser)"
bash tests/interop/run.sh
