//! WebSocket transport: one task per connection that both reads and writes, so it is the
//! connection's single writer; replies and pushes can never interleave on the wire.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opamp_proto::{AgentToServer, DecodeError, ServerToAgent, framing};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use crate::callbacks::ConnectionCallbacks;
use crate::config::{ConnectionLimits, MAX_TIMEOUT};
use crate::connection::{Connection, Outbound, PeerInfo};
use crate::core::{AgentSession, SessionConfig, Transmit};
use crate::error::ReadMessageError;
use crate::limits::{Meter, Metered, OverBudget, Slot};
use crate::service::{ResponseBody, Shared, stopped, text_response};
use crate::{registry, wire};

/// Checks that a request is a WebSocket upgrade (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Accept` value, or the 4xx answer for a request that is neither plain HTTP
/// nor an upgrade (HTTP-2). The error is the response itself, built once per bad request.
#[allow(clippy::result_large_err)]
pub(crate) fn check_upgrade(parts: &Parts) -> Result<HeaderValue, Response<ResponseBody>> {
    if parts.method != Method::GET {
        return Err(text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "OpAMP takes a POST with Content-Type: application/x-protobuf or a WebSocket upgrade",
        ));
    }
    let has_token = |name: http::header::HeaderName, token: &str| {
        parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, "websocket") {
        let mut resp = text_response(
            StatusCode::UPGRADE_REQUIRED,
            "OpAMP takes a POST with Content-Type: application/x-protobuf or a WebSocket upgrade",
        );
        resp.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        return Err(resp);
    }
    // RFC 6455 §4.1: the handshake is HTTP/1.1 or later; hyper cannot upgrade an HTTP/1.0
    // connection, which used to be answered 500.
    if parts.version < http::Version::HTTP_11 {
        return Err(text_response(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    if parts
        .headers
        .get(SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut resp = text_response(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version",
        );
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(resp);
    }
    let Some(key) = parts.headers.get(SEC_WEBSOCKET_KEY) else {
        return Err(text_response(
            StatusCode::BAD_REQUEST,
            "missing Sec-WebSocket-Key",
        ));
    };
    // The accept key is base64, always a valid header value.
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| text_response(StatusCode::BAD_REQUEST, "invalid Sec-WebSocket-Key"))
}

/// The settings every server-side WebSocket uses.
pub(crate) fn config_for(shared: &Shared) -> WebSocketConfig {
    wire::ws_config(
        shared.config.ws_read_buffer_size(),
        shared.config.max_message_size(),
    )
}

/// Wraps an upgraded stream as the server side of a WebSocket, its reads metered against
/// the server's incomplete-bytes budget.
pub(crate) async fn accept_stream<S>(
    io: S,
    config: WebSocketConfig,
    shared: &Shared,
) -> WebSocketStream<Metered<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = Metered::new(io, Meter::new(shared.budget.clone()));
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
}

/// Runs an accepted WebSocket connection in its own task once hyper hands over the socket.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    callbacks: Arc<dyn ConnectionCallbacks>,
    peer: PeerInfo,
    slot: Option<Arc<Slot>>,
) {
    let guard = shared.track();
    let span = tracing::debug_span!(
        "opamp.ws",
        remote = ?peer.remote_addr,
        instance_uid = tracing::field::Empty,
    );
    let (conn, rx) = Connection::websocket(peer, shared.config.outbound_queue_capacity());
    tokio::spawn(
        async move {
            let _guard = guard;
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            // hyper's connection buffers are gone by now; only the socket remains.
            let ws = accept_stream(TokioIo::new(upgraded), config_for(&shared), &shared).await;
            run(&shared, ws, conn, rx, callbacks, slot).await;
        }
        .instrument(span),
    );
}

type InFlight<'a> = Pin<Box<dyn Future<Output = Option<ServerToAgent>> + Send + 'a>>;

