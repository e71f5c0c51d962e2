//! The service mounted in an axum router at a custom path, on the router's own listener.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use opamp_proto::Message;
use opamp_server::{OpampService, ServerConfig};

const PATH: &str = "/fleet/opamp";

#[tokio::test]
async fn axum_router_serves_both_transports_at_a_custom_path() {
    let (rec, mut events) = Recorder::new();
    let service = OpampService::new(ServerConfig::default(), rec.server_callbacks());
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route_service(PATH, service.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
    });

    // WebSocket through the router.
    let mut ws = ws_connect(addr, PATH).await;
    ws_send(&mut ws, &first_report(uid(1))).await;
    let reply = ws_recv(&mut ws).await;
    assert_eq!(&reply.instance_uid[..], uid(1).as_array());
    assert_ne!(reply.capabilities, 0);
    assert!(matches!(next_event(&mut events).await, Event::Connected(_)));

    // Plain HTTP through the router.
    let reply = poll(addr, PATH, &first_report(uid(2))).await;
    assert_ne!(reply.capabilities, 0);

    // The router's other routes still work, and the default path is not ours here.
    let resp = http_post(
        addr,
        post("/v1/opamp", first_report(uid(3)).encode_to_vec(), &[]),
    )
    .await;
    assert_eq!(resp.status, http::StatusCode::NOT_FOUND);

    // Graceful stop of the service closes the WebSocket (1001) and waits for it.
    let stopping = {
        let service = service.clone();
        tokio::spawn(async move { service.shutdown().await })
    };
    assert_eq!(ws_close_code(&mut ws).await, Some(1001));
    within(stopping).await.unwrap();
    assert_eq!(service.active_connections(), 0);
    // A stopped service answers 503.
    let resp = http_post(addr, post(PATH, first_report(uid(4)).encode_to_vec(), &[])).await;
    assert_eq!(resp.status, http::StatusCode::SERVICE_UNAVAILABLE);
    stop_tx.send(()).unwrap();
    within(serving).await.unwrap();
}
