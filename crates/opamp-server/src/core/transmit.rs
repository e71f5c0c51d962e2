//! The handle/poll contract of [`AgentSession`], as in quinn-proto: the driver feeds inputs
//! (`handle_message`, `respond`, `queue`, `handle_timeout`) and sends what
//! [`poll_transmit`](AgentSession::poll_transmit) gives until it gives nothing. Which
//! message goes out when, merged with what, and whether it fits, is decided here once for
//! both transports.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opamp_proto::{AgentCapabilitySet, InstanceUid, Message, ServerToAgent};

use super::{AgentSession, PushPlan, merge, reassign_reply};
use crate::config::{ConnectionLimits, DEFAULT_AGENT_HEARTBEAT_INTERVAL, MAX_TIMEOUT};
use crate::error::ReadMessageError;

/// The transport of a session (and of a [`Connection`](crate::Connection)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// A WebSocket connection (full duplex).
    WebSocket,
    /// A plain-HTTP polling session.
    PlainHttp,
}

/// What to do with the newcomer of a duplicate uid (UID-8); the application's answer to
/// [`Received::duplicate`](super::Received::duplicate), given to
/// [`AgentSession::resolve_duplicate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DuplicateUidPolicy {
    /// Send the newcomer a fresh uid in `agent_identification.new_instance_uid` (UID-8,
    /// UID-7); it becomes a new agent. The default.
    #[default]
    Reassign,
    /// Refuse the newcomer (UID-8 allows it): its WebSocket connection is closed, or its
    /// plain-HTTP session ended; a poll into the kept agent's session gets `BAD_REQUEST`.
    Reject,
    /// Let both agents share the uid, as if nothing was detected (no further disputes
    /// between these two).
    Allow,
}

/// A message to push to many agents, encoded once.
///
/// [`Connection::send_shared`](crate::Connection::send_shared) (or
/// [`AgentSession::queue_shared`]) queues it without copying: every agent whose session
/// leaves the message as it is gets the same encoded bytes, behind a few bytes of its own
/// (`instance_uid`, `capabilities`, `flags`, `agent_identification`, which the protocol core
/// sets per agent): [`Transmit::Shared`]. Where the core must change the message for one
/// agent (an offer the agent has no capability for, a config it already reports), that
/// agent gets its own encoding. Cloning is cheap (two reference counts).
#[derive(Clone)]
pub struct SharedMessage {
    message: Arc<ServerToAgent>,
    /// The message without its per-agent fields, encoded.
    encoded: Bytes,
}

impl SharedMessage {
    /// Encodes `message` once for sending to many agents.
    pub fn new(message: ServerToAgent) -> Self {
        let shared = ServerToAgent {
            instance_uid: Bytes::new(),
            capabilities: 0,
            flags: 0,
            agent_identification: None,
            ..message.clone()
        };
        Self {
            encoded: Bytes::from(shared.encode_to_vec()),
            message: Arc::new(message),
        }
    }

    /// The message.
    pub fn message(&self) -> &ServerToAgent {
        &self.message
    }

    /// The message without its per-agent fields, encoded (protobuf, no framing).
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }
}

impl fmt::Debug for SharedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMessage")
            .field("message", &self.message)
            .field("encoded_len", &self.encoded.len())
            .finish()
    }
}

/// A push as queued: boxed by whoever queues it (a WebSocket connection's channel slot
/// stays one pointer wide), and moved into the session without a copy.
#[allow(clippy::large_enum_variant)] // always boxed: the variants' sizes do not matter
#[derive(Debug)]
pub(crate) enum Push {
    Message(ServerToAgent),
    Shared(SharedMessage),
}

impl Push {
    /// The push as one owned message (a shared one is copied).
    pub(crate) fn into_message(self) -> ServerToAgent {
        match self {
            Self::Message(m) => m,
            Self::Shared(s) => (*s.message).clone(),
        }
    }

    /// Turns a shared push into an owned one in place (the box is kept).
    pub(crate) fn make_owned(&mut self) -> &mut ServerToAgent {
        if let Self::Shared(s) = self {
            *self = Self::Message((*s.message).clone());
        }
        match self {
            Self::Message(m) => m,
            Self::Shared(_) => unreachable!("made owned above"),
        }
    }
}

