#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Write OpAMP wire-format test vectors encoded by an independent implementation.

The messages are built with the generated protobuf classes shipped inside the
PyPI package ``opentelemetry-opamp-client`` (``opentelemetry._opamp.proto``),
not with classes generated from this repository's .proto files, and are
serialized by Google's protobuf Python runtime. The Rust tests decode them with
our prost types and re-encode them.

Usage (see README.md for the full regeneration command):

    python make_vectors.py          # (re)write the .bin files and vectors.json
    python make_vectors.py --check  # rebuild in memory, fail if any file differs

The script always uses the runtime's pure-Python backend. The default upb
backend of protobuf's Python runtime does not sort string map keys
byte-lexicographically under deterministic=True (a key that is a prefix of
another, "" included, is written after it), while our Rust types keep maps in
a BTreeMap. The upb backend is still used, in a subprocess, as a cross-check
that every file decodes to the same message there too.

The script fails loudly if:
  * a *_full file leaves any field of any reachable message unset,
  * a file does not parse back and re-serialize to the same bytes,
  * fields are not written in field-number order at every nesting level,
  * the upb backend decodes a file to something different.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE_FLAG = "--upb-probe"

# The backend must be chosen before google.protobuf is first imported.
os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = (
    "upb" if PROBE_FLAG in sys.argv else "python"
)

from google.protobuf import descriptor as _descriptor  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402

from opentelemetry._opamp.proto import anyvalue_pb2 as av  # noqa: E402
from opentelemetry._opamp.proto import opamp_pb2 as pb  # noqa: E402

SOURCE_PACKAGE = "opentelemetry-opamp-client"
SOURCE_VERSION = "0.5b0"
HERE = Path(__file__).resolve().parent

FD = _descriptor.FieldDescriptor


class VectorError(Exception):
    pass


# --------------------------------------------------------------------------
# Fixed building blocks (no randomness, no clock: output must be reproducible)
# --------------------------------------------------------------------------

AGENT_UID = bytes.fromhex("0192e4a7c3d87b1e9a4f00112233aabb")  # UUIDv7-shaped
NEW_AGENT_UID = bytes.fromhex("0192e4a8000070008000c0ffee00d00d")


def digest(label: str) -> bytes:
    """A stable 32-byte value standing in for a content hash."""
    return hashlib.sha256(label.encode("utf-8")).digest()


def pem(kind: str, body: str) -> bytes:
    """A PEM-shaped placeholder; not a real certificate or key."""
    return (
        f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----\n".encode("ascii")
    )


def s(value: str) -> av.AnyValue:
    return av.AnyValue(string_value=value)


def kv(key: str, value: av.AnyValue | None) -> av.KeyValue:
    out = av.KeyValue(key=key)
    if value is not None:
        out.value.CopyFrom(value)
    return out


def headers(*pairs: tuple[str, str]) -> pb.Headers:
    return pb.Headers(headers=[pb.Header(key=k, value=v) for k, v in pairs])


def tls_cert(name: str) -> pb.TLSCertificate:
    return pb.TLSCertificate(
        cert=pem("CERTIFICATE", f"fixture-cert-{name}"),
        private_key=pem("PRIVATE KEY", f"fixture-key-{name}"),
        ca_cert=pem("CERTIFICATE", f"fixture-ca-{name}"),
    )


