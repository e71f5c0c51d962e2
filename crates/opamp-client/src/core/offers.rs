//! Connection-settings offers in the core: what was seen (deduplication), the state of each
//! part of the offer being handled, and the status that follows from them (CS-*, CSS-1).

use bytes::Bytes;
use opamp_proto::{
    ConnectionSettingsOffers, ConnectionSettingsStatuses, OpAmpConnectionSettings,
    OtherConnectionSettings, TelemetryConnectionSettings,
};
use std::collections::BTreeMap;
use std::time::Instant;

/// The own-telemetry and other-connection parts of a connection-settings offer that the
/// agent declared capabilities for (CS-1, CAP-2), as handed to the embedder in
/// [`Event::TelemetryConnectionSettings`](super::Event::TelemetryConnectionSettings).
/// An absent part means "keep using the current settings" (CS-3, OWN-3).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct TelemetryConnectionOffer {
    /// Where to send the agent's own metrics (OWN-1, OWN-2); needs `ReportsOwnMetrics`.
    pub own_metrics: Option<TelemetryConnectionSettings>,
    /// Where to send the agent's own traces (OWN-1); needs `ReportsOwnTraces`.
    pub own_traces: Option<TelemetryConnectionSettings>,
    /// Where to send the agent's own logs (OWN-1); needs `ReportsOwnLogs`.
    pub own_logs: Option<TelemetryConnectionSettings>,
    /// Settings of other named connections (OTH-1); needs `AcceptsOtherConnectionSettings`.
    pub other_connections: BTreeMap<String, OtherConnectionSettings>,
}

impl TelemetryConnectionOffer {
    /// Whether the offer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.own_metrics.is_none()
            && self.own_traces.is_none()
            && self.own_logs.is_none()
            && self.other_connections.is_empty()
    }
}

/// What identifies an offer already handled: its hash (CS-2), or for a server that sends
/// none, the offer itself.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Seen {
    Hash(Bytes),
    /// The encoded offer: a copy, so that it keeps no part of the message alive.
    Content(Vec<u8>),
}

impl Seen {
    pub(super) fn of(offers: &ConnectionSettingsOffers) -> Self {
        if offers.hash.is_empty() {
            Seen::Content(opamp_proto::Message::encode_to_vec(offers))
        } else {
            Seen::Hash(Bytes::copy_from_slice(&offers.hash))
        }
    }
}

/// Where one part (the OpAMP connection, or own telemetry and other connections) of the
/// offer being handled stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Part {
    /// The offer has nothing of this part for the agent.
    Absent,
    /// Handed to the embedder; no decision yet.
    Pending,
    /// Accepted; the OpAMP connection is being tried with the candidate (CS-OP-3, CS-OP-4).
    Applying,
    Applied,
    Failed(String),
}

/// The offer being handled.
#[derive(Debug, Clone)]
pub(super) struct Offer {
    pub(super) hash: Bytes,
    pub(super) opamp: Part,
    pub(super) telemetry: Part,
}

impl Offer {
    /// The status that follows from the parts (CSS-1): FAILED if one failed (with its reason),
    /// APPLYING while one is undecided or being tried, APPLIED once all are applied. `None`
    /// when the offer held nothing for the agent.
    pub(super) fn status(&self) -> Option<(ConnectionSettingsStatuses, String)> {
        let parts = [&self.opamp, &self.telemetry];
        if parts.iter().all(|p| **p == Part::Absent) {
            return None;
        }
        if let Some(reason) = parts.iter().find_map(|p| match p {
            Part::Failed(r) => Some(r.clone()),
            _ => None,
        }) {
            return Some((ConnectionSettingsStatuses::Failed, reason));
        }
        if parts
            .iter()
            .any(|p| matches!(p, Part::Pending | Part::Applying))
        {
            return Some((ConnectionSettingsStatuses::Applying, String::new()));
        }
        Some((ConnectionSettingsStatuses::Applied, String::new()))
    }
}

/// The OpAMP connection being tried with candidate settings (CS-OP-2..CS-OP-6).
#[derive(Debug, Clone)]
pub(super) struct Trial {
    pub(super) hash: Bytes,
    pub(super) settings: Box<OpAmpConnectionSettings>,
    /// Past it without an answer from the new server, the candidate has failed.
    pub(super) deadline: Instant,
}

/// Whether accepted OpAMP settings change the connection (and so must be tried by
/// connecting, CS-OP-4), rather than only the heartbeat interval.
pub(super) fn changes_connection(s: &OpAmpConnectionSettings) -> bool {
    !s.destination_endpoint.is_empty()
        || s.headers.is_some()
        || s.certificate.is_some()
        || s.tls.is_some()
        || s.proxy.is_some()
}
