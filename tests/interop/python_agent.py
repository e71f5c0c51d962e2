#!/usr/bin/env python3
"""Runs N OpAMP agents of the PyPI `opentelemetry-opamp-client` (plain HTTP) in one process.

    "$CACHE/venv/bin/python" tests/interop/python_agent.py \
        --endpoint http://127.0.0.1:4320/v1/opamp --count 3 --name-prefix py-agent

Each agent reports service.name=<prefix>-<i>, applies remote configs (FAILED
with "rejected: config contains INVALID" when a body contains INVALID, else
APPLIED, and then the remote config becomes its effective config), logs to
stderr and runs until SIGTERM/SIGINT, when it sends agent_disconnect and exits 0.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import platform
import signal
import socket
import sys
import threading

try:
    from opentelemetry._opamp import OpAMPAgent, OpAMPCallbacks, OpAMPClient
    from opentelemetry._opamp.proto import opamp_pb2
    from opentelemetry._opamp.version import __version__ as LIB_VERSION
except ImportError as exc:
    sys.exit(
        f"python_agent.py: cannot import opentelemetry._opamp ({exc}); run it with the "
        "interop venv's python, installed by tests/interop/install.sh"
    )

SERVICE_VERSION = "0.1.0"
REJECT_MESSAGE = "rejected: config contains INVALID"
log = logging.getLogger("python_agent")

# What this library can report. It has no API to report health, so
# ReportsHealth is not claimed. ReportsHeartbeat is in the library's defaults.
CAPABILITIES = (
    opamp_pb2.AgentCapabilities_ReportsStatus
    | opamp_pb2.AgentCapabilities_AcceptsRemoteConfig
    | opamp_pb2.AgentCapabilities_ReportsRemoteConfig
    | opamp_pb2.AgentCapabilities_ReportsEffectiveConfig
    | opamp_pb2.AgentCapabilities_ReportsHeartbeat
)


class Callbacks(OpAMPCallbacks):
    def __init__(self, name: str):
        self.name = name
        self.connected = False
        self.lock = threading.Lock()

    def on_connect(self, agent, client):
        # Called after every successful HTTP request; log only the first one.
        if not self.connected:
            self.connected = True
            log.info("%s: connected", self.name)

    def on_connect_failed(self, agent, client, error):
        self.connected = False
        log.warning("%s: request failed: %s", self.name, error)

    def on_error(self, agent, client, error_response):
        log.warning(
            "%s: server error response: type=%s message=%r",
            self.name,
            opamp_pb2.ServerErrorResponseType.Name(error_response.type),
            error_response.error_message,
        )

    def on_message(self, agent, client, message):
        rc = message.remote_config
        if rc is None:
            return
        with self.lock:
            self._apply(agent, client, rc)

    def _apply(self, agent, client, rc):
        files = rc.config.config_map
        invalid = any(b"INVALID" in f.body for f in files.values())
        if invalid:
            status, error = opamp_pb2.RemoteConfigStatuses_FAILED, REJECT_MESSAGE
        else:
            status, error = opamp_pb2.RemoteConfigStatuses_APPLIED, ""
        # Returns None when the status did not change: the server resent a
        # config we already handled, so there is nothing to report.
        changed = client.update_remote_config_status(
            remote_config_hash=rc.config_hash, status=status, error_message=error
        )
        if changed is None:
            return
        if not invalid:
            # update_effective_config() applies one content type to all files
            # and re-encodes JSON; take the returned message (the one the
            # client stores) and copy the remote files into it byte for byte.
            effective = client.update_effective_config({}, "application/json")
            for name, f in files.items():
                effective.config_map.config_map[name].CopyFrom(f)
        log.info(
            "%s: remote config hash=%s files=%s -> %s%s",
            self.name,
            rc.config_hash.hex(),
            sorted(files.keys()),
            opamp_pb2.RemoteConfigStatuses.Name(status),
            f" ({error})" if error else "",
        )
        # The full-state message is the only one the library builds that
        # carries the effective config (with the status and description).
        agent.send(client.build_full_state_message())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, help="e.g. http://127.0.0.1:4320/v1/opamp")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--name-prefix", default="py-agent")
    p.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, seconds")
    p.add_argument("--timeout-ms", type=int, default=5000, help="HTTP request timeout")
    p.add_argument("--verbose", action="store_true", help="also log the library's debug output")
    args = p.parse_args()
    if args.count < 1:
        p.error("--count must be >= 1")

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s python_agent %(levelname)s %(message)s",
    )
    if not args.verbose:
        logging.getLogger("opentelemetry._opamp").setLevel(logging.WARNING)
        # Its per-attempt "Job b'<raw bytes>' failed" warnings repeat what
        # on_connect_failed logs; keep its errors (a job dropped after retries).
        logging.getLogger("opentelemetry._opamp.agent").setLevel(logging.ERROR)
        logging.getLogger("urllib3").setLevel(logging.WARNING)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    host = socket.gethostname()
    agents = []
    for i in range(1, args.count + 1):
        name = f"{args.name_prefix}-{i}"
        client = OpAMPClient(
            endpoint=args.endpoint,
            timeout_millis=args.timeout_ms,
            agent_identifying_attributes={"service.name": name, "service.version": SERVICE_VERSION},
            agent_non_identifying_attributes={"host.name": host, "os.type": platform.system().lower()},
            capabilities=CAPABILITIES,
        )
        # Start with an empty (but reported) effective config.
        client.update_effective_config({}, "application/json")
        agent = OpAMPAgent(interval=args.interval, callbacks=Callbacks(name), client=client)
        agent.start()
        # start() registers agent.stop with atexit; we stop explicitly, and a
        # second stop() would send a second agent_disconnect.
        atexit.unregister(agent.stop)
        agents.append((name, agent))
        log.info("%s: started (opentelemetry-opamp-client %s) -> %s", name, LIB_VERSION, args.endpoint)

    stop.wait()
    log.info("stopping %d agent(s)", len(agents))
    stoppers = [threading.Thread(target=a.stop, kwargs={"timeout": 5}) for _, a in agents]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