def every_anyvalue_kind() -> list[av.KeyValue]:
    """One attribute per AnyValue variant, with nesting, plus a null value."""
    nested_kvlist = av.AnyValue()
    nested_kvlist.kvlist_value.values.extend(
        [
            kv("region", s("eu-west-1")),
            kv("zone.count", av.AnyValue(int_value=3)),
            kv(
                "inner",
                av.AnyValue(
                    kvlist_value=av.KeyValueList(
                        values=[
                            kv("leaf.bool", av.AnyValue(bool_value=True)),
                            kv("leaf.bytes", av.AnyValue(bytes_value=b"\x00\x01\xfe\xff")),
                        ]
                    )
                ),
            ),
        ]
    )
    array = av.AnyValue()
    array.array_value.values.extend(
        [
            s("first"),
            av.AnyValue(int_value=-7),
            av.AnyValue(double_value=0.5),
            av.AnyValue(array_value=av.ArrayValue(values=[s("deep"), av.AnyValue(bool_value=True)])),
            av.AnyValue(kvlist_value=av.KeyValueList(values=[kv("in.array", s("yes"))])),
        ]
    )
    null = av.AnyValue()  # no variant set: the OTLP "empty"/null value
    return [
        kv("attr.string", s("linux")),
        kv("attr.bool", av.AnyValue(bool_value=True)),
        kv("attr.int.negative", av.AnyValue(int_value=-1234567890123)),
        kv("attr.double", av.AnyValue(double_value=-273.15)),
        kv("attr.array", array),
        kv("attr.kvlist", nested_kvlist),
        kv("attr.bytes", av.AnyValue(bytes_value=bytes(range(0, 256, 17)))),
        kv("attr.null", null),
    ]


def agent_description() -> pb.AgentDescription:
    return pb.AgentDescription(
        identifying_attributes=[
            kv("service.name", s("io.opentelemetry.collector")),
            kv("service.namespace", s("fixtures")),
            kv("service.version", s("0.115.0")),
            kv("service.instance.id", s("0192e4a7-c3d8-7b1e-9a4f-00112233aabb")),
        ],
        non_identifying_attributes=[
            kv("os.type", s("linux")),
            kv("host.arch", s("amd64")),
            kv("host.name", s("fixture-host-01")),
            *every_anyvalue_kind(),
        ],
    )


def component_health() -> pb.ComponentHealth:
    """Three levels of ComponentHealth: root -> pipelines -> components."""

    def leaf(name: str, healthy: bool, t: int) -> pb.ComponentHealth:
        return pb.ComponentHealth(
            healthy=healthy,
            start_time_unix_nano=1_700_000_000_000_000_000 + t,
            last_error=f"{name}: last error text",
            status="StatusOK" if healthy else "StatusRecoverableError",
            status_time_unix_nano=1_700_000_123_456_789_000 + t,
        )

    logs = leaf("pipeline:logs", True, 1)
    logs.component_health_map["exporter:debug"].CopyFrom(leaf("exporter:debug", True, 11))
    logs.component_health_map["receiver:filelog"].CopyFrom(leaf("receiver:filelog", True, 12))

    traces = leaf("pipeline:traces", False, 2)
    traces.component_health_map["exporter:otlp"].CopyFrom(leaf("exporter:otlp", False, 21))
    traces.component_health_map["receiver:jaeger"].CopyFrom(leaf("receiver:jaeger", True, 22))

    root = leaf("collector", True, 0)
    # fixed64 at its extremes too: the top bit set must survive a round trip.
    root.start_time_unix_nano = 0xFFFF_FFFF_FFFF_FFFE
    root.component_health_map["pipeline:logs"].CopyFrom(logs)
    root.component_health_map["pipeline:traces"].CopyFrom(traces)
    return root


def config_object(name: str, content_type: str, body: str) -> pb.AgentConfigFile:
    # AgentConfigFile in this package == AgentConfigObject in opamp-spec v0.20.0.
    return pb.AgentConfigFile(body=body.encode("utf-8"), content_type=content_type)


def effective_config(with_empty_key: bool) -> pb.EffectiveConfig:
    out = pb.EffectiveConfig()
    cm = out.config_map.config_map
    if with_empty_key:
        cm[""].CopyFrom(
            config_object("", "text/yaml", "# the single unnamed config file\nreceivers: {}\n")
        )
    cm["collector.yaml"].CopyFrom(
        config_object("collector.yaml", "text/yaml", "receivers:\n  otlp:\n    protocols: {grpc: {}}\n")
    )
    cm["extra.json"].CopyFrom(
        config_object("extra.json", "application/json", '{"exporters":{"debug":{}}}')
    )
    return out


