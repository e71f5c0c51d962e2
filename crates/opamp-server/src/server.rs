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
use crate::config::ServerConfig;
use crate::connection::PeerInfo;
use crate::error::ServerError;
use crate::limits::{Slot, SlotExt};
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

impl Server {
    /// Binds `config.listen_addr()` and starts serving. Must be called inside a tokio
    /// runtime.
    pub async fn bind(
        config: ServerConfig,
        callbacks: Arc<dyn ServerCallbacks>,
    ) -> Result<Self, ServerError> {
        let addr = config.listen_addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(ServerError::LocalAddr)?;
        let service = OpampService::new(config, callbacks);
        let accept_loop = tokio::spawn(accept_loop(listener, service.clone()));
        tracing::info!(%local_addr, path = service.config().path(), "OpAMP server listening");
        Ok(Self {
            service,
            local_addr,
            accept_loop,
        })
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

async fn accept_loop(listener: TcpListener, service: OpampService) {
    let mut stop = service.shared.stop_signal();
    let max = service
        .config()
        .limits()
        .max_connections()
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
                tokio::spawn(serve_tcp(service, tcp, remote, slot).instrument(span));
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

async fn serve_tcp(service: OpampService, tcp: TcpStream, remote: SocketAddr, slot: Arc<Slot>) {
    let peer = PeerInfo::remote(remote);
    // The first request head (TLS handshake included) is due within the first-message
    // timeout of the accept (slow-loris).
    let first_due = tokio::time::Instant::now() + service.config().limits().first_message_timeout();
    #[cfg(feature = "tls")]
    if let Some(tls) = service.config().tls().cloned() {
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
        serve_io(service, stream, peer, slot, first_due).await;
        return;
    }
    serve_io(service, tcp, peer, slot, first_due).await;
}

async fn serve_io<I>(
    service: OpampService,
    io: I,
    peer: PeerInfo,
    slot: Arc<Slot>,
    first_due: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _guard = service.shared.track();
    let mut stop = service.shared.stop_signal();
    let path_service = service.clone();
    let handler_slot = slot.clone();
    let handler = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let service = path_service.clone();
        let peer = peer.clone();
        let slot = handler_slot.clone();
        slot.mark_request();
        // Boxed: hyper keeps a slot the size of this future for every connection, idle ones
        // included, and unboxed it is several KiB.
        Box::pin(async move {
            if req.uri().path() != service.config().path() {
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
            let resp = service.handle(req).await;
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
