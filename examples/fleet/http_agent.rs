//! The plain-HTTP transport of a generated agent (OpAMP over HTTP, checklist 1.3): every
//! message is a `POST` with `Content-Type: application/x-protobuf` and the
//! `OpAMP-Instance-UID` header, whose response carries the `ServerToAgent`.
//!
//! - At most one request in flight (HTTP-10); the next one may follow its response at once
//!   (APPLIED reports, full reports, the closed loop of the throughput phase).
//! - With nothing to send the agent polls with a heartbeat every `--heartbeat` seconds
//!   (HTTP-7), spread over the interval like the WebSocket heartbeats; while a config push or
//!   a storm is measured it polls every `--poll-during-config` seconds instead, because the
//!   server can only deliver in the response to a poll (HTTP-9).
//! - One keep-alive HTTP/1.1 connection per agent (hyper's client connection API), bound to
//!   the agent's 127.2.x.y source address and driven inside the agent's own task. When it
//!   closes, a new one is opened when there is something to send, like a pooled HTTP client;
//!   a request the closed connection did not answer is sent again on the new one (same
//!   sequence number, so a server that did see it answers it as a retry, RETRY-2).
//! - The server keeps a session per instance uid, not per connection: a closed TCP
//!   connection is not a disconnect. `POST /api/v1/agents/disconnect` ends the sessions; the agent
//!   notices at its next poll, whose answer asks for a full report (a new session knows
//!   nothing), and is re-admitted when that report is answered.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use opamp::proto::{
    AgentToServer, CONTENT_TYPE_PROTOBUF, DEFAULT_MAX_MESSAGE_SIZE, Message, ServerToAgent,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::agent::{Agent, ConnectError, Sent, SessionEnd, Transport};
use crate::worker::Phase;

/// `OpAMP-Instance-UID` (HTTP-5), spelled the way `HeaderName` stores names.
const INSTANCE_UID: HeaderName = HeaderName::from_static("opamp-instance-uid");

/// A request body of one chunk.
#[derive(Debug)]
pub(crate) struct OneChunk(Option<Bytes>);

impl Body for OneChunk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

type Conn = (
    SendRequest<OneChunk>,
    Connection<TokioIo<TcpStream>, OneChunk>,
);

/// Why a request got no usable answer.
enum ExchangeError {
    /// The connection closed or failed before the response was complete.
    Closed,
    /// The server answered with another status than 200.
    Status(StatusCode),
}

/// An agent that speaks plain HTTP.
pub(crate) struct HttpAgent {
    agent: Agent,
    uid_header: HeaderValue,
    /// The first message was sent (it may still be in `in_flight`).
    started: bool,
    admitted: bool,
    /// The request on the wire, kept until its answer to send it again on a new connection.
    in_flight: Option<(Bytes, Sent)>,
    /// Reports owed to the server (APPLIED, full state), sent one after the other.
    owed: VecDeque<(Bytes, Sent)>,
    /// The last probe generation answered with a probe.
    probed: u32,
    /// The phase the poll schedule was last adjusted to.
    phase_seen: Phase,
    next_poll: tokio::time::Instant,
}

fn encode(msg: &AgentToServer) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

