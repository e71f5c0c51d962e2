#!/usr/bin/env bash
# Runs every check and test of the workspace: what CI runs, and what a contributor runs.
# Needs Go, Java 17 with Maven, Python, Node and Chromium for the interop peers
# (tests/interop/run.sh installs and builds the pinned peers; .ci/run installs Chromium and
# Maven on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fmt";     cargo fmt --all -- --check
echo "== clippy";  cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== doc";     RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== facade without default features"
cargo check -p opamp --no-default-features --locked
echo "== tests";   cargo test --workspace --locked

echo "== interop: third-party peers (Collector, supervisor, opamp-go, Java, Python, Node, browser)"
bash tests/interop/run.sh
