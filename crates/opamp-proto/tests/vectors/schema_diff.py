#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Compare our OpAMP .proto files with the classes in opentelemetry-opamp-client.

Needs `opentelemetry-opamp-client` and `grpcio-tools` (for its bundled protoc)
in the running Python. Prints one line per difference; exit status 0 either way.
The README's schema diff section is this script's output, written out.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2 as dp
from grpc_tools import protoc

from opentelemetry._opamp.proto import anyvalue_pb2, opamp_pb2

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
# Renamed in opamp-spec v0.20.0 with the wire format unchanged.
RENAMED = {"AgentConfigFile": "AgentConfigObject"}

TYPE_NAMES = {v: k[len("TYPE_"):].lower() for k, v in dp.FieldDescriptorProto.Type.items()}


def ours() -> list[dp.FileDescriptorProto]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.pb"
        rc = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                "opamp/v1/opamp.proto",
            ]
        )
        if rc != 0:
            sys.exit(f"protoc failed with {rc}")
        fds = dp.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return list(fds.file)


def theirs() -> list[dp.FileDescriptorProto]:
    files = []
    for module in (anyvalue_pb2, opamp_pb2):
        proto = dp.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def rename(name: str) -> str:
    return ".".join(RENAMED.get(part, part) for part in name.split("."))


def flatten(files: list[dp.FileDescriptorProto]) -> tuple[dict, dict]:
    """Messages as {name: {number: description}}, enums as {name: {number: value name}}."""
    messages: dict[str, dict[int, str]] = {}
    enums: dict[str, dict[int, str]] = {}

    def walk(prefix: str, msg: dp.DescriptorProto) -> None:
        name = rename(prefix + msg.name)
        fields = {}
        for f in msg.field:
            kind = rename(f.type_name.rsplit(".", 1)[-1]) if f.type_name else TYPE_NAMES[f.type]
            label = "repeated " if f.label == dp.FieldDescriptorProto.LABEL_REPEATED else ""
            oneof = f" (oneof {msg.oneof_decl[f.oneof_index].name})" if f.HasField("oneof_index") else ""
            fields[f.number] = f"{label}{kind} {f.name} = {f.number}{oneof}"
        messages[name] = fields
        for nested in msg.nested_type:
            walk(name + ".", nested)
        for enum in msg.enum_type:
            enums[name + "." + enum.name] = {v.number: f"{v.name} = {v.number:#x}" for v in enum.value}

    for fd in files:
        for msg in fd.message_type:
            walk("", msg)
        for enum in fd.enum_type:
            enums[enum.name] = {v.number: f"{v.name} = {v.number:#x}" for v in enum.value}
    return messages, enums


def main() -> None:
    our_files, their_files = ours(), theirs()
    print(
        "packages: ours",
        sorted({f.package for f in our_files}),
        "theirs",
        sorted({f.package for f in their_files}),
    )
    print("renamed (same wire format):", ", ".join(f"{a} -> {b}" for a, b in RENAMED.items()))
    (our_msgs, our_enums), (their_msgs, their_enums) = flatten(our_files), flatten(their_files)
    count = 0
    for kind, a, b in (("message", our_msgs, their_msgs), ("enum", our_enums, their_enums)):
        for name in sorted(set(a) | set(b)):
            if name not in b:
                print(f"only in ours: {kind} {name} {{{'; '.join(a[name].values())}}}")
                count += 1
                continue
            if name not in a:
                print(f"only in theirs: {kind} {name} {{{'; '.join(b[name].values())}}}")
                count += 1
                continue
            for number in sorted(set(a[name]) | set(b[name])):
                x, y = a[name].get(number), b[name].get(number)
                if x == y:
                    continue
                count += 1
                if y is None:
                    print(f"only in ours: {name}: {x}")
                elif x is None:
                    print(f"only in theirs: {name}: {y}")
                else:
                    print(f"differs: {name} #{number}: ours {x!r}, theirs {y!r}")
    print(f"{count} difference(s)")


if __name__ == "__main__":
    main()
