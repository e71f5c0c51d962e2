//! The sans-IO client protocol core, shared by the WebSocket and plain-HTTP drivers.
//!
//! [`ClientCore`] holds the agent's status, what the server has been told, the sequence number,
//! the server's capabilities, the heartbeat interval and the reconnect backoff. It has no
//! sockets, no tasks and no clock: every input takes `now`, and outputs come out of `poll_*`
//! methods, as in quinn-proto.
//!
//! # Calling contract
//!
//! A driver loops:
//!
//! 0. call [`handle_timeout`](ClientCore::handle_timeout) with the current time (it detects a
//!    silent WebSocket server and releases deferred remote configs and full-state reports);
//! 1. feed inputs: [`handle_connected`](ClientCore::handle_connected) /
//!    [`handle_connect_failure`](ClientCore::handle_connect_failure) /
//!    [`handle_disconnected`](ClientCore::handle_disconnected) for the link,
//!    [`handle_message`](ClientCore::handle_message) for every `ServerToAgent` (and
//!    [`handle_activity`](ClientCore::handle_activity) whenever bytes arrived over WebSocket),
//!    [`handle_request_rejected`](ClientCore::handle_request_rejected) for a plain-HTTP request
//!    the server refused (413, 400), and the `set_*` methods for the agent's status;
//! 2. act on [`poll_driver_action`](ClientCore::poll_driver_action) (WebSocket: reconnect or
//!    drop the connection), and drain [`poll_event`](ClientCore::poll_event), handing each
//!    event to the application (an OpAMP
//!    connection-settings offer is answered with
//!    [`accept_opamp_connection_settings`](ClientCore::accept_opamp_connection_settings) or
//!    [`reject_opamp_connection_settings`](ClientCore::reject_opamp_connection_settings),
//!    own-telemetry and other-connection settings with
//!    [`accept_telemetry_connection_settings`](ClientCore::accept_telemetry_connection_settings)
//!    or [`reject_telemetry_connection_settings`](ClientCore::reject_telemetry_connection_settings));
//! 3. call [`poll_transmit`](ClientCore::poll_transmit) until it returns `None` and send each
//!    message (over plain HTTP it returns at most one until the answer came in, HTTP-10);
//! 4. sleep until [`poll_timeout`](ClientCore::poll_timeout) (or until the next input) and, for
//!    WebSocket, connect when [`connect_at`](ClientCore::connect_at) has passed.
//!
//! # Connection settings offers
//!
//! An offer (`ServerToAgent.connection_settings`) is handled once: a repeat with the same
//! hash (CS-2) raises nothing. Its parts go to the embedder for a decision (CS-4): the OpAMP
//! part as [`Event::OpampConnectionSettings`], own telemetry and other connections as
//! [`Event::TelemetryConnectionSettings`]; a rejected part changes nothing. Accepted OpAMP
//! settings that change the connection (endpoint, headers, certificate, TLS, proxy) are tried
//! (CS-OP-2..CS-OP-6): the core reports APPLYING and asks the driver to switch
//! ([`DriverAction::SwitchConnection`]); while
//! [`is_trying_connection_settings`](ClientCore::is_trying_connection_settings) holds, the
//! driver connects with the candidate settings. The first proper answer from that server
//! makes them the driver's settings ([`Event::OpampConnectionSettingsApplied`], APPLIED);
//! a failed connection, an error answer, a refused request or no answer within
//! [`CoreConfig::connection_settings_timeout`] rolls back to the old settings at once
//! ([`Event::OpampConnectionSettingsFailed`], FAILED with the reason). The status reported
//! (CSS-1) follows from all parts: FAILED if one failed, APPLYING while one is undecided or
//! tried, APPLIED once all are applied. Offers that come while one is tried are ignored (the
//! server sends them again, CSS-2).
//!
//! Setters only mark state dirty; everything dirty goes out in the next message, so a burst
//! of setter calls becomes one message (RETRY-4).
//!
//! # Bounds on the server
//!
//! A broken or hostile server cannot make the core loop ([`ServerGuards`]): a WebSocket
//! session that dies young does not reset the backoff, full-state reports, remote configs
//! and commands are rate-limited, and a server that stops answering is detected and
//! reconnected to. Nothing queued is dropped silently: a report over the size limit is split,
//! and a part that can never fit is surfaced as [`Event::ReportTooLarge`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opamp_proto::{
    AgentCapabilitySet, AgentDescription, AgentDisconnect, AgentRemoteConfig, AgentToServer,
    AgentToServerFlagSet, AvailableComponents, ComponentHealth, ConnectionSettingsOffers,
    ConnectionSettingsRequest, ConnectionSettingsStatus, ConnectionSettingsStatuses,
    CustomCapabilities, CustomMessage, EffectiveConfig, InstanceUid, Message,
    OpAmpConnectionSettings, PackageStatuses, RemoteConfigStatus, RemoteConfigStatuses,
    ServerCapabilitySet, ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
    ServerToAgentCommand, ServerToAgentFlagSet, server_error_response,
};

mod offers;
pub use offers::TelemetryConnectionOffer;
use offers::{Offer, Part, Seen, Trial};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::callbacks::MessageData;
use crate::error::{ClientError, ReportTooLarge};

/// The default heartbeat and plain-HTTP polling interval: 30 s (WS-14, HTTP-7, HB-3).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Which transport the core drives; chosen from the endpoint's URL scheme (GEN-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportKind {
    /// `ws://` or `wss://`: full duplex, heartbeats when `ReportsHeartbeat` is declared.
    WebSocket,
    /// `http://` or `https://`: request/response, polling, one request in flight (HTTP-10).
    Http,
}

/// The fixed inputs of a [`ClientCore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoreConfig {
    /// The agent's instance uid (UID-1..UID-4).
    pub instance_uid: InstanceUid,
    /// The agent's capabilities. `ReportsStatus` is always added (CAP-1).
    pub capabilities: AgentCapabilitySet,
    /// The transport.
    pub transport: TransportKind,
    /// The local heartbeat / polling interval until the server offers one (HB-3). Default 30 s.
    pub heartbeat_interval: Duration,
    /// The reconnect backoff.
    pub backoff: BackoffPolicy,
    /// The largest `AgentToServer` the core emits, framing byte included (WS-12, HTTP-17).
    pub max_message_size: usize,
    /// Seed of the jitter source; `None` seeds from the OS. Tests set it for determinism.
    pub jitter_seed: Option<u64>,
    /// Bounds on what a broken or hostile server can make the client do.
    pub guards: ServerGuards,
    /// How long offered OpAMP connection settings are tried before they count as failed:
    /// from the offer's acceptance until the server at the new settings answers
    /// (CS-OP-4..CS-OP-6). Default 30 s.
    pub connection_settings_timeout: Duration,
}

/// Bounds on what a broken or hostile server can make the client do: reconnect storms,
/// report and config loops, command floods, half-open connections.
///
/// | guard | default |
/// |---|---|
/// | [`min_session`](Self::min_session): a WebSocket session shorter than this does not reset the backoff | 10 s |
/// | [`full_state_min_interval`](Self::full_state_min_interval): server-requested full reports at most this often | 5 s |
/// | [`remote_config_min_interval`](Self::remote_config_min_interval): remote configs handed over at most this often (the latest wins) | 1 s |
/// | [`command_min_interval`](Self::command_min_interval): commands delivered at most this often (repeats dropped) | 10 s |
/// | [`connection_settings_min_interval`](Self::connection_settings_min_interval): connection settings offers handled at most this often (the latest wins) | 5 s |
/// | [`reply_timeout_factor`](Self::reply_timeout_factor): a WebSocket server silent for this many heartbeat intervals after a message is dropped | 2 |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerGuards {
    /// A WebSocket session that ends before it lasted this long does not reset the reconnect
    /// backoff, even when the server answered on it (GEN-8, WS-18): a server that accepts,
    /// answers and closes every connection sees growing delays. Default 10 s.
    pub min_session: Duration,
    /// The shortest time between two full-state reports the server asks for with
    /// `ReportFullState` (SEQ-3); a request within it is deferred to the end of the interval
    /// and coalesced with any others. Reports the protocol needs anyway (first message,
    /// reconnect) are not limited. Default 5 s.
    pub full_state_min_interval: Duration,
    /// The shortest time between two remote configs handed to the embedder (RC-3); configs
    /// that arrive within it are deferred and only the latest is handed over at the end of
    /// the interval. Default 1 s.
    pub remote_config_min_interval: Duration,
    /// The shortest time between two commands handed to the embedder (CMD-1); a command within
    /// it is dropped (and logged). Default 10 s.
    pub command_min_interval: Duration,
    /// The shortest time between two connection-settings offers handed to the embedder
    /// (CS-4); offers that arrive within it are deferred and only the latest is handled at
    /// the end of the interval. A server offering a new unusable endpoint in every answer
    /// makes the agent try one at most this often, not in a loop. Default 5 s.
    pub connection_settings_min_interval: Duration,
    /// WebSocket: when the server has not sent anything for this many heartbeat intervals
    /// (the local one when heartbeats are off) since a message that it must answer (REP-4),
    /// the connection is taken for half-open and dropped, and the client reconnects with
    /// backoff. 0 switches the check off. Default 2.
    pub reply_timeout_factor: u32,
}

