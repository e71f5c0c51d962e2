//! Plain-HTTP transport: one request carries one `AgentToServer`, its response one
//! `ServerToAgent` (HTTP-1); a session per instance uid stands in for the connection.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use opamp_proto::{
    AgentToServer, CONTENT_TYPE_PROTOBUF, DecodeError, InstanceUid, Message,
    ServerErrorResponseType, ServerToAgent, framing::MessageTooLarge,
    server_error_response::Details,
};
use tracing::Instrument;

use crate::callbacks::{ConnectionCallbacks, DuplicateUid, retry_after_value};
use crate::connection::{Connection, PeerInfo};
use crate::core::{
    AgentSession, EndReason, Refusal, SessionConfig, SessionTable, TableConfig,
    is_usable_instance_uid,
};
use crate::error::ReadMessageError;
use crate::limits::BodyError;
use crate::registry::{self, Claim, UidRegistry};
use crate::service::{ResponseBody, Shared, text_response};
use crate::wire;

/// `Retry-After` of a request refused because the session table is full: the recommended
/// minimum retry interval (THR-7).
const SESSIONS_FULL_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The plain-HTTP sessions of one server: the sans-IO [`SessionTable`] (uid lookup, the
/// session cap and admission, idle expiry), behind a lock taken briefly per request.
pub(crate) struct Sessions {
    table: Mutex<SessionTable<Arc<Session>>>,
    sweeper_started: std::sync::atomic::AtomicBool,
}

pub(crate) struct Session {
    conn: Connection,
    /// The mTLS chain of the request that created the session; a request with another
    /// chain is refused (it could otherwise take this agent's pushes).
    #[cfg(feature = "tls")]
    certificates: Option<crate::PeerCertificates>,
    state: tokio::sync::Mutex<State>,
    /// Where the session's uid claim is given back when it ends (UID-8).
    uids: Arc<UidRegistry>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("conn", &self.conn).finish()
    }
}

impl Session {
    /// Whether a request from `peer` may use this session: under mTLS, only with the chain
    /// that created it (review finding 2b).
    fn admits(&self, peer: &PeerInfo) -> bool {
        #[cfg(feature = "tls")]
        {
            same_certificates(self.certificates.as_ref(), peer.certificates.as_ref())
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = peer;
            true
        }
    }

    /// Whether admission may evict it now: not closed, not ended, and not serving a
    /// request (then it is not idle: it stays).
    fn evictable(&self) -> bool {
        !self.conn.is_closed() && self.state.try_lock().is_ok_and(|state| !state.ended)
    }
}

#[cfg(feature = "tls")]
fn same_certificates(
    a: Option<&crate::PeerCertificates>,
    b: Option<&crate::PeerCertificates>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.as_slice() == b.as_slice(),
        _ => false,
    }
}

/// Why no session serves a request.
enum NoSession {
    Refused(Refusal),
    /// The uid's session belongs to another client certificate chain.
    Forbidden,
}

