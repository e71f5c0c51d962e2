//! One lightweight agent: a tokio task that speaks raw OpAMP over one WebSocket.
//!
//! It behaves like a real agent where the server can tell: a UUID v7 instance uid kept across
//! reconnects, a first message with its description and capabilities, sequence numbers that
//! go up by one, a full report when the server asks (`ReportFullState`), and a remote config
//! answered with `RemoteConfigStatus` APPLIED and the config's hash. Everything else (files,
//! a real pipeline) is left out so that one process can hold ~10k of them.
//!
//! The server answers every `AgentToServer` with exactly one `ServerToAgent`, in order, and
//! may push more in between. The agent keeps a queue of what it sent and is still waiting an
//! answer for: a message that arrives while the queue is empty is a push. Heartbeats pause
//! while a config push or a reconnect storm is being measured, so that pushes are never
//! mistaken for replies.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use opamp::proto::{
    AgentCapabilitySet, AgentDescription, AgentToServer, AnyValue, ComponentHealth, InstanceUid,
    KeyValue, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent, ServerToAgentFlagSet,
    any_value, framing,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

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
enum Sent {
    First,
    Heartbeat,
    Probe(u32),
    Status,
    Applied,
    FullState,
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Why a connection attempt failed.
enum ConnectError {
    /// The server answered the upgrade with an HTTP status (e.g. 503).
    Rejected,
    /// TCP or handshake error, or a timeout.
    Failed,
}

/// One agent's state that outlives its connections.
pub(crate) struct Agent {
    global: u32,
    uid: InstanceUid,
    seq: u64,
    applied_hash: Bytes,
    shared: Arc<Shared>,
}

type Ws = WebSocketStream<TcpStream>;

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

