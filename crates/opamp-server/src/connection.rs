//! The handle an application holds for one agent connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use opamp_proto::{InstanceUid, ServerToAgent};
use tokio::sync::{Notify, mpsc};

use crate::error::SendError;

pub(crate) use crate::core::{SharedMessage, Transport};

/// The client certificate chain of a TLS connection, end-entity first.
///
/// The standalone server inserts it into each request's extensions under mTLS; an embedder
/// that terminates TLS itself may insert one too, and [`Connection::peer_certificates`]
/// returns it.
#[cfg(feature = "tls")]
#[derive(Debug, Clone)]
pub struct PeerCertificates(Arc<[rustls_pki_types::CertificateDer<'static>]>);

#[cfg(feature = "tls")]
impl PeerCertificates {
    /// Wraps a certificate chain.
    pub fn new(chain: Vec<rustls_pki_types::CertificateDer<'static>>) -> Self {
        Self(chain.into())
    }

    /// The chain, end-entity certificate first.
    pub fn as_slice(&self) -> &[rustls_pki_types::CertificateDer<'static>] {
        &self.0
    }
}

/// A cheap, cloneable handle to one agent's connection (`Send + Sync`).
///
/// Messages sent with [`send`](Self::send) pass through the agent's protocol core before
/// they go out, like replies do (capability gating, offer hashes, uid).
///
/// - **WebSocket**: messages go through a bounded queue to the connection's single writer
///   task, so they never interleave with replies on the wire. Until the agent's first
///   message arrives, pushes are held (coalesced) and go out with the first reply.
/// - **Plain HTTP**: there is one pending message; it is delivered in the response to the
///   agent's next poll (HTTP-9). A later `send` before that poll merges into it (later
///   fields win: a newer config replaces an older one), so memory stays bounded (RETRY-4).
///   Custom messages are events, not state, so none replaces another: they wait in a
///   queue of [`outbound_queue_capacity`](crate::ServerConfig::outbound_queue_capacity)
///   entries and go out one per response; past that, `send` fails with
///   [`SendError::QueueFull`].
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    remote_addr: Option<SocketAddr>,
    instance_uid: Mutex<Option<InstanceUid>>,
    closed: AtomicBool,
    #[cfg(feature = "tls")]
    peer_certificates: Option<PeerCertificates>,
    outlet: Outlet,
}

/// An item of a WebSocket connection's outbound queue. Queued boxed: tokio's channel
/// allocates its first block of 32 slots up front for every connection, so a slot must stay
/// one pointer wide; the session takes the box as it is.
pub(crate) use crate::core::Push as Outbound;

enum Outlet {
    WebSocket {
        queue: mpsc::Sender<Box<Outbound>>,
        disconnect: Notify,
    },
    Http {
        pending: Mutex<HttpPending>,
    },
}

/// What waits for a plain-HTTP agent's next poll.
#[derive(Default)]
struct HttpPending {
    /// Everything but custom messages, merged (later fields win).
    merged: Option<Box<Outbound>>,
    /// Custom messages in the order sent; one goes out per response (at most `capacity`).
    customs: std::collections::VecDeque<opamp_proto::CustomMessage>,
    capacity: usize,
}

/// Locks a mutex, recovering from poisoning: the data behind these locks (an uid, one
/// pending message) is valid whatever a panicking holder did.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a connection is told at creation.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerInfo {
    pub(crate) remote_addr: Option<SocketAddr>,
    #[cfg(feature = "tls")]
    pub(crate) certificates: Option<PeerCertificates>,
}

impl PeerInfo {
    pub(crate) fn remote(addr: SocketAddr) -> Self {
        Self {
            remote_addr: Some(addr),
            #[cfg(feature = "tls")]
            certificates: None,
        }
    }

    pub(crate) fn from_extensions(ext: &http::Extensions) -> Self {
        Self {
            remote_addr: ext.get::<SocketAddr>().copied(),
            #[cfg(feature = "tls")]
            certificates: ext.get::<PeerCertificates>().cloned(),
        }
    }
}

impl Connection {
    pub(crate) fn websocket(
        peer: PeerInfo,
        capacity: usize,
    ) -> (Self, mpsc::Receiver<Box<Outbound>>) {
        let (queue, rx) = mpsc::channel(capacity);
        let conn = Self::new(
            Transport::WebSocket,
            peer,
            Outlet::WebSocket {
                queue,
                disconnect: Notify::new(),
            },
        );
        (conn, rx)
    }

    pub(crate) fn http(peer: PeerInfo, uid: Option<InstanceUid>, capacity: usize) -> Self {
        let conn = Self::new(
            Transport::PlainHttp,
            peer,
            Outlet::Http {
                pending: Mutex::new(HttpPending {
                    capacity,
                    ..HttpPending::default()
                }),
            },
        );
        *lock(&conn.inner.instance_uid) = uid;
        conn
    }