/// A message to send, from [`AgentSession::poll_transmit`]. It fits
/// [`SessionConfig::max_message_size`](super::SessionConfig::max_message_size).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Transmit {
    /// Send this message.
    Message(ServerToAgent),
    /// Send `head` (the per-agent fields) followed by `shared.encoded()`: protobuf fields
    /// may come in any order, and the two sets never overlap. A WebSocket driver frames
    /// `head` (header 0x00) and appends the shared bytes as they are.
    Shared {
        /// The per-agent fields: `instance_uid`, `capabilities`, `flags`,
        /// `agent_identification`.
        head: ServerToAgent,
        /// The message every agent shares.
        shared: SharedMessage,
    },
}

impl Transmit {
    /// The message as one `ServerToAgent` (a shared one is copied).
    pub fn into_message(self) -> ServerToAgent {
        match self {
            Self::Message(m) => m,
            Self::Shared { head, shared } => {
                let mut out = (*shared.message).clone();
                merge(&mut out, head);
                out
            }
        }
    }
}

/// Where the reply to the last handled message stands (REP-4).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    /// No message waits for its reply.
    #[default]
    Idle,
    /// A message was handled; the application's answer is awaited (`respond`).
    Awaiting,
    /// The application answered; its reply (if any) is in `reply_msg`.
    Ready,
}

/// A stateless answer due, outside the session's own exchange.
#[derive(Debug, Clone)]
pub(super) enum Special {
    /// UID-8: tell the sender of `sent` to switch to `new` (once the driver provided it).
    Reassign {
        sent: InstanceUid,
        new: Option<InstanceUid>,
    },
    /// UID-8 (refused duplicate) or ERR-1 (malformed message): `BAD_REQUEST`.
    BadRequest {
        sent: Option<InstanceUid>,
        message: Box<str>,
    },
}

impl AgentSession {
    /// Queues a push (an unsolicited message) for the agent.
    ///
    /// Pushes queued before the agent's first message are held and ride on the first reply:
    /// until then its capabilities are unknown and every offer would be stripped (CAP-4).
    /// Over WebSocket later pushes go out on their own, at the next
    /// [`poll_transmit`](Self::poll_transmit); over plain HTTP they ride on the next reply
    /// (HTTP-9). Pushes not sent yet merge into one (later fields win; RETRY-4), so what a
    /// session holds stays bounded.
    pub fn queue(&mut self, msg: ServerToAgent) {
        self.queue_boxed(Box::new(Push::Message(msg)));
    }

    /// Queues a push shared by many agents, as [`queue`](Self::queue); it goes out as
    /// [`Transmit::Shared`] when the session leaves it as it is.
    pub fn queue_shared(&mut self, msg: &SharedMessage) {
        self.queue_boxed(Box::new(Push::Shared(msg.clone())));
    }

    /// [`queue`](Self::queue) of a push already boxed (no copy).
    pub(crate) fn queue_boxed(&mut self, push: Box<Push>) {
        match self.pending.as_mut() {
            None => self.pending = Some(push),
            Some(waiting) => {
                let later = push.into_message();
                merge(waiting.make_owned(), later);
            }
        }
    }

    /// Whether a push waits to go out (held before the first reply, or over plain HTTP
    /// for the next poll).
    pub fn has_pending_push(&self) -> bool {
        self.pending.is_some()
    }

    /// Gives the application's reply to the last handled message (`None`: nothing to say;
    /// an acknowledgement still goes out, REP-4). [`poll_transmit`](Self::poll_transmit)
    /// then returns it, completed. Ignored when no handled message awaits a reply.
    pub fn respond(&mut self, reply: Option<ServerToAgent>) {
        self.respond_boxed(reply.map(Box::new));
    }

    /// [`respond`](Self::respond) with a reply already boxed (no copy).
    pub fn respond_boxed(&mut self, reply: Option<Box<ServerToAgent>>) {
        if self.reply == Reply::Awaiting {
            self.reply = Reply::Ready;
            self.reply_msg = reply;
        } else {
            tracing::debug!("respond without a message awaiting a reply; ignored");
        }
    }

