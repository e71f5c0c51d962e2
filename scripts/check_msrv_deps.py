#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Checks that no dependency needs a newer Rust than the crate that uses it declares.

For every workspace package, walks its resolved dependency graph (normal, build and dev
dependencies, every platform, as Cargo.lock pins them) from `cargo metadata` and fails when a
dependency's `rust-version` is newer than the package's own. scripts/test-all.sh runs this
when the toolchain of exactly our `rust-version` is not installed (the real check is
`cargo +VERSION check`). Prints one line per offending dependency; exit 1 if any.

Usage: check_msrv_deps.py [--metadata FILE]   (default: runs `cargo metadata --locked`)
"""

from __future__ import annotations

import json
import subprocess
import sys


def version_key(v: str) -> tuple[int, ...]:
    """'1.85' and '1.85.0' compare equal; a missing part counts as 0."""
    parts = [int(p) for p in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def violations(metadata: dict) -> tuple[list[str], dict[str, str]]:
    packages = {p["id"]: p for p in metadata["packages"]}
    graph = {n["id"]: [d["pkg"] for d in n["deps"]] for n in metadata["resolve"]["nodes"]}
    bad = []
    ours = {}
    for member in metadata["workspace_members"]:
        pkg = packages[member]
        msrv = pkg.get("rust_version")
        ours[pkg["name"]] = msrv or "(none)"
        if not msrv:
            bad.append(f"{pkg['name']}: declares no rust-version")
            continue
        seen, stack = set(), list(graph.get(member, []))
        while stack:
            dep = stack.pop()
            if dep in seen:
                continue
            seen.add(dep)
            stack.extend(graph.get(dep, []))
            d = packages[dep]
            need = d.get("rust_version")
            if need and version_key(need) > version_key(msrv):
                bad.append(f"{pkg['name']} (rust-version {msrv}) depends on {d['name']} "
                           f"{d['version']}, which needs Rust {need}")
    return sorted(set(bad)), ours


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--metadata":
        with open(sys.argv[2]) as f:
            metadata = json.load(f)
    else:
        out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--locked"],
                             check=True, capture_output=True, text=True).stdout
        metadata = json.loads(out)
    bad, ours = violations(metadata)
    for line in bad:
        print(f"MSRV: {line}")
    declared = ", ".join(f"{k} {v}" for k, v in sorted(ours.items()))
    if bad:
        print(f"MSRV: {len(bad)} dependency problem(s) ({declared})")
        return 1
    print(f"MSRV: every dependency's rust-version fits ours ({declared})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
