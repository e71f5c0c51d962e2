//! The CSR flow over loopback (CSR-1..CSR-9, feature `csr`): the agent connects to server A
//! without a client certificate and asks for one; A verifies the CSR and signs it with its
//! CA (`opamp_server::csr`), and offers it with a move to server B, which requires client
//! certificates from that CA (mTLS). The agent puts its own key in, is accepted by B and
//! reports APPLIED there; the key never went over the wire.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use opamp_client::{Callbacks, OpampClient};
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, ConnectionSettingsOffers, ConnectionSettingsStatuses,
    InstanceUid, OpAmpConnectionSettings, ServerCapabilitySet, ServerToAgent,
};
use opamp_server::connection_settings::{ConnectionSettingsOffer, OpampSettings};
use opamp_server::csr::{CertificateAuthority, csr_of};
use opamp_server::{
    Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
    bad_request,
};
use tokio::sync::mpsc;

/// Server A: signs CSRs and offers the certificate with the endpoint of B.
struct Issuing {
    ca: CertificateAuthority,
    ca_pem: String,
    b_url: String,
    seen: mpsc::UnboundedSender<AgentToServer>,
}

struct IssuingServer(Arc<Issuing>);

#[async_trait]
impl ServerCallbacks for IssuingServer {
    async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
        ConnectionResponse::accept(Arc::new(IssuingConn(self.0.clone())))
    }
}

struct IssuingConn(Arc<Issuing>);

#[async_trait]
impl ConnectionCallbacks for IssuingConn {
    async fn on_message(&self, _conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        let a = &self.0;
        let _ = a.seen.send(msg.clone());
        let csr = csr_of(&msg)?;
        let uid = InstanceUid::try_from(&msg.instance_uid[..]).unwrap();
        Some(match a.ca.sign(csr, uid) {
            Ok(cert) => ServerToAgent {
                connection_settings: Some(offer(a, cert)),
                ..Default::default()
            },
            // CSR-6
            Err(e) => bad_request(e.to_string()),
        })
    }
}

fn offer(a: &Issuing, cert: opamp_proto::TlsCertificate) -> ConnectionSettingsOffers {
    ConnectionSettingsOffer::new()
        .opamp(
            OpampSettings::new()
                .endpoint(a.b_url.clone())
                .ca_pem(a.ca_pem.clone())
                .client_certificate(cert.cert, cert.private_key, cert.ca_cert)
                .heartbeat(Duration::from_secs(1)),
        )
        .build()
}

/// Server B: records each message with whether its connection presented a certificate.
struct Mtls(mpsc::UnboundedSender<(bool, AgentToServer)>);

#[async_trait]
impl ServerCallbacks for Mtls {
    async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
        ConnectionResponse::accept(Arc::new(MtlsConn(self.0.clone())))
    }
}

struct MtlsConn(mpsc::UnboundedSender<(bool, AgentToServer)>);

#[async_trait]
impl ConnectionCallbacks for MtlsConn {
    async fn on_message(&self, conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        let _ = self.0.send((conn.peer_certificates().is_some(), msg));
        None
    }
}

struct Agent(
    mpsc::UnboundedSender<OpAmpConnectionSettings>,
    mpsc::UnboundedSender<opamp_proto::ServerErrorResponse>,
);

#[async_trait]
impl Callbacks for Agent {
    async fn on_error(&self, error: &opamp_proto::ServerErrorResponse) {
        let _ = self.1.send(error.clone());
    }
    async fn on_opamp_connection_settings_applied(
        &self,
        settings: &OpAmpConnectionSettings,
        _offer_hash: &[u8],
    ) {
        let _ = self.0.send(settings.clone());
    }
}

/// B (TLS, client certificates from the CA required) and A (plain WebSocket, signs CSRs,
/// advertises AcceptsConnectionSettingsRequest), and an agent started on A.
struct Setup {
    a: Server,
    b: Server,
    a_seen: mpsc::UnboundedReceiver<AgentToServer>,
    b_seen: mpsc::UnboundedReceiver<(bool, AgentToServer)>,
    client: OpampClient,
    applied: mpsc::UnboundedReceiver<OpAmpConnectionSettings>,
    errors: mpsc::UnboundedReceiver<opamp_proto::ServerErrorResponse>,
}

