//! The sans-IO protocol core: one [`AgentSession`] per agent.
//!
//! No sockets, no tasks, no clock: the driver passes each decoded `AgentToServer` and the
//! current time in, and passes every `ServerToAgent` it is about to send through the session
//! first. The same core serves WebSocket connections and plain-HTTP sessions (GEN-6).

use std::time::{Duration, Instant};

use bytes::Bytes;
use opamp_proto::{
    AgentCapabilitySet, AgentIdentification, AgentToServer, AgentToServerFlagSet, InstanceUid,
    ServerCapabilitySet, ServerToAgent, ServerToAgentFlagSet,
};

use crate::error::ReadMessageError;

mod claims;
mod table;
mod transmit;

pub use claims::{Claim, Resolution, Rival, UidHolder, UidRegistry};
pub use table::{EndReason, Refusal, SessionTable, TableConfig, TableEvent};
pub(crate) use transmit::Push;
pub use transmit::{DuplicateUidPolicy, SharedMessage, Transmit, Transport};
use transmit::{Reply, Special};

/// How a session behaves; the drivers derive it from the [`ServerConfig`](crate::ServerConfig)
/// ([`websocket`](Self::websocket) or [`plain_http`](Self::plain_http), then the `with_*`
/// setters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Capabilities advertised to the agent (CAP-3).
    pub server_capabilities: ServerCapabilitySet,
    /// Set `capabilities` in every reply, not just the first. Plain HTTP needs it: each poll
    /// may be the "first" for a client that restarted (CAP-3, checklist ambiguity 4).
    pub capabilities_in_every_reply: bool,
    /// Minimum time between two `ReportFullState` requests (SEQ-2): the answer to a request,
    /// or a client that skips sequence numbers, does not trigger another one in a loop.
    pub full_state_min_interval: Duration,
    /// Whether an offer (`remote_config`, `connection_settings`, `packages_available`)
    /// already sent in this session is not sent again until the agent reports another hash.
    ///
    /// True for a WebSocket connection: one ordered stream that delivers every message or
    /// breaks, and a new connection is a new session. False for plain HTTP: a response can
    /// be lost without the server noticing, so only the agent's own report of the offered
    /// hash stops the offer (RC-6: while they differ, the server MUST include it).
    pub sent_offers_suppress_resend: bool,
    /// Whether messages of a second agent with this session's uid are told apart by their
    /// interleaving sequence numbers and flagged [`Received::duplicate`] (UID-8). True for
    /// plain HTTP, where every poller with one uid lands in one session; false for a
    /// WebSocket connection, which carries one agent (duplicates across connections are
    /// the drivers' to detect).
    pub detect_interleaved_sequences: bool,
    /// The transport: a WebSocket session sends pushes, and what an exclusive message kept
    /// out (S2A-1, S2A-2), on its own; a plain-HTTP session only ever answers a request
    /// (HTTP-9), and its messages carry no framing header.
    pub transport: Transport,
    /// The largest `ServerToAgent` the session emits from
    /// [`poll_transmit`](AgentSession::poll_transmit), WebSocket framing byte included
    /// (WS-11, HTTP-16); a larger one goes out as a bare acknowledgement. Default 64 MiB.
    pub max_message_size: usize,
}

