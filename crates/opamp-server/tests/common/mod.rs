//! Shared test helpers: recording callbacks, raw WebSocket and HTTP clients.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::large_enum_variant
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opamp_proto::{
    AgentCapabilitySet, AgentDescription, AgentToServer, InstanceUid, Message, ServerToAgent,
    framing,
};
use opamp_server::{
    Connection, ConnectionCallbacks, ConnectionResponse, ReadMessageError, Rejection,
    ServerCallbacks, ServerConfig, async_trait,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Every socket test step is bounded by this.
pub const STEP: Duration = Duration::from_secs(20);

pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

#[derive(Debug)]
pub enum Event {
    Connected(Connection),
    Message(Connection, AgentToServer),
    Closed(Connection),
    ReadError(ReadMessageError),
}

type ReplyFn = dyn Fn(&Connection, &AgentToServer) -> Option<ServerToAgent> + Send + Sync;

/// Callbacks that record events, reply with `reply`, and count overlapping callbacks.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

struct Inner {
    events: mpsc::UnboundedSender<Event>,
    reply: Box<ReplyFn>,
    in_callback: AtomicUsize,
    overlaps: AtomicUsize,
    record_messages: bool,
}

impl Recorder {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Event>) {
        Self::with_reply(|_, _| None)
    }

    pub fn with_reply(
        reply: impl Fn(&Connection, &AgentToServer) -> Option<ServerToAgent> + Send + Sync + 'static,
    ) -> (Self, mpsc::UnboundedReceiver<Event>) {
        Self::build(Box::new(reply), true)
    }

    /// Records connects and closes only (for big fleets).
    pub fn quiet() -> (Self, mpsc::UnboundedReceiver<Event>) {
        Self::build(Box::new(|_, _| None), false)
    }

    fn build(reply: Box<ReplyFn>, record_messages: bool) -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                inner: Arc::new(Inner {
                    events,
                    reply,
                    in_callback: AtomicUsize::new(0),
                    overlaps: AtomicUsize::new(0),
                    record_messages,
                }),
            },
            rx,
        )
    }

    /// Number of times two callbacks ran at once (meaningful with one connection).
    pub fn overlaps(&self) -> usize {
        self.inner.overlaps.load(Ordering::SeqCst)
    }

    pub fn server_callbacks(&self) -> Arc<dyn ServerCallbacks> {
        Arc::new(self.clone())
    }

    fn enter(&self) {
        if self.inner.in_callback.fetch_add(1, Ordering::SeqCst) != 0 {
            self.inner.overlaps.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn leave(&self) {
        self.inner.in_callback.fetch_sub(1, Ordering::SeqCst);
    }

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
    }
}

#[async_trait]
impl ServerCallbacks for Recorder {
    async fn on_connecting(&self, request: &http::request::Parts) -> ConnectionResponse {
        match request.headers.get("authorization").map(|v| v.as_bytes()) {
            Some(b"Bearer bad") => ConnectionResponse::Reject(Rejection::unauthorized()),
            Some(b"Bearer busy") => {
                ConnectionResponse::Reject(Rejection::unavailable(Some(Duration::from_secs(7))))
            }
            _ => ConnectionResponse::accept(Arc::new(self.clone())),
        }
    }
}

#[async_trait]
impl ConnectionCallbacks for Recorder {
    async fn on_connected(&self, conn: &Connection) {
        self.enter();
        self.emit(Event::Connected(conn.clone()));
        tokio::task::yield_now().await;
        self.leave();
    }

    async fn on_message(&self, conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        self.enter();
        let reply = (self.inner.reply)(conn, &msg);
        if self.inner.record_messages {
            self.emit(Event::Message(conn.clone(), msg));
        }
        tokio::task::yield_now().await;
        self.leave();
        reply
    }

    async fn on_connection_close(&self, conn: &Connection) {
        self.enter();
        self.emit(Event::Closed(conn.clone()));
        self.leave();
    }

    async fn on_read_message_error(&self, _conn: &Connection, error: &ReadMessageError) {
        self.enter();
        self.emit(Event::ReadError(error.clone()));
        self.leave();
    }
}

pub async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    within(rx.recv()).await.expect("event channel closed")
}

/// Waits for the next event that is not a `Message` (messages may interleave).
pub async fn next_non_message(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    loop {
        match next_event(rx).await {
            Event::Message(..) => continue,
            other => return other,
        }
    }
}