def package_statuses() -> pb.PackageStatuses:
    out = pb.PackageStatuses(
        server_provided_all_packages_hash=digest("all-packages-v2"),
        error_message="one package failed to install",
    )
    out.packages["otelcol-contrib"].CopyFrom(
        pb.PackageStatus(
            name="otelcol-contrib",
            agent_has_version="0.114.0",
            agent_has_hash=digest("otelcol-contrib-0.114.0"),
            server_offered_version="0.115.0",
            server_offered_hash=digest("otelcol-contrib-0.115.0"),
            status=pb.PackageStatusEnum_Downloading,
            error_message="download in progress, previous attempt timed out",
            download_details=pb.PackageDownloadDetails(
                download_percent=42.5, download_bytes_per_second=1048576.25
            ),
        )
    )
    out.packages["plugin-geoip"].CopyFrom(
        pb.PackageStatus(
            name="plugin-geoip",
            agent_has_version="1.2.0",
            agent_has_hash=digest("plugin-geoip-1.2.0"),
            server_offered_version="1.3.0",
            server_offered_hash=digest("plugin-geoip-1.3.0"),
            status=pb.PackageStatusEnum_InstallFailed,
            error_message="signature check failed",
            download_details=pb.PackageDownloadDetails(
                download_percent=100.0, download_bytes_per_second=52428.8
            ),
        )
    )
    return out


def available_components() -> pb.AvailableComponents:
    def details(*meta: tuple[str, str]) -> pb.ComponentDetails:
        return pb.ComponentDetails(metadata=[kv(k, s(v)) for k, v in meta])

    out = pb.AvailableComponents(hash=digest("available-components"))
    receivers = details(("kind", "receiver"))
    receivers.sub_component_map["filelog"].CopyFrom(
        details(("code.namespace", "github.com/.../filelogreceiver"), ("version", "0.115.0"))
    )
    otlp = details(("code.namespace", "go.opentelemetry.io/collector/receiver/otlpreceiver"))
    # a second level of sub-components
    otlp.sub_component_map["grpc"].CopyFrom(details(("transport", "grpc")))
    otlp.sub_component_map["http"].CopyFrom(details(("transport", "http")))
    receivers.sub_component_map["otlp"].CopyFrom(otlp)
    exporters = details(("kind", "exporter"))
    exporters.sub_component_map["debug"].CopyFrom(details(("version", "0.115.0")))
    out.components["exporters"].CopyFrom(exporters)
    out.components["receivers"].CopyFrom(receivers)
    return out


def agent_to_server_full(with_empty_key: bool) -> pb.AgentToServer:
    msg = pb.AgentToServer(
        instance_uid=AGENT_UID,
        sequence_num=0xFFFF_FFFF_FFFF_FFFF,  # 10-byte varint
        capabilities=0xFFFF,  # every AgentCapabilities bit of spec v0.20.0
        flags=pb.AgentToServerFlags_RequestInstanceUid,
    )
    msg.agent_description.CopyFrom(agent_description())
    msg.health.CopyFrom(component_health())
    msg.effective_config.CopyFrom(effective_config(with_empty_key))
    msg.remote_config_status.CopyFrom(
        pb.RemoteConfigStatus(
            last_remote_config_hash=digest("remote-config-7"),
            status=pb.RemoteConfigStatuses_FAILED,
            error_message="yaml: line 3: mapping values are not allowed here",
        )
    )
    msg.package_statuses.CopyFrom(package_statuses())
    msg.agent_disconnect.SetInParent()  # an empty message that is present
    msg.connection_settings_request.opamp.certificate_request.csr = pem(
        "CERTIFICATE REQUEST", "fixture-csr"
    )
    msg.custom_capabilities.capabilities.extend(
        ["com.example.pprof", "io.opentelemetry.custom.restart"]
    )
    msg.custom_message.CopyFrom(
        pb.CustomMessage(
            capability="com.example.pprof", type="profile", data=b"\x0a\x03cpu\x10\x1e"
        )
    )
    msg.available_components.CopyFrom(available_components())
    return msg


