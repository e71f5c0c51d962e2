//! TLS and mTLS (feature `tls`) with certificates made in the test.
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use opamp_proto::Message;
use opamp_server::Server;
use opamp_transport::tls::{CertifiedKeyPem, ClientTls, client_config, server_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const PATH: &str = "/v1/opamp";

struct Pki {
    ca_pem: String,
    server: CertifiedKeyPem,
    client: CertifiedKeyPem,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        CertifiedKeyPem {
            cert_chain: cert.pem().into_bytes(),
            private_key: key.serialize_pem().into_bytes(),
        }
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf(vec!["localhost".to_owned()]),
        client: leaf(vec!["agent-1".to_owned()]),
    }
}

async fn tls_connect(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&CertifiedKeyPem>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tls = ClientTls::default().with_ca_pem(pki.ca_pem.clone());
    if let Some(id) = identity {
        tls = tls.with_client_identity(id.clone());
    }
    let connector = TlsConnector::from(client_config(&tls).unwrap());
    let tcp = within(TcpStream::connect(addr)).await?;
    within(connector.connect(ServerName::try_from("localhost").unwrap(), tcp)).await
}

#[tokio::test]
async fn tls_websocket_and_plain_http() {
    let pki = pki();
    let (rec, mut events) = Recorder::new();
    let config = loopback_config()
        .tls(server_config(&pki.server, None).unwrap())
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();

    let stream = tls_connect(addr, &pki, None).await.unwrap();
    let mut ws = ws_handshake(stream, &format!("wss://localhost{PATH}"), None)
        .await
        .unwrap();
    ws_send(&mut ws, &first_report(uid(1))).await;
    assert_eq!(&ws_recv(&mut ws).await.instance_uid[..], uid(1).as_array());
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    assert!(conn.peer_certificates().is_none(), "no client certificate");

    let stream = tls_connect(addr, &pki, None).await.unwrap();
    let resp = http_request(
        stream,
        post(PATH, first_report(uid(2)).encode_to_vec(), &[]),
    )
    .await;
    assert_eq!(&resp.message().instance_uid[..], uid(2).as_array());

    // A plaintext client gets nothing from a TLS server.
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        ws_handshake(tcp, &format!("ws://{addr}{PATH}"), None)
            .await
            .is_err()
    );
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn mtls_client_certificate_reaches_the_connection() {
    let pki = pki();
    let (rec, mut events) = Recorder::new();
    let config = loopback_config()
        .tls(server_config(&pki.server, Some(pki.ca_pem.as_bytes())).unwrap())
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();

    let stream = tls_connect(addr, &pki, Some(&pki.client)).await.unwrap();
    let mut ws = ws_handshake(stream, &format!("wss://localhost{PATH}"), None)
        .await
        .unwrap();
    ws_send(&mut ws, &first_report(uid(3))).await;
    ws_recv(&mut ws).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    let chain = conn.peer_certificates().expect("mTLS chain");
    let expected = rustls_pki_types::CertificateDer::from_pem_slice(&pki.client.cert_chain);
    assert_eq!(chain[0], expected.unwrap());

    // Plain HTTP under mTLS too.
    let stream = tls_connect(addr, &pki, Some(&pki.client)).await.unwrap();
    let resp = http_request(
        stream,
        post(PATH, first_report(uid(4)).encode_to_vec(), &[]),
    )
    .await;
    assert_eq!(&resp.message().instance_uid[..], uid(4).as_array());
    loop {
        if let Event::Connected(c) = next_event(&mut events).await
            && c.transport() == opamp_server::Transport::PlainHttp
        {
            assert!(c.peer_certificates().is_some());
            break;
        }
    }

    // Without a client certificate the handshake (or the first read) fails.
    let refused = match tls_connect(addr, &pki, None).await {
        Err(_) => true,
        Ok(stream) => ws_handshake(stream, &format!("wss://localhost{PATH}"), None)
            .await
            .is_err(),
    };
    assert!(refused, "mTLS requires a client certificate");
    drop(ws);
    server.shutdown().await;
}
