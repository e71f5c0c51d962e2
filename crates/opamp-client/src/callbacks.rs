//! What an embedder implements: the client's hooks, mirroring opamp-go's client callbacks.

use std::collections::BTreeMap;

#[cfg(feature = "tokio")]
use async_trait::async_trait;
use bytes::Bytes;
use opamp_proto::{
    AgentRemoteConfig, CustomCapabilities, CustomMessage, InstanceUid, OtherConnectionSettings,
    PackagesAvailable, ServerToAgentFlagSet, TelemetryConnectionSettings,
};
#[cfg(feature = "tokio")]
use opamp_proto::{
    EffectiveConfig, OpAmpConnectionSettings, ServerErrorResponse, ServerToAgentCommand,
};

#[cfg(feature = "tokio")]
use crate::error::{ConnectError, ReportTooLarge};

/// The hooks the client calls. Every method has a default, so an embedder implements only
/// what it uses.
///
/// The client calls them from its driver task, one at a time and never concurrently (see
/// `docs/ARCHITECTURE.md`); a slow callback delays the client's next network step, so hand
/// long work to a task of your own. Calling the client's setters and even
/// [`OpampClient::stop`](crate::OpampClient::stop) from inside a callback is fine: it never
/// deadlocks.
#[cfg(feature = "tokio")]
#[async_trait]
pub trait Callbacks: Send + Sync + 'static {
    /// The client connected: the WebSocket handshake succeeded, or a plain-HTTP request was
    /// answered after none had been (first request, or first after a failure).
    async fn on_connect(&self) {}

    /// A connection attempt or an exchange failed. The client retries with backoff on its own
    /// (GEN-8); this is for logs and metrics.
    async fn on_connect_failed(&self, _error: &ConnectError) {}

    /// The server answered with a `ServerErrorResponse` (ERR-1..ERR-4). The client already
    /// acts on it: it backs off after UNAVAILABLE (THR-2) and does not resend after
    /// BAD_REQUEST or UNKNOWN (RETRY-3).
    async fn on_error(&self, _error: &ServerErrorResponse) {}

    /// The server sent data for the agent. Called only when `data` holds something.
    async fn on_message(&self, _data: MessageData) {}

    /// The server offered new OpAMP connection settings (CS-OP-1), from the offer whose
    /// `ConnectionSettingsOffers.hash` is `offer_hash` (CS-2). Only called when the agent
    /// declared `AcceptsOpAMPConnectionSettings`.
    ///
    /// Nothing of the offer is applied before this returns (CS-4). When it returns `Ok`, the
    /// client applies `heartbeat_interval_seconds` (HB-2, with `ReportsHeartbeat`), and, with
    /// `ReportsConnectionSettingsStatus`, reports APPLIED if that is all the offer holds.
    /// Endpoint, headers, certificates, TLS and proxy settings are the embedder's to verify,
    /// persist, apply and report (CS-OP-2..CS-OP-6), typically by stopping this client and
    /// starting one with the new settings, then calling
    /// [`OpampClient::set_connection_settings_status`](crate::OpampClient::set_connection_settings_status).
    /// Return `Err` to reject the offer: nothing is applied, and with
    /// `ReportsConnectionSettingsStatus` the client reports FAILED with `offer_hash` and the
    /// reason (CSS-1). The default accepts.
    async fn on_opamp_connection_settings(
        &self,
        _settings: &OpAmpConnectionSettings,
        _offer_hash: &[u8],
    ) -> Result<(), SettingsRejected> {
        Ok(())
    }

    /// The server sent a command (CMD-1). Only called when the agent declared
    /// `AcceptsRestartCommand`; the rest of that message is ignored (S2A-2).
    async fn on_command(&self, _command: &ServerToAgentCommand) {}

    /// A part of the agent's report is over the message size limit on its own and was not
    /// sent (WS-12, HTTP-17); the rest of the report went out. The part is tried again once
    /// it changes: make it smaller (e.g. a smaller effective config) or raise the limit.
    async fn on_report_too_large(&self, _error: &ReportTooLarge) {}

    /// The agent's current effective configuration (EFF-1). Called before the first report
    /// and after each [`OpampClient::update_effective_config`](crate::OpampClient::update_effective_config),
    /// when the agent declared `ReportsEffectiveConfig`. `None` keeps the last value.
    async fn get_effective_config(&self) -> Option<EffectiveConfig> {
        None
    }
}

/// The embedder's refusal of a connection-settings offer (CS-4).
#[cfg(feature = "tokio")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection settings rejected: {reason}")]
pub struct SettingsRejected {
    /// Why, for logs.
    pub reason: String,
}

#[cfg(feature = "tokio")]
impl SettingsRejected {
    /// A rejection with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// What a `ServerToAgent` carried for the agent, as given to [`Callbacks::on_message`].
///
/// Parts the agent has no capability for are left out (CAP-2): remote config needs
/// `AcceptsRemoteConfig`, packages `AcceptsPackages`, own telemetry `ReportsOwn*`, other
/// connections `AcceptsOtherConnectionSettings`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct MessageData {
    /// A remote configuration offer (RC-3).
    pub remote_config: Option<AgentRemoteConfig>,
    /// Where to send the agent's own metrics (OWN-1).
    pub own_metrics: Option<TelemetryConnectionSettings>,
    /// Where to send the agent's own traces (OWN-1).
    pub own_traces: Option<TelemetryConnectionSettings>,
    /// Where to send the agent's own logs (OWN-1).
    pub own_logs: Option<TelemetryConnectionSettings>,
    /// Settings for other named connections (OTH-1).
    pub other_connections: BTreeMap<String, OtherConnectionSettings>,
    /// `ConnectionSettingsOffers.hash` of the offer these settings came from (CS-2), to echo
    /// in a connection settings status (CSS-1). Empty if the message had no offer.
    pub connection_settings_hash: Bytes,
    /// Packages the server offers (PKG-*).
    pub packages_available: Option<PackagesAvailable>,
    /// The server assigned the agent a new instance uid (UID-7). The client already uses it
    /// for every later message; persist it so the agent keeps it across restarts (UID-3).
    pub new_instance_uid: Option<InstanceUid>,
    /// The custom capabilities the server supports (CUS-1).
    pub custom_capabilities: Option<CustomCapabilities>,
    /// A custom message from the server (CUS-5).
    pub custom_message: Option<CustomMessage>,
    /// The flags of the message. The client already acts on `ReportFullState` and
    /// `ReportAvailableComponents`.
    pub flags: ServerToAgentFlagSet,
}

impl MessageData {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
