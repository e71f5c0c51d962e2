#!/usr/bin/env python3
"""Package rollout benchmark: one signed package offered to N reference agents at once.

Starts the reference server (release build), uploads a package of --size bytes, starts N
reference agents in one process with --accept-packages (WebSocket), creates a package set that
matches every agent, and measures the time until the server shows every agent's package
INSTALLED, and the download throughput that implies. Everything is on loopback; the run stops
by itself (--timeout).

    python3 benches/packages.py --agents 1000 --size 1048576

Prints one line per phase and a closing line
    packages: N agents, SIZE bytes each: all INSTALLED in T s (X MiB/s, Y agents/s)
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def api(ui, method, path, body=None, content_type=None):
    req = urllib.request.Request(f"http://127.0.0.1:{ui}{path}", method=method, data=body)
    if content_type:
        req.add_header("content-type", content_type)
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = resp.read()
        return json.loads(data) if data else None


def wait(timeout, probe, interval=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = probe()
        if got:
            return got
        time.sleep(interval)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1 << 20, help="package size in bytes")
    ap.add_argument("--timeout", type=float, default=300, help="bound on the whole run, s")
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as built")
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "opamp-reference-server",
                        "-p", "opamp-reference-agent"], cwd=ROOT, check=True)
    bin_dir = os.path.join(target, "release")
    state = tempfile.mkdtemp(prefix="opamp-packages-bench-")
    procs = []
    try:
        opamp, ui = free_port(), free_port()
        server_log = open(os.path.join(state, "server.log"), "w")
        procs.append(subprocess.Popen(
            [os.path.join(bin_dir, "opamp-reference-server"), "--opamp-addr", f"127.0.0.1:{opamp}",
             "--ui-addr", f"127.0.0.1:{ui}",
             "--database", f"sqlite://{os.path.join(state, 'opamp-server.db')}"],
            stdout=server_log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"}))
        listing = wait(30, lambda: _try(lambda: api(ui, "GET", "/api/v1/packages")))
        if not listing:
            sys.exit("packages: the reference server did not come up")
        key = listing["public_key"]
        blob = os.urandom(args.size)
        api(ui, "PUT", "/api/v1/packages/bench/1.0", blob, "application/octet-stream")
        print(f"packages: uploaded bench 1.0 ({args.size} bytes); server key {key[:16]}...", flush=True)

        agent_log = open(os.path.join(state, "agents.log"), "w")
        t_start = time.monotonic()
        procs.append(subprocess.Popen(
            [os.path.join(bin_dir, "agent"), "--endpoint", f"ws://127.0.0.1:{opamp}/v1/opamp",
             "--count", str(args.agents), "--name", "bench", "--state-dir",
             os.path.join(state, "agents"), "--accept-packages", key],
            stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True))
        connected = wait(max(1, deadline - time.monotonic()), lambda: (lambda a: a if len(a) >= args.agents else None)(
            [x for x in api(ui, "GET", "/api/v1/agents") if x.get("connected")]), 0.5)
        if not connected:
            sys.exit(f"packages: fewer than {args.agents} agents connected")
        uids = [a["instance_uid"] for a in connected]
        print(f"packages: {len(uids)} agents connected in {time.monotonic() - t_start:.1f} s", flush=True)

        t0 = time.monotonic()
        body = json.dumps({"selector": {}, "packages": {"bench": "1.0"}}).encode()
        api(ui, "PUT", "/api/v1/package-sets/all", body, "application/json")
        pending = set(uids)
        failed = {}
        last_report = t0
        while pending and time.monotonic() < deadline:
            for uid in list(pending):
                a = api(ui, "GET", f"/api/v1/agents/{uid}")
                st = ((a.get("package_statuses") or {}).get("bench")) or {}
                if st.get("status") == "INSTALLED" and st.get("agent_has_version") == "1.0":
                    pending.discard(uid)
                elif st.get("status") == "INSTALL_FAILED":
                    failed[uid] = st.get("error_message")
                    pending.discard(uid)
            if time.monotonic() - last_report > 5:
                print(f"packages: {len(uids) - len(pending)}/{len(uids)} done after "
                      f"{time.monotonic() - t0:.1f} s", flush=True)
                last_report = time.monotonic()
            if pending:
                time.sleep(0.2)
        took = time.monotonic() - t0
        done = len(uids) - len(pending) - len(failed)
        if failed:
            first = next(iter(failed.values()))
            print(f"packages: {len(failed)} INSTALL_FAILED, e.g. {first!r}", flush=True)
        if pending:
            print(f"packages: {len(pending)} not INSTALLED within the timeout", flush=True)
        mib = done * args.size / (1 << 20)
        print(f"packages: {done} agents, {args.size} bytes each: all INSTALLED in {took:.2f} s "
              f"({mib / took:.1f} MiB/s, {done / took:.0f} agents/s)"
              if not pending and not failed else
              f"packages: {done} of {len(uids)} INSTALLED in {took:.2f} s", flush=True)
        return 0 if not pending and not failed else 1
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM) if p.pid and p is not procs[0] else p.terminate()
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(state, ignore_errors=True)


def _try(f):
    try:
        return f()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
