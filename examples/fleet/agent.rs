//! What every generated agent does, whatever its transport: its identity, the messages it
//! builds, what a reply means, and the connect/reconnect loop. The transports are in
//! `ws_agent.rs` (one WebSocket) and `http_agent.rs` (plain-HTTP polling).
//!
//! An agent behaves like a real one where the server can tell: a UUID v7 instance uid kept
//! across reconnects, a first message with its description and capabilities, sequence numbers
//! that go up by one, a full report when the server asks (`ReportFullState`), and a remote
//! config answered with `RemoteConfigStatus` APPLIED and the config's hash. Everything else
//! (files, a real pipeline) is left out so that one process can hold ~10k of them.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opamp::proto::{
    AgentCapabilitySet, AgentDescription, AgentToServer, AnyValue, ComponentHealth, InstanceUid,
    KeyValue, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent, ServerToAgentFlagSet,
    any_value,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::worker::{Phase, Shared};

/// The capabilities of every generated agent (the "typical" agent).
pub(crate) fn capabilities() -> AgentCapabilitySet {
    AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_HEARTBEAT
        | AgentCapabilitySet::REPORTS_HEALTH
}

/// Agents per source address: far below the ~28k ephemeral ports of one address.
const AGENTS_PER_SOURCE_IP: u32 = 1000;

/// The source address of agent number `global`: 127.2.x.y, one address per 1000 agents, so
/// that no single (source address, destination) pair runs out of ephemeral ports.
pub(crate) fn source_addr(global: u32) -> SocketAddr {
    let k = global / AGENTS_PER_SOURCE_IP;
    let ip = Ipv4Addr::new(127, 2, (k / 250) as u8, (k % 250 + 1) as u8);
    SocketAddr::V4(SocketAddrV4::new(ip, 0))
}

/// What an outstanding message was, to know what its reply means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The first message of a connection (WebSocket) or of the agent (plain HTTP).
    First,
    Heartbeat,
    Probe(u32),
    Status,
    Applied,
    FullState,
    /// Plain HTTP: the full state asked for by a new server session during a storm; its
    /// answer is the agent's re-admission.
    Readmit,
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
    }
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Why a connection attempt failed.
pub(crate) enum ConnectError {
    /// The server answered with an HTTP status (e.g. 503).
    Rejected,
    /// TCP or handshake error, or a timeout.
    Failed,
    /// The worker is stopping.
    Quit,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The connection ended after it was used; reconnect at once.
    Closed,
    /// The connection ended before anything was answered on it (already counted): a failed
    /// attempt, retried with backoff.
    Failed,
    /// The worker is stopping.
    Quit,
}

/// One agent's state that outlives its connections.
pub(crate) struct Agent {
    pub(crate) global: u32,
    pub(crate) uid: InstanceUid,
    seq: u64,
    applied_hash: Bytes,
    pub(crate) shared: Arc<Shared>,
}

impl Agent {
    pub(crate) fn new(global: u32, shared: Arc<Shared>) -> Self {
        Self {
            global,
            uid: InstanceUid::new_v7(),
            seq: 0,
            applied_hash: Bytes::new(),
            shared,
        }
    }

