#!/usr/bin/env bash
# Runs every check and test of the workspace: what CI runs, and what a contributor runs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fmt";     cargo fmt --all -- --check
echo "== clippy";  cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== doc";     RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== facade without default features"
cargo check -p opamp --no-default-features --locked
echo "== tests";   cargo test --workspace --locked