    /// [`respond`](Self::respond) and the [`poll_transmit`](Self::poll_transmit) that gives
    /// the reply, in one step and without storing the reply, for a driver that sends it at
    /// once (plain HTTP: the response). `None` when no handled message awaits a reply, or a
    /// stateless answer comes first (then call `poll_transmit`).
    #[must_use]
    pub fn respond_now(&mut self, now: Instant, reply: Option<ServerToAgent>) -> Option<Transmit> {
        if self.reply != Reply::Awaiting || self.special.is_some() {
            self.respond(reply);
            return None;
        }
        self.reply = Reply::Idle;
        let mut out = Some(Transmit::Message(reply.unwrap_or_default()));
        if let Some(Transmit::Message(msg)) = &mut out {
            self.complete_reply(now, msg);
        }
        out
    }

    /// Applies the application's answer to a [`Received::duplicate`](super::Received)
    /// message (UID-8). `Reassign`: the newcomer is told to switch to a new uid (the driver
    /// provides it: [`needs_instance_uid`](Self::needs_instance_uid)); `Reject`: it gets
    /// `BAD_REQUEST`; both leave the session untouched and the message is not the
    /// application's. `Allow`: the message is handled as the session's agent's; hand it to
    /// the application and [`respond`](Self::respond).
    pub fn resolve_duplicate(&mut self, uid: InstanceUid, policy: DuplicateUidPolicy) {
        match policy {
            DuplicateUidPolicy::Allow => self.reply = Reply::Awaiting,
            DuplicateUidPolicy::Reject => {
                self.special = Some(Box::new(Special::BadRequest {
                    sent: Some(uid),
                    message: "instance_uid is in use by another agent".into(),
                }));
            }
            DuplicateUidPolicy::Reassign => {
                self.special = Some(Box::new(Special::Reassign {
                    sent: uid,
                    new: None,
                }));
            }
        }
    }

    /// A message that could not be decoded, or that [`handle_message`](Self::handle_message)
    /// refused: it is answered with `BAD_REQUEST` and the error's text (ERR-1), addressed to
    /// the session's agent when it is known (UID-6). The session state is unchanged.
    pub fn handle_malformed(&mut self, error: &ReadMessageError) {
        self.special = Some(Box::new(Special::BadRequest {
            sent: self.uid,
            message: error.to_string().into(),
        }));
    }

