//! The traits an embedder implements, mirroring opamp-go's server callbacks.

#[cfg(feature = "tokio")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tokio")]
use async_trait::async_trait;
#[cfg(feature = "tokio")]
use http::{HeaderMap, HeaderValue, StatusCode};
#[cfg(feature = "tokio")]
use opamp_proto::{AgentToServer, InstanceUid};
use opamp_proto::{
    RetryInfo, ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
    server_error_response::Details,
};

#[cfg(feature = "tokio")]
use crate::connection::Connection;
#[cfg(feature = "tokio")]
use crate::error::ReadMessageError;

#[cfg(feature = "tokio")]
/// Server-wide hook: decides whether an incoming request becomes a connection.
///
/// Called for every WebSocket upgrade request and for **every** plain-HTTP request (so that
/// rotated or revoked credentials take effect at the next poll, AUTH-5), before the body is
/// read. It sees the request line and headers only.
#[async_trait]
pub trait ServerCallbacks: Send + Sync + 'static {
    /// Accepts the request with the callbacks of its connection, or rejects it.
    async fn on_connecting(&self, request: &http::request::Parts) -> ConnectionResponse;

    /// Two live agents use one instance uid (UID-8: a cloned VM, a bad generator). The
    /// answer decides what happens to the newcomer; the default is
    /// [`DuplicateUidPolicy::Reassign`], which the spec recommends.
    ///
    /// How duplicates are detected, and the limits:
    ///
    /// - **Two connections** (WebSocket, or WebSocket and a plain-HTTP session): the newer
    ///   one takes the uid over at its first message; the older one is only *suspected*,
    ///   since it may be the same agent's dead connection (half-open TCP, a rebooted host).
    ///   When the older one then sends a message, both are proven live and this hook runs;
    ///   a dead connection never sends, so a reconnect is never taken for a duplicate.
    ///   The newcomer's own message(s) until then are served normally.
    /// - **Two plain-HTTP pollers** share one session: their sequence numbers interleave
    ///   ([`AgentSession`](crate::AgentSession), "Duplicate uids"); the agent that jumped
    ///   into the other's sequence is the newcomer. Its first message(s) are taken for the
    ///   other's until the interleaving shows; two pollers whose numbers stay equal are not
    ///   told apart.
    /// - Agents behind a proxy that multiplexes several agents on one WebSocket are not
    ///   supported either way.
    ///
    /// Runs on the task of the connection whose message proved the duplicate; keep it short.
    async fn on_duplicate_uid(&self, _duplicate: &DuplicateUid) -> DuplicateUidPolicy {
        DuplicateUidPolicy::Reassign
    }
}

#[cfg(feature = "tokio")]
/// What [`ServerCallbacks::on_duplicate_uid`] learns about a duplicate uid (UID-8).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DuplicateUid {
    /// The uid both agents use.
    pub instance_uid: InstanceUid,
    /// The connection (or plain-HTTP session) of the agent that keeps the uid.
    pub kept: Connection,
    /// The newcomer's connection; `None` when it polls over plain HTTP into the kept
    /// agent's own session (it then has no connection of its own).
    pub newcomer: Option<Connection>,
}

#[cfg(feature = "tokio")]
use crate::core::DuplicateUidPolicy;

#[cfg(feature = "tokio")]
/// The answer of [`ServerCallbacks::on_connecting`].
#[derive(Clone)]
#[non_exhaustive]
pub enum ConnectionResponse {
    /// Accept; these callbacks serve the connection.
    Accept(Arc<dyn ConnectionCallbacks>),
    /// Reject with an HTTP status and headers (no upgrade happens).
    Reject(Rejection),
}

#[cfg(feature = "tokio")]
impl ConnectionResponse {
    /// Accepts with `callbacks`.
    pub fn accept(callbacks: Arc<dyn ConnectionCallbacks>) -> Self {
        Self::Accept(callbacks)
    }
}