/// The reply comes out boxed: `select!` keeps its output in storage while the branch runs,
/// and an inline `ServerToAgent` (~1.6 KiB) there would enlarge every connection's future.
fn poll_in_flight<'a, 'b>(
    slot: &'a mut Option<InFlight<'b>>,
) -> impl Future<Output = Option<Box<ServerToAgent>>> + 'a {
    std::future::poll_fn(move |cx| match slot.as_mut() {
        Some(fut) => fut.as_mut().poll(cx).map(|reply| reply.map(Box::new)),
        None => Poll::Pending,
    })
}

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// The liveness timers of one WebSocket: one deadline at a time, recomputed from the read
/// meter whenever the task wakes and when it fires (see [`ConnectionLimits`]).
struct Liveness {
    /// An OpAMP message arrived (the first-message deadline is met).
    first_seen: bool,
    last_ping: Option<tokio::time::Instant>,
}

/// What a liveness deadline calls for.
#[derive(Clone, Copy)]
enum Due {
    /// Nothing yet: look again at the deadline.
    Check,
    /// The session's own timer ([`AgentSession::poll_timeout`]).
    Session,
    Ping,
    Close(CloseCode, &'static str),
}

impl Liveness {
    /// The earliest deadline and what it calls for.
    fn due(
        &self,
        core: &AgentSession,
        meter: &Meter,
        limits: &ConnectionLimits,
    ) -> (tokio::time::Instant, Due) {
        let mut next = (meter.started() + MAX_TIMEOUT, Due::Check);
        let mut consider = |at: tokio::time::Instant, due: Due| {
            if at < next.0 {
                next = (at, due);
            }
        };
        if let Some(at) = core.poll_timeout() {
            consider(at.into(), Due::Session);
        }
        let in_progress = meter.in_progress();
        if let Some((started, received)) = in_progress {
            // A message must keep its pace (memory of incomplete messages is bounded).
            consider(
                limits.message_deadline(started, received, meter.last_read()),
                Due::Close(CloseCode::Policy, "message too slow"),
            );
        } else if !self.first_seen {
            consider(
                meter.started() + limits.first_message_timeout(),
                Due::Close(CloseCode::Policy, "no message after the upgrade"),
            );
        }
        if self.first_seen {
            // HB-7, WS-14: the session decides how long the agent may be silent and when
            // to ping it; the driver only keeps the clocks.
            let (idle, ping_after) = core.ws_liveness(limits);
            if let Some(idle) = idle {
                consider(
                    meter.last_read() + idle,
                    Due::Close(CloseCode::Away, "idle timeout"),
                );
            }
            if let Some(after) = ping_after {
                let since = self
                    .last_ping
                    .map_or(meter.last_read(), |p| p.max(meter.last_read()));
                consider(since + after, Due::Ping);
            }
        }
        next
    }
}

/// Waits for the liveness deadline; the deadline moves earlier as soon as the state calls
/// for it (a message starts), and later ones are re-checked when the timer fires.
fn poll_liveness<'a>(
    mut timer: Pin<&'a mut tokio::time::Sleep>,
    live: &'a Liveness,
    core: &'a AgentSession,
    meter: &'a Meter,
    limits: &'a ConnectionLimits,
) -> impl Future<Output = Due> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
            let (at, due) = live.due(core, meter, limits);
            if at < timer.deadline() {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if at <= tokio::time::Instant::now() {
                // Fired: re-arm far away; the next poll moves it to the next deadline.
                timer.as_mut().reset(at + MAX_TIMEOUT);
                return Poll::Ready(due);
            }
            timer.as_mut().reset(at);
        }
    })
}