def telemetry_settings(signal: str) -> pb.TelemetryConnectionSettings:
    return pb.TelemetryConnectionSettings(
        destination_endpoint=f"https://telemetry.example.com:4318/v1/{signal}",
        headers=headers(("x-signal", signal), ("authorization", f"Bearer {signal}-token")),
        certificate=tls_cert(signal),
    )


def other_settings(name: str, extra: dict[str, str]) -> pb.OtherConnectionSettings:
    out = pb.OtherConnectionSettings(
        destination_endpoint=f"tcp://{name}.example.com:9092",
        headers=headers(("x-connection", name)),
        certificate=tls_cert(name),
    )
    for k, v in extra.items():
        out.other_settings[k] = v
    return out


def package_available(
    name: str, kind: int, version: str
) -> pb.PackageAvailable:
    return pb.PackageAvailable(
        type=kind,
        version=version,
        file=pb.DownloadableFile(
            download_url=f"https://packages.example.com/{name}/{version}/{name}.tar.gz",
            content_hash=digest(f"{name}-{version}.tar.gz"),
            signature=b"fixture-signature-" + name.encode("ascii"),
            headers=headers(("authorization", "Bearer download-token"), ("x-package", name)),
        ),
        hash=digest(f"{name}-{version}"),
    )


def server_to_agent_full() -> pb.ServerToAgent:
    msg = pb.ServerToAgent(
        instance_uid=AGENT_UID,
        flags=pb.ServerToAgentFlags_ReportFullState
        | pb.ServerToAgentFlags_ReportAvailableComponents,
        capabilities=0x7F,  # every ServerCapabilities bit
    )
    # error_response (2) is deliberately absent: the spec makes it exclusive.
    rc = msg.remote_config
    rc.config_hash = digest("remote-config-8")
    rc.config.config_map["collector.yaml"].CopyFrom(
        config_object("collector.yaml", "text/yaml", "exporters:\n  debug: {}\n")
    )
    rc.config.config_map["extra.json"].CopyFrom(
        config_object("extra.json", "application/json", '{"processors":{"batch":{}}}')
    )
    rc.config.config_map["pipelines.yaml"].CopyFrom(
        config_object("pipelines.yaml", "text/yaml", "service:\n  pipelines: {}\n")
    )

    cs = msg.connection_settings
    cs.hash = digest("connection-settings-3")
    cs.opamp.CopyFrom(
        pb.OpAMPConnectionSettings(
            destination_endpoint="wss://opamp.example.com:4320/v1/opamp",
            headers=headers(("authorization", "Bearer opamp-token"), ("x-tenant", "fixtures")),
            certificate=tls_cert("opamp"),
            heartbeat_interval_seconds=45,
        )
    )
    cs.own_metrics.CopyFrom(telemetry_settings("metrics"))
    cs.own_traces.CopyFrom(telemetry_settings("traces"))
    cs.own_logs.CopyFrom(telemetry_settings("logs"))
    cs.other_connections["backup"].CopyFrom(
        other_settings("backup", {"compression": "gzip", "timeout": "10s"})
    )
    cs.other_connections["kafka"].CopyFrom(
        other_settings("kafka", {"acks": "all", "topic": "otlp_spans"})
    )

    pa = msg.packages_available
    pa.all_packages_hash = digest("all-packages-v3")
    pa.packages["otelcol-contrib"].CopyFrom(
        package_available("otelcol-contrib", pb.PackageType_TopLevel, "0.115.0")
    )
    pa.packages["plugin-geoip"].CopyFrom(
        package_available("plugin-geoip", pb.PackageType_Addon, "1.3.0")
    )

    msg.agent_identification.new_instance_uid = NEW_AGENT_UID
    # CommandType has a single value, Restart = 0: the message is present but empty.
    msg.command.type = pb.CommandType_Restart
    msg.command.SetInParent()
    msg.custom_capabilities.capabilities.extend(["com.example.pprof"])
    msg.custom_message.CopyFrom(
        pb.CustomMessage(capability="com.example.pprof", type="start", data=b"seconds=30")
    )
    return msg