impl HttpAgent {
    pub(crate) fn new(agent: Agent) -> Self {
        let uid_header = HeaderValue::from_str(&agent.uid.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Self {
            agent,
            uid_header,
            started: false,
            admitted: false,
            in_flight: None,
            owed: VecDeque::new(),
            probed: 0,
            phase_seen: Phase::Idle,
            next_poll: tokio::time::Instant::now(),
        }
    }

    /// The polling interval in `phase`.
    fn interval(&self, phase: Phase) -> Duration {
        let shared = &self.agent.shared;
        match phase {
            Phase::Quiet | Phase::Storm => shared.poll_during_config,
            _ => shared.heartbeat,
        }
    }

    /// A push or a storm is measured from now: poll faster, spread over the short interval.
    fn on_phase(&mut self, phase: Phase) {
        self.phase_seen = phase;
        if matches!(phase, Phase::Quiet | Phase::Storm) {
            let fast = self.interval(phase);
            let at = tokio::time::Instant::now() + self.agent.offset(fast);
            self.next_poll = self.next_poll.min(at);
        }
    }

    /// The next message to send now, if any.
    fn pick(&mut self, phase: Phase) -> Option<(Bytes, Sent)> {
        if let Some(again) = self.in_flight.take() {
            return Some(again);
        }
        if let Some(owed) = self.owed.pop_front() {
            return Some(owed);
        }
        if !self.started {
            self.started = true;
            return Some((encode(&self.agent.full_state()), Sent::First));
        }
        if !self.admitted {
            return None;
        }
        match phase {
            Phase::Probe(generation) if self.probed != generation => {
                self.probed = generation;
                return Some((encode(&self.agent.heartbeat()), Sent::Probe(generation)));
            }
            Phase::Throughput { until } if Instant::now() < until => {
                return Some((encode(&self.agent.status()), Sent::Status));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= self.next_poll {
            self.agent.shared.c.heartbeats.fetch_add(1, Relaxed);
            return Some((encode(&self.agent.heartbeat()), Sent::Heartbeat));
        }
        None
    }

    /// Waits until there is something to send; `None` when the worker stops.
    async fn next_message(
        &mut self,
        phase_rx: &mut watch::Receiver<Phase>,
    ) -> Option<(Bytes, Sent)> {
        loop {
            let phase = *phase_rx.borrow_and_update();
            if phase == Phase::Quit {
                return None;
            }
            if phase != self.phase_seen {
                self.on_phase(phase);
            }
            if let Some(next) = self.pick(phase) {
                return Some(next);
            }
            let now = tokio::time::Instant::now();
            if self.next_poll <= now {
                // Nothing due although the poll time passed (not admitted yet): no busy loop.
                self.next_poll = now + self.interval(phase);
            }
            tokio::select! {
                changed = phase_rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.next_poll) => {}
            }
        }
    }

    fn request(&self, body: Bytes) -> Request<OneChunk> {
        let shared = &self.agent.shared;
        let mut request = Request::new(OneChunk(Some(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = shared.path_uri.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, shared.host.clone());
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE_PROTOBUF),
        );
        headers.insert(INSTANCE_UID, self.uid_header.clone());
        request
    }

    /// Counts the answer, schedules the next poll and queues the reports it calls for.
    async fn on_reply(
        &mut self,
        kind: Sent,
        sent_at: Instant,
        msg: &ServerToAgent,
        phase: Phase,
        ready: &mut Option<mpsc::Sender<bool>>,
    ) {
        self.agent.answered(kind, sent_at, ready).await;
        let interval = self.interval(phase);
        if kind == Sent::First {
            self.admitted = true;
            self.next_poll = tokio::time::Instant::now() + self.agent.offset(interval);
        } else {
            self.next_poll = tokio::time::Instant::from_std(sent_at) + interval;
        }
        for (report, kind) in self.agent.follow_ups(msg).into_iter().flatten() {
            let kind = if kind == Sent::FullState && phase == Phase::Storm {
                // A new server session: the storm ended the old one.
                self.agent.shared.c.storm_closed.fetch_add(1, Relaxed);
                Sent::Readmit
            } else {
                kind
            };
            self.owed.push_back((encode(&report), kind));
        }
    }

    /// The end of a connection that closed under the agent.
    fn closed(&self, used: bool) -> SessionEnd {
        if used {
            SessionEnd::Closed
        } else {
            self.agent.shared.c.connect_failed.fetch_add(1, Relaxed);
            SessionEnd::Failed
        }
    }
}

impl Transport for HttpAgent {
    type Conn = Conn;

    fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Waits until there is something to send, then opens a connection.
    async fn connect(
        &mut self,
        phase_rx: &mut watch::Receiver<Phase>,
    ) -> Result<Conn, ConnectError> {
        if self.in_flight.is_none() {
            let next = self.next_message(phase_rx).await;
            self.in_flight = Some(next.ok_or(ConnectError::Quit)?);
        }
        let agent = &self.agent;
        let attempt = async {
            let tcp = agent.tcp().await?;
            http1::Builder::new()
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|_| ConnectError::Failed)
        };
        tokio::time::timeout(Duration::from_secs(15), attempt)
            .await
            .unwrap_or(Err(ConnectError::Failed))
    }

    async fn session(
        &mut self,
        (mut sender, conn): Conn,
        phase_rx: &mut watch::Receiver<Phase>,
        ready: &mut Option<mpsc::Sender<bool>>,
    ) -> SessionEnd {
        let shared = self.agent.shared.clone();
        let c = &shared.c;
        // The connection is driven here, in the agent's task, next to its requests.
        tokio::pin!(conn);
        let mut used = false;
        loop {
            let next = tokio::select! {
                next = self.next_message(phase_rx) => next,
                _ = &mut conn => {
                    // The server closed the idle keep-alive connection.
                    c.http_idle_closed.fetch_add(1, Relaxed);
                    return self.closed(used);
                }
            };
            let Some((body, kind)) = next else {
                return SessionEnd::Quit;
            };
            self.in_flight = Some((body.clone(), kind));
            let request = self.request(body);
            let sent_at = Instant::now();
            let result = tokio::select! {
                biased;
                r = exchange(&mut sender, request) => r,
                _ = &mut conn => Err(ExchangeError::Closed),
            };
            let bytes = match result {
                Ok(bytes) => bytes,
                Err(ExchangeError::Closed) => {
                    c.http_resent.fetch_add(1, Relaxed);
                    return self.closed(used);
                }
                Err(ExchangeError::Status(status)) => {
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        || status == StatusCode::TOO_MANY_REQUESTS
                    {
                        c.rejected.fetch_add(1, Relaxed);
                    } else {
                        c.http_errors.fetch_add(1, Relaxed);
                    }
                    return SessionEnd::Failed;
                }
            };
            let Ok(msg) = ServerToAgent::decode(bytes) else {
                c.http_errors.fetch_add(1, Relaxed);
                return SessionEnd::Failed;
            };
            used = true;
            self.in_flight = None;
            let phase = *phase_rx.borrow();
            self.on_reply(kind, sent_at, &msg, phase, ready).await;
        }
    }
}

/// Sends one request and reads its whole response body.
async fn exchange(
    sender: &mut SendRequest<OneChunk>,
    request: Request<OneChunk>,
) -> Result<Bytes, ExchangeError> {
    sender.ready().await.map_err(|_| ExchangeError::Closed)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| ExchangeError::Closed)?;
    if response.status() != StatusCode::OK {
        return Err(ExchangeError::Status(response.status()));
    }
    read_body(response.into_body())
        .await
        .ok_or(ExchangeError::Closed)
}

/// The body's bytes (usually one chunk, not copied); `None` on an error or over the limit.
async fn read_body(mut body: Incoming) -> Option<Bytes> {
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame.ok()?.into_data() else {
            continue; // trailers
        };
        match &first {
            None => first = Some(data),
            Some(head) => {
                if joined.is_empty() {
                    joined.extend_from_slice(head);
                }
                joined.extend_from_slice(&data);
                if joined.len() > DEFAULT_MAX_MESSAGE_SIZE {
                    return None;
                }
            }
        }
    }
    Some(if joined.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(joined)
    })
}
