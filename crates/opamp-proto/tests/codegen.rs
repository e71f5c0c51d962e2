//! The generated code in `src/generated/` is checked in so that building the crate needs no
//! `protoc`. This test regenerates it with the `protoc` shipped by `protoc-bin-vendored` and
//! fails on any difference. Run with `OPAMP_BLESS=1` to rewrite the checked-in file after a
//! deliberate change to `proto/`.

use std::path::{Path, PathBuf};

const GENERATED: &str = "opamp.proto.v1.rs";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out_dir: &Path) {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc)
        .out_dir(out_dir)
        // Sorted maps: encoding is deterministic (byte-identical vectors, stable hashes).
        .btree_map(["."])
        // Zero-copy decoding and cheap clones of config bodies shared across many agents.
        .bytes(["."])
        // These hold secrets or large payloads; `src/redact.rs` writes their `Debug`.
        .skip_debug([
            ".opamp.proto.v1.AgentConfigObject",
            ".opamp.proto.v1.CustomMessage",
            ".opamp.proto.v1.TLSCertificate",
            ".opamp.proto.v1.Header",
        ]);
    let dir = crate_dir();
    config
        .compile_protos(
            &[dir.join("proto/opamp/v1/opamp.proto")],
            &[dir.join("proto")],
        )
        .expect("protoc compiles the OpAMP schema");
}

#[test]
fn checked_in_code_matches_the_schema() {
    let tmp = std::env::temp_dir().join(format!("opamp-proto-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    generate(&tmp);
    let fresh = std::fs::read_to_string(tmp.join(GENERATED)).expect("generated file");
    let _ = std::fs::remove_dir_all(&tmp);

    let checked_in_path = crate_dir().join("src/generated").join(GENERATED);
    if std::env::var_os("OPAMP_BLESS").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated code");
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "src/generated/{GENERATED} is out of date with proto/; run \
         `OPAMP_BLESS=1 cargo test -p opamp-proto --test codegen` and commit the result"
    );
}
