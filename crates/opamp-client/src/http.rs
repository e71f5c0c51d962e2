//! The plain-HTTP driver: POST requests over a kept-alive hyper HTTP/1.1 connection.

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use opamp_proto::framing::MessageTooLarge;
use opamp_proto::{
    AgentToServer, CONTENT_TYPE_PROTOBUF, DecodeError, INSTANCE_UID_HEADER, InstanceUid, Message,
    ServerToAgent,
};
use opamp_transport::gzip;

use std::sync::Arc;

use crate::client::{Active, Driver, LinkAction};
use crate::error::ConnectError;
use crate::net;

type Sender = SendRequest<Full<Bytes>>;

/// The outcome of one request.
enum Outcome {
    Answer(Box<ServerToAgent>),
    /// 400 or 413: the server refused this request; it is not retried (HTTP-14, RETRY-3).
    Rejected(StatusCode),
}

/// Runs until `stop()`.
pub(crate) async fn run(d: &Driver) {
    let mut conn: Option<Sender> = None;
    // The settings `conn` was opened with.
    let mut conn_for = d.current();
    loop {
        d.refresh_effective_config().await;
        // The settings in force before the events: the server to say goodbye to on a switch.
        let before = conn_for.clone();
        if d.dispatch_events().await == LinkAction::Switch {
            // CS-OP-3, HTTP-11: a last request to the current server, carrying APPLYING and
            // agent_disconnect; its answer does not matter.
            let bye = d.shared.core().disconnect_message(Instant::now());
            let timeout = d.settings.stop_timeout;
            if let Err(e) = tokio::time::timeout(timeout, exchange(d, &before, &mut conn, &bye))
                .await
                .unwrap_or(Err(ConnectError::Timeout))
            {
                tracing::debug!("disconnect request before a switch failed: {e}");
            }
        }
        if d.stop_requested() {
            break;
        }
        // CS-OP-4: the candidate while an offer is tried; a kept-alive connection to other
        // settings is not reused.
        let active = d.active();
        if !Arc::ptr_eq(&active, &conn_for) {
            conn = None;
            conn_for = active;
        }
        let msg = d.shared.core().poll_transmit(Instant::now());
        if let Some(msg) = msg {
            // HTTP-10: this is the only request in flight; the core sends nothing else until
            // it has the answer.
            let timeout = d.settings.request_timeout;
            let result = tokio::select! {
                _ = d.stopped() => {
                    // The abandoned request's connection is in an unknown state.
                    conn = None;
                    break;
                }
                r = tokio::time::timeout(timeout, exchange(d, &conn_for, &mut conn, &msg)) => {
                    r.unwrap_or(Err(ConnectError::Timeout))
                }
            };
            match result {
                Ok(Outcome::Answer(answer)) => {
                    d.shared.core().handle_message(Instant::now(), *answer);
                }
                Ok(Outcome::Rejected(status)) => {
                    d.shared.core().handle_request_rejected(Instant::now());
                    tracing::warn!(%status, "OpAMP server refused a request; not retrying it");
                    let error = ConnectError::Status {
                        status,
                        retry_after: None,
                    };
                    d.callbacks.on_connect_failed(&error).await;
                }
                Err(e) => {
                    conn = None;
                    d.connect_failed(&e).await;
                }
            }
            continue;
        }
        let deadline = d.shared.core().poll_timeout();
        tokio::select! {
            _ = d.stopped() => break,
            _ = d.shared.wake.notified() => {}
            _ = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
    // HTTP-11, DIS-1: the last request carries agent_disconnect, if the server is reachable.
    let bye = d.shared.core().stop(Instant::now());
    if let Some(bye) = bye {
        let timeout = d.settings.stop_timeout;
        match tokio::time::timeout(timeout, exchange(d, &conn_for, &mut conn, &bye)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!("disconnect request failed: {e}"),
            Err(_) => tracing::debug!("disconnect request timed out"),
        }
    }
}

/// Sends one AgentToServer and reads its answer.
async fn exchange(
    d: &Driver,
    active: &Active,
    conn: &mut Option<Sender>,
    msg: &AgentToServer,
) -> Result<Outcome, ConnectError> {
    let limit = d.settings.max_message_size;
    let reused = conn.as_ref().is_some_and(|s| !s.is_closed());
    let response = match send(d, active, conn, msg).await {
        // A kept-alive connection the server closed while idle fails before any answer:
        // one more try on a fresh connection, so an idle timeout is not a failure.
        Err(e) if reused && (e.is_incomplete_message() || e.is_canceled() || e.is_closed()) => {
            *conn = None;
            send(d, active, conn, msg).await?
        }
        other => other?,
    };

    let status = response.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::BAD_REQUEST {
        return Ok(Outcome::Rejected(status));
    }
    if !status.is_success() {
        // THR-5: 429/503 with Retry-After; anything else is retried with backoff.
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| opamp_transport::http::parse_retry_after(v, SystemTime::now()));
        return Err(ConnectError::Status {
            status,
            retry_after,
        });
    }
    let gzipped = opamp_transport::http::is_gzip_encoded(response.headers());
    // HTTP-15: refuse an announced oversized body before reading any of it.
    if let Some(len) = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(MessageTooLarge {
                size: usize::try_from(len).unwrap_or(usize::MAX),
                limit,
            }
            .into());
        }
    }
    // HTTP-15: and stop reading at the limit whatever the framing.
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => ConnectError::from(*e),
            Err(_) => ConnectError::TooLarge(MessageTooLarge {
                size: limit + 1,
                limit,
            }),
        })?
        .to_bytes();
    let body = if gzipped {
        // HTTP-4, HTTP-15: decompressed size limited too.
        gzip::decompress_limited(&body, limit).map_err(|e| match e {
            gzip::GzipError::TooLarge(t) => ConnectError::TooLarge(t),
            other => ConnectError::Gzip(other.to_string()),
        })?
    } else {
        body
    };
    opamp_proto::elements::count_elements::<ServerToAgent>(&body, d.settings.max_message_elements)
        .map_err(|e| ConnectError::Decode(DecodeError::from(e)))?;
    let answer =
        ServerToAgent::decode(body).map_err(|e| ConnectError::Decode(DecodeError::from(e)))?;
    Ok(Outcome::Answer(Box::new(answer)))
}

