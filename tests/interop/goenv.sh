# Sourced by install.sh and run.sh: the Go caches live under target/interop/ so that a
# second run (and CI's later steps) reuse them. Go modules come from the Go module proxy only.
: "${OPAMP_INTEROP_GO:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/interop/go}"
export GOPATH="$OPAMP_INTEROP_GO/path"
export GOMODCACHE="$OPAMP_INTEROP_GO/path/pkg/mod"
export GOCACHE="$OPAMP_INTEROP_GO/cache"
export GOPROXY="${GOPROXY:-https://proxy.golang.org}"
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
