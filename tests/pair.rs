//! The pair harness: the client's sans-IO core against the server's, on a virtual clock,
//! over a simulated network with latency, loss, outages and throttling. No sockets, no
//! tokio, no sleeps: each scenario runs minutes of protocol time in microseconds, and the
//! same input gives the same run.
//!
//! The harness drives both cores as the tokio drivers do (`opamp-client`'s `ws.rs` and
//! `http.rs`, `opamp-server`'s `ws.rs` and `plain.rs`): a WebSocket link has one server
//! session per connection and loses what is in flight when it breaks; plain HTTP has one
//! request in flight, the server's sans-IO `SessionTable` (uid lookup, idle expiry on its
//! own timer), and a lost request or answer is a failed request for the client. The server
//! sessions are driven through their handle/poll contract, as the drivers drive them.
#![allow(clippy::unwrap_used, clippy::large_enum_variant)]

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use opamp::client::BackoffPolicy;
use opamp::client::core::{ClientCore, CoreConfig, Event, Failure, TransportKind};
use opamp::proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentDescription, AgentIdentification,
    AgentRemoteConfig, AgentToServer, AgentToServerFlagSet, AnyValue, InstanceUid, KeyValue,
    RemoteConfigStatus, RemoteConfigStatuses, ServerCapabilitySet, ServerToAgent,
    ServerToAgentFlagSet, any_value,
};
use opamp::server::{
    AgentSession, Claim, DuplicateUidPolicy, Resolution, SessionConfig, SessionTable, TableConfig,
    UidHolder, UidRegistry,
};

/// What the server application answers to a message (`None`: a bare acknowledgement).
type App = Box<dyn FnMut(&AgentToServer) -> Option<ServerToAgent>>;

/// Everything that crossed the simulated network, in order.
#[derive(Debug, Clone)]
enum Wire {
    ToServer(Duration, usize, AgentToServer),
    ToClient(Duration, usize, ServerToAgent),
    Attempt(Duration, usize, Outcome),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Connected,
    Refused,
    Throttled(Option<Duration>),
}

/// One agent: its core and its side of the link.
struct Agent {
    core: ClientCore,
    /// WebSocket: the connection's server session, while connected.
    ws_session: Option<AgentSession>,
    /// Plain HTTP: when the failure of the request in flight comes back, if it was lost.
    failure_at: Option<Instant>,
    events: Vec<Event>,
    /// Apply offered remote configs and report APPLIED (RC-3), as an agent does.
    apply_configs: bool,
    /// WebSocket: the connection as the server's uid registry knows it, and its claim.
    link: Option<Link>,
    claim: Option<Claim>,
}

/// A WebSocket connection of the harness, as `UidRegistry` holds it (UID-8).
#[derive(Clone, Debug)]
struct Link {
    agent: usize,
    closed: Rc<Cell<bool>>,
}

impl UidHolder for Link {
    fn is_closed(&self) -> bool {
        self.closed.get()
    }
    fn same_holder(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.closed, &other.closed)
    }
}

struct Pair {
    start: Instant,
    now: Instant,
    transport: TransportKind,
    latency: Duration,
    request_timeout: Duration,
    server_caps: ServerCapabilitySet,
    agents: Vec<Agent>,
    /// Plain HTTP: the server's sans-IO session table (uid lookup, cap, idle expiry) over
    /// indices into `http_sessions`, as `plain.rs` holds it over its session handles.
    http_table: SessionTable<usize>,
    http_sessions: Vec<Option<AgentSession>>,
    /// Plain-HTTP sessions that ended (idle, replaced, removed).
    http_ended: usize,
    app: App,
    /// The server's registry of live uids across WebSocket connections (UID-8).
    uids: UidRegistry<Link>,
    to_server: VecDeque<(Instant, usize, AgentToServer)>,
    to_client: VecDeque<(Instant, usize, ServerToAgent)>,
    /// The next this-many messages to the server / to the client are lost.
    lose_to_server: usize,
    lose_to_client: usize,
    /// Connection attempts and requests fail while set.
    server_down: bool,
    throttle: Option<Option<Duration>>,
    wire: Vec<Wire>,
    uids_drawn: u8,
}

fn description(name: &str) -> AgentDescription {
    AgentDescription {
        identifying_attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(name.into())),
            }),
        }],
        non_identifying_attributes: vec![],
    }
}

fn uid(n: u8) -> InstanceUid {
    InstanceUid::from([n; 16])
}

const CAPS: AgentCapabilitySet = AgentCapabilitySet::REPORTS_STATUS
    .union(AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG)
    .union(AgentCapabilitySet::REPORTS_REMOTE_CONFIG)
    .union(AgentCapabilitySet::REPORTS_HEARTBEAT)
    .union(AgentCapabilitySet::REPORTS_HEALTH);

