#!/usr/bin/env python3
"""Interop checks with the Go and Java peers (tests/interop/run.sh runs this).

Peers, all pinned and built by tests/interop/install.sh into --bin:
  collector       our small Collector distribution (core + contrib opampextension) against
                  the reference server, over WebSocket and plain HTTP
  supervisor      contrib's opampsupervisor managing that collector, against the reference
                  server, over WebSocket and plain HTTP
  opampgo-client  an opamp-go client (opampgo/client) against the reference server
  opampgo-server  our reference agent against an opamp-go server (opampgo/server)
  java            OpenTelemetry Java contrib's OpAMP client (java/) against the reference server

Prints one line per check, `PASS peer=NAME transport=ws|http check=...` or
`FAIL peer=NAME transport=... check=...: reason`. It fails, never skips: a missing binary is a
FAIL. Every process runs on loopback with free ports, every wait is bounded, and every process
is stopped by its PID (its process group for the supervisor, which starts the collector).
Exit status 0 when every check passed.
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
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEERS = ["collector", "supervisor", "our-supervisor", "opampgo-client", "opampgo-server", "java"]
TRANSPORTS = ["ws", "http"]

results = []


def check(peer, transport, name, ok, detail=""):
    ok = bool(ok)
    results.append(ok)
    line = f"{'PASS' if ok else 'FAIL'} peer={peer} transport={transport} check={name}"
    if not ok:
        line += f": {detail or 'failed'}"
    print(line, flush=True)
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


def wait_until(timeout, probe, interval=0.25):
    """Calls probe() until it returns something truthy; returns it, or None at the deadline."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = probe()
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            got = None
        if got:
            return got
        time.sleep(interval)
    return None


class Procs:
    """The processes of one peer's run; all stopped by PID in stop()."""

    def __init__(self, state):
        self.state = state
        self.procs = []
        self.logs = {}

    def spawn(self, name, cmd, group=False, env=None):
        log = open(os.path.join(self.state, name + ".log"), "w")
        self.logs[name] = log.name
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.state,
                             start_new_session=group, env=env)
        self.procs.append((name, p, group))
        return p

    def log(self, name):
        with open(self.logs[name], errors="replace") as f:
            return f.read()

    def events(self, name):
        out = []
        for line in self.log(name).splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def stop(self):
        for name, p, group in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM) if group else p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name, p, group in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL) if group else p.kill()
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
            if group:  # the supervisor's collector, should it have outlived the supervisor
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def dump(self):
        for name, path in self.logs.items():
            print(f"---- {name} log (last 25 lines) ----")
            with open(path, errors="replace") as f:
                print("".join(f.readlines()[-25:]), flush=True)


class RefServer:
    """Our reference server (examples/server) on free loopback ports."""

    def __init__(self, procs, binary):
        self.opamp, self.ui = free_port(), free_port()
        self.db_dir = tempfile.mkdtemp(prefix="opamp-interop-db-")
        procs.spawn("reference-server", [binary, "--opamp-addr", f"127.0.0.1:{self.opamp}",
                                         "--ui-addr", f"127.0.0.1:{self.ui}",
                                         "--database", f"sqlite://{self.db_dir}/opamp-server.db"])
        self.up = wait_port(self.opamp, 30) and wait_port(self.ui, 10)

    def url(self, transport):
        return f"{'ws' if transport == 'ws' else 'http'}://127.0.0.1:{self.opamp}/v1/opamp"

    def api(self, method, path, body=None, content_type="text/yaml"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.ui}{path}", method=method, data=body)
        if body is not None:
            req.add_header("content-type", content_type)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read() or b"null")

    def agent(self, uid):
        return self.api("GET", f"/api/v1/agents/{uid}")

    def find(self, pred):
        return [a for a in self.api("GET", "/api/v1/agents") if pred(a)]

    def push(self, uid, body):
        return self.api("PUT", f"/api/v1/agents/{uid}/config", body)["config_hash"]

    def wait_status(self, uid, want_hash, status, timeout):
        def probe():
            s = self.agent(uid).get("remote_config_status") or {}
            return s if s.get("hash") == want_hash and s.get("status") == status else None
        return wait_until(timeout, probe)


def ws_or_http(transport):
    return "websocket" if transport == "ws" else "http"


def effective_body(agent):
    files = agent.get("effective_config") or {}
    return "\n".join((f or {}).get("body") or "" for f in files.values())


GOOD = b"receivers:\n  otlp: {}\nexporters:\n  debug: {}\n"
BAD = b"INVALID: this config must be rejected\n"


