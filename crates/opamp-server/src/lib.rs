//! The OpAMP server.
//!
//! This crate is what a control plane embeds to manage a fleet of agents over OpAMP
//! (OpenTelemetry's Open Agent Management Protocol). It sits above `opamp-proto` (messages,
//! framing) and `opamp-transport`:
//!
//! ```text
//! opamp-proto  <-  opamp-transport  <-  opamp-server  <-  opamp (facade)
//! ```
//!
//! It has three layers:
//!
//! - a protocol core free of I/O on quinn-proto's handle/poll contract: [`AgentSession`], one
//!   per agent (sequence numbers and `ReportFullState`, capabilities, uid assignment,
//!   capability gating, offer hashes, held and merged pushes, duplicate uids), and beside it
//!   the plain-HTTP [`SessionTable`] (uid lookup, the session cap and admission, idle
//!   expiry); the clock and randomness come from the driver;
//! - callbacks the application implements, [`ServerCallbacks`] (accept or reject a request)
//!   and [`ConnectionCallbacks`] (per connection: connected, message, close, read error),
//!   async through `async-trait`, taking `&self`, never called concurrently for one
//!   connection; and the [`Connection`] handle to push messages to an agent;
//! - [`packages`]: building package offers with their hashes (and Ed25519 signatures) and
//!   reading package statuses;
//! - [`connection_settings`]: building connection-settings offers with a stable hash and
//!   tracking what each agent reported about them (CS-*, CSS-*);
//! - drivers on tokio and hyper: the embeddable [`OpampService`] (a `tower::Service`, e.g.
//!   for an axum router) and the standalone [`Server`] (feature `tokio`, on by default; see
//!   [Features](#features)).
//!
//! Both transports share one endpoint (HTTP-2): a `POST` with
//! `Content-Type: application/x-protobuf` is plain HTTP, anything else a WebSocket upgrade.
//!
//! # Quick start
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use opamp_proto::{AgentToServer, ServerToAgent};
//! use opamp_server::{
//!     Connection, ConnectionCallbacks, ConnectionResponse, Rejection, Server, ServerCallbacks,
//!     ServerConfig,
//! };
//!
//! struct Fleet;
//!
//! #[async_trait]
//! impl ServerCallbacks for Fleet {
//!     async fn on_connecting(&self, request: &http::request::Parts) -> ConnectionResponse {
//!         match request.headers.get("authorization") {
//!             Some(v) if v == "Bearer secret" => ConnectionResponse::accept(Arc::new(Agents)),
//!             _ => ConnectionResponse::Reject(Rejection::unauthorized()),
//!         }
//!     }
//! }
//!
//! struct Agents;
//!
//! #[async_trait]
//! impl ConnectionCallbacks for Agents {
//!     async fn on_message(&self, conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
//!         println!("{:?} sent #{}", conn.instance_uid(), msg.sequence_num);
//!         None // an acknowledgement still goes out
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::bind(ServerConfig::default(), Arc::new(Fleet)).await?;
//! println!("listening on {}", server.local_addr());
//! // ... later:
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The configuration is split the tonic way: [`ServerConfig`] holds the protocol limits and
//! transport settings, everything the embeddable [`OpampService`] uses; where the standalone
//! server listens, its path, TLS and a tower layer around the service are the
//! [`ServerBuilder`]'s (`Server::builder().listen(addr).path("/opamp").layer(l).bind(cb)`).
//!
//! To share an axum router's listener instead, mount the service at any path:
//! `Router::new().route_service("/opamp", OpampService::new(config, callbacks))`. For
//! [`Connection::remote_addr`] to be known there, serve the router with
//! `into_make_service_with_connect_info::<SocketAddr>()` and tell the service where axum
//! keeps the address, [`ServerConfigBuilder::remote_addr_from`]; or insert the
//! `SocketAddr` into the request extensions from a layer of your own.
//!
//! # Memory and backpressure
//!
//! A WebSocket connection is one task that both reads and writes (the single writer), with a
//! 2 KiB read buffer and a bounded outbound queue (16 messages by default):
//! [`Connection::send`] fails with [`SendError::QueueFull`] instead of buffering without
//! bound, and [`Connection::send_async`] waits for room. Plain-HTTP pushes coalesce into one
//! pending message per agent. Incoming messages are limited to 64 MiB by default (WS-9
//! closes with 1009; HTTP-14 answers 413, measured after decompression). An idle WebSocket
//! agent costs about 7 KiB of server memory (BENCHMARKS.md).
//!
//! Messages larger than 8 KiB go out as several WebSocket frames of one message, so that no
//! connection keeps a write buffer as large as the largest config it was ever sent. To push
//! one message to many agents, build a [`SharedMessage`] once and call
//! [`Connection::send_shared`] for each: the message is encoded once and every agent gets
//! the same bytes behind its own instance uid and capabilities.
//!
//! # Liveness and resource limits
//!
//! [`ConnectionLimits`] (in [`ServerConfig::limits`]) bounds what a dead or hostile peer can
//! hold, with defaults that suit a real fleet:
//!
//! | rule | default | on breach |
//! | --- | --- | --- |
//! | WebSocket read-idle timeout: 3 x the agent's heartbeat interval (offered, else 30 s), at least 30 s (HB-7) | 90 s | Close 1001 |
//! | WebSocket Ping after 30 s of silence to agents without heartbeats (after 60 s to heartbeating ones) | on | no Pong in 90 s: Close 1001 |
//! | plain-HTTP session expiry: `http_idle_timeout`, or 3 offered polling intervals if longer (HB-5) | 120 s | session ends |
//! | first message after the upgrade / first request head (slow-loris), TLS handshake included | 15 s | Close 1008 / dropped |
//! | pace of a message or body in progress: 256 KiB/s on average after a 10 s grace | on | Close 1008 / 408 |
//! | bytes of all incomplete messages and bodies (messages up to 64 KiB may use 25 % more) | 256 MiB | Close 1013 / 503 + `Retry-After` |
//! | open TCP connections of the standalone server ([`ServerBuilder::max_connections`]); the oldest silent ones are shed first | fd soft limit - 64 | Close 1013 / dropped |
//!
//! # Cancel safety
//!
//! [`Connection::send_async`]: dropping the future leaves the message unsent. The drivers
//! never cancel a callback halfway, not even at shutdown.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `tokio` | on | the drivers on tokio and hyper: [`Server`], [`OpampService`], [`Connection`], the callback traits ([`ServerCallbacks`], [`ConnectionCallbacks`]) and their types |
//! | `tls` | on | TLS and mTLS for the standalone server with rustls (ring): [`ServerBuilder::tls`], [`Connection::peer_certificates`], and `opamp_transport::tls` to build the configuration; implies `tokio` |
//!
//! With `default-features = false` the crate is the sans-IO core ([`AgentSession`],
//! [`SessionConfig`], [`Received`], [`Transmit`], [`SharedMessage`], [`DuplicateUidPolicy`],
//! [`PushPlan`], the plain-HTTP [`SessionTable`], the duplicate-uid [`UidRegistry`],
//! [`reassign_reply`],
//! [`is_usable_instance_uid`]), the configuration types ([`ServerConfig`],
//! [`ConnectionLimits`] and the defaults), [`packages`], [`connection_settings`], [`ReadMessageError`],
//! [`ConfigError`] and the reply helpers [`bad_request`] and [`unavailable`], for a driver on
//! another runtime; neither tokio, hyper, tungstenite, rustls nor ring is built. With `tokio` but not `tls`, the server speaks
//! `ws://` and `http://`; an embedder may still terminate TLS in front of [`OpampService`].

