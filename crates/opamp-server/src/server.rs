//! The standalone server: binds its own listener (default `0.0.0.0:4320`, path `/v1/opamp`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::callbacks::ServerCallbacks;
use crate::config::{
    ConnectionLimits, DEFAULT_LISTEN_ADDR, DEFAULT_SERVER_PATH, RemoteAddrFn, ServerConfig,
    ServerConfigBuilder,
};
use crate::connection::PeerInfo;
use crate::error::ConfigError;
use crate::error::ServerError;
use crate::limits::{Slot, SlotExt};
use crate::service::ResponseBody;
use crate::service::{OpampService, stopped, text_response};

/// Most time a client gets to finish its TLS handshake (the first-message timeout, if
/// shorter, applies).
#[cfg(feature = "tls")]
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A running standalone OpAMP server.
///
/// Serves both transports on one path over HTTP/1.1, with TLS when the configuration has it
/// (feature `tls`). Dropping the `Server` does not stop it; call
/// [`shutdown`](Self::shutdown), or [`ServerHandle::stop`] from anywhere.
#[derive(Debug)]
#[must_use = "the server runs until shutdown() is called"]
pub struct Server {
    service: OpampService,
    local_addr: SocketAddr,
    accept_loop: JoinHandle<()>,
}

/// A cheap handle that stops a [`Server`]; usable inside callbacks.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    service: OpampService,
}

impl ServerHandle {
    /// Begins a graceful stop and returns at once (see [`OpampService::stop`]).
    pub fn stop(&self) {
        self.service.stop();
    }

    /// Whether a stop began.
    pub fn is_stopped(&self) -> bool {
        self.service.is_stopped()
    }
}

/// What the accept loop needs of the standalone server's own settings.
struct Listener {
    path: Box<str>,
    max_connections: Option<usize>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Builds a standalone [`Server`], the tonic way: where it listens ([`listen`](Self::listen),
/// default `0.0.0.0:4320`, GEN-3), its [`path`](Self::path) (default `/v1/opamp`, GEN-2),
/// [`tls`](Self::tls), a tower [`layer`](Self::layer) around the [`OpampService`], and the
/// protocol limits ([`config`](Self::config), or the [`ServerConfigBuilder`] setters,
/// forwarded). [`bind`](Self::bind) starts it.
///
/// ```no_run
/// # use std::sync::Arc;
/// # async fn run(callbacks: Arc<dyn opamp_server::ServerCallbacks>) -> Result<(), Box<dyn std::error::Error>> {
/// use opamp_server::{Server, ServerConfig};
///
/// let server = Server::builder()
///     .listen("127.0.0.1:4320".parse()?)
///     .path("/opamp")
///     .config(ServerConfig::builder().max_http_sessions(10_000).build()?)
///     .bind(callbacks)
///     .await?;
/// # server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[must_use = "a builder does nothing until bind() is called"]
pub struct ServerBuilder<L = tower_layer::Identity> {
    config: ServerConfigBuilder,
    listen: SocketAddr,
    path: String,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: Option<usize>,
    layer: L,
}

impl<L> std::fmt::Debug for ServerBuilder<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("config", &self.config)
            .field("listen", &self.listen)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self::from_config(ServerConfig::builder())
    }
}

impl From<ServerConfig> for ServerBuilder {
    /// A standalone server with `config` and the default listener (`0.0.0.0:4320`,
    /// `/v1/opamp`, no TLS, no layer).
    fn from(config: ServerConfig) -> Self {
        Self::default().config(config)
    }
}

impl ServerBuilder {
    pub(crate) fn from_config(config: ServerConfigBuilder) -> Self {
        Self {
            config,
            listen: DEFAULT_LISTEN_ADDR,
            path: DEFAULT_SERVER_PATH.to_owned(),
            #[cfg(feature = "tls")]
            tls: None,
            max_connections: None,
            layer: tower_layer::Identity::new(),
        }
    }
}

/// Forwards [`ServerConfigBuilder`] setters, so that a chain started there goes on here.
macro_rules! forward {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty);)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, $arg: $ty) -> Self {
            self.config = self.config.$name($arg);
            self
        }
    )*};
}

impl<L> ServerBuilder<L> {
    /// Sets the address to bind.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Sets the address to bind ([`listen`](Self::listen)).
    pub fn listen_addr(self, addr: SocketAddr) -> Self {
        self.listen(addr)
    }