impl Pair {
    fn new(transport: TransportKind) -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            transport,
            latency: Duration::from_millis(20),
            request_timeout: Duration::from_secs(5),
            server_caps: ServerCapabilitySet::ACCEPTS_STATUS
                | ServerCapabilitySet::OFFERS_REMOTE_CONFIG
                | ServerCapabilitySet::ACCEPTS_EFFECTIVE_CONFIG,
            agents: Vec::new(),
            http_table: SessionTable::new(TableConfig::default()),
            http_sessions: Vec::new(),
            http_ended: 0,
            app: Box::new(|_| None),
            uids: UidRegistry::default(),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            lose_to_server: 0,
            lose_to_client: 0,
            server_down: false,
            throttle: None,
            wire: Vec::new(),
            uids_drawn: 0,
        }
    }

    fn with_app(
        mut self,
        app: impl FnMut(&AgentToServer) -> Option<ServerToAgent> + 'static,
    ) -> Self {
        self.app = Box::new(app);
        self
    }

    /// Adds an agent with instance uid `id`; returns its index.
    fn add_agent(&mut self, id: InstanceUid, backoff: BackoffPolicy) -> usize {
        let mut config = CoreConfig::new(id, CAPS, self.transport);
        config.jitter_seed = Some(7);
        config.backoff = backoff;
        let mut core = ClientCore::new(config, self.now);
        core.set_agent_description(description("pair")).unwrap();
        self.agents.push(Agent {
            core,
            ws_session: None,
            failure_at: None,
            events: Vec::new(),
            apply_configs: true,
            link: None,
            claim: None,
        });
        self.agents.len() - 1
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn session_config(&self) -> SessionConfig {
        match self.transport {
            TransportKind::WebSocket => SessionConfig::websocket(self.server_caps),
            _ => SessionConfig::plain_http(self.server_caps),
        }
    }

    /// The server forgets every session (a restart of a server that keeps nothing).
    fn restart_server(&mut self) {
        self.http_table.clear();
        self.end_http_sessions();
        self.http_sessions.clear();
        for a in &mut self.agents {
            if a.ws_session.take().is_some() {
                a.core.handle_disconnected(self.now);
            }
        }
        self.to_server.clear();
        self.to_client.clear();
    }

    /// Forgets the plain-HTTP sessions that left the table.
    fn end_http_sessions(&mut self) {
        while let Some(ended) = self.http_table.poll_event() {
            self.http_sessions[ended.session] = None;
            self.http_ended += 1;
        }
    }

    /// Breaks every WebSocket connection: what is in flight is lost.
    fn break_links(&mut self) {
        self.restart_server();
    }

    fn the_server_handles(&mut self, at: Instant, i: usize, msg: AgentToServer) {
        let config = self.session_config();
        let ws = self.transport == TransportKind::WebSocket;
        let session = if ws {
            match self.agents[i].ws_session.as_mut() {
                Some(s) => s,
                None => return, // the connection is gone
            }
        } else {
            let key = InstanceUid::try_from(&msg.instance_uid[..]).unwrap();
            let index = match self.http_table.get(&key) {
                Some(&index) => index,
                None => {
                    let next = self.http_sessions.len();
                    let index = self
                        .http_table
                        .admit(at, key, None, || next, |_| true)
                        .expect("room in the session table");
                    self.http_sessions.push(Some(AgentSession::new(config)));
                    index
                }
            };
            self.http_table.handle_request(at, &key);
            self.http_sessions[index].as_mut().expect("a live session")
        };
        // As the drivers do: the session decides, the harness only moves messages.
        let received = match session.handle_message(at, &msg) {
            Ok(r) => r,
            Err(e) => panic!("the client sent a message the server refuses: {e}"),
        };
        if received.duplicate {
            // UID-8: a second agent polls with this session's uid; the default policy.
            session.resolve_duplicate(received.instance_uid, DuplicateUidPolicy::Reassign);
        }
        if session.needs_instance_uid() {
            self.uids_drawn += 1;
            let base = if received.duplicate { 0xd0 } else { 0xa0 };
            session.provide_instance_uid(uid(base + self.uids_drawn));
        }
        if !received.duplicate && !received.unusable_uid {
            let reply = (self.app)(&msg);
            session.respond(reply);
        }
        let mut out = Vec::new();
        while let Some(t) = session.poll_transmit(at) {
            out.push(t.into_message());
        }
        if !ws {
            if let Some(assigned) = session.assigned_instance_uid() {
                // UID-5: the next poll carries the assigned uid.
                self.http_table.add_uid(&received.instance_uid, assigned);
            }
            if let Some(interval) = session.offered_heartbeat_interval() {
                self.http_table
                    .set_polling_interval(&received.instance_uid, interval);
            }
            if let Some(old) = received.switched_from {
                // UID-7: the session follows the agent to its new uid.
                self.http_table.remove_uid(&old);
            }
        }
        // S2A-1, S2A-2: what the reply could not carry follows at once over WebSocket
        // (poll_transmit gave it after the reply).
        for m in out {
            self.send_to_client(at, i, m);
        }
        if ws && !received.unusable_uid {
            self.note_uid(i, received.instance_uid);
        }
    }

    /// UID-8 across WebSocket connections, as `ws.rs` and `registry.rs` do: the connection
    /// claims its agent's uid; a message on a displaced connection proves a duplicate, and
    /// the default policy reassigns the newcomer through its own session.
    fn note_uid(&mut self, i: usize, uid_now: InstanceUid) {
        let Some(link) = self.agents[i].link.clone() else {
            return;
        };
        let mut claim = self.agents[i].claim.take();
        if self.uids.note(&mut claim, uid_now, &link)
            && let Some(c) = claim.as_mut()
        {
            let rival = self.uids.rival(&uid_now, &link);
            let resolution =
                self.uids
                    .resolve(c, &link, rival.as_ref(), DuplicateUidPolicy::Reassign);
            if let Resolution::Reassign(newcomer) = resolution {
                self.uids_drawn += 1;
                let new_uid = uid(0xe0 + self.uids_drawn);
                self.push(
                    newcomer.agent,
                    ServerToAgent {
                        agent_identification: Some(AgentIdentification {
                            new_instance_uid: new_uid.to_bytes(),
                        }),
                        ..Default::default()
                    },
                );
            }
        }
        self.agents[i].claim = claim;
    }

    /// The server notices connections that are gone: their registry claims end.
    fn forget_closed_links(&mut self) {
        for a in &mut self.agents {
            if a.ws_session.is_none()
                && let Some(link) = a.link.take()
            {
                link.closed.set(true);
                if let Some(claim) = a.claim.take() {
                    self.uids.release(&claim);
                }
            }
        }
    }

    fn send_to_client(&mut self, at: Instant, i: usize, out: ServerToAgent) {
        self.wire
            .push(Wire::ToClient(at - self.start, i, out.clone()));
        if self.lose_to_client > 0 {
            self.lose_to_client -= 1;
            self.lose(at, i);
        } else {
            self.to_client.push_back((at + self.latency, i, out));
        }
    }

    /// A lost message: a failed request over plain HTTP, a broken connection over WebSocket.
    fn lose(&mut self, at: Instant, i: usize) {
        match self.transport {
            TransportKind::WebSocket => {
                if self.agents[i].ws_session.take().is_some() {
                    self.agents[i].core.handle_disconnected(at + self.latency);
                }
                self.to_server.retain(|(_, j, _)| *j != i);
                self.to_client.retain(|(_, j, _)| *j != i);
            }
            _ => self.agents[i].failure_at = Some(at + self.request_timeout),
        }
    }

    /// A push from the server application to agent `i` (WebSocket: at once; plain HTTP: the
    /// application answers the next poll).
    fn push(&mut self, i: usize, msg: ServerToAgent) {
        let now = self.now;
        let Some(session) = self.agents[i].ws_session.as_mut() else {
            panic!("push to an agent that is not connected over WebSocket");
        };
        session.queue(msg);
        let mut out = Vec::new();
        while let Some(t) = session.poll_transmit(now) {
            out.push(t.into_message());
        }
        for m in out {
            self.send_to_client(now, i, m);
        }
    }

    /// One round at `self.now`: everything due is delivered and answered.
    fn round(&mut self) {
        let now = self.now;
        self.forget_closed_links();
        for i in 0..self.agents.len() {
            self.drive_client(i, now);
        }
        // The server sessions' timers (SEQ-2: a rate-limited full-state request).
        for i in 0..self.agents.len() {
            let mut out = Vec::new();
            if let Some(session) = self.agents[i].ws_session.as_mut()
                && session.poll_timeout().is_some_and(|t| t <= now)
            {
                session.handle_timeout(now);
                while let Some(t) = session.poll_transmit(now) {
                    out.push(t.into_message());
                }
            }
            for m in out {
                self.send_to_client(now, i, m);
            }
        }
        for session in self.http_sessions.iter_mut().flatten() {
            if session.poll_timeout().is_some_and(|t| t <= now) {
                session.handle_timeout(now);
            }
        }
        // HB-5: idle plain-HTTP sessions end on the table's timer.
        if self.http_table.poll_timeout().is_some_and(|t| t <= now) {
            self.http_table.handle_timeout(now);
            self.end_http_sessions();
        }
        while let Some(&(at, _, _)) = self.to_server.front() {
            if at > now {
                break;
            }
            let (at, i, msg) = self.to_server.pop_front().unwrap();
            self.the_server_handles(at, i, msg);
        }
        while let Some(&(at, _, _)) = self.to_client.front() {
            if at > now {
                break;
            }
            let (at, i, msg) = self.to_client.pop_front().unwrap();
            self.agents[i].core.handle_activity(at);
            self.agents[i].core.handle_message(at, msg);
            self.drive_client(i, at);
        }
    }

    fn drive_client(&mut self, i: usize, now: Instant) {
        if self.agents[i].failure_at.is_some_and(|t| t <= now) {
            self.agents[i].failure_at = None;
            self.agents[i]
                .core
                .handle_connect_failure(now, Failure::Transport);
        }
        self.agents[i].core.handle_timeout(now);
        while let Some(event) = self.agents[i].core.poll_event() {
            if let Event::Message(data) = &event
                && self.agents[i].apply_configs
                && let Some(config) = &data.remote_config
            {
                self.agents[i]
                    .core
                    .set_remote_config_status(RemoteConfigStatus {
                        last_remote_config_hash: config.config_hash.clone(),
                        status: RemoteConfigStatuses::Applied as i32,
                        error_message: String::new(),
                    })
                    .unwrap();
            }
            self.agents[i].events.push(event);
        }
        if self.agents[i].core.poll_driver_action().is_some() {
            // Reconnect (THR-2) or drop a half-open connection: the link is gone.
            self.agents[i].ws_session = None;
        }
        if self.transport == TransportKind::WebSocket && self.agents[i].ws_session.is_none() {
            let Some(at) = self.agents[i].core.connect_at() else {
                return;
            };
            if at > now {
                return;
            }
            let outcome = if self.server_down {
                Outcome::Refused
            } else if let Some(retry_after) = self.throttle {
                Outcome::Throttled(retry_after)
            } else {
                Outcome::Connected
            };
            self.wire.push(Wire::Attempt(now - self.start, i, outcome));
            match outcome {
                Outcome::Connected => {
                    self.forget_closed_links();
                    self.agents[i].ws_session = Some(AgentSession::new(self.session_config()));
                    self.agents[i].link = Some(Link {
                        agent: i,
                        closed: Rc::new(Cell::new(false)),
                    });
                    self.agents[i].core.handle_connected(now);
                }
                Outcome::Refused => {
                    self.agents[i]
                        .core
                        .handle_connect_failure(now, Failure::Transport);
                    return;
                }
                Outcome::Throttled(retry_after) => {
                    self.agents[i]
                        .core
                        .handle_connect_failure(now, Failure::Throttled { retry_after });
                    return;
                }
            }
        }
        while let Some(msg) = self.agents[i].core.poll_transmit(now) {
            self.wire
                .push(Wire::ToServer(now - self.start, i, msg.clone()));
            if self.transport == TransportKind::Http {
                if self.server_down {
                    self.wire
                        .push(Wire::Attempt(now - self.start, i, Outcome::Refused));
                    self.agents[i].failure_at = Some(now + self.latency);
                    continue;
                }
                if let Some(retry_after) = self.throttle {
                    self.wire.push(Wire::Attempt(
                        now - self.start,
                        i,
                        Outcome::Throttled(retry_after),
                    ));
                    self.agents[i].core.handle_connect_failure(
                        now + self.latency,
                        Failure::Throttled { retry_after },
                    );
                    continue;
                }
            }
            if self.lose_to_server > 0 {
                self.lose_to_server -= 1;
                self.lose(now, i);
                continue;
            }
            self.to_server.push_back((now + self.latency, i, msg));
        }
    }

    /// The next time something happens.
    fn next_time(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.to_server.front().map(|m| m.0));
        consider(self.to_client.front().map(|m| m.0));
        for a in &self.agents {
            consider(a.core.poll_timeout());
            consider(a.ws_session.as_ref().and_then(AgentSession::poll_timeout));
            consider(a.failure_at);
            if self.transport == TransportKind::WebSocket && a.ws_session.is_none() {
                consider(a.core.connect_at());
            }
        }
        if self.transport == TransportKind::Http {
            consider(self.http_table.poll_timeout());
        }
        next
    }

    /// Runs until `for_` of virtual time has passed.
    fn run(&mut self, for_: Duration) {
        let deadline = self.now + for_;
        let mut rounds_at_this_instant = 0;
        loop {
            self.round();
            let next = self.next_time().map(|t| t.max(self.now));
            match next {
                Some(t) if t <= deadline => {
                    if t == self.now {
                        rounds_at_this_instant += 1;
                        assert!(
                            rounds_at_this_instant < 1000,
                            "no progress at {:?}",
                            self.elapsed()
                        );
                    } else {
                        rounds_at_this_instant = 0;
                    }
                    self.now = t;
                }
                _ => {
                    self.now = deadline;
                    self.round();
                    return;
                }
            }
        }
    }

    fn sent(&self, i: usize) -> Vec<(Duration, AgentToServer)> {
        self.wire
            .iter()
            .filter_map(|w| match w {
                Wire::ToServer(t, j, m) if *j == i => Some((*t, m.clone())),
                _ => None,
            })
            .collect()
    }

    fn replies(&self, i: usize) -> Vec<(Duration, ServerToAgent)> {
        self.wire
            .iter()
            .filter_map(|w| match w {
                Wire::ToClient(t, j, m) if *j == i => Some((*t, m.clone())),
                _ => None,
            })
            .collect()
    }

    fn attempts(&self, i: usize) -> Vec<(Duration, Outcome)> {
        self.wire
            .iter()
            .filter_map(|w| match w {
                Wire::Attempt(t, j, o) if *j == i => Some((*t, *o)),
                _ => None,
            })
            .collect()
    }
}