struct State {
    core: AgentSession,
    callbacks: Arc<dyn ConnectionCallbacks>,
    connected: bool,
    ended: bool,
    /// The session's claim on its agent's uid (UID-8).
    claim: Option<Claim>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The sessions that left the table, to end outside its lock.
fn take_ended(table: &mut SessionTable<Arc<Session>>) -> Vec<Arc<Session>> {
    let mut out = Vec::new();
    while let Some(event) = table.poll_event() {
        if event.reason == EndReason::Evicted {
            tracing::debug!(instance_uid = ?event.session.conn.instance_uid(), "plain-HTTP session table full; oldest one-poll session evicted");
        }
        // Later sends fail at once, before `end` runs.
        event.session.conn.mark_closed();
        out.push(event.session);
    }
    out
}

/// Ends sessions that left the table, on their own task (the caller may hold a session's
/// lock; `end` is idempotent).
fn end_later(ended: Vec<Arc<Session>>) {
    for session in ended {
        tokio::spawn(async move { end(&session).await });
    }
}

impl Sessions {
    pub(crate) fn new(config: &crate::ServerConfig) -> Self {
        Self {
            table: Mutex::new(SessionTable::new(TableConfig::from_server_config(config))),
            sweeper_started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The live session of `uid`, or a new one if admission lets it in.
    fn get_or_create(
        &self,
        uid: InstanceUid,
        shared: &Shared,
        callbacks: &Arc<dyn ConnectionCallbacks>,
        peer: &PeerInfo,
    ) -> Result<Arc<Session>, NoSession> {
        let mut table = lock(&self.table);
        if let Some(s) = table.get(&uid)
            && !s.conn.is_closed()
        {
            if !s.admits(peer) {
                return Err(NoSession::Forbidden);
            }
            return Ok(s.clone());
        }
        let config = &shared.config;
        let made = table.admit(
            wire::now(),
            uid,
            peer.remote_addr,
            || {
                Arc::new(Session {
                    conn: Connection::http(
                        peer.clone(),
                        Some(uid),
                        config.outbound_queue_capacity(),
                    ),
                    #[cfg(feature = "tls")]
                    certificates: peer.certificates.clone(),
                    uids: shared.uids.clone(),
                    state: tokio::sync::Mutex::new(State {
                        core: AgentSession::new(session_config(config)),
                        callbacks: callbacks.clone(),
                        connected: false,
                        ended: false,
                        claim: None,
                    }),
                })
            },
            |s| s.evictable(),
        );
        let ended = take_ended(&mut table);
        drop(table);
        end_later(ended);
        made.map_err(NoSession::Refused)
    }

    /// Applies `f` to the table, then ends (later) the sessions that left it.
    fn update(&self, f: impl FnOnce(&mut SessionTable<Arc<Session>>)) {
        let mut table = lock(&self.table);
        f(&mut table);
        let ended = take_ended(&mut table);
        drop(table);
        end_later(ended);
    }

    /// Number of live sessions.
    pub(crate) fn len(&self) -> usize {
        lock(&self.table).len()
    }
}

/// Ends a session once: `on_connection_close` runs, later sends fail.
async fn end(session: &Arc<Session>) {
    session.conn.mark_closed();
    let mut state = session.state.lock().await;
    if state.ended {
        return;
    }
    state.ended = true;
    if let Some(claim) = state.claim.take() {
        session.uids.release(&claim);
    }
    if state.connected {
        let callbacks = state.callbacks.clone();
        callbacks.on_connection_close(&session.conn).await;
    }
}

/// Ends every session (server shutdown).
pub(crate) async fn close_all(shared: &Shared) {
    let ended = {
        let mut table = lock(&shared.sessions.table);
        table.clear();
        take_ended(&mut table)
    };
    for s in ended {
        end(&s).await;
    }
}

/// Runs the table's timers (HB-5 idle expiry) and forgets closed sessions.
fn start_sweeper(shared: &Arc<Shared>) {
    use std::sync::atomic::Ordering;
    if shared.sessions.sweeper_started.swap(true, Ordering::AcqRel) {
        return;
    }
    let idle = shared.config.http_idle_timeout();
    let period = (idle / 4).max(Duration::from_millis(10));
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let mut stop = shared.stop_signal();
    tokio::spawn(async move {
        loop {
            let next = weak
                .upgrade()
                .and_then(|s| lock(&s.sessions.table).poll_timeout());
            let at = next.map_or_else(|| tokio::time::Instant::now() + period, Into::into);
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                _ = crate::service::stopped(&mut stop) => return,
            }
            let Some(shared) = weak.upgrade() else { return };
            let ended = {
                let mut table = lock(&shared.sessions.table);
                // Closed by the application (`Connection::disconnect`).
                table.retain(|s| !s.conn.is_closed());
                table.handle_timeout(wire::now());
                take_ended(&mut table)
            };
            for s in ended {
                tracing::debug!(instance_uid = ?s.conn.instance_uid(), "plain-HTTP session ended (idle or disconnected)");
                end(&s).await;
            }
        }
    });
}

/// Handles one plain-HTTP request that `on_connecting` accepted.
pub(crate) async fn handle<B>(
    shared: &Arc<Shared>,
    parts: Parts,
    body: B,
    callbacks: Arc<dyn ConnectionCallbacks>,
    peer: PeerInfo,
) -> Response<ResponseBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let span = tracing::debug_span!(
        "opamp.http",
        remote = ?peer.remote_addr,
        instance_uid = tracing::field::Empty,
    );
    handle_inner(shared, parts, body, callbacks, peer)
        .instrument(span)
        .await
}

async fn handle_inner<B>(
    shared: &Arc<Shared>,
    parts: Parts,
    body: B,
    callbacks: Arc<dyn ConnectionCallbacks>,
    peer: PeerInfo,
) -> Response<ResponseBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = shared.config.max_message_size();
    // HTTP-3: gzip or identity; OpAMP defines no other coding.
    if wire::has_unsupported_encoding(&parts.headers) {
        return text_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding must be gzip or identity",
        );
    }
    let gzipped = wire::is_gzip_encoded(&parts.headers);

    // The header uid, if valid, names the agent for errors before the body is decoded.
    let header = wire::instance_uid(&parts.headers);
    let header_uid = header.clone().and_then(Result::ok);

    // HTTP-14: the limit holds for the raw body and again after decompression. The whole
    // body must arrive within `http_body_timeout`, and a stop does not wait for it: a client
    // trickling its body would otherwise hold this task and its buffer (and a graceful
    // shutdown) forever.
    let mut stop = shared.stop_signal();
    let content_length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // ConnectionLimits: the body keeps a least pace, and its bytes count towards the
    // server-wide budget for incomplete messages until the request is answered.
    let read = crate::limits::read_body(
        body,
        content_length,
        limit,
        shared.config.http_body_timeout(),
        shared.config.limits(),
        &shared.budget,
    );
    let collected = tokio::select! {
        read = read => read,
        () = crate::service::stopped(&mut stop) => {
            return text_response(StatusCode::SERVICE_UNAVAILABLE, "server is stopping");
        }
    };
    let (raw, _charge) = match collected {
        Ok(read) => read,
        Err(BodyError::TooSlow) => {
            tracing::debug!("request body too slow (http_body_timeout or min_read_rate)");
            return text_response(StatusCode::REQUEST_TIMEOUT, "request body too slow");
        }
        Err(BodyError::OverBudget) => {
            tracing::debug!("incomplete-message budget exhausted; request refused");
            let mut resp = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "server busy with other requests, retry later",
            );
            resp.headers_mut()
                .insert(RETRY_AFTER, retry_after_value(SESSIONS_FULL_RETRY_AFTER));
            return resp;
        }
        Err(BodyError::TooLarge) => {
            let err = ReadMessageError::Decode(DecodeError::TooLarge(MessageTooLarge {
                size: limit.saturating_add(1),
                limit,
            }));
            report_error(&callbacks, &peer, header_uid, &err).await;
            return text_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
        Err(BodyError::Read(e)) => {
            tracing::debug!(error = %e, "reading the request body failed");
            return text_response(StatusCode::BAD_REQUEST, "cannot read the request body");
        }
    };
    let body: Bytes = if gzipped {
        match wire::decompress_limited(&raw, limit) {
            Ok(plain) => plain,
            Err(wire::GzipError::TooLarge(_)) => {
                let err = ReadMessageError::Decode(DecodeError::TooLarge(MessageTooLarge {
                    size: limit.saturating_add(1),
                    limit,
                }));
                report_error(&callbacks, &peer, header_uid, &err).await;
                return text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large after decompression",
                );
            }
            Err(_) => {
                report_error(&callbacks, &peer, header_uid, &ReadMessageError::Gzip).await;
                return text_response(StatusCode::BAD_REQUEST, "invalid gzip body");
            }
        }
    } else {
        raw
    };

    // Decoded by copying, so `bytes` fields the application keeps do not pin the request
    // body's buffer.
    let max_elements = shared.config.max_message_elements();
    if let Err(e) = opamp_proto::elements::count_elements::<AgentToServer>(&body, max_elements) {
        let err = ReadMessageError::Decode(DecodeError::from(e));
        report_error(&callbacks, &peer, header_uid, &err).await;
        return text_response(StatusCode::BAD_REQUEST, "message has too many elements");
    }
    let msg = match AgentToServer::decode(&body[..]) {
        Ok(msg) => msg,
        Err(e) => {
            let err = ReadMessageError::Decode(DecodeError::from(e));
            report_error(&callbacks, &peer, header_uid, &err).await;
            return text_response(StatusCode::BAD_REQUEST, "invalid AgentToServer message");
        }
    };
    let uid = match InstanceUid::try_from(&msg.instance_uid[..]) {
        Ok(uid) => uid,
        Err(e) => {
            let err = ReadMessageError::InstanceUid(e);
            report_error(&callbacks, &peer, header_uid, &err).await;
            return text_response(StatusCode::BAD_REQUEST, "instance_uid must be 16 bytes");
        }
    };
    tracing::Span::current().record("instance_uid", tracing::field::display(uid));
    if header.is_some() && header_uid != Some(uid) {
        // HTTP-5 says they are equal. `on_connecting` may have authorized the header, the
        // body names the session: a mismatch could reach another agent's session.
        report_error(
            &callbacks,
            &peer,
            header_uid,
            &ReadMessageError::InstanceUidHeader,
        )
        .await;
        return text_response(
            StatusCode::BAD_REQUEST,
            if header_uid.is_some() {
                "OpAMP-Instance-UID header differs from instance_uid"
            } else {
                "OpAMP-Instance-UID header is not a hyphenated UUID (8-4-4-4-12 hex digits)"
            },
        );
    }

    let accept_gzip = wire::accepts_gzip(&parts.headers);
    if !is_usable_instance_uid(&uid) {
        // UID-8: a nil uid gets a new one, statelessly: no session is keyed by it. The
        // answer is the session core's, from a session that is dropped at once.
        let mut once = AgentSession::new(session_config(&shared.config));
        if once.handle_message(wire::now(), &msg).is_ok() && once.needs_instance_uid() {
            once.provide_instance_uid(InstanceUid::new_v7());
        }
        return match once.poll_transmit(wire::now()) {
            Some(answer) => respond(answer.into_message(), accept_gzip),
            // Cannot happen: the session answers an unusable uid once it has a new one.
            None => text_response(StatusCode::INTERNAL_SERVER_ERROR, "no answer"),
        };
    }
    start_sweeper(shared);

    // A session found here may end before its lock is ours; then take a fresh one.
    for _ in 0..3 {
        let session = match shared
            .sessions
            .get_or_create(uid, shared, &callbacks, &peer)
        {
            Ok(session) => session,
            Err(NoSession::Refused(Refusal::Full)) => {
                tracing::debug!("plain-HTTP session limit reached; new agent refused");
                let mut resp = text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many plain-HTTP sessions, retry later",
                );
                resp.headers_mut()
                    .insert(RETRY_AFTER, retry_after_value(SESSIONS_FULL_RETRY_AFTER));
                return resp;
            }
            Err(NoSession::Refused(Refusal::RateLimited(wait))) => {
                tracing::debug!("new plain-HTTP sessions from this source over budget");
                let mut resp = text_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many new plain-HTTP sessions from this address, retry later",
                );
                resp.headers_mut()
                    .insert(RETRY_AFTER, retry_after_value(wait));
                return resp;
            }
            Err(NoSession::Forbidden) => {
                tracing::debug!("plain-HTTP session belongs to another client certificate");
                return text_response(
                    StatusCode::FORBIDDEN,
                    "instance_uid belongs to another client certificate",
                );
            }
        };
        let mut state = session.state.lock().await;
        if state.ended {
            continue;
        }
        let now = wire::now();
        shared
            .sessions
            .update(|table| table.handle_request(now, &uid));
        let conn = session.conn.clone();
        let cbs = state.callbacks.clone();
        if !state.connected {
            state.connected = true;
            cbs.on_connected(&conn).await;
        }

        let received = match state.core.handle_message(now, &msg) {
            Ok(r) => r,
            Err(e) => {
                // Cannot happen: the uid was checked above. Answer as for any bad message.
                cbs.on_read_message_error(&conn, &e).await;
                return text_response(StatusCode::BAD_REQUEST, "invalid AgentToServer message");
            }
        };
        if received.duplicate {
            // UID-8: a second agent polls with this session's uid; it is not this
            // session's agent, so neither the session nor the application sees it unless
            // the application allows it.
            let duplicate = DuplicateUid {
                instance_uid: uid,
                kept: conn.clone(),
                newcomer: None,
            };
            let policy = shared.callbacks.on_duplicate_uid(&duplicate).await;
            tracing::info!(instance_uid = %uid, ?policy, "duplicate instance uid (UID-8)");
            state.core.resolve_duplicate(uid, policy);
        }
        if state.core.needs_instance_uid() {
            // UID-5, UID-8, UID-2: the core asks, the driver draws.
            state.core.provide_instance_uid(InstanceUid::new_v7());
        }
        if received.duplicate {
            if let Some(answer) = state.core.poll_transmit(now) {
                // Reassigned or refused: the session's own exchange is untouched.
                drop(state);
                return respond(answer.into_message(), accept_gzip);
            }
        } else {
            registry::note(shared, &conn, &mut state.claim, received.instance_uid).await;
        }
        if let Some(old) = received.switched_from {
            // UID-7: the agent now uses the assigned uid; drop the old key.
            shared.sessions.update(|table| table.remove_uid(&old));
        }
        conn.set_instance_uid(received.instance_uid);

        let reply = cbs.on_message(&conn, msg).await;
        // HTTP-9: what was pushed since the last poll rides on this response (the session
        // merges it with the reply).
        if let Some(pending) = conn.take_pending() {
            state.core.queue_boxed(pending);
        }
        let Some(reply) = state.core.respond_now(wire::now(), reply) else {
            // Cannot happen: a handled message always has its reply (REP-4).
            return text_response(StatusCode::INTERNAL_SERVER_ERROR, "no reply");
        };
        let reply = reply.into_message();
        let offered = state.core.offered_heartbeat_interval();
        let assigned = state.core.assigned_instance_uid();
        shared.sessions.update(|table| {
            if let Some(interval) = offered {
                // HB-5: the session lives as long as the offered polling interval asks.
                table.set_polling_interval(&uid, interval);
            }
            if let Some(assigned) = assigned {
                // UID-5: the agent's next poll carries the new uid; find this session by it.
                table.add_uid(&uid, assigned);
            }
        });

        if received.disconnect || conn.is_closed() {
            // DIS-2: forget the agent once it has its answer.
            state.ended = true;
            conn.mark_closed();
            if let Some(claim) = state.claim.take() {
                shared.uids.release(&claim);
            }
            shared.sessions.update(|table| table.remove(&uid));
            cbs.on_connection_close(&conn).await;
        }
        drop(state);
        return respond(reply, accept_gzip);
    }
    text_response(StatusCode::SERVICE_UNAVAILABLE, "session busy, retry")
}

