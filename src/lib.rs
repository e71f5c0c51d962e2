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
//!
//! # Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `client` | on | [`client`]: the agent side (its sans-IO core [`client::core`] at least) |
//! | `server` | on | [`server`]: the server side (its sans-IO core `AgentSession` at least) |
//! | `tokio` | on | the tokio drivers of the enabled sides (`OpampClient`; `Server`, `OpampService`), and [`transport`]'s `ws` settings |
//! | `tls` | on | TLS with rustls (ring): `wss://`/`https://` and mTLS for the drivers, and [`transport`]'s `tls` module; implies `tokio` |
//! | `csr` | off | certificate signing requests (CSR-*): the client asks the server to sign a certificate for its instance uid, the server's `csr::CertificateAuthority` verifies and signs (rcgen, x509-parser); implies `tls` |
//!
//! Each feature is forwarded to `opamp-transport`, `opamp-client` and `opamp-server`, so one
//! switch here turns it off through the whole stack. For the protocol cores alone, on your
//! own runtime or event loop:
//!
//! ```toml
//! opamp = { version = "0.1", default-features = false, features = ["client", "server"] }
//! ```
//!
//! This builds neither tokio, hyper, tungstenite, rustls nor ring. Without `tls` (but with
//! `tokio`), the drivers speak `ws://` and `http://` only; `wss://` and `https://` endpoints
//! are refused at start, and no rustls or ring is built.

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
