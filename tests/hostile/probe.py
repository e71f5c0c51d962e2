#!/usr/bin/env python3
"""Hostile-input probes for the opamp reference server and agent, over loopback.

    python3 tests/hostile/probe.py --server target/debug/opamp-reference-server \
        --agent target/debug/opamp-reference-agent [--only NAME[,NAME]] [--out FILE] [--check]

Python 3.11 standard library only: raw sockets, a minimal WebSocket framing (RFC 6455) and a
minimal protobuf encoder/decoder for the few AgentToServer / ServerToAgent fields used here
(field numbers from crates/opamp-proto/proto/opamp/v1/opamp.proto).

Server probes: each runs against a fresh reference server on free 127.0.0.1 ports, with a
well-behaved agent (one plain-HTTP and one WebSocket agent, a round trip each every ~200 ms)
measuring its round-trip time meanwhile. The server's RSS comes from /proc/PID/status (VmRSS,
sampled every 50 ms, and VmHWM, reset through /proc/PID/clear_refs before the probe).

Client probes: small hostile servers written here; the reference agent connects to them and
its connections, requests, full reports, restarts, RSS and CPU time are counted.

Every loop is bounded in count and time; everything stops by itself; loopback only. The exit
status is non-zero if a server crashed (or with --check, on any verdict other than OK).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib

MIB = 1024 * 1024
LIMIT = 64 * MIB  # DEFAULT_MAX_MESSAGE_SIZE (WS-8, HTTP-13)
HOST = "127.0.0.1"
RSS_CAP_KB = 8 * 1024 * 1024  # the sampler kills a server above 8 GiB: memory safety
AFTER_WAIT = 3.0  # seconds between closing a probe's sockets and reading "after"
FIRST_MESSAGE_DEADLINE = 15  # the server's default first-message timeout, in s
SLOW_HOLD = 36.0  # slow-loris observation; the server's header/body deadlines are 30 s
CLIENT_WINDOW = 10.0  # client probes: seconds of agent behaviour counted
MEM_SLACK_KB = 32 * 1024  # "after" within max(32 MiB, 50 %) of "before" counts as returned

# ---------------------------------------------------------------------------------------------
# protobuf (just what is needed)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def f_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v)


def f_bytes(num: int, b: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(b)) + b


def f_fixed64(num: int, v: int) -> bytes:
    return varint(num << 3 | 1) + struct.pack("<Q", v)


def pb_decode(buf: bytes) -> dict[int, list]:
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 2:
            n, i = read_varint(buf, i)
            v, i = buf[i : i + n], i + n
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def kv(key: str, val: str) -> bytes:  # KeyValue{key, AnyValue{string_value}}
    return f_bytes(1, key.encode()) + f_bytes(2, f_bytes(1, val.encode()))


# AgentCapabilities: ReportsStatus | AcceptsRemoteConfig | ReportsEffectiveConfig |
# ReportsHealth | ReportsRemoteConfig | ReportsHeartbeat
GOOD_CAPS = 0x1 | 0x2 | 0x4 | 0x800 | 0x1000 | 0x2000


def description(name: str, extra: bytes = b"") -> bytes:
    ident = f_bytes(1, kv("service.name", name)) + f_bytes(1, kv("service.version", "probe"))
    return f_bytes(3, ident + f_bytes(2, kv("host.name", "probe")) + extra)


def a2s(uid: bytes, seq: int, full: bool = False, name: str = "probe", caps: int = GOOD_CAPS,
        extra: bytes = b"", disconnect: bool = False, flags: int = 0) -> bytes:
    m = f_bytes(1, uid) + f_varint(2, seq) + f_varint(4, caps)
    if full:
        m += description(name)
        m += f_bytes(5, f_varint(1, 1) + f_bytes(4, b"running"))
    if flags:
        m += f_varint(10, flags)
    if disconnect:
        m += f_bytes(9, b"")
    return m + extra


ERR_TYPES = {0: "Unknown", 1: "BadRequest", 2: "Unavailable"}


def s2a_summary(data: bytes) -> str:
    """One line naming what a ServerToAgent says."""
    try:
        m = pb_decode(data)
    except ValueError as e:
        return f"undecodable ServerToAgent ({e})"
    parts = []
    if 2 in m:
        e = pb_decode(m[2][0])
        t = ERR_TYPES.get(e.get(1, [0])[0], "?")
        msg = e.get(2, [b""])[0].decode("utf-8", "replace")[:60]
        retry = ""
        if 3 in e:
            ns = pb_decode(e[3][0]).get(1, [0])[0]
            retry = f", retry {ns / 1e9:g} s"
        parts.append(f"ErrorResponse {t} '{msg}'{retry}")
    if m.get(6, [0])[0] & 1:
        parts.append("ReportFullState")
    if 8 in m:
        parts.append("new_instance_uid")
    if 9 in m:
        parts.append("Command")
    if 3 in m:
        parts.append("RemoteConfig")
    return "S2A " + (", ".join(parts) if parts else "ok")


def s2a_flags(data: bytes) -> int:
    return pb_decode(data).get(6, [0])[0]


def uuid7() -> bytes:
    ms = int(time.time() * 1000)
    b = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    b[6] = 0x70 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    return bytes(b)


def uid_str(b: bytes) -> str:
    return str(uuid.UUID(bytes=b))


# ---------------------------------------------------------------------------------------------
# sockets, HTTP/1.1 and WebSocket


class Stream:
    """A socket with a read buffer and deadline-bounded reads."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    def connect(cls, addr, timeout: float = 3.0) -> "Stream":
        s = socket.create_connection(addr, timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s)

    def fill(self, deadline: float) -> None:
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError("deadline")
        self.sock.settimeout(t)
        d = self.sock.recv(1 << 20)
        if not d:
            raise EOFError("connection closed")
        self.buf += d

    def read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self.fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def discard(self, n: int, deadline: float) -> None:
        while n > 0:
            if not self.buf:
                self.fill(deadline)
            k = min(n, len(self.buf))
            del self.buf[:k]
            n -= k

    def read_until(self, sep: bytes, deadline: float, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ValueError("line too long")
            self.fill(deadline)

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Resp:
    def __init__(self, version, status, headers, body):
        self.version, self.status, self.headers, self.body = version, status, headers, body

    def __str__(self):
        extra = ""
        if "retry-after" in self.headers:
            extra = f" Retry-After {self.headers['retry-after']}"
        return f"{self.status}{extra}"


def read_response(st: Stream, deadline: float, method: str = "POST",
                  keep_body: bool = True) -> Resp:
    head = st.read_until(b"\r\n\r\n", deadline).decode("latin1")
    lines = head.split("\r\n")
    first = lines[0].split(" ", 2)
    version, status = first[0], int(first[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if status == 101 or method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        pass
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if keep_body:
            body = st.read_exact(n, deadline)
        else:
            st.discard(n, deadline)
            body = b"<%d bytes>" % n
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks, total = [], 0
        while True:
            n = int(st.read_until(b"\r\n", deadline).split(b";")[0], 16)
            if n == 0:
                st.read_until(b"\r\n", deadline)
                break
            if keep_body:
                chunks.append(st.read_exact(n, deadline))
            else:
                st.discard(n, deadline)
            total += n
            st.read_exact(2, deadline)
        body = b"".join(chunks) if keep_body else b"<%d bytes>" % total
    else:
        try:
            while True:
                st.fill(deadline)
        except EOFError:
            pass
        body, st.buf = bytes(st.buf), bytearray()
    return Resp(version, status, headers, body)


def post_head(addr, length: int, extra: str = "", version: str = "1.1",
              ctype: str = "application/x-protobuf") -> bytes:
    return (f"POST /v1/opamp HTTP/{version}\r\nHost: {addr[0]}:{addr[1]}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def post_once(addr, body: bytes, extra: str = "", timeout: float = 5.0,
              version: str = "1.1") -> Resp:
    st = Stream.connect(addr, timeout)
    try:
        st.send(post_head(addr, len(body), extra, version) + body)
        return read_response(st, time.monotonic() + timeout)
    finally:
        st.close()


def http_answer(resp: Resp) -> str:
    if resp.status == 200 and resp.headers.get("content-type", "").startswith(
            "application/x-protobuf"):
        return f"200 {s2a_summary(resp.body)}"
    return str(resp)


def ui_request(addr, method: str, path: str, body: bytes = b"", ctype: str = "text/plain",
               timeout: float = 30.0, keep_body: bool = True) -> Resp:
    st = Stream.connect(addr, timeout)
    try:
        st.send((f"{method} {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
                 f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n").encode() + body)
        return read_response(st, time.monotonic() + timeout, method, keep_body)
    finally:
        st.close()


ZERO_MASK = b"\0\0\0\0"


def ws_mask(data: bytes, key: bytes) -> bytes:
    if key == ZERO_MASK or not data:
        return data
    n = len(data)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def ws_frame_head(opcode: int, length: int, fin: bool = True, rsv1: bool = False,
                  key: bytes | None = ZERO_MASK, masked: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    m = 0x80 if masked else 0
    if length < 126:
        h = bytes([b0, m | length])
    elif length < 65536:
        h = bytes([b0, m | 126]) + struct.pack(">H", length)
    else:
        h = bytes([b0, m | 127]) + struct.pack(">Q", length)
    return h + (key if masked else b"")


def ws_frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False,
             masked: bool = True) -> bytes:
    key = os.urandom(4) if (masked and len(payload) <= 65536) else ZERO_MASK
    return (ws_frame_head(opcode, len(payload), fin, rsv1, key, masked)
            + (ws_mask(payload, key) if masked else payload))


def opamp_msg(pb: bytes) -> bytes:  # WS-2/WS-3: header 0x00, then the protobuf
    return ws_frame(2, b"\x00" + pb)


class HandshakeRefused(Exception):
    def __init__(self, resp: Resp):
        super().__init__(f"upgrade answered {resp}")
        self.resp = resp


def ws_connect(addr, timeout: float = 5.0, extra: str = "", version: str = "1.1") -> Stream:
    st = Stream.connect(addr, timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    try:
        st.send((f"GET /v1/opamp HTTP/{version}\r\nHost: {addr[0]}:{addr[1]}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        resp = read_response(st, time.monotonic() + timeout, "GET")
    except Exception:
        st.close()
        raise
    if resp.status != 101:
        st.close()
        raise HandshakeRefused(resp)
    st.handshake = resp  # type: ignore[attr-defined]
    return st


def ws_recv_frame(st: Stream, deadline: float):
    h = st.read_exact(2, deadline)
    fin, op, masked, n = h[0] & 0x80, h[0] & 0x0F, h[1] & 0x80, h[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", st.read_exact(2, deadline))[0]
    elif n == 127:
        n = struct.unpack(">Q", st.read_exact(8, deadline))[0]
    key = st.read_exact(4, deadline) if masked else ZERO_MASK
    payload = ws_mask(st.read_exact(n, deadline), key)
    return bool(fin), op, payload


def ws_recv(st: Stream, deadline: float, pong: bool = True):
    """Next event: ("bin", payload), ("text", payload), ("close", code, reason)."""
    parts, first_op = [], None
    while True:
        fin, op, payload = ws_recv_frame(st, deadline)
        if op == 8:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
            return ("close", code, payload[2:].decode("utf-8", "replace"))
        if op == 9:
            if pong:
                st.send(ws_frame(10, payload))
            continue
        if op == 10:
            continue
        if op != 0:
            first_op = op
        parts.append(payload)
        if fin:
            return ("bin" if first_op == 2 else "text", b"".join(parts))


def ws_payload_pb(payload: bytes) -> bytes:
    _, i = read_varint(payload, 0)
    return payload[i:]


def ws_outcome(st: Stream, timeout: float, want_reply: bool = True) -> str:
    """What the server does next on a WebSocket: a message, a close, EOF or nothing."""
    deadline = time.monotonic() + timeout
    try:
        ev = ws_recv(st, deadline)
    except TimeoutError:
        return f"held (nothing in {timeout:g} s)"
    except EOFError:
        return "connection closed (no close frame)"
    except OSError as e:
        return f"connection reset ({e.__class__.__name__})"
    if ev[0] == "close":
        return f"close {ev[1]}" + (f" '{ev[2][:50]}'" if ev[2] else "")
    if ev[0] == "bin":
        return s2a_summary(ws_payload_pb(ev[1]))
    return f"text frame {ev[1][:40]!r}"


def ws_close_quietly(st: Stream) -> None:
    try:
        st.send(ws_frame(8, struct.pack(">H", 1000)), timeout=0.5)
    except OSError:
        pass
    st.close()


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    p = s.getsockname()[1]
    s.close()
    return p


# ---------------------------------------------------------------------------------------------
# the server under test, its memory, and the well-behaved agent


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def proc_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Server:
    def __init__(self, binary: str, logdir: str, name: str):
        self.opamp = (HOST, free_port())
        self.ui = (HOST, free_port())
        self.log_path = os.path.join(logdir, f"server-{name}.log")
        self.log = open(self.log_path, "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.proc = subprocess.Popen(
            [binary, "--opamp-addr", f"{HOST}:{self.opamp[1]}", "--ui-addr", f"{HOST}:{self.ui[1]}",
             "--database", f"sqlite://{os.path.join(logdir, f'server-{name}.db')}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        for addr in (self.opamp, self.ui):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited at start ({self.proc.returncode}), see {self.log_path}")
                try:
                    socket.create_connection(addr, timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("server did not listen within 30 s")
                    time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> int:
        return proc_status(self.pid).get("VmRSS", 0)

    def hwm_kb(self) -> int:
        return proc_status(self.pid).get("VmHWM", 0)

    def reset_hwm(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Sampler(threading.Thread):
    """Samples VmRSS every 50 ms; kills the process above RSS_CAP_KB."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.max_kb, self.killed = pid, 0, False
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.wait(0.05):
            rss = proc_status(self.pid).get("VmRSS", 0)
            self.max_kb = max(self.max_kb, rss)
            if rss > RSS_CAP_KB and not self.killed:
                self.killed = True
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass


GOOD_HTTP_UID = uuid.UUID("01900000-0000-7000-8000-00000000c0de").bytes
GOOD_WS_UID = uuid.UUID("01900000-0000-7000-8000-00000000beef").bytes


class GoodAgent(threading.Thread):
    """A well-behaved plain-HTTP agent and WebSocket agent: one round trip each every 200 ms."""

    def __init__(self, addr):
        super().__init__(daemon=True)
        self.addr = addr
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.samples: list[tuple[str, float | None]] = []
        self.seq_h = self.seq_w = 0
        self.full_h = self.full_w = True
        self.pushes = 0  # pushed messages (remote config, command) the WS agent received
        self.reset_at = 0.0

    def reset(self):
        with self.lock:
            self.samples = []
            self.reset_at = time.monotonic()

    def stats(self):
        with self.lock:
            s = list(self.samples)
        rtts = [r for _, r in s if r is not None]
        fails = sum(1 for _, r in s if r is None)
        p50 = statistics.median(rtts) * 1000 if rtts else float("nan")
        mx = max(rtts) * 1000 if rtts else float("nan")
        return p50, mx, fails, len(s)

    def record(self, kind, rtt):
        with self.lock:
            # A round trip that began before the last reset belongs to the window before it.
            if rtt is not None and time.monotonic() - rtt < self.reset_at:
                return
            self.samples.append((kind, rtt))

    def http_round(self, st: Stream | None):
        t0 = time.monotonic()
        try:
            if st is None:
                st = Stream.connect(self.addr, 2)
            self.seq_h += 1
            body = a2s(GOOD_HTTP_UID, self.seq_h, full=self.full_h, name="good-http")
            st.send(post_head(self.addr, len(body)) + body, timeout=2)
            resp = read_response(st, t0 + 2)
            if resp.status != 200:
                raise ValueError(resp.status)
            self.full_h = bool(s2a_flags(resp.body) & 1)
            self.record("http", time.monotonic() - t0)
            if resp.headers.get("connection", "").lower() == "close":
                st.close()
                st = None
            return st
        except Exception:
            self.record("http", None)
            self.full_h = True
            if st is not None:
                st.close()
            return None

    def ws_round(self, ws: Stream | None):
        t0 = time.monotonic()
        try:
            if ws is None:
                ws = ws_connect(self.addr, 2)
                self.full_w = True
            self.seq_w += 1
            ws.send(opamp_msg(a2s(GOOD_WS_UID, self.seq_w, full=self.full_w, name="good-ws")), 2)
            while True:
                ev = ws_recv(ws, t0 + 2)
                if ev[0] == "close":
                    raise EOFError("closed")
                if ev[0] == "bin":
                    pb = ws_payload_pb(ev[1])
                    m = pb_decode(pb)
                    if 3 in m or 9 in m:
                        self.pushes += 1
                        continue  # a push, not the reply
                    self.full_w = bool(m.get(6, [0])[0] & 1)
                    break
            self.record("ws", time.monotonic() - t0)
            return ws
        except Exception:
            self.record("ws", None)
            if ws is not None:
                ws.close()
            return None

    def run(self):
        st = ws = None
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            st = self.http_round(st)
            ws = self.ws_round(ws)
            self.stop_ev.wait(max(0.0, 0.2 - (time.monotonic() - t0)))
        for s in (st, ws):
            if s is not None:
                s.close()


# ---------------------------------------------------------------------------------------------
# probe context and result


class Ctx:
    def __init__(self, server: Server, good: GoodAgent):
        self.server, self.good = server, good
        self.addr, self.ui = server.opamp, server.ui
        self.problems: list[str] = []
        self.during_kb = 0
        self.notes: list[str] = []

    def mark_during(self):
        self.during_kb = max(self.during_kb, self.server.rss_kb())

    def problem(self, text: str):
        self.problems.append(text)


SERVER_PROBES = []
CLIENT_PROBES = []


def probe(cls: str, name: str):
    def deco(fn):
        SERVER_PROBES.append((cls, name, fn))
        return fn
    return deco


def client_probe(cls: str, name: str, mode: str, scheme: str, limit: int, what: str):
    CLIENT_PROBES.append((cls, name, mode, scheme, limit, what))


def open_many(n: int, fn, deadline: float) -> list:
    out = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        try:
            out.append(fn())
        except Exception:
            break
    return out


def close_all(streams) -> None:
    for s in streams:
        s.close()


def watch_closes(streams, hold: float, tick=None) -> list[tuple[float, bytes]]:
    """Waits up to `hold` s for the server to close each stream; returns (t, first bytes)."""
    t0 = time.monotonic()
    done: dict[int, tuple[float, bytes]] = {}
    while time.monotonic() - t0 < hold and len(done) < len(streams):
        if tick:
            tick(streams, done)
        for i, st in enumerate(streams):
            if i in done:
                continue
            try:
                st.sock.setblocking(False)
                d = st.sock.recv(65536)
                st.buf += d
                if not d:
                    done[i] = (time.monotonic() - t0, bytes(st.buf[:80]))
            except BlockingIOError:
                pass
            except OSError:
                done[i] = (time.monotonic() - t0, bytes(st.buf[:80]))
            finally:
                try:
                    st.sock.setblocking(True)
                except OSError:
                    pass
        time.sleep(0.25)
    return [done[i] for i in sorted(done)]


def summarize_closes(n: int, closes, hold: float) -> str:
    if not closes:
        return f"{n}/{n} held for {hold:g} s"
    ts = sorted(t for t, _ in closes)
    first = closes[0][1].split(b"\r\n")[0].decode("latin1", "replace")
    if first.startswith("HTTP/"):
        first = "answered " + first.split(" ", 1)[1]
    elif first:
        first = f"data {first[:20]!r}"
    else:
        first = "no answer"
    return (f"{len(closes)}/{n} closed by server after {statistics.median(ts):.0f} s "
            f"(median; {first})" + (f", {n - len(closes)} held {hold:g} s" if len(closes) < n else ""))


# ---------------------------------------------------------------------------------------------
# server probes

@probe("slow-loris", "ws-upgrade-slowloris (200 sockets, 1 header byte/s)")
def p_upgrade_slowloris(c: Ctx):
    n = 200
    head = f"GET /v1/opamp HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nX-Slow: ".encode()
    socks = open_many(n, lambda: Stream.connect(c.addr), time.monotonic() + 10)
    for s in socks:
        s.send(head)
    last = [time.monotonic()]

    def tick(streams, done):
        if time.monotonic() - last[0] >= 1:
            last[0] = time.monotonic()
            for i, s in enumerate(streams):
                if i not in done:
                    try:
                        s.send(b"x", 0.1)
                    except OSError:
                        pass
    c.mark_during()
    closes = watch_closes(socks, SLOW_HOLD, tick)
    c.mark_during()
    close_all(socks)
    if len(closes) < len(socks):
        c.problem(f"{len(socks) - len(closes)} trickled upgrade requests held over {SLOW_HOLD:g} s")
    return summarize_closes(len(socks), closes, SLOW_HOLD)


@probe("slow-loris", "http-body-slowloris (200 POSTs, 1 body byte/s)")
def p_body_slowloris(c: Ctx):
    n = 200
    socks = open_many(n, lambda: Stream.connect(c.addr), time.monotonic() + 10)
    for s in socks:
        s.send(post_head(c.addr, 1000))
    last = [time.monotonic()]

    def tick(streams, done):
        if time.monotonic() - last[0] >= 1:
            last[0] = time.monotonic()
            for i, s in enumerate(streams):
                if i not in done:
                    try:
                        s.send(b"\x0a", 0.1)
                    except OSError:
                        pass
    closes = watch_closes(socks, SLOW_HOLD, tick)
    c.mark_during()
    close_all(socks)
    if len(closes) < len(socks):
        c.problem(f"{len(socks) - len(closes)} trickled bodies held over {SLOW_HOLD:g} s")
    return summarize_closes(len(socks), closes, SLOW_HOLD)


@probe("flood", "ws-tiny-message-flood (100k heartbeats, replies unread)")
def p_tiny_flood(c: Ctx):
    ws = ws_connect(c.addr)
    uid = uuid7()
    ws.send(opamp_msg(a2s(uid, 1, full=True)))
    ws_recv(ws, time.monotonic() + 3)
    batch = b"".join(opamp_msg(a2s(uid, i)) for i in range(2, 1002))
    sent, t0, outcome = 0, time.monotonic(), ""
    try:
        while sent < 100_000 and time.monotonic() - t0 < 8:
            ws.send(batch, timeout=2)
            sent += 1000
    except TimeoutError:
        outcome = "server stopped reading (send blocked 2 s)"
    except OSError as e:
        outcome = f"connection dropped ({e.__class__.__name__})"
    dt = time.monotonic() - t0
    c.mark_during()
    got, end = 0, "held"
    deadline = time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            ev = ws_recv(ws, deadline)
            if ev[0] == "close":
                end = f"close {ev[1]}"
                break
            got += 1
    except TimeoutError:
        pass
    except (EOFError, OSError):
        end = "connection closed"
    ws.close()
    return f"{sent} sent in {dt:.1f} s; {got} replies read afterwards; {end}" + (
        f"; {outcome}" if outcome else "")


@probe("flood", "ws-ping-flood (100k pings, pongs unread)")
def p_ping_flood(c: Ctx):
    ws = ws_connect(c.addr)
    ping = ws_frame(9, b"p")
    batch = ping * 1000
    sent, t0, outcome = 0, time.monotonic(), "held"
    try:
        while sent < 100_000 and time.monotonic() - t0 < 8:
            ws.send(batch, timeout=2)
            sent += 1000
    except TimeoutError:
        outcome = "server stopped reading (send blocked 2 s)"
    except OSError as e:
        outcome = f"connection dropped ({e.__class__.__name__})"
    c.mark_during()
    ws.close()
    return f"{sent} pings sent in {time.monotonic() - t0:.1f} s; {outcome}"


@probe("flood", "ws-fragment-flood (one message in 200k 1-byte fragments)")
def p_fragment_flood(c: Ctx):
    ws = ws_connect(c.addr)
    uid = uuid7()
    msg = b"\x00" + a2s(uid, 1, full=True, extra=f_bytes(13, f_bytes(3, b"z" * 200_000)))
    frames = [ws_frame(2, msg[:1], fin=False)]
    frames += [ws_frame(0, msg[i:i + 1], fin=False) for i in range(1, len(msg) - 1)]
    frames.append(ws_frame(0, msg[-1:], fin=True))
    data = b"".join(frames)
    t0, outcome = time.monotonic(), ""
    try:
        for i in range(0, len(data), 1 << 20):
            ws.send(data[i:i + (1 << 20)], timeout=5)
    except OSError as e:
        outcome = f"send failed ({e.__class__.__name__}); "
    c.mark_during()
    out = ws_outcome(ws, 5)
    ws.close()
    return f"{outcome}{len(frames)} fragments in {time.monotonic() - t0:.1f} s: {out}"


@probe("size", "ws-oversized-frame (one frame declaring 64 MiB + 1)")
def p_ws_oversized(c: Ctx):
    ws = ws_connect(c.addr)
    ws.send(ws_frame_head(2, LIMIT + 1))
    chunk, sent = b"\0" * MIB, 0
    try:
        for _ in range(4):
            ws.send(chunk, timeout=3)
            sent += 1
    except OSError:
        pass
    c.mark_during()
    out = ws_outcome(ws, 5)
    ws.close()
    if not out.startswith("close 1009"):
        c.problem(f"WS-9 wants close 1009, got {out}")
    return f"after {sent} MiB: {out}"


@probe("size", "ws-oversized-fragmented (65 x 1 MiB fragments)")
def p_ws_oversized_frag(c: Ctx):
    ws = ws_connect(c.addr)
    chunk, sent, err = b"\0" * MIB, 0, ""
    try:
        for i in range(65):
            ws.send(ws_frame_head(2 if i == 0 else 0, MIB, fin=(i == 64)) + chunk, timeout=3)
            sent += 1
    except OSError as e:
        err = f" (send stopped: {e.__class__.__name__})"
    c.mark_during()
    out = ws_outcome(ws, 5)
    ws.close()
    if not out.startswith("close 1009"):
        c.problem(f"WS-9 wants close 1009, got {out}")
    return f"after {sent} MiB{err}: {out}"


@probe("size", "http-oversized-content-length (64 MiB + 1 declared)")
def p_http_oversized(c: Ctx):
    st = Stream.connect(c.addr)
    t0 = time.monotonic()
    st.send(post_head(c.addr, LIMIT + 1))
    resp = ""
    try:  # a server that answers from the declared length alone answers now
        resp = str(read_response(st, t0 + 1))
    except TimeoutError:
        try:
            for _ in range(2):
                st.send(b"\0" * MIB, timeout=3)
        except OSError:
            pass
    except Exception as e:
        resp = f"no answer ({e.__class__.__name__})"
    if not resp:
        try:
            resp = str(read_response(st, t0 + SLOW_HOLD))
        except Exception as e:
            resp = f"no answer ({e.__class__.__name__})"
    dt = time.monotonic() - t0
    st.close()
    if not resp.startswith("413"):
        c.problem(f"HTTP-14 wants 413 for a declared length over the limit, got {resp}")
    elif dt > 2:
        c.problem(f"413 only after {dt:.0f} s")
    return f"{resp} after {dt:.1f} s"


@probe("size", "http-oversized-chunked (65 MiB chunked body)")
def p_http_oversized_chunked(c: Ctx):
    st = Stream.connect(c.addr)
    st.send((f"POST /v1/opamp HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/x-protobuf\r\n"
             "Transfer-Encoding: chunked\r\n\r\n").encode())
    chunk = b"100000\r\n" + b"\0" * MIB + b"\r\n"
    sent = 0
    try:
        for _ in range(65):
            st.send(chunk, timeout=3)
            sent += 1
        st.send(b"0\r\n\r\n", timeout=3)
    except OSError:
        pass
    c.mark_during()
    try:
        resp = str(read_response(st, time.monotonic() + 10))
    except Exception as e:
        resp = f"no answer ({e.__class__.__name__})"
    st.close()
    if not resp.startswith("413"):
        c.problem(f"HTTP-14 wants 413, got {resp}")
    return f"after {sent} MiB: {resp}"


def bomb(kind: str, size: int = 256 * MIB) -> bytes:
    wbits = {"gzip": 31, "deflate": 15, "raw": -15}[kind]
    z = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zero = b"\0" * (4 * MIB)
    out = [z.compress(zero) for _ in range(size // len(zero))]
    out.append(z.flush(zlib.Z_SYNC_FLUSH if kind == "raw" else zlib.Z_FINISH))
    return b"".join(out)


@probe("compression", "http-gzip-bomb (256 MiB of zeros in 256 KiB)")
def p_gzip_bomb(c: Ctx):
    body = bomb("gzip")
    try:
        resp = http_answer(post_once(c.addr, body, "Content-Encoding: gzip\r\n", 20))
    except Exception as e:
        resp = f"no answer ({e.__class__.__name__})"
    if not resp.startswith("413"):
        c.problem(f"HTTP-14 wants 413 after decompression, got {resp}")
    return f"{len(body) // 1024} KiB body: {resp}"


@probe("compression", "http-deflate-bomb (Content-Encoding: deflate)")
def p_deflate_bomb(c: Ctx):
    body = bomb("deflate")
    try:
        resp = http_answer(post_once(c.addr, body, "Content-Encoding: deflate\r\n", 20))
    except Exception as e:
        resp = f"no answer ({e.__class__.__name__})"
    if not (resp.startswith("415") or resp.startswith("413")):
        c.problem(f"HTTP-3 allows gzip only (415 expected), got {resp}")
    return f"{len(body) // 1024} KiB body: {resp}"


@probe("compression", "ws-permessage-deflate bomb (RSV1 frame, 256 MiB inflated)")
def p_ws_deflate(c: Ctx):
    ws = ws_connect(c.addr, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    ext = ws.handshake.headers.get("sec-websocket-extensions", "")  # type: ignore[attr-defined]
    body = bomb("raw")
    try:
        ws.send(ws_frame(2, body, rsv1=True), timeout=5)
    except OSError:
        pass
    c.mark_during()
    out = ws_outcome(ws, 5)
    ws.close()
    if not ext and not (out.startswith("close 1002") or "closed" in out):
        c.problem(f"RSV1 without a negotiated extension: RFC 6455 wants close 1002, got {out}")
    if ext and not out.startswith("close 1009"):
        c.problem(f"WS-9 wants 1009 after decompression, got {out}")
    return f"extension {'accepted: ' + ext if ext else 'not negotiated'}; {out}"


UID_LENGTHS = (0, 1, 15, 17, 64, 4096)


@probe("uid", "http-uid-lengths (0, 1, 15, 17, 64, 4096 bytes)")
def p_http_uid_len(c: Ctx):
    out = []
    for n in UID_LENGTHS:
        try:
            r = http_answer(post_once(c.addr, a2s(os.urandom(n), 1, full=True)))
        except Exception as e:
            r = f"no answer ({e.__class__.__name__})"
        out.append(f"{n}: {r.split(' ')[0] if r[:3].isdigit() else r}")
        if not (r.startswith("400") or "BadRequest" in r):
            c.problem(f"uid of {n} bytes answered {r} (UID-2, ERR-1)")
    return ", ".join(out)


@probe("uid", "ws-uid-lengths (0, 1, 15, 17, 64, 4096 bytes)")
def p_ws_uid_len(c: Ctx):
    out = []
    for n in UID_LENGTHS:
        try:
            ws = ws_connect(c.addr)
            ws.send(opamp_msg(a2s(os.urandom(n), 1, full=True)))
            r = ws_outcome(ws, 3)
            ws.close()
        except Exception as e:
            r = f"error {e}"
        out.append(f"{n}: {r}")
        if "BadRequest" not in r and not r.startswith("close"):
            c.problem(f"uid of {n} bytes: {r}")
    return "; ".join(out)


ZERO_UID = b"\0" * 16


@probe("uid", "uid-all-zero (HTTP and WS)")
def p_zero_uid(c: Ctx):
    try:
        h = http_answer(post_once(c.addr, a2s(ZERO_UID, 1, full=True)))
    except Exception as e:
        h = f"no answer ({e.__class__.__name__})"
    ws = ws_connect(c.addr)
    ws.send(opamp_msg(a2s(ZERO_UID, 1, full=True)))
    w = ws_outcome(ws, 3)
    ws.close()
    listed = ui_request(c.ui, "GET", "/api/v1/agents").body.count(uid_str(ZERO_UID).encode())
    for kind, r in (("HTTP", h), ("WS", w)):
        if r in ("200 S2A ok", "S2A ok") or r.startswith("200 S2A ok") or r == "S2A ReportFullState":
            c.problem(f"{kind}: the nil uid accepted as an ordinary agent (UID-2: a UUID v7; "
                      "UID-8: assign new_instance_uid or refuse)")
    return f"HTTP: {h}; WS: {w}; listed in /api/v1/agents: {'yes' if listed else 'no'}"


@probe("uid", "ws-duplicate-uid (a 2nd socket claims the good WS agent's uid)")
def p_dup_uid(c: Ctx):
    ws = ws_connect(c.addr)
    ws.send(opamp_msg(a2s(GOOD_WS_UID, 1, full=True, name="impostor")))
    first = ws_outcome(ws, 3)
    time.sleep(1.0)
    # Who gets a config pushed to the uid now?
    cfg = b"probe: dup\n"
    put = ui_request(c.ui, "PUT", f"/api/v1/agents/{uid_str(GOOD_WS_UID)}/config", cfg, "text/yaml")
    got = "nothing"
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            ev = ws_recv(ws, deadline)
            if ev[0] == "close":
                got = f"close {ev[1]}"
                break
            if ev[0] == "bin":
                fields = pb_decode(ws_payload_pb(ev[1]))
                if 3 in fields:
                    got = "the good agent's config"
                    break
                if 8 in fields:  # agent_identification: told to switch uid (UID-8)
                    got = "new_instance_uid"
                    break
    except (TimeoutError, EOFError, OSError):
        pass
    c.mark_during()
    time.sleep(1.0)
    ws.close()
    # Detection may wait for proof (the good agent's next message on its older socket),
    # so the answer may come with the first reply or after it.
    told = "new_instance_uid" in first or got == "new_instance_uid"
    if not told and not first.startswith("close") and not got.startswith("close"):
        c.problem("duplicate uid not detected (UID-8/WS-21: new_instance_uid or refuse)")
    if got == "the good agent's config":
        c.problem("the impostor socket received the good agent's config")
    return (f"impostor first answer: {first}; config PUT {put.status}; impostor then got {got}; "
            f"the good WS agent got {c.good.pushes} pushes")


def ws_seq_probe(c: Ctx, seqs) -> list[str]:
    ws = ws_connect(c.addr)
    uid = uuid7()
    out = []
    for i, s in enumerate(seqs):
        try:
            ws.send(opamp_msg(a2s(uid, s, full=(i == 0))))
            out.append(f"{s}->{ws_outcome(ws, 3).replace('S2A ', '')}")
        except OSError as e:
            out.append(f"{s}->send failed {e.__class__.__name__}")
            break
    ws.close()
    return out


@probe("sequence", "ws-seq-backwards (10, 11, 5, 6)")
def p_seq_back(c: Ctx):
    out = ws_seq_probe(c, [10, 11, 5, 6])
    if "ReportFullState" not in out[2]:
        c.problem("a backwards sequence_num got no ReportFullState (SEQ-2)")
    return ", ".join(out)


@probe("sequence", "seq-u64-max (WS and HTTP: MAX-1, MAX, 0, 1)")
def p_seq_max(c: Ctx):
    M = 2**64 - 1
    w = ws_seq_probe(c, [M - 1, M, 0, 1])
    uid = uuid7()
    h = []
    for i, s in enumerate([M - 1, M, 0, 1]):
        try:
            r = http_answer(post_once(c.addr, a2s(uid, s, full=(i == 0))))
        except Exception as e:
            r = f"no answer ({e.__class__.__name__})"
        h.append(f"{s if s < 2 else 'MAX' if s == M else 'MAX-1'}->{r.replace('200 S2A ', '')}")
    w = [x.replace(str(M - 1), "MAX-1").replace(str(M), "MAX") for x in w]
    return "WS " + ", ".join(w) + "; HTTP " + ", ".join(h)


@probe("framing", "ws-text-frame")
def p_text(c: Ctx):
    ws = ws_connect(c.addr)
    ws.send(ws_frame(1, b'{"instance_uid": "x"}'))
    out = ws_outcome(ws, 3)
    ws.close()
    if not out.startswith("close 1003") and "BadRequest" not in out:
        c.problem(f"WS-1: a text frame should be refused (BadRequest or close 1003), got {out}")
    return out


@probe("framing", "ws-bad-header-bytes (header 0x01; 0x80 0x00; 11-byte varint; empty)")
def p_bad_header(c: Ctx):
    out = []
    uid = uuid7()
    body = a2s(uid, 1, full=True)
    for label, payload, good in (("0x01", b"\x01" + body, False),
                                 ("0x80 0x00 (0, two bytes)", b"\x80\x00" + body, True),
                                 ("11-byte varint", b"\xff" * 10 + b"\x01" + body, False),
                                 ("empty message", b"", False)):
        try:
            ws = ws_connect(c.addr)
            ws.send(ws_frame(2, payload))
            r = ws_outcome(ws, 3)
            ws.close()
        except Exception as e:
            r = f"error {e}"
        out.append(f"{label}: {r}")
        if good and not r.startswith("S2A") or (good and "Error" in r):
            c.problem(f"WS-4: {label} is a valid header, got {r}")
        if not good and r.startswith("S2A") and "BadRequest" not in r:
            c.problem(f"WS-4: {label} accepted ({r})")
    return "; ".join(out)


@probe("framing", "ws-garbage-protobuf (header 0, then junk)")
def p_ws_junk(c: Ctx):
    ws = ws_connect(c.addr)
    ws.send(ws_frame(2, b"\x00\xff\xff\xff\xff\x0f junk"))
    out = ws_outcome(ws, 3)
    ws.close()
    if "BadRequest" not in out and not out.startswith("close"):
        c.problem(f"ERR-1 wants BadRequest, got {out}")
    return out


@probe("http", "http-garbage-request (random bytes, no HTTP)")
def p_http_garbage(c: Ctx):
    st = Stream.connect(c.addr)
    st.send(b"\x16\x03\x01\x02\x00garbage\xff\xfe\r\n\r\n" * 8)
    try:
        r = str(read_response(st, time.monotonic() + 5))
    except EOFError:
        r = "connection closed"
    except TimeoutError:
        r = "held 5 s"
    except Exception as e:
        r = f"{e.__class__.__name__}"
    st.close()
    return r


@probe("http", "http-bad-header-bytes (NUL in value; space in name; bad Content-Length)")
def p_bad_http_header(c: Ctx):
    out = []
    body = a2s(uuid7(), 1, full=True)
    for label, extra in (("NUL in value", "X-A: a\x00b\r\n"),
                         ("space in name", "X Bad: 1\r\n"),
                         ("8-bit name", "X-\xe9: 1\r\n"),
                         ("two Content-Length", f"Content-Length: {len(body) + 1}\r\n"),
                         ("bad uid header", "OpAMP-Instance-UID: not-a-uid\r\n")):
        st = Stream.connect(c.addr)
        try:
            head = post_head(c.addr, len(body)).decode("latin1")[:-2] + extra + "\r\n"
            st.send(head.encode("latin1") + body)
            r = str(read_response(st, time.monotonic() + 5))
        except EOFError:
            r = "closed"
        except Exception as e:
            r = e.__class__.__name__
        st.close()
        out.append(f"{label}: {r}")
        if label != "bad uid header" and r.startswith("200"):
            c.problem(f"{label} accepted (200)")
    return "; ".join(out)


@probe("http", "http-pipelined (100 POSTs in one write)")
def p_pipelined(c: Ctx):
    uid = uuid7()
    reqs = b"".join(post_head(c.addr, len(b)) + b
                    for b in (a2s(uid, i, full=(i == 1)) for i in range(1, 101)))
    st = Stream.connect(c.addr)
    st.send(reqs)
    codes, err = [], ""
    deadline = time.monotonic() + 10
    try:
        for _ in range(100):
            codes.append(read_response(st, deadline).status)
    except Exception as e:
        err = f", then {e.__class__.__name__}"
    st.close()
    ok = codes.count(200)
    if ok != 100:
        c.problem(f"only {ok}/100 pipelined requests answered 200")
    return f"{len(codes)} answers, {ok} x 200{err}"


@probe("http", "http-1.0 (POST with Content-Length; WS upgrade over HTTP/1.0)")
def p_http10(c: Ctx):
    uid = uuid7()
    try:
        r = post_once(c.addr, a2s(uid, 1, full=True), version="1.0")
        h = f"{r.version} {http_answer(r)}"
    except Exception as e:
        h = f"no answer ({e.__class__.__name__})"
    try:
        ws = ws_connect(c.addr, version="1.0")
        w = "101 (upgraded)"
        ws.close()
    except HandshakeRefused as e:
        w = str(e.resp)
    except Exception as e:
        w = e.__class__.__name__
    if not h.split(" ")[1:2] == ["200"]:
        c.problem(f"HTTP/1.0 POST: {h}")
    if w[:1] == "5":
        c.problem(f"an HTTP/1.0 upgrade request is a client error, answered {w}")
    return f"POST: {h}; upgrade: {w}"


@probe("http", "http-garbage-protobuf (valid POST, junk body)")
def p_http_junk(c: Ctx):
    r = http_answer(post_once(c.addr, b"\xff\xff\xff\xff\x0f junk"))
    if not r.startswith("400") and "BadRequest" not in r:
        c.problem(f"ERR-1: junk body answered {r}")
    return r


# --- reproduced scenarios ---------------------------------------------------------------------

SILENT_WS = 3000


@probe("fds", f"ws-silent-upgrades ({SILENT_WS} upgraded, never a message; 19,987 scaled down)")
def p_silent(c: Ctx):
    fds0 = proc_fds(c.server.pid)
    socks = open_many(SILENT_WS, lambda: ws_connect(c.addr, 5), time.monotonic() + 40)
    opened = len(socks)
    c.mark_during()
    fds1 = proc_fds(c.server.pid)
    # The server's first-message deadline (15 s by default) runs from each upgrade; the
    # watch starts once all are open and allows 10 s beyond the deadline for the closes.
    hold = FIRST_MESSAGE_DEADLINE + 10
    closes = watch_closes(socks, hold)
    c.mark_during()
    close_all(socks)
    held = opened - len(closes)
    if held:
        c.problem(f"{held} silent WebSockets held {hold} s with no first message (fds pinned: "
                  f"{fds1 - fds0} extra server fds)")
    return (f"{opened}/{SILENT_WS} upgraded; server fds {fds0}->{fds1}; "
            + summarize_closes(opened, closes, hold))


@probe("size", "ws-60-of-64-MiB-x12 (12 sockets send 60 MiB of a 64 MiB message, then silent)")
def p_ws_60(c: Ctx):
    chunk = b"\0" * MIB
    socks, sent = [], 0
    for _ in range(12):
        ws = ws_connect(c.addr)
        socks.append(ws)
        try:
            ws.send(ws_frame_head(2, LIMIT - 64))
            for _ in range(60):
                ws.send(chunk, timeout=10)
                sent += 1
        except OSError:
            pass
    c.mark_during()
    closes = watch_closes(socks, SLOW_HOLD)
    c.mark_during()
    close_all(socks)
    if len(closes) < len(socks):
        c.problem(f"{len(socks) - len(closes)} stalled 60 MiB messages held {SLOW_HOLD:g} s "
                  "(no read deadline)")
    return f"{sent} MiB sent; " + summarize_closes(len(socks), closes, SLOW_HOLD)


@probe("size", "http-60-of-64-MiB-x12 (12 POSTs send 60 MiB, then stall)")
def p_http_60(c: Ctx):
    chunk = b"\0" * MIB
    socks, sent = [], 0
    for _ in range(12):
        st = Stream.connect(c.addr)
        socks.append(st)
        try:
            st.send(post_head(c.addr, LIMIT - 64))
            for _ in range(60):
                st.send(chunk, timeout=10)
                sent += 1
        except OSError:
            pass
    c.mark_during()
    closes = watch_closes(socks, SLOW_HOLD)
    c.mark_during()
    close_all(socks)
    if len(closes) < len(socks):
        c.problem(f"{len(socks) - len(closes)} stalled POSTs held {SLOW_HOLD:g} s")
    return f"{sent} MiB sent; " + summarize_closes(len(socks), closes, SLOW_HOLD)


FLOOD_N = 100_000


@probe("flood", f"http-session-flood ({FLOOD_N:,} fresh uids, pipelined), then known + new agent")
def p_session_flood(c: Ctx):
    conns = 32
    per = FLOOD_N // conns
    counts: dict[str, int] = {}
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + 60

    def worker(k: int):
        try:
            st = Stream.connect(c.addr, 10)
        except OSError:
            with lock:
                counts["connect failed"] = counts.get("connect failed", 0) + per
            return
        reqs = []
        for i in range(per):
            b = a2s(uuid7()[:8] + struct.pack(">II", k, i), 1, full=True)
            reqs.append(post_head(c.addr, len(b)) + b)
        data = b"".join(reqs)

        def writer():
            try:
                for j in range(0, len(data), 256 * 1024):
                    st.send(data[j:j + 256 * 1024], timeout=30)
            except OSError:
                pass
        w = threading.Thread(target=writer, daemon=True)
        w.start()
        local: dict[str, int] = {}
        got = 0
        try:
            while got < per and time.monotonic() < stop_at:
                r = read_response(st, stop_at, keep_body=False)
                key = str(r.status)
                local[key] = local.get(key, 0) + 1
                got += 1
        except Exception as e:
            local[f"lost ({e.__class__.__name__})"] = per - got
        st.close()
        with lock:
            for key, v in local.items():
                counts[key] = counts.get(key, 0) + v

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    dt = time.monotonic() - t0
    c.mark_during()
    # The known agents keep polling (GoodAgent); a brand-new agent arrives:
    try:
        new = http_answer(post_once(c.addr, a2s(uuid7(), 1, full=True)))
    except Exception as e:
        new = f"no answer ({e.__class__.__name__})"
    known = c.good.stats()
    summary = ", ".join(f"{v:,} x {k}" for k, v in sorted(counts.items()))
    return (f"{conns * per:,} requests in {dt:.1f} s: {summary}; then a new agent: {new}; "
            f"known agents' failures so far: {known[2]}")


@probe("memory", "http-60-MiB-tiny-attributes then GET /api/v1/agents")
def p_tiny_attrs(c: Ctx):
    # Distinct keys (the JSON API keys attributes by name): 60 MiB of 15-byte entries, each
    # f_bytes(2, kv(f"{i:06x}", "b")) (a non_identifying_attributes entry), built fast.
    pre, suf = b"\x12\x0d\x0a\x06", b"\x12\x03\x0a\x01b"
    assert pre + b"000000" + suf == f_bytes(2, kv("000000", "b"))
    n = (60 * MIB) // 15
    attrs = b"".join(pre + b"%06x" % i + suf for i in range(n))
    uid = uuid7()
    body = (f_bytes(1, uid) + f_varint(2, 1) + f_varint(4, GOOD_CAPS)
            + f_bytes(3, f_bytes(1, kv("service.name", "attrs")) + attrs))
    del attrs
    # Building 4 million entries holds this process's GIL for about a second, and the good
    # agents are threads of it: their round trips meanwhile measure the harness, not the
    # server, which has not been sent anything yet. Their window starts now.
    c.good.reset()
    t0 = time.monotonic()
    try:
        r = http_answer(post_once(c.addr, body, timeout=60))
    except Exception as e:
        r = f"no answer ({e.__class__.__name__})"
    t1 = time.monotonic()
    c.mark_during()
    try:
        g = ui_request(c.ui, "GET", "/api/v1/agents", timeout=90, keep_body=False)
        gs = f"{g.status} {g.body.decode()}"
    except Exception as e:
        gs = f"no answer ({e.__class__.__name__})"
    t2 = time.monotonic()
    c.mark_during()
    peak = max(c.server.hwm_kb(), c.during_kb) / 1024
    if peak > 8 * 60:
        c.problem(f"peak RSS {peak:.0f} MiB for a 60 MiB message ({peak / 60:.0f}x)")
    return (f"{n:,} attributes: POST {r} in {t1 - t0:.1f} s; GET /api/v1/agents {gs} "
            f"in {t2 - t1:.1f} s")


@probe("memory", "ws-40-MiB-effective-config-x8 (8 agents report 40 MiB configs, then leave)")
def p_eff_config(c: Ctx):
    body = b"k: " + b"v" * (40 * MIB) + b"\n"
    eff = f_bytes(6, f_bytes(1, f_bytes(1, f_bytes(1, b"") + f_bytes(2, f_bytes(1, body)
                                                                 + f_bytes(2, b"text/yaml")))))
    answers = []
    socks = []
    for _ in range(8):
        ws = ws_connect(c.addr)
        uid = uuid7()
        ws.send(opamp_msg(a2s(uid, 1, full=True, extra=eff)), timeout=30)
        answers.append(ws_outcome(ws, 20))
        socks.append((ws, uid))
    c.mark_during()
    for ws, uid in socks:
        try:
            ws.send(opamp_msg(a2s(uid, 2, disconnect=True)))
        except OSError:
            pass
        ws_close_quietly(ws)
    time.sleep(1)
    g = ui_request(c.ui, "GET", "/api/v1/agents", timeout=60, keep_body=False)
    uniq = sorted(set(answers))
    return (f"answers: {', '.join(f'{answers.count(a)} x {a}' for a in uniq)}; "
            f"GET /api/v1/agents after they left: {g.status} {g.body.decode()}")


# ---------------------------------------------------------------------------------------------
# hostile servers for the client

class HostileServer:
    """A tiny threaded server on 127.0.0.1 with one behaviour (mode)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, 0))
        self.lsock.listen(128)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.c = {"connections": 0, "requests": 0, "messages": 0, "full_reports": 0,
                  "upgrades": 0, "configs_sent": 0, "restarts_sent": 0}
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)

    def inc(self, key: str, n: int = 1):
        with self.lock:
            self.c[key] += n

    def start(self):
        self.thread.start()

    def stop(self):
        self.stop_ev.set()
        self.thread.join(2)
        self.lsock.close()

    def accept_loop(self):
        while not self.stop_ev.is_set():
            try:
                s, _ = self.lsock.accept()
            except (TimeoutError, OSError):
                continue
            self.inc("connections")
            threading.Thread(target=self.handle, args=(Stream(s),), daemon=True).start()

    def handle(self, st: Stream):
        try:
            self._handle(st)
        except Exception:
            pass
        finally:
            st.close()

    def read_request(self, st: Stream, deadline: float):
        head = st.read_until(b"\r\n\r\n", deadline).decode("latin1")
        lines = head.split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        body = st.read_exact(n, deadline) if n else b""
        self.inc("requests")
        return lines[0], headers, body

    def _handle(self, st: Stream):
        m = self.mode
        end = time.monotonic() + CLIENT_WINDOW + 5
        if m == "garbage":
            try:
                st.read_until(b"\r\n\r\n", time.monotonic() + 1)
                self.inc("requests")
            except Exception:
                pass
            st.send(b"\x16\x03\x01\xff garbage \x00\xfe\r\n" * 64)
            return
        while not self.stop_ev.is_set():
            line, headers, body = self.read_request(st, end)
            upgrade = "websocket" in headers.get("upgrade", "").lower()
            if m == "redirect":
                scheme = "ws" if upgrade else "http"
                st.send((f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {scheme}://{HOST}:"
                         f"{self.port}/v1/opamp\r\nContent-Length: 0\r\n\r\n").encode())
                continue
            if m == "retry-after":
                st.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 999999999\r\n"
                        b"Content-Length: 0\r\n\r\n")
                continue
            if not upgrade:
                if m in ("full-state", "restart", "hash-churn") and line.startswith("POST"):
                    reply = self.reply(pb_decode(body))
                    st.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                            + f"Content-Length: {len(reply)}\r\n\r\n".encode() + reply)
                    continue
                st.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            key = headers.get("sec-websocket-key", "")
            accept = base64.b64encode(hashlib.sha1(
                (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            st.send(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
            self.inc("upgrades")
            if m == "ws-close":
                st.send(ws_frame(8, struct.pack(">H", 1000), masked=False))
                return
            self.ws_loop(st, end)
            return

    def reply(self, msg: dict) -> bytes:
        """Counts one AgentToServer and builds this mode's ServerToAgent answer."""
        self.inc("messages")
        if 3 in msg:
            self.inc("full_reports")
        reply = f_bytes(1, msg.get(1, [b""])[0]) + f_varint(7, 0x7)
        if self.mode == "full-state":
            reply += f_varint(6, 1)  # ReportFullState
        elif self.mode == "restart":
            reply += f_bytes(9, b"")  # ServerToAgentCommand{type: Restart (0)}
            self.inc("restarts_sent")
        elif self.mode == "hash-churn":
            with self.lock:
                self.c["configs_sent"] += 1
                k = self.c["configs_sent"]
            cfg = f"churn: {k}\n".encode()
            obj = f_bytes(1, cfg) + f_bytes(2, b"text/yaml")
            cmap = f_bytes(1, f_bytes(1, b"") + f_bytes(2, obj))
            reply += f_bytes(3, f_bytes(1, cmap) + f_bytes(2, hashlib.sha256(cfg).digest()))
        return reply

    def ws_loop(self, st: Stream, end: float):
        while not self.stop_ev.is_set() and time.monotonic() < end:
            try:
                ev = ws_recv(st, end, pong=False)
            except TimeoutError:
                continue
            if ev[0] == "close":
                try:
                    st.send(ws_frame(8, struct.pack(">H", 1000), masked=False))
                except OSError:
                    pass
                return
            if ev[0] != "bin":
                continue
            reply = self.reply(pb_decode(ws_payload_pb(ev[1])))
            st.send(ws_frame(2, b"\x00" + reply, masked=False))


client_probe("client", "garbage answer (ws://)", "garbage", "ws", 10, "connections")
client_probe("client", "garbage answer (http://)", "garbage", "http", 10, "connections")
client_probe("client", "redirect loop, 307 to itself (http://)", "redirect", "http", 10, "requests")
client_probe("client", "redirect loop, 307 to itself (ws://)", "redirect", "ws", 10, "requests")
client_probe("client", "503 Retry-After: 999999999 (http://)", "retry-after", "http", 2, "requests")
client_probe("client", "503 Retry-After: 999999999 on the upgrade (ws://)", "retry-after", "ws", 2,
             "requests")
client_probe("client", "WS closed right after accept (reconnects, 10 s x3 = 30 s)", "ws-close", "ws",
             10, "connections")
for _scheme in ("ws", "http"):
    client_probe("client", f"ReportFullState on every reply ({_scheme}://)", "full-state", _scheme,
                 10, "full_reports")
    client_probe("client", f"Restart in every reply ({_scheme}://)", "restart", _scheme, 5,
                 "restarts")
    client_probe("client", f"config hash changes every message ({_scheme}://)", "hash-churn",
                 _scheme, 50, "messages")


def run_client_probe(agent_bin: str, logdir: str, cls, name, mode, scheme, limit, what):
    hs = HostileServer(mode)
    hs.start()
    state = tempfile.mkdtemp(prefix="probe-agent-")
    log_path = os.path.join(logdir, f"agent-{mode}-{scheme}.log")
    url = f"{scheme}://{HOST}:{hs.port}/v1/opamp"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([agent_bin, "--endpoint", url, "--state-dir", state],
                                stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        rss0 = peak = 0
        cpu0 = proc_cpu_seconds(proc.pid)
        while time.monotonic() - t0 < CLIENT_WINDOW and proc.poll() is None:
            rss = proc_status(proc.pid).get("VmRSS", 0)
            if not rss0 and time.monotonic() - t0 >= 1.0:
                rss0 = rss  # "start": once the agent has started, 1 s in
            peak = max(peak, rss)
            time.sleep(0.1)
        rss1 = proc_status(proc.pid).get("VmRSS", 0)
        cpu = proc_cpu_seconds(proc.pid) - cpu0
        crashed = proc.poll() is not None
        with hs.lock:
            counts = dict(hs.c)
        if not crashed:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    hs.stop()
    shutil.rmtree(state, ignore_errors=True)
    with open(log_path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    counts["restarts"] = text.count("restarting")
    problems = []
    if crashed:
        problems.append(f"agent exited ({proc.returncode})")
    if text.count("panicked at"):
        problems.append(f"{text.count('panicked at')} panic(s) in the agent log")
    v = counts[what]
    if v > limit:
        problems.append(f"{v} {what.replace('_', ' ')} in {CLIENT_WINDOW:g} s (bound {limit})")
    if cpu > 0.3 * CLIENT_WINDOW:
        problems.append(f"agent CPU {cpu:.1f} s in {CLIENT_WINDOW:g} s")
    if rss1 - rss0 > 50 * 1024:
        problems.append(f"agent RSS grew {(rss1 - rss0) / 1024:.0f} MiB")
    beh = (f"{counts['connections']} connections, {counts['requests']} HTTP requests, "
           f"{counts['messages']} messages, {counts['full_reports']} full reports, "
           f"{counts['restarts']} restarts in {CLIENT_WINDOW:g} s")
    if mode == "ws-close":
        beh += f" (~{counts['connections'] * 3} in 30 s)"
    return {"class": cls, "probe": f"client-{mode}-{scheme}: {name}", "answer": beh,
            "rss": f"{rss0 / 1024:.0f} / {peak / 1024:.0f} / {rss1 / 1024:.0f}",
            "cpu": f"{cpu:.2f} s", "verdict": "OK" if not problems else "; ".join(problems),
            "crashed": False}


# ---------------------------------------------------------------------------------------------
# runner and report


def log_panics(path: str) -> int:
    """Panics a Rust program logged (a panicking tokio task does not end the process)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"panicked at")
    except OSError:
        return 0


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def run_server_probe(server_bin: str, logdir: str, cls: str, name: str, fn) -> dict:
    short = name.split(" ")[0]
    try:
        srv = Server(server_bin, logdir, short)
    except RuntimeError as e:
        return {"class": cls, "probe": name, "answer": "-", "rss": "-", "rtt": "-",
                "verdict": f"server did not start: {e}", "crashed": True, "seconds": 0}
    good = GoodAgent(srv.opamp)
    good.start()
    time.sleep(1.5)
    before = srv.rss_kb()
    srv.reset_hwm()
    sampler = Sampler(srv.pid)
    sampler.start()
    good.reset()
    ctx = Ctx(srv, good)
    t0 = time.monotonic()
    try:
        answer = fn(ctx)
    except HandshakeRefused as e:
        answer = f"upgrade refused: {e.resp}"
    except Exception as e:
        answer = f"probe aborted: {e.__class__.__name__}: {e}"
    dt = time.monotonic() - t0
    ctx.mark_during()
    time.sleep(AFTER_WAIT)
    after = srv.rss_kb()
    sampler.stop_ev.set()
    sampler.join(1)
    peak = max(sampler.max_kb, srv.hwm_kb(), ctx.during_kb)
    p50, mx, fails, total = good.stats()
    good.stop_ev.set()
    good.join(5)
    alive = srv.alive()
    code = srv.proc.returncode
    srv.stop()
    problems = []
    crashed = False
    if sampler.killed:
        problems.append(f"RSS over {RSS_CAP_KB // 1024 // 1024} GiB: killed by the harness")
    elif not alive:
        crashed = True
        problems.append(f"SERVER CRASHED (exit {code}; log {srv.log_path})")
    if alive:
        grown = after - before
        if grown > max(MEM_SLACK_KB, before // 2):
            problems.append(f"memory not returned: +{grown / 1024:.0f} MiB {AFTER_WAIT:g} s after")
    if total == 0 or fails:
        problems.append(f"good agent: {fails} of {total} round trips failed")
    elif mx > 1000:
        problems.append(f"good agent stalled (max RTT {mx:.0f} ms)")
    problems += ctx.problems
    panics = log_panics(srv.log_path)
    if panics:
        problems.append(f"{panics} panic(s) in the server log")
    return {"class": cls, "probe": name, "answer": answer,
            "rss": f"{mib(before)} / {mib(ctx.during_kb)} / {mib(peak)} / {mib(after)}",
            "rtt": f"{p50:.1f} / {mx:.0f} / {fails} of {total}",
            "verdict": "OK" if not problems else "; ".join(problems),
            "crashed": crashed, "seconds": dt}


def md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def repo_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                "--untracked-files=no", "--", ":(top,exclude)docs"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem} RAM"


def render(server_rows, client_rows, argv_cmd: str, title_note: str, elapsed: float) -> str:
    out = [
        "# Hostile input: what the reference server and agent do",
        "",
        f"{title_note}".strip(),
        "",
        f"* commit: `{repo_commit()}`",
        f"* date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"* machine: {machine()}",
        f"* command: `{argv_cmd}`",
        f"* run time: {elapsed:.0f} s",
        "",
        "Every probe runs against a fresh reference server on free loopback ports. A well-behaved",
        "plain-HTTP agent and a WebSocket agent each make a round trip every ~200 ms meanwhile",
        "(RTT p50 / max in ms, failed round trips of all round trips). Server RSS in MiB: before",
        "the probe / during it (sockets open) / peak (VmHWM and 50 ms VmRSS samples) / "
        f"{AFTER_WAIT:g} s after its sockets closed.",
        f"Verdict OK: no crash, RSS back near the baseline (within max({MEM_SLACK_KB // 1024} MiB, 50 %)), the good",
        "agents served without failure or a stall over 1 s, and the answer the spec asks for",
        "where it names one; otherwise the problems in words.",
        "",
        "## Server",
        "",
        "| class | probe | answer | server RSS MiB before / during / peak / after | good-agent RTT p50 / max / failures | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in server_rows:
        out.append("| " + " | ".join(md_escape(r[k]) for k in
                                      ("class", "probe", "answer", "rss", "rtt", "verdict")) + " |")
    out += [
        "",
        "## Client (the reference agent against hostile servers)",
        "",
        f"Each row: the agent runs {CLIENT_WINDOW:g} s against a small hostile server; counted at the",
        "server (\"HTTP requests\" include WebSocket upgrade requests). Agent RSS MiB 1 s after",
        "its start / peak / end, and its CPU time in the window.",
        "",
        "| class | probe | agent behaviour | agent RSS MiB start / peak / end | agent CPU | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in client_rows:
        out.append("| " + " | ".join(md_escape(r[k]) for k in
                                      ("class", "probe", "answer", "rss", "cpu", "verdict")) + " |")
    bad = [r for r in server_rows + client_rows if r["verdict"] != "OK"]
    out += ["", f"{len(server_rows) + len(client_rows) - len(bad)} OK, {len(bad)} not OK.", ""]
    if bad:
        out += ["## Not OK", ""]
        out += [f"* `{r['probe'].split(' ')[0].rstrip(':')}`: {r['verdict']}" for r in bad]
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="reference server binary")
    ap.add_argument("--agent", required=True, help="reference agent binary")
    ap.add_argument("--only", help="comma-separated substrings of probe names to run")
    ap.add_argument("--out", default="docs/hostile-input.md", help="Markdown file to write")
    ap.add_argument("--note", default="", help="a line put under the title (e.g. 'before' run)")
    ap.add_argument("--check", action="store_true", help="exit 1 on any verdict other than OK")
    args = ap.parse_args()
    for b in (args.server, args.agent):
        if not os.access(b, os.X_OK):
            print(f"not an executable: {b}", file=sys.stderr)
            return 2
    want = [w.strip() for w in args.only.split(",")] if args.only else None

    def selected(name: str) -> bool:
        pid = name.split(" ")[0]
        return want is None or any(w in pid for w in want)

    logdir = tempfile.mkdtemp(prefix="hostile-probe-")
    print(f"logs: {logdir}", file=sys.stderr)
    t0 = time.monotonic()
    server_rows, client_rows = [], []
    for cls, name, fn in SERVER_PROBES:
        if not selected(name):
            continue
        print(f"[{time.monotonic() - t0:5.0f} s] server: {name} ...", file=sys.stderr, flush=True)
        row = run_server_probe(args.server, logdir, cls, name, fn)
        print(f"        {row['answer']}\n        rss {row['rss']}  rtt {row['rtt']}  -> "
              f"{row['verdict']}", file=sys.stderr, flush=True)
        server_rows.append(row)
    for cls, name, mode, scheme, limit, what in CLIENT_PROBES:
        if not selected(f"client-{mode}-{scheme}"):
            continue
        print(f"[{time.monotonic() - t0:5.0f} s] client: {name} ...", file=sys.stderr, flush=True)
        row = run_client_probe(args.agent, logdir, cls, name, mode, scheme, limit, what)
        print(f"        {row['answer']}  -> {row['verdict']}", file=sys.stderr, flush=True)
        client_rows.append(row)
    cmd = "python3 tests/hostile/probe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = render(server_rows, client_rows, cmd, args.note, time.monotonic() - t0)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if any(r["crashed"] for r in server_rows):
        return 1
    if args.check and any(r["verdict"] != "OK" for r in server_rows + client_rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
