#!/usr/bin/env bash
# Checks every combination of the library crates' features (`tokio`, `tls`; the facade's
# `client`, `server` too) and that the dependency trees without them hold no rustls or ring,
# and without `tokio` no tokio, hyper or tungstenite. Part of scripts/test-all.sh (CI).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every combination of each library crate's features (tls implies tokio in the client and
# server, and is checked anyway), without warnings: a cfg that leaves an import or a helper
# unused shows up here. cargo-hack is not needed for so few features.
check_features() {
    local crate=$1 features=$2 out
    local args=(-p "$crate" --no-default-features --locked)
    [ -n "$features" ] && args+=(--features "$features")
    echo "cargo check ${args[*]}"
    if ! out=$(cargo check "${args[@]}" 2>&1); then
        echo "$out"
        exit 1
    fi
    if grep -q '^warning' <<<"$out"; then
        echo "$out"
        echo "feature combinations: $crate with features '$features' has warnings"
        exit 1
    fi
}
for features in "" tokio tls tokio,tls; do
    for crate in opamp-transport opamp-client opamp-server; do
        check_features "$crate" "$features"
    done
done
# The CSR flow (feature `csr`, off by default): the client's implies `tls`; the server's is
# sans-IO and builds with or without the drivers.
check_features opamp-client csr
for features in csr tokio,csr tls,csr; do
    check_features opamp-server "$features"
done
for features in "" tls; do
    check_features opamp-supervisor "$features"
done
for sides in "" client server client,server; do
    for features in "" tokio tls tokio,tls; do
        check_features opamp "$(echo "$sides,$features" | sed 's/^,//; s/,$//')"
    done
done
check_features opamp client,server,csr

# What the features keep out of the build (normal dependencies only): without `tls` no
# rustls, ring or rustls-pki-types; without `tokio` (the sans-IO cores) no tokio, hyper or
# tungstenite either.
forbid_in_tree() {
    local pattern=$1 tree found
    shift
    tree=$(cargo tree "$@" -e normal --prefix none --locked)
    found=$(grep -E "$pattern" <<<"$tree" | sort -u || true)
    if [ -n "$found" ]; then
        echo "cargo tree $*: must not contain:"
        echo "$found"
        exit 1
    fi
    echo "cargo tree $*: none of $pattern"
}
tls_crates='^(ring|[a-z-]*rustls[a-z-]*) v'
io_crates='^(tokio|tokio-[a-z-]+|hyper|hyper-util|tungstenite|mio|socket2) v'
for crate in opamp-transport opamp-client opamp-server opamp; do
    forbid_in_tree "$tls_crates" -p "$crate" --no-default-features --features tokio
    forbid_in_tree "$tls_crates|$io_crates" -p "$crate" --no-default-features
done
forbid_in_tree "$tls_crates" -p opamp-supervisor --no-default-features
forbid_in_tree "$tls_crates" -p opamp --no-default-features --features client,server,tokio
forbid_in_tree "$tls_crates|$io_crates" -p opamp --no-default-features --features client,server
# The cores' own unit tests, built without tokio (each crate alone: built together, the
# client's dev-dependency on the server would turn the server's `tokio` on).
for crate in opamp-transport opamp-client opamp-server; do
    echo "cargo test -p $crate --no-default-features --lib --locked"
    cargo test -p "$crate" --no-default-features --lib --locked --quiet
done
# The client's driver without TLS (refuses wss:// and https:// with StartError::TlsDisabled).
echo "cargo test -p opamp-client --no-default-features --features tokio --lib --locked"
cargo test -p opamp-client --no-default-features --features tokio --lib --locked --quiet

# The CSR flow's tests (feature `csr` is off by default, so `cargo test --workspace` skips
# them): the CA helper's unit tests and the client's loopback test against it.
echo "cargo test -p opamp-server --features csr --lib --locked csr"
cargo test -p opamp-server --features csr --lib --locked --quiet csr
echo "cargo test -p opamp-client --features csr --locked --test csr --lib"
cargo test -p opamp-client --features csr --locked --quiet --test csr --lib

echo "check-features: all combinations build without warnings, the trees are clean, the cores pass their tests without tokio"
