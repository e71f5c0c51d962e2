//! Our `.proto` files against the upstream OpAMP v0.20.0 schema, field for field.
//!
//! `tests/data/opamp-v0.20-schema.json` holds every message of upstream v0.20.0
//! (`opamp.proto` and `anyvalue.proto`) as `{field: [number, type, label]}` and every enum as
//! `{value name: number}`. This test compiles our `proto/` with the `protoc` shipped by
//! `protoc-bin-vendored`, decodes the resulting `FileDescriptorSet` with `prost-types`, puts
//! it in the same form and compares both ways: a message, field or enum value that is missing,
//! extra or different on either side fails the test with one line per difference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use serde_json::Value;

/// `(number, type, label)` of one field; label is `""`, `"repeated"` or `"oneof:NAME"`, type a
/// scalar name, a message or enum name without package, or `map<K,V>`.
type Field = (i64, String, String);
type Messages = BTreeMap<String, BTreeMap<String, Field>>;
type Enums = BTreeMap<String, BTreeMap<String, i64>>;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Our schema, parsed by `protoc` into descriptors.
fn our_descriptors() -> FileDescriptorSet {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    let out = std::env::temp_dir().join(format!("opamp-proto-schema-{}.pb", std::process::id()));
    let dir = crate_dir();
    let status = std::process::Command::new(protoc)
        .arg(format!("-I{}", dir.join("proto").display()))
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg("opamp/v1/opamp.proto")
        .status()
        .expect("run protoc");
    assert!(status.success(), "protoc failed: {status}");
    let bytes = std::fs::read(&out).expect("descriptor set written");
    let _ = std::fs::remove_file(&out);
    FileDescriptorSet::decode(&bytes[..]).expect("protoc writes a valid FileDescriptorSet")
}

/// `.opamp.proto.v1.Foo` -> `Foo`.
fn short_name(type_name: &str) -> String {
    type_name.rsplit('.').next().unwrap_or(type_name).to_owned()
}

fn scalar_name(t: Type) -> &'static str {
    match t {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        Type::Group | Type::Message | Type::Enum => "?",
    }
}

/// The type name of a field, `map<K,V>` for a map (a repeated field of a nested map entry).
fn field_type(
    f: &prost_types::FieldDescriptorProto,
    map_entries: &BTreeMap<String, DescriptorProto>,
) -> String {
    match f.r#type() {
        Type::Message | Type::Enum | Type::Group => {
            let name = short_name(f.type_name());
            match map_entries.get(&name) {
                Some(entry) => {
                    let kv: Vec<String> = entry
                        .field
                        .iter()
                        .map(|f| field_type(f, map_entries))
                        .collect();
                    format!("map<{}>", kv.join(","))
                }
                None => name,
            }
        }
        t => scalar_name(t).to_owned(),
    }
}

fn ours() -> (Messages, Enums) {
    let set = our_descriptors();
    let mut messages = Messages::new();
    let mut enums = Enums::new();
    for file in &set.file {
        for e in &file.enum_type {
            enums.insert(
                e.name().to_owned(),
                e.value
                    .iter()
                    .map(|v| (v.name().to_owned(), i64::from(v.number())))
                    .collect(),
            );
        }
        for m in &file.message_type {
            assert!(m.enum_type.is_empty(), "nested enum in {}", m.name());
            let map_entries: BTreeMap<String, DescriptorProto> = m
                .nested_type
                .iter()
                .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
                .map(|n| (n.name().to_owned(), n.clone()))
                .collect();
            assert_eq!(
                map_entries.len(),
                m.nested_type.len(),
                "nested message other than a map entry in {}",
                m.name()
            );
            let mut fields = BTreeMap::new();
            for f in &m.field {
                let ty = field_type(f, &map_entries);
                let label = if let Some(i) = f.oneof_index {
                    let oneof = &m.oneof_decl[usize::try_from(i).expect("small index")];
                    format!("oneof:{}", oneof.name())
                } else if f.label() == Label::Repeated && !ty.starts_with("map<") {
                    "repeated".to_owned()
                } else {
                    String::new()
                };
                fields.insert(f.name().to_owned(), (i64::from(f.number()), ty, label));
            }
            messages.insert(m.name().to_owned(), fields);
        }
    }
    (messages, enums)
}