#![cfg_attr(docsrs, feature(doc_cfg))]

mod admission;
mod callbacks;
mod config;
#[cfg(feature = "tokio")]
mod connection;
pub mod connection_settings;
mod core;
#[cfg(feature = "csr")]
pub mod csr;
mod error;
#[cfg(feature = "tokio")]
mod limits;
pub mod packages;
#[cfg(feature = "tokio")]
mod plain;
#[cfg(feature = "tokio")]
mod registry;
#[cfg(feature = "tokio")]
mod server;
#[cfg(feature = "tokio")]
mod service;
#[cfg(feature = "tokio")]
mod wire;
#[cfg(feature = "tokio")]
mod ws;

#[cfg(feature = "tokio")]
pub use callbacks::{
    ConnectionCallbacks, ConnectionResponse, DuplicateUid, Rejection, ServerCallbacks,
};
pub use callbacks::{bad_request, unavailable};
pub use config::{
    BUDGET_EXEMPT_MESSAGE_SIZE, ConnectionLimits, DEFAULT_AGENT_HEARTBEAT_INTERVAL,
    DEFAULT_FIRST_MESSAGE_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_FACTOR, DEFAULT_IDLE_TIMEOUT_FLOOR,
    DEFAULT_LISTEN_ADDR, DEFAULT_MAX_INCOMPLETE_BYTES, DEFAULT_MIN_READ_RATE, DEFAULT_READ_GRACE,
    DEFAULT_SERVER_PATH, DEFAULT_WS_PING_INTERVAL, FD_RESERVE,
};
pub use config::{
    DEFAULT_FULL_STATE_MIN_INTERVAL, DEFAULT_HTTP_BODY_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT,
    DEFAULT_HTTP_NEW_SESSION_BURST, DEFAULT_HTTP_NEW_SESSION_RATE, DEFAULT_MAX_HTTP_SESSIONS,
    DEFAULT_OUTBOUND_QUEUE_CAPACITY, DEFAULT_SERVER_CAPABILITIES, DEFAULT_WRITE_TIMEOUT,
    DEFAULT_WS_READ_BUFFER_SIZE, DEFAULT_WS_WRITE_FRAGMENT_SIZE, MAX_TIMEOUT, RemoteAddrFn,
    ServerConfig, ServerConfigBuilder,
};
#[cfg(feature = "tokio")]
pub use connection::Connection;
#[cfg(feature = "tls")]
pub use connection::PeerCertificates;
pub use core::{
    AgentSession, Claim, DuplicateUidPolicy, EndReason, PushPlan, Received, Refusal, Resolution,
    Rival, SessionConfig, SessionTable, SharedMessage, TableConfig, TableEvent, Transmit,
    Transport, UidHolder, UidRegistry, is_usable_instance_uid, reassign_reply,
};
pub use error::{ConfigError, ReadMessageError};
#[cfg(feature = "tokio")]
pub use error::{SendError, ServerError};
#[cfg(feature = "tokio")]
pub use server::{Server, ServerBuilder, ServerHandle};

/// The attribute that implements the async callback traits.
#[cfg(feature = "tokio")]
pub use async_trait::async_trait;
/// The `http` crate, whose request parts [`ServerCallbacks::on_connecting`] receives.
pub use http;
#[cfg(feature = "tokio")]
pub use service::{Broadcast, OpampService, ResponseBody};

#[cfg(all(test, feature = "tokio"))]
mod tests_support {
    use async_trait::async_trait;

    use crate::{ConnectionResponse, Rejection, ServerCallbacks};

    /// Rejects everything.
    pub(crate) struct Reject;

    #[async_trait]
    impl ServerCallbacks for Reject {
        async fn on_connecting(&self, _: &http::request::Parts) -> ConnectionResponse {
            ConnectionResponse::Reject(Rejection::unauthorized())
        }
    }
}
