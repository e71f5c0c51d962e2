#!/usr/bin/env bash
# Runs every check and test of the workspace: what CI runs, and what a contributor runs.
# Needs the interop peers and Chromium (tests/interop/install.sh and Debian's chromium; .ci/run
# installs both on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fmt";     cargo fmt --all -- --check
echo "== clippy";  cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== doc";     RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== facade without default features"
cargo check -p opamp --no-default-features --locked
echo "== tests";   cargo test --workspace --locked

echo "== interop: third-party clients against the reference server"
bash tests/interop/install.sh
cargo build --locked --example server --example agent
bin="${CARGO_TARGET_DIR:-target}/debug/examples"
python3 tests/interop/run_interop.py --server "$bin/server" --agent "$bin/agent"
