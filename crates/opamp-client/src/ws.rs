//! The WebSocket driver: a loop over the core, on tokio-tungstenite.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use opamp_proto::{AgentToServer, ServerToAgent, framing};
use opamp_transport::ws as wsconf;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::client::{Driver, LinkAction};
use crate::error::ConnectError;
use crate::net::{self, BoxedIo};

type Ws = WebSocketStream<BoxedIo>;

/// How long closing takes at most after a protocol error or a Close from the server: the
/// connection is being dropped anyway.
const ERROR_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a connection ended.
enum End {
    /// `stop()`: the goodbye has been said.
    Stopped,
    /// The server is UNAVAILABLE: reconnect at the core's `connect_at` (THR-2).
    Reconnect,
    /// The connection broke.
    Broken(ConnectError),
}

/// Runs until `stop()`.
pub(crate) async fn run(d: &Driver) {
    loop {
        if d.stop_requested() {
            return;
        }
        d.refresh_effective_config().await;
        let Some(at) = d.shared.core().connect_at() else {
            return;
        };
        // HB-6: nothing is sent while waiting to reconnect.
        tokio::select! {
            _ = d.stopped() => return,
            _ = tokio::time::sleep_until(at.into()) => {}
        }
        let result = tokio::select! {
            _ = d.stopped() => return,
            r = connect(d) => r,
        };
        let (ws, activity) = match result {
            Ok(ws) => ws,
            Err(e) => {
                d.connect_failed(&e).await;
                continue;
            }
        };
        d.shared.core().handle_connected(Instant::now());
        match connection(d, ws, &activity).await {
            End::Stopped => return,
            End::Reconnect => {}
            End::Broken(e) => {
                let delay = d
                    .shared
                    .core()
                    .handle_connection_lost(Instant::now(), &e.to_string());
                tracing::info!(?delay, "OpAMP WebSocket connection lost: {e}");
            }
        }
    }
}