def server_to_agent_error() -> pb.ServerToAgent:
    msg = pb.ServerToAgent(instance_uid=AGENT_UID)
    msg.error_response.CopyFrom(
        pb.ServerErrorResponse(
            type=pb.ServerErrorResponseType_Unavailable,
            error_message="server overloaded, retry later",
            retry_info=pb.RetryInfo(retry_after_nanoseconds=5_000_000_000),
        )
    )
    return msg


def anyvalue_all() -> pb.AgentDescription:
    """Every AnyValue variant, including variants holding their default value."""
    explicit_defaults = [
        # A set oneof member is written even when it holds the default value.
        kv("default.string", av.AnyValue(string_value="")),
        kv("default.bool", av.AnyValue(bool_value=False)),
        kv("default.int", av.AnyValue(int_value=0)),
        kv("default.double", av.AnyValue(double_value=0.0)),
        kv("default.bytes", av.AnyValue(bytes_value=b"")),
        kv("default.array", av.AnyValue(array_value=av.ArrayValue())),
        kv("default.kvlist", av.AnyValue(kvlist_value=av.KeyValueList())),
    ]
    extremes = [
        kv("int.min", av.AnyValue(int_value=-(2**63))),
        kv("int.max", av.AnyValue(int_value=2**63 - 1)),
        kv("int.minus_one", av.AnyValue(int_value=-1)),
        kv("double.tiny", av.AnyValue(double_value=5e-324)),
        kv("double.inf", av.AnyValue(double_value=float("-inf"))),
        kv("string.utf8", s("gr\u00fc\u00dfe \u65e5\u672c \U0001f680")),
    ]
    return pb.AgentDescription(
        identifying_attributes=every_anyvalue_kind(),
        non_identifying_attributes=[
            *explicit_defaults,
            *extremes,
            kv("no.value", None),  # KeyValue whose value field is absent
            kv("", s("empty key")),  # a KeyValue key is a plain field: "" is not written
        ],
    )


def heartbeat() -> pb.AgentToServer:
    return pb.AgentToServer(
        instance_uid=AGENT_UID,
        sequence_num=42,
        capabilities=pb.AgentCapabilities_ReportsStatus
        | pb.AgentCapabilities_ReportsHeartbeat
        | pb.AgentCapabilities_ReportsHealth,
    )