# ---------------------------------------------------------------------------------------------
# Clients against the reference server: opamp-go client, Java client


def client_common(peer, t, srv, procs, name, agent_pred, apply_timeout, expect_health, initial=None):
    """Description, config APPLIED/FAILED, effective config: the same for every client."""
    found = wait_until(30, lambda: srv.find(agent_pred))
    if not check(peer, t, "listed by the reference server", found and len(found) == 1,
                 f"agents {[a.get('service_name') for a in srv.api('GET', '/api/v1/agents')]}"):
        return None
    uid = found[0]["instance_uid"]
    a = wait_until(20, lambda: (lambda x: x if x["connected"] else None)(srv.agent(uid)))
    check(peer, t, "connected", a, "not connected")
    a = srv.agent(uid)
    check(peer, t, f"transport is {ws_or_http(t)}", a["transport"] == ws_or_http(t), a["transport"])
    check(peer, t, "uid is a hyphenated UUID", len(uid) == 36 and uid.count("-") == 4, uid)
    if expect_health:
        h = a.get("health") or {}
        check(peer, t, "health reported (healthy, status, components)",
              h.get("healthy") is True and h.get("status") and h.get("components"), f"health {h}")
    if initial:
        a = wait_until(10, lambda: (lambda x: x if initial in effective_body(x) else None)(srv.agent(uid)))
        check(peer, t, "initial effective config reported before any push", a,
              f"effective {srv.agent(uid).get('effective_config')}")

    t0 = time.time()
    good_hash = srv.push(uid, GOOD)
    st = srv.wait_status(uid, good_hash, "APPLIED", apply_timeout)
    took = time.time() - t0
    check(peer, t, "config APPLIED with its hash", st, f"status {srv.agent(uid).get('remote_config_status')}")
    a = wait_until(10, lambda: (lambda x: x if effective_body(x) == GOOD.decode() else None)(srv.agent(uid)))
    check(peer, t, "effective config is the applied config", a,
          f"effective {srv.agent(uid).get('effective_config')}")
    bad_hash = srv.push(uid, BAD)
    st = srv.wait_status(uid, bad_hash, "FAILED", apply_timeout)
    check(peer, t, "rejected config FAILED with the client's message",
          st and "INVALID" in st.get("error_message", ""), f"status {srv.agent(uid).get('remote_config_status')}")
    a = srv.agent(uid)
    ident = a.get("identifying_attributes") or {}
    check(peer, t, "description (service.name, service.version, host.name, os.type)",
          ident.get("service.name") == name and ident.get("service.version")
          and (a.get("non_identifying_attributes") or {}).get("os.type"), f"attributes {ident}")
    return uid, took


def run_opampgo_client(args, t, state):
    peer = "opampgo-client"
    procs = Procs(state)
    try:
        srv = RefServer(procs, args.server)
        if not check(peer, t, "reference server listens", srv.up, "no listener"):
            return procs
        name = f"opampgo-{t}"
        # WebSocket: a 30 s heartbeat, so that a config applied within 10 s was pushed by the
        # server; HTTP: 1 s polling, the only way a plain-HTTP server reaches its agent.
        hb = "30s" if t == "ws" else "1s"
        client = procs.spawn("opampgo-client", [os.path.join(args.bin, "opampgo-client"),
                                                "--endpoint", srv.url(t), "--name", name, "--heartbeat", hb])
        # A second client with EnableCompression: gzip request bodies over HTTP (HTTP-3),
        # permessage-deflate offered over WebSocket.
        gz_name = f"opampgo-{t}-compressed"
        gz = procs.spawn("opampgo-client-compressed", [os.path.join(args.bin, "opampgo-client"), "--endpoint",
                                                       srv.url(t), "--name", gz_name, "--heartbeat", "1s", "--compress"])
        got = client_common(peer, t, srv, procs, name, lambda a: a.get("service_name") == name, 10, True,
                            initial="no remote config applied yet")
        if got:
            uid, took = got
            a = srv.agent(uid)
            if t == "ws":
                check(peer, t, "server-initiated push: config APPLIED before the 30 s heartbeat",
                      took < 10, f"took {took:.1f} s")
            ev = procs.events("opampgo-client")
            check(peer, t, "custom message sent and accepted (no server error)",
                  any(e["event"] == "custom_message_sent" for e in ev)
                  and not any(e["event"] == "server_error" for e in ev), f"events {[e['event'] for e in ev]}")
            errs = [e for e in ev if e["event"] in ("library_error", "error", "connect_failed")]
            check(peer, t, "no errors logged by opamp-go", not errs, f"{errs[:3]}")
            check(peer, t, "still connected after custom message and configs", a["connected"], "")
        found = wait_until(20, lambda: srv.find(lambda a: a.get("service_name") == gz_name))
        gz_uid = found and found[0]["instance_uid"]
        st = gz_uid and srv.wait_status(gz_uid, srv.push(gz_uid, GOOD), "APPLIED", 10)
        check(peer, t, "with EnableCompression: listed and config APPLIED", st,
              f"agent {found and srv.agent(gz_uid)}")
        check(peer, t, "client still running", client.poll() is None, f"exit {client.returncode}")
        if got and t == "ws":
            # Over WebSocket, Stop sends agent_disconnect. The plain-HTTP client sends none
            # (quirk G3): the server can only time the session out (120 s by default).
            client.send_signal(signal.SIGTERM)
            gone = wait_until(15, lambda: not srv.agent(got[0])["connected"])
            check(peer, t, "shown disconnected after the client stops", gone,
                  f"agent {srv.agent(got[0])['connected']}")
        check(peer, t, "compressed client still running", gz.poll() is None, f"exit {gz.returncode}")
    finally:
        procs.stop()
    return procs


