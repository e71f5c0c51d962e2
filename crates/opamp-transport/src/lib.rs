//! Wire helpers for OpAMP's two transports, shared by `opamp-client` and `opamp-server`.
//!
//! This crate sits between the messages and the protocol cores:
//!
//! ```text
//! opamp-proto  <-  opamp-transport  <-  opamp-client / opamp-server  <-  opamp
//! ```
//!
//! It moves bytes and knows no protocol state:
//!
//! - [`ws`] (feature `tokio`, on by default): WebSocket settings for tokio-tungstenite with
//!   small buffers and the OpAMP size limit, and the close codes OpAMP uses (WS-9, WS-10).
//! - [`http`]: plain-HTTP header helpers: content type (HTTP-2), gzip negotiation (HTTP-3,
//!   HTTP-4), the `OpAMP-Instance-UID` header (HTTP-5), `Retry-After` (THR-5).
//! - [`gzip`]: compression and **bounded** decompression: a body is measured after
//!   decompression and reading stops at the limit, so a gzip bomb costs at most the limit
//!   (HTTP-14, HTTP-15).
//! - [`tls`] (feature `tls`, on by default): rustls configurations for servers (optionally
//!   requiring client certificates, mTLS) and clients (custom CA or the system's roots, optional
//!   client certificate), built from PEM.
//!
//! The message size limit is [`DEFAULT_MAX_MESSAGE_SIZE`] (64 MiB) unless configured.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `tokio` | on | the [`ws`] module (tokio-tungstenite's `WebSocketConfig` and close codes) |
//! | `tls` | on | the [`tls`] module, with rustls (ring) and the system's root certificates |
//!
//! With `--no-default-features` only [`http`] and [`gzip`] are left, and neither tokio,
//! tungstenite, rustls nor ring is built.

pub mod gzip;
pub mod http;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tokio")]
pub mod ws;

pub use opamp_proto::DEFAULT_MAX_MESSAGE_SIZE;
pub use opamp_proto::framing::MessageTooLarge;
