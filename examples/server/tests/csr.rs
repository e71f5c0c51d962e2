//! The reference programs' CSR flow over loopback TLS (issue #15, CSR-1..CSR-9): the reference
//! server serves OpAMP over TLS, requires client certificates from a CA made here (mTLS) and
//! signs agents' CSRs with that CA (`--ca-cert`, `--ca-key`, auto-approve). A reference agent
//! started with `--csr` and a bootstrap certificate from the CA gets a certificate of its own,
//! reports APPLIED for the offer carrying it, persists it, and after a restart without the
//! bootstrap certificate connects with the issued one. An agent without any certificate is
//! refused.
//!
//! `cargo test -p opamp-reference-server --test csr` (builds the reference agent first).

// Test helpers outside `#[test]` functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{Scratch, agent_json, api, start_agent, start_server, uid_of, wait_for};
use opamp::proto::{Message, OpAmpConnectionSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use serde_json::Value;

/// A CA, a server certificate for 127.0.0.1 and a bootstrap client certificate, as files in
/// `dir`: `ca.pem`, `ca.key`, `server.pem`, `server.key`, `boot.pem`, `boot.key`.
fn pki(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &ca).unwrap();
    let boot_key = KeyPair::generate().unwrap();
    let mut boot_params = CertificateParams::new(vec!["bootstrap".to_owned()]).unwrap();
    boot_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let boot_cert = boot_params.signed_by(&boot_key, &ca).unwrap();
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("ca.key", ca_key_pem),
        ("server.pem", server_cert.pem()),
        ("server.key", server_key.serialize_pem()),
        ("boot.pem", boot_cert.pem()),
        ("boot.key", boot_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn csr_an_agent_gets_a_certificate_from_the_reference_server_and_connects_with_it_after_a_restart()
{
    let scratch = Scratch::new("csr");
    let dir = scratch.path();
    pki(dir);
    let p = |name: &str| dir.join(name).display().to_string();
    let server = start_server(
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--ca-cert",
            &p("ca.pem"),
            "--ca-key",
            &p("ca.key"),
        ],
        &dir.join("server.log"),
        &[],
    );
    assert!(server.endpoint.starts_with("wss://"), "{}", server.endpoint);
    // A named config for the agent: the message with the CSR is answered with both.
    let (status, answer) = common::send_json(
        &server.ui,
        "PUT",
        "/api/v1/configs/csr",
        &serde_json::json!({"selector": {"service.name": "csr-agent"}, "body": "csr: 1\n"}),
    );
    assert_eq!(status, 200, "{answer}");
    let agent_log = dir.join("csr-agent.log");
    let logs = [server.log.as_path(), agent_log.as_path()];
    let ca = p("ca.pem");
    let (agent, agent_dir) = start_agent(
        dir,
        "csr-agent",
        &server.endpoint,
        &[
            "--csr",
            "--tls-ca",
            &ca,
            "--tls-cert",
            &p("boot.pem"),
            "--tls-key",
            &p("boot.key"),
        ],
    );
    let uid = uid_of(&agent_dir, &agent_log);

    // CSR-2..CSR-5: the CSR is signed and offered back; the agent tries the certificate on a
    // new connection and reports APPLIED for that offer.
    let applied = wait_for("APPLIED for the issued certificate", &logs, || {
        let v = agent_json(&server.ui, &uid);
        let done = v["connected"] == true
            && v["connection_settings_offer"]["state"] == "APPLIED"
            && v["connection_settings_status"]["status"] == "APPLIED"
            && v["connection_settings_status"]["hash"] == v["connection_settings_offer"]["hash"]
            && v["remote_config_status"]["status"] == "APPLIED";
        (done.then(|| v.clone()), v)
    });
    let saved_path = agent_dir.join("opamp_connection_settings.pb");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&saved_path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the file with the private key is the owner's only: {mode:o}"
        );
    }
    let saved = std::fs::read(&saved_path).unwrap();
    let saved = OpAmpConnectionSettings::decode(&saved[..]).unwrap();
    let cert = saved
        .certificate
        .expect("the issued certificate is persisted");
    let issued = String::from_utf8(cert.cert.to_vec()).unwrap();
    assert!(
        issued.starts_with("-----BEGIN CERTIFICATE-----"),
        "{issued}"
    );
    assert_ne!(
        issued.trim(),
        std::fs::read_to_string(dir.join("boot.pem"))
            .unwrap()
            .trim(),
        "a new certificate, not the bootstrap one"
    );
    assert!(
        !cert.private_key.is_empty(),
        "the agent's own key is kept with it (CSR-7)"
    );
    let (status, audit) = api(&server.ui, "GET", "/api/v1/audit?limit=20", &[], b"");
    assert_eq!(status, 200);
    assert!(
        audit.to_string().contains("csr-signed"),
        "audit: {audit}; agent: {applied}"
    );

    // mTLS is really required: an agent without a certificate does not get in.
    let (_nocert, nocert_dir) = start_agent(dir, "nocert", &server.endpoint, &["--tls-ca", &ca]);
    let nocert_log = dir.join("nocert.log");
    let nocert_uid = uid_of(&nocert_dir, &nocert_log);
    wait_for(
        "the agent without a certificate refused",
        &[&nocert_log],
        || {
            let log = std::fs::read_to_string(&nocert_log).unwrap_or_default();
            (log.contains("connection failed").then_some(()), Value::Null)
        },
    );
    assert_eq!(agent_json(&server.ui, &nocert_uid), Value::Null);

    // Restarted without the bootstrap certificate, the agent connects with the issued one
    // and does not ask again.
    drop(agent);
    wait_for("the server sees the agent leave", &logs, || {
        let v = agent_json(&server.ui, &uid);
        ((v["connected"] == false).then_some(()), v)
    });
    let (_agent, _) = start_agent(
        dir,
        "csr-agent",
        &server.endpoint,
        &["--csr", "--tls-ca", &ca],
    );
    wait_for(
        "the restarted agent connected with its certificate",
        &logs,
        || {
            let v = agent_json(&server.ui, &uid);
            ((v["connected"] == true).then_some(()), v)
        },
    );
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        !log.contains("requested a client certificate"),
        "no new CSR at a start with a persisted certificate: {log}"
    );
}
