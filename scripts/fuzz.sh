#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 30), on the
# committed corpus (fuzz/corpus/TARGET, which grows as it runs), and prints
#   fuzz: N targets, X execs, C crashes
# Exit status 1 if any target found a crash (its input lands in fuzz/artifacts/TARGET).
# Needs the nightly toolchain (libFuzzer's instrumentation); without it, says so and exits 0.
# cargo-fuzz is installed from crates.io under target/tools on first use.
#
#   bash scripts/fuzz.sh          # 30 s per target
#   bash scripts/fuzz.sh 600      # a long run
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
root="${CARGO_TARGET_DIR:-$PWD/target}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is not installed on this machine; skipped"
    exit 0
fi
tools="$root/tools"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
    cargo install cargo-fuzz --version 0.13.2 --locked --root "$tools" --quiet
fi
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR="$root/fuzz"
cd fuzz
rustup run nightly cargo fuzz build -O
total=0 crashes=0 n=0
for t in $(rustup run nightly cargo fuzz list); do
    n=$((n + 1))
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$root/fuzz/$t.log"
    status=0
    rustup run nightly cargo fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    execs=${execs:-0}
    total=$((total + execs))
    if [ "$status" -ne 0 ]; then
        crashes=$((crashes + 1))
        echo "fuzz: $t FAILED (exit $status) after $execs execs; log $log:"
        tail -n 40 "$log"
    else
        echo "fuzz: $t: $execs execs in ${secs} s, corpus $(ls "corpus/$t" | wc -l) inputs"
    fi
done
echo "fuzz: $n targets, $total execs, $crashes crashes"
[ "$crashes" -eq 0 ]
