//! Cross-implementation vectors: messages encoded by another implementation (the protobuf
//! classes shipped in PyPI `opentelemetry-opamp-client` 0.5b0, Google's protobuf runtime), made
//! by `tests/vectors/make_vectors.py` with every field those classes know set. Our types must
//! decode them and re-encode them to identical bytes: a field with a wrong number or type would
//! be dropped as unknown, or encoded differently, and the bytes would not match.
//!
//! One known, legal difference: inside a map entry Google's encoders always write the key, even
//! an empty one, while prost leaves a default key out. Files that hold such an entry are marked
//! `prost_reencode_identical: false` in `vectors.json`; for them we check that decoding is
//! lossless instead (decode, encode, decode gives the same message).

use std::path::PathBuf;

use opamp_proto::{AgentDescription, AgentToServer, Message, ServerToAgent};
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Decodes `bytes` as `M` and re-encodes it; returns the re-encoding and a lossless-ness check.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> (Vec<u8>, bool) {
    let decoded = M::decode(bytes).expect("vector decodes");
    let encoded = decoded.encode_to_vec();
    let again = M::decode(&encoded[..]).expect("re-encoding decodes");
    (encoded, again == decoded)
}

#[test]
fn vectors_from_another_implementation_round_trip() {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("vectors.json")).expect("vectors.json"))
            .expect("valid json");
    let files = index["files"].as_object().expect("files");
    assert!(
        files.len() >= 7,
        "fixture is incomplete: {} files",
        files.len()
    );

    let mut identical = 0;
    for (name, meta) in files {
        let bytes = std::fs::read(dir().join(name)).expect("vector file");
        let sha = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(
            sha,
            meta["sha256"].as_str().expect("sha256"),
            "{name} changed on disk"
        );

        let (encoded, lossless) = match meta["message"].as_str().expect("message") {
            "AgentToServer" => round_trip::<AgentToServer>(&bytes),
            "ServerToAgent" => round_trip::<ServerToAgent>(&bytes),
            "AgentDescription" => round_trip::<AgentDescription>(&bytes),
            other => panic!("{name}: unknown message type {other}"),
        };
        assert!(lossless, "{name}: decode/encode/decode lost information");
        if meta["prost_reencode_identical"].as_bool().expect("flag") {
            assert!(
                encoded == bytes,
                "{name}: re-encoding differs from the original bytes"
            );
            identical += 1;
        } else {
            assert_ne!(
                encoded, bytes,
                "{name}: marked non-identical but re-encodes identically"
            );
        }
    }
    assert!(
        identical >= 6,
        "too few byte-identical vectors: {identical}"
    );
}

#[test]
fn full_vectors_carry_the_fields_we_expect() {
    // Spot checks that decoding lands values in the right fields, not just somewhere.
    let bytes = std::fs::read(dir().join("agent_to_server_full.bin")).expect("vector");
    let msg = AgentToServer::decode(&bytes[..]).expect("decodes");
    assert_eq!(msg.instance_uid.len(), 16);
    assert_ne!(msg.sequence_num, 0);
    assert!(msg.agent_disconnect.is_some());
    let config = &msg
        .effective_config
        .expect("effective_config")
        .config_map
        .expect("map")
        .config_map;
    assert!(
        config.contains_key(""),
        "the \"\" config key (valid since v0.20.0) survives"
    );
    let health = msg.health.expect("health");
    assert_ne!(health.start_time_unix_nano, 0, "fixed64 field decoded");
    assert!(
        health
            .component_health_map
            .values()
            .any(|h| !h.component_health_map.is_empty())
    );

    let bytes = std::fs::read(dir().join("server_to_agent_full.bin")).expect("vector");
    let msg = ServerToAgent::decode(&bytes[..]).expect("decodes");
    assert!(msg.error_response.is_none());
    assert!(msg.remote_config.is_some() && msg.connection_settings.is_some());
    assert!(msg.packages_available.is_some() && msg.agent_identification.is_some());
    assert!(msg.command.is_some() && msg.custom_message.is_some());

    let bytes = std::fs::read(dir().join("server_to_agent_error.bin")).expect("vector");
    let msg = ServerToAgent::decode(&bytes[..]).expect("decodes");
    let err = msg.error_response.expect("error_response");
    assert_eq!(
        err.r#type(),
        opamp_proto::ServerErrorResponseType::Unavailable
    );
    assert!(matches!(
        err.details,
        Some(opamp_proto::server_error_response::Details::RetryInfo(ref r)) if r.retry_after_nanoseconds > 0
    ));
}