/// The connection loop. While `on_message` runs, the socket is not read (callbacks of one
/// connection never overlap) but pushes keep flowing out.
///
/// Not an `async fn`: an async fn's arguments are moved into locals and would sit twice in
/// the future (the stream alone is ~340 bytes); an `async move` block keeps them once.
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub(crate) fn run<'a, S>(
    shared: &'a Shared,
    mut ws: WebSocketStream<Metered<S>>,
    conn: Connection,
    mut rx: mpsc::Receiver<Box<Outbound>>,
    callbacks: Arc<dyn ConnectionCallbacks>,
    slot: Option<Arc<Slot>>,
) -> impl Future<Output = ()> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    async move {
        let config = &shared.config;
        let limits = config.limits();
        let limit = config.max_message_size();
        let write_timeout = config.write_timeout();
        let fragment = config.ws_write_fragment_size();
        let mut core = AgentSession::new(
            SessionConfig::websocket(config.server_capabilities())
                .with_full_state_min_interval(config.full_state_min_interval())
                .with_max_message_size(limit),
        );
        let mut stop = shared.stop_signal();
        let meter = ws.get_ref().meter().clone();
        let mut live = Liveness {
            first_seen: false,
            last_ping: None,
        };
        // Boxed: the connection future stays small (its size is asserted below); the timer
        // costs the same memory either way.
        let mut timer = Box::pin(tokio::time::sleep_until(meter.started() + MAX_TIMEOUT));

        // Shed (connection limit) between the upgrade and now: close at once.
        let shed_early = slot.as_ref().is_some_and(|s| !s.attach_websocket(&conn));
        if !shed_early {
            callbacks.on_connected(&conn).await;
        }
        let mut in_flight: Option<InFlight<'_>> = None;
        // This connection's claim on its agent's uid (UID-8).
        let mut claim: Option<registry::Claim> = None;
        // Whether to wait for the peer's Close: not after a refusal, which would read on into
        // the message we refused to buffer.
        let mut drain = true;

        let close = loop {
            if shed_early {
                break Some(close_frame(CloseCode::Again, "connection limit reached"));
            }
            // Everything the session has to send goes out first: replies, pushes, and what
            // an exclusive message kept out (the session decides what and when).
            if flush(&mut ws, &mut core, fragment, write_timeout)
                .await
                .is_err()
            {
                break None;
            }
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => {
                    break Some(close_frame(CloseCode::Away, "server stopping"));
                }
                _ = conn.disconnect_requested() => {
                    if slot.as_ref().is_some_and(|s| s.is_shed()) {
                        break Some(close_frame(CloseCode::Again, "connection limit reached"));
                    }
                    break Some(close_frame(CloseCode::Normal, ""));
                }
                reply = poll_in_flight(&mut in_flight) => {
                    in_flight = None;
                    core.respond_boxed(reply);
                }
                Some(push) = rx.recv() => core.queue_boxed(push),
                frame = ws.next(), if in_flight.is_none() => match frame {
                    None => break None,
                    Some(Ok(Message::Binary(data))) => {
                        meter.message_done();
                        // Decoded by copying: a zero-copy decode would make every `bytes` field the
                        // application keeps (a config hash, a config body) pin this connection's
                        // whole receive buffer. Boxed: the match keeps its scrutinee in storage
                        // through the arms' awaits.
                        match framing::decode_limited::<AgentToServer>(&data, limit, config.max_message_elements()).map(Box::new) {
                            Ok(msg) => match core.handle_message(wire::now(), &msg) {
                                Ok(received) => {
                                    if core.needs_instance_uid() {
                                        // UID-5, UID-8, UID-2: the core asks, the driver draws.
                                        core.provide_instance_uid(opamp_proto::InstanceUid::new_v7());
                                    }
                                    if received.unusable_uid {
                                        // UID-8: answered with a new uid; no agent yet.
                                        continue;
                                    }
                                    if !live.first_seen {
                                        live.first_seen = true;
                                        if let Some(slot) = &slot {
                                            slot.mark_active();
                                        }
                                    }
                                    if conn.instance_uid() != Some(received.instance_uid) {
                                        tracing::Span::current().record(
                                            "instance_uid",
                                            tracing::field::display(received.instance_uid),
                                        );
                                        conn.set_instance_uid(received.instance_uid);
                                    }
                                    // UID-8: a message on a displaced connection proves a duplicate.
                                    Box::pin(registry::note(shared, &conn, &mut claim, received.instance_uid)).await;
                                    in_flight = Some(callbacks.on_message(&conn, *msg));
                                }
                                Err(e) => Box::pin(bad_message(&mut core, &conn, &*callbacks, e)).await,
                            },
                            // WS-9: over the limit: malformed, close with 1009.
                            Err(DecodeError::TooLarge(_)) => {
                                break Some(close_frame(CloseCode::Size, "message too big"));
                            }
                            // WS-4, ERR-1: malformed header or payload: BAD_REQUEST, keep going.
                            Err(e) => Box::pin(bad_message(&mut core, &conn, &*callbacks, e.into())).await,
                        }
                    }
                    // WS-1, WS-7: only binary messages carry OpAMP.
                    Some(Ok(Message::Text(_))) => {
                        meter.message_done();
                        Box::pin(bad_message(&mut core, &conn, &*callbacks, ReadMessageError::TextFrame)).await;
                    }
                    // Pings are answered by tungstenite on the next read (WS-15); a Close is
                    // answered too and the stream then ends. A Pong answers our ping: the read
                    // meter saw its bytes, which is all liveness needs.
                    Some(Ok(_)) => meter.message_done(),
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::debug!(error = %e, "message over the limit (WS-9)");
                        let err = ReadMessageError::Decode(DecodeError::TooLarge(
                            framing::MessageTooLarge { size: limit.saturating_add(1), limit },
                        ));
                        Box::pin(callbacks.on_read_message_error(&conn, &err)).await;
                        break Some(close_frame(CloseCode::Size, "message too big"));
                    }
                    Some(Err(WsError::Io(e))) if e.get_ref().is_some_and(|e| e.is::<OverBudget>()) => {
                        tracing::debug!("incomplete-message budget exhausted; message refused");
                        drain = false;
                        break Some(close_frame(CloseCode::Again, "server busy, retry later"));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "WebSocket read failed");
                        break None;
                    }
                },
                // Not while a callback runs: the socket is not read meanwhile.
                due = poll_liveness(timer.as_mut(), &live, &core, &meter, limits), if in_flight.is_none() => match due {
                    Due::Check => {}
                    // SEQ-2: e.g. a rate-limited full-state request falls due.
                    Due::Session => core.handle_timeout(wire::now()),
                    Due::Ping => {
                        live.last_ping = Some(tokio::time::Instant::now());
                        if Box::pin(send_ping(&mut ws, write_timeout)).await.is_err() {
                            break None;
                        }
                    }
                    Due::Close(code, reason) => {
                        tracing::debug!(reason, "closing the WebSocket");
                        drain = !matches!(code, CloseCode::Policy);
                        break Some(close_frame(code, reason));
                    }
                },
            }
        };

        // A callback in progress finishes (never cancelled halfway); its reply goes out if the
        // socket still takes it.
        if let Some(pending) = in_flight.take() {
            core.respond(pending.await);
            if close.is_some() {
                let _ = flush(&mut ws, &mut core, fragment, write_timeout).await;
            }
        }
        if let Some(frame) = close {
            // WS-17: the server closes with a Close frame and the RFC 6455 handshake. Boxed:
            // it runs once per connection, so its state need not sit in every idle connection.
            Box::pin(close_gracefully(&mut ws, frame, write_timeout, drain)).await;
        }
        conn.mark_closed();
        if let Some(claim) = &claim {
            shared.uids.release(claim);
        }
        if !shed_early {
            callbacks.on_connection_close(&conn).await;
        }
        drop(slot);
    }
}