fn fast_backoff() -> BackoffPolicy {
    BackoffPolicy::default()
}

fn both() -> [TransportKind; 2] {
    [TransportKind::WebSocket, TransportKind::Http]
}

fn config_offer(body: &str, hash: &'static [u8]) -> AgentRemoteConfig {
    let mut map = AgentConfigMap::default();
    map.config_map.insert(
        String::new(),
        AgentConfigObject {
            body: body.as_bytes().to_vec().into(),
            content_type: "text/yaml".into(),
            ..Default::default()
        },
    );
    AgentRemoteConfig {
        config: Some(map),
        config_hash: hash.into(),
    }
}

/// SEQ-1, CAP-3, HB-1: the first message carries the full status from sequence number 0;
/// the first answer carries the server's capabilities; numbers go up by one.
#[test]
fn pair_first_report_full_status_and_server_capabilities() {
    for t in both() {
        let mut p = Pair::new(t);
        let a = p.add_agent(uid(1), fast_backoff());
        p.run(Duration::from_secs(1));
        let sent = p.sent(a);
        let first = &sent[0].1;
        assert_eq!(first.sequence_num, 0, "{t:?}");
        assert!(first.agent_description.is_some(), "{t:?}");
        assert_eq!(first.capabilities & CAPS.bits(), CAPS.bits(), "{t:?}");
        let replies = p.replies(a);
        assert_eq!(
            replies[0].1.capabilities,
            p.server_caps.bits(),
            "CAP-3 {t:?}"
        );
        assert_eq!(p.agents[a].core.server_capabilities(), p.server_caps);
        for (n, (_, m)) in sent.iter().enumerate() {
            assert_eq!(m.sequence_num, n as u64, "SEQ-1 {t:?}");
        }
    }
}

