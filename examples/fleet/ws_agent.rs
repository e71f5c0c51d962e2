//! The WebSocket transport of a generated agent: raw OpAMP over one WebSocket.
//!
//! The server answers every `AgentToServer` with exactly one `ServerToAgent`, in order, and
//! may push more in between. The agent keeps a queue of what it sent and is still waiting an
//! answer for: a message that arrives while the queue is empty is a push. Heartbeats pause
//! while a config push or a reconnect storm is being measured, so that pushes are never
//! mistaken for replies.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use opamp::proto::{AgentToServer, ServerToAgent, framing};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::agent::{Agent, ConnectError, Sent, SessionEnd, Transport};
use crate::worker::Phase;

type Ws = WebSocketStream<TcpStream>;

/// An agent connected over WebSocket.
pub(crate) struct WsAgent(pub(crate) Agent);

impl Transport for WsAgent {
    type Conn = Ws;

    fn agent(&self) -> &Agent {
        &self.0
    }

    async fn connect(&mut self, _: &mut watch::Receiver<Phase>) -> Result<Ws, ConnectError> {
        let agent = &self.0;
        let attempt = async {
            let tcp = agent.tcp().await?;
            let config = opamp::transport::ws::client_config(framing::DEFAULT_MAX_MESSAGE_SIZE);
            match tokio_tungstenite::client_async_with_config(
                agent.shared.url.as_str(),
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

    /// One connection, from the first message to the close.
    async fn session(
        &mut self,
        mut ws: Ws,
        phase_rx: &mut watch::Receiver<Phase>,
        ready: &mut Option<mpsc::Sender<bool>>,
    ) -> SessionEnd {
        let agent = &mut self.0;
        let shared = agent.shared.clone();
        let c = &shared.c;
        let mut outstanding: VecDeque<(Sent, Instant)> = VecDeque::with_capacity(2);
        let mut admitted = false;
        let hb = shared.heartbeat;
        // Spread heartbeats over the interval.
        let start = tokio::time::Instant::now() + agent.offset(hb);
        let mut heartbeat = tokio::time::interval_at(start, hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let first = agent.full_state();
        if send(&mut ws, &first).await.is_err() {
            c.connect_failed.fetch_add(1, Relaxed);
            return SessionEnd::Failed;
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
                            Some((agent.status(), Sent::Status))
                        }
                        Phase::Probe(generation) if admitted => {
                            Some((agent.heartbeat(), Sent::Probe(generation)))
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
                        let msg = agent.heartbeat();
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
                    // What this message answers, if anything.
                    match outstanding.pop_front() {
                        None => {
                            c.pushes.fetch_add(1, Relaxed);
                        }
                        Some((kind, sent_at)) => {
                            agent.answered(kind, sent_at, ready).await;
                            if kind == Sent::First {
                                admitted = true;
                            }
                            // The closed loop of the throughput phase.
                            let phase = *phase_rx.borrow();
                            if kind == Sent::Status
                                && let Phase::Throughput { until } = phase
                                && Instant::now() < until
                            {
                                let msg = agent.status();
                                if send(&mut ws, &msg).await.is_err() {
                                    break SessionEnd::Closed;
                                }
                                outstanding.push_back((Sent::Status, Instant::now()));
                            }
                        }
                    }
                    let mut sent_all = true;
                    for (report, kind) in agent.follow_ups(&msg).into_iter().flatten() {
                        sent_all = send(&mut ws, &report).await.is_ok();
                        if !sent_all {
                            break;
                        }
                        outstanding.push_back((kind, Instant::now()));
                    }
                    if !sent_all {
                        break SessionEnd::Closed;
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
            return SessionEnd::Failed;
        }
        if end == SessionEnd::Quit {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
        end
    }
}

async fn send(ws: &mut Ws, msg: &AgentToServer) -> Result<(), WsError> {
    ws.send(Message::Binary(framing::encode(msg))).await
}
