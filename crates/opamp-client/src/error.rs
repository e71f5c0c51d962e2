//! Errors, one enum per domain. `Display` text is for humans and is not API.

#[cfg(feature = "tokio")]
use std::time::Duration;

#[cfg(feature = "tokio")]
use opamp_proto::framing::{DecodeError, MessageTooLarge};
use opamp_proto::{AgentCapabilitySet, ServerCapabilitySet};

/// Why a setter of [`OpampClient`](crate::OpampClient) or [`ClientCore`](crate::core::ClientCore)
/// refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The agent did not declare the capability this setter reports (CAP-1, e.g.
    /// `ReportsHealth` for health).
    #[error("the agent did not declare the capability {0:?}")]
    MissingCapability(AgentCapabilitySet),
    /// The server announced capabilities that do not include the one this request needs
    /// (CAP-4).
    #[error("the server does not have the capability {0:?}")]
    ServerLacksCapability(ServerCapabilitySet),
    /// The client has been stopped; nothing more will be sent.
    #[error("the client is stopped")]
    Stopped,
    /// A custom message is still waiting to be sent; send the next one after it went out
    /// (only one is kept, so a slow link cannot grow a queue, RETRY-4).
    #[error("a custom message is already pending")]
    CustomMessagePending,
    /// The custom message names a capability that was not declared with
    /// `set_custom_capabilities` (CUS-3).
    #[error("custom capability {0:?} was not declared")]
    UndeclaredCustomCapability(String),
    /// The argument breaks a rule of the specification.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A key pair or certificate signing request could not be made (feature `csr`).
    #[error("certificate signing request: {0}")]
    Csr(String),
}

/// A part of the agent's report that alone is over the message size limit, so it can never
/// be sent (WS-12, HTTP-17). The rest of the report went out without it; it is tried again
/// once it changes. Given to [`Callbacks::on_report_too_large`](crate::Callbacks::on_report_too_large).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the report part {part} needs {size} bytes, over the message size limit of {limit}")]
#[non_exhaustive]
pub struct ReportTooLarge {
    /// The `AgentToServer` field, e.g. `effective_config`.
    pub part: &'static str,
    /// The size of a message carrying only this part, framing byte included.
    pub size: usize,
    /// The message size limit.
    pub limit: usize,
}

#[cfg(feature = "tokio")]
/// Why [`OpampClient::start`](crate::OpampClient::start) refused its settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The endpoint is not a valid absolute URL.
    #[error("invalid endpoint URL: {0}")]
    InvalidEndpoint(String),
    /// The endpoint scheme is not `ws`, `wss`, `http` or `https` (GEN-4).
    #[error("unsupported endpoint scheme {0:?} (use ws, wss, http or https)")]
    UnsupportedScheme(String),
    /// A static header name or value is not valid HTTP.
    #[error("invalid header {0:?}")]
    InvalidHeader(String),
    /// The TLS settings could not be turned into a rustls configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The endpoint's scheme (`wss` or `https`) needs TLS, and this build of opamp-client has
    /// no `tls` feature.
    #[error("the {0} scheme needs TLS: enable the `tls` feature of opamp-client")]
    TlsDisabled(String),
    /// A setting is out of range.
    #[error("invalid settings: {0}")]
    InvalidSettings(&'static str),
    /// `start` was called outside a tokio runtime.
    #[error("OpampClient::start must be called within a tokio runtime")]
    NoRuntime,
}

#[cfg(feature = "tokio")]
/// Why a connection attempt or an exchange with the server failed. Given to
/// [`Callbacks::on_connect_failed`](crate::Callbacks::on_connect_failed); the client retries
/// on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A socket operation failed (DNS, TCP, read, write).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed or the server name is not valid.
    #[error("TLS error: {0}")]
    Tls(String),
    /// The connection, a request or the WebSocket handshake took too long.
    #[error("timed out")]
    Timeout,
    /// The server answered the request or the WebSocket handshake with an unexpected HTTP
    /// status. `retry_after` is its `Retry-After` header, if any (THR-5).
    #[error("HTTP status {status}")]
    Status {
        /// The status code.
        status: http::StatusCode,
        /// The parsed `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// A WebSocket protocol error.
    #[error("WebSocket error: {0}")]
    WebSocket(#[source] ProtocolError),
    /// An HTTP protocol error.
    #[error("HTTP error: {0}")]
    Http(#[source] ProtocolError),
    /// A message from the server was over the receive limit and was not processed (WS-10,
    /// HTTP-15).
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
    /// A message from the server was malformed (ERR-5).
    #[error("malformed message from the server: {0}")]
    Decode(#[from] DecodeError),
    /// The response body could not be decompressed.
    #[error("bad gzip response body: {0}")]
    Gzip(String),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
}

/// An error of the HTTP or WebSocket implementation under the client (hyper,
/// tungstenite), kept opaque so that the public API does not depend on those crates or
/// their versions. Its [`source`](std::error::Error::source) is the original error, for
/// logging or downcasting.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct ProtocolError(Box<dyn std::error::Error + Send + Sync + 'static>);

#[cfg(feature = "tokio")]
impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(feature = "tokio")]
impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

#[cfg(feature = "tokio")]
impl ConnectError {
    /// Whether this is a throttling answer (HTTP 429 or 503, THR-5), and its retry time.
    pub(crate) fn throttling(&self) -> Option<Option<Duration>> {
        match self {
            ConnectError::Status {
                status,
                retry_after,
            } if *status == http::StatusCode::TOO_MANY_REQUESTS
                || *status == http::StatusCode::SERVICE_UNAVAILABLE =>
            {
                Some(*retry_after)
            }
            _ => None,
        }
    }
}

#[cfg(feature = "tokio")]
impl From<tokio_tungstenite::tungstenite::Error> for ConnectError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        ConnectError::WebSocket(ProtocolError(Box::new(e)))
    }
}

#[cfg(feature = "tokio")]
impl From<hyper::Error> for ConnectError {
    fn from(e: hyper::Error) -> Self {
        ConnectError::Http(ProtocolError(Box::new(e)))
    }
}

#[cfg(feature = "tokio")]
/// Why [`OpampClient::stop`](crate::OpampClient::stop) did not finish cleanly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StopError {
    /// The client had already been stopped.
    #[error("the client was already stopped")]
    AlreadyStopped,
    /// The disconnect did not finish within the stop timeout; the driver task was aborted
    /// (no further network I/O happens).
    #[error("stop timed out; the connection was dropped without a clean close")]
    Timeout,
}
