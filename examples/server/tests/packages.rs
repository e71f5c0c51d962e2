//! The reference programs' packages over loopback (issue #13, PKG-*): the reference server
//! and reference agents as real processes. A package uploaded to the server and put in a
//! package set is installed by the matching agent (WebSocket) and by an agent that connects
//! later (plain HTTP),
//! a v2 signed by another key is refused with INSTALL_FAILED while v1 stays installed, and so
//! is a v3 whose download is corrupted on the way (by a proxy in front of the server).
//!
//! `cargo test -p opamp-reference-server --test packages` (builds the reference agent first).

// Test helpers outside `#[test]` functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::{Scratch, agent_json, api, hex, start_agent, start_server, uid_of, wait_for};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn put_package(ui: &str, name: &str, version: &str, content: &[u8], signature: Option<&str>) {
    let mut headers = vec![("Content-Type", "application/octet-stream")];
    if let Some(sig) = signature {
        headers.push(("X-Package-Signature", sig));
    }
    let path = format!("/api/v1/packages/{name}/{version}");
    let (status, answer) = api(ui, "PUT", &path, &headers, content);
    assert_eq!(status, 200, "PUT {path}: {answer}");
    assert_eq!(answer["sha256"], hex(&Sha256::digest(content)));
    assert_eq!(answer["size"], content.len());
}

fn put_set(ui: &str, name: &str, body: Value) -> Vec<String> {
    let path = format!("/api/v1/package-sets/{name}");
    let (status, answer) = api(
        ui,
        "PUT",
        &path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "PUT {path}: {answer}");
    answer["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

/// A loopback HTTP proxy in front of the server's downloads that flips the last byte of every
/// answer whose path contains `corrupt`: a download broken on the way, as the agent sees it.
fn corrupting_proxy(
    corrupt: &'static str,
) -> (String, std::sync::Arc<std::sync::OnceLock<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let upstream = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let up = upstream.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let up = up.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                // One request per connection: the server closes after answering.
                let mut forwarded: String = head
                    .trim_end()
                    .lines()
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                    .map(|l| format!("{l}\r\n"))
                    .collect();
                forwarded.push_str("Connection: close\r\n\r\n");
                let Some(target) = up.get() else { return };
                let Ok(mut server) = TcpStream::connect(target) else {
                    return;
                };
                if server.write_all(forwarded.as_bytes()).is_err() {
                    return;
                }
                let mut answer = Vec::new();
                let _ = server.read_to_end(&mut answer);
                if path.contains(corrupt) && answer.starts_with(b"HTTP/1.1 20") {
                    if let Some(last) = answer.last_mut() {
                        *last ^= 0xff;
                    }
                }
                let _ = client.write_all(&answer);
            });
        }
    });
    (addr, upstream)
}

/// The installed file of package `name` in the agent's `FsProvider` (names hex-encoded).
fn installed(agent_dir: &Path, name: &str) -> Option<Vec<u8>> {
    let path = agent_dir
        .join("packages/packages")
        .join(hex(name.as_bytes()))
        .join("content");
    std::fs::read(path).ok()
}

/// The package status of `package` once `done` holds for it.
fn wait_status(
    ui: &str,
    uid: &str,
    package: &str,
    logs: &[&Path],
    done: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(&format!("{package} on {uid}"), logs, || {
        let a = agent_json(ui, uid);
        let s = a["package_statuses"][package].clone();
        (done(&s).then_some(s), a)
    })
}