# name -> (builder, full-coverage exclusions or None, prost_reencode_identical, notes)
VECTORS: dict[str, tuple] = {
    "agent_to_server_full.bin": (
        lambda: agent_to_server_full(with_empty_key=True),
        frozenset(),
        False,
        "AgentToServer with every field this package knows set, recursively. "
        'effective_config has a config map entry with key "": Google\'s encoders '
        "write the empty key inside the map entry (0a 00), prost leaves a "
        "default key out, so prost's re-encoding is 2 bytes shorter in that entry "
        "(and in the lengths around it) while decoding to the same value.",
    ),
    "agent_to_server_full_nonempty_keys.bin": (
        lambda: agent_to_server_full(with_empty_key=False),
        frozenset(),
        True,
        'Same as agent_to_server_full.bin without the "" config map entry; '
        "every map key and value is non-default, so prost must re-encode it byte for byte.",
    ),
    "server_to_agent_full.bin": (
        server_to_agent_full,
        frozenset({"opamp.proto.ServerToAgent.error_response"}),
        True,
        "ServerToAgent with every field set except error_response, recursively.",
    ),
    "server_to_agent_error.bin": (
        server_to_agent_error,
        None,
        True,
        "ServerToAgent with instance_uid and error_response (Unavailable, retry_info).",
    ),
    "anyvalue_all.bin": (
        anyvalue_all,
        None,
        True,
        "AgentDescription covering every AnyValue variant, variants set to their "
        "default value, a null AnyValue, a KeyValue without value and a KeyValue with key \"\".",
    ),
    "agent_to_server_empty.bin": (
        pb.AgentToServer,
        None,
        True,
        "Empty AgentToServer: zero bytes.",
    ),
    "agent_to_server_heartbeat.bin": (
        heartbeat,
        None,
        True,
        "AgentToServer with only instance_uid, sequence_num and capabilities.",
    ),
}


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def is_map(field: FD) -> bool:
    return (
        field.type == FD.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def target_message(field: FD):
    """The message type a field leads to (the value type for maps), or None."""
    if field.type != FD.TYPE_MESSAGE:
        return None
    if is_map(field):
        return field.message_type.fields_by_name["value"].message_type
    return field.message_type


def is_repeated(field: FD) -> bool:
    # protobuf >= 6 has the is_repeated property; 7.x dropped `label`.
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return field.label == FD.LABEL_REPEATED


def enum_only_zero(field: FD) -> bool:
    return field.enum_type is not None and [v.number for v in field.enum_type.values] == [0]


def reachable_types(root, excluded: frozenset) -> dict:
    seen = {}
    stack = [root]
    while stack:
        desc = stack.pop()
        if desc.full_name in seen:
            continue
        seen[desc.full_name] = desc
        for f in desc.fields:
            if f.full_name in excluded:
                continue
            t = target_message(f)
            if t is not None:
                stack.append(t)
    return seen


def children(msg, field):
    value = getattr(msg, field.name)
    if is_map(field):
        return [value[k] for k in sorted(value)]
    if is_repeated(field):
        return list(value)
    return [value]


def check_full_coverage(msg, excluded: frozenset) -> None:
    """Fail unless every field of every message reachable from msg is set.

    Per instance, every field must be set, except:
      * members of a oneof (exactly one may be set; a null AnyValue has none),
      * enum and bool fields (0 and false are legitimate values, e.g.
        PackageType_TopLevel, an unhealthy component), and fields of a
        recursive type (the innermost level must stop somewhere):
        both are checked across all instances instead,
      * enum fields whose enum has only the value 0 (CommandType): they can
        never be non-default on the wire.
    Across all instances of a message type, every field (every oneof member,
    every enum and bool field) must be set at least once, every reachable type must
    occur, and every recursive field must nest at least two levels deep.
    """
    problems: list[str] = []
    union: dict[str, set[str]] = {}
    recursion_depth: dict[str, int] = {}

    def walk(m, path: str, depth_by_field: dict[str, int]) -> None:
        d = m.DESCRIPTOR
        present = {f.name for f, _ in m.ListFields()}
        union.setdefault(d.full_name, set()).update(present)
        for f in d.fields:
            if f.full_name in excluded:
                if f.name in present:
                    problems.append(f"{path}.{f.name} must not be set in this vector")
                continue
            if f.name in present:
                continue
            recursive = target_message(f) is d
            if (
                f.containing_oneof is not None
                or f.enum_type is not None
                or f.type == FD.TYPE_BOOL
                or recursive
            ):
                continue
            problems.append(f"{path}.{f.name} (#{f.number}) is not set")
        for oneof in d.oneofs:
            chosen = [f.name for f in oneof.fields if f.name in present]
            if len(chosen) > 1:
                problems.append(f"{path}: oneof {oneof.name} has {chosen}")
        for f, _ in m.ListFields():
            if target_message(f) is None or f.full_name in excluded:
                continue
            sub_depth = dict(depth_by_field)
            if target_message(f) is d:
                sub_depth[f.full_name] = sub_depth.get(f.full_name, 0) + 1
                recursion_depth[f.full_name] = max(
                    recursion_depth.get(f.full_name, 0), sub_depth[f.full_name]
                )
            for i, child in enumerate(children(m, f)):
                walk(child, f"{path}.{f.name}[{i}]" if is_repeated(f) else f"{path}.{f.name}", sub_depth)

    walk(msg, msg.DESCRIPTOR.name, {})

    for name, desc in sorted(reachable_types(msg.DESCRIPTOR, excluded).items()):
        if name not in union:
            problems.append(f"message {name} never occurs")
            continue
        for f in desc.fields:
            if f.full_name in excluded or enum_only_zero(f):
                continue
            if f.name not in union[name]:
                problems.append(f"{name}.{f.name} (#{f.number}) is never set in any instance")
            if target_message(f) is desc and recursion_depth.get(f.full_name, 0) < 2:
                problems.append(f"{name}.{f.name} nests fewer than two levels")
    if problems:
        raise VectorError("incomplete full vector:\n  " + "\n  ".join(problems))


def default_map_entries(msg, path: str) -> list[str]:
    """Map entries whose key or value is the default value of its type.

    Google's encoders write both key and value of every map entry; prost
    leaves out a key or value equal to its default, so such an entry cannot
    round-trip byte for byte through prost (it still decodes to the same map).
    """
    found = []
    for f, value in msg.ListFields():
        if target_message(f) is None and not is_map(f):
            continue
        if is_map(f):
            value_field = f.message_type.fields_by_name["value"]
            for key in sorted(value):
                entry = value[key]
                if key == type(key)():
                    found.append(f"{path}.{f.name}[{key!r}]: default key")
                if value_field.type == FD.TYPE_MESSAGE:
                    if entry.ByteSize() == 0:
                        found.append(f"{path}.{f.name}[{key!r}]: default value")
                elif entry == value_field.default_value:
                    found.append(f"{path}.{f.name}[{key!r}]: default value")
        for i, child in enumerate(children(msg, f) if target_message(f) else []):
            where = f"{path}.{f.name}[{i}]" if is_repeated(f) else f"{path}.{f.name}"
            found.extend(default_map_entries(child, where))
    return found


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise VectorError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def check_wire_order(buf: bytes, desc, path: str) -> None:
    """Walk the raw bytes: known fields only, in non-decreasing number order."""
    pos = 0
    last = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        field = desc.fields_by_number.get(number)
        if field is None:
            raise VectorError(f"{path}: unknown field number {number}")
        if number < last:
            raise VectorError(f"{path}: field {number} written after field {last}")
        last = number
        if wire_type == 0:
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            payload = buf[pos : pos + length]
            if len(payload) != length:
                raise VectorError(f"{path}.{field.name}: truncated")
            pos += length
            if field.type == FD.TYPE_MESSAGE:
                check_wire_order(payload, field.message_type, f"{path}.{field.name}")
        else:
            raise VectorError(f"{path}: unexpected wire type {wire_type}")
    if pos != len(buf):
        raise VectorError(f"{path}: trailing bytes")


def build_all() -> dict[str, tuple[object, bytes]]:
    out = {}
    for name, (builder, excluded, _, _) in VECTORS.items():
        msg = builder()
        data = msg.SerializeToString(deterministic=True)
        # Everything below is checked on what a reader gets back from the bytes.
        parsed = type(msg)()
        parsed.ParseFromString(data)
        if parsed != msg:
            raise VectorError(f"{name}: parsed message differs from the built one")
        again = parsed.SerializeToString(deterministic=True)
        if again != data:
            raise VectorError(f"{name}: re-serialization changed the bytes")
        check_wire_order(data, parsed.DESCRIPTOR, parsed.DESCRIPTOR.name)
        if excluded is not None:
            check_full_coverage(parsed, excluded)
        defaults = default_map_entries(parsed, parsed.DESCRIPTOR.name)
        prost_identical = VECTORS[name][2]
        if prost_identical and defaults:
            raise VectorError(f"{name} is meant to round-trip through prost but has {defaults}")
        if not prost_identical and not defaults:
            raise VectorError(f"{name} is flagged as not prost-identical but has no default map entry")
        out[name] = (parsed, data)
    if out["agent_to_server_empty.bin"][1] != b"":
        raise VectorError("agent_to_server_empty.bin must be empty")
    return out


def upb_cross_check(built: dict[str, tuple[object, bytes]], directory: Path) -> list[str]:
    """Decode every file with the upb backend in a child process."""
    names = list(built)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), PROBE_FLAG, str(directory), *names],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VectorError(f"upb probe failed:\n{proc.stderr}")
    report = json.loads(proc.stdout)
    notes = []
    for name in names:
        parsed, data = built[name]
        if report[name]["text"] != text_format.MessageToString(parsed):
            raise VectorError(f"{name}: the upb backend decodes a different message")
        if bytes.fromhex(report[name]["reserialized"]) != data:
            notes.append(
                f"{name}: upb's deterministic re-serialization differs "
                "(expected only where a map key is a prefix of another, e.g. \"\")"
            )
    return notes