/// HB-4, HTTP-7: with nothing to report, the agent sends a heartbeat (WebSocket) or polls
/// (plain HTTP) every 30 s, and only then; each is answered; nothing else is sent.
#[test]
fn pair_heartbeats_and_polls_every_interval() {
    for t in both() {
        let mut p = Pair::new(t);
        let a = p.add_agent(uid(1), fast_backoff());
        p.run(Duration::from_secs(300) + Duration::from_millis(500));
        let sent = p.sent(a);
        // The first report at 0 s, then one every 30 s up to 300 s.
        assert_eq!(
            sent.len(),
            11,
            "{t:?}: {:?}",
            sent.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        for w in sent.windows(2) {
            let gap = w[1].0 - w[0].0;
            assert!(
                gap >= Duration::from_secs(30) && gap <= Duration::from_secs(31),
                "{t:?}: gap {gap:?}"
            );
            assert!(
                w[1].1.agent_description.is_none(),
                "CMP-1: unchanged parts left out"
            );
        }
        assert_eq!(p.replies(a).len(), 11, "REP-4: every message answered");
    }
}

/// SEQ-2: a server that lost its state (a restart) answers the next message of an agent it
/// does not know with ReportFullState, and the agent's next message carries everything.
#[test]
fn pair_full_state_recovered_after_the_server_forgot() {
    for t in both() {
        let mut p = Pair::new(t);
        let a = p.add_agent(uid(1), fast_backoff());
        p.run(Duration::from_secs(40));
        p.restart_server();
        p.run(Duration::from_secs(70));
        let replies = p.replies(a);
        let asked = replies.iter().position(|(_, m)| {
            ServerToAgentFlagSet::from_bits_retain(m.flags)
                .contains(ServerToAgentFlagSet::REPORT_FULL_STATE)
        });
        match t {
            // A new WebSocket connection starts with a full report anyway (the client
            // resends everything on a new connection), so nothing needs asking.
            TransportKind::WebSocket => {
                let sent = p.sent(a);
                let after = sent.iter().filter(|(at, _)| *at > Duration::from_secs(40));
                assert!(
                    after.clone().any(|(_, m)| m.agent_description.is_some()),
                    "the reconnect's first message is a full report"
                );
            }
            _ => {
                let asked_at = replies[asked.expect("ReportFullState asked")].0;
                let full = p
                    .sent(a)
                    .into_iter()
                    .find(|(at, m)| *at > asked_at && m.agent_description.is_some());
                assert!(full.is_some(), "the agent answered with its full state");
            }
        }
    }
}

/// RC-3..RC-6: an offered config is applied and acknowledged with its hash; the server then
/// stops offering it. Over plain HTTP an answer lost on the way (a proxy timeout) does not
/// strand the config: it is offered again until the agent reports its hash.
#[test]
fn pair_config_hash_ack_loop_survives_a_lost_answer() {
    for t in both() {
        let mut p = Pair::new(t).with_app(|msg: &AgentToServer| {
            let acked = msg
                .remote_config_status
                .as_ref()
                .is_some_and(|s| &s.last_remote_config_hash[..] == b"h1");
            (!acked).then(|| ServerToAgent {
                remote_config: Some(config_offer("a: 1\n", b"h1")),
                ..Default::default()
            })
        });
        let a = p.add_agent(uid(1), fast_backoff());
        // The answer that carries the config first is lost.
        p.lose_to_client = 1;
        p.run(Duration::from_secs(120));
        let status = p
            .sent(a)
            .into_iter()
            .filter_map(|(_, m)| m.remote_config_status)
            .last()
            .expect("a remote config status");
        assert_eq!(&status.last_remote_config_hash[..], b"h1", "{t:?}");
        assert_eq!(status.status, RemoteConfigStatuses::Applied as i32);
        // Once acknowledged, the offer is not repeated.
        let replies = p.replies(a);
        let last_offer = replies
            .iter()
            .rposition(|(_, m)| m.remote_config.is_some())
            .unwrap();
        let ack_at = p
            .sent(a)
            .into_iter()
            .find(|(_, m)| {
                m.remote_config_status
                    .as_ref()
                    .is_some_and(|s| &s.last_remote_config_hash[..] == b"h1")
            })
            .unwrap()
            .0;
        assert!(
            replies[last_offer].0 <= ack_at + p.latency,
            "{t:?}: offered after the ack"
        );
        assert!(
            replies.len() > last_offer + 1,
            "{t:?}: the exchange went on"
        );
    }
}

/// UID-5, UID-7: an agent that asks for a uid gets one, switches to it, and the server's
/// session follows it: later messages carry the new uid and are answered under it.
#[test]
fn pair_uid_requested_assigned_and_followed() {
    for t in both() {
        let mut p = Pair::new(t);
        let a = p.add_agent(uid(1), fast_backoff());
        p.agents[a]
            .core
            .set_flags(AgentToServerFlagSet::REQUEST_INSTANCE_UID)
            .unwrap();
        p.run(Duration::from_secs(70));
        let assigned = p
            .replies(a)
            .into_iter()
            .find_map(|(_, m)| m.agent_identification)
            .expect("a uid assigned");
        let new = InstanceUid::try_from(&assigned.new_instance_uid[..]).unwrap();
        assert_eq!(p.agents[a].core.instance_uid(), new, "{t:?}");
        let sent = p.sent(a);
        let last = &sent.last().unwrap().1;
        assert_eq!(&last.instance_uid[..], new.as_array(), "{t:?}");
        let reply = p.replies(a).last().unwrap().1.clone();
        assert_eq!(&reply.instance_uid[..], new.as_array(), "UID-6 {t:?}");
        assert!(
            !AgentToServerFlagSet::from_bits_retain(last.flags)
                .contains(AgentToServerFlagSet::REQUEST_INSTANCE_UID),
            "the request stops once granted"
        );
    }
}

/// UID-8: two agents polling with one uid (a cloned VM) share a plain-HTTP session; their
/// interleaving sequence numbers give them away and the newcomer is given a new uid; both
/// then poll under their own uids, and neither is asked for its full state in a loop.
#[test]
fn pair_duplicate_uid_over_http_is_detected_and_reassigned() {
    let mut p = Pair::new(TransportKind::Http);
    let a = p.add_agent(uid(1), fast_backoff());
    // The second agent's counter starts well behind the first's. (Two counters that stay
    // equal look like retries: the documented limit of AgentSession, "Duplicate uids".)
    p.run(Duration::from_secs(200));
    let b = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_secs(300));
    let ua = p.agents[a].core.instance_uid();
    let ub = p.agents[b].core.instance_uid();
    assert_ne!(ua, ub, "one of them switched");
    // Asked for full state: the newcomer at its jump, again under its new uid (a session
    // the server has not seen), and the original once, since the newcomer's report may have
    // overwritten what the session knew. Then never again: no loop.
    let asks: Vec<(usize, Duration)> = [a, b]
        .into_iter()
        .flat_map(|i| {
            p.replies(i).into_iter().filter_map(move |(at, m)| {
                ServerToAgentFlagSet::from_bits_retain(m.flags)
                    .contains(ServerToAgentFlagSet::REPORT_FULL_STATE)
                    .then_some((i, at))
            })
        })
        .collect();
    assert!(asks.len() <= 3, "{asks:?}");
    assert!(
        asks.iter().all(|(_, at)| *at < Duration::from_secs(260)),
        "ReportFullState keeps coming: {asks:?}"
    );
    assert_eq!(p.http_table.len(), 2, "two sessions, one per agent");
}