fn upstream() -> (Messages, Enums) {
    let path = crate_dir().join("tests/data/opamp-v0.20-schema.json");
    let text = std::fs::read_to_string(&path).expect("schema data file");
    let json: Value = serde_json::from_str(&text).expect("schema data is JSON");
    let mut messages = Messages::new();
    for (name, fields) in json["messages"].as_object().expect("messages object") {
        let fields = fields
            .as_object()
            .expect("fields object")
            .iter()
            .map(|(field, v)| {
                let v = v.as_array().expect("[number, type, label]");
                let field_def = (
                    v[0].as_i64().expect("number"),
                    v[1].as_str().expect("type").to_owned(),
                    v[2].as_str().expect("label").to_owned(),
                );
                (field.clone(), field_def)
            })
            .collect();
        messages.insert(name.clone(), fields);
    }
    let mut enums = Enums::new();
    for (name, values) in json["enums"].as_object().expect("enums object") {
        let values = values
            .as_object()
            .expect("values object")
            .iter()
            .map(|(v, n)| (v.clone(), n.as_i64().expect("enum number")))
            .collect();
        enums.insert(name.clone(), values);
    }
    (messages, enums)
}

/// One line per difference between two maps of maps: missing, extra or different entries.
fn diff<V: PartialEq + std::fmt::Debug>(
    kind: &str,
    ours: &BTreeMap<String, BTreeMap<String, V>>,
    upstream: &BTreeMap<String, BTreeMap<String, V>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, theirs) in upstream {
        let Some(mine) = ours.get(name) else {
            out.push(format!("missing {kind} {name}"));
            continue;
        };
        for (item, want) in theirs {
            match mine.get(item) {
                None => out.push(format!("missing {name}.{item}: upstream {want:?}")),
                Some(got) if got != want => out.push(format!(
                    "differs {name}.{item}: ours {got:?}, upstream {want:?}"
                )),
                Some(_) => {}
            }
        }
        for (item, got) in mine {
            if !theirs.contains_key(item) {
                out.push(format!("extra {name}.{item}: ours {got:?}"));
            }
        }
    }
    for name in ours.keys() {
        if !upstream.contains_key(name) {
            out.push(format!("extra {kind} {name}"));
        }
    }
    out
}

#[test]
fn proto_matches_upstream_v0_20_0_field_for_field() {
    let (our_messages, our_enums) = ours();
    let (up_messages, up_enums) = upstream();
    let mut differences = diff("message", &our_messages, &up_messages);
    differences.extend(diff("enum", &our_enums, &up_enums));
    assert!(
        differences.is_empty(),
        "proto/ differs from upstream OpAMP v0.20.0 ({} differences):\n  {}",
        differences.len(),
        differences.join("\n  ")
    );
    // The comparison covers the whole schema, not an empty one.
    assert_eq!(our_messages.len(), up_messages.len());
    assert!(up_messages.len() > 40 && up_enums.len() >= 10);
}

#[test]
fn the_diff_names_what_differs() {
    let mut ours = Messages::new();
    let mut up = Messages::new();
    let field = |n: i64, t: &str| (n, t.to_owned(), String::new());
    ours.insert(
        "A".into(),
        [("x".to_owned(), field(1, "string"))].into_iter().collect(),
    );
    up.insert(
        "A".into(),
        [
            ("x".to_owned(), field(1, "bytes")),
            ("role".to_owned(), field(3, "string")),
        ]
        .into_iter()
        .collect(),
    );
    up.insert("B".into(), BTreeMap::new());
    let d = diff("message", &ours, &up);
    assert_eq!(
        d,
        [
            r#"missing A.role: upstream (3, "string", "")"#,
            r#"differs A.x: ours (1, "string", ""), upstream (1, "bytes", "")"#,
            "missing message B",
        ]
    );
}