    /// Sets the URL path the server answers on; must start with `/`. Other paths get 404.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Serves TLS (and mTLS, if `tls` verifies client certificates); see
    /// `opamp_transport::tls` to build one.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the limit on open TCP connections; must be non-zero. At the limit the server
    /// closes the oldest connection that never delivered an OpAMP message to admit a new
    /// one (see [`ConnectionLimits`]). Default: the process's file-descriptor soft limit
    /// minus [`FD_RESERVE`](crate::FD_RESERVE), read when the server binds (Linux; no limit
    /// where it cannot be read).
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = Some(connections);
        self
    }

    /// Sets the protocol limits and transport settings (replacing any set before).
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = ServerConfigBuilder::from(config);
        self
    }

    /// Wraps the [`OpampService`] in a tower layer (authentication, tracing, metrics, ...),
    /// applied inside the path check and after the peer's address and certificates were
    /// put into the request's extensions. The layered service must answer with the
    /// service's [`ResponseBody`]; an error from it is answered with 500.
    pub fn layer<N>(self, layer: N) -> ServerBuilder<tower_layer::Stack<N, L>> {
        ServerBuilder {
            config: self.config,
            listen: self.listen,
            path: self.path,
            #[cfg(feature = "tls")]
            tls: self.tls,
            max_connections: self.max_connections,
            layer: tower_layer::Stack::new(layer, self.layer),
        }
    }

    forward! {
        /// See [`ServerConfigBuilder::max_message_size`].
        max_message_size(bytes: usize);
        /// See [`ServerConfigBuilder::max_message_elements`].
        max_message_elements(elements: usize);
        /// See [`ServerConfigBuilder::ws_read_buffer_size`].
        ws_read_buffer_size(bytes: usize);
        /// See [`ServerConfigBuilder::outbound_queue_capacity`].
        outbound_queue_capacity(messages: usize);
        /// See [`ServerConfigBuilder::server_capabilities`].
        server_capabilities(capabilities: opamp_proto::ServerCapabilitySet);
        /// See [`ServerConfigBuilder::ws_write_fragment_size`].
        ws_write_fragment_size(bytes: usize);
        /// See [`ServerConfigBuilder::http_idle_timeout`].
        http_idle_timeout(timeout: Duration);
        /// See [`ServerConfigBuilder::write_timeout`].
        write_timeout(timeout: Duration);
        /// See [`ServerConfigBuilder::max_http_sessions`].
        max_http_sessions(sessions: usize);
        /// See [`ServerConfigBuilder::http_body_timeout`].
        http_body_timeout(timeout: Duration);
        /// See [`ServerConfigBuilder::full_state_min_interval`].
        full_state_min_interval(interval: Duration);
        /// See [`ServerConfigBuilder::limits`].
        limits(limits: ConnectionLimits);
        /// See [`ServerConfigBuilder::remote_addr_from`].
        remote_addr_from(find: RemoteAddrFn);
        /// See [`ServerConfigBuilder::http_new_session_burst`].
        http_new_session_burst(sessions: u32);
        /// See [`ServerConfigBuilder::http_new_session_rate`].
        http_new_session_rate(per_second: u32);
    }

    /// Checks the settings (the path, and [`ServerConfigBuilder::build`]'s checks) and
    /// returns the builder, for [`Server::bind`].
    pub fn build(self) -> Result<Self, ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::InvalidPath(self.path));
        }
        if self.max_connections == Some(0) {
            return Err(ConfigError::Zero("max_connections"));
        }
        self.config.clone().build()?;
        Ok(self)
    }

    /// Binds the address and starts serving. Must be called inside a tokio runtime.
    pub async fn bind(self, callbacks: Arc<dyn ServerCallbacks>) -> Result<Server, ServerError>
    where
        L: tower_layer::Layer<OpampService>,
        L::Service: tower_service::Service<Request<Incoming>, Response = http::Response<ResponseBody>>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower_service::Service<Request<Incoming>>>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>>,
        <L::Service as tower_service::Service<Request<Incoming>>>::Future: Send + 'static,
    {
        let this = self.build().map_err(ServerError::Config)?;
        let config = this.config.build().map_err(ServerError::Config)?;
        let addr = this.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(ServerError::LocalAddr)?;
        let service = OpampService::new(config, callbacks);
        let layered = this.layer.layer(service.clone());
        let settings = Arc::new(Listener {
            path: this.path.into(),
            max_connections: this.max_connections,
            #[cfg(feature = "tls")]
            tls: this.tls,
        });
        tracing::info!(%local_addr, path = &*settings.path, "OpAMP server listening");
        let accept_loop = tokio::spawn(accept_loop(listener, service.clone(), layered, settings));
        Ok(Server {
            service,
            local_addr,
            accept_loop,
        })
    }
}

impl Server {
    /// A builder for a standalone server (see [`ServerBuilder`]).
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Binds and starts serving `config`: a [`ServerConfig`] (the default listener,
    /// `0.0.0.0:4320` and `/v1/opamp`), or a [`ServerBuilder`] without a layer. Must be
    /// called inside a tokio runtime.
    pub async fn bind(
        config: impl Into<ServerBuilder>,
        callbacks: Arc<dyn ServerCallbacks>,
    ) -> Result<Self, ServerError> {
        config.into().bind(callbacks).await
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to stop the server from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            service: self.service.clone(),
        }
    }

    /// The service behind the server.
    pub fn service(&self) -> &OpampService {
        &self.service
    }

    /// Graceful stop: no new connections, Close frames to WebSocket agents, requests in
    /// flight finished, plain-HTTP sessions closed; returns when all is done.
    pub async fn shutdown(self) {
        self.service.stop();
        // The accept loop ends at the stop signal; an error only means it panicked.
        let _ = self.accept_loop.await;
        self.service.shutdown().await;
    }
}