/// GEN-8: while the server is down, reconnect attempts back off exponentially with jitter
/// up to the maximum; once it is back the agent connects at its next attempt and reports.
#[test]
fn pair_backoff_while_the_server_is_down() {
    for t in both() {
        let mut p = Pair::new(t);
        p.server_down = true;
        let a = p.add_agent(uid(1), fast_backoff());
        p.run(Duration::from_secs(600));
        let attempts: Vec<Duration> = p.attempts(a).into_iter().map(|(at, _)| at).collect();
        assert!(attempts.len() >= 5, "{t:?}: {attempts:?}");
        let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        // Jittered by ±50 %, the gaps still grow: each later quarter's mean is larger.
        let first = gaps[0];
        let late = gaps[gaps.len() - 1];
        assert!(late > first * 4, "{t:?}: gaps {gaps:?}");
        assert!(
            gaps.len() < 60,
            "{t:?}: no reconnect storm: {} attempts",
            attempts.len()
        );
        p.server_down = false;
        p.run(late * 2);
        assert!(
            !p.replies(a).is_empty(),
            "{t:?}: served once the server is back"
        );
    }
}

/// THR-5: a throttled attempt with Retry-After is not retried before it; without the
/// header the backoff applies.
#[test]
fn pair_retry_after_is_honoured() {
    for t in both() {
        let mut p = Pair::new(t);
        p.throttle = Some(Some(Duration::from_secs(120)));
        let a = p.add_agent(uid(1), fast_backoff());
        p.run(Duration::from_secs(1));
        p.throttle = None;
        p.run(Duration::from_secs(200));
        let attempts = p.attempts(a);
        let throttled = attempts[0];
        assert_eq!(
            throttled.1,
            Outcome::Throttled(Some(Duration::from_secs(120))),
            "{t:?}"
        );
        let sent = p.sent(a);
        let next = sent
            .iter()
            .map(|(at, _)| *at)
            .chain(attempts.iter().skip(1).map(|(at, _)| *at))
            .filter(|at| *at > throttled.0)
            .min()
            .expect("tried again");
        assert!(
            next >= throttled.0 + Duration::from_secs(120),
            "{t:?}: retried at {next:?}, before the Retry-After of 120 s"
        );
        assert!(!p.replies(a).is_empty(), "{t:?}: served afterwards");
    }
}

