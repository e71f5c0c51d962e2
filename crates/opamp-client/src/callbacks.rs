//! What an embedder implements: the client's hooks, mirroring opamp-go's client callbacks.

#[cfg(feature = "tokio")]
use async_trait::async_trait;
use opamp_proto::{
    AgentRemoteConfig, CustomCapabilities, CustomMessage, InstanceUid, PackagesAvailable,
    ServerToAgentFlagSet,
};
#[cfg(feature = "tokio")]
use opamp_proto::{
    EffectiveConfig, OpAmpConnectionSettings, ServerErrorResponse, ServerToAgentCommand,
};

#[cfg(feature = "tokio")]
use crate::core::TelemetryConnectionOffer;
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
    /// declared `AcceptsOpAMPConnectionSettings`, and once per offer: a repeat with the same
    /// hash is not handed over again.
    ///
    /// Return `Err` to veto the offer: nothing changes, and with
    /// `ReportsConnectionSettingsStatus` the client reports FAILED with `offer_hash` and the
    /// reason (CSS-1). On `Ok` the client applies it:
    ///
    /// - only `heartbeat_interval_seconds`: applied at once (HB-2, with `ReportsHeartbeat`),
    ///   APPLIED;
    /// - an endpoint, headers, a client certificate or TLS settings: the client builds
    ///   candidate settings from its current ones ([`StartSettings::with_opamp_connection_settings`](crate::StartSettings::with_opamp_connection_settings),
    ///   which says what each field does; settings it cannot use are FAILED at once), reports
    ///   APPLYING, says goodbye to the current server (`agent_disconnect`, CS-OP-3), connects
    ///   with the candidate and switches to it only when the server there answers (CS-OP-4,
    ///   CS-OP-5): then [`on_opamp_connection_settings_applied`](Self::on_opamp_connection_settings_applied)
    ///   is called and APPLIED reported. Otherwise (connection, TLS or authorisation failure,
    ///   an error answer, no answer in time) it goes back to the old settings and reports
    ///   FAILED with the reason (CS-OP-6), and calls
    ///   [`on_opamp_connection_settings_failed`](Self::on_opamp_connection_settings_failed).
    ///
    /// The default accepts.
    async fn on_opamp_connection_settings(
        &self,
        _settings: &OpAmpConnectionSettings,
        _offer_hash: &[u8],
    ) -> Result<(), SettingsRejected> {
        Ok(())
    }

    /// Offered OpAMP connection settings were tried and are now in use (CS-OP-5). Persist
    /// `settings` (e.g. `prost::Message::encode_to_vec`) and `offer_hash`, and on the next
    /// start pass them to [`StartSettings::with_opamp_connection_settings`](crate::StartSettings::with_opamp_connection_settings)
    /// and [`StartSettings::with_connection_settings_status`](crate::StartSettings::with_connection_settings_status)
    /// (APPLIED with that hash), so that a restarted agent uses them and does not apply the
    /// same offer again.
    async fn on_opamp_connection_settings_applied(
        &self,
        _settings: &OpAmpConnectionSettings,
        _offer_hash: &[u8],
    ) {
    }

    /// Offered OpAMP connection settings failed and the client went back to its settings
    /// (CS-OP-6); FAILED with `reason` is reported. For logs and metrics.
    async fn on_opamp_connection_settings_failed(&self, _offer_hash: &[u8], _reason: &str) {}

    /// The server offered settings for the agent's own telemetry (OWN-1: `own_metrics`,
    /// `own_traces`, `own_logs`) or other named connections (OTH-1), the parts the agent
    /// declared capabilities for; an absent part means "keep the current settings" (CS-3).
    /// Called once per offer (CS-2). Apply them and return `Ok` (APPLIED), or `Err` (FAILED
    /// with the reason, CSS-1, CSS-3). The client does not export telemetry itself. The
    /// default refuses: an agent that declares these capabilities implements this.
    async fn on_telemetry_connection_settings(
        &self,
        _settings: &TelemetryConnectionOffer,
        _offer_hash: &[u8],
    ) -> Result<(), SettingsRejected> {
        Err(SettingsRejected::new(
            "own telemetry and other connection settings are not handled by this agent",
        ))
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
/// `AcceptsRemoteConfig`, packages `AcceptsPackages`. Connection settings offers go to their
/// own callbacks ([`Callbacks::on_opamp_connection_settings`],
/// [`Callbacks::on_telemetry_connection_settings`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct MessageData {
    /// A remote configuration offer (RC-3).
    pub remote_config: Option<AgentRemoteConfig>,
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