impl Default for ServerGuards {
    fn default() -> Self {
        Self {
            min_session: Duration::from_secs(10),
            full_state_min_interval: Duration::from_secs(5),
            remote_config_min_interval: Duration::from_secs(1),
            command_min_interval: Duration::from_secs(10),
            connection_settings_min_interval: Duration::from_secs(5),
            reply_timeout_factor: 2,
        }
    }
}

impl ServerGuards {
    /// Sets [`min_session`](Self::min_session).
    pub fn with_min_session(mut self, d: Duration) -> Self {
        self.min_session = d;
        self
    }

    /// Sets [`full_state_min_interval`](Self::full_state_min_interval).
    pub fn with_full_state_min_interval(mut self, d: Duration) -> Self {
        self.full_state_min_interval = d;
        self
    }

    /// Sets [`remote_config_min_interval`](Self::remote_config_min_interval).
    pub fn with_remote_config_min_interval(mut self, d: Duration) -> Self {
        self.remote_config_min_interval = d;
        self
    }

    /// Sets [`command_min_interval`](Self::command_min_interval).
    pub fn with_command_min_interval(mut self, d: Duration) -> Self {
        self.command_min_interval = d;
        self
    }

    /// Sets [`connection_settings_min_interval`](Self::connection_settings_min_interval).
    pub fn with_connection_settings_min_interval(mut self, d: Duration) -> Self {
        self.connection_settings_min_interval = d;
        self
    }

    /// Sets [`reply_timeout_factor`](Self::reply_timeout_factor); 0 switches the check off.
    pub fn with_reply_timeout_factor(mut self, factor: u32) -> Self {
        self.reply_timeout_factor = factor;
        self
    }
}

impl CoreConfig {
    /// A configuration with the defaults: 30 s heartbeat, opamp-go backoff, 64 MiB limit.
    pub fn new(
        instance_uid: InstanceUid,
        capabilities: AgentCapabilitySet,
        transport: TransportKind,
    ) -> Self {
        Self {
            instance_uid,
            capabilities,
            transport,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            backoff: BackoffPolicy::default(),
            max_message_size: opamp_proto::DEFAULT_MAX_MESSAGE_SIZE,
            jitter_seed: None,
            guards: ServerGuards::default(),
            connection_settings_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the link failed, as far as the retry schedule cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The connection could not be made, broke, or the answer was unusable (I/O, TLS,
    /// timeout, unexpected status, garbage, oversized). Retried with backoff (GEN-8).
    Transport,
    /// The server is overloaded: HTTP 429 or 503, on a request or a WebSocket handshake
    /// (THR-5). `retry_after` is its `Retry-After`, if any.
    Throttled {
        /// The parsed `Retry-After` header.
        retry_after: Option<Duration>,
    },
}

/// Something for the application (the driver calls its callbacks), from
/// [`ClientCore::poll_event`]. What the driver does with its own connection comes apart,
/// from [`ClientCore::poll_driver_action`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The link is up: call `on_connect`.
    Connected,
    /// The server answered with an error: call `on_error`.
    ServerError(ServerErrorResponse),
    /// The server sent a command: call `on_command` (the rest of the message was ignored,
    /// S2A-2).
    Command(ServerToAgentCommand),
    /// The server offered OpAMP connection settings: call `on_opamp_connection_settings`,
    /// then answer with [`ClientCore::accept_opamp_connection_settings`] or
    /// [`ClientCore::reject_opamp_connection_settings`] (CS-4). Nothing of the offer is
    /// applied before that.
    OpampConnectionSettings {
        /// The offer.
        settings: Box<OpAmpConnectionSettings>,
        /// `ConnectionSettingsOffers.hash` of the offer (CS-2), for the status (CSS-1).
        offer_hash: Bytes,
    },
    /// Offered OpAMP connection settings were tried and the server at them answered
    /// (CS-OP-5): the driver's candidate settings are now its settings; persist them (call
    /// `on_opamp_connection_settings_applied`) so that a restarted agent uses them. APPLIED is
    /// reported.
    OpampConnectionSettingsApplied {
        /// The settings now in use.
        settings: Box<OpAmpConnectionSettings>,
        /// The offer's hash.
        offer_hash: Bytes,
    },
    /// Offered OpAMP connection settings were tried and failed (CS-OP-6): the driver drops the
    /// candidate and goes back to its settings (the core already scheduled the reconnect).
    /// FAILED is reported with `reason`.
    OpampConnectionSettingsFailed {
        /// The offer's hash.
        offer_hash: Bytes,
        /// Why.
        reason: String,
    },
    /// The server offered own-telemetry or other-connection settings (OWN-1, OTH-1): call
    /// `on_telemetry_connection_settings`, then answer with
    /// [`ClientCore::accept_telemetry_connection_settings`] or
    /// [`ClientCore::reject_telemetry_connection_settings`] (CS-4, CSS-3).
    TelemetryConnectionSettings {
        /// The parts the agent declared capabilities for.
        settings: Box<TelemetryConnectionOffer>,
        /// `ConnectionSettingsOffers.hash` of the offer (CS-2).
        offer_hash: Bytes,
    },
    /// The client certificate obtained through the CSR flow is due for renewal (CSR-8: the
    /// time given to [`ClientCore::schedule_certificate_renewal`] has come), or the server
    /// assigned a new instance uid, so the certificate names the old one (CSR-9): send a new
    /// CSR.
    RenewClientCertificate,
    /// The server sent data for the agent: call `on_message`.
    Message(Box<MessageData>),
    /// A part of the agent's report can never be sent: alone it is over the message size
    /// limit (WS-12, HTTP-17). The rest of the report went out; the part is sent again once
    /// it changes. Call `on_report_too_large`.
    ReportTooLarge(ReportTooLarge),
}

/// What the driver must do with its connection, from [`ClientCore::poll_driver_action`].
/// Apart from [`Event`]s, which are for the application: a driver acts on these itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverAction {
    /// WebSocket only: the server is UNAVAILABLE (THR-2). Send the message from
    /// [`ClientCore::disconnect_message`] (WS-19), close the connection, then reconnect at
    /// [`ClientCore::connect_at`]. The core is already in the disconnected state.
    Reconnect,
    /// WebSocket only: the server sent nothing for too long after a message it must answer
    /// (REP-4, [`ServerGuards::reply_timeout_factor`]); the connection is taken for half-open.
    /// Drop it (a close frame at most, no goodbye message) and reconnect at
    /// [`ClientCore::connect_at`]. The core is already in the disconnected state.
    DropConnection,
    /// Both transports: accepted OpAMP connection settings are to be tried (CS-OP-3). Send
    /// the message from [`ClientCore::disconnect_message`] on the current connection (it
    /// carries APPLYING; over plain HTTP as a last request to the current server), close it,
    /// then connect at [`ClientCore::connect_at`] with the candidate settings. The core is
    /// already in the disconnected state.
    SwitchConnection,
}

/// Where the link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not connected; the next attempt (WS connect, HTTP request) is due at `retry_at`.
    Down { retry_at: Instant },
    /// WebSocket connected, or the last plain-HTTP request was answered.
    Up,
    /// Stopped for good.
    Stopped,
}

// Dirty bits of the compressible sub-messages (CMP-1).
const DESCRIPTION: u16 = 1 << 0;
const HEALTH: u16 = 1 << 1;
const EFFECTIVE_CONFIG: u16 = 1 << 2;
const REMOTE_CONFIG_STATUS: u16 = 1 << 3;
const PACKAGE_STATUSES: u16 = 1 << 4;
const CUSTOM_CAPABILITIES: u16 = 1 << 5;
const AVAILABLE_COMPONENTS: u16 = 1 << 6;
const CONNECTION_SETTINGS_STATUS: u16 = 1 << 7;
const FLAGS: u16 = 1 << 8;
// Not dirty bits: the one-shot parts, when a report is split (WS-12).
const CUSTOM_MESSAGE: u16 = 1 << 9;
const CONNECTION_SETTINGS_REQUEST: u16 = 1 << 10;

/// The agent's current status: every compressible sub-message (CMP-1).
#[derive(Debug, Clone, Default)]
struct Status {
    agent_description: Option<AgentDescription>,
    health: Option<ComponentHealth>,
    effective_config: Option<EffectiveConfig>,
    remote_config_status: Option<RemoteConfigStatus>,
    package_statuses: Option<PackageStatuses>,
    custom_capabilities: Option<CustomCapabilities>,
    available_components: Option<AvailableComponents>,
    connection_settings_status: Option<ConnectionSettingsStatus>,
}