/// WS: a connection broken mid-exchange is re-established; the new connection's first
/// message is a full report, so nothing the server knew is missing (SEQ-2 on a new stream).
#[test]
fn pair_ws_reconnect_after_a_broken_link_reports_full_state() {
    let mut p = Pair::new(TransportKind::WebSocket);
    let a = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_secs(35));
    p.break_links();
    p.run(Duration::from_secs(120));
    let attempts = p.attempts(a);
    assert_eq!(
        attempts
            .iter()
            .filter(|(_, o)| *o == Outcome::Connected)
            .count(),
        2,
        "{attempts:?}"
    );
    let reconnected_at = attempts[1].0;
    let first_after = p
        .sent(a)
        .into_iter()
        .find(|(at, _)| *at >= reconnected_at)
        .unwrap()
        .1;
    assert!(first_after.agent_description.is_some());
}

/// S2A-3, RC-4: over WebSocket a config pushed mid-session reaches the agent at once, is
/// applied and acknowledged; the same offer pushed again is not sent (already sent on this
/// stream), and a new one is.
#[test]
fn pair_ws_push_config_applied_and_not_resent() {
    let mut p = Pair::new(TransportKind::WebSocket);
    let a = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_secs(40));
    let offer = |hash: &'static [u8]| ServerToAgent {
        remote_config: Some(config_offer("b: 2\n", hash)),
        ..Default::default()
    };
    p.push(a, offer(b"h2"));
    p.run(Duration::from_secs(1));
    let acked = |p: &Pair, hash: &[u8]| {
        p.sent(a).into_iter().any(|(_, m)| {
            m.remote_config_status.as_ref().is_some_and(|s| {
                &s.last_remote_config_hash[..] == hash
                    && s.status == RemoteConfigStatuses::Applied as i32
            })
        })
    };
    assert!(
        acked(&p, b"h2"),
        "applied within a round trip, not at the next heartbeat"
    );
    let offers = |p: &Pair| {
        p.replies(a)
            .iter()
            .filter(|(_, m)| m.remote_config.is_some())
            .count()
    };
    assert_eq!(offers(&p), 1);
    p.push(a, offer(b"h2"));
    p.run(Duration::from_secs(1));
    assert_eq!(offers(&p), 1, "RC-4: the agent has it");
    p.push(a, offer(b"h3"));
    p.run(Duration::from_secs(1));
    assert_eq!(offers(&p), 2);
    assert!(acked(&p, b"h3"));
}