impl SessionConfig {
    /// Settings for a WebSocket connection: capabilities in the first message only.
    pub fn websocket(server_capabilities: ServerCapabilitySet) -> Self {
        Self {
            server_capabilities: server_capabilities | ServerCapabilitySet::ACCEPTS_STATUS,
            capabilities_in_every_reply: false,
            full_state_min_interval: crate::config::DEFAULT_FULL_STATE_MIN_INTERVAL,
            sent_offers_suppress_resend: true,
            detect_interleaved_sequences: false,
            transport: Transport::WebSocket,
            max_message_size: opamp_proto::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Settings for a plain-HTTP session: capabilities in every response, offers repeated
    /// until the agent reports their hash (RC-6).
    pub fn plain_http(server_capabilities: ServerCapabilitySet) -> Self {
        Self {
            capabilities_in_every_reply: true,
            sent_offers_suppress_resend: false,
            detect_interleaved_sequences: true,
            transport: Transport::PlainHttp,
            ..Self::websocket(server_capabilities)
        }
    }

    /// Sets [`full_state_min_interval`](Self::full_state_min_interval).
    pub fn with_full_state_min_interval(mut self, interval: Duration) -> Self {
        self.full_state_min_interval = interval;
        self
    }

    /// Sets [`max_message_size`](Self::max_message_size).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }
}

/// What [`AgentSession::handle_message`] learned from a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Received {
    /// The instance uid the message carries.
    pub instance_uid: InstanceUid,
    /// This is the first message of the session (or of a new agent on the same stream).
    pub first: bool,
    /// The agent announced `agent_disconnect` (DIS-1, DIS-2): forget it after replying.
    pub disconnect: bool,
    /// The message repeats the previous sequence number: a retry (RETRY-2), answered normally.
    pub repeated: bool,
    /// The agent switched to a uid the server assigned (UID-7); this was its old uid.
    pub switched_from: Option<InstanceUid>,
    /// The message comes from a **second agent** using this session's uid (UID-8): its
    /// sequence numbers interleave with the session's own (see
    /// [`AgentSession`], "Duplicate uids"). The session's state was left as it was; do not
    /// hand the message to the application as the session's agent's. Ask the application
    /// and give its answer to [`resolve_duplicate`](AgentSession::resolve_duplicate).
    pub duplicate: bool,
    /// The message's uid is 16 bytes but identifies no agent (the nil or max UUID,
    /// [`is_usable_instance_uid`]): the session was left as it was, and answers with a new
    /// uid (UID-8) from [`poll_transmit`](AgentSession::poll_transmit) once the driver
    /// provided one. Do not hand the message to the application.
    pub unusable_uid: bool,
}

/// Whether `uid` can identify an agent: the all-zero (nil) and all-one (max) UUIDs are
/// what broken generators and zeroed buffers produce, never a real uid (UID-1, UID-2 say
/// 16 bytes and SHOULD be a UUID v7), and two agents sending one of them would share one
/// session. The session answers such a uid with a new one ([`Received::unusable_uid`],
/// [`reassign_reply`], UID-8), and the plain-HTTP driver keys no session by it.
pub fn is_usable_instance_uid(uid: &InstanceUid) -> bool {
    uid.as_array() != &[0; 16] && uid.as_array() != &[0xff; 16]
}

/// The answer to a message whose uid cannot be kept (UID-8: a duplicate or unusable uid):
/// the message's own uid (UID-6), `new_instance_uid` (UID-7) and the server capabilities.
/// Stateless: the agent switches to `new_uid` and is a new agent from then on, asked for
/// its full state by the session that its next message finds or creates (SEQ-2).
pub fn reassign_reply(
    sent_uid: InstanceUid,
    new_uid: InstanceUid,
    server_capabilities: ServerCapabilitySet,
) -> ServerToAgent {
    ServerToAgent {
        instance_uid: sent_uid.to_bytes(),
        capabilities: (server_capabilities | ServerCapabilitySet::ACCEPTS_STATUS).bits(),
        agent_identification: Some(AgentIdentification {
            new_instance_uid: new_uid.to_bytes(),
        }),
        ..ServerToAgent::default()
    }
}

/// Messages of a new lineage after a jump in sequence numbers during which the old lineage
/// is still watched for (UID-8 detection); a real restart or loss never returns to it.
const LINEAGE_WATCH_STEPS: u8 = 8;

/// How to send a shared message to one agent; from
/// [`AgentSession::prepare_shared_push`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PushPlan {
    /// Nothing to send: the agent cannot take it or already has it.
    Skip,
    /// Send these per-agent fields followed by the shared encoding.
    Shared(ServerToAgent),
    /// The session changed the message for this agent: send this one instead.
    Owned(ServerToAgent),
}

/// Whether `a` and `b` differ at most in the fields the session sets per agent.
fn same_except_per_agent_fields(a: &ServerToAgent, b: &ServerToAgent) -> bool {
    // Destructured in full so that a field added to the schema is a compile error here.
    let ServerToAgent {
        instance_uid: _,
        capabilities: _,
        flags: _,
        agent_identification: _,
        error_response,
        remote_config,
        connection_settings,
        packages_available,
        command,
        custom_capabilities,
        custom_message,
    } = a;
    *error_response == b.error_response
        && *remote_config == b.remote_config
        && *connection_settings == b.connection_settings
        && *packages_available == b.packages_available
        && *command == b.command
        && *custom_capabilities == b.custom_capabilities
        && *custom_message == b.custom_message
}