    /// A TCP connection to the server from this agent's source address.
    pub(crate) async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        let socket = TcpSocket::new_v4().map_err(|_| ConnectError::Failed)?;
        socket
            .bind(source_addr(self.global))
            .map_err(|_| ConnectError::Failed)?;
        let tcp = socket
            .connect(self.shared.server)
            .await
            .map_err(|_| ConnectError::Failed)?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Where in `interval` this agent's periodic messages fall, so that the fleet's
    /// heartbeats (or polls) are spread over the interval.
    pub(crate) fn offset(&self, interval: Duration) -> Duration {
        let ms = interval.as_millis().max(1) as u64;
        Duration::from_millis(u64::from(self.global) * 7919 % ms)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub(crate) fn heartbeat(&mut self) -> AgentToServer {
        AgentToServer {
            instance_uid: self.uid.to_bytes(),
            sequence_num: self.next_seq(),
            capabilities: capabilities().bits(),
            ..Default::default()
        }
    }

    fn health(&self) -> ComponentHealth {
        let now = unix_nanos();
        ComponentHealth {
            healthy: true,
            start_time_unix_nano: self.shared.started_unix_nanos,
            status: "StatusOK".into(),
            status_time_unix_nano: now,
            ..Default::default()
        }
    }

    /// A status report: a health change (compressed status, CMP-4: only what changed).
    pub(crate) fn status(&mut self) -> AgentToServer {
        AgentToServer {
            health: Some(self.health()),
            ..self.heartbeat()
        }
    }

    fn applied_status(&self) -> Option<RemoteConfigStatus> {
        (!self.applied_hash.is_empty()).then(|| RemoteConfigStatus {
            last_remote_config_hash: self.applied_hash.clone(),
            status: RemoteConfigStatuses::Applied as i32,
            error_message: String::new(),
        })
    }

    /// The full state: description, capabilities, health, remote config status.
    pub(crate) fn full_state(&mut self) -> AgentToServer {
        let description = AgentDescription {
            identifying_attributes: vec![
                kv("service.name", "io.opentelemetry.collector".into()),
                kv("service.version", "0.115.0".into()),
                kv("service.instance.id", self.uid.to_string()),
            ],
            non_identifying_attributes: vec![
                kv("host.name", format!("fleet-host-{}", self.global)),
                kv("os.type", "linux".into()),
                kv("fleet.group", format!("g{}", self.global % 10)),
            ],
        };
        AgentToServer {
            agent_description: Some(description),
            health: Some(self.health()),
            remote_config_status: self.applied_status(),
            ..self.heartbeat()
        }
    }

    /// Counts the answer to a message of kind `kind` sent at `sent_at`; the answer to the
    /// first message tells the worker the agent is admitted.
    pub(crate) async fn answered(
        &self,
        kind: Sent,
        sent_at: Instant,
        ready: &mut Option<mpsc::Sender<bool>>,
    ) {
        let shared = &self.shared;
        let c = &shared.c;
        match kind {
            Sent::First => {
                c.live.fetch_add(1, Relaxed);
                c.admitted_total.fetch_add(1, Relaxed);
                c.last_admit_ns.fetch_max(unix_nanos(), Relaxed);
                if let Some(r) = ready.take() {
                    let _ = r.send(true).await;
                }
            }
            Sent::Readmit => {
                c.admitted_total.fetch_add(1, Relaxed);
                c.last_admit_ns.fetch_max(unix_nanos(), Relaxed);
            }
            Sent::Heartbeat => {
                c.heartbeats_ok.fetch_add(1, Relaxed);
            }
            Sent::Probe(generation) => {
                if generation == shared.probe_generation.load(Relaxed) {
                    c.probe_ok.fetch_add(1, Relaxed);
                }
            }
            Sent::Status => {
                shared.hist.record(sent_at.elapsed().as_micros() as u64);
                c.status_ok.fetch_add(1, Relaxed);
            }
            Sent::Applied => {
                c.config_done.fetch_add(1, Relaxed);
                c.config_last_ns.fetch_max(unix_nanos(), Relaxed);
            }
            Sent::FullState => {}
        }
    }

    /// What the agent must send because of `msg`, in order: an APPLIED report for a new
    /// remote config, a full report when the server asks for one.
    pub(crate) fn follow_ups(&mut self, msg: &ServerToAgent) -> [Option<(AgentToServer, Sent)>; 2] {
        let shared = self.shared.clone();
        let c = &shared.c;
        if msg.error_response.is_some() {
            c.error_responses.fetch_add(1, Relaxed);
        }
        let mut applied = None;
        if let Some(rc) = &msg.remote_config
            && rc.config_hash != self.applied_hash
        {
            c.config_received.fetch_add(1, Relaxed);
            self.applied_hash = rc.config_hash.clone();
            let report = AgentToServer {
                remote_config_status: self.applied_status(),
                ..self.heartbeat()
            };
            applied = Some((report, Sent::Applied));
        }
        let mut full = None;
        if ServerToAgentFlagSet::from_bits_retain(msg.flags)
            .contains(ServerToAgentFlagSet::REPORT_FULL_STATE)
        {
            c.full_state_requests.fetch_add(1, Relaxed);
            full = Some((self.full_state(), Sent::FullState));
        }
        [applied, full]
    }
}

/// A way to reach the server: the part of an agent that depends on the transport.
pub(crate) trait Transport {
    /// One open connection.
    type Conn: Send;

    fn agent(&self) -> &Agent;

    /// Opens a connection (when the agent next has something to send, for transports that
    /// connect lazily).
    fn connect(
        &mut self,
        phase_rx: &mut watch::Receiver<Phase>,
    ) -> impl Future<Output = Result<Self::Conn, ConnectError>> + Send;

    /// Uses one connection until it closes or the worker stops. `ready` is told once, when
    /// the agent is first admitted.
    fn session(
        &mut self,
        conn: Self::Conn,
        phase_rx: &mut watch::Receiver<Phase>,
        ready: &mut Option<mpsc::Sender<bool>>,
    ) -> impl Future<Output = SessionEnd> + Send;
}

/// Runs an agent until the worker stops. `ready` is told once, when the agent is first
/// admitted or gives up.
pub(crate) async fn run<T: Transport>(mut t: T, ready: mpsc::Sender<bool>) {
    let shared = t.agent().shared.clone();
    let global = t.agent().global;
    let mut ready = Some(ready);
    let mut phase_rx = shared.phase.subscribe();
    let mut attempts = 0u32;
    loop {
        if *phase_rx.borrow() == Phase::Quit {
            break;
        }
        let failed = match t.connect(&mut phase_rx).await {
            Ok(conn) => match t.session(conn, &mut phase_rx, &mut ready).await {
                SessionEnd::Quit => break,
                SessionEnd::Closed => {
                    attempts = 0;
                    false
                }
                SessionEnd::Failed => true,
            },
            Err(ConnectError::Quit) => break,
            Err(ConnectError::Rejected) => {
                shared.c.rejected.fetch_add(1, Relaxed);
                true
            }
            Err(ConnectError::Failed) => {
                shared.c.connect_failed.fetch_add(1, Relaxed);
                true
            }
        };
        if failed {
            attempts += 1;
            if attempts >= shared.max_attempts {
                shared.c.gave_up.fetch_add(1, Relaxed);
                if let Some(r) = ready.take() {
                    let _ = r.send(false).await;
                }
                return;
            }
            // Linear backoff with jitter: 50 ms .. 1 s.
            let ms = 50 * u64::from(attempts.min(20)) + u64::from(global % 50);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}