    fn new(transport: Transport, peer: PeerInfo, outlet: Outlet) -> Self {
        Self {
            inner: Arc::new(Inner {
                transport,
                remote_addr: peer.remote_addr,
                instance_uid: Mutex::new(None),
                closed: AtomicBool::new(false),
                #[cfg(feature = "tls")]
                peer_certificates: peer.certificates,
                outlet,
            }),
        }
    }

    /// Sends a message to the agent without waiting.
    ///
    /// WebSocket: fails with [`SendError::QueueFull`] when the outbound queue is full (a slow
    /// agent cannot make the server buffer without bound). Plain HTTP: the message waits
    /// for the next poll, merged with any message already pending; fails with
    /// [`SendError::QueueFull`] only when it carries a custom message and as many custom
    /// messages as the outbound queue capacity already wait (then nothing of it is kept).
    pub fn send(&self, message: ServerToAgent) -> Result<(), SendError> {
        self.enqueue(Box::new(Outbound::Message(message)))
    }

    /// Sends a message encoded once for many agents (see [`SharedMessage`]), without
    /// waiting; errors as [`send`](Self::send), handing back a copy of the message.
    pub fn send_shared(&self, message: &SharedMessage) -> Result<(), SendError> {
        self.enqueue(Box::new(Outbound::Shared(message.clone())))
    }