def run_java(args, t, state):
    peer = "java"
    procs = Procs(state)
    try:
        srv = RefServer(procs, args.server)
        if not check(peer, t, "reference server listens", srv.up, "no listener"):
            return procs
        with open(args.java_cp) as f:
            cp = os.path.join(os.path.dirname(args.java_cp), "classes") + os.pathsep + f.read().strip()
        name = f"java-{t}"
        client = procs.spawn("java-client", ["java", "-cp", cp, "io.opamprs.interop.JavaAgent",
                                             srv.url(t), name, "1"])
        # Java 1.53.0-alpha over WebSocket sends its description only after the server's
        # ReportFullState is followed by a later message (docs/interop-quirks.md): match by uid.
        started = wait_until(30, lambda: [e for e in procs.events("java-client") if e["event"] == "started"])
        uid = started and str(uuid.UUID(hex=started[0]["uid"]))
        got = client_common(peer, t, srv, procs, name, lambda a: a["instance_uid"] == uid, 15, False)
        if got:
            ev = procs.events("java-client")
            errs = [e for e in ev if e["event"] in ("server_error", "error", "connect_failed")]
            check(peer, t, "no errors reported by the Java client", not errs, f"{errs[:3]}")
        check(peer, t, "client still running", client.poll() is None, f"exit {client.returncode}")
    finally:
        procs.stop()
    return procs


# ---------------------------------------------------------------------------------------------
# The Collector with its opamp extension, and the supervisor


def opamp_server_block(t, url, indent):
    pad = " " * indent
    if t == "ws":
        return f"{pad}ws:\n{pad}  endpoint: {url}\n{pad}  tls:\n{pad}    insecure: true\n"
    return (f"{pad}http:\n{pad}  endpoint: {url}\n{pad}  polling_interval: 1s\n"
            f"{pad}  tls:\n{pad}    insecure: true\n")