/// TCP, TLS, then the WebSocket handshake with the configured headers and limits. Also
/// returns the connection's read-activity flag.
async fn connect(d: &Driver) -> Result<(Ws, Arc<AtomicBool>), ConnectError> {
    let timeout = d.settings.connect_timeout;
    let activity = Arc::new(AtomicBool::new(false));
    // CS-OP-4: the candidate settings while an offer is tried.
    let active = d.active();
    let handshake = async {
        let io: BoxedIo = Box::new(ReadActivity {
            inner: net::connect(&active.endpoint, timeout).await?,
            seen: activity.clone(),
        });
        let mut request = active.endpoint.uri.clone().into_client_request()?;
        request
            .headers_mut()
            .extend(net::extra_headers(&active.settings));
        let config = ws_config(d.settings.max_message_size);
        tokio_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .map(|(ws, _response)| (ws, activity.clone()))
            .map_err(handshake_error)
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

/// Small buffers, and the OpAMP limit as the message and frame limit, so an oversized
/// message is refused from its frame header, before its payload is buffered (WS-10).
fn ws_config(max_message_size: usize) -> wsconf::WebSocketConfig {
    wsconf::client_config(max_message_size)
}

/// THR-5: a refused upgrade (e.g. 503 with `Retry-After`) becomes a status error.
fn handshake_error(e: tungstenite::Error) -> ConnectError {
    match e {
        tungstenite::Error::Http(response) => ConnectError::Status {
            status: response.status(),
            retry_after: response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| opamp_transport::http::parse_retry_after(v, SystemTime::now())),
        },
        other => other.into(),
    }
}

/// Records that bytes came from the server, so that a large message still in transit is not
/// taken for silence by the half-open check (REP-4, `ServerGuards::reply_timeout_factor`).
struct ReadActivity {
    inner: BoxedIo,
    seen: Arc<AtomicBool>,
}

impl AsyncRead for ReadActivity {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.seen.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for ReadActivity {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Drives one open connection.
async fn connection(d: &Driver, mut ws: Ws, activity: &AtomicBool) -> End {
    let limit = d.settings.max_message_size;
    let max_elements = d.settings.max_message_elements;
    loop {
        if activity.swap(false, Ordering::Relaxed) {
            d.shared.core().handle_activity(Instant::now());
        }
        d.refresh_effective_config().await;
        match d.dispatch_events().await {
            LinkAction::Keep => {}
            LinkAction::Reconnect | LinkAction::Switch => {
                // THR-2, WS-19: agent_disconnect first, then close, then wait and reconnect.
                // CS-OP-3: the same before trying offered settings; the goodbye carries
                // APPLYING.
                let bye = d.shared.core().disconnect_message(Instant::now());
                goodbye(
                    &mut ws,
                    Some(bye),
                    wsconf::CLOSE_NORMAL,
                    d.settings.stop_timeout,
                )
                .await;
                return End::Reconnect;
            }
            LinkAction::Drop => {
                // Half-open: a goodbye would go nowhere. A close frame, briefly, then drop.
                goodbye(&mut ws, None, wsconf::CLOSE_NORMAL, ERROR_CLOSE_TIMEOUT).await;
                return End::Reconnect;
            }
        }
        if d.stop_requested() {
            return stop(d, ws).await;
        }
        // Everything due goes out now; the core coalesces pending changes into one message.
        loop {
            let msg = d.shared.core().poll_transmit(Instant::now());
            let Some(msg) = msg else { break };
            if let Err(e) = send(&mut ws, &msg, d.settings.request_timeout).await {
                return End::Broken(e);
            }
        }
        let deadline = d.shared.core().poll_timeout();
        tokio::select! {
            biased;
            _ = d.stopped() => return stop(d, ws).await,
            frame = ws.next() => match frame {
                Some(Ok(Message::Binary(data))) => {
                    // WS-10: the size was checked by tungstenite before buffering (the
                    // frame and message limits equal ours); the header and payload here.
                    match framing::decode_bytes_limited::<ServerToAgent>(data, limit, max_elements) {
                        Ok(msg) => d.shared.core().handle_message(Instant::now(), msg),
                        Err(e) => {
                            close(d, &mut ws, close_code_for(&e)).await;
                            return End::Broken(e.into());
                        }
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    // WS-1: only binary messages exist in OpAMP.
                    close(d, &mut ws, wsconf::CLOSE_UNSUPPORTED_DATA).await;
                    return End::Broken(ConnectError::Decode(
                        opamp_proto::DecodeError::MalformedHeader,
                    ));
                }
                Some(Ok(Message::Close(_))) => {
                    // WS-17, RFC 6455: tungstenite queued the Close reply; send it, then
                    // wait (briefly) for the server to end the connection.
                    let finish = async {
                        if ws.flush().await.is_ok() {
                            while let Some(Ok(_)) = ws.next().await {}
                        }
                    };
                    let _ = tokio::time::timeout(ERROR_CLOSE_TIMEOUT, finish).await;
                    return End::Broken(ConnectError::Closed);
                }
                None => return End::Broken(ConnectError::Closed),
                // Pings are answered by tungstenite itself (WS-15).
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if matches!(e, tungstenite::Error::Capacity(_)) {
                        // WS-10: oversized: close with 1009.
                        close(d, &mut ws, wsconf::CLOSE_MESSAGE_TOO_BIG).await;
                    }
                    return End::Broken(e.into());
                }
            },
            _ = sleep_until(deadline) => {}
            _ = d.shared.wake.notified() => {}
        }
    }
}

fn close_code_for(e: &opamp_proto::DecodeError) -> CloseCode {
    match e {
        opamp_proto::DecodeError::TooLarge(_) | opamp_proto::DecodeError::TooManyElements(_) => {
            wsconf::CLOSE_MESSAGE_TOO_BIG
        }
        _ => wsconf::CLOSE_INVALID_PAYLOAD,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn send(ws: &mut Ws, msg: &AgentToServer, timeout: Duration) -> Result<(), ConnectError> {
    // The core never emits a message over the limit (WS-12).
    let frame = framing::encode(msg);
    match tokio::time::timeout(timeout, ws.send(Message::Binary(frame))).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// WS-16: agent_disconnect, then the close handshake, all within `timeout`.
async fn stop(d: &Driver, mut ws: Ws) -> End {
    let bye = d.shared.core().stop(Instant::now());
    goodbye(&mut ws, bye, wsconf::CLOSE_NORMAL, d.settings.stop_timeout).await;
    End::Stopped
}

/// WS-16, WS-19: `bye` (the agent_disconnect message), then a Close frame with `code` and the
/// RFC 6455 closing handshake, all within `timeout`.
async fn goodbye(ws: &mut Ws, bye: Option<AgentToServer>, code: CloseCode, timeout: Duration) {
    let steps = async {
        if let Some(bye) = bye {
            if ws
                .send(Message::Binary(framing::encode(&bye)))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = ws
            .close(Some(CloseFrame {
                code,
                reason: "".into(),
            }))
            .await;
        // RFC 6455: wait for the server's close frame; discard anything before it.
        while let Some(Ok(_)) = ws.next().await {}
    };
    if tokio::time::timeout(timeout, steps).await.is_err() {
        tracing::debug!("WebSocket close handshake timed out");
    }
}

/// Closes after a protocol error (malformed, text or oversized message), briefly: the
/// connection is being dropped anyway. WS-16, WS-19: agent_disconnect first, then the Close
/// frame with `code`; the full status goes again on the next connection.
async fn close(d: &Driver, ws: &mut Ws, code: CloseCode) {
    let bye = d.shared.core().disconnect_message(Instant::now());
    goodbye(ws, Some(bye), code, ERROR_CLOSE_TIMEOUT).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_10_limits_and_small_buffers_are_set() {
        let c = ws_config(1024);
        assert_eq!(c.max_message_size, Some(1024));
        assert_eq!(c.max_frame_size, Some(1024));
        assert!(c.read_buffer_size <= 4096);
        assert!(c.max_write_buffer_size < usize::MAX);
    }
}