#[cfg(feature = "tokio")]
impl std::fmt::Debug for ConnectionResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Accept(_) => f.write_str("Accept(..)"),
            Self::Reject(r) => f.debug_tuple("Reject").field(r).finish(),
        }
    }
}

#[cfg(feature = "tokio")]
/// A refusal: HTTP status and headers sent instead of a connection.
#[derive(Debug, Clone)]
pub struct Rejection {
    status: StatusCode,
    headers: HeaderMap,
}

#[cfg(feature = "tokio")]
impl Rejection {
    /// A rejection with any status. A status that is not a client or server error becomes
    /// 500: a rejection must never look like success.
    pub fn new(status: StatusCode) -> Self {
        let status = if status.is_client_error() || status.is_server_error() {
            status
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self {
            status,
            headers: HeaderMap::new(),
        }
    }

    /// 401: client authentication failed (AUTH-2).
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED)
    }

    /// 503 with an optional `Retry-After` in whole seconds, rounded up (THR-5).
    pub fn unavailable(retry_after: Option<Duration>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE).with_retry_after(retry_after)
    }

    /// 429 with an optional `Retry-After` in whole seconds, rounded up (THR-5).
    pub fn too_many_requests(retry_after: Option<Duration>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS).with_retry_after(retry_after)
    }

    /// Adds a header (e.g. `WWW-Authenticate`).
    pub fn with_header(mut self, name: http::header::HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        if let Some(after) = retry_after {
            self.headers
                .insert(http::header::RETRY_AFTER, retry_after_value(after));
        }
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

#[cfg(feature = "tokio")]
/// `Retry-After` in delay-seconds form, rounded up (by the transport's one implementation),
/// at least 1: "0" would invite an immediate retry storm.
pub(crate) fn retry_after_value(after: Duration) -> HeaderValue {
    HeaderValue::from(opamp_transport::http::retry_after_seconds(after).max(1))
}

#[cfg(feature = "tokio")]
/// Per-connection hooks. The driver never runs two of them concurrently for one connection.
///
/// All methods but [`on_message`](Self::on_message) have empty defaults.
///
/// # Plain-HTTP sessions
///
/// Plain HTTP has no connection; this crate keeps one *session* per agent instance uid and
/// maps it to these callbacks as if it were a connection: the first request of an unknown
/// uid creates it (`on_connected`, then `on_message`), each poll calls `on_message` with the
/// same [`Connection`], and `on_connection_close` runs once when the session ends: the agent
/// sent `agent_disconnect` (DIS-2), it stopped polling for longer than the idle timeout, the
/// application called [`Connection::disconnect`], or the server stopped. The callbacks used
/// are those returned by `on_connecting` for the request that created the session.
///
/// Likewise, such a [`Connection`]'s [`remote_addr`](Connection::remote_addr) and
/// `peer_certificates` (mTLS) are those of the request that created the session; later polls
/// may come from other addresses (new keep-alive connections, NAT). A later request must
/// still pass `on_connecting` itself, and it reaches the session only if
///
/// - its `OpAMP-Instance-UID` header, when present, equals the body's `instance_uid`
///   (HTTP-5); otherwise it gets 400 and `on_read_message_error` sees
///   [`ReadMessageError::InstanceUidHeader`](crate::ReadMessageError::InstanceUidHeader);
/// - its client certificate chain (the [`PeerCertificates`](crate::PeerCertificates) request
///   extension, feature `tls`) is the session's; otherwise it gets 403 and no callback runs.
///
/// A request that would create a session when
/// [`max_http_sessions`](crate::ServerConfig::max_http_sessions) are alive takes the place
/// of the oldest session that has served one poll only (that session ends:
/// `on_connection_close`); when every session has served two polls or more, it gets 503
/// with `Retry-After` (THR-5). A source address over its new-session budget
/// ([`http_new_session_burst`](crate::ServerConfig::http_new_session_burst)) gets 429 with
/// `Retry-After`. In both refusals no callback runs.
///
/// A body whose `instance_uid` is the nil (or max) UUID gets a new uid
/// (`agent_identification.new_instance_uid`, UID-8) and creates no session; a second agent
/// polling with a session's uid is handled by
/// [`ServerCallbacks::on_duplicate_uid`].
///
/// # Blocking
///
/// The methods are async; awaiting inside them holds back only their own connection. Do not
/// await [`Server::shutdown`](crate::Server::shutdown) inside a callback (it waits for this
/// callback); [`ServerHandle::stop`](crate::ServerHandle::stop) is fine.
#[async_trait]
pub trait ConnectionCallbacks: Send + Sync + 'static {
    /// The connection is established (WebSocket upgraded, or first poll of a session).
    async fn on_connected(&self, _conn: &Connection) {}

    /// A message arrived. The returned message is the reply; `None` still sends an
    /// acknowledgement (REP-4). The reply is completed by the protocol core (uid,
    /// capabilities, flags, uid assignment, capability gating, see
    /// [`AgentSession`](crate::AgentSession)). A reply whose `error_response` is
    /// `UNAVAILABLE` becomes HTTP 503 with `Retry-After` on plain HTTP (THR-5).
    ///
    /// The message owns its data: its `bytes` fields are exact-size copies, not views into
    /// the connection's receive buffer, so keeping them (a config hash, an effective config)
    /// costs their size and nothing more.
    async fn on_message(&self, conn: &Connection, message: AgentToServer) -> Option<ServerToAgent>;

    /// The connection (or plain-HTTP session) ended. Called exactly once.
    async fn on_connection_close(&self, _conn: &Connection) {}

    /// A message could not be read; the agent gets `BAD_REQUEST` (WS) or HTTP 400/413.
    async fn on_read_message_error(&self, _conn: &Connection, _error: &ReadMessageError) {}
}