    async fn connect(&self) -> Result<Ws, ConnectError> {
        let attempt = async {
            let socket = TcpSocket::new_v4().map_err(|_| ConnectError::Failed)?;
            socket
                .bind(source_addr(self.global))
                .map_err(|_| ConnectError::Failed)?;
            let tcp = socket
                .connect(self.shared.server)
                .await
                .map_err(|_| ConnectError::Failed)?;
            let _ = tcp.set_nodelay(true);
            let config = opamp::transport::ws::client_config(framing::DEFAULT_MAX_MESSAGE_SIZE);
            match tokio_tungstenite::client_async_with_config(
                self.shared.url.as_str(),
                tcp,
                Some(config),
            )
            .await
            {
                Ok((ws, _)) => Ok(ws),
                Err(WsError::Http(_)) => Err(ConnectError::Rejected),
                Err(_) => Err(ConnectError::Failed),
            }
        };
        tokio::time::timeout(Duration::from_secs(15), attempt)
            .await
            .unwrap_or(Err(ConnectError::Failed))
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn heartbeat(&mut self) -> AgentToServer {
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
    fn status(&mut self) -> AgentToServer {
        AgentToServer {
            health: Some(self.health()),
            ..self.heartbeat()
        }
    }

    /// The full state: description, capabilities, health, remote config status.
    fn full_state(&mut self) -> AgentToServer {
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
        let remote_config_status = (!self.applied_hash.is_empty()).then(|| RemoteConfigStatus {
            last_remote_config_hash: self.applied_hash.clone(),
            status: RemoteConfigStatuses::Applied as i32,
            error_message: String::new(),
        });
        AgentToServer {
            agent_description: Some(description),
            health: Some(self.health()),
            remote_config_status,
            ..self.heartbeat()
        }
    }

    /// Runs the agent until the worker stops. `ready` is told once, when the first
    /// connection is admitted or the agent gives up.
    pub(crate) async fn run(mut self, ready: tokio::sync::mpsc::Sender<bool>) {
        let shared = self.shared.clone();
        let mut ready = Some(ready);
        let mut phase_rx = shared.phase.subscribe();
        let mut attempts = 0u32;
        loop {
            if *phase_rx.borrow() == Phase::Quit {
                break;
            }
            let ws = match self.connect().await {
                Ok(ws) => ws,
                Err(e) => {
                    match e {
                        ConnectError::Rejected => shared.c.rejected.fetch_add(1, Relaxed),
                        ConnectError::Failed => shared.c.connect_failed.fetch_add(1, Relaxed),
                    };
                    attempts += 1;
                    if attempts >= shared.max_attempts {
                        shared.c.gave_up.fetch_add(1, Relaxed);
                        if let Some(r) = ready.take() {
                            let _ = r.send(false).await;
                        }
                        return;
                    }
                    // Linear backoff with jitter: 50 ms .. 1 s.
                    let ms = 50 * u64::from(attempts.min(20)) + u64::from(self.global % 50);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    continue;
                }
            };
            attempts = 0;
            let end = self.session(ws, &mut phase_rx, &mut ready).await;
            match end {
                SessionEnd::Quit => break,
                SessionEnd::Closed => {}
            }
        }
    }

    /// One connection, from the first message to the close.
    async fn session(
        &mut self,
        mut ws: Ws,
        phase_rx: &mut tokio::sync::watch::Receiver<Phase>,
        ready: &mut Option<tokio::sync::mpsc::Sender<bool>>,
    ) -> SessionEnd {
        let shared = self.shared.clone();
        let c = &shared.c;
        let mut outstanding: VecDeque<(Sent, Instant)> = VecDeque::with_capacity(2);
        let mut admitted = false;
        let hb = shared.heartbeat;
        // Spread heartbeats over the interval.
        let offset =
            Duration::from_millis(u64::from(self.global) * 7919 % hb.as_millis().max(1) as u64);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let first = self.full_state();
        if send(&mut ws, &first).await.is_err() {
            c.connect_failed.fetch_add(1, Relaxed);
            return SessionEnd::Closed;
        }
        outstanding.push_back((Sent::First, Instant::now()));

        let end = loop {
            tokio::select! {
                changed = phase_rx.changed() => {
                    if changed.is_err() {
                        break SessionEnd::Quit;
                    }
                    let phase = *phase_rx.borrow_and_update();
                    let out = match phase {
                        Phase::Quit => break SessionEnd::Quit,
                        Phase::Throughput { .. } if admitted && outstanding.is_empty() => {
                            Some((self.status(), Sent::Status))
                        }
                        Phase::Probe(generation) if admitted => {
                            Some((self.heartbeat(), Sent::Probe(generation)))
                        }
                        _ => None,
                    };
                    if let Some((msg, kind)) = out {
                        if send(&mut ws, &msg).await.is_err() {
                            break SessionEnd::Closed;
                        }
                        outstanding.push_back((kind, Instant::now()));
                    }
                }
                _ = heartbeat.tick() => {
                    let phase = *phase_rx.borrow();
                    if admitted && outstanding.is_empty() && phase == Phase::Idle {
                        let msg = self.heartbeat();
                        if send(&mut ws, &msg).await.is_err() {
                            break SessionEnd::Closed;
                        }
                        c.heartbeats.fetch_add(1, Relaxed);
                        outstanding.push_back((Sent::Heartbeat, Instant::now()));
                    }
                }
                frame = ws.next() => {
                    let data = match frame {
                        Some(Ok(Message::Binary(data))) => data,
                        Some(Ok(Message::Close(_))) | None => break SessionEnd::Closed,
                        Some(Ok(_)) => continue,
                        Some(Err(_)) => {
                            c.ws_errors.fetch_add(1, Relaxed);
                            break SessionEnd::Closed;
                        }
                    };
                    let Ok(msg) = framing::decode_bytes::<ServerToAgent>(data, framing::DEFAULT_MAX_MESSAGE_SIZE) else {
                        c.ws_errors.fetch_add(1, Relaxed);
                        break SessionEnd::Closed;
                    };
                    if msg.error_response.is_some() {
                        c.error_responses.fetch_add(1, Relaxed);
                    }
                    let now = Instant::now();
                    // What this message answers, if anything.
                    match outstanding.pop_front() {
                        None => {
                            c.pushes.fetch_add(1, Relaxed);
                        }
                        Some((kind, sent_at)) => match kind {
                            Sent::First => {
                                admitted = true;
                                c.live.fetch_add(1, Relaxed);
                                c.admitted_total.fetch_add(1, Relaxed);
                                c.last_admit_ns.fetch_max(unix_nanos(), Relaxed);
                                if let Some(r) = ready.take() {
                                    let _ = r.send(true).await;
                                }
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
                                let rtt = now.duration_since(sent_at).as_micros() as u64;
                                shared.hist.record(rtt);
                                c.status_ok.fetch_add(1, Relaxed);
                                let phase = *phase_rx.borrow();
                                if let Phase::Throughput { until } = phase
                                    && now < until
                                {
                                    let msg = self.status();
                                    if send(&mut ws, &msg).await.is_err() {
                                        break SessionEnd::Closed;
                                    }
                                    outstanding.push_back((Sent::Status, Instant::now()));
                                }
                            }
                            Sent::Applied => {
                                c.config_done.fetch_add(1, Relaxed);
                                c.config_last_ns.fetch_max(unix_nanos(), Relaxed);
                            }
                            Sent::FullState => {}
                        },
                    }
                    if let Some(rc) = &msg.remote_config
                        && rc.config_hash != self.applied_hash
                    {
                        c.config_received.fetch_add(1, Relaxed);
                        self.applied_hash = rc.config_hash.clone();
                        let report = AgentToServer {
                            remote_config_status: Some(RemoteConfigStatus {
                                last_remote_config_hash: self.applied_hash.clone(),
                                status: RemoteConfigStatuses::Applied as i32,
                                error_message: String::new(),
                            }),
                            ..self.heartbeat()
                        };
                        if send(&mut ws, &report).await.is_err() {
                            break SessionEnd::Closed;
                        }
                        outstanding.push_back((Sent::Applied, Instant::now()));
                    }
                    if ServerToAgentFlagSet::from_bits_retain(msg.flags)
                        .contains(ServerToAgentFlagSet::REPORT_FULL_STATE)
                    {
                        c.full_state_requests.fetch_add(1, Relaxed);
                        let report = self.full_state();
                        if send(&mut ws, &report).await.is_err() {
                            break SessionEnd::Closed;
                        }
                        outstanding.push_back((Sent::FullState, Instant::now()));
                    }
                }
            }
        };
        if admitted {
            c.live.fetch_sub(1, Relaxed);
            let phase = *phase_rx.borrow();
            if end == SessionEnd::Closed {
                if phase == Phase::Storm {
                    c.storm_closed.fetch_add(1, Relaxed);
                } else {
                    c.drops.fetch_add(1, Relaxed);
                }
            }
        } else if end == SessionEnd::Closed {
            c.connect_failed.fetch_add(1, Relaxed);
        }
        if end == SessionEnd::Quit {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
        end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The connection ended; reconnect.
    Closed,
    /// The worker is stopping.
    Quit,
}

async fn send(ws: &mut Ws, msg: &AgentToServer) -> Result<(), WsError> {
    ws.send(Message::Binary(framing::encode(msg))).await
}
