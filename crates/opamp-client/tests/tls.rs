//! `wss://` and `https://` with a custom CA and a client certificate (mTLS), on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opamp_client::OpampClient;
use opamp_proto::{AgentToServer, Message as _, framing};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// A TLS server requiring client certificates from the test CA. Reports, per connection,
/// whether a client certificate was presented and the first AgentToServer.
async fn mtls_server(
    pki: &Pki,
    websocket: bool,
) -> (u16, mpsc::UnboundedReceiver<(bool, AgentToServer)>) {
    let config =
        opamp_transport::tls::server_config(&pki.server, Some(pki.ca_pem.as_bytes())).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let has_cert = tls.get_ref().1.peer_certificates().is_some();
                if websocket {
                    let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
                    while let Some(Ok(Message::Binary(data))) = ws.next().await {
                        let msg: AgentToServer = framing::decode(&data, 1 << 20).unwrap();
                        let reply = ack(&msg);
                        let _ = tx.send((has_cert, msg));
                        let _ = ws.send(Message::Binary(framing::encode(&reply))).await;
                    }
                } else {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let msg = AgentToServer::decode(body).unwrap();
                            let reply = ack(&msg);
                            let _ = tx.send((has_cert, msg));
                            Ok::<_, std::convert::Infallible>(ok(&reply))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                }
            });
        }
    });
    (port, rx)
}

async fn mtls_round_trip(websocket: bool) {
    let pki = pki();
    let (port, mut seen) = mtls_server(&pki, websocket).await;
    let scheme = if websocket { "wss" } else { "https" };
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("{scheme}://localhost:{port}/v1/opamp"))
            .with_tls_ca_pem(pki.ca_pem.clone())
            .with_tls_client_cert_pem(pki.client_cert_pem.clone(), pki.client_key_pem.clone()),
        cb,
    )
    .unwrap();
    let (has_cert, first) = recv(&mut seen).await;
    assert!(has_cert, "the client certificate was presented");
    assert_eq!(first.sequence_num, 0);
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_2_wss_with_custom_ca_and_client_certificate() {
    mtls_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_2_https_with_custom_ca_and_client_certificate() {
    mtls_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_server_from_an_untrusted_ca_is_refused() {
    let pki = pki();
    let other = self::pki();
    let (port, _seen) = mtls_server(&pki, true).await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("wss://localhost:{port}/"))
            .with_tls_ca_pem(other.ca_pem.clone())
            .with_tls_client_cert_pem(pki.client_cert_pem.clone(), pki.client_key_pem.clone()),
        cb.clone(),
    )
    .unwrap();
    let error = expect_cb(&mut cbs, |c| match c {
        Cb::ConnectFailed(e, _) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert!(error.contains("TLS"), "{error}");
    assert!(!client.is_connected());
    client.stop().await.unwrap();
    let _ = Arc::strong_count(&cb);
}
