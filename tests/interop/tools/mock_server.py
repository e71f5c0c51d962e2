#!/usr/bin/env python3
"""A tiny throwaway OpAMP plain-HTTP server, for debugging the interop peers.

Run it with the interop venv's Python (it decodes messages with the pb2 classes
shipped in the `opentelemetry-opamp-client` package):

    "$CACHE/venv/bin/python" tests/interop/tools/mock_server.py --port 4320 \
        --push '{"level":"debug"}' --push '{"level":"INVALID"}' --expect-agents 3

It listens on 127.0.0.1 only, answers POST /v1/opamp with a ServerToAgent and
prints one JSON line per request to stdout (request headers, the decoded
AgentToServer, what it answered). It can push a sequence of remote configs to
every agent (the next one once the agent reported a final status for the
previous one), check the statuses the agents report, and inject faults
(HTTP status codes, Retry-After, wrong Content-Type, unasked-for gzip, a
missing instance_uid, ServerErrorResponse, ReportFullState flags).

Exit codes: 0 once --expect-agents agents passed every push (or on SIGTERM /
SIGINT / --timeout without --expect-agents); 1 on --timeout with
expectations unmet; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    from opentelemetry._opamp.proto import opamp_pb2 as pb
except ImportError:  # pragma: no cover - depends on the interpreter used
    sys.exit(
        "mock_server.py: cannot import opentelemetry._opamp; run it with the "
        "interop venv's python (see tests/interop/install.sh)"
    )

REJECT_MESSAGE = "rejected: config contains INVALID"


def cap_names(enum, value: int, prefix: str) -> list[str]:
    names = []
    for name, bit in enum.items():
        if bit and value & bit:
            names.append(name[len(prefix):])
    return names


def anyvalue(v) -> object:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    val = getattr(v, kind)
    if kind == "bytes_value":
        return val.hex()
    if kind in ("array_value", "kvlist_value"):
        return str(val)
    return val


def config_map_summary(config_map) -> dict:
    return {
        name: {"content_type": f.content_type, "body": f.body.decode("utf-8", "replace")}
        for name, f in sorted(config_map.config_map.items())
    }


def summarize_a2s(m) -> dict:
    out: dict = {
        "instance_uid": m.instance_uid.hex(),
        "instance_uid_len": len(m.instance_uid),
        "sequence_num": m.sequence_num,
        "capabilities": m.capabilities,
        "capability_names": cap_names(pb.AgentCapabilities, m.capabilities, "AgentCapabilities_"),
    }
    if m.HasField("agent_description"):
        d = m.agent_description
        out["agent_description"] = {
            "identifying": {kv.key: anyvalue(kv.value) for kv in d.identifying_attributes},
            "non_identifying": {kv.key: anyvalue(kv.value) for kv in d.non_identifying_attributes},
        }
    if m.HasField("remote_config_status"):
        s = m.remote_config_status
        out["remote_config_status"] = {
            "hash": s.last_remote_config_hash.hex(),
            "status": pb.RemoteConfigStatuses.Name(s.status),
            "error_message": s.error_message,
        }
    if m.HasField("effective_config"):
        out["effective_config"] = config_map_summary(m.effective_config.config_map)
    if m.HasField("health"):
        out["health"] = {"healthy": m.health.healthy, "status": m.health.status}
    if m.HasField("agent_disconnect"):
        out["agent_disconnect"] = True
    if m.flags:
        out["flags"] = m.flags
    for field in ("package_statuses", "connection_settings_request", "custom_capabilities",
                  "custom_message", "available_components"):
        if m.HasField(field):
            out[field] = True
    return out


def brief(rec: dict) -> str:
    """One short human-readable line for a request record."""
    a = rec.get("a2s", {})
    parts = [f"#{rec['n']}", f"{rec.get('agent') or a.get('instance_uid', '?')[:8]}", f"seq={a.get('sequence_num')}"]
    if "agent_description" in a:
        parts.append("desc")
    if "remote_config_status" in a:
        s = a["remote_config_status"]
        parts.append(f"rcs={s['status'].split('_')[-1]}:{s['hash'][:8]}" + (f":{s['error_message']!r}" if s["error_message"] else ""))
    if "effective_config" in a:
        parts.append("eff=" + json.dumps(a["effective_config"], separators=(",", ":")))
    for k in ("agent_disconnect", "health", "flags"):
        if k in a:
            parts.append(k)
    if "seq_anomaly" in rec:
        parts.append(f"SEQ-ANOMALY({rec['seq_anomaly']})")
    if "verdict" in rec:
        parts.append(f"verdict={rec['verdict']['result']}")
    if "error" in rec:
        parts.append("ERROR " + rec["error"])
    r = rec.get("resp", {})
    parts.append("-> " + " ".join(f"{k}={v['push'] if k == 'remote_config' else v}" for k, v in r.items()))
    return f"{rec['t']:.3f} " + " ".join(parts)


class Push:
    def __init__(self, body: str, content_type: str, filename: str):
        self.body = body.encode("utf-8")
        self.content_type = content_type
        self.filename = filename
        h = hashlib.sha256()
        h.update(filename.encode() + b"\0" + content_type.encode() + b"\0" + self.body)
        self.hash = h.digest()
        self.expect_failed = b"INVALID" in self.body

    def to_pb(self):
        rc = pb.AgentRemoteConfig(config_hash=self.hash)
        f = rc.config.config_map[self.filename]
        f.body = self.body
        f.content_type = self.content_type
        return rc


class AgentState:
    def __init__(self):
        self.requests = 0
        self.push_index = 0  # index into pushes of the config currently offered
        self.results: list[str] = []  # one entry per finished push: "ok" or "bad: ..."
        self.last_seq: int | None = None
        self.name = None
        self.disconnected = False


class Mock:
    def __init__(self, args):
        self.args = args
        self.pushes = [Push(b, args.push_content_type, args.push_filename) for b in args.push]
        self.lock = threading.Lock()
        self.agents: dict[bytes, AgentState] = {}
        self.total = 0
        self.done = threading.Event()
        self.out = sys.stdout
        self.fault_requests = set(args.fault_requests or [])

    def emit(self, record: dict) -> None:
        line = brief(record) if self.args.brief else json.dumps(record, sort_keys=False)
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def check_done(self) -> None:
        n = self.args.expect_agents
        if not n:
            return
        finished = [
            a for a in self.agents.values()
            if len(a.results) == len(self.pushes) and all(r == "ok" for r in a.results)
        ]
        if len(finished) >= n:
            self.done.set()

    def handle(self, headers: dict, body: bytes) -> tuple[int, dict, bytes, dict]:
        """Returns (status, response headers, response body, log record)."""
        args = self.args
        with self.lock:
            self.total += 1
            n = self.total
        rec: dict = {"n": n, "t": round(time.time(), 3), "headers": headers}
        if headers.get("content-encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        a2s = pb.AgentToServer()
        try:
            a2s.ParseFromString(body)
        except Exception as exc:  # noqa: BLE001 - report anything
            rec["error"] = f"cannot decode AgentToServer: {exc}"
            return 400, {"Content-Type": "text/plain"}, b"bad protobuf\n", rec
        rec["a2s"] = summarize_a2s(a2s)

        s2a = pb.ServerToAgent(
            instance_uid={"echo": a2s.instance_uid, "empty": b"", "other": bytes(16),
                          "short": a2s.instance_uid[:8]}[args.instance_uid],
            capabilities=(pb.ServerCapabilities_AcceptsStatus
                          | pb.ServerCapabilities_OffersRemoteConfig
                          | pb.ServerCapabilities_AcceptsEffectiveConfig),
        )
        with self.lock:
            st = self.agents.setdefault(a2s.instance_uid, AgentState())
            st.requests += 1
            if st.last_seq is not None and a2s.sequence_num != st.last_seq + 1:
                rec["seq_anomaly"] = f"previous {st.last_seq}, now {a2s.sequence_num}"
            st.last_seq = a2s.sequence_num
            if "agent_description" in rec["a2s"]:
                st.name = rec["a2s"]["agent_description"]["identifying"].get("service.name")
            rec["agent"] = st.name
            if a2s.HasField("agent_disconnect"):
                st.disconnected = True
            # Judge a reported status against the config currently offered.
            if a2s.HasField("remote_config_status") and st.push_index < len(self.pushes):
                cur = self.pushes[st.push_index]
                s = a2s.remote_config_status
                if s.last_remote_config_hash == cur.hash and s.status in (
                    pb.RemoteConfigStatuses_APPLIED, pb.RemoteConfigStatuses_FAILED
                ):
                    want = pb.RemoteConfigStatuses_FAILED if cur.expect_failed else pb.RemoteConfigStatuses_APPLIED
                    if s.status != want:
                        verdict = f"bad: status {pb.RemoteConfigStatuses.Name(s.status)}"
                    elif cur.expect_failed and s.error_message != REJECT_MESSAGE:
                        verdict = f"bad: error_message {s.error_message!r}"
                    else:
                        verdict = "ok"
                    st.results.append(verdict)
                    st.push_index += 1
                    rec["verdict"] = {"push": st.push_index, "result": verdict}
            # Offer the current config (every response, like a server that
            # resends until the agent reports on it) after --push-after polls.
            if st.push_index < len(self.pushes) and st.requests > args.push_after:
                s2a.remote_config.CopyFrom(self.pushes[st.push_index].to_pb())
                rec.setdefault("resp", {})["remote_config"] = {
                    "push": st.push_index + 1, "hash": self.pushes[st.push_index].hash.hex(),
                }
            self.check_done()

        if n in set(args.full_state_requests or []):
            s2a.flags |= pb.ServerToAgentFlags_ReportFullState
        if args.full_state_on_gap and "seq_anomaly" in rec:
            s2a.flags |= pb.ServerToAgentFlags_ReportFullState
        if s2a.flags:
            rec.setdefault("resp", {})["flags"] = s2a.flags

        status = 200
        resp_headers = {"Content-Type": args.content_type}
        if n in self.fault_requests:
            rec.get("resp", {}).pop("remote_config", None)  # the fault answer replaces everything
            if args.fault == "unavailable":
                s2a = pb.ServerToAgent(instance_uid=a2s.instance_uid)
                s2a.error_response.type = pb.ServerErrorResponseType_Unavailable
                s2a.error_response.error_message = "mock: unavailable"
                if args.retry_after is not None:
                    s2a.error_response.retry_info.retry_after_nanoseconds = int(args.retry_after) * 10**9
            elif args.fault == "badrequest":
                s2a = pb.ServerToAgent(instance_uid=a2s.instance_uid)
                s2a.error_response.type = pb.ServerErrorResponseType_BadRequest
                s2a.error_response.error_message = "mock: bad request"
            else:
                status = int(args.fault)
                resp_headers = {"Content-Type": "text/plain"}
                if args.retry_after is not None:
                    resp_headers["Retry-After"] = str(args.retry_after)
                rec.setdefault("resp", {})["fault"] = status
                return status, resp_headers, b"mock fault\n", rec
            rec.setdefault("resp", {})["fault"] = args.fault

        out = s2a.SerializeToString()
        if args.gzip:
            out = gzip.compress(out)
            resp_headers["Content-Encoding"] = "gzip"
        rec.setdefault("resp", {})["status"] = status
        return status, resp_headers, out, rec


def make_handler(mock: Mock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real server

        def log_message(self, fmt, *a):  # silence the default access log
            pass

        def do_POST(self):  # noqa: N802 - http.server naming
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path != mock.args.path:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mock.args.delay:
                time.sleep(mock.args.delay)
            status, resp_headers, out, rec = mock.handle(headers, body)
            self.send_response(status)
            for k, v in resp_headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            mock.emit(rec)

        def do_GET(self):  # noqa: N802
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=4320, help="0 picks a free port (printed to stderr)")
    p.add_argument("--brief", action="store_true", help="one short line per request instead of JSON")
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.add_argument("--path", default="/v1/opamp")
    p.add_argument("--push", action="append", default=[],
                   help="a remote config body to push (repeat for a sequence; a body containing "
                        "INVALID must be reported FAILED with %r)" % REJECT_MESSAGE)
    p.add_argument("--push-filename", default="config.json")
    p.add_argument("--push-content-type", default="application/json")
    p.add_argument("--push-after", type=int, default=1, help="polls of an agent before its first push")
    p.add_argument("--expect-agents", type=int, default=0,
                   help="exit 0 once this many agents reported the right status for every push")
    p.add_argument("--linger", type=float, default=0.0, help="seconds to keep serving after expectations are met")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering each request")
    p.add_argument("--content-type", default="application/x-protobuf", help="response Content-Type")
    p.add_argument("--gzip", action="store_true", help="gzip every response body, asked for or not")
    p.add_argument("--instance-uid", choices=["echo", "empty", "other", "short"], default="echo",
                   help="instance_uid in responses: the agent's (echo), none, 16 zero bytes, or its first 8 bytes")
    p.add_argument("--fault", help="HTTP status code, or 'unavailable' / 'badrequest' (ServerErrorResponse)")
    p.add_argument("--fault-requests", type=int, nargs="*", help="global 1-based request numbers that get --fault")
    p.add_argument("--retry-after", type=int, help="seconds, for the Retry-After header or RetryInfo")
    p.add_argument("--full-state-requests", type=int, nargs="*", help="request numbers answered with ReportFullState")
    p.add_argument("--full-state-on-gap", action="store_true",
                   help="answer ReportFullState when sequence_num is not previous+1 (what the spec suggests)")
    args = p.parse_args()

    mock = Mock(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(mock))
    server.daemon_threads = True
    port = server.server_address[1]
    print(f"mock_server: listening on http://127.0.0.1:{port}{args.path}", file=sys.stderr, flush=True)
    if args.port_file:
        with open(args.port_file, "w", encoding="utf-8") as f:
            f.write(f"{port}\n")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    deadline = time.monotonic() + args.timeout if args.timeout else None
    rc = 0
    while not stop.is_set():
        if mock.done.is_set():
            print("mock_server: expectations met", file=sys.stderr, flush=True)
            stop.wait(args.linger)
            break
        if deadline and time.monotonic() > deadline:
            if args.expect_agents:
                rc = 1
                print("mock_server: TIMEOUT, expectations not met", file=sys.stderr, flush=True)
            break
        stop.wait(0.1)

    with mock.lock:
        summary = {
            (a.name or uid.hex()): {"requests": a.requests, "results": a.results, "disconnected": a.disconnected}
            for uid, a in mock.agents.items()
        }
    print("mock_server: summary " + json.dumps(summary, sort_keys=True), file=sys.stderr, flush=True)
    server.shutdown()
    server.server_close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