pub fn loopback_config() -> opamp_server::ServerBuilder {
    ServerConfig::builder().listen_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
}

pub fn uid(n: u8) -> InstanceUid {
    InstanceUid::from_array([n; 16])
}

pub fn caps() -> AgentCapabilitySet {
    AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_REMOTE_CONFIG
}

/// A complete first report.
pub fn first_report(uid: InstanceUid) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_bytes(),
        sequence_num: 0,
        capabilities: caps().bits(),
        agent_description: Some(AgentDescription::default()),
        ..Default::default()
    }
}

pub fn report(uid: InstanceUid, seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_bytes(),
        sequence_num: seq,
        capabilities: caps().bits(),
        ..Default::default()
    }
}

// ---- WebSocket client (raw frames through tokio-tungstenite) ----

pub type Ws<S = TcpStream> = WebSocketStream<S>;

pub async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    ws_connect_with(addr, path, None).await.expect("upgrade")
}

pub async fn ws_connect_with(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let tcp = within(TcpStream::connect(addr)).await.unwrap();
    ws_handshake(tcp, &format!("ws://{addr}{path}"), authorization).await
}

pub async fn ws_handshake<S>(
    io: S,
    url: &str,
    authorization: Option<&str>,
) -> Result<Ws<S>, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    if let Some(auth) = authorization {
        request
            .headers_mut()
            .insert("authorization", auth.parse().unwrap());
    }
    within(tokio_tungstenite::client_async(request, io))
        .await
        .map(|(ws, _)| ws)
}

pub async fn ws_send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>, msg: &AgentToServer) {
    within(ws.send(WsMessage::Binary(framing::encode(msg))))
        .await
        .unwrap();
}

/// The next data message, decoded; panics on anything else but pings/pongs.
pub async fn ws_recv<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>) -> ServerToAgent {
    loop {
        match within(ws.next()).await {
            Some(Ok(WsMessage::Binary(data))) => {
                return framing::decode(&data, opamp_proto::DEFAULT_MAX_MESSAGE_SIZE)
                    .expect("well-formed ServerToAgent frame");
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

/// Reads until the server's Close frame and returns its code.
pub async fn ws_close_code<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>) -> Option<u16> {
    loop {
        match within(ws.next()).await {
            Some(Ok(WsMessage::Close(frame))) => {
                // Keep reading so that our Close reply is flushed (RFC 6455 handshake).
                while let Some(Ok(_)) = within(ws.next()).await {}
                return frame.map(|f| f.code.into());
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

// ---- plain-HTTP client (hyper client over a raw TCP stream) ----

pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn message(&self) -> ServerToAgent {
        assert_eq!(self.status, StatusCode::OK, "body: {:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/x-protobuf");
        let body = if self
            .headers
            .get("content-encoding")
            .is_some_and(|v| v == "gzip")
        {
            opamp_transport::gzip::decompress_limited(&self.body, 1 << 26).unwrap()
        } else {
            self.body.clone()
        };
        ServerToAgent::decode(body).expect("ServerToAgent body")
    }
}

pub async fn http_request<S>(io: S, request: Request<Full<Bytes>>) -> HttpResponse
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = within(hyper::client::conn::http1::handshake(TokioIo::new(io)))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = within(sender.send_request(request)).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = within(body.collect()).await.unwrap().to_bytes();
    HttpResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A POST of `body` with the protobuf content type and `extra` headers.
pub fn post(path: &str, body: impl Into<Bytes>, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/x-protobuf");
    for (k, v) in extra {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(body.into())).unwrap()
}

pub async fn http_post(addr: SocketAddr, request: Request<Full<Bytes>>) -> HttpResponse {
    let tcp = within(TcpStream::connect(addr)).await.unwrap();
    http_request(tcp, request).await
}

/// Posts `msg` (with the instance uid header) and decodes the answer.
pub async fn poll(addr: SocketAddr, path: &str, msg: &AgentToServer) -> ServerToAgent {
    let uid = InstanceUid::try_from(&msg.instance_uid[..]).unwrap();
    let resp = http_post(
        addr,
        post(
            path,
            msg.encode_to_vec(),
            &[("opamp-instance-uid", &uid.to_string())],
        ),
    )
    .await;
    assert_eq!(&resp.message().instance_uid[..], uid.as_array());
    resp.message()
}