/// The OpAMP client protocol state machine. See the [module docs](self) for the calling
/// contract.
#[derive(Debug)]
pub struct ClientCore {
    uid: InstanceUid,
    capabilities: AgentCapabilitySet,
    transport: TransportKind,
    max_message_size: usize,
    status: Status,
    dirty: u16,
    /// Send every status sub-message in the next message (first message, SEQ-3, recovery).
    full_state: bool,
    /// The server asked for the whole available-components map (AVC-4).
    report_all_components: bool,
    flags: AgentToServerFlagSet,
    /// The uid replaced by a server-assigned one (UID-7, UID-8), while the server may still
    /// address it: messages to it are accepted until the server addresses the new uid or a
    /// new WebSocket connection starts. At most one.
    previous_uid: Option<InstanceUid>,
    /// The new uid has not been sent yet: the next message goes at once (UID-7).
    announce_uid: bool,
    custom_message: Option<CustomMessage>,
    connection_settings_request: Option<ConnectionSettingsRequest>,
    effective_config_requested: bool,
    next_sequence_num: u64,
    server_capabilities: ServerCapabilitySet,
    /// `None`: WebSocket heartbeats switched off by the server (HB-2).
    heartbeat_interval: Option<Duration>,
    link: Link,
    /// Plain HTTP: a request is waiting for its answer (HTTP-10).
    in_flight: bool,
    last_sent: Option<Instant>,
    backoff: Backoff,
    events: VecDeque<Event>,
    /// What the driver must do with its connection; the first one stands until taken.
    driver_action: Option<DriverAction>,
    dropped_outgoing: u64,
    guards: ServerGuards,
    /// The local heartbeat interval, the base of the reply timeout when heartbeats are off.
    local_heartbeat: Duration,
    /// WebSocket: when the current connection came up, and whether the server answered on it.
    session_started: Option<Instant>,
    session_answered: bool,
    /// WebSocket: messages sent that the server has not answered yet (REP-4), and since when
    /// the server has been silent with one outstanding.
    unanswered: u32,
    silent_since: Option<Instant>,
    /// When the last server-requested full report went out, and whether one waits (SEQ-3).
    last_requested_full_state: Option<Instant>,
    full_state_deferred: bool,
    /// When the last remote config was handed over, and the latest one waiting (RC-3).
    last_remote_config: Option<Instant>,
    deferred_remote_config: Option<AgentRemoteConfig>,
    /// When the last command was handed over (CMD-1).
    last_command: Option<Instant>,
    /// The last connection-settings offer handled, to handle a repeat only once (CS-2).
    seen_offer: Option<Seen>,
    /// The offer whose status is reported (CSS-1).
    offer: Option<Offer>,
    /// Accepted OpAMP settings being tried (CS-OP-4).
    trial: Option<Trial>,
    /// When the last offer was handled, and the latest one waiting (CS-4).
    last_offer_at: Option<Instant>,
    deferred_offer: Option<ConnectionSettingsOffers>,
    connection_settings_timeout: Duration,
    /// When the CSR-issued client certificate is to be renewed (CSR-8).
    certificate_renewal: Option<Instant>,
}

impl ClientCore {
    /// A core that will connect at `now`, with an empty status.
    pub fn new(config: CoreConfig, now: Instant) -> Self {
        // CAP-1, CAP-5: undefined bits are never sent.
        let capabilities = AgentCapabilitySet::from_bits_truncate(config.capabilities.bits())
            | AgentCapabilitySet::REPORTS_STATUS;
        let mut status = Status::default();
        if capabilities.contains(AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG) {
            // RC-6, as opamp-go: an agent that takes remote config reports a status from its
            // first message on, UNSET with an empty hash until the embedder sets one, so that
            // the server sees that no config arrived (and re-offers a lost one).
            status.remote_config_status = Some(RemoteConfigStatus {
                status: RemoteConfigStatuses::Unset as i32,
                ..Default::default()
            });
        }
        Self {
            uid: config.instance_uid,
            capabilities,
            transport: config.transport,
            max_message_size: config.max_message_size,
            status,
            dirty: 0,
            // REP-1, REP-3: the first message carries everything.
            full_state: true,
            report_all_components: false,
            flags: AgentToServerFlagSet::empty(),
            previous_uid: None,
            announce_uid: false,
            custom_message: None,
            connection_settings_request: None,
            effective_config_requested: capabilities
                .contains(AgentCapabilitySet::REPORTS_EFFECTIVE_CONFIG),
            next_sequence_num: 0,
            server_capabilities: ServerCapabilitySet::empty(),
            heartbeat_interval: Some(config.heartbeat_interval),
            link: Link::Down { retry_at: now },
            in_flight: false,
            last_sent: None,
            backoff: Backoff::new(config.backoff, config.jitter_seed),
            events: VecDeque::new(),
            driver_action: None,
            dropped_outgoing: 0,
            guards: config.guards,
            local_heartbeat: config.heartbeat_interval,
            session_started: None,
            session_answered: false,
            unanswered: 0,
            silent_since: None,
            last_requested_full_state: None,
            full_state_deferred: false,
            last_remote_config: None,
            deferred_remote_config: None,
            last_command: None,
            seen_offer: None,
            offer: None,
            trial: None,
            last_offer_at: None,
            deferred_offer: None,
            certificate_renewal: None,
            connection_settings_timeout: config.connection_settings_timeout,
        }
    }

    // ---- accessors -------------------------------------------------------------------------

    /// The instance uid in use (changes on `agent_identification`, UID-7).
    pub fn instance_uid(&self) -> InstanceUid {
        self.uid
    }

    /// The agent's capabilities as sent.
    pub fn capabilities(&self) -> AgentCapabilitySet {
        self.capabilities
    }

    /// The last non-zero capabilities the server announced (CAP-3); empty until then.
    pub fn server_capabilities(&self) -> ServerCapabilitySet {
        self.server_capabilities
    }