async fn accept_loop<S>(
    listener: TcpListener,
    service: OpampService,
    layered: S,
    settings: Arc<Listener>,
) where
    S: tower_service::Service<Request<Incoming>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let mut stop = service.shared.stop_signal();
    let max = settings
        .max_connections
        .or_else(crate::limits::default_max_connections);
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, remote)) => {
                // At the limit, the oldest connection that never sent an OpAMP message
                // makes room; when all are real agents, the new one is closed at once.
                let Some(slot) = service.shared.conns.admit(max) else {
                    tracing::debug!(%remote, "connection limit reached; connection refused");
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let service = service.clone();
                let span = tracing::debug_span!("opamp.conn", %remote);
                tokio::spawn(
                    serve_tcp(
                        service,
                        layered.clone(),
                        settings.clone(),
                        tcp,
                        remote,
                        slot,
                    )
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: make room, back off instead of
                // spinning.
                tracing::warn!(error = %e, "accept failed");
                service.shared.conns.shed_oldest();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_tcp<S>(
    service: OpampService,
    layered: S,
    settings: Arc<Listener>,
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Arc<Slot>,
) where
    S: tower_service::Service<Request<Incoming>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let peer = PeerInfo::remote(remote);
    // The first request head (TLS handshake included) is due within the first-message
    // timeout of the accept (slow-loris).
    let first_due = tokio::time::Instant::now() + service.config().limits().first_message_timeout();
    #[cfg(feature = "tls")]
    if let Some(tls) = settings.tls.clone() {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        // The handshake counts towards the first-message timeout, and a connection still in
        // it is silent: it may be shed at the connection limit.
        let handshake = tokio::time::timeout_at(
            first_due.min(tokio::time::Instant::now() + HEADER_READ_TIMEOUT),
            acceptor.accept(tcp),
        );
        let stream = tokio::select! {
            accepted = handshake => match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            },
            () = slot.shed_requested() => {
                tracing::debug!("connection shed at the connection limit during TLS handshake");
                return;
            }
        };
        let certificates = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| crate::PeerCertificates::new(chain.to_vec()));
        let peer = PeerInfo {
            certificates,
            ..peer
        };
        serve_io(service, layered, settings, stream, peer, slot, first_due).await;
        return;
    }
    serve_io(service, layered, settings, tcp, peer, slot, first_due).await;
}

async fn serve_io<I, S>(
    service: OpampService,
    layered: S,
    settings: Arc<Listener>,
    io: I,
    peer: PeerInfo,
    slot: Arc<Slot>,
    first_due: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let _guard = service.shared.track();
    let mut stop = service.shared.stop_signal();
    let handler_slot = slot.clone();
    let handler = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let mut service = layered.clone();
        let settings = settings.clone();
        let peer = peer.clone();
        let slot = handler_slot.clone();
        slot.mark_request();
        // Boxed: hyper keeps a slot the size of this future for every connection, idle ones
        // included, and unboxed it is several KiB.
        Box::pin(async move {
            if req.uri().path() != &*settings.path {
                return Ok::<_, std::convert::Infallible>(text_response(
                    StatusCode::NOT_FOUND,
                    "not an OpAMP endpoint",
                ));
            }
            if let Some(addr) = peer.remote_addr {
                req.extensions_mut().insert(addr);
            }
            #[cfg(feature = "tls")]
            if let Some(certs) = peer.certificates {
                req.extensions_mut().insert(certs);
            }
            req.extensions_mut().insert(SlotExt(slot.clone()));
            let resp = match call(&mut service, req).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::debug!(error = %e.into(), "the layered service failed");
                    text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
                }
            };
            if resp.status() == StatusCode::OK {
                // A plain-HTTP exchange: this connection carries a real agent.
                slot.mark_active();
            }
            Ok(resp)
        })
    });
    // hyper's header-read timeout also runs while a kept-alive connection waits for its next
    // request: at 30 s it closed connections just as agents polling every 30 s (HTTP-7)
    // reused them. Idle connections live as long as idle plain-HTTP sessions.
    let idle = service.config().http_idle_timeout();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(TokioIo::new(io), handler)
        .with_upgrades();
    tokio::pin!(conn);
    // A connection must send a request head by `first_due` (slow-loris); later requests are
    // bounded by hyper's header timeout.
    let first = tokio::time::sleep_until(first_due);
    tokio::pin!(first);
    let mut first_pending = true;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = stopped(&mut stop) => break,
            () = slot.shed_requested() => {
                tracing::debug!("connection shed at the connection limit");
                return;
            }
            () = first.as_mut(), if first_pending => {
                if !slot.request_seen() {
                    tracing::debug!("no request within the first-message timeout");
                    return;
                }
                first_pending = false;
            }
        }
    }
    // Graceful: finish the request in flight, close idle keep-alive connections.
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Calls a tower service once it is ready.
async fn call<S>(service: &mut S, req: Request<Incoming>) -> Result<S::Response, S::Error>
where
    S: tower_service::Service<Request<Incoming>>,
{
    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(req).await
}