/// Sends the request on the kept-alive connection, opening one if needed.
async fn send(
    d: &Driver,
    active: &Active,
    conn: &mut Option<Sender>,
    msg: &AgentToServer,
) -> Result<http::Response<hyper::body::Incoming>, SendFailure> {
    let request = build_request(d, active, msg)?;
    let sender = match conn {
        Some(sender) if !sender.is_closed() => sender,
        _ => conn.insert(open(d, active).await?),
    };
    sender.ready().await?;
    Ok(sender.send_request(request).await?)
}

/// A failed send: hyper's error is kept apart to tell a stale connection.
#[derive(Debug)]
enum SendFailure {
    Hyper(hyper::Error),
    Other(ConnectError),
}

impl SendFailure {
    fn hyper(&self) -> Option<&hyper::Error> {
        match self {
            SendFailure::Hyper(e) => Some(e),
            SendFailure::Other(_) => None,
        }
    }
    fn is_incomplete_message(&self) -> bool {
        self.hyper()
            .is_some_and(hyper::Error::is_incomplete_message)
    }
    fn is_canceled(&self) -> bool {
        self.hyper().is_some_and(hyper::Error::is_canceled)
    }
    fn is_closed(&self) -> bool {
        self.hyper().is_some_and(hyper::Error::is_closed)
    }
}

impl From<hyper::Error> for SendFailure {
    fn from(e: hyper::Error) -> Self {
        SendFailure::Hyper(e)
    }
}

impl From<ConnectError> for SendFailure {
    fn from(e: ConnectError) -> Self {
        SendFailure::Other(e)
    }
}

impl From<SendFailure> for ConnectError {
    fn from(e: SendFailure) -> Self {
        match e {
            SendFailure::Hyper(e) => e.into(),
            SendFailure::Other(e) => e,
        }
    }
}

fn build_request(
    d: &Driver,
    active: &Active,
    msg: &AgentToServer,
) -> Result<Request<Full<Bytes>>, ConnectError> {
    let encoded = msg.encode_to_vec();
    let mut builder = Request::post(active.endpoint.path_and_query.as_str())
        .header(HOST, active.endpoint.host_header.clone())
        // HTTP-2
        .header(CONTENT_TYPE, CONTENT_TYPE_PROTOBUF)
        // HTTP-4: gzip answers are decompressed with the size limit.
        .header(ACCEPT_ENCODING, "gzip");
    // HTTP-5: the uid of this very message.
    if let Ok(uid) = InstanceUid::try_from(&msg.instance_uid[..]) {
        builder = builder.header(INSTANCE_UID_HEADER, uid.to_string());
    }
    let body = if d.settings.compression {
        // HTTP-3
        builder = builder.header(CONTENT_ENCODING, "gzip");
        Bytes::from(gzip::compress(&encoded))
    } else {
        Bytes::from(encoded)
    };
    let mut request = builder
        .body(Full::new(body))
        .map_err(|e| ConnectError::Io(std::io::Error::other(e)))?;
    request
        .headers_mut()
        .extend(net::extra_headers(&active.settings));
    Ok(request)
}

/// A new HTTP/1.1 connection; its I/O runs in a task that ends when the sender is dropped.
async fn open(d: &Driver, active: &Active) -> Result<Sender, ConnectError> {
    let io = net::connect(&active.endpoint, d.settings.connect_timeout).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("OpAMP HTTP connection ended: {e}");
        }
    });
    Ok(sender)
}