/// A reply telling the agent its message was malformed (ERR-1); it should not retry it.
pub fn bad_request(message: impl Into<String>) -> ServerToAgent {
    error_reply(ServerErrorResponseType::BadRequest, message.into(), None)
}

/// A reply telling the agent the server is overloaded (THR-1, ERR-3), with an optional time
/// to wait before reconnecting (THR-3). Over plain HTTP it is answered as 503 with
/// `Retry-After` instead (THR-5).
pub fn unavailable(message: impl Into<String>, retry_after: Option<Duration>) -> ServerToAgent {
    let details = retry_after.map(|after| {
        Details::RetryInfo(RetryInfo {
            retry_after_nanoseconds: u64::try_from(after.as_nanos()).unwrap_or(u64::MAX),
        })
    });
    error_reply(
        ServerErrorResponseType::Unavailable,
        message.into(),
        details,
    )
}

fn error_reply(
    kind: ServerErrorResponseType,
    error_message: String,
    details: Option<Details>,
) -> ServerToAgent {
    ServerToAgent {
        error_response: Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message,
            details,
        }),
        ..ServerToAgent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "tokio")]
    #[test]
    fn thr_5_retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(30)), "30");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(
            retry_after_value(Duration::MAX),
            u64::MAX.to_string().as_str()
        );
        let r = Rejection::unavailable(Some(Duration::from_secs(30)));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[http::header::RETRY_AFTER], "30");
        assert_eq!(
            Rejection::too_many_requests(None).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(Rejection::new(StatusCode::OK).status(), 500);
    }

    #[test]
    fn thr_3_unavailable_carries_retry_info_in_nanoseconds() {
        let m = unavailable("busy", Some(Duration::from_secs(2)));
        let err = m.error_response.unwrap();
        assert_eq!(err.r#type(), ServerErrorResponseType::Unavailable);
        assert_eq!(
            err.details,
            Some(Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: 2_000_000_000
            }))
        );
        assert_eq!(
            bad_request("x").error_response.unwrap().r#type(),
            ServerErrorResponseType::BadRequest
        );
    }
}
