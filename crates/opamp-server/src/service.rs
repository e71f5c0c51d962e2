//! The embeddable hyper/tower service: one endpoint, both transports.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::{Notify, watch};

use crate::callbacks::{ConnectionResponse, ServerCallbacks};
use crate::config::ServerConfig;
use crate::connection::PeerInfo;
use crate::plain::Sessions;
use crate::registry::UidRegistry;
use crate::{plain, wire, ws};

/// The response body type of [`OpampService`].
pub type ResponseBody = Full<Bytes>;

/// The OpAMP endpoint as a `tower::Service` (and, through
/// `hyper_util::service::TowerToHyperService`, a hyper service): mount it at any path of an
/// axum router or another hyper stack, sharing its listener and TLS.
///
/// One endpoint serves both transports (HTTP-2): a `POST` with
/// `Content-Type: application/x-protobuf` is plain HTTP; any other request is a WebSocket
/// upgrade attempt. A `POST` with another content type gets 415, a request that is not a
/// valid upgrade gets 400 or 426.
///
/// The service reads two optional request extensions: a [`std::net::SocketAddr`] (the
/// peer's address, see [`Connection::remote_addr`](crate::Connection::remote_addr); a stack
/// that stores it under its own type, like axum's `ConnectInfo`, is served by
/// [`ServerConfigBuilder::remote_addr_from`](crate::ServerConfigBuilder::remote_addr_from)
/// or by a layer that inserts the `SocketAddr`) and,
/// with the `tls` feature, [`PeerCertificates`](crate::PeerCertificates). WebSocket upgrades
/// need hyper's `OnUpgrade` extension, which hyper's HTTP/1 server (and so axum) provides.
///
/// Clones share all state. [`stop`](Self::stop) begins a graceful stop.
#[derive(Clone)]
pub struct OpampService {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) callbacks: Arc<dyn ServerCallbacks>,
    pub(crate) sessions: Sessions,
    /// Live instance uids across connections (UID-8).
    pub(crate) uids: Arc<UidRegistry>,
    /// Bytes of incomplete messages and bodies, server-wide (ConnectionLimits).
    pub(crate) budget: Arc<crate::limits::Budget>,
    /// Open TCP connections of the standalone server (ConnectionLimits).
    pub(crate) conns: Arc<crate::limits::ConnTable>,
    stop_tx: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

