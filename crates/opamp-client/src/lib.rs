//! The OpAMP client an agent embeds.
//!
//! ```text
//! opamp-proto  <-  opamp-transport  <-  opamp-client  <-  opamp (facade)
//! ```
//!
//! It connects to an OpAMP server over WebSocket (`ws://`, `wss://`) or plain HTTP
//! (`http://`, `https://`), reports the agent's status, and hands what the server sends to
//! the embedder's [`Callbacks`]. It never gives up on its server (exponential backoff with
//! jitter, `Retry-After` honoured) and never floods it (one coalesced message per burst of
//! changes, at most one plain-HTTP request in flight, growing delays for servers that keep
//! failing).
//!
//! - [`core`]: the sans-IO protocol core ([`core::ClientCore`]): status compression, sequence
//!   numbers, `ReportFullState`, heartbeat/poll and backoff timers. No sockets, no clock.
//! - [`OpampClient`]: the tokio driver over that core, with [`StartSettings`] and setters
//!   (feature `tokio`, on by default; see [Features](#features)).
//! - [`Callbacks`]: the embedder's hooks (`#[async_trait]`, see `docs/ARCHITECTURE.md`).
//! - [`packages`]: installs the packages the server offers (PKG-*): the sans-IO decisions and
//!   a file-system provider always, the downloading syncer with `tokio`
//!   (`StartSettings::with_packages` wires it into the client).
//!
//! # Quick start
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use opamp_client::{Callbacks, MessageData, OpampClient, StartSettings};
//! use opamp_proto::{AgentCapabilitySet, AgentDescription, AnyValue, KeyValue, any_value};
//!
//! struct Agent;
//!
//! #[async_trait::async_trait]
//! impl Callbacks for Agent {
//!     async fn on_message(&self, data: MessageData) {
//!         if let Some(config) = data.remote_config {
//!             println!("new remote config, hash {:?}", config.config_hash);
//!         }
//!         if let Some(uid) = data.new_instance_uid {
//!             println!("persist the new instance uid {uid}");
//!         }
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = StartSettings::new("wss://opamp.example.com:4320/v1/opamp")
//!     .with_capabilities(
//!         AgentCapabilitySet::REPORTS_STATUS
//!             | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
//!             | AgentCapabilitySet::REPORTS_HEALTH
//!             | AgentCapabilitySet::REPORTS_HEARTBEAT,
//!     )
//!     .with_agent_description(AgentDescription {
//!         identifying_attributes: vec![KeyValue {
//!             key: "service.name".into(),
//!             value: Some(AnyValue {
//!                 value: Some(any_value::Value::StringValue("my-agent".into())),
//!             }),
//!         }],
//!         non_identifying_attributes: vec![],
//!     });
//! let client = OpampClient::start(settings, Arc::new(Agent))?;
//! client.set_health(opamp_proto::ComponentHealth {
//!     healthy: true,
//!     ..Default::default()
//! })?;
//! // ... run the agent ...
//! client.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Behaviour
//!
//! - The first message after connecting carries the full status; later ones only what
//!   changed (REP-1, CMP-1); `sequence_num` goes up by one per message (SEQ-1);
//!   `ReportFullState` makes the client resend everything (SEQ-3).
//! - WebSocket heartbeats every 30 s when `ReportsHeartbeat` is declared, or at the server's
//!   `heartbeat_interval_seconds` (0 switches them off, HB-2). Plain HTTP polls at that
//!   interval, sends at once when something changed, and keeps one request in flight (HTTP-7,
//!   HTTP-10).
//! - Reconnects with [`BackoffPolicy`], honouring `Retry-After` on 429/503 (requests and
//!   WebSocket handshakes) and `ServerErrorResponse` UNAVAILABLE with `retry_info`; a request
//!   answered with BAD_REQUEST, HTTP 400 or 413 is not retried (THR-*, RETRY-3).
//! - A server-assigned instance uid is adopted and reported in
//!   [`MessageData::new_instance_uid`] (UID-7).
//! - An agent with `AcceptsRemoteConfig` reports a `remote_config_status` from its first
//!   message on, UNSET with an empty hash until the embedder sets one (RC-6, as opamp-go).
//! - Connection-settings offers are handled once per hash (CS-2) and applied only once
//!   [`Callbacks::on_opamp_connection_settings`] accepts them (CS-4; a veto is FAILED with the
//!   reason and changes nothing). Accepted settings that change the connection are tried:
//!   APPLYING goes with the goodbye to the current server, the client connects with the
//!   candidate and keeps it only once that server answers (APPLIED,
//!   [`Callbacks::on_opamp_connection_settings_applied`] to persist), else goes back to the
//!   old settings and reports FAILED with the reason (CS-OP-2..CS-OP-6, CSS-1). Own telemetry
//!   and other connections go to [`Callbacks::on_telemetry_connection_settings`], whose answer
//!   is their status (OWN-1, CSS-3).
//! - Once the server's capabilities are known, effective config, package statuses and the
//!   connection-settings status are sent only if it has `AcceptsEffectiveConfig`,
//!   `AcceptsPackagesStatus`, `OffersConnectionSettings` (CAP-4); held-back parts go out when a
//!   server has the capability. Undefined capability and flag bits are never sent (CAP-5).
//! - A report over the size limit is split over several messages; a part that alone is over
//!   it goes to [`Callbacks::on_report_too_large`], never silently (WS-12, HTTP-17).
//! - [`ServerGuards`] bound what a broken or hostile server can cause: WebSocket sessions that
//!   die young do not reset the backoff, full-state reports, remote configs and commands are
//!   rate-limited (configs coalesced to the latest), and a WebSocket server that sends nothing
//!   for two heartbeat intervals after a message is taken for half-open and reconnected to.
//!   Redirects are not followed (a failure with backoff); `Retry-After` is capped at
//!   [`BackoffPolicy::max_retry_after`] (1 hour).
//! - The core keeps nothing of a handled message (hashes are copied), so a large message is
//!   freed once the embedder drops it. Over WebSocket, tungstenite keeps its read buffer at the
//!   size of the largest message received until the connection closes.
//! - Messages are limited to 64 MiB both ways by default (WS-10, WS-12, HTTP-15, HTTP-17);
//!   plain HTTP sends `OpAMP-Instance-UID`, accepts gzip answers and can gzip requests.
//! - [`OpampClient::stop`] sends `agent_disconnect` and closes the WebSocket with a close
//!   frame, bounded by a timeout; it is safe to call from inside a callback. Nothing is sent in
//!   `Drop`.
//!
//! # Cancel safety
//!
//! [`OpampClient::stop`] is the only async method; dropping its future leaves the stop under
//! way. The setters are synchronous and never wait for the network.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `tokio` | on | the driver: [`OpampClient`] over WebSocket (tokio-tungstenite) and plain HTTP (hyper), [`StartSettings`], [`Callbacks`] and their errors |
//! | `tls` | on | `wss://` and `https://` with rustls (ring): custom CAs, client certificates (mTLS), [`StartSettings::with_tls_config`]; implies `tokio` |
//! | `csr` | off | the CSR flow: `OpampClient::request_client_certificate` and `csr::CertificateRequest` (rcgen); implies `tls` |
//!
//! With `default-features = false` the crate is the sans-IO [`core`] with what it needs
//! ([`BackoffPolicy`], [`ServerGuards`], [`MessageData`], [`ClientError`],
//! [`ReportTooLarge`], and of [`packages`] the planning, statuses, verifiers and
//! [`packages::FsProvider`]), for a driver on another runtime or an event loop of its own; neither
//! tokio, hyper, tungstenite, rustls nor ring is built. With `tokio` but not `tls`, `ws://` and
//! `http://` work and a `wss://` or `https://` endpoint is refused by [`OpampClient::start`]
//! ([`StartError::TlsDisabled`]).

mod backoff;
mod callbacks;
#[cfg(feature = "tokio")]
mod client;
pub mod core;
#[cfg(feature = "csr")]
pub mod csr;
mod error;
#[cfg(feature = "tokio")]
mod http;
#[cfg(feature = "tokio")]
mod net;
pub mod packages;
#[cfg(feature = "tokio")]
mod settings;
#[cfg(feature = "tokio")]
mod ws;

/// Re-exported: implementations of [`Callbacks`] use it.
#[cfg(feature = "tokio")]
pub use async_trait::async_trait;
pub use backoff::BackoffPolicy;
pub use callbacks::MessageData;
#[cfg(feature = "tokio")]
pub use callbacks::{Callbacks, SettingsRejected};
#[cfg(feature = "tokio")]
pub use client::OpampClient;
pub use core::ServerGuards;
pub use error::{ClientError, ReportTooLarge};
#[cfg(feature = "tokio")]
pub use error::{ConnectError, ProtocolError, StartError, StopError};
#[cfg(feature = "tokio")]
pub use settings::{HeaderFn, StartSettings};