/// Sends a WebSocket Ping (liveness of agents without heartbeats).
async fn send_ping<S>(ws: &mut WebSocketStream<S>, timeout: Duration) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, ws.send(Message::Ping(Bytes::new()))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// ERR-1: reports the error to the application; the session answers `BAD_REQUEST`.
async fn bad_message(
    core: &mut AgentSession,
    conn: &Connection,
    callbacks: &dyn ConnectionCallbacks,
    err: ReadMessageError,
) {
    tracing::debug!(error = %err, "malformed message");
    callbacks.on_read_message_error(conn, &err).await;
    core.handle_malformed(&err);
}

/// Sends everything the session has to send ([`AgentSession::poll_transmit`]). Boxed: its
/// state need not sit in every idle connection's future.
fn flush<'a, S>(
    ws: &'a mut WebSocketStream<S>,
    core: &'a mut AgentSession,
    fragment: usize,
    timeout: Duration,
) -> Pin<Box<dyn Future<Output = Result<(), ()>> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    Box::pin(async move {
        // Each message is encoded in its own statement, so none is held across the write.
        while let Some(parts) = core.poll_transmit_with(wire::now(), outgoing) {
            send_parts_now(ws, parts, fragment, timeout).await?;
        }
        Ok(())
    })
}

/// A message from the session as bytes to send: per-agent fields framed (header 0x00,
/// WS-3), followed by a shared encoding as it is. By reference: encoding needs no copy of
/// the message.
fn outgoing(transmit: &Transmit) -> Outgoing {
    match transmit {
        Transmit::Shared { head, shared } => Outgoing {
            head: framing::encode(head),
            tail: shared.encoded().clone(),
        },
        Transmit::Message(msg) => Outgoing::one(framing::encode(msg)),
    }
}

