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

/// Serves `app` with axum's connect info; returns the address and a stop sender.
async fn serve_with_connect_info(
    app: axum::Router,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    (addr, stop_tx)
}

/// Both transports from one client socket each; checks `remote_addr()` is that socket's.
async fn check_remote_addr(
    addr: SocketAddr,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = tcp.local_addr().unwrap();
    let body = first_report(uid(1)).encode_to_vec();
    let resp = http_request(tcp, post(PATH, body, &[])).await;
    assert_eq!(resp.status, http::StatusCode::OK);
    let Event::Connected(conn) = next_event(events).await else {
        panic!("expected Connected")
    };
    assert_eq!(conn.remote_addr(), Some(client), "plain HTTP");

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = tcp.local_addr().unwrap();
    let mut ws = ws_handshake(tcp, &format!("ws://{addr}{PATH}"), None)
        .await
        .unwrap();
    let conn = loop {
        if let Event::Connected(conn) = next_event(events).await {
            break conn;
        }
    };
    assert_eq!(conn.remote_addr(), Some(client), "WebSocket");
    drop(ws.close(None).await);
}

/// `remote_addr()` behind axum with `into_make_service_with_connect_info`: through the
/// config hook that reads axum's `ConnectInfo`, and through a layer that inserts the
/// `SocketAddr` extension; without either it is unknown (not wrong).
#[tokio::test]
async fn axum_connect_info_gives_the_real_peer_address() {
    use axum::extract::ConnectInfo;
    // The config hook.
    let (rec, mut events) = Recorder::new();
    let config = ServerConfig::builder()
        .remote_addr_from(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|info| info.0))
        .build()
        .unwrap();
    let service = OpampService::new(config, rec.server_callbacks());
    let (addr, stop) =
        serve_with_connect_info(axum::Router::new().route_service(PATH, service.clone())).await;
    check_remote_addr(addr, &mut events).await;
    service.shutdown().await;
    stop.send(()).unwrap();

    // A layer that maps axum's ConnectInfo to the SocketAddr extension.
    let (rec, mut events) = Recorder::new();
    let service = OpampService::new(ServerConfig::default(), rec.server_callbacks());
    let app = axum::Router::new()
        .route_service(PATH, service.clone())
        .layer(axum::middleware::map_request(
            |ConnectInfo(peer): ConnectInfo<SocketAddr>,
             mut req: axum::extract::Request| async move {
                req.extensions_mut().insert(peer);
                req
            },
        ));
    let (addr, stop) = serve_with_connect_info(app).await;
    check_remote_addr(addr, &mut events).await;
    service.shutdown().await;
    stop.send(()).unwrap();
}