impl Shared {
    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    pub(crate) fn is_stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    /// Counts a connection or request in flight until the guard drops.
    pub(crate) fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Keeps a graceful stop waiting while it lives.
pub(crate) struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves once a stop began (or the service is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = rx.wait_for(|stopping| *stopping).await;
}

impl OpampService {
    /// A service with `config` whose connections `callbacks` accepts.
    pub fn new(config: ServerConfig, callbacks: Arc<dyn ServerCallbacks>) -> Self {
        let (stop_tx, _) = watch::channel(false);
        let budget = crate::limits::Budget::new(config.limits().max_incomplete_bytes());
        let sessions = Sessions::new(&config);
        Self {
            shared: Arc::new(Shared {
                config,
                callbacks,
                sessions,
                uids: Arc::default(),
                budget,
                conns: Arc::default(),
                stop_tx,
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Begins a graceful stop and returns at once: new requests get 503, WebSocket
    /// connections are sent a Close frame (1001), requests in flight finish. Safe to call
    /// from inside a callback, and more than once.
    pub fn stop(&self) {
        self.shared.stop_tx.send_replace(true);
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.shared.is_stopping()
    }

    /// Stops (see [`stop`](Self::stop)) and waits until every WebSocket connection and
    /// request in flight is finished; then ends every plain-HTTP session
    /// (`on_connection_close`). Do not await it inside a callback: it would wait for itself.
    pub async fn shutdown(&self) {
        self.stop();
        self.shared.wait_idle().await;
        plain::close_all(&self.shared).await;
    }

    /// Number of WebSocket connections and requests in flight.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Bytes of incomplete WebSocket messages and plain-HTTP bodies held now, counted
    /// against [`ConnectionLimits::max_incomplete_bytes`](crate::ConnectionLimits::max_incomplete_bytes).
    pub fn incomplete_bytes(&self) -> usize {
        self.shared.budget.used()
    }

    /// The connection of the agent with `uid`: its WebSocket connection, or its plain-HTTP
    /// session (a message sent to that goes out with the answer to its next poll). `None`
    /// if no live connection has announced that uid. Known from the agent's first message
    /// on; when two connections claim one uid (UID-8), the one that holds it now.
    pub fn connection(&self, uid: &opamp_proto::InstanceUid) -> Option<crate::Connection> {
        self.shared.uids.get(uid)
    }

    /// Every live connection whose agent announced its uid, one per uid, in no particular
    /// order (a snapshot: connections come and go meanwhile).
    pub fn connections(&self) -> Vec<crate::Connection> {
        self.shared.uids.all()
    }

    /// Sends `message` to every live connection of [`connections`](Self::connections),
    /// encoded once ([`SharedMessage`](crate::SharedMessage)); each agent's session still
    /// strips what that agent cannot take (CAP-4). Returns how many connections it was
    /// queued to and how many refused it (queue full or closed meanwhile; see
    /// [`Connection::send_shared`](crate::Connection::send_shared)).
    pub fn broadcast(&self, message: &crate::SharedMessage) -> Broadcast {
        let mut outcome = Broadcast::default();
        for conn in self.shared.uids.all() {
            match conn.send_shared(message) {
                Ok(()) => outcome.queued += 1,
                Err(_) => outcome.refused += 1,
            }
        }
        outcome
    }

    /// Number of live plain-HTTP sessions.
    pub fn plain_http_sessions(&self) -> usize {
        self.shared.sessions.len()
    }

    /// Serves one request; the `Service` impl calls this.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let shared = &self.shared;
        if shared.is_stopping() {
            return text_response(StatusCode::SERVICE_UNAVAILABLE, "server is stopping");
        }
        let _guard = shared.track();
        let (mut parts, body) = req.into_parts();

        // HTTP-2: protobuf POST is plain HTTP; anything else must be a WebSocket upgrade.
        let kind = if parts.method == Method::POST {
            if !wire::is_protobuf(&parts.headers) {
                return text_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "OpAMP plain HTTP needs Content-Type: application/x-protobuf",
                );
            }
            Kind::Http
        } else {
            match ws::check_upgrade(&parts) {
                Ok(accept_key) => Kind::WebSocket(accept_key),
                Err(response) => return response,
            }
        };

        let mut peer = PeerInfo::from_extensions(&parts.extensions);
        if let Some(find) = shared.config.remote_addr_from()
            && let Some(addr) = find(&parts.extensions)
        {
            peer.remote_addr = Some(addr);
        }
        let callbacks = match shared.callbacks.on_connecting(&parts).await {
            ConnectionResponse::Accept(callbacks) => callbacks,
            ConnectionResponse::Reject(rejection) => {
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = rejection.status();
                *resp.headers_mut() = rejection.headers().clone();
                return resp;
            }
        };

        match kind {
            Kind::Http => plain::handle(shared, parts, body, callbacks, peer).await,
            Kind::WebSocket(accept_key) => {
                let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
                else {
                    return text_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "this connection cannot be upgraded",
                    );
                };
                drop(body);
                let slot = parts
                    .extensions
                    .remove::<crate::limits::SlotExt>()
                    .map(|s| s.0);
                ws::spawn(shared.clone(), on_upgrade, callbacks, peer, slot);
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let h = resp.headers_mut();
                h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                h.insert(UPGRADE, HeaderValue::from_static("websocket"));
                h.insert("sec-websocket-accept", accept_key);
                resp
            }
        }
    }
}

enum Kind {
    Http,
    WebSocket(HeaderValue),
}

pub(crate) fn text_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, POST"));
    }
    resp
}

impl std::fmt::Debug for OpampService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpampService")
            .field("config", &self.shared.config)
            .field("active", &self.active_connections())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl<B> tower_service::Service<Request<B>> for OpampService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

/// What [`OpampService::broadcast`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Broadcast {
    /// Connections the message was queued to.
    pub queued: usize,
    /// Connections that refused it: their queue was full, or they closed meanwhile.
    pub refused: usize,
}
