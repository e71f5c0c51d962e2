#!/usr/bin/env bash
# Installs the pinned third-party OpAMP interop peers into a cache directory:
#   $CACHE/venv   a Python venv with tests/interop/requirements.txt (exact pins)
#   $CACHE/node   an npm project made from tests/interop/node/ with `npm ci`
# CACHE is $OPAMP_INTEROP_CACHE, or <repo>/.cache/interop (git-ignored).
#
# Idempotent: a marker file keyed on the pins (and the interpreter versions)
# makes a repeated run return at once. Never skips: any failure exits non-zero.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${OPAMP_INTEROP_CACHE:-$repo/.cache/interop}"
python="${PYTHON:-python3}"

die() { echo "interop install: FAILED: $*" >&2; exit 1; }
say() { echo "interop install: $*" >&2; }

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
    exit 0
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