/// One WebSocket message as the concatenation of up to two byte strings: a frame from
/// [`encode_frame`], or per-agent fields followed by a shared encoding.
struct Outgoing {
    head: Bytes,
    tail: Bytes,
}

impl Outgoing {
    fn one(frame: Bytes) -> Self {
        Self {
            head: frame,
            tail: Bytes::new(),
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Splits the message into frame payloads of at most `size` bytes. Only a payload that
    /// straddles `head` and `tail` is copied; every other one is a slice of the originals.
    fn fragments(self, size: usize) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.len().div_ceil(size.max(1)));
        let mut carry = bytes::BytesMut::new();
        for mut part in [self.head, self.tail] {
            if !carry.is_empty() {
                let take = (size - carry.len()).min(part.len());
                carry.extend_from_slice(&part.split_to(take));
                if carry.len() == size {
                    out.push(std::mem::take(&mut carry).freeze());
                }
            }
            while part.len() >= size {
                out.push(part.split_to(size));
            }
            if !part.is_empty() {
                carry.extend_from_slice(&part);
            }
        }
        if !carry.is_empty() || out.is_empty() {
            out.push(carry.freeze());
        }
        out
    }
}

/// Sends one WebSocket message, fragmented into frames of at most `fragment` bytes (RFC 6455
/// section 5.4): the WebSocket layer keeps a write buffer as large as the largest frame it
/// ever wrote, so big configs must not go out as one frame to every agent. Runs inside the
/// boxed [`flush`], so its state (the frame, the write, the timeout's timer) does not sit in
/// every idle connection's future (measured by `connection_future_stays_small`).
async fn send_parts_now<S>(
    ws: &mut WebSocketStream<S>,
    parts: Outgoing,
    fragment: usize,
    timeout: Duration,
) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write = async {
        if parts.len() <= fragment {
            let frame = if parts.tail.is_empty() {
                parts.head
            } else {
                let mut one = bytes::BytesMut::with_capacity(parts.len());
                one.extend_from_slice(&parts.head);
                one.extend_from_slice(&parts.tail);
                one.freeze()
            };
            return ws.send(Message::Binary(frame)).await;
        }
        let fragments = parts.fragments(fragment);
        let last = fragments.len() - 1;
        for (i, payload) in fragments.into_iter().enumerate() {
            let opcode = if i == 0 {
                OpData::Binary
            } else {
                OpData::Continue
            };
            ws.feed(Message::Frame(Frame::message(
                payload,
                OpCode::Data(opcode),
                i == last,
            )))
            .await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "WebSocket write failed");
            Err(())
        }
        Err(_) => {
            tracing::debug!("WebSocket write timed out; dropping the connection");
            Err(())
        }
    }
}