    /// The heartbeat / polling interval in force; `None` when the server switched WebSocket
    /// heartbeats off (HB-2).
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        self.heartbeat_interval
    }

    /// The sequence number the next message will carry (SEQ-1).
    pub fn next_sequence_num(&self) -> u64 {
        self.next_sequence_num
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        self.link == Link::Up
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.link == Link::Stopped
    }

    /// How many report parts could not be sent because alone they are over the size limit
    /// (WS-12, HTTP-17); each was also reported as [`Event::ReportTooLarge`].
    pub fn dropped_outgoing(&self) -> u64 {
        self.dropped_outgoing
    }

    /// The transport this core drives.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// The client certificate in use came from the CSR flow and is to be renewed at `at`
    /// (CSR-8; e.g. at two thirds of its validity): [`Event::RenewClientCertificate`] comes
    /// then, once, from [`handle_timeout`](Self::handle_timeout), and at once if the server
    /// assigns a new instance uid before (CSR-9). A later call replaces the time.
    pub fn schedule_certificate_renewal(&mut self, at: Instant) {
        self.certificate_renewal = Some(at);
    }

    /// Whether accepted OpAMP connection settings are being tried: the driver connects with
    /// its candidate settings while this holds, with its current ones otherwise (CS-OP-4).
    pub fn is_trying_connection_settings(&self) -> bool {
        self.trial.is_some()
    }

    // ---- setters (REP-1: a change is reported; CMP-3: an unchanged value is not) -----------

    fn check(&self, needed: AgentCapabilitySet) -> Result<(), ClientError> {
        if self.link == Link::Stopped {
            Err(ClientError::Stopped)
        } else if !self.capabilities.contains(needed) {
            Err(ClientError::MissingCapability(needed))
        } else {
            Ok(())
        }
    }

    fn store<T: PartialEq>(slot: &mut Option<T>, dirty: &mut u16, bit: u16, value: T) {
        if slot.as_ref() != Some(&value) {
            *slot = Some(value);
            *dirty |= bit;
        }
    }

    /// Sets the agent description (DESC-*). At least one attribute is required.
    pub fn set_agent_description(&mut self, value: AgentDescription) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_STATUS)?;
        if value.identifying_attributes.is_empty() && value.non_identifying_attributes.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the agent description has no attributes",
            ));
        }
        Self::store(
            &mut self.status.agent_description,
            &mut self.dirty,
            DESCRIPTION,
            value,
        );
        Ok(())
    }

    /// Sets the agent's health (HLT-*); needs `ReportsHealth`.
    pub fn set_health(&mut self, value: ComponentHealth) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_HEALTH)?;
        Self::store(&mut self.status.health, &mut self.dirty, HEALTH, value);
        Ok(())
    }

    /// Sets the effective configuration (EFF-*); needs `ReportsEffectiveConfig`.
    pub fn set_effective_config(&mut self, value: EffectiveConfig) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_EFFECTIVE_CONFIG)?;
        Self::store(
            &mut self.status.effective_config,
            &mut self.dirty,
            EFFECTIVE_CONFIG,
            value,
        );
        Ok(())
    }

    /// Asks the driver to fetch the effective configuration from the embedder (it then calls
    /// [`set_effective_config`](Self::set_effective_config)); needs `ReportsEffectiveConfig`.
    pub fn request_effective_config(&mut self) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_EFFECTIVE_CONFIG)?;
        self.effective_config_requested = true;
        Ok(())
    }

    /// Whether the effective configuration must be fetched; clears the request.
    pub fn take_effective_config_request(&mut self) -> bool {
        std::mem::take(&mut self.effective_config_requested)
    }

    /// Sets the remote config status (RC-7); needs `ReportsRemoteConfig`.
    pub fn set_remote_config_status(
        &mut self,
        value: RemoteConfigStatus,
    ) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_REMOTE_CONFIG)?;
        // The hash is usually a slice of the message the config came in: a copy, so that the
        // status does not keep that whole message alive.
        let mut value = value;
        value.last_remote_config_hash = Bytes::copy_from_slice(&value.last_remote_config_hash);
        Self::store(
            &mut self.status.remote_config_status,
            &mut self.dirty,
            REMOTE_CONFIG_STATUS,
            value,
        );
        Ok(())
    }

    /// Sets the package statuses (PKG-13..PKG-19); needs `ReportsPackageStatuses`.
    pub fn set_package_statuses(&mut self, value: PackageStatuses) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_PACKAGE_STATUSES)?;
        Self::store(
            &mut self.status.package_statuses,
            &mut self.dirty,
            PACKAGE_STATUSES,
            value,
        );
        Ok(())
    }

    /// Sets the custom capabilities the agent supports (CUS-1).
    pub fn set_custom_capabilities(
        &mut self,
        value: CustomCapabilities,
    ) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_STATUS)?;
        Self::store(
            &mut self.status.custom_capabilities,
            &mut self.dirty,
            CUSTOM_CAPABILITIES,
            value,
        );
        Ok(())
    }

    /// Queues a custom message (CUS-3, CUS-5). Its capability must have been declared with
    /// [`set_custom_capabilities`](Self::set_custom_capabilities); only one message waits at a
    /// time.
    pub fn send_custom_message(&mut self, value: CustomMessage) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_STATUS)?;
        let declared = self
            .status
            .custom_capabilities
            .as_ref()
            .is_some_and(|c| c.capabilities.contains(&value.capability));
        if !declared {
            return Err(ClientError::UndeclaredCustomCapability(value.capability));
        }
        if self.custom_message.is_some() {
            return Err(ClientError::CustomMessagePending);
        }
        self.custom_message = Some(value);
        Ok(())
    }

    /// Whether a custom message waits to be sent.
    pub fn custom_message_pending(&self) -> bool {
        self.custom_message.is_some()
    }

    /// Sets the available components (AVC-*); needs `ReportsAvailableComponents`. Messages
    /// carry only the hash unless the server asks for the whole map (AVC-3, AVC-4).
    pub fn set_available_components(
        &mut self,
        value: AvailableComponents,
    ) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_AVAILABLE_COMPONENTS)?;
        if value.hash.is_empty() {
            return Err(ClientError::InvalidArgument(
                "available components need a hash (AVC-2)",
            ));
        }
        Self::store(
            &mut self.status.available_components,
            &mut self.dirty,
            AVAILABLE_COMPONENTS,
            value,
        );
        Ok(())
    }

    /// Sets the connection settings status (CSS-1); needs `ReportsConnectionSettingsStatus`.
    pub fn set_connection_settings_status(
        &mut self,
        value: ConnectionSettingsStatus,
    ) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS)?;
        // A copy, as for the remote config hash: it must not keep the offer's message alive.
        let mut value = value;
        value.last_connection_settings_hash =
            Bytes::copy_from_slice(&value.last_connection_settings_hash);
        // A status set by the embedder (e.g. the persisted one after a restart) names the
        // offer it handled: a repeat of that offer is not handled again (CS-2).
        let decided = value.status == ConnectionSettingsStatuses::Applied as i32
            || value.status == ConnectionSettingsStatuses::Failed as i32;
        if decided && !value.last_connection_settings_hash.is_empty() && self.trial.is_none() {
            self.seen_offer = Some(Seen::Hash(value.last_connection_settings_hash.clone()));
            self.offer = None;
        }
        Self::store(
            &mut self.status.connection_settings_status,
            &mut self.dirty,
            CONNECTION_SETTINGS_STATUS,
            value,
        );
        Ok(())
    }

    /// Sends a connection settings request (CSR-2); needs `AcceptsOpAMPConnectionSettings` (to
    /// receive the answer). It goes only to a server that advertised
    /// `AcceptsConnectionSettingsRequest` (CSR-2, CAP-4): refused when the server's known
    /// capabilities lack it; held while they are unknown, sent in the first message after a
    /// server announced it, and dropped (with a warning) if the server announces capabilities
    /// without it.
    pub fn request_connection_settings(
        &mut self,
        value: ConnectionSettingsRequest,
    ) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS)?;
        if value.opamp.is_none() {
            return Err(ClientError::InvalidArgument(
                "a connection settings request without `opamp` is not actionable (CSR-2)",
            ));
        }
        let needed = ServerCapabilitySet::ACCEPTS_CONNECTION_SETTINGS_REQUEST;
        if !self.server_capabilities.is_empty() && !self.server_capabilities.contains(needed) {
            return Err(ClientError::ServerLacksCapability(needed));
        }
        self.connection_settings_request = Some(value);
        Ok(())
    }

    /// Sets the `AgentToServer.flags` sent with every message (e.g. `RequestInstanceUid`,
    /// UID-5).
    pub fn set_flags(&mut self, flags: AgentToServerFlagSet) -> Result<(), ClientError> {
        self.check(AgentCapabilitySet::REPORTS_STATUS)?;
        // CAP-5: reserved bits are sent as 0.
        let flags = AgentToServerFlagSet::from_bits_truncate(flags.bits());
        if self.flags != flags {
            self.flags = flags;
            self.dirty |= FLAGS;
        }
        Ok(())
    }

    // ---- link inputs -----------------------------------------------------------------------

    /// WebSocket: the handshake succeeded. The next message carries the full status (REP-1).
    pub fn handle_connected(&mut self, now: Instant) {
        if self.link == Link::Stopped {
            return;
        }
        self.link = Link::Up;
        self.full_state = true;
        self.full_state_deferred = false;
        self.session_started = Some(now);
        self.session_answered = false;
        self.unanswered = 0;
        self.silent_since = None;
        // The first message on this connection carries the current uid, before the server
        // can push anything on it.
        self.previous_uid = None;
        self.events.push_back(Event::Connected);
    }

    /// A connection attempt or a plain-HTTP request failed. The next attempt is scheduled
    /// with backoff (GEN-8), or later if the server asked so (THR-5); the full status is
    /// sent once the link is back (RETRY-1). Returns the delay.
    pub fn handle_connect_failure(&mut self, now: Instant, failure: Failure) -> Duration {
        self.handle_connect_error(now, failure, "the connection failed")
    }

    /// [`handle_connect_failure`](Self::handle_connect_failure) with what went wrong: while
    /// offered connection settings are tried, they have failed, and `reason` is the FAILED
    /// status's message (CS-OP-6). The rollback to the old settings is immediate (returns 0).
    pub fn handle_connect_error(
        &mut self,
        now: Instant,
        failure: Failure,
        reason: &str,
    ) -> Duration {
        self.in_flight = false;
        let delay = match failure {
            Failure::Transport => self.backoff.delay_after_failure(false, None),
            Failure::Throttled { retry_after } => {
                self.backoff.delay_after_failure(true, retry_after)
            }
        };
        self.go_down(now, delay);
        if self.trial.is_some() {
            self.fail_trial(now, reason, None);
            return Duration::ZERO;
        }
        delay
    }

    /// WebSocket: an established connection broke (closed by the server, read or write error,
    /// malformed or oversized message). Reconnects after the current backoff delay: quickly
    /// after a connection that worked, more and more slowly if the server keeps dropping
    /// connections before answering (WS-18, GEN-8). Returns the delay.
    pub fn handle_disconnected(&mut self, now: Instant) -> Duration {
        self.handle_connection_lost(now, "the connection was lost")
    }

    /// [`handle_disconnected`](Self::handle_disconnected) with what went wrong: while offered
    /// connection settings are tried, they have failed (the new server dropped the connection
    /// before answering), and `reason` is the FAILED status's message (CS-OP-6). The rollback
    /// to the old settings is immediate (returns 0).
    pub fn handle_connection_lost(&mut self, now: Instant, reason: &str) -> Duration {
        self.in_flight = false;
        let delay = self.session_ended(now);
        self.go_down(now, delay);
        if self.trial.is_some() {
            self.fail_trial(now, reason, None);
            return Duration::ZERO;
        }
        delay
    }

    /// The delay before reconnecting after a WebSocket session ended at `now`. Only a session
    /// on which the server answered and that lasted at least `min_session` starts the backoff
    /// over (GEN-8, WS-18): a server that answers and then closes every connection at once
    /// sees growing delays.
    fn session_ended(&mut self, now: Instant) -> Duration {
        if let Some(started) = self.session_started.take() {
            let lived = now.saturating_duration_since(started);
            if std::mem::take(&mut self.session_answered) && lived >= self.guards.min_session {
                self.backoff.reset();
            }
        }
        self.backoff.next_delay()
    }

    /// WebSocket: bytes came from the server at `now`, maybe only part of a message. A large
    /// message still in transit is not silence: the wait for an answer starts over (REP-4).
    pub fn handle_activity(&mut self, now: Instant) {
        if self.unanswered > 0 {
            self.silent_since = Some(now);
        }
    }

    /// Checks the timers that do not send anything: a WebSocket server silent for too long
    /// after a message it must answer (REP-4, [`DriverAction::DropConnection`]), the deadline
    /// of offered connection settings being tried, a connection-settings offer deferred by
    /// [`ServerGuards::connection_settings_min_interval`], and a remote config deferred by
    /// [`ServerGuards::remote_config_min_interval`] (handed over as an [`Event::Message`]). Call it before draining events, with the current time.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link == Link::Stopped {
            return;
        }
        if let Some(due) = self.reply_deadline() {
            if now >= due {
                tracing::warn!(
                    "the OpAMP server sent nothing since a message it must answer; \
                     taking the connection for half-open and reconnecting"
                );
                let delay = self.session_ended(now);
                self.go_down(now, delay);
                self.driver_action
                    .get_or_insert(DriverAction::DropConnection);
            }
        }
        if let Some(trial) = &self.trial {
            if now >= trial.deadline {
                let reason = format!(
                    "the server at the offered settings did not answer within {:?}",
                    self.connection_settings_timeout
                );
                let up = self.link == Link::Up;
                self.fail_trial(now, &reason, up.then_some(DriverAction::DropConnection));
            }
        }
        if self.certificate_renewal.is_some_and(|at| now >= at) {
            self.certificate_renewal = None;
            self.events.push_back(Event::RenewClientCertificate);
        }
        if let Some(due) = self.deferred_offer_due() {
            if now >= due && self.trial.is_none() {
                if let Some(offers) = self.deferred_offer.take() {
                    self.handle_offers(now, offers);
                }
            }
        }
        if let Some(due) = self.deferred_remote_config_due() {
            if now >= due {
                if let Some(config) = self.deferred_remote_config.take() {
                    self.last_remote_config = Some(now);
                    self.events.push_back(Event::Message(Box::new(MessageData {
                        remote_config: Some(config),
                        ..Default::default()
                    })));
                }
            }
        }
    }

    /// WebSocket: when an outstanding message counts as unanswered for good.
    fn reply_deadline(&self) -> Option<Instant> {
        if self.transport != TransportKind::WebSocket
            || self.link != Link::Up
            || self.guards.reply_timeout_factor == 0
        {
            return None;
        }
        let since = self.silent_since?;
        let interval = self.heartbeat_interval.unwrap_or(self.local_heartbeat);
        let timeout = interval
            .checked_mul(self.guards.reply_timeout_factor)
            .unwrap_or(Duration::MAX);
        Some(add(since, timeout))
    }

    fn deferred_remote_config_due(&self) -> Option<Instant> {
        self.deferred_remote_config.as_ref()?;
        Some(match self.last_remote_config {
            Some(t) => add(t, self.guards.remote_config_min_interval),
            None => return None,
        })
    }

    fn deferred_offer_due(&self) -> Option<Instant> {
        self.deferred_offer.as_ref()?;
        if self.trial.is_some() {
            // Handled once the trial ended; its deadline wakes the driver meanwhile.
            return None;
        }
        self.last_offer_at
            .map(|t| add(t, self.guards.connection_settings_min_interval))
    }

    fn deferred_full_state_due(&self) -> Option<Instant> {
        if !self.full_state_deferred {
            return None;
        }
        self.last_requested_full_state
            .map(|t| add(t, self.guards.full_state_min_interval))
    }

    fn go_down(&mut self, now: Instant, delay: Duration) {
        if self.link == Link::Stopped {
            return;
        }
        self.link = Link::Down {
            retry_at: add(now, delay),
        };
        self.full_state = true;
        // The reconnect sends everything anyway.
        self.full_state_deferred = false;
        self.session_started = None;
        self.unanswered = 0;
        self.silent_since = None;
    }

    /// Plain HTTP: the server refused the request as malformed or too large (HTTP 400, 413).
    /// The request is not retried (HTTP-14, RETRY-3); polling goes on at its interval.
    ///
    /// While the link is down (no request answered yet, or none since a failure) the request
    /// was also the connection attempt: the next attempt waits for the next backoff delay
    /// (GEN-8, THR-8), so a server that refuses every request sees growing delays, never a
    /// burst. That attempt carries only what changed since, not the refused message.
    pub fn handle_request_rejected(&mut self, now: Instant) {
        self.in_flight = false;
        if self.trial.is_some() {
            // CS-OP-6: the new server refused the agent's report.
            self.fail_trial(
                now,
                "the server at the offered settings refused the request",
                None,
            );
            return;
        }
        if let Link::Down { .. } = self.link {
            // Not `go_down`: the full state is not queued again (RETRY-3).
            let delay = self.backoff.next_delay();
            self.link = Link::Down {
                retry_at: add(now, delay),
            };
        }
    }

    /// When the next connection attempt is due; `None` while connected or stopped.
    #[must_use]
    pub fn connect_at(&self) -> Option<Instant> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            _ => None,
        }
    }

    /// Processes a `ServerToAgent` (REP-6). Over plain HTTP this is the answer to the request
    /// in flight.
    pub fn handle_message(&mut self, now: Instant, msg: ServerToAgent) {
        if self.link == Link::Stopped {
            return;
        }
        self.in_flight = false;
        // REP-4: the server answers every message; whatever it sends shows it is alive.
        self.unanswered = self.unanswered.saturating_sub(1);
        self.silent_since = (self.unanswered > 0).then_some(now);

        // UID-6: a message for another agent (a multiplexing proxy gone wrong) is ignored.
        // Until the server has learned a uid it assigned, it may still address the previous
        // one (UID-7, UID-8).
        if !msg.instance_uid.is_empty() {
            if msg.instance_uid[..] == self.uid.as_array()[..] {
                // The server knows the current uid.
                self.previous_uid = None;
            } else if self
                .previous_uid
                .is_none_or(|p| msg.instance_uid[..] != p.as_array()[..])
            {
                tracing::warn!("ignoring a ServerToAgent addressed to another instance uid");
                self.mark_up();
                return;
            }
        }

        if let Some(error) = msg.error_response {
            self.handle_server_error(error, now);
            return;
        }
        // CS-OP-5: the server at the candidate settings answered properly: they are the
        // driver's settings from now on.
        if let Some(trial) = self.trial.take() {
            if self
                .capabilities
                .contains(AgentCapabilitySet::REPORTS_HEARTBEAT)
            {
                self.apply_heartbeat(trial.settings.heartbeat_interval_seconds);
            }
            self.set_offer_part(&trial.hash, |o| &mut o.opamp, Part::Applied);
            self.events
                .push_back(Event::OpampConnectionSettingsApplied {
                    settings: trial.settings,
                    offer_hash: trial.hash,
                });
        }
        // A proper answer: the server works, so the backoff starts over. Over WebSocket only
        // once the session has lasted (`session_ended`, GEN-8, WS-18).
        match self.transport {
            TransportKind::Http => self.backoff.reset(),
            TransportKind::WebSocket => self.session_answered = true,
        }
        self.mark_up();

        // CAP-3: 0 means "unchanged".
        if msg.capabilities != 0 {
            self.server_capabilities = ServerCapabilitySet::from_bits_retain(msg.capabilities);
            if self.connection_settings_request.is_some() && !self.server_takes_csr() {
                tracing::warn!(
                    "dropping a connection settings request: the server does not accept them"
                );
                self.connection_settings_request = None;
            }
        }

        // S2A-2, CMD-2: a command stands alone; without the capability it is ignored.
        if let Some(command) = msg.command {
            if self
                .capabilities
                .contains(AgentCapabilitySet::ACCEPTS_RESTART_COMMAND)
            {
                // A server repeating a command in every message cannot make the agent
                // restart in a loop: one command per `command_min_interval`.
                let recent = self
                    .last_command
                    .is_some_and(|t| now < add(t, self.guards.command_min_interval));
                if recent {
                    tracing::warn!(
                        "dropping a command: the server sent one less than {:?} ago",
                        self.guards.command_min_interval
                    );
                } else {
                    self.last_command = Some(now);
                    self.events.push_back(Event::Command(command));
                }
                return;
            }
            tracing::debug!("ignoring a command: AcceptsRestartCommand not declared");
        }

        let mut data = MessageData::default();

        // UID-7: adopt a new uid of exactly 16 bytes, stop asking for one.
        if let Some(ident) = msg.agent_identification {
            match InstanceUid::try_from(&ident.new_instance_uid[..]) {
                Ok(uid) => {
                    if uid != self.uid {
                        // The server learns the new uid only from the agent's next message:
                        // send one now (over WebSocket the agent may otherwise stay silent
                        // for long), and accept its messages to the old uid until then.
                        self.previous_uid = Some(self.uid);
                        self.uid = uid;
                        self.announce_uid = true;
                        // CSR-9: a certificate issued for the old uid is requested again.
                        if self.certificate_renewal.take().is_some() {
                            self.events.push_back(Event::RenewClientCertificate);
                        }
                    }
                    if self
                        .flags
                        .contains(AgentToServerFlagSet::REQUEST_INSTANCE_UID)
                    {
                        self.flags
                            .remove(AgentToServerFlagSet::REQUEST_INSTANCE_UID);
                        self.dirty |= FLAGS;
                    }
                    data.new_instance_uid = Some(uid);
                }
                Err(e) => tracing::warn!("ignoring agent_identification: {e}"),
            }
        }

        if let Some(offers) = msg.connection_settings {
            // A server changing the offer in every message cannot keep the agent trying new
            // connections: one offer per `connection_settings_min_interval`, the latest wins.
            let recent = self
                .last_offer_at
                .is_some_and(|t| now < add(t, self.guards.connection_settings_min_interval));
            if recent {
                if self.seen_offer.as_ref() != Some(&Seen::of(&offers)) {
                    tracing::debug!(
                        "deferring a connection settings offer: one was handled just now"
                    );
                    self.deferred_offer = Some(offers);
                }
            } else {
                self.deferred_offer = None;
                self.handle_offers(now, offers);
            }
        }

        if self
            .capabilities
            .contains(AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG)
        {
            if let Some(config) = msg.remote_config {
                // A server changing the config in every message cannot keep the agent busy
                // reapplying it: one config per `remote_config_min_interval`, the latest wins.
                let recent = self
                    .last_remote_config
                    .is_some_and(|t| now < add(t, self.guards.remote_config_min_interval));
                if recent {
                    tracing::debug!("deferring a remote config: one was handed over just now");
                    self.deferred_remote_config = Some(config);
                } else {
                    self.last_remote_config = Some(now);
                    // An older deferred one is superseded.
                    self.deferred_remote_config = None;
                    data.remote_config = Some(config);
                }
            }
        }
        if self
            .capabilities
            .contains(AgentCapabilitySet::ACCEPTS_PACKAGES)
        {
            data.packages_available = msg.packages_available;
        }
        data.custom_capabilities = msg.custom_capabilities;
        data.custom_message = msg.custom_message;

        let flags = ServerToAgentFlagSet::from_bits_retain(msg.flags);
        data.flags = flags;
        // SEQ-3: resend everything, at most once per `full_state_min_interval`: a server
        // asking in every answer gets one coalesced full report per interval, not a loop.
        if flags.contains(ServerToAgentFlagSet::REPORT_FULL_STATE) {
            let recent = self
                .last_requested_full_state
                .is_some_and(|t| now < add(t, self.guards.full_state_min_interval));
            if recent {
                self.full_state_deferred = true;
            } else {
                self.full_state = true;
                self.last_requested_full_state = Some(now);
            }
        }
        // AVC-4: the server does not know our components hash.
        if flags.contains(ServerToAgentFlagSet::REPORT_AVAILABLE_COMPONENTS)
            && self
                .capabilities
                .contains(AgentCapabilitySet::REPORTS_AVAILABLE_COMPONENTS)
        {
            self.report_all_components = true;
            self.dirty |= AVAILABLE_COMPONENTS;
        }

        if !data.is_empty() {
            self.events.push_back(Event::Message(Box::new(data)));
        }
    }

    /// A `connection_settings` offer (CS-1..CS-3): handled once per hash, its parts handed
    /// to the embedder for a decision.
    fn handle_offers(&mut self, now: Instant, offers: ConnectionSettingsOffers) {
        let seen = Seen::of(&offers);
        if self.seen_offer.as_ref() == Some(&seen) {
            // CS-2: the same offer again (a plain-HTTP server repeats it until the agent
            // reports its hash): decided already.
            return;
        }
        if self.trial.is_some() {
            // One offer at a time; the server sends a newer one again (CSS-2).
            tracing::debug!("ignoring a connection settings offer while another one is tried");
            return;
        }
        self.seen_offer = Some(seen);
        self.last_offer_at = Some(now);
        let hash = Bytes::copy_from_slice(&offers.hash);
        let caps = self.capabilities;
        let mut offer = Offer {
            hash: hash.clone(),
            opamp: Part::Absent,
            telemetry: Part::Absent,
        };
        if let Some(opamp) = offers.opamp {
            if caps.contains(AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS) {
                // CS-4: the embedder decides first; nothing is applied before it accepts.
                offer.opamp = Part::Pending;
                self.events.push_back(Event::OpampConnectionSettings {
                    settings: Box::new(opamp),
                    offer_hash: hash.clone(),
                });
            } else if caps.contains(AgentCapabilitySet::REPORTS_HEARTBEAT) {
                // HB-2: the agent cannot take the rest of the offer, but it reports
                // heartbeats, so it uses the server's interval.
                self.apply_heartbeat(opamp.heartbeat_interval_seconds);
            }
        }
        // CS-1, CAP-2: only what the agent declared.
        let mut telemetry = TelemetryConnectionOffer::default();
        if caps.contains(AgentCapabilitySet::REPORTS_OWN_METRICS) {
            telemetry.own_metrics = offers.own_metrics;
        }
        if caps.contains(AgentCapabilitySet::REPORTS_OWN_TRACES) {
            telemetry.own_traces = offers.own_traces;
        }
        if caps.contains(AgentCapabilitySet::REPORTS_OWN_LOGS) {
            telemetry.own_logs = offers.own_logs;
        }
        if caps.contains(AgentCapabilitySet::ACCEPTS_OTHER_CONNECTION_SETTINGS) {
            telemetry.other_connections = offers.other_connections;
        }
        if !telemetry.is_empty() {
            offer.telemetry = Part::Pending;
            self.events.push_back(Event::TelemetryConnectionSettings {
                settings: Box::new(telemetry),
                offer_hash: hash,
            });
        }
        self.offer = Some(offer);
        // Nothing is reported while the parts wait for the embedder: its decisions come
        // before the next message goes out.
    }

    /// The embedder accepted the OpAMP connection settings of
    /// [`Event::OpampConnectionSettings`] (CS-4). When they hold only a heartbeat interval,
    /// it is applied (HB-2, with `ReportsHeartbeat`) and the part is APPLIED. Otherwise they
    /// are tried (CS-OP-2..CS-OP-4): APPLYING is reported, [`DriverAction::SwitchConnection`]
    /// asks the driver to leave the current server, and the core is disconnected, due to
    /// connect at once; the driver connects with the candidate while
    /// [`is_trying_connection_settings`](Self::is_trying_connection_settings) holds. The
    /// heartbeat interval of tried settings is applied only once they succeeded.
    pub fn accept_opamp_connection_settings(
        &mut self,
        now: Instant,
        offer_hash: &[u8],
        settings: &OpAmpConnectionSettings,
    ) {
        if self.link == Link::Stopped || self.trial.is_some() {
            return;
        }
        if !offers::changes_connection(settings) {
            if self
                .capabilities
                .contains(AgentCapabilitySet::REPORTS_HEARTBEAT)
            {
                self.apply_heartbeat(settings.heartbeat_interval_seconds);
            }
            self.set_offer_part(offer_hash, |o| &mut o.opamp, Part::Applied);
            return;
        }
        let hash = Bytes::copy_from_slice(offer_hash);
        self.trial = Some(Trial {
            hash,
            settings: Box::new(settings.clone()),
            deadline: add(now, self.connection_settings_timeout),
        });
        // CS-OP-3: APPLYING goes out with the goodbye to the current server.
        self.set_offer_part(offer_hash, |o| &mut o.opamp, Part::Applying);
        let full = self.full_state;
        self.go_down(now, Duration::ZERO);
        // The goodbye carries only what changed; the candidate server gets everything.
        self.full_state = full;
        self.driver_action = Some(DriverAction::SwitchConnection);
    }

    /// The embedder rejected the OpAMP connection settings of
    /// [`Event::OpampConnectionSettings`] (CS-4), or they could not be used: nothing of them
    /// is applied, and with `ReportsConnectionSettingsStatus` the core reports FAILED with the
    /// offer's hash and `reason` (CSS-1), as opamp-go does. A repeat of the offer is not
    /// handed over again (CS-2).
    pub fn reject_opamp_connection_settings(
        &mut self,
        _now: Instant,
        offer_hash: &[u8],
        reason: &str,
    ) {
        if self.link == Link::Stopped {
            return;
        }
        self.set_offer_part(
            offer_hash,
            |o| &mut o.opamp,
            Part::Failed(reason.to_owned()),
        );
    }

    /// The embedder applied the own-telemetry and other-connection settings of
    /// [`Event::TelemetryConnectionSettings`] (OWN-1, OTH-1); the part is APPLIED (CSS-3).
    pub fn accept_telemetry_connection_settings(&mut self, _now: Instant, offer_hash: &[u8]) {
        if self.link == Link::Stopped {
            return;
        }
        self.set_offer_part(offer_hash, |o| &mut o.telemetry, Part::Applied);
    }

    /// The embedder rejected or could not apply the own-telemetry and other-connection
    /// settings of [`Event::TelemetryConnectionSettings`]: FAILED with `reason` (CSS-1, CSS-3).
    pub fn reject_telemetry_connection_settings(
        &mut self,
        _now: Instant,
        offer_hash: &[u8],
        reason: &str,
    ) {
        if self.link == Link::Stopped {
            return;
        }
        self.set_offer_part(
            offer_hash,
            |o| &mut o.telemetry,
            Part::Failed(reason.to_owned()),
        );
    }

    /// Sets one part of the offer with `hash` (a decision for an offer the core does not
    /// hold starts a record of it) and reports the status that follows (CSS-1).
    fn set_offer_part(&mut self, hash: &[u8], part: fn(&mut Offer) -> &mut Part, value: Part) {
        let offer = match &mut self.offer {
            Some(o) if o.hash[..] == *hash => o,
            slot => slot.insert(Offer {
                hash: Bytes::copy_from_slice(hash),
                opamp: Part::Absent,
                telemetry: Part::Absent,
            }),
        };
        *part(offer) = value;
        let Some((status, error_message)) = offer.status() else {
            return;
        };
        // While a part waits for the embedder nothing is reported: it decides before the next
        // message goes out, and a status of APPLYING would only flicker.
        if offer.opamp == Part::Pending || offer.telemetry == Part::Pending {
            return;
        }
        let hash = offer.hash.clone();
        self.report_connection_settings(&hash, status, &error_message);
    }

    /// CS-OP-6: the candidate settings failed. The offer's OpAMP part is FAILED with
    /// `reason`, the driver is told to drop the candidate, and the core is disconnected, due
    /// to reconnect with the old settings at once; `action` (when connected to the candidate
    /// server) tells the driver how to leave it.
    fn fail_trial(&mut self, now: Instant, reason: &str, action: Option<DriverAction>) {
        let Some(trial) = self.trial.take() else {
            return;
        };
        tracing::warn!("offered OpAMP connection settings failed, rolling back: {reason}");
        self.set_offer_part(
            &trial.hash,
            |o| &mut o.opamp,
            Part::Failed(reason.to_owned()),
        );
        self.events.push_back(Event::OpampConnectionSettingsFailed {
            offer_hash: trial.hash,
            reason: reason.to_owned(),
        });
        self.go_down(now, Duration::ZERO);
        if let Some(action) = action {
            if self.transport == TransportKind::WebSocket {
                self.driver_action = Some(action);
            }
        }
    }

    fn report_connection_settings(
        &mut self,
        offer_hash: &[u8],
        status: ConnectionSettingsStatuses,
        error_message: &str,
    ) {
        if self
            .capabilities
            .contains(AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS)
        {
            Self::store(
                &mut self.status.connection_settings_status,
                &mut self.dirty,
                CONNECTION_SETTINGS_STATUS,
                ConnectionSettingsStatus {
                    last_connection_settings_hash: Bytes::copy_from_slice(offer_hash),
                    status: status as i32,
                    error_message: error_message.to_owned(),
                },
            );
        }
    }

    fn mark_up(&mut self) {
        if let Link::Down { .. } = self.link {
            // Plain HTTP: the first answered request after none or after a failure.
            self.link = Link::Up;
            self.events.push_back(Event::Connected);
        }
    }

    fn handle_server_error(&mut self, error: ServerErrorResponse, now: Instant) {
        let unavailable = error.r#type == ServerErrorResponseType::Unavailable as i32;
        self.events.push_back(Event::ServerError(error.clone()));
        let error_message = error.error_message.clone();
        if unavailable {
            // THR-2, THR-3: back off, honouring retry_info; resend everything after (RETRY-1).
            let retry_after = error.details.map(|d| match d {
                server_error_response::Details::RetryInfo(info) => {
                    Duration::from_nanos(info.retry_after_nanoseconds)
                }
            });
            let delay = self.backoff.delay_after_failure(true, retry_after);
            self.go_down(now, delay);
            if self.transport == TransportKind::WebSocket {
                self.driver_action.get_or_insert(DriverAction::Reconnect);
            }
        } else {
            // RETRY-3: BAD_REQUEST and UNKNOWN are not retried. The server answered, so the
            // link is up.
            self.mark_up();
        }
        if self.trial.is_some() {
            // CS-OP-6: the server at the candidate settings does not take the agent.
            let reason = format!(
                "the server at the offered settings answered with an error: {error_message}"
            );
            let up = self.link == Link::Up;
            self.fail_trial(now, &reason, up.then_some(DriverAction::Reconnect));
        }
    }

    /// Applies a server-offered heartbeat interval (HB-2). 0 switches WebSocket heartbeats
    /// off; plain HTTP must keep polling, so it keeps its current interval (checklist 4.2.2).
    fn apply_heartbeat(&mut self, seconds: u64) {
        if seconds > 0 {
            self.heartbeat_interval = Some(Duration::from_secs(seconds));
        } else if self.transport == TransportKind::WebSocket {
            self.heartbeat_interval = None;
        }
    }

    // ---- outputs ---------------------------------------------------------------------------

    /// The next event for the application (its callbacks).
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// What the driver must do with its connection, if anything (taken once).
    #[must_use]
    pub fn poll_driver_action(&mut self) -> Option<DriverAction> {
        self.driver_action.take()
    }

    /// The status parts the server can take (CAP-4): everything until its capabilities are
    /// known; then effective config only with `AcceptsEffectiveConfig`, package statuses only
    /// with `AcceptsPackagesStatus`, and the connection settings status only with
    /// `OffersConnectionSettings` (the spec has no server bit for that status; a server that
    /// offers no settings has no use for it). Parts held back stay pending, so they go out
    /// once a server announces the capability.
    fn sendable(&self) -> u16 {
        let server = self.server_capabilities;
        if server.is_empty() {
            return u16::MAX;
        }
        let mut mask = u16::MAX;
        if !server.contains(ServerCapabilitySet::ACCEPTS_EFFECTIVE_CONFIG) {
            mask &= !EFFECTIVE_CONFIG;
        }
        if !server.contains(ServerCapabilitySet::ACCEPTS_PACKAGES_STATUS) {
            mask &= !PACKAGE_STATUSES;
        }
        if !server.contains(ServerCapabilitySet::OFFERS_CONNECTION_SETTINGS) {
            mask &= !CONNECTION_SETTINGS_STATUS;
        }
        mask
    }

    /// The dirty bits of the status parts that have a value.
    fn present(&self) -> u16 {
        let s = &self.status;
        let mut bits = FLAGS;
        for (set, bit) in [
            (s.agent_description.is_some(), DESCRIPTION),
            (s.health.is_some(), HEALTH),
            (s.effective_config.is_some(), EFFECTIVE_CONFIG),
            (s.remote_config_status.is_some(), REMOTE_CONFIG_STATUS),
            (s.package_statuses.is_some(), PACKAGE_STATUSES),
            (s.custom_capabilities.is_some(), CUSTOM_CAPABILITIES),
            (s.available_components.is_some(), AVAILABLE_COMPONENTS),
            (
                s.connection_settings_status.is_some(),
                CONNECTION_SETTINGS_STATUS,
            ),
        ] {
            if set {
                bits |= bit;
            }
        }
        bits
    }

    /// CSR-2, CAP-4: the server advertised `AcceptsConnectionSettingsRequest`.
    fn server_takes_csr(&self) -> bool {
        self.server_capabilities
            .contains(ServerCapabilitySet::ACCEPTS_CONNECTION_SETTINGS_REQUEST)
    }

    fn has_pending(&self) -> bool {
        self.full_state
            || self.dirty & self.sendable() != 0
            || self.custom_message.is_some()
            || (self.connection_settings_request.is_some() && self.server_takes_csr())
            || self.announce_uid
    }

    /// When a heartbeat (WS) or poll (HTTP) is due, measured from the last message sent (HB-4).
    fn heartbeat_due_at(&self) -> Option<Instant> {
        let interval = match self.transport {
            // WS-14, HB-1: heartbeats only with ReportsHeartbeat.
            TransportKind::WebSocket
                if !self
                    .capabilities
                    .contains(AgentCapabilitySet::REPORTS_HEARTBEAT) =>
            {
                return None;
            }
            _ => self.heartbeat_interval?,
        };
        // Nothing sent yet on this link: the pending first message goes at once anyway.
        self.last_sent.map(|t| add(t, interval))
    }

    /// The next message to send, if one is due: everything dirty coalesced into one message,
    /// or a heartbeat / poll (HB-4, HTTP-7). Over plain HTTP at most one request is in flight
    /// (HTTP-10); a request is also the reconnect attempt while the link is down.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<AgentToServer> {
        match self.link {
            Link::Stopped => return None,
            Link::Down { retry_at } => {
                // HB-6, THR-6: nothing but the retry itself while backing off.
                if self.transport != TransportKind::Http || self.in_flight || now < retry_at {
                    return None;
                }
            }
            Link::Up => {
                if self.in_flight {
                    return None;
                }
                // SEQ-3: a deferred full report is due.
                if self.deferred_full_state_due().is_some_and(|t| now >= t) {
                    self.full_state = true;
                    self.full_state_deferred = false;
                    self.last_requested_full_state = Some(now);
                }
                let heartbeat_due = self.heartbeat_due_at().is_some_and(|t| now >= t);
                if !self.has_pending() && !heartbeat_due {
                    return None;
                }
            }
        }
        let msg = self.build(false);
        self.sent(now);
        Some(msg)
    }

    /// The earliest time at which something timer-driven happens: a heartbeat or poll, the
    /// next connection attempt, a deferred full report or remote config, or the end of the
    /// wait for a WebSocket server's answer. `None` when only new input can make progress.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = match self.link {
            Link::Stopped => return None,
            Link::Down { retry_at } => (!self.in_flight).then_some(retry_at),
            Link::Up if self.in_flight => None,
            Link::Up => [self.heartbeat_due_at(), self.deferred_full_state_due()]
                .into_iter()
                .flatten()
                .min(),
        };
        [
            link,
            self.reply_deadline(),
            self.deferred_remote_config_due(),
            self.trial.as_ref().map(|t| t.deadline),
            self.deferred_offer_due(),
            self.certificate_renewal,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Stops the core and returns the last message to send, with `agent_disconnect` set
    /// (WS-16, HTTP-11, DIS-1), if the link is up. Setters fail with
    /// [`ClientError::Stopped`] afterwards.
    #[must_use]
    pub fn stop(&mut self, now: Instant) -> Option<AgentToServer> {
        let msg = (self.link == Link::Up).then(|| self.disconnect_message(now));
        self.link = Link::Stopped;
        self.deferred_remote_config = None;
        self.deferred_offer = None;
        msg
    }

    /// A message with `agent_disconnect` set and anything pending, sent before closing a
    /// WebSocket on purpose (WS-19, DIS-1).
    #[must_use]
    pub fn disconnect_message(&mut self, now: Instant) -> AgentToServer {
        let mut msg = self.build(true);
        self.last_sent = Some(now);
        // Whatever goes out with the disconnect is resent in full on the next connection.
        self.full_state = true;
        msg.agent_disconnect = Some(AgentDisconnect {});
        msg
    }

    fn sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
        match self.transport {
            TransportKind::Http => self.in_flight = true,
            TransportKind::WebSocket => {
                // REP-4: the server must answer this one.
                self.unanswered = self.unanswered.saturating_add(1);
                if self.silent_since.is_none() {
                    self.silent_since = Some(now);
                }
            }
        }
    }

    /// Builds the next message from everything pending, and marks it sent.
    fn build(&mut self, disconnect: bool) -> AgentToServer {
        let full = self.full_state;
        let dirty = self.dirty;
        let sendable = self.sendable();
        let part = |bit: u16| (full || dirty & bit != 0) && sendable & bit != 0;
        let s = &self.status;
        let mut msg = AgentToServer {
            // UID-4, CAP-1, checklist 4.2.3: uid, sequence number and capabilities always.
            instance_uid: self.uid.to_bytes(),
            sequence_num: self.next_sequence_num,
            capabilities: self.capabilities.bits(),
            flags: self.flags.bits(),
            agent_description: part(DESCRIPTION)
                .then(|| s.agent_description.clone())
                .flatten(),
            health: part(HEALTH).then(|| s.health.clone()).flatten(),
            effective_config: part(EFFECTIVE_CONFIG)
                .then(|| s.effective_config.clone())
                .flatten(),
            remote_config_status: part(REMOTE_CONFIG_STATUS)
                .then(|| s.remote_config_status.clone())
                .flatten(),
            package_statuses: part(PACKAGE_STATUSES)
                .then(|| s.package_statuses.clone())
                .flatten(),
            custom_capabilities: part(CUSTOM_CAPABILITIES)
                .then(|| s.custom_capabilities.clone())
                .flatten(),
            connection_settings_status: part(CONNECTION_SETTINGS_STATUS)
                .then(|| s.connection_settings_status.clone())
                .flatten(),
            // AVC-3, AVC-4: the hash only, unless the server asked for the map.
            available_components: part(AVAILABLE_COMPONENTS)
                .then(|| {
                    s.available_components
                        .as_ref()
                        .map(|c| AvailableComponents {
                            components: if self.report_all_components {
                                c.components.clone()
                            } else {
                                Default::default()
                            },
                            hash: c.hash.clone(),
                        })
                })
                .flatten(),
            custom_message: self.custom_message.take(),
            connection_settings_request: if self.server_takes_csr() {
                self.connection_settings_request.take()
            } else {
                None
            },
            agent_disconnect: disconnect.then_some(AgentDisconnect {}),
        };
        // CAP-4: what the server cannot take now stays pending for a later server.
        let held_back = if full { self.present() } else { dirty } & !sendable;
        self.full_state = false;
        self.dirty = held_back;
        self.announce_uid = false;

        // WS-12, HTTP-17: never emit a message over the limit.
        if 1 + msg.encoded_len() > self.max_message_size {
            self.split_oversized(&mut msg);
        }
        if msg.available_components.is_some() {
            self.report_all_components = false;
        }
        // SEQ-1: one more per message sent.
        self.next_sequence_num = self.next_sequence_num.wrapping_add(1);
        msg
    }

    /// WS-12, HTTP-17: `msg` is over the size limit. The parts that fit go now, smallest
    /// first; the others stay pending for the next message (which goes at once), so nothing
    /// queued is lost. A part that alone is over the limit can never be sent: it is reported
    /// as [`Event::ReportTooLarge`] and sent again only once it changes.
    fn split_oversized(&mut self, msg: &mut AgentToServer) {
        let mut pieces: Vec<(u16, &'static str, AgentToServer)> = Vec::new();
        macro_rules! piece {
            ($field:ident, $bit:expr) => {
                if let Some(v) = msg.$field.take() {
                    pieces.push((
                        $bit,
                        stringify!($field),
                        AgentToServer {
                            $field: Some(v),
                            ..Default::default()
                        },
                    ));
                }
            };
        }
        piece!(agent_description, DESCRIPTION);
        piece!(health, HEALTH);
        piece!(effective_config, EFFECTIVE_CONFIG);
        piece!(remote_config_status, REMOTE_CONFIG_STATUS);
        piece!(package_statuses, PACKAGE_STATUSES);
        piece!(custom_capabilities, CUSTOM_CAPABILITIES);
        piece!(available_components, AVAILABLE_COMPONENTS);
        piece!(connection_settings_status, CONNECTION_SETTINGS_STATUS);
        piece!(custom_message, CUSTOM_MESSAGE);
        piece!(connection_settings_request, CONNECTION_SETTINGS_REQUEST);
        pieces.sort_by_key(|(_, _, p)| p.encoded_len());

        let limit = self.max_message_size;
        let base = 1 + msg.encoded_len();
        let mut size = base;
        for (bit, name, piece) in pieces {
            let len = piece.encoded_len();
            if size + len <= limit {
                size += len;
                merge(msg, piece);
            } else if base + len > limit {
                self.dropped_outgoing += 1;
                tracing::warn!(
                    part = name,
                    size = base + len,
                    limit,
                    "a report part is over the message size limit on its own; not sent"
                );
                self.events.push_back(Event::ReportTooLarge(ReportTooLarge {
                    part: name,
                    size: base + len,
                    limit,
                }));
            } else {
                // It fits in a message of its own: the next one.
                match bit {
                    CUSTOM_MESSAGE => self.custom_message = piece.custom_message,
                    CONNECTION_SETTINGS_REQUEST => {
                        self.connection_settings_request = piece.connection_settings_request;
                    }
                    // AVC-4: the whole map again, if that is what was asked.
                    status_bit => self.dirty |= status_bit,
                }
            }
        }
    }
}

/// Moves the parts set in `piece` into `msg`.
fn merge(msg: &mut AgentToServer, piece: AgentToServer) {
    macro_rules! take {
        ($($field:ident),*) => {
            $(if piece.$field.is_some() {
                msg.$field = piece.$field;
            })*
        };
    }
    take!(
        agent_description,
        health,
        effective_config,
        remote_config_status,
        package_statuses,
        custom_capabilities,
        available_components,
        connection_settings_status,
        custom_message,
        connection_settings_request
    );
}

/// `t + d`, saturating far in the future instead of panicking.
fn add(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(t)
}

#[cfg(test)]
mod tests;
