#!/usr/bin/env bash
# Installs the pinned third-party OpAMP interop peers:
#   $CACHE/venv   a Python venv with tests/interop/requirements.txt (exact pins)
#   $CACHE/node   an npm project made from tests/interop/node/ with `npm ci`
# CACHE is $OPAMP_INTEROP_CACHE, or <repo>/.cache/interop (git-ignored).
# Then the Go and Java peers, under $OPAMP_INTEROP_TARGET (default <repo>/target/interop):
#   bin-KEY/      otelcol-interop (collector/), opampsupervisor (supervisor/),
#                 opampgo-client and opampgo-server (opampgo/), KEY = hash of their pins
#   go/           GOPATH, GOMODCACHE, GOCACHE (modules from the Go module proxy)
#   m2/           the Maven repository (Maven Central)
#   java/         the Java driver's classes and classpath.txt (java/)
#   bin           a symlink to the current bin-KEY
# `--only-go-java` skips the Python/Node part; `--no-go-java` skips the Go/Java part.
#
# Idempotent: a marker file keyed on the pins (and the interpreter versions)
# makes a repeated run return at once. Never skips: any failure exits non-zero.
set -euo pipefail

do_pynode=1 do_gojava=1
for arg in "$@"; do
    case "$arg" in
        --only-go-java) do_pynode=0 ;;
        --no-go-java) do_gojava=0 ;;
        *) echo "usage: install.sh [--only-go-java|--no-go-java]" >&2; exit 2 ;;
    esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${OPAMP_INTEROP_CACHE:-$repo/.cache/interop}"
python="${PYTHON:-python3}"

die() { echo "interop install: FAILED: $*" >&2; exit 1; }
say() { echo "interop install: $*" >&2; }

install_pynode() {
command -v "$python" >/dev/null 2>&1 || die "'$python' not found (need Python >= 3.10; set PYTHON=...)"
command -v node >/dev/null 2>&1 || die "'node' not found (need Node >= 20.6 or 18.19)"
command -v npm >/dev/null 2>&1 || die "'npm' not found"

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$("$python" --version 2>&1) is too old: the PyPI peer needs Python >= 3.10"
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=6)||(a===18&&b>=19)||(a===19)?0:1)' \
    || die "node $(node --version) is too old: the npm peer needs ^18.19.0 || >=20.6.0"

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
nodever="$(node -p 'process.versions.node.split(".")[0]')"
key="$(cat "$here/requirements.txt" "$here/node/package.json" "$here/node/package-lock.json" \
    | sha256sum | cut -c1-16)-py$pyver-node$nodever"
marker="$cache/installed-$key"

if [[ -f "$marker" ]]; then
    say "already installed ($cache, key $key)"
    return 0
fi

mkdir -p "$cache" || die "cannot create $cache"
rm -f "$cache"/installed-*
start=$SECONDS

# --- Python peer -----------------------------------------------------------
say "creating venv $cache/venv with $("$python" --version 2>&1)"
rm -rf "$cache/venv"
"$python" -m venv "$cache/venv" \
    || die "python -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
venv_py="$cache/venv/bin/python"
"$venv_py" -m pip install --quiet --disable-pip-version-check --no-input \
    --no-deps -r "$here/requirements.txt" \
    || die "pip install -r tests/interop/requirements.txt failed"
"$venv_py" -m pip check --disable-pip-version-check >&2 \
    || die "pip check failed: requirements.txt is missing a dependency"
got="$("$venv_py" -c 'from opentelemetry._opamp.version import __version__; print(__version__)')" \
    || die "the PyPI peer does not import"
[[ "$got" == "0.5b0" ]] || die "expected opentelemetry-opamp-client 0.5b0, got $got"

# --- Node peer -------------------------------------------------------------
say "installing the npm peer in $cache/node (npm ci)"
rm -rf "$cache/node"
mkdir -p "$cache/node"
cp "$here/node/package.json" "$here/node/package-lock.json" "$cache/node/"
(cd "$cache/node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2) \
    || die "npm ci failed in $cache/node"
got="$(cd "$cache/node" && node -p 'require("@elastic/opamp-client-node/package.json").version')" \
    || die "the npm peer does not load"
[[ "$got" == "0.5.0" ]] || die "expected @elastic/opamp-client-node 0.5.0, got $got"

touch "$marker"
say "installed in $((SECONDS - start)) s: python=$venv_py node_modules=$cache/node/node_modules"
}