async fn close_gracefully<S>(
    ws: &mut WebSocketStream<S>,
    frame: CloseFrame,
    timeout: Duration,
    drain: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(timeout, async {
        if ws.close(Some(frame)).await.is_ok() && drain {
            // Wait for the peer's Close (RFC 6455 §7.1.1), discarding anything before it.
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod liveness_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn concat(frames: &[Bytes]) -> Vec<u8> {
        frames.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn fragments_cover_the_message_in_order_within_the_size() {
        let head = Bytes::from((0u8..10).collect::<Vec<_>>());
        let tail = Bytes::from((10u8..=255).collect::<Vec<_>>());
        let whole: Vec<u8> = (0u8..=255).collect();
        for size in [1, 3, 10, 64, 100, 255, 256, 1000] {
            let frames = Outgoing {
                head: head.clone(),
                tail: tail.clone(),
            }
            .fragments(size);
            assert_eq!(concat(&frames), whole, "size {size}");
            assert!(
                frames.iter().all(|f| f.len() <= size && !f.is_empty()),
                "size {size}"
            );
            assert_eq!(frames.len(), 256usize.div_ceil(size), "size {size}");
        }
        // The shared tail is sliced, not copied, where a frame does not straddle the head.
        let frames = Outgoing {
            head: head.clone(),
            tail: tail.clone(),
        }
        .fragments(10);
        assert_eq!(frames[1].as_ptr(), tail.as_ptr());
        assert_eq!(
            concat(&Outgoing::one(Bytes::new()).fragments(4)),
            Vec::<u8>::new()
        );
    }

    /// The connection future lives as long as the agent: its size is server memory per idle
    /// agent (BENCHMARKS.md). Messages held across awaits once made it 8.5 KiB; now ~1.8 KiB
    /// (the liveness timer is boxed to keep it so).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let service = crate::OpampService::new(
            crate::ServerConfig::default(),
            Arc::new(crate::tests_support::Reject),
        );
        struct Quiet;
        #[async_trait::async_trait]
        impl ConnectionCallbacks for Quiet {
            async fn on_message(&self, _: &Connection, _: AgentToServer) -> Option<ServerToAgent> {
                None
            }
        }
        let (a, _b) = tokio::io::duplex(64);
        let ws = accept_stream(a, config_for(&service.shared), &service.shared).await;
        let (conn, rx) = Connection::websocket(PeerInfo::default(), 4);
        assert_eq!(
            std::mem::size_of::<Box<Outbound>>(),
            8,
            "queue slots stay one pointer wide"
        );
        let fut = run(&service.shared, ws, conn, rx, Arc::new(Quiet), None);
        let size = std::mem::size_of_val(&fut);
        println!("ws::run future: {size} bytes");
        assert!(size <= 1536, "the connection future grew to {size} bytes");
    }

    #[tokio::test]
    async fn ws_read_buffer_in_use_is_small() {
        let service = crate::OpampService::new(
            crate::ServerConfig::default(),
            Arc::new(crate::tests_support::Reject),
        );
        let (a, _b) = tokio::io::duplex(64);
        let ws = accept_stream(a, config_for(&service.shared), &service.shared).await;
        let c = ws.get_config();
        assert!(c.read_buffer_size <= 4096, "{}", c.read_buffer_size);
        assert_eq!(c.write_buffer_size, 0);
        assert_eq!(
            c.max_message_size,
            Some(opamp_proto::DEFAULT_MAX_MESSAGE_SIZE)
        );
        assert_eq!(
            c.max_frame_size,
            Some(opamp_proto::DEFAULT_MAX_MESSAGE_SIZE)
        );

        let service = crate::OpampService::new(
            crate::ServerConfig::builder()
                .ws_read_buffer_size(1024)
                .max_message_size(1000)
                .build()
                .unwrap(),
            Arc::new(crate::tests_support::Reject),
        );
        let (a, _b) = tokio::io::duplex(64);
        let ws = accept_stream(a, config_for(&service.shared), &service.shared).await;
        assert_eq!(ws.get_config().read_buffer_size, 1024);
        assert_eq!(ws.get_config().max_message_size, Some(1000));
    }
}