#[test]
fn pkg_reference_server_offers_signed_packages_the_reference_agent_installs() {
    let scratch = Scratch::new("reference-packages");
    let dir = scratch.path().to_owned();

    // The server signs with a known seed; its printed public key must be that seed's.
    let seed = [0x42u8; 32];
    let seed_file = dir.join("signing.key");
    std::fs::write(&seed_file, format!("{}\n", hex(&seed))).unwrap();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let server_log = dir.join("server.log");
    // Downloads go through a proxy that corrupts version 3.0 (`--package-url-base`); the
    // proxy's `Host` is let in with `--ui-allowed-host`.
    let (proxy, upstream) = corrupting_proxy("/3.0/");
    let proxy_flag = format!("http://{proxy}");
    let seed_flag = seed_file.to_str().unwrap().to_owned();
    let server = start_server(
        &[
            "--ui-allowed-host",
            "127.0.0.1",
            "--package-url-base",
            &proxy_flag,
            "--package-signing-key",
            &seed_flag,
        ],
        &server_log,
        &[],
    );
    let (endpoint, ui, key) = (
        server.endpoint.clone(),
        server.ui.clone(),
        server.package_key.clone(),
    );
    upstream.set(ui.clone()).unwrap();
    assert_eq!(key, hex(&public), "the public key of --package-signing-key");
    assert!(endpoint.starts_with("ws://"), "{endpoint}");
    let (_, listing) = api(&ui, "GET", "/api/v1/packages", &[], b"");
    assert_eq!(listing["public_key"], key);

    // The agent trusts the key from a file (`--accept-packages FILE`).
    let key_file = dir.join("trusted.pub");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let (_agent_a, a_dir) = start_agent(
        &dir,
        "refpkg-a",
        &endpoint,
        &["--accept-packages", key_file.to_str().unwrap()],
    );
    let a_log = dir.join("refpkg-a.log");
    let logs = [a_log.as_path(), server_log.as_path()];
    let uid_a = uid_of(&a_dir, &a_log);
    wait_for("agent a connected", &logs, || {
        let a = agent_json(&ui, &uid_a);
        let ok = a["connected"] == true
            && a["capabilities"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "ACCEPTS_PACKAGES"));
        (ok.then_some(()), a)
    });

    // v1: uploaded, signed by the server, offered to agent a by its service.name.
    let v1: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    put_package(&ui, "tool", "1.0", &v1, None);
    let pushed = put_set(
        &ui,
        "a",
        json!({"selector": {"service.name": "refpkg-a"}, "packages": {"tool": "1.0"}}),
    );
    assert_eq!(
        pushed,
        std::slice::from_ref(&uid_a),
        "pushed to the one matching agent"
    );
    let s = wait_status(&ui, &uid_a, "tool", &logs, |s| s["status"] == "INSTALLED");
    assert_eq!(s["agent_has_version"], "1.0", "{s}");
    assert_eq!(s["error_message"], "", "{s}");
    assert_eq!(installed(&a_dir, "tool").as_deref(), Some(&v1[..]));

    // A set for an agent that is not connected yet: nothing is pushed now, and the agent
    // installs the package when it connects.
    let pushed = put_set(
        &ui,
        "b",
        json!({"selector": {"service.name": "refpkg-b"}, "packages": {"tool": "1.0"}}),
    );
    assert!(pushed.is_empty(), "{pushed:?}");
    // Agent b polls over plain HTTP: the offer rides on a poll response.
    let http_endpoint = endpoint.replacen("ws://", "http://", 1);
    let (_agent_b, b_dir) = start_agent(
        &dir,
        "refpkg-b",
        &http_endpoint,
        &["--accept-packages", key_file.to_str().unwrap()],
    );
    let b_log = dir.join("refpkg-b.log");
    let uid_b = uid_of(&b_dir, &b_log);
    let s = wait_status(
        &ui,
        &uid_b,
        "tool",
        &[b_log.as_path(), server_log.as_path()],
        |s| s["status"] == "INSTALLED",
    );
    assert_eq!(s["agent_has_version"], "1.0", "{s}");
    assert_eq!(installed(&b_dir, "tool").as_deref(), Some(&v1[..]));

    // v2 signed by another key (a valid Ed25519 signature of its digest, but not by the
    // trusted key): agent a refuses it and keeps v1.
    let v2 = b"tool version 2".to_vec();
    let other = ed25519_dalek::SigningKey::from_bytes(&[0x17; 32]);
    let digest: [u8; 32] = Sha256::digest(&v2).into();
    let forged = hex(&ed25519_dalek::Signer::sign(&other, &digest).to_bytes());
    put_package(&ui, "tool", "2.0", &v2, Some(&forged));
    put_set(
        &ui,
        "a",
        json!({"selector": {"service.name": "refpkg-a"}, "packages": {"tool": "2.0"}}),
    );
    let s = wait_status(&ui, &uid_a, "tool", &logs, |s| {
        s["status"] == "INSTALL_FAILED"
    });
    assert_eq!(s["server_offered_version"], "2.0", "{s}");
    assert_eq!(s["agent_has_version"], "1.0", "v1 kept: {s}");
    let message = s["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("signature"), "{s}");
    assert_eq!(
        installed(&a_dir, "tool").as_deref(),
        Some(&v1[..]),
        "v1 kept on disk"
    );

    // v3 signed by the server, but corrupted on the way: the SHA-256 check refuses it, and
    // v1 stays.
    let v3 = b"tool version 3, intact on the server".to_vec();
    put_package(&ui, "tool", "3.0", &v3, None);
    put_set(
        &ui,
        "a",
        json!({"selector": {"service.name": "refpkg-a"}, "packages": {"tool": "3.0"}}),
    );
    let s = wait_status(&ui, &uid_a, "tool", &logs, |s| {
        s["status"] == "INSTALL_FAILED" && s["server_offered_version"] == "3.0"
    });
    assert_eq!(s["agent_has_version"], "1.0", "v1 kept: {s}");
    let message = s["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("hash mismatch"), "{s}");
    assert_eq!(
        installed(&a_dir, "tool").as_deref(),
        Some(&v1[..]),
        "v1 kept on disk"
    );

    // Agent b's set did not change: it still has v1, INSTALLED.
    let b = agent_json(&ui, &uid_b);
    assert_eq!(b["package_statuses"]["tool"]["status"], "INSTALLED", "{b}");
    assert_eq!(b["transport"], "http", "{b}");
    assert_eq!(agent_json(&ui, &uid_a)["transport"], "websocket");

    drop(server);
}