/// The settings of a plain-HTTP session.
fn session_config(config: &crate::ServerConfig) -> SessionConfig {
    SessionConfig::plain_http(config.server_capabilities())
        .with_full_state_min_interval(config.full_state_min_interval())
        .with_max_message_size(config.max_message_size())
}

/// Calls `on_read_message_error` for a message that never reached a session.
async fn report_error(
    callbacks: &Arc<dyn ConnectionCallbacks>,
    peer: &PeerInfo,
    uid: Option<InstanceUid>,
    err: &ReadMessageError,
) {
    tracing::debug!(error = %err, "bad plain-HTTP request");
    // A closed throwaway handle for the callback: nothing is ever sent through it.
    let conn = Connection::http(peer.clone(), uid, 0);
    conn.mark_closed();
    callbacks.on_read_message_error(&conn, err).await;
}

/// The HTTP response carrying `reply`, which the session fitted into the size limit
/// (HTTP-16).
fn respond(reply: ServerToAgent, accept_gzip: bool) -> Response<ResponseBody> {
    // THR-5: overload is answered with 503 and Retry-After over plain HTTP.
    if let Some(err) = &reply.error_response
        && err.r#type() == ServerErrorResponseType::Unavailable
    {
        let mut resp = text_response(StatusCode::SERVICE_UNAVAILABLE, "server overloaded");
        if let Some(Details::RetryInfo(info)) = &err.details {
            resp.headers_mut().insert(
                RETRY_AFTER,
                retry_after_value(Duration::from_nanos(info.retry_after_nanoseconds)),
            );
        }
        return resp;
    }
    let encoded = reply.encode_to_vec();
    let mut resp = Response::new(Full::new(Bytes::new()));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_PROTOBUF),
    );
    // HTTP-4: gzip only when the agent said it takes it.
    let body = if accept_gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        wire::gzip(&encoded)
    } else {
        encoded
    };
    *resp.body_mut() = Full::new(Bytes::from(body));
    resp
}
