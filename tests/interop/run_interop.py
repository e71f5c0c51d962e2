#!/usr/bin/env python3
"""Interop test: third-party OpAMP clients against our reference server.

Starts `examples/server` on free loopback ports, then runs agents of
  - PyPI opentelemetry-opamp-client 0.5b0 (plain HTTP),
  - npm @elastic/opamp-client-node 0.5.0 (plain HTTP),
  - our own reference agent (WebSocket and plain HTTP),
and checks through the server's JSON API that every agent appears with its description,
receives a config pushed through the API and reports APPLIED with its hash, and that a config
an agent rejects shows FAILED with the agent's message. Finally a headless Chromium loads the
web UI and must see every agent listed.

Usage: run_interop.py --server BIN --agent BIN [--no-browser]
The peers must be installed first (tests/interop/install.sh); this script fails, never skips,
when anything is missing. Every wait is bounded; all processes are stopped at the end.
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("OPAMP_INTEROP_CACHE", os.path.join(REPO, ".cache", "interop"))

PEERS = {  # name prefix -> count
    "py-agent": 3,
    "node-agent": 3,
    "rs-ws-agent": 2,
    "rs-http-agent": 2,
}

results = []  # (name, ok, detail)


# Check-name prefix -> (peer, transport) for the `PASS peer=... transport=... check=...` lines
# that tests/interop/run.sh sums with the other peers'.
LABELS = [("py-agent", "python", "http"), ("node-agent", "node", "http"),
          ("rs-ws-agent", "reference-agent", "ws"), ("rs-http-agent", "reference-agent", "http"),
          ("reference agent", "reference-agent", "ws,http"), ("UI", "browser", "http"),
          ("chromium", "browser", "http")]


def label(name):
    for prefix, peer, transport in LABELS:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(": "):
                return peer, transport, rest[2:]
            index, sep, what = rest.partition(": ")
            if sep and index[1:].isdigit():
                return peer, transport, f"agent {index[1:]}: {what}"
            return peer, transport, name
    return "reference-server", "ws,http", name


def check(name, ok, detail=""):
    results.append((name, bool(ok), detail))
    peer, transport, what = label(name)
    print(("PASS " if ok else "FAIL ") + f"peer={peer} transport={transport} check={what}"
          + (f": {detail or 'failed'}" if not ok else ""), flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def api(ui, method, path, body=None, content_type="text/yaml"):
    req = urllib.request.Request(f"http://127.0.0.1:{ui}{path}", method=method, data=body)
    if body is not None:
        req.add_header("content-type", content_type)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def wait_until(what, timeout, probe):
    """Calls probe() until it returns a truthy value; returns (value, seconds) or (None, timeout)."""
    start = time.time()
    last = None
    while time.time() - start < timeout:
        try:
            last = probe()
        except Exception as e:  # the server may be busy; keep probing until the deadline
            last = None
            print(f"  ({what}: {e})", flush=True)
        if last:
            return last, time.time() - start
        time.sleep(0.25)
    return None, timeout


def agents_by_prefix(agents):
    groups = {p: [] for p in PEERS}
    for a in agents:
        name = a.get("service_name") or ""
        for p in sorted(PEERS, key=len, reverse=True):
            if name.startswith(p + "-"):
                groups[p].append(a)
                break
    return groups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="path to the built examples/server binary")
    ap.add_argument("--agent", required=True, help="path to the built examples/agent binary")
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium check (local use only)")
    args = ap.parse_args()

    venv_python = os.path.join(CACHE, "venv", "bin", "python")
    for path in (args.server, args.agent, venv_python, os.path.join(CACHE, "node", "node_modules")):
        if not os.path.exists(path):
            check(f"prerequisite {path}", False, "missing: run tests/interop/install.sh and build the examples")
            return finish()

    opamp_port, ui_port = free_port(), free_port()
    endpoint_http = f"http://127.0.0.1:{opamp_port}/v1/opamp"
    endpoint_ws = f"ws://127.0.0.1:{opamp_port}/v1/opamp"
    state = tempfile.mkdtemp(prefix="opamp-interop-")
    logs = {}
    procs = []

    def spawn(name, cmd):
        log = open(os.path.join(state, name + ".log"), "w")
        logs[name] = log.name
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)))

    try:
        spawn("server", [args.server, "--opamp-addr", f"127.0.0.1:{opamp_port}", "--ui-addr", f"127.0.0.1:{ui_port}",
                         "--database", f"sqlite://{os.path.join(state, 'opamp-server.db')}"])
        if not check("server listens", wait_port(opamp_port, 30) and wait_port(ui_port, 10)):
            return finish()
        # The Node client retries a failed first connection only after ~30 s: start agents
        # once the server is up.
        spawn("py-agent", [venv_python, os.path.join(HERE, "python_agent.py"), "--endpoint", endpoint_http,
                           "--count", str(PEERS["py-agent"]), "--name-prefix", "py-agent", "--interval", "1"])
        spawn("node-agent", ["node", os.path.join(HERE, "node_agent.mjs"), "--endpoint", endpoint_http,
                             "--count", str(PEERS["node-agent"]), "--name-prefix", "node-agent", "--interval", "1"])
        spawn("rs-ws-agent", [args.agent, "--endpoint", endpoint_ws, "--count", str(PEERS["rs-ws-agent"]),
                              "--name", "rs-ws-agent", "--heartbeat", "1", "--state-dir", os.path.join(state, "ws")])
        spawn("rs-http-agent", [args.agent, "--endpoint", endpoint_http, "--count", str(PEERS["rs-http-agent"]),
                                "--name", "rs-http-agent", "--heartbeat", "1", "--state-dir", os.path.join(state, "http")])

        # 1. Every agent appears, connected, with its description.
        def all_connected():
            groups = agents_by_prefix(api(ui_port, "GET", "/api/v1/agents"))
            ok = all(len([a for a in groups[p] if a["connected"]]) == n for p, n in PEERS.items())
            return groups if ok else None

        groups, took = wait_until("agents connect", 45, all_connected)
        for p, n in PEERS.items():
            got = groups[p] if groups else agents_by_prefix(api(ui_port, "GET", "/api/v1/agents"))[p]
            check(f"{p}: {n} agents connected with description", len(got) == n and all(
                a["connected"] and a["identifying_attributes"].get("service.version") for a in got),
                f"got {[(a['service_name'], a['connected']) for a in got]}")
        if not groups:
            return finish()
        for p in PEERS:
            for a in groups[p]:
                check(f"{p}: uid {a['instance_uid']} is a hyphenated UUID",
                      len(a["instance_uid"]) == 36 and a["instance_uid"].count("-") == 4)
        rs = groups["rs-ws-agent"] + groups["rs-http-agent"]
        check("reference agents report health, effective config, transport",
              all(a["health"] and a["health"]["healthy"] and a["effective_config"] for a in rs)
              and {a["transport"] for a in groups["rs-ws-agent"]} == {"websocket"}
              and {a["transport"] for a in groups["rs-http-agent"] + groups["py-agent"] + groups["node-agent"]} == {"http"})

        # 2. A config pushed to every agent comes back APPLIED with its hash.
        good = b"exporters:\n  debug: {}\nservice:\n  pipelines: {}\n"
        push = api(ui_port, "PUT", "/api/v1/configs/all",
                   json.dumps({"body": good.decode(), "content_type": "text/yaml"}).encode(),
                   "application/json")
        check("push to every agent targets all of them", len(push["agents"]) == sum(PEERS.values()),
              f"{len(push['agents'])} targeted")

        def all_applied(h=push["config_hash"]):
            agents = api(ui_port, "GET", "/api/v1/agents")
            done = [a for a in agents if (a["remote_config_status"] or {}).get("hash") == h
                    and a["remote_config_status"]["status"] == "APPLIED"]
            return agents if len(done) == sum(PEERS.values()) else None

        agents, took = wait_until("configs applied", 30, all_applied)
        if agents is None:
            agents = api(ui_port, "GET", "/api/v1/agents")
        groups = agents_by_prefix(agents)
        for p in PEERS:
            st = [(a["remote_config_status"] or {}) for a in groups[p]]
            check(f"{p}: APPLIED with hash {push['config_hash'][:12]}",
                  st and all(s.get("status") == "APPLIED" and s.get("hash") == push["config_hash"] for s in st),
                  f"statuses {st}")
        print(f"  config push to {sum(PEERS.values())} agents acked APPLIED in {took:.2f} s", flush=True)
        for a in groups["py-agent"] + groups["rs-ws-agent"] + groups["rs-http-agent"]:
            # The listing is slim (no config bodies): the body is on the agent's own endpoint.
            full = api(ui_port, "GET", f"/api/v1/agents/{a['instance_uid']}")
            body = ((full["effective_config"] or {}).get("") or {}).get("body")
            check(f"{a['service_name']}: effective config is the applied config", body == good.decode(),
                  f"effective {body!r}")

        # 3. A config one agent of each kind rejects shows FAILED with its message.
        for p in PEERS:
            target = groups[p][0]["service_name"]
            # A named config of higher priority for the one agent, over "all".
            push = api(ui_port, "PUT", f"/api/v1/configs/fail-{target}",
                       json.dumps({"selector": {"service.name": target}, "priority": 10,
                                   "body": "INVALID: config\n", "content_type": "text/yaml"}).encode(),
                       "application/json")
            check(f"{p}: selector targets exactly {target}", len(push["agents"]) == 1, f"{push['agents']}")
            uid = push["agents"][0]

            def failed(h=push["config_hash"], uid=uid):
                a = api(ui_port, "GET", f"/api/v1/agents/{uid}")
                s = a["remote_config_status"] or {}
                return s if s.get("hash") == h and s.get("status") == "FAILED" else None

            status, took = wait_until(f"{target} fails", 30, failed)
            check(f"{p}: FAILED with the agent's message", status and "INVALID" in status.get("error_message", ""),
                  f"status {status}")

        # 4. The reference agent honours Restart: it goes away and comes back as the same agent.
        target = groups["rs-ws-agent"][-1]
        before = api(ui_port, "GET", f"/api/v1/agents/{target['instance_uid']}")["sequence_num"]
        api(ui_port, "POST", f"/api/v1/agents/{target['instance_uid']}/restart", b"{}", "application/json")

        def restarted(uid=target["instance_uid"]):
            with open(logs["rs-ws-agent"], errors="replace") as f:
                if "restarting" not in f.read():
                    return None
            a = api(ui_port, "GET", f"/api/v1/agents/{uid}")
            return a if a["connected"] and (a["remote_config_status"] or {}).get("status") else None

        again, took = wait_until("agent restarts", 20, restarted)
        check("reference agent restarts on command and keeps its uid", again, "did not come back")
        check("the fleet has no new agent after the restart",
              len(api(ui_port, "GET", "/api/v1/agents")) == sum(PEERS.values()))
        print(f"  restart: sequence {before} -> {again and again['sequence_num']} in {took:.2f} s")

        # 5. The UI lists every agent, in a real browser.
        if args.no_browser:
            print("  (browser check skipped by --no-browser)")
        else:
            browser_check(ui_port, agents, state)

        # 6. Nobody crashed.
        for name, proc in procs:
            check(f"{name} still running", proc.poll() is None, f"exited with {proc.returncode}")
    finally:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if any(not ok for _, ok, _ in results) or os.environ.get("OPAMP_INTEROP_SHOW_LOGS"):
            for name, path in logs.items():
                print(f"---- {name} log (last 30 lines) ----")
                with open(path, errors="replace") as f:
                    print("".join(f.readlines()[-30:]))
        shutil.rmtree(state, ignore_errors=True)
    return finish()


def browser_check(ui_port, agents, state):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not check("chromium installed", chromium, "install Debian's chromium package"):
        return
    profile = os.path.join(state, "chromium-profile")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
           f"http://127.0.0.1:{ui_port}/"]
    try:
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        check("UI loads in chromium", False, "timed out")
        return
    missing = [a["instance_uid"] for a in agents if a["instance_uid"] not in dom]
    check("UI in chromium lists every agent", dom and not missing and 'id="agents"' in dom,
          f"{len(missing)} missing of {len(agents)}; DOM {len(dom)} chars")
    # Clicks through the UI: agent page, push to one agent, push by selector, statuses shown.
    try:
        ui = subprocess.run(["node", os.path.join(HERE, "ui_test.mjs"), f"http://127.0.0.1:{ui_port}"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "CHROMIUM": chromium})
        for line in (ui.stdout + ui.stderr).splitlines():  # ui_test.mjs's own PASS/FAIL lines
            verdict, _, what = line.partition(" ")
            if verdict in ("PASS", "FAIL") and what:
                name, _, detail = what.removeprefix("ui: ").partition(": ")
                check(f"UI {name}", verdict == "PASS", detail)
            else:
                print(line)
        check("UI flows in chromium (ui_test.mjs)", ui.returncode == 0, f"exit {ui.returncode}")
    except subprocess.TimeoutExpired:
        check("UI flows in chromium (ui_test.mjs)", False, "timed out")
    if os.environ.get("OPAMP_UI_SCREENSHOT"):
        shot = [c for c in cmd if c != "--dump-dom"]
        shot.insert(-1, f"--screenshot={os.environ['OPAMP_UI_SCREENSHOT']}")
        shot.insert(-1, "--window-size=1400,700")
        subprocess.run(shot, capture_output=True, timeout=60)


def finish():
    passed = sum(1 for _, ok, _ in results if ok)
    failed = len(results) - passed
    print(f"  (run_interop.py: {passed} passed, {failed} failed; run.sh prints the total)", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


def on_sigterm(signum, frame):
    raise SystemExit(f"run_interop.py: stopped by signal {signum}")  # unwind: stop the peers


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(main())