def upb_probe(directory: Path, names: list[str]) -> None:
    if api_implementation.Type() != "upb":
        raise VectorError(f"probe wanted the upb backend, got {api_implementation.Type()}")
    out = {}
    for name in names:
        msg = getattr(pb, describe(name))()
        msg.ParseFromString((directory / name).read_bytes())
        out[name] = {
            "text": text_format.MessageToString(msg),
            "reserialized": msg.SerializeToString(deterministic=True).hex(),
        }
    json.dump(out, sys.stdout)


def describe(name: str) -> str:
    builder = VECTORS[name][0]
    return builder().DESCRIPTOR.name


def manifest(built: dict[str, tuple[object, bytes]]) -> bytes:
    import google.protobuf

    files = {}
    for name, (parsed, data) in built.items():
        _, _, identical, notes = VECTORS[name]
        files[name] = {
            "message": parsed.DESCRIPTOR.name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "prost_reencode_identical": identical,
            "notes": notes,
        }
    doc = {
        "generator": "make_vectors.py",
        "source_package": {
            "name": SOURCE_PACKAGE,
            "version": importlib.metadata.version(SOURCE_PACKAGE),
            "modules": [pb.__name__, av.__name__],
            "proto_package": pb.DESCRIPTOR.package,
        },
        "protobuf_runtime": {
            "name": "protobuf",
            "version": google.protobuf.__version__,
            "backend": api_implementation.Type(),
        },
        "serialization": "SerializeToString(deterministic=True)",
        "files": files,
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def same_but_runtime(a: bytes, b: bytes) -> bool:
    """Two manifests that differ at most in the protobuf runtime version."""
    docs = [json.loads(x) for x in (a, b)]
    for doc in docs:
        doc.get("protobuf_runtime", {}).pop("version", None)
    return docs[0] == docs[1]


def main() -> int:
    if PROBE_FLAG in sys.argv:
        i = sys.argv.index(PROBE_FLAG)
        upb_probe(Path(sys.argv[i + 1]), sys.argv[i + 2 :])
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; fail if the files on disk differ from a fresh build",
    )
    args = parser.parse_args()

    if api_implementation.Type() != "python":
        raise VectorError(f"expected the pure-Python backend, got {api_implementation.Type()}")
    version = importlib.metadata.version(SOURCE_PACKAGE)
    if version != SOURCE_VERSION:
        raise VectorError(f"{SOURCE_PACKAGE} {SOURCE_VERSION} is required, found {version}")

    built = build_all()
    outputs = {name: data for name, (_, data) in built.items()}
    outputs["vectors.json"] = manifest(built)

    if args.check:
        stale = []
        for name, data in outputs.items():
            path = HERE / name
            on_disk = path.read_bytes() if path.is_file() else None
            if on_disk == data:
                continue
            if name == "vectors.json" and on_disk is not None and same_but_runtime(on_disk, data):
                print("note: vectors.json was written with another protobuf runtime version")
                continue
            stale.append(name)
        if stale:
            raise VectorError("out of date: " + ", ".join(stale))
    else:
        for name, data in outputs.items():
            (HERE / name).write_bytes(data)

    for note in upb_cross_check(built, HERE):
        print("note:", note)
    for name, data in outputs.items():
        print(f"{'checked' if args.check else 'wrote'} {name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VectorError as err:
        print(f"make_vectors.py: error: {err}", file=sys.stderr)
        sys.exit(1)
