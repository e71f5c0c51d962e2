//! OpAMP protocol messages for Rust.
//!
//! This crate is the bottom layer of the `opamp` workspace:
//!
//! ```text
//! opamp-proto  <-  opamp-transport  <-  opamp-client / opamp-server  <-  opamp (facade)
//! ```
//!
//! It knows messages and nothing about sockets. It holds:
//!
//! - every message and enum of the OpAMP specification **v0.20.0** (`opamp.proto` and
//!   `anyvalue.proto`, package `opamp.proto.v1`) as [prost] types, in [`v1`] and re-exported at
//!   the crate root. The Rust code is generated from our own `.proto` files and checked in, so
//!   building needs no `protoc`; a test regenerates it and fails on any drift.
//! - typed helpers: [`InstanceUid`] (16 bytes, UUID v7, the `OpAMP-Instance-UID` header form),
//!   bit sets for capabilities and flags ([`AgentCapabilitySet`], [`ServerCapabilitySet`],
//!   [`AgentToServerFlagSet`], [`ServerToAgentFlagSet`]),
//! - the WebSocket message framing of the spec ([`framing`]: a varint header of 0, then the
//!   protobuf payload) with the default size limit [`DEFAULT_MAX_MESSAGE_SIZE`].
//!
//! # Generated types
//!
//! - Maps are [`BTreeMap`](std::collections::BTreeMap)s, so encoding is deterministic: the same
//!   message always encodes to the same bytes, and hashes computed over maps do not depend on
//!   iteration order.
//! - `bytes` fields are [`Bytes`](bytes::Bytes): decoding from a `Bytes` buffer does not copy
//!   payloads, and one config body can be shared by many messages without copying.
//! - Enum-typed fields are `i32` (prost's convention, so unknown values from newer peers are
//!   kept); use the generated `field()` / `set_field()` accessors for the typed view.
//!
//! # Secrets in `Debug` output
//!
//! Messages end up in logs. The `Debug` output of these types never prints their payloads:
//! [`AgentConfigObject::body`], [`CustomMessage::data`] and [`TlsCertificate::private_key`] are
//! shown as their length only, and the value of a [`Header`] named `Authorization`,
//! `Proxy-Authorization` or `Cookie` (any case) is shown as `<redacted>`. Everything else prints
//! as prost's derived `Debug` would.
//!
//! # Example
//!
//! ```
//! use opamp_proto::{AgentCapabilitySet, AgentToServer, InstanceUid, Message, framing};
//!
//! let uid = InstanceUid::new_v7();
//! let report = AgentToServer {
//!     instance_uid: uid.to_bytes(),
//!     sequence_num: 1,
//!     capabilities: (AgentCapabilitySet::REPORTS_STATUS
//!         | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG)
//!         .bits(),
//!     ..Default::default()
//! };
//!
//! // A WebSocket message is a zero varint header followed by the encoded message (WS-2, WS-3).
//! let frame = framing::encode(&report);
//! assert_eq!(frame[0], 0x00);
//! let back: AgentToServer =
//!     framing::decode(&frame, opamp_proto::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
//! assert_eq!(back, report);
//! assert_eq!(InstanceUid::try_from(&back.instance_uid[..]).unwrap(), uid);
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

mod caps;
pub mod elements;
mod ext;
pub mod framing;
mod redact;
mod uid;

/// The generated OpAMP messages, package `opamp.proto.v1`.
///
/// Everything here is also re-exported at the crate root.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
pub mod v1 {
    include!("generated/opamp.proto.v1.rs");
}

pub use caps::{
    AgentCapabilitySet, AgentToServerFlagSet, ServerCapabilitySet, ServerToAgentFlagSet,
};
pub use elements::DEFAULT_MAX_MESSAGE_ELEMENTS;
pub use framing::{DEFAULT_MAX_MESSAGE_SIZE, DecodeError};
pub use uid::{InstanceUid, InvalidInstanceUid};
pub use v1::*;

/// Re-exported so that users can call `encode`/`decode` without adding `prost` themselves.
pub use prost::Message;

/// The default OpAMP TCP port (GEN-3).
pub const DEFAULT_PORT: u16 = 4320;

/// The default URL path of the OpAMP endpoint, for both transports (GEN-2).
pub const DEFAULT_PATH: &str = "/v1/opamp";

/// The HTTP header that carries the agent's instance uid in canonical UUID form (HTTP-5).
pub const INSTANCE_UID_HEADER: &str = "OpAMP-Instance-UID";

/// The content type of plain-HTTP OpAMP bodies (HTTP-2).
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";