/// The protocol state of one agent, free of I/O.
///
/// # Calling contract
///
/// The handle/poll contract of quinn-proto: inputs take `now` (a monotonic clock the driver
/// owns; tests pass a virtual one), outputs come out of `#[must_use]` `poll_*` methods.
///
/// - [`handle_message`](Self::handle_message) with every decoded `AgentToServer`, in order,
///   before handing the message to the application (not at all when the result says
///   [`unusable_uid`](Received::unusable_uid), or [`duplicate`](Received::duplicate) until
///   [`resolve_duplicate`](Self::resolve_duplicate) allowed it);
///   [`handle_malformed`](Self::handle_malformed) for one that could not be decoded (ERR-1).
/// - Then, when [`needs_instance_uid`](Self::needs_instance_uid) says so, draw a new uid
///   (UUID v7, UID-2) and give it with [`provide_instance_uid`](Self::provide_instance_uid):
///   the core reads neither the clock nor randomness of the system.
/// - [`respond`](Self::respond) with the application's answer to the handled message
///   (every message gets exactly one reply, REP-4, RETRY-2);
///   [`queue`](Self::queue) / [`queue_shared`](Self::queue_shared) for pushes.
/// - After every input, send what [`poll_transmit`](Self::poll_transmit) gives until it
///   gives `None`: the session decides what goes out when (held pushes, exclusive messages
///   and what they kept out, the size limit), the same for both transports.
/// - Call [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout)
///   has passed.
///
/// The lower-level [`prepare_reply`](Self::prepare_reply), [`prepare_push`](Self::prepare_push)
/// and [`prepare_shared_push`](Self::prepare_shared_push) complete one message at once,
/// without holding, merging or the size limit; `poll_transmit` is built on them.
///
/// What the session does to outgoing messages:
/// - sets `instance_uid` to the uid of the message it relates to (UID-6);
/// - sets `capabilities` in the first message (every message for plain HTTP) (CAP-3);
/// - sets the `ReportFullState` flag when a message was lost: a gap in `sequence_num`, or
///   the first message of an agent the server does not know that lacks full state (SEQ-2).
///   A repeated number is a retry and triggers nothing; a skip asks once; a gap within
///   [`SessionConfig::full_state_min_interval`] of the last request is asked for when that
///   interval has passed, with the next message the agent gets (never dropped, never a loop);
/// - answers `RequestInstanceUid` with `agent_identification.new_instance_uid` (UID-5),
///   unless the application already set one; a `new_instance_uid` that is not 16 bytes is
///   dropped (UID-7);
/// - removes offers the agent has no capability for, or the server did not advertise (CAP-4);
/// - removes a `remote_config`, `connection_settings` or `packages_available` whose hash the
///   agent already reports, or that was already sent and not contradicted since (RC-4, RC-6,
///   PKG-15, CS hashes); "already sent" counts only within one WebSocket connection
///   ([`SessionConfig::sent_offers_suppress_resend`]): over plain HTTP a lost response
///   must not strand an offer, so it goes out until the agent reports its hash (RC-6);
/// - keeps `error_response` exclusive (S2A-1) and `command` alone with the capabilities
///   (S2A-2); anything owed (flags, capabilities, uid) then goes out with the next message.
///
/// # Duplicate uids (UID-8)
///
/// A session serves one uid. If two live agents share it (a cloned VM, a bad generator),
/// their messages reach the same session over plain HTTP, each with its own sequence
/// numbers. The session tells them apart by their numbers: after a jump (a number that is
/// not the last + 1 nor a repeat), it remembers where the old sequence stood; if a later
/// message continues that old sequence, two counters are interleaving. The agent of the
/// older sequence keeps the session; from then on, a message that continues the other
/// sequence is flagged [`Received::duplicate`] and leaves the session untouched. A restart
/// (counter reset) or lost messages never return to the old sequence, so they are not
/// mistaken for a duplicate; the old sequence is only watched for a few messages.
///
/// Limits: the first message(s) of the second agent are taken for the first agent's (they
/// look like a restart) until the interleaving shows; two agents whose numbers stay equal
/// (same counter at the same time) look like retries and are not told apart. Only sessions
/// with [`SessionConfig::detect_interleaved_sequences`] (plain HTTP) do this; WebSocket
/// duplicates (two connections, one uid) are detected by the drivers across connections.
/// A detected duplicate is answered per the application's [`DuplicateUidPolicy`]
/// ([`resolve_duplicate`](Self::resolve_duplicate)); a nil or max uid is answered with a
/// new one and never becomes the session's ([`Received::unusable_uid`]).
#[derive(Debug)]
pub struct AgentSession {
    config: SessionConfig,
    uid: Option<InstanceUid>,
    assigned_uid: Option<InstanceUid>,
    last_seq: Option<u64>,
    /// UID-8: the last number of the sequence before the latest jump, while watched.
    jumped_from: Option<u64>,
    /// Messages since the latest jump (the watch ends at [`LINEAGE_WATCH_STEPS`]).
    steps_since_jump: u8,
    /// UID-8: the last number of the second agent's sequence, once detected.
    intruder_seq: Option<u64>,
    agent_capabilities: AgentCapabilitySet,
    owe: Owed,
    last_full_state_request: Option<Instant>,
    remote_config: OfferHashes,
    connection_settings: OfferHashes,
    packages: OfferHashes,
    /// What the exclusivity of an `error_response` (S2A-1) or a `command` (S2A-2) kept out
    /// of a message: it goes out with the next one, never silently dropped. Boxed: a
    /// `ServerToAgent` is large and this is rarely set.
    deferred: Option<Box<ServerToAgent>>,
    /// The reply to the last handled message: awaited from the application, or ready
    /// (with `reply_msg`, the application's answer, if it had one).
    reply: Reply,
    reply_msg: Option<Box<ServerToAgent>>,
    /// Pushes not sent yet, merged (later fields win). Boxed as queued: no copy.
    pending: Option<Box<Push>>,
    /// A stateless answer due (UID-8 reassignment or refusal, ERR-1).
    special: Option<Box<Special>>,
    /// A reply went out in this session: WebSocket pushes are held until then (CAP-4).
    answered: bool,
    /// The last `heartbeat_interval_seconds` the session sent the agent (HB-2).
    /// Stored as seconds + 1 (`NonZeroU32`: four bytes for the option; an offer beyond
    /// `u32::MAX - 1` seconds, far past `MAX_TIMEOUT`, saturates).
    offered_heartbeat: Option<std::num::NonZeroU32>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    capabilities: bool,
    full_state: bool,
    /// A gap was seen while a recent request was still in its rate-limit window: ask once
    /// the window has passed (SEQ-2 is a MUST; the window only prevents loops).
    full_state_deferred: bool,
    uid: bool,
}

