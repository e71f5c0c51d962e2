//! OpAMP, the Open Agent Management Protocol of OpenTelemetry, for Rust.
//!
//! This is the facade crate: add `opamp` as your one dependency. It re-exports
//!
//! - [`proto`]: every OpAMP message (spec v0.20.0) with typed helpers, always;
//! - [`transport`]: wire helpers (WebSocket settings, bounded gzip, TLS configuration), always;
//! - [`client`]: the agent side, with the `client` feature (on by default);
//! - [`server`]: the server side, with the `server` feature (on by default).
//!
//! Each side starts from its crate's quick start: [`server`] (a control plane: accept agents,
//! receive their status, push configs) and [`client`] (an agent: report status, take remote
//! configs). Callback traits are implemented with [`macro@async_trait`].
//!
//! The workspace is layered, each crate with one job, dependencies pointing one way:
//!
//! ```text
//! opamp-proto  <-  opamp-transport  <-  opamp-client / opamp-server  <-  opamp
//! ```

pub use opamp_proto as proto;

/// The attribute for implementing the async callback traits of [`client`] and [`server`]
/// (`#[opamp::async_trait]`); see `docs/ARCHITECTURE.md` for why callbacks use it.
pub use async_trait::async_trait;

/// Wire helpers shared by client and server: WebSocket settings, gzip, headers, TLS.
pub use opamp_transport as transport;

#[cfg(feature = "client")]
pub use opamp_client as client;

#[cfg(feature = "server")]
pub use opamp_server as server;

// The README's code runs as a doctest, so it cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
