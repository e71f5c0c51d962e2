//! `server.tls` of the supervisor's config against our server over `wss://` with mTLS:
//! `ca_file` is trusted, the inline `cert_pem`/`key_pem` client certificate is presented.
#![cfg(all(unix, feature = "tls"))]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opamp_proto::{AgentToServer, ServerToAgent};
use opamp_server::{
    Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
};
use opamp_supervisor::{Supervisor, SupervisorConfig};
use opamp_transport::tls::{CertifiedKeyPem, server_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::sync::watch;

/// (client certificate chain length seen on connect, a healthy report seen)
#[derive(Clone)]
struct Fleet(Arc<watch::Sender<(usize, bool)>>);

#[async_trait]
impl ServerCallbacks for Fleet {
    async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
        ConnectionResponse::accept(Arc::new(self.clone()))
    }
}

#[async_trait]
impl ConnectionCallbacks for Fleet {
    async fn on_connected(&self, conn: &Connection) {
        let chain = conn.peer_certificates().map_or(0, <[_]>::len);
        self.0.send_modify(|s| s.0 = chain);
    }

    async fn on_message(&self, _conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        if msg.health.is_some_and(|h| h.healthy) {
            self.0.send_modify(|s| s.1 = true);
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_ca_file_and_an_inline_client_certificate() {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("supervised-agent");
    let identity = CertifiedKeyPem {
        cert_chain: server_cert.into_bytes(),
        private_key: server_key.into_bytes(),
    };
    let (tx, mut seen) = watch::channel((0, false));
    let config = ServerConfig::builder()
        .listen_addr("127.0.0.1:0".parse().unwrap())
        .tls(server_config(&identity, Some(ca.pem().as_bytes())).unwrap())
        .build()
        .unwrap();
    let server = Server::bind(config, Arc::new(Fleet(Arc::new(tx))))
        .await
        .unwrap();
    let port = server.local_addr().port();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut config = SupervisorConfig::new(
        format!("wss://localhost:{port}/v1/opamp"),
        env!("CARGO_BIN_EXE_opamp-supervisor-test-agent"),
        dir.path().join("state"),
    );
    config.server.tls.ca_file = Some(ca_file);
    config.server.tls.cert_pem = Some(client_cert);
    config.server.tls.key_pem = Some(client_key);
    let sup = Supervisor::start(config).unwrap();
    tokio::time::timeout(Duration::from_secs(20), seen.wait_for(|s| s.0 > 0 && s.1))
        .await
        .expect("an mTLS connection and a healthy report")
        .unwrap();
    sup.stop().await.unwrap();
    server.shutdown().await;
}