    fn enqueue(&self, item: Box<Outbound>) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Closed(boxed(item)));
        }
        match &self.inner.outlet {
            Outlet::WebSocket { queue, .. } => queue.try_send(item).map_err(|e| match e {
                mpsc::error::TrySendError::Full(m) => SendError::QueueFull(boxed(m)),
                mpsc::error::TrySendError::Closed(m) => SendError::Closed(boxed(m)),
            }),
            Outlet::Http { pending } => {
                // Plain HTTP encodes each response anyway: the message joins the pending one.
                let mut item = item;
                let message = item.make_owned();
                let mut slot = lock(pending);
                if message.custom_message.is_some() {
                    if slot.customs.len() >= slot.capacity {
                        return Err(SendError::QueueFull(boxed(item)));
                    }
                    if let Some(custom) = message.custom_message.take() {
                        slot.customs.push_back(custom);
                    }
                }
                match slot.merged.as_mut() {
                    Some(existing) => merge(existing.make_owned(), item.into_message()),
                    None => slot.merged = Some(item),
                }
                Ok(())
            }
        }
    }

    /// Sends a message, waiting for room in a full WebSocket queue. Plain HTTP: as
    /// [`send`](Self::send).
    ///
    /// Cancel safety: if the future is dropped before it completes, the message was not
    /// queued. Do not await this inside a callback of the same connection while the queue
    /// is full: the writer drains the queue concurrently with callbacks, but a full queue of
    /// an agent that stopped reading only empties when the write timeout drops it.
    pub async fn send_async(&self, message: ServerToAgent) -> Result<(), SendError> {
        match &self.inner.outlet {
            Outlet::WebSocket { queue, .. } if !self.is_closed() => queue
                .send(Box::new(Outbound::Message(message)))
                .await
                .map_err(|e| SendError::Closed(boxed(e.0))),
            _ => self.send(message),
        }
    }

    /// Closes the connection: WebSocket sends a Close frame (1000); a plain-HTTP session
    /// ends, its pending message is dropped and `on_connection_close` runs (at the latest
    /// at the next poll or idle sweep). Later sends fail with [`SendError::Closed`].
    pub fn disconnect(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        match &self.inner.outlet {
            Outlet::WebSocket { disconnect, .. } => disconnect.notify_one(),
            Outlet::Http { pending } => {
                let mut slot = lock(pending);
                slot.merged = None;
                slot.customs.clear();
            }
        }
    }

    /// Whether the connection is closed or closing.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The transport of this connection.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// The peer's address, when known: the standalone server always knows it; an embedder's
    /// stack provides it as a [`SocketAddr`] request extension.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr
    }

    /// The agent's instance uid: known once its first message arrived; follows a uid the
    /// server assigned once the agent switched to it (UID-7).
    pub fn instance_uid(&self) -> Option<InstanceUid> {
        *lock(&self.inner.instance_uid)
    }

    /// The client certificate chain, under mTLS.
    #[cfg(feature = "tls")]
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.inner
            .peer_certificates
            .as_ref()
            .map(PeerCertificates::as_slice)
    }

    pub(crate) fn set_instance_uid(&self, uid: InstanceUid) {
        *lock(&self.inner.instance_uid) = Some(uid);
    }

    pub(crate) fn mark_closed(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Takes the pending plain-HTTP message, if any, with the oldest waiting custom message.
    pub(crate) fn take_pending(&self) -> Option<Box<Outbound>> {
        match &self.inner.outlet {
            Outlet::Http { pending } => {
                let mut slot = lock(pending);
                let custom = slot.customs.pop_front();
                let mut out = slot.merged.take();
                if custom.is_some() {
                    out.get_or_insert_with(|| {
                        Box::new(Outbound::Message(ServerToAgent::default()))
                    })
                    .make_owned()
                    .custom_message = custom;
                }
                out
            }
            Outlet::WebSocket { .. } => None,
        }
    }

    /// Resolves when [`disconnect`](Self::disconnect) was called on a WebSocket connection.
    pub(crate) async fn disconnect_requested(&self) {
        match &self.inner.outlet {
            Outlet::WebSocket { disconnect, .. } => disconnect.notified().await,
            Outlet::Http { .. } => std::future::pending().await,
        }
    }

    /// Whether two handles refer to the same connection.
    pub fn same_connection(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("transport", &self.inner.transport)
            .field("remote_addr", &self.inner.remote_addr)
            .field("instance_uid", &self.instance_uid())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Pending pushes merge by the core's rule: one implementation for both places.
pub(crate) use crate::core::merge;

/// A queued item handed back in a [`SendError`], as one message.
fn boxed(item: Box<Outbound>) -> Box<ServerToAgent> {
    Box::new(item.into_message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opamp_proto::{AgentRemoteConfig, ServerToAgentCommand};

    fn rc(hash: &'static [u8]) -> Option<AgentRemoteConfig> {
        Some(AgentRemoteConfig {
            config: None,
            config_hash: bytes::Bytes::from_static(hash),
        })
    }

    #[test]
    fn http_sends_coalesce_into_one_pending_message() {
        let conn = Connection::http(
            PeerInfo::default(),
            Some(InstanceUid::from_array([1; 16])),
            16,
        );
        conn.send(ServerToAgent {
            remote_config: rc(b"a"),
            flags: 1,
            ..Default::default()
        })
        .unwrap();
        conn.send(ServerToAgent {
            remote_config: rc(b"b"),
            command: Some(ServerToAgentCommand::default()),
            ..Default::default()
        })
        .unwrap();
        let pending = conn.take_pending().unwrap().into_message();
        assert_eq!(pending.remote_config, rc(b"b"), "later fields win");
        assert_eq!(pending.flags, 1, "flags are combined");
        assert!(pending.command.is_some());
        assert!(conn.take_pending().is_none());
    }

    fn custom(data: &'static [u8]) -> ServerToAgent {
        ServerToAgent {
            custom_message: Some(opamp_proto::CustomMessage {
                capability: "io.example".to_owned(),
                r#type: "t".to_owned(),
                data: bytes::Bytes::from_static(data),
            }),
            ..Default::default()
        }
    }

    /// HTTP-9: custom messages sent between two polls are all delivered, one per response
    /// and in order; past the bound `send` fails and keeps nothing.
    #[test]
    fn http_custom_messages_are_queued_not_replaced_and_bounded() {
        let conn = Connection::http(
            PeerInfo::default(),
            Some(InstanceUid::from_array([1; 16])),
            2,
        );
        conn.send(custom(b"1")).unwrap();
        conn.send(ServerToAgent {
            remote_config: rc(b"a"),
            ..custom(b"2")
        })
        .unwrap();
        match conn.send(ServerToAgent {
            remote_config: rc(b"b"),
            ..custom(b"3")
        }) {
            Err(SendError::QueueFull(m)) => assert_eq!(m.remote_config, rc(b"b")),
            other => panic!("expected QueueFull, got {other:?}"),
        }
        let first = conn.take_pending().unwrap().into_message();
        assert_eq!(first.custom_message.unwrap().data, &b"1"[..]);
        assert_eq!(
            first.remote_config,
            rc(b"a"),
            "the refused send changed nothing"
        );
        let second = conn.take_pending().unwrap().into_message();
        assert_eq!(second.custom_message.unwrap().data, &b"2"[..]);
        assert!(second.remote_config.is_none());
        assert!(conn.take_pending().is_none());
    }

    #[test]
    fn ws_queue_is_bounded_and_disconnect_closes() {
        let (conn, _rx) = Connection::websocket(PeerInfo::default(), 2);
        conn.send(ServerToAgent::default()).unwrap();
        conn.send(ServerToAgent::default()).unwrap();
        assert!(matches!(
            conn.send(ServerToAgent::default()),
            Err(SendError::QueueFull(_))
        ));
        conn.disconnect();
        assert!(matches!(
            conn.send(ServerToAgent::default()),
            Err(SendError::Closed(_))
        ));
        assert_eq!(conn.transport(), Transport::WebSocket);
    }
}