/// The last hash of one kind of offer that the server sent and that the agent reported.
///
/// Hashes are copied out of the message: keeping a `Bytes` slice would keep the whole
/// received frame alive.
#[derive(Debug, Default)]
struct OfferHashes {
    sent: Option<Box<[u8]>>,
    reported: Option<Box<[u8]>>,
}

impl OfferHashes {
    fn on_report(&mut self, hash: &[u8]) {
        // A report of another hash means the agent does not have (or dropped) what was sent:
        // it must be offered again (RC-6).
        if self.sent.as_deref() != Some(hash) {
            self.sent = None;
        }
        if self.reported.as_deref() != Some(hash) {
            self.reported = Some(hash.into());
        }
    }

    /// An offer with this hash would tell the agent nothing new. An empty hash is never
    /// redundant: without a hash nothing can be compared.
    fn is_redundant(&self, hash: &[u8], sent_counts: bool) -> bool {
        !hash.is_empty()
            && (self.reported.as_deref() == Some(hash)
                || (sent_counts && self.sent.as_deref() == Some(hash)))
    }

    fn on_sent(&mut self, hash: &Bytes) {
        if !hash.is_empty() {
            self.sent = Some(hash[..].into());
        }
    }
}

impl AgentSession {
    /// A session that has seen no message yet.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            uid: None,
            assigned_uid: None,
            last_seq: None,
            jumped_from: None,
            steps_since_jump: 0,
            intruder_seq: None,
            agent_capabilities: AgentCapabilitySet::empty(),
            owe: Owed {
                capabilities: true,
                ..Owed::default()
            },
            last_full_state_request: None,
            remote_config: OfferHashes::default(),
            connection_settings: OfferHashes::default(),
            packages: OfferHashes::default(),
            deferred: None,
            reply: Reply::Idle,
            reply_msg: None,
            pending: None,
            special: None,
            answered: false,
            offered_heartbeat: None,
        }
    }

    /// Whether a part of an earlier message waits to go out (kept out by S2A-1 or S2A-2).
    /// Over WebSocket [`poll_transmit`](Self::poll_transmit) sends it at once; over plain
    /// HTTP it rides on the next response.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// The agent's instance uid, once a message has been handled.
    pub fn instance_uid(&self) -> Option<InstanceUid> {
        self.uid
    }

    /// A uid the server assigned and the agent has not switched to yet (UID-5).
    pub fn assigned_instance_uid(&self) -> Option<InstanceUid> {
        self.assigned_uid
    }

    /// Whether the agent asked for an instance uid (UID-5) and none is chosen yet. The
    /// driver then calls [`provide_instance_uid`](Self::provide_instance_uid) with a fresh
    /// one (UID-2: a UUID v7) before it prepares the reply; until it does, the request
    /// stays owed and no uid goes out.
    #[must_use]
    pub fn needs_instance_uid(&self) -> bool {
        (self.owe.uid && self.assigned_uid.is_none())
            || matches!(
                self.special.as_deref(),
                Some(Special::Reassign { new: None, .. })
            )
    }

    /// Supplies the uid to assign when [`needs_instance_uid`](Self::needs_instance_uid)
    /// says so. Ignored when a uid is already assigned (a repeated request gets the same
    /// one until the agent switches, UID-7) or none was asked for.
    pub fn provide_instance_uid(&mut self, uid: InstanceUid) {
        if let Some(Special::Reassign {
            new: new @ None, ..
        }) = self.special.as_deref_mut()
        {
            // UID-8: the newcomer's (or an unusable uid's) replacement, never this agent's.
            *new = Some(uid);
        } else if self.owe.uid && self.assigned_uid.is_none() {
            self.assigned_uid = Some(uid);
        }
    }

    /// The agent's last reported capabilities (CAP-2); empty before the first message.
    pub fn agent_capabilities(&self) -> AgentCapabilitySet {
        self.agent_capabilities
    }

    /// Whether a `ReportFullState` request is waiting to go out with the next message.
    pub fn full_state_pending(&self) -> bool {
        self.owe.full_state
    }

    /// Takes in one decoded message. An error means the message must be answered with
    /// `BAD_REQUEST` (ERR-1) and not given to the application.
    pub fn handle_message(
        &mut self,
        now: Instant,
        msg: &AgentToServer,
    ) -> Result<Received, ReadMessageError> {
        // UID-2: the uid is the key of everything else; reject before touching state.
        let uid = InstanceUid::try_from(&msg.instance_uid[..])?;
        if !is_usable_instance_uid(&uid) {
            // UID-8: a nil (or max) uid gets a new one and touches no state.
            self.special = Some(Box::new(Special::Reassign {
                sent: uid,
                new: None,
            }));
            return Ok(Received {
                instance_uid: uid,
                first: false,
                disconnect: msg.agent_disconnect.is_some(),
                repeated: false,
                switched_from: None,
                duplicate: false,
                unusable_uid: true,
            });
        }
        let mut switched_from = None;
        match self.uid {
            Some(current) if current == uid => {}
            Some(current) if self.assigned_uid == Some(uid) => {
                // UID-7: the agent adopted the uid we assigned.
                switched_from = Some(current);
                self.assigned_uid = None;
            }
            Some(_) => {
                // Another agent on this stream (WS-21, or a restarted agent with a new uid):
                // nothing known about the previous one applies to it.
                // Pushes queued for the connection stay queued for it.
                let pending = self.pending.take();
                *self = Self::new(self.config);
                self.pending = pending;
            }
            None => {}
        }
        self.uid = Some(uid);

        // UID-8: a message continuing the second agent's sequence leaves the session alone.
        let seq = msg.sequence_num;
        if self.config.detect_interleaved_sequences
            && let (Some(intruder), Some(last)) = (self.intruder_seq, self.last_seq)
            && seq != last.wrapping_add(1)
            && seq != last
            && (seq == intruder.wrapping_add(1) || seq == intruder)
        {
            self.intruder_seq = Some(seq);
            self.steps_since_jump = 0;
            return Ok(Received {
                instance_uid: uid,
                first: false,
                disconnect: msg.agent_disconnect.is_some(),
                repeated: seq == intruder,
                switched_from,
                duplicate: true,
                unusable_uid: false,
            });
        }

        // CAP-1 says capabilities are always set; a sloppy poll with 0 keeps the last set
        // rather than revoking everything (CAP-2 applies to real changes).
        if msg.capabilities != 0 {
            self.agent_capabilities = AgentCapabilitySet::from_bits_retain(msg.capabilities);
        }

        let first = self.last_seq.is_none();
        let mut repeated = false;
        match self.last_seq {
            // An agent we do not know must send everything; its first report is complete
            // only if it describes the agent (REP-3: a WS reconnect may omit fields).
            None => {
                if msg.agent_description.is_none() {
                    self.request_full_state(now);
                }
            }
            Some(last) if seq == last.wrapping_add(1) => self.step_after_jump(),
            // RETRY-2: the same message again; answer it, ask for nothing.
            Some(last) if seq == last => repeated = true,
            // SEQ-2: a gap (or a restart that reset the counter): something was lost.
            Some(last) => {
                if self.config.detect_interleaved_sequences
                    && self
                        .jumped_from
                        .is_some_and(|j| seq == j.wrapping_add(1) || seq == j)
                {
                    // UID-8: back on the sequence from before the jump: two counters
                    // interleave. This message is the older agent's; the jump was the other's.
                    self.intruder_seq = Some(last);
                    self.jumped_from = None;
                } else {
                    self.jumped_from = Some(last);
                }
                self.steps_since_jump = 0;
                // Either way the state may be incomplete (or another agent's): SEQ-2.
                self.request_full_state(now);
            }
        }
        self.last_seq = Some(seq);

        if AgentToServerFlagSet::from_bits_retain(msg.flags)
            .contains(AgentToServerFlagSet::REQUEST_INSTANCE_UID)
        {
            // UID-5. A repeated request gets the same uid until the agent switches. The uid
            // itself comes from the driver (`provide_instance_uid`): the core draws no
            // randomness and reads no clock of its own.
            self.owe.uid = true;
        }

        if let Some(status) = &msg.remote_config_status {
            self.remote_config
                .on_report(&status.last_remote_config_hash);
        }
        if let Some(status) = &msg.connection_settings_status {
            self.connection_settings
                .on_report(&status.last_connection_settings_hash);
        }
        if let Some(statuses) = &msg.package_statuses {
            self.packages
                .on_report(&statuses.server_provided_all_packages_hash);
        }
        // REP-4: this message is answered, with what the application says (`respond`).
        self.reply = Reply::Awaiting;

        Ok(Received {
            instance_uid: uid,
            first,
            disconnect: msg.agent_disconnect.is_some(),
            repeated,
            switched_from,
            duplicate: false,
            unusable_uid: false,
        })
    }

    /// One more message in order; ends the UID-8 watch after a few.
    fn step_after_jump(&mut self) {
        if self.jumped_from.is_some() || self.intruder_seq.is_some() {
            self.steps_since_jump = self.steps_since_jump.saturating_add(1);
            if self.steps_since_jump >= LINEAGE_WATCH_STEPS {
                self.jumped_from = None;
                self.intruder_seq = None;
            }
        }
    }

    fn request_full_state(&mut self, now: Instant) {
        if self.full_state_requested_recently(now) {
            self.owe.full_state_deferred = true;
        } else {
            self.owe.full_state = true;
        }
    }

    fn full_state_requested_recently(&self, now: Instant) -> bool {
        self.last_full_state_request.is_some_and(|at| {
            now.saturating_duration_since(at) < self.config.full_state_min_interval
        })
    }

    /// Completes the reply to the last handled message. `reply` is what the application
    /// returned (`None`: nothing to say; an acknowledgement still goes out, REP-4).
    #[must_use]
    pub fn prepare_reply(&mut self, now: Instant, reply: Option<ServerToAgent>) -> ServerToAgent {
        let mut msg = reply.unwrap_or_default();
        self.reply = Reply::Idle;
        self.reply_msg = None;
        self.answered = true;
        self.finish(&mut msg, now);
        msg
    }

    /// Completes an unsolicited message. Returns `None` when, after removing what the agent
    /// cannot take or already has, nothing is left to send. Call it only once a message of
    /// the agent was handled ([`instance_uid`](Self::instance_uid) is `Some`): before that
    /// its capabilities are unknown and the message would name no agent ([`queue`](Self::queue)
    /// holds pushes until then).
    #[must_use]
    pub fn prepare_push(&mut self, now: Instant, mut msg: ServerToAgent) -> Option<ServerToAgent> {
        self.complete_push(now, &mut msg).then_some(msg)
    }

    /// [`prepare_push`](Self::prepare_push) in place: whether `msg` is to be sent.
    fn complete_push(&mut self, now: Instant, msg: &mut ServerToAgent) -> bool {
        self.strip(msg);
        let has_content = msg.error_response.is_some()
            || msg.remote_config.is_some()
            || msg.connection_settings.is_some()
            || msg.packages_available.is_some()
            || msg.flags != 0
            || msg.agent_identification.is_some()
            || msg.command.is_some()
            || msg.custom_capabilities.is_some()
            || msg.custom_message.is_some();
        if !has_content && !self.owe.full_state && !self.owe.uid && self.deferred.is_none() {
            return false;
        }
        self.finish(msg, now);
        true
    }

    /// Plans sending a message shared by many agents (see
    /// [`SharedMessage`](crate::SharedMessage)): the same decisions as
    /// [`prepare_push`](Self::prepare_push), then whether the agent can take the shared
    /// encoding as it is, behind its own per-agent fields.
    #[must_use]
    pub fn prepare_shared_push(&mut self, now: Instant, shared: &ServerToAgent) -> PushPlan {
        let Some(out) = self.prepare_push(now, shared.clone()) else {
            return PushPlan::Skip;
        };
        if same_except_per_agent_fields(&out, shared) {
            PushPlan::Shared(ServerToAgent {
                instance_uid: out.instance_uid,
                capabilities: out.capabilities,
                flags: out.flags,
                agent_identification: out.agent_identification,
                ..ServerToAgent::default()
            })
        } else {
            PushPlan::Owned(out)
        }
    }

    /// Fills in what the session owes and removes what must not go out.
    fn finish(&mut self, msg: &mut ServerToAgent, now: Instant) {
        if let Some(earlier) = self.deferred.take() {
            // What an earlier message could not carry goes first. Two custom messages or two
            // commands do not fit in one message: then the earlier part goes now and this
            // message waits, so the order is kept and nothing is replaced.
            let later = std::mem::take(msg);
            let conflict = (earlier.custom_message.is_some() && later.custom_message.is_some())
                || (earlier.command.is_some() && later.command.is_some());
            *msg = *earlier;
            if conflict {
                self.deferred = Some(Box::new(later));
            } else {
                merge(msg, later);
            }
        }
        if let Some(uid) = self.uid {
            msg.instance_uid = uid.to_bytes();
        }
        if let Some(error) = msg.error_response.take() {
            // S2A-1: nothing may accompany an error; owed items and the rest of the message
            // wait for the next message.
            let rest = std::mem::take(msg);
            *msg = ServerToAgent {
                instance_uid: rest.instance_uid.clone(),
                error_response: Some(error),
                ..ServerToAgent::default()
            };
            self.defer(rest);
            return;
        }
        self.strip(msg);

        if let Some(command) = msg.command.take() {
            // S2A-2: a command goes alone with the capabilities; the agent would ignore the
            // rest, so the rest waits for the next message (not recorded as sent yet).
            let mut rest = std::mem::take(msg);
            *msg = ServerToAgent {
                instance_uid: rest.instance_uid.clone(),
                command: Some(command),
                capabilities: std::mem::take(&mut rest.capabilities),
                ..ServerToAgent::default()
            };
            self.attach_capabilities(msg);
            self.defer(rest);
            return;
        }

        self.attach_capabilities(msg);
        let mut flags = ServerToAgentFlagSet::from_bits_retain(msg.flags);
        if self.owe.full_state_deferred && !self.full_state_requested_recently(now) {
            self.owe.full_state_deferred = false;
            self.owe.full_state = true;
        }
        if self.owe.full_state {
            flags |= ServerToAgentFlagSet::REPORT_FULL_STATE;
            self.owe.full_state = false;
        }
        if flags.contains(ServerToAgentFlagSet::REPORT_FULL_STATE) {
            self.last_full_state_request = Some(now);
        }
        msg.flags = flags.bits();

        if let Some(ident) = &msg.agent_identification {
            // UID-7: the agent must switch to it, so it must be a valid uid.
            match InstanceUid::try_from(&ident.new_instance_uid[..]) {
                Ok(new_uid) => {
                    self.assigned_uid = Some(new_uid);
                    self.owe.uid = false;
                }
                Err(_) => {
                    tracing::warn!(
                        "dropping agent_identification: new_instance_uid is not 16 bytes (UID-7)"
                    );
                    msg.agent_identification = None;
                }
            }
        }
        if msg.agent_identification.is_none()
            && self.owe.uid
            && let Some(new_uid) = self.assigned_uid
        {
            msg.agent_identification = Some(AgentIdentification {
                new_instance_uid: new_uid.to_bytes(),
            });
            self.owe.uid = false;
        }

        if let Some(rc) = &msg.remote_config {
            self.remote_config.on_sent(&rc.config_hash);
        }
        if let Some(cs) = &msg.connection_settings {
            self.connection_settings.on_sent(&cs.hash);
            if let Some(opamp) = &cs.opamp {
                // HB-2: the agent heartbeats (plain HTTP: polls) at this interval from now.
                let secs = u32::try_from(opamp.heartbeat_interval_seconds).unwrap_or(u32::MAX);
                self.offered_heartbeat = std::num::NonZeroU32::new(secs.saturating_add(1));
            }
        }
        if let Some(pkgs) = &msg.packages_available {
            self.packages.on_sent(&pkgs.all_packages_hash);
        }
    }

    /// Keeps what an exclusive message left out for the next message (S2A-1, S2A-2).
    fn defer(&mut self, mut rest: ServerToAgent) {
        rest.instance_uid = Bytes::new();
        rest.capabilities = 0;
        if rest == ServerToAgent::default() {
            return;
        }
        match self.deferred.as_mut() {
            // Only after a conflict above: `rest` came first, the waiting message after it.
            Some(waiting) => {
                let later = std::mem::replace(waiting.as_mut(), rest);
                merge(waiting, later);
            }
            None => self.deferred = Some(Box::new(rest)),
        }
    }

    fn attach_capabilities(&mut self, msg: &mut ServerToAgent) {
        if msg.capabilities != 0 {
            // The application chose; keep defined bits only (CAP-3, CAP-5).
            msg.capabilities = (ServerCapabilitySet::from_bits_truncate(msg.capabilities)
                | ServerCapabilitySet::ACCEPTS_STATUS)
                .bits();
            self.owe.capabilities = false;
        } else if self.owe.capabilities || self.config.capabilities_in_every_reply {
            msg.capabilities = self.config.server_capabilities.bits();
            self.owe.capabilities = false;
        }
    }

    /// CAP-4 and the offer hashes: removes offers the agent cannot take, the server did not
    /// advertise, or the agent already has.
    fn strip(&self, msg: &mut ServerToAgent) {
        let agent = self.agent_capabilities;
        let server = self.config.server_capabilities;
        // RC-6: within one WebSocket stream "sent" means delivered; otherwise only the
        // agent's report of the hash does.
        let sent_counts = self.config.sent_offers_suppress_resend;
        let able =
            |a: AgentCapabilitySet, s: ServerCapabilitySet| agent.contains(a) && server.contains(s);

        if let Some(rc) = &msg.remote_config
            && (!able(
                AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG,
                ServerCapabilitySet::OFFERS_REMOTE_CONFIG,
            ) || self
                .remote_config
                .is_redundant(&rc.config_hash, sent_counts))
        {
            msg.remote_config = None;
        }
        if let Some(pkgs) = &msg.packages_available
            && (!able(
                AgentCapabilitySet::ACCEPTS_PACKAGES,
                ServerCapabilitySet::OFFERS_PACKAGES,
            ) || self
                .packages
                .is_redundant(&pkgs.all_packages_hash, sent_counts))
        {
            msg.packages_available = None;
        }
        if let Some(cs) = &mut msg.connection_settings {
            let keep = server.contains(ServerCapabilitySet::OFFERS_CONNECTION_SETTINGS)
                && !self.connection_settings.is_redundant(&cs.hash, sent_counts);
            if keep {
                if !agent.contains(AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS) {
                    cs.opamp = None;
                }
                if let Some(opamp) = &mut cs.opamp
                    && !agent.contains(AgentCapabilitySet::REPORTS_HEARTBEAT)
                {
                    opamp.heartbeat_interval_seconds = 0;
                }
                if !agent.contains(AgentCapabilitySet::REPORTS_OWN_METRICS) {
                    cs.own_metrics = None;
                }
                if !agent.contains(AgentCapabilitySet::REPORTS_OWN_TRACES) {
                    cs.own_traces = None;
                }
                if !agent.contains(AgentCapabilitySet::REPORTS_OWN_LOGS) {
                    cs.own_logs = None;
                }
                if !agent.contains(AgentCapabilitySet::ACCEPTS_OTHER_CONNECTION_SETTINGS) {
                    cs.other_connections.clear();
                }
            }
            let empty = cs.opamp.is_none()
                && cs.own_metrics.is_none()
                && cs.own_traces.is_none()
                && cs.own_logs.is_none()
                && cs.other_connections.is_empty();
            if !keep || empty {
                msg.connection_settings = None;
            }
        }
        if msg.command.is_some() && !agent.contains(AgentCapabilitySet::ACCEPTS_RESTART_COMMAND) {
            msg.command = None;
        }
        if !agent.contains(AgentCapabilitySet::REPORTS_AVAILABLE_COMPONENTS) {
            msg.flags &= !ServerToAgentFlagSet::REPORT_AVAILABLE_COMPONENTS.bits();
        }
    }
}

/// Merges a later message into an earlier one: fields set in `later` replace those of
/// `into`; flags are combined. Callers keep two custom messages apart (one fits a message).
pub(crate) fn merge(into: &mut ServerToAgent, later: ServerToAgent) {
    let ServerToAgent {
        instance_uid,
        error_response,
        remote_config,
        connection_settings,
        packages_available,
        flags,
        capabilities,
        agent_identification,
        command,
        custom_capabilities,
        custom_message,
    } = later;
    if !instance_uid.is_empty() {
        into.instance_uid = instance_uid;
    }
    macro_rules! take_some {
        ($($field:ident),*) => {$(
            if $field.is_some() {
                into.$field = $field;
            }
        )*};
    }
    take_some!(
        error_response,
        remote_config,
        connection_settings,
        packages_available,
        agent_identification,
        command,
        custom_capabilities,
        custom_message
    );
    into.flags |= flags;
    if capabilities != 0 {
        into.capabilities = capabilities;
    }
}

#[cfg(test)]
mod tests;