# --- Go and Java peers -----------------------------------------------------
# Pins: collector/go.mod (core v0.149.0 / v1.55.0, contrib v0.149.0), supervisor/go.mod
# (contrib cmd/opampsupervisor v0.149.0), opampgo/go.mod (opamp-go v0.23.0), java/pom.xml
# (io.opentelemetry.contrib:opentelemetry-opamp-client 1.53.0-alpha).
install_gojava() {
    local out="${OPAMP_INTEROP_TARGET:-$repo/target/interop}"
    export OPAMP_INTEROP_GO="$out/go"
    # shellcheck source=goenv.sh
    source "$here/goenv.sh"
    command -v go >/dev/null 2>&1 || die "'go' not found (need Go >= 1.26)"
    command -v mvn >/dev/null 2>&1 || die "'mvn' not found (Debian: apt-get install maven)"
    command -v java >/dev/null 2>&1 || die "'java' not found (need Java >= 17)"
    local gokey javakey
    gokey="$( (go version; cd "$here" && cat collector/go.mod collector/go.sum collector/main.go \
        supervisor/go.mod supervisor/go.sum opampgo/go.mod opampgo/go.sum opampgo/client/main.go \
        opampgo/server/main.go goenv.sh) | sha256sum | cut -c1-16)"
    javakey="$( (java -version 2>&1; cd "$here" && cat java/pom.xml \
        java/src/main/java/io/opamprs/interop/*.java) | sha256sum | cut -c1-16)"
    local bin="$out/bin-$gokey"
    local t0=$SECONDS
    if [[ -f "$bin/.complete" ]]; then
        say "Go peers already built ($bin)"
    else
        say "building the Go peers into $bin (cold: about 2.5 min on 2 cores)"
        rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
        (cd "$here/collector" && nice -n 10 go build -trimpath -o "$bin.tmp/otelcol-interop" .) \
            || die "go build of the collector distribution (tests/interop/collector) failed"
        (cd "$here/supervisor" && nice -n 10 go build -trimpath -o "$bin.tmp/opampsupervisor" \
            github.com/open-telemetry/opentelemetry-collector-contrib/cmd/opampsupervisor) \
            || die "go build of cmd/opampsupervisor failed"
        (cd "$here/opampgo" && nice -n 10 go build -trimpath -o "$bin.tmp/opampgo-client" ./client \
            && nice -n 10 go build -trimpath -o "$bin.tmp/opampgo-server" ./server) \
            || die "go build of the opamp-go drivers (tests/interop/opampgo) failed"
        touch "$bin.tmp/.complete"
        rm -rf "$bin" && mv "$bin.tmp" "$bin"
        # Older builds (other pins) are removed; the module and build caches stay.
        find "$out" -maxdepth 1 -name 'bin-*' ! -name "bin-$gokey" -exec rm -rf {} +
        say "Go peers built in $((SECONDS - t0)) s"
    fi
    ln -sfn "bin-$gokey" "$out/bin"
    "$bin/otelcol-interop" --version >&2 || die "the collector distribution does not run"

    t0=$SECONDS
    if [[ -f "$out/java/.complete-$javakey" ]]; then
        say "Java driver already built ($out/java)"
    else
        say "building the Java driver into $out/java (Maven Central)"
        rm -rf "$out/java"
        (cd "$here/java" && nice -n 10 mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$out/m2/repository" \
            -Dinterop.out="$out/java" compile dependency:build-classpath \
            -Dmdep.outputFile="$out/java/classpath.txt" >&2) \
            || die "mvn compile of tests/interop/java failed"
        touch "$out/java/.complete-$javakey"
        say "Java driver built in $((SECONDS - t0)) s"
    fi
}

[[ $do_pynode == 1 ]] && install_pynode
[[ $do_gojava == 1 ]] && install_gojava
exit 0
