//! Error types, one per domain.
//!
//! The `Display` text of these errors is for humans and logs; it is not API.

#[cfg(feature = "tokio")]
use std::io;
#[cfg(feature = "tokio")]
use std::net::SocketAddr;
use std::time::Duration;

#[cfg(feature = "tokio")]
use opamp_proto::ServerToAgent;
use opamp_proto::{DecodeError, InvalidInstanceUid};

/// A [`ServerConfig`](crate::ServerConfig) value is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The path does not start with `/`.
    #[error("path {0:?} must start with '/'")]
    InvalidPath(String),
    /// A size, capacity or duration that must be non-zero is zero.
    #[error("{0} must be non-zero")]
    Zero(&'static str),
    /// The WebSocket read buffer is below the 64-byte minimum.
    #[error("WebSocket read buffer of {0} bytes is below the 64-byte minimum")]
    ReadBufferTooSmall(usize),

    /// The WebSocket write fragment size is below the 64-byte minimum.
    #[error("WebSocket write fragment size of {0} bytes is below the 64-byte minimum")]
    FragmentTooSmall(usize),
    /// A timeout is longer than [`MAX_TIMEOUT`](crate::MAX_TIMEOUT) (one day): deadlines
    /// are `Instant + timeout`, which overflows for values like `Duration::MAX`.
    #[error("{name} must be at most {max:?}")]
    TooLong {
        /// The setting's name.
        name: &'static str,
        /// The largest accepted value.
        max: Duration,
    },
}

#[cfg(feature = "tokio")]
/// The standalone server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding the listening socket failed.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address that was to be bound.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Reading the bound address back failed.
    #[error("cannot read the listener's local address")]
    LocalAddr(#[source] io::Error),
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

#[cfg(feature = "tokio")]
/// [`Connection::send`](crate::Connection::send) did not take the message; the message is
/// handed back.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The WebSocket connection's outbound queue is full: the agent reads slower than the
    /// server sends. Retry later, coalesce, or use
    /// [`send_async`](crate::Connection::send_async) to wait for room.
    #[error("outbound queue is full")]
    QueueFull(Box<ServerToAgent>),
    /// The connection (or plain-HTTP session) is closed.
    #[error("connection is closed")]
    Closed(Box<ServerToAgent>),
}

#[cfg(feature = "tokio")]
impl SendError {
    /// The message that was not sent.
    pub fn into_message(self) -> ServerToAgent {
        match self {
            Self::QueueFull(m) | Self::Closed(m) => *m,
        }
    }
}

/// Why an incoming message could not be read; passed to
/// [`ConnectionCallbacks::on_read_message_error`](crate::ConnectionCallbacks::on_read_message_error).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadMessageError {
    /// The message is not a valid framed `AgentToServer`: non-zero or truncated header
    /// (WS-4), undecodable protobuf, or over the size limit (WS-9, HTTP-14).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A WebSocket text frame arrived; OpAMP uses binary messages only (WS-1, WS-7).
    #[error("text WebSocket frames are not OpAMP messages")]
    TextFrame,
    /// `instance_uid` is not 16 bytes (UID-2).
    #[error("invalid instance_uid")]
    InstanceUid(#[from] InvalidInstanceUid),
    /// A plain-HTTP body claims `Content-Encoding: gzip` but is not valid gzip (HTTP-3).
    #[error("invalid gzip body")]
    Gzip,
    /// A plain-HTTP request's `OpAMP-Instance-UID` header is not a canonical UUID or differs
    /// from the body's `instance_uid` (HTTP-5 says they are equal). The request was answered
    /// with 400 and reached no session: the header may be what `on_connecting` authorized,
    /// while the body names the session.
    #[error("OpAMP-Instance-UID header does not match instance_uid")]
    InstanceUidHeader,
}