async fn setup(validity: Duration) -> Setup {
    let pki = pki();
    let (b_tx, b_seen) = mpsc::unbounded_channel();
    let b_tls =
        opamp_transport::tls::server_config(&pki.server, Some(pki.ca_pem.as_bytes())).unwrap();
    let b = Server::bind(
        ServerConfig::builder()
            .listen_addr("127.0.0.1:0".parse().unwrap())
            .tls(b_tls)
            // B takes CSRs too, so that a renewal can reach it (it does not sign them).
            .server_capabilities(
                opamp_server::DEFAULT_SERVER_CAPABILITIES
                    | ServerCapabilitySet::ACCEPTS_CONNECTION_SETTINGS_REQUEST,
            )
            .build()
            .unwrap(),
        Arc::new(Mtls(b_tx)),
    )
    .await
    .unwrap();
    let b_url = format!("wss://localhost:{}/v1/opamp", b.local_addr().port());
    let (a_tx, a_seen) = mpsc::unbounded_channel();
    let a = Server::bind(
        ServerConfig::builder()
            .listen_addr("127.0.0.1:0".parse().unwrap())
            .server_capabilities(
                opamp_server::DEFAULT_SERVER_CAPABILITIES
                    | ServerCapabilitySet::ACCEPTS_CONNECTION_SETTINGS_REQUEST,
            )
            .build()
            .unwrap(),
        Arc::new(IssuingServer(Arc::new(Issuing {
            ca: CertificateAuthority::from_pem(&pki.ca_pem, &pki.ca_key_pem)
                .unwrap()
                .with_validity(validity),
            ca_pem: pki.ca_pem.clone(),
            b_url,
            seen: a_tx,
        }))),
    )
    .await
    .unwrap();
    let (tx, applied) = mpsc::unbounded_channel();
    let (etx, errors) = mpsc::unbounded_channel();
    let client = OpampClient::start(
        settings(format!("ws://{}/v1/opamp", a.local_addr()))
            .with_capabilities(
                AgentCapabilitySet::REPORTS_STATUS
                    | AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS
                    | AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS
                    | AgentCapabilitySet::REPORTS_HEARTBEAT,
            )
            .with_agent_description(description()),
        Arc::new(Agent(tx, etx)),
    )
    .unwrap();
    Setup {
        a,
        b,
        a_seen,
        b_seen,
        client,
        applied,
        errors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_7_issued_certificate_is_tried_with_the_agents_own_key_and_applied() {
    let Setup {
        a,
        b,
        mut a_seen,
        mut b_seen,
        client,
        mut applied,
        errors: _errors,
    } = setup(Duration::from_secs(3600)).await;
    // Held until A's capabilities are known (CSR-2): not in the first message.
    client.request_client_certificate().unwrap();
    let first = recv(&mut a_seen).await;
    assert!(
        first.connection_settings_request.is_none(),
        "sent before A advertised it"
    );
    let request = loop {
        let m = recv(&mut a_seen).await;
        if let Some(r) = m.connection_settings_request {
            break r;
        }
    };
    let csr = request.opamp.unwrap().certificate_request.unwrap().csr;
    assert!(csr.starts_with(b"-----BEGIN CERTIFICATE REQUEST-----"));

    // B: the agent connected with the issued certificate, and reports APPLIED.
    let (with_cert, m) = loop {
        let (with_cert, m) = recv(&mut b_seen).await;
        let applied = m
            .connection_settings_status
            .as_ref()
            .is_some_and(|s| s.status == ConnectionSettingsStatuses::Applied as i32);
        if applied {
            break (with_cert, m);
        }
    };
    assert!(with_cert, "mTLS: B saw the client certificate");
    assert_eq!(m.instance_uid, first.instance_uid);
    let settings = recv(&mut applied).await;
    let cert = settings.certificate.unwrap();
    assert!(
        std::str::from_utf8(&cert.private_key)
            .unwrap()
            .contains("PRIVATE KEY"),
        "the persisted settings carry the agent's own key"
    );
    client.stop().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_6_a_bad_csr_is_answered_with_bad_request_and_nothing_changes() {
    let Setup {
        a,
        b,
        mut a_seen,
        mut b_seen,
        client,
        applied: _applied,
        mut errors,
    } = setup(Duration::from_secs(3600)).await;
    recv(&mut a_seen).await;
    let garbage = opamp_proto::ConnectionSettingsRequest {
        opamp: Some(opamp_proto::OpAmpConnectionSettingsRequest {
            certificate_request: Some(opamp_proto::CertificateRequest {
                csr: bytes::Bytes::from_static(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"),
            }),
        }),
    };
    // Once A's capabilities are known (its first answer), the request goes.
    client.request_connection_settings(garbage).unwrap();
    let error = recv(&mut errors).await;
    assert_eq!(
        error.r#type,
        opamp_proto::ServerErrorResponseType::BadRequest as i32
    );
    assert!(
        error
            .error_message
            .contains("invalid certificate signing request"),
        "{error:?}"
    );
    assert!(b_seen.try_recv().is_err(), "the agent went to B");
    assert!(client.is_connected());
    client.stop().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_8_a_short_lived_certificate_is_renewed_at_two_thirds_of_its_validity() {
    let Setup {
        a,
        b,
        a_seen: _a_seen,
        mut b_seen,
        client,
        mut applied,
        errors: _errors,
    } = setup(Duration::from_secs(3)).await;
    client.request_client_certificate().unwrap();
    recv(&mut applied).await;
    let started = std::time::Instant::now();
    // On B, the agent sends a new CSR about 2 s into the certificate's 3 s.
    let csr = loop {
        let (_, m) = recv(&mut b_seen).await;
        if let Some(r) = m.connection_settings_request {
            break r;
        }
    };
    let waited = started.elapsed();
    assert!(csr.opamp.unwrap().certificate_request.is_some());
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "renewed after {waited:?}"
    );
    client.stop().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