/// CAP-4, CAP-3: a config pushed after the WebSocket connected but before the agent's first
/// message is held by the server session (the agent's capabilities are unknown) and rides
/// on the first reply, with the server's capabilities; the agent applies it.
#[test]
fn pair_ws_push_before_the_first_message_rides_on_the_first_reply() {
    let mut p = Pair::new(TransportKind::WebSocket);
    let a = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_millis(1)); // connected; the first report is on its way
    assert!(p.replies(a).is_empty());
    p.push(
        a,
        ServerToAgent {
            remote_config: Some(config_offer("c: 1\n", b"h1")),
            ..Default::default()
        },
    );
    assert!(p.replies(a).is_empty(), "held: nothing went out yet");
    p.run(Duration::from_secs(1));
    let replies = p.replies(a);
    let (_, first) = &replies[0];
    assert!(first.remote_config.is_some(), "the first reply carries it");
    assert_ne!(first.capabilities, 0, "CAP-3");
    assert_eq!(
        replies
            .iter()
            .filter(|(_, m)| m.remote_config.is_some())
            .count(),
        1
    );
    assert!(p.sent(a).iter().any(|(_, m)| {
        m.remote_config_status.as_ref().is_some_and(|s| {
            &s.last_remote_config_hash[..] == b"h1"
                && s.status == RemoteConfigStatuses::Applied as i32
        })
    }));
}