    /// Advances the session's timers to `now`: a `ReportFullState` request that the rate
    /// limit held back becomes due (SEQ-2); over WebSocket it then goes out on its own.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.owe.full_state_deferred && !self.full_state_requested_recently(now) {
            self.owe.full_state_deferred = false;
            self.owe.full_state = true;
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) has something to do next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.owe.full_state_deferred {
            return None;
        }
        self.last_full_state_request
            .map(|at| at + self.config.full_state_min_interval)
    }

    /// The next message to send, completed and within the size limit; call it until it
    /// returns `None` after every input.
    ///
    /// In order: a stateless answer (UID-8 reassignment or refusal, ERR-1); the reply to
    /// the handled message once the application [responded](Self::respond), carrying any
    /// held push (HTTP-9; the reply's own fields win, and a second custom message or
    /// command waits for the next message); then, over WebSocket only and once the first
    /// reply went out, pushes, what an error or command kept out of the previous message
    /// (S2A-1, S2A-2), and a `ReportFullState` request the rate limit delayed (SEQ-2). A
    /// message over [`max_message_size`](super::SessionConfig::max_message_size) is
    /// replaced by a bare acknowledgement (WS-11, HTTP-16) and its offers count as not sent.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.next_transmit(now, |t| t)
    }

    /// [`poll_transmit`](Self::poll_transmit), handing the message to `f` by reference
    /// (e.g. to encode it) instead of returning it: a `ServerToAgent` is 1.6 KiB, and a
    /// driver that only encodes it saves moving it out.
    #[must_use]
    pub fn poll_transmit_with<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(&Transmit) -> R,
    ) -> Option<R> {
        self.next_transmit(now, |t| f(&t))
    }

    #[inline]
    fn next_transmit<R>(&mut self, now: Instant, f: impl FnOnce(Transmit) -> R) -> Option<R> {
        if let Some(out) = self.take_special() {
            return Some(f(Transmit::Message(out)));
        }
        if self.reply == Reply::Ready {
            self.reply = Reply::Idle;
            // Built in its place: a `ServerToAgent` is 1.6 KiB.
            let mut out = Transmit::Message(
                self.reply_msg
                    .take()
                    .map_or_else(ServerToAgent::default, |b| *b),
            );
            if let Transmit::Message(msg) = &mut out {
                self.complete_reply(now, msg);
            }
            return Some(f(out));
        }
        let full_duplex = self.config.transport == Transport::WebSocket;
        if !full_duplex || self.uid.is_none() || !self.answered {
            return None;
        }
        if let Some(mut push) = self.pending.take() {
            // Completed where it was queued: a `ServerToAgent` is 1.6 KiB.
            if let Push::Message(msg) = &mut *push {
                if self.complete_push(now, msg) {
                    self.fit(msg);
                    let Push::Message(msg) = *push else {
                        unreachable!("matched above")
                    };
                    return Some(f(Transmit::Message(msg)));
                }
            } else if let Push::Shared(shared) = *push
                && let Some(out) = self.plan_shared(now, shared)
            {
                return Some(f(out));
            }
        }
        // Not while a reply is awaited: it will carry these anyway.
        if self.reply == Reply::Idle && (self.deferred.is_some() || self.owe.full_state) {
            return self
                .prepare_push(now, ServerToAgent::default())
                .map(|mut out| {
                    self.fit(&mut out);
                    f(Transmit::Message(out))
                });
        }
        None
    }

    /// The agent's heartbeat interval as far as the server knows it (HB-1, HB-2): `None`
    /// when it does not report heartbeats or was told to stop (an offered 0); the interval
    /// this session last offered; else the default of 30 s (WS-14, HTTP-7).
    pub fn agent_heartbeat_interval(&self) -> Option<Duration> {
        if !self
            .agent_capabilities
            .contains(AgentCapabilitySet::REPORTS_HEARTBEAT)
        {
            return None;
        }
        match self.offered_heartbeat_interval() {
            Some(Duration::ZERO) => None,
            Some(interval) => Some(interval.min(MAX_TIMEOUT)),
            None => Some(DEFAULT_AGENT_HEARTBEAT_INTERVAL),
        }
    }

    /// WebSocket liveness (HB-7): how long the agent may be silent before the connection is
    /// taken for dead (`None`: no limit), and after how much silence to ping it (`None`:
    /// never). An agent must be heard from within `heartbeat_timeout_factor` x its
    /// heartbeat interval ([`agent_heartbeat_interval`](Self::agent_heartbeat_interval)).
    /// One without heartbeats is pinged after each ping interval of silence; a heartbeating
    /// one only once a heartbeat is overdue (2/3 of its idle timeout, two intervals at the
    /// default factor), so one with a longer local interval than the server assumes is kept
    /// as long as it answers (WS-14: "unless locally configured").
    pub fn ws_liveness(&self, limits: &ConnectionLimits) -> (Option<Duration>, Option<Duration>) {
        let heartbeat = self.agent_heartbeat_interval();
        let idle = limits.ws_idle_timeout(heartbeat);
        let ping_after = match (heartbeat, limits.ws_ping_interval(), idle) {
            (_, None, _) => None,
            (None, Some(every), _) => Some(every),
            (Some(_), Some(_), Some(idle)) => Some(idle * 2 / 3),
            (Some(_), Some(_), None) => None,
        };
        (idle, ping_after)
    }

    /// The polling interval this session offered the agent
    /// (`heartbeat_interval_seconds`, HB-2, HB-5), if any.
    pub fn offered_heartbeat_interval(&self) -> Option<Duration> {
        self.offered_heartbeat
            .map(|stored| Duration::from_secs(u64::from(stored.get() - 1)))
    }

    fn take_special(&mut self) -> Option<ServerToAgent> {
        match *self.special.take()? {
            Special::Reassign {
                sent,
                new: Some(new),
            } => Some(reassign_reply(sent, new, self.config.server_capabilities)),
            waiting @ Special::Reassign { new: None, .. } => {
                // The driver has not provided the uid yet (`needs_instance_uid`).
                self.special = Some(Box::new(waiting));
                None
            }
            Special::BadRequest { sent, message } => {
                let mut out = crate::callbacks::bad_request(String::from(message));
                if let Some(uid) = sent {
                    out.instance_uid = uid.to_bytes();
                }
                Some(out)
            }
        }
    }

    /// Completes the reply in `msg` (the application's, or an empty one) with what it
    /// carries (HTTP-9, S2A-1, S2A-2, REP-4), in place: a `ServerToAgent` is 1.6 KiB, and
    /// every move of it costs.
    fn complete_reply(&mut self, now: Instant, msg: &mut ServerToAgent) {
        let carries_pushes = self.config.transport == Transport::PlainHttp || !self.answered;
        self.answered = true;
        let mut rest = None;
        if carries_pushes && let Some(push) = self.pending.take() {
            let mut pushed = push.into_message();
            // The fresh reply wins conflicts; a second custom message or command cannot
            // share a message and waits for the next one.
            if msg.custom_message.is_some() || msg.command.is_some() {
                let mut r = ServerToAgent::default();
                if msg.custom_message.is_some() {
                    r.custom_message = pushed.custom_message.take();
                }
                if msg.command.is_some() {
                    r.command = pushed.command.take();
                }
                rest = Some(r);
            }
            let reply = std::mem::replace(msg, pushed);
            merge(msg, reply);
        }
        self.finish(msg, now);
        if let Some(rest) = rest {
            self.defer(rest);
        }
        self.fit(msg);
    }

    /// A shared push as this agent gets it.
    fn plan_shared(&mut self, now: Instant, shared: SharedMessage) -> Option<Transmit> {
        match self.prepare_shared_push(now, shared.message()) {
            PushPlan::Shared(head) => {
                let size = self.framing() + head.encoded_len() + shared.encoded().len();
                if size > self.config.max_message_size {
                    tracing::warn!(size, "dropping a ServerToAgent over the size limit");
                    self.unsend(shared.message());
                    return Some(Transmit::Message(bare(head)));
                }
                Some(Transmit::Shared { head, shared })
            }
            PushPlan::Owned(mut out) => {
                self.fit(&mut out);
                Some(Transmit::Message(out))
            }
            PushPlan::Skip => None,
        }
    }

    /// Bytes of framing around a message on this transport (WS-3: one header byte).
    fn framing(&self) -> usize {
        usize::from(self.config.transport == Transport::WebSocket)
    }

    /// WS-11, HTTP-16: a message over the limit is never sent; the agent still gets an
    /// answer, with what the session owed it (uid, capabilities, flags).
    fn fit(&mut self, msg: &mut ServerToAgent) {
        let bare_only = msg.error_response.is_none()
            && msg.remote_config.is_none()
            && msg.connection_settings.is_none()
            && msg.packages_available.is_none()
            && msg.command.is_none()
            && msg.custom_capabilities.is_none()
            && msg.custom_message.is_none();
        if bare_only {
            // Nothing to drop: what a bare acknowledgement carries is all there is (at most
            // 61 bytes framed), so its size need not be computed on every heartbeat.
            return;
        }
        let size = self.framing() + msg.encoded_len();
        if size <= self.config.max_message_size {
            return;
        }
        tracing::warn!(
            size,
            limit = self.config.max_message_size,
            "dropping a ServerToAgent over the size limit"
        );
        self.unsend(msg);
        *msg = bare(std::mem::take(msg));
    }

    /// The offers of a dropped message were not delivered: offer them again (RC-6).
    fn unsend(&mut self, msg: &ServerToAgent) {
        if msg.remote_config.is_some() {
            self.remote_config.sent = None;
        }
        if msg.connection_settings.is_some() {
            self.connection_settings.sent = None;
        }
        if msg.packages_available.is_some() {
            self.packages.sent = None;
        }
    }
}

/// A message reduced to what a bare acknowledgement carries.
fn bare(msg: ServerToAgent) -> ServerToAgent {
    ServerToAgent {
        instance_uid: msg.instance_uid,
        capabilities: msg.capabilities,
        flags: msg.flags,
        agent_identification: msg.agent_identification,
        ..ServerToAgent::default()
    }
}