def http_ok(port, path="/"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def run_collector(args, t, state):
    peer = "collector"
    procs = Procs(state)
    try:
        srv = RefServer(procs, args.server)
        if not check(peer, t, "reference server listens", srv.up, "no listener"):
            return procs
        hc, grpc, http = free_port(), free_port(), free_port()
        cfg = (
            "extensions:\n"
            f"  health_check:\n    endpoint: 127.0.0.1:{hc}\n"
            "  opamp:\n    server:\n" + opamp_server_block(t, srv.url(t), 6) +
            "    capabilities:\n      reports_effective_config: true\n      reports_health: true\n"
            "receivers:\n  otlp:\n    protocols:\n"
            f"      grpc:\n        endpoint: 127.0.0.1:{grpc}\n"
            f"      http:\n        endpoint: 127.0.0.1:{http}\n"
            "exporters:\n  debug: {}\n"
            "service:\n  telemetry:\n    metrics:\n      level: none\n"
            "  extensions: [health_check, opamp]\n"
            "  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n"
        )
        path = os.path.join(state, "collector.yaml")
        with open(path, "w") as f:
            f.write(cfg)
        col = procs.spawn("collector", [os.path.join(args.bin, "otelcol-interop"), "--config", path])
        up = wait_until(30, lambda: http_ok(hc) or col.poll() is not None)
        if not check(peer, t, "collector health_check endpoint answers", up and col.poll() is None,
                     "no answer on the health_check endpoint"):
            return procs
        found = wait_until(30, lambda: srv.find(lambda a: a.get("service_name") == "otelcol-interop"
                                                 and a["connected"]))
        if not check(peer, t, "listed and connected", found and len(found) == 1,
                     f"agents {[(a.get('service_name'), a['connected']) for a in srv.api('GET', '/api/v1/agents')]}"):
            return procs
        uid = found[0]["instance_uid"]
        a = srv.agent(uid)
        check(peer, t, f"transport is {ws_or_http(t)}", a["transport"] == ws_or_http(t), a["transport"])
        ident = a.get("identifying_attributes") or {}
        check(peer, t, "description (service.name, service.version, service.instance.id)",
              ident.get("service.version") == args.collector_version and ident.get("service.instance.id"),
              f"identifying {ident}")
        check(peer, t, "description: host.name and os.type",
              (a.get("non_identifying_attributes") or {}).get("os.type"), f"{a.get('non_identifying_attributes')}")
        a = wait_until(20, lambda: (lambda x: x if "debug" in effective_body(x) else None)(srv.agent(uid)))
        body = effective_body(a or srv.agent(uid))
        check(peer, t, "effective config reported (otlp receiver, debug exporter, health_check)",
              all(w in body for w in ("otlp", "debug", "health_check", str(grpc))), f"effective {body[:300]!r}")
        a = wait_until(20, lambda: (lambda x: x if (x.get("health") or {}).get("healthy") else None)(srv.agent(uid)))
        h = (a or srv.agent(uid)).get("health") or {}
        check(peer, t, "health reported healthy, with components",
              h.get("healthy") is True and h.get("components"), f"health {h}")
        caps = set(srv.agent(uid)["capabilities"])
        check(peer, t, "capabilities REPORTS_EFFECTIVE_CONFIG and REPORTS_HEALTH",
              {"REPORTS_EFFECTIVE_CONFIG", "REPORTS_HEALTH"} <= caps, f"{caps}")
        # The server closes every connection; the extension must come back as the same agent.
        seq = srv.agent(uid)["sequence_num"]
        closed = srv.api("POST", "/api/v1/agents/disconnect", b"{}", "application/json")["disconnected"]
        back = wait_until(30, lambda: (lambda x: x if x["connected"] and x["sequence_num"] > seq
                                        else None)(srv.agent(uid)), 0.5)
        check(peer, t, "reconnects as the same agent after the server disconnects it",
              back and len(srv.api("GET", "/api/v1/agents")) == 1, f"{closed} closed; agent {srv.agent(uid)}")
        check(peer, t, "collector still running", col.poll() is None, f"exit {col.returncode}")
    finally:
        procs.stop()
    return procs


HOSTMETRICS = (
    b"receivers:\n  hostmetrics:\n    collection_interval: 10s\n    scrapers:\n      memory: {}\n      load: {}\n"
    b"exporters:\n  debug:\n    verbosity: basic\n"
    b"service:\n  pipelines:\n    metrics:\n      receivers: [hostmetrics]\n      exporters: [debug]\n"
)
BROKEN = (
    b"receivers:\n  nosuchreceiver: {}\n"
    b"exporters:\n  debug: {}\n"
    b"service:\n  pipelines:\n    metrics:\n      receivers: [nosuchreceiver]\n      exporters: [debug]\n"
)


def the_connected_agent(peer, t, srv):
    """The one agent the reference server lists as connected (a supervisor's), or None."""
    found = wait_until(45, lambda: srv.find(lambda a: a["connected"]))
    if not check(peer, t, "listed and connected", found and len(found) == 1,
                 f"agents {srv.api('GET', '/api/v1/agents')}"):
        return None
    return found[0]["instance_uid"]


def broken_config_fails(peer, t, srv, uid):
    """Pushes BROKEN; the collector's own error must come back in FAILED."""
    h = srv.push(uid, BROKEN)
    st = srv.wait_status(uid, h, "FAILED", 90)
    check(peer, t, "broken config FAILED with the collector's message",
          st and "nosuchreceiver" in st.get("error_message", ""),
          f"status {srv.agent(uid).get('remote_config_status')}")
    if st:
        print(f"  ({peer} error_message: {st.get('error_message')[:300]!r})", flush=True)


def run_supervisor(args, t, state):
    peer = "supervisor"
    procs = Procs(state)
    try:
        srv = RefServer(procs, args.server)
        if not check(peer, t, "reference server listens", srv.up, "no listener"):
            return procs
        storage = os.path.join(state, "supervisor-storage")
        os.makedirs(storage)
        local = os.path.join(state, "local.yaml")
        with open(local, "w") as f:  # merged last: keeps the collector off fixed ports
            f.write("service:\n  telemetry:\n    metrics:\n      level: none\n")
        server_block = f"  endpoint: {srv.url(t)}\n  tls:\n    insecure: true\n"
        cfg = (
            "server:\n" + server_block +
            "capabilities:\n  accepts_remote_config: true\n  reports_effective_config: true\n"
            "  reports_remote_config: true\n  reports_health: true\n  reports_own_metrics: false\n"
            "  reports_heartbeat: true\n"
            f"agent:\n  executable: {os.path.join(args.bin, 'otelcol-interop')}\n"
            "  config_apply_timeout: 10s\n  bootstrap_timeout: 10s\n"
            # validate_config: the supervisor runs `otelcol validate` first and reports its
            # output in FAILED; passthrough_logs: the collector's log lands in ours.
            "  validate_config: true\n  passthrough_logs: true\n"
            f"  config_files: [\"$OWN_TELEMETRY_CONFIG\", \"$OPAMP_EXTENSION_CONFIG\", \"$REMOTE_CONFIG\", {local}]\n"
            f"storage:\n  directory: {storage}\n"
            "telemetry:\n  logs:\n    level: info\n"
        )
        path = os.path.join(state, "supervisor.yaml")
        with open(path, "w") as f:
            f.write(cfg)
        sup = procs.spawn("supervisor", [os.path.join(args.bin, "opampsupervisor"), "--config", path], group=True)
        uid = the_connected_agent(peer, t, srv)
        if uid is None:
            return procs
        a = wait_until(30, lambda: (lambda x: x if x.get("service_name") else None)(srv.agent(uid))) or srv.agent(uid)
        check(peer, t, f"transport is {ws_or_http(t)}", a["transport"] == ws_or_http(t), a["transport"])
        ident = a.get("identifying_attributes") or {}
        check(peer, t, "description of the collector it runs (service.name, service.version)",
              ident.get("service.name") and ident.get("service.version") == args.collector_version,
              f"identifying {ident}")
        check(peer, t, "capabilities ACCEPTS_REMOTE_CONFIG, REPORTS_REMOTE_CONFIG",
              {"ACCEPTS_REMOTE_CONFIG", "REPORTS_REMOTE_CONFIG", "REPORTS_EFFECTIVE_CONFIG"} <= set(a["capabilities"]),
              f"{a['capabilities']}")

        h = srv.push(uid, HOSTMETRICS)
        st = srv.wait_status(uid, h, "APPLIED", 90)  # over HTTP it polls every 30 s (S2)
        check(peer, t, "hostmetrics config APPLIED with its hash", st,
              f"status {srv.agent(uid).get('remote_config_status')}")
        a = wait_until(30, lambda: (lambda x: x if "hostmetrics" in effective_body(x) else None)(srv.agent(uid)))
        body = effective_body(a or srv.agent(uid))
        check(peer, t, "collector's effective config runs the hostmetrics receiver",
              "hostmetrics" in body and "debug" in body, f"effective {body[:300]!r}")
        a = wait_until(30, lambda: (lambda x: x if (x.get("health") or {}).get("healthy") else None)(srv.agent(uid)))
        check(peer, t, "health reported healthy", a, f"health {srv.agent(uid).get('health')}")
        seen_metrics = wait_until(30, lambda: '"data points"' in procs.log("supervisor")
                                  or "data points" in procs.log("supervisor"), 1)
        check(peer, t, "collector exports host metrics with the debug exporter", seen_metrics,
              "no debug exporter output in the supervisor log")

        broken_config_fails(peer, t, srv, uid)
        check(peer, t, "supervisor still running", sup.poll() is None, f"exit {sup.returncode}")
    finally:
        procs.stop()
    return procs


def run_our_supervisor(args, t, state):
    """Our opamp-supervisor (examples/supervisor) running the real Collector: the Collector
    does not speak OpAMP here; the supervisor composes its --config files, watches its
    health_check endpoint, and reports APPLIED / FAILED with the Collector's own error."""
    peer = "our-supervisor"
    procs = Procs(state)
    try:
        srv = RefServer(procs, args.server)
        if not check(peer, t, "reference server listens", srv.up, "no listener"):
            return procs
        storage = os.path.join(state, "supervisor-storage")
        health = free_port()
        local = os.path.join(state, "local.yaml")
        with open(local, "w") as f:  # a base pipeline, off fixed ports, with a health endpoint
            f.write(
                "receivers:\n  hostmetrics/base:\n    collection_interval: 60s\n"
                "    scrapers:\n      load: {}\n"
                "exporters:\n  debug/base: {}\n"
                f"extensions:\n  health_check:\n    endpoint: 127.0.0.1:{health}\n"
                "service:\n  extensions: [health_check]\n"
                "  telemetry:\n    metrics:\n      level: none\n"
                "  pipelines:\n    metrics/base:\n      receivers: [hostmetrics/base]\n"
                "      exporters: [debug/base]\n")
        cfg = (
            f"server:\n  endpoint: {srv.url(t)}\n"
            "capabilities:\n  accepts_remote_config: true\n  reports_effective_config: true\n"
            "  reports_remote_config: true\n  reports_health: true\n  reports_heartbeat: true\n"
            f"agent:\n  executable: {os.path.join(args.bin, 'otelcol-interop')}\n"
            f"  config_files: [{local}, $REMOTE_CONFIG]\n"
            "  config_apply_timeout: 5s\n  stop_timeout: 10s\n"
            "  description:\n    identifying_attributes:\n      service.name: otelcol-interop\n"
            f"  health_check:\n    endpoint: http://127.0.0.1:{health}/\n    interval: 1s\n"
            f"storage:\n  directory: {storage}\n"
        )
        path = os.path.join(state, "our-supervisor.yaml")
        with open(path, "w") as f:
            f.write(cfg)
        sup = procs.spawn("our-supervisor", [args.supervisor, "--config", path], group=True)
        uid = the_connected_agent(peer, t, srv)
        if uid is None:
            return procs
        a = srv.agent(uid)
        check(peer, t, f"transport is {ws_or_http(t)}", a["transport"] == ws_or_http(t), a["transport"])
        check(peer, t, "capabilities ACCEPTS_REMOTE_CONFIG, REPORTS_REMOTE_CONFIG, REPORTS_EFFECTIVE_CONFIG",
              {"ACCEPTS_REMOTE_CONFIG", "REPORTS_REMOTE_CONFIG", "REPORTS_EFFECTIVE_CONFIG"} <= set(a["capabilities"]),
              f"{a['capabilities']}")
        a = wait_until(30, lambda: (lambda x: x if (x.get("health") or {}).get("healthy") else None)(srv.agent(uid)))
        check(peer, t, "the collector's base config runs: healthy (its health_check endpoint)", a,
              f"health {srv.agent(uid).get('health')}")

        h = srv.push(uid, HOSTMETRICS)
        st = srv.wait_status(uid, h, "APPLIED", 90)  # over HTTP it polls every 30 s
        check(peer, t, "hostmetrics config APPLIED with its hash", st,
              f"status {srv.agent(uid).get('remote_config_status')}")
        a = wait_until(30, lambda: (lambda x: x if "hostmetrics:" in effective_body(x) else None)(srv.agent(uid)))
        body = effective_body(a or srv.agent(uid))
        check(peer, t, "effective config: the files given to the collector, the pushed one included",
              "collection_interval: 10s" in body and "hostmetrics/base" in body, f"effective {body[:300]!r}")
        log = os.path.join(storage, "agent.log")
        seen = wait_until(30, lambda: os.path.exists(log) and "data points" in open(log, errors="replace").read(), 1)
        check(peer, t, "the collector exports host metrics (debug exporter, in the supervisor's agent.log)",
              seen, "no debug exporter output in agent.log")

        broken_config_fails(peer, t, srv, uid)
        a = wait_until(30, lambda: (lambda x: x if (x.get("health") or {}).get("healthy")
                                    and "collection_interval: 10s" in effective_body(x)
                                    and "nosuchreceiver" not in effective_body(x) else None)(srv.agent(uid)))
        check(peer, t, "rolled back: the previous config runs again, healthy", a,
              f"health {srv.agent(uid).get('health')}, effective {effective_body(srv.agent(uid))[:200]!r}")
        check(peer, t, "supervisor still running", sup.poll() is None, f"exit {sup.returncode}")
    finally:
        procs.stop()
    return procs


# ---------------------------------------------------------------------------------------------
# Our reference agent against an opamp-go server


def run_opampgo_server(args, t, state):
    peer = "opampgo-server"
    procs = Procs(state)
    try:
        port = free_port()
        good, bad = os.path.join(state, "good.yaml"), os.path.join(state, "bad.yaml")
        with open(good, "wb") as f:
            f.write(GOOD)
        with open(bad, "wb") as f:
            f.write(BAD)
        server = procs.spawn("opampgo-server", [os.path.join(args.bin, "opampgo-server"), "--compress",
                                                "--listen", f"127.0.0.1:{port}", "--good", good, "--bad", bad])
        if not check(peer, t, "opamp-go server listens", wait_port(port, 20), "no listener"):
            return procs
        url = f"{'ws' if t == 'ws' else 'http'}://127.0.0.1:{port}/v1/opamp"
        agent = procs.spawn("reference-agent", [args.agent, "--endpoint", url, "--name", f"rs-agent-{t}",
                                                "--heartbeat", "1", "--state-dir", os.path.join(state, "agent")])
        ev = lambda: procs.events("opampgo-server")  # noqa: E731
        hashes = wait_until(5, lambda: [e for e in ev() if e["event"] == "configs"])
        good_hash, bad_hash = hashes[0]["good_hash"], hashes[0]["bad_hash"]
        msgs = lambda: [e for e in ev() if e["event"] == "message"]  # noqa: E731
        first = wait_until(20, msgs)
        if not check(peer, t, "the opamp-go server receives and decodes our messages", first,
                     f"events {[e['event'] for e in ev()]}"):
            return procs
        check(peer, t, f"transport is {ws_or_http(t)}", all(m["transport"] == ws_or_http(t) for m in msgs()), "")
        m0 = first[0]
        check(peer, t, "first message carries the description (service.name, host.name)",
              (m0.get("identifying") or {}).get("service.name") == f"rs-agent-{t}-0"
              or (m0.get("identifying") or {}).get("service.name") == f"rs-agent-{t}",
              f"first message {m0}")
        check(peer, t, "first message carries health and effective config",
              (m0.get("health") or {}).get("healthy") is True and m0.get("effective_config") is not None,
              f"first message {m0}")

        def status(h, s):
            return [m for m in msgs() if (m.get("remote_config_status") or {}).get("hash") == h
                    and (m["remote_config_status"]["status"] == f"RemoteConfigStatuses_{s}")]
        applied = wait_until(20, lambda: status(good_hash, "APPLIED"))
        check(peer, t, "pushed config APPLIED with its hash", applied, "no APPLIED status with the good hash")
        eff = wait_until(10, lambda: [m for m in msgs() if any(
            (f or {}).get("body") == GOOD.decode() for f in (m.get("effective_config") or {}).values())])
        check(peer, t, "effective config is the applied config", eff, "never reported")
        failed = wait_until(20, lambda: status(bad_hash, "FAILED"))
        check(peer, t, "rejected config FAILED with the agent's message",
              failed and "INVALID" in failed[0]["remote_config_status"]["error_message"],
              f"{failed and failed[0]['remote_config_status']}")
        if t == "ws":
            pushed = [e for e in ev() if e["event"] == "pushed"]
            check(peer, t, "second config was a server-initiated push (Connection.Send)",
                  pushed and pushed[0]["error"] == "<nil>", f"{pushed}")
        else:
            conn = [e for e in ev() if e["event"] == "connecting"]
            check(peer, t, "requests are application/x-protobuf",
                  conn and all(c["content_type"] == "application/x-protobuf" for c in conn), f"{conn[:2]}")
            # opamp-go's server gzips every response to `Accept-Encoding: gzip` (exactly that
            # value): every reply our agent decoded was compressed (HTTP-4).
            check(peer, t, "requests send Accept-Encoding: gzip, gzip replies decoded (HTTP-4)",
                  conn and all(c.get("accept_encoding") == "gzip" for c in conn),
                  f"{sorted({c.get('accept_encoding') for c in conn})}")
            want = str(uuid.UUID(hex=m0["uid"]))
            check(peer, t, "requests carry OpAMP-Instance-UID with the canonical uid (HTTP-5)",
                  conn and all(c.get("instance_uid_header") == want for c in conn),
                  f"want {want}, got {sorted({c.get('instance_uid_header') for c in conn})}")
        asked = wait_until(10, lambda: [e for e in ev() if e["event"] == "asked_full_state"])
        full = asked and wait_until(10, lambda: [
            m for m in msgs() if m["seq"] > asked[0]["after_seq"] and m.get("identifying")
            and m.get("health") and m.get("effective_config") is not None and m.get("remote_config_status")])
        check(peer, t, "ReportFullState answered with description, health, effective config, status (SEQ-3)",
              full, f"asked {asked}; messages after: {[m for m in msgs() if asked and m['seq'] > asked[0]['after_seq']][:2]}")
        time.sleep(2)  # a few heartbeats more
        seqs = [m["seq"] for m in msgs()]
        gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
        check(peer, t, "sequence_num increases by exactly 1 (SEQ-1)", seqs and not gaps,
              f"gaps {gaps[:5]} in {seqs[:20]}")
        uids = {m["uid"] for m in msgs()}
        check(peer, t, "one instance uid throughout", len(uids) == 1, f"{uids}")
        errs = [e for e in ev() if e["event"] in ("read_error", "library_error")]
        check(peer, t, "no read errors on the opamp-go server", not errs, f"{errs[:3]}")
        check(peer, t, "reference agent still running", agent.poll() is None, f"exit {agent.returncode}")
        check(peer, t, "opamp-go server still running", server.poll() is None, f"exit {server.returncode}")
        agent.send_signal(signal.SIGTERM)  # the agent first, while the server still listens
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        disc = wait_until(5, lambda: [m for m in msgs() if m.get("disconnect")])
        check(peer, t, "agent_disconnect sent on stop", disc, "none seen")
    finally:
        procs.stop()
    return procs


RUNNERS = {
    "collector": run_collector,
    "supervisor": run_supervisor,
    "our-supervisor": run_our_supervisor,
    "opampgo-client": run_opampgo_client,
    "opampgo-server": run_opampgo_server,
    "java": run_java,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="examples/server binary")
    ap.add_argument("--agent", required=True, help="examples/agent binary")
    ap.add_argument("--supervisor", required=True, help="our opamp-supervisor binary (examples/supervisor)")
    ap.add_argument("--bin", required=True, help="directory with the built Go peers")
    ap.add_argument("--java-cp", required=True, help="classpath file written by install.sh")
    ap.add_argument("--collector-version", required=True, help="the collector release pinned")
    ap.add_argument("--only", action="append", default=[], help="a peer (repeatable): " + ", ".join(PEERS))
    args = ap.parse_args()
    for k in ("server", "agent", "supervisor", "bin", "java_cp"):  # the peers run in their own directories
        setattr(args, k, os.path.abspath(getattr(args, k)))
    only = [p for o in args.only for p in o.split(",") if p]
    unknown = [p for p in only if p not in PEERS]
    if unknown:
        print(f"unknown peer(s) {unknown}; known: {PEERS}", file=sys.stderr)
        return 2
    peers = [p for p in PEERS if not only or p in only]

    need = {
        "collector": ["otelcol-interop"], "supervisor": ["opampsupervisor", "otelcol-interop"],
        "our-supervisor": ["otelcol-interop"],
        "opampgo-client": ["opampgo-client"], "opampgo-server": ["opampgo-server"], "java": [],
    }
    for peer in peers:
        missing = [b for b in need[peer] if not os.access(os.path.join(args.bin, b), os.X_OK)]
        if peer == "java" and not (os.path.exists(args.java_cp) and shutil.which("java")):
            missing.append(args.java_cp)
        for p in (args.server, args.agent) + ((args.supervisor,) if peer == "our-supervisor" else ()):
            if not os.access(p, os.X_OK):
                missing.append(p)
        if missing:
            for t in TRANSPORTS:
                check(peer, t, "prerequisites", False, f"missing {missing}: run tests/interop/install.sh")
            continue
        for t in TRANSPORTS:
            state = tempfile.mkdtemp(prefix=f"opamp-interop-{peer}-{t}-")
            before = results.count(False)
            procs = None
            t0 = time.time()
            try:
                procs = RUNNERS[peer](args, t, state)
            except Exception as e:  # a harness error is a failed check, never a skip
                check(peer, t, "harness", False, f"{type(e).__name__}: {e}")
            print(f"  ({peer} over {t}: {time.time() - t0:.0f} s)", flush=True)
            if procs and (results.count(False) > before or os.environ.get("OPAMP_INTEROP_SHOW_LOGS")):
                procs.dump()
            shutil.rmtree(state, ignore_errors=True)
    print(f"  (peers.py: {results.count(True)} passed, {results.count(False)} failed; run.sh prints the total)",
          flush=True)
    return 0 if results and all(results) else 1


def on_sigterm(signum, frame):
    # run.sh's timeout: unwind, so that every `finally` stops its peers by PID.
    raise SystemExit(f"peers.py: stopped by signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(main())