/// HB-5, SEQ-2 over plain HTTP: while the agent cannot reach the server, its session idles
/// out on the server's table (120 s without a poll). The first poll after the outage finds
/// no session; it carries the agent's full state (the client resends everything after
/// failed requests), so the new session knows the agent and asks for nothing more. A
/// session that keeps polling never idles out.
#[test]
fn pair_http_session_idles_out_during_an_outage_and_the_next_poll_starts_a_full_one() {
    let mut p = Pair::new(TransportKind::Http);
    let a = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_secs(300));
    assert_eq!(p.http_ended, 0, "polling every 30 s keeps the session");
    assert_eq!(p.http_table.len(), 1);
    p.server_down = true;
    p.run(Duration::from_secs(200));
    assert_eq!(p.http_ended, 1, "idle past 120 s: ended");
    assert!(p.http_table.is_empty());
    let outage_end = p.elapsed();
    p.server_down = false;
    p.run(Duration::from_secs(300));
    assert_eq!(p.http_table.len(), 1, "one new session");
    assert_eq!(p.http_sessions.iter().flatten().count(), 1);
    let sent: Vec<_> = p
        .sent(a)
        .into_iter()
        .filter(|(at, _)| *at >= outage_end)
        .collect();
    assert!(
        sent[0].1.agent_description.is_some(),
        "the first poll after the outage is a full report"
    );
    let replies: Vec<_> = p
        .replies(a)
        .into_iter()
        .filter(|(at, _)| *at >= outage_end)
        .collect();
    assert!(replies.len() >= 5, "served again: {}", replies.len());
    assert!(
        replies
            .iter()
            .all(|(_, m)| m.flags & ServerToAgentFlagSet::REPORT_FULL_STATE.bits() == 0),
        "SEQ-2: a complete first report needs no request"
    );
}

/// UID-8 across WebSocket connections: a second agent connects with the first one's uid.
/// Its connection takes the uid over (it could be the first agent reconnecting); the first
/// agent's next message on its own, still live connection proves two agents, and the
/// newcomer is told to switch to a new uid (UID-7), through its own session. Both go on
/// being served under their own uids, and no dispute follows.
#[test]
fn pair_ws_duplicate_uid_across_connections_is_reassigned() {
    let mut p = Pair::new(TransportKind::WebSocket);
    let a = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_secs(100));
    let b = p.add_agent(uid(1), fast_backoff());
    p.run(Duration::from_secs(300));
    let (ua, ub) = (
        p.agents[a].core.instance_uid(),
        p.agents[b].core.instance_uid(),
    );
    assert_eq!(ua, uid(1), "the older connection keeps the uid");
    assert_ne!(ub, uid(1), "the newcomer switched");
    let reassigned: Vec<_> = p
        .replies(b)
        .into_iter()
        .filter(|(_, m)| m.agent_identification.is_some())
        .collect();
    assert_eq!(reassigned.len(), 1, "told once: {reassigned:?}");
    assert!(
        p.replies(a)
            .iter()
            .all(|(_, m)| m.agent_identification.is_none()),
        "the original is left alone"
    );
    let since = p.elapsed() - Duration::from_secs(120);
    for (i, want) in [(a, ua), (b, ub)] {
        assert!(
            p.sent(i)
                .iter()
                .any(|(at, m)| *at > since && m.instance_uid[..] == want.as_array()[..]),
            "agent {i} goes on under {want}"
        );
    }
}
