//! The web UI and the JSON API behind it (documented in README.md).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post, put};
use opamp::proto::InstanceUid;
use serde_json::json;

use crate::State;
use crate::db::{Actor, Change, ConfigVersion, Dialect, NamedConfig, NewVersion, StoreError};
use crate::desired::{Source, Template};
use crate::packages::{PackageSet, RangeAsk, RepoError, parse_range};
use crate::store;
use crate::store::{hex, remote_config};

type Shared = Arc<State>;

/// Which `Host` names the UI answers to. A page on another site can make a browser resolve
/// its own name to this server's address (DNS rebinding); the browser then sends that name as
/// `Host`, so answering only known names keeps such pages from reading the fleet or pushing
/// configs.
#[derive(Debug, Clone)]
pub(crate) struct HostPolicy {
    /// Lowercase `host` or `host:port`; an entry without a port matches any port.
    allowed: Vec<String>,
}

impl HostPolicy {
    /// The UI bound at `addr` answers to `addr` itself, to `localhost`, `127.0.0.1` and
    /// `[::1]` with its port when `addr` is a loopback address, and to every `extra` entry
    /// (`--ui-allowed-host`, `NAME` or `NAME:PORT`).
    pub(crate) fn new(addr: SocketAddr, extra: &[String]) -> Self {
        let port = addr.port();
        let mut allowed = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            for name in ["localhost", "127.0.0.1", "[::1]"] {
                allowed.push(format!("{name}:{port}"));
            }
        }
        allowed.extend(extra.iter().map(|h| h.trim().to_ascii_lowercase()));
        Self { allowed }
    }

    fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        // `name:port` or `[v6]:port` -> `name` / `[v6]`; a bare name stays as it is.
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !port.contains(']') => name,
            _ => host.as_str(),
        };
        let portless = |a: &str| !a.contains(':') || a.ends_with(']');
        self.allowed
            .iter()
            .any(|a| *a == host || (portless(a) && *a == name))
    }
}

/// Headers on every answer: no framing (clickjacking), no sniffing, no referrer, and a CSP
/// that lets the UI load only its own script and style (the UI has no inline script).
fn harden(headers: &mut HeaderMap) {
    const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       connect-src 'self'; img-src 'self'; base-uri 'none'; \
                       form-action 'self'; frame-ancestors 'none'";
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Checks `Host` on every request (421 for a name the UI does not answer to) and `Origin` on
/// every mutation (403 unless absent or this same origin), and hardens every answer.
/// Who made a request, for the audit log: `X-Opamp-User` when given (printable, at most 64
/// bytes; the reference server has no authentication of its own yet) and the peer address.
fn actor(req: &Request) -> Actor {
    let who = req
        .headers()
        .get("x-opamp-user")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "anonymous".into());
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".into(), |c| c.0.to_string());
    Actor { who, address }
}

async fn guard(
    AxumState(policy): AxumState<Arc<HostPolicy>>,
    mut req: Request,
    next: Next,
) -> Response {
    let who = actor(&req);
    req.extensions_mut().insert(who);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut response = match host {
        None => error(StatusCode::BAD_REQUEST, "a Host header is required"),
        Some(host) if !policy.allows(&host) => error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server does not answer to Host {host:?}; start it with \
                 --ui-allowed-host to add a name"
            ),
        ),
        Some(host) => {
            let mutation = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
            let origin = req
                .headers()
                .get(header::ORIGIN)
                .map(|v| v.to_str().unwrap_or(""));
            let same_origin = |o: &str| {
                let o = o.to_ascii_lowercase();
                let host = host.to_ascii_lowercase();
                o == format!("http://{host}") || o == format!("https://{host}")
            };
            match origin {
                Some(o) if mutation && !same_origin(o) => error(
                    StatusCode::FORBIDDEN,
                    format!("cross-origin {} refused (Origin {o:?})", req.method()),
                ),
                _ => next.run(req).await,
            }
        }
    };
    harden(response.headers_mut());
    response
}

pub(crate) fn router(state: Shared, policy: HostPolicy) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", include_str!("../ui/index.html")) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript", include_str!("../ui/app.js")) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css", include_str!("../ui/style.css")) }),
        )
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/disconnect", post(disconnect_all))
        .route("/api/v1/agents/{uid}", get(get_agent))
        .route(
            "/api/v1/agents/{uid}/config",
            put(put_agent_config).delete(delete_agent_config),
        )
        .route("/api/v1/agents/{uid}/restart", post(restart_agent))
        .route(
            "/api/v1/agents/{uid}/connection-settings",
            post(offer_connection_settings),
        )
        .route("/api/v1/configs", get(list_configs))
        .route(
            "/api/v1/configs/{name}",
            get(get_config).put(put_config).delete(delete_config),
        )
        .route("/api/v1/configs/{name}/history", get(config_history))
        .route("/api/v1/rollouts", get(list_rollouts).post(post_rollout))
        .route("/api/v1/rollouts/{id}", get(get_rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(rollout_action))
        .route("/api/v1/audit", get(audit_log))
        .route(
            "/api/v1/openapi.json",
            get(|| async { asset("application/json", include_str!("../openapi.json")) }),
        )
        .route("/api/v1/packages", get(list_packages))
        .route("/api/v1/packages/{name}/{version}", put(put_package))
        .route("/api/v1/packages/{name}/{version}/file", get(package_file))
        .route("/api/v1/package-sets/{name}", put(put_package_set))
        .with_state(state)
        .layer(middleware::from_fn_with_state(Arc::new(policy), guard))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// POST actions and package sets take `Content-Type: application/json`: a page on another site can make a
/// browser send a "simple" cross-site POST, but not with this content type (that needs a CORS
/// preflight, which this server never grants).
fn require_json(headers: &HeaderMap) -> Option<Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    (!json).then(|| {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this request needs Content-Type: application/json",
        )
    })
}

fn bad_uid(text: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("not an instance uid: {text}"),
    )
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Conflict(m) => error(StatusCode::CONFLICT, m),
        e @ StoreError::Corrupt(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        other => error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

/// A 409 when a rollout of config `name` is live: activating or deleting it now would pull
/// the ground from under the rollout (pause and abort it first).
async fn live_rollout(state: &State, name: &str) -> Option<Response> {
    match state.control.store.rollouts().await {
        Ok(list) => list
            .iter()
            .find(|r| r.config == name && crate::rollout::is_live(&r.state))
            .map(|r| {
                error(
                    StatusCode::CONFLICT,
                    format!(
                        "rollout {} of config {name} is {}: abort it first (or PUT with \"activate\": false)",
                        r.id, r.state
                    ),
                )
            }),
        Err(e) => Some(store_error(e)),
    }
}

/// `GET /api/v1/agents`: every agent known, slim (no config bodies, see README): connected to
/// this node from memory, the others from the store.
async fn list_agents(AxumState(state): AxumState<Shared>) -> Response {
    match state.list_agents().await {
        Ok(list) => Json(serde_json::Value::Array(list)).into_response(),
        Err(e) => store_error(e),
    }
}

/// `POST /api/v1/agents/disconnect`: closes every connection to this node; agents reconnect.
async fn disconnect_all(AxumState(state): AxumState<Shared>, headers: HeaderMap) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    Json(json!({ "disconnected": state.disconnect_all() })).into_response()
}

async fn get_agent(AxumState(state): AxumState<Shared>, Path(uid): Path<String>) -> Response {
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    match state.agent(uid).await {
        Ok(Some(agent)) => Json(agent).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no agent {uid}")),
        Err(e) => store_error(e),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_owned()
}

/// `POST /api/v1/agents/{uid}/restart`: sends the Restart command (CMD-1) to a connected agent
/// that accepts it (CMD-2); an agent on another node gets it through that node.
async fn restart_agent(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    let here = store::lock(&state.connections).contains_key(&uid);
    if !here {
        let remote = match state.control.store.agent(&uid.to_string()).await {
            Ok(row) => row.filter(|r| r.connected && r.node != state.control.node),
            Err(e) => return store_error(e),
        };
        if remote.is_some() && state.control.store.dialect() == Dialect::Postgres {
            return match state
                .control
                .store
                .restart_elsewhere(&uid.to_string(), &actor)
                .await
            {
                Ok(()) => Json(json!({ "restarting": uid.to_string() })).into_response(),
                Err(e) => store_error(e),
            };
        }
    }
    match state.restart(uid) {
        Ok(()) => {
            let _ = state
                .control
                .store
                .record(&actor, "restart", &uid.to_string(), "")
                .await;
            Json(json!({ "restarting": uid.to_string() })).into_response()
        }
        Err(msg) => error(StatusCode::CONFLICT, msg),
    }
}

/// The OpAMP connection settings in a `connection-settings` request body:
/// `{"endpoint": "ws://...", "headers": {"name": "value"}}`, both optional but not both absent.
fn parse_connection_settings(
    v: &serde_json::Value,
) -> Result<opamp::server::connection_settings::OpampSettings, String> {
    use opamp::server::connection_settings::OpampSettings;
    let obj = v.as_object().ok_or("the body must be a JSON object")?;
    if let Some(k) = obj.keys().find(|k| *k != "endpoint" && *k != "headers") {
        return Err(format!("unknown field {k:?} (expected endpoint, headers)"));
    }
    let mut settings = OpampSettings::new();
    let endpoint = obj.get("endpoint").filter(|e| !e.is_null());
    let headers = obj.get("headers").filter(|h| !h.is_null());
    if endpoint.is_none() && headers.is_none() {
        return Err("give an endpoint, headers or both".into());
    }
    if let Some(e) = endpoint {
        let e = e.as_str().ok_or("endpoint must be a string")?;
        // CS-OP-9: the agent refuses anything else; refusing here says so at once.
        let uri: http::Uri = e
            .parse()
            .map_err(|_| format!("endpoint {e:?} is not a URL"))?;
        let scheme_ok = matches!(uri.scheme_str(), Some("ws" | "wss" | "http" | "https"));
        if !scheme_ok || uri.host().is_none() {
            return Err(format!(
                "endpoint {e:?} must be a ws://, wss://, http:// or https:// URL with a host"
            ));
        }
        settings = settings.endpoint(e);
    }
    if let Some(h) = headers {
        let h = h
            .as_object()
            .ok_or("headers must be an object of name: value strings")?;
        for (name, value) in h {
            let value = value
                .as_str()
                .ok_or_else(|| format!("header {name:?}: the value must be a string"))?;
            if http::HeaderName::try_from(name.as_str()).is_err()
                || http::HeaderValue::try_from(value).is_err()
            {
                return Err(format!("header {name:?}: not a valid HTTP header"));
            }
            settings = settings.header(name.as_str(), value);
        }
    }
    Ok(settings)
}

/// `POST /api/v1/agents/{uid}/connection-settings`: offers OpAMP connection settings (a new
/// endpoint, headers) to an agent connected to this node that declared
/// AcceptsOpAMPConnectionSettings (CS-OP-1); 409 otherwise. The agent tries them and reports
/// APPLYING, then APPLIED (it moved) or FAILED (it rolled back); `GET /api/v1/agents/{uid}`
/// shows that as `connection_settings_offer` and `connection_settings_status`.
async fn offer_connection_settings(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use opamp::server::connection_settings::ConnectionSettingsOffer;
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let settings = match parse_connection_settings(&v) {
        Ok(s) => s,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let offer = ConnectionSettingsOffer::new().opamp(settings);
    let offers = offer.build();
    let hash = hex(&offers.hash);
    let here = store::lock(&state.connections).contains_key(&uid);
    if !here {
        return error(
            StatusCode::CONFLICT,
            format!("agent {uid} is not connected to this server"),
        );
    }
    match state.fleet.offer_connection_settings(uid, offers) {
        Ok(message) => {
            state.push(uid, message);
            let detail = v.get("endpoint").and_then(|e| e.as_str()).unwrap_or("");
            let _ = state
                .control
                .store
                .record(
                    &actor,
                    "connection-settings",
                    &uid.to_string(),
                    &format!("hash {hash} endpoint {detail}"),
                )
                .await;
            Json(json!({ "instance_uid": uid.to_string(), "hash": hash })).into_response()
        }
        Err(m) => error(StatusCode::CONFLICT, m),
    }
}

/// `PUT /api/v1/agents/{uid}/config`: the body becomes the agent's own config, above any
/// named config (durable; an agent on another node gets it through that node).
async fn put_agent_config(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    let known = state.fleet.contains(uid)
        || matches!(
            state.control.store.agent(&uid.to_string()).await,
            Ok(Some(_))
        );
    if !known {
        return error(StatusCode::NOT_FOUND, format!("no agent {uid}"));
    }
    let ct = content_type(&headers);
    let key = uid.to_string();
    if let Err(e) = state
        .control
        .store
        .put_override(&key, &ct, &body, &actor)
        .await
    {
        return store_error(e);
    }
    state.on_change(Change::Override(key.clone())).await;
    let config = remote_config(body, ct);
    Json(json!({ "config_hash": hex(&config.config_hash), "agents": [key] })).into_response()
}

/// `DELETE /api/v1/agents/{uid}/config`: the agent goes back to the named configs.
async fn delete_agent_config(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(uid): Path<String>,
) -> Response {
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    let key = uid.to_string();
    match state.control.store.delete_override(&key, &actor).await {
        Ok(true) => {
            state.on_change(Change::Override(key.clone())).await;
            Json(json!({ "deleted": key })).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("agent {uid} has no config of its own"),
        ),
        Err(e) => store_error(e),
    }
}

/// Names of configs: 1 to 128 of `A-Z a-z 0-9 . _ -`.
fn bad_config_name(name: &str) -> Option<Response> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    (!ok).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!("config names are 1 to 128 of A-Z a-z 0-9 . _ -, not {name:?}"),
        )
    })
}

fn version_json(v: &ConfigVersion, body: bool) -> serde_json::Value {
    let templated = matches!(Template::parse(&v.body, &v.selector), Ok(Some(_)));
    let mut j = json!({
        "name": v.name,
        "version": v.version,
        "selector": v.selector,
        "priority": v.priority,
        "content_type": v.content_type,
        "size": v.body.len(),
        "templated": templated,
        "created_unix_ms": v.created_ms,
        "author": v.author,
    });
    // The same for every agent unless the body is a template (then each agent's own hash is
    // in its `remote_config`).
    if !templated {
        let config = remote_config(Bytes::from(v.body.clone()), v.content_type.clone());
        j["config_hash"] = json!(hex(&config.config_hash));
    }
    if body {
        j["body"] = json!(String::from_utf8_lossy(&v.body));
    }
    j
}

/// How many agents connected here a config reaches: `given` (it wins), `outranked` (it
/// matches, another wins).
fn reach(state: &State, name: &str) -> serde_json::Value {
    let (mut given, mut outranked) = (0usize, 0usize);
    for (_, d) in state.fleet.desired_sources() {
        if let Some(info) = d {
            if matches!(&info.source, Source::Named { name: n, .. } if n == name) {
                given += 1;
            } else if info.outranked.iter().any(|n| n == name) {
                outranked += 1;
            }
        }
    }
    json!({ "given": given, "outranked": outranked })
}

fn config_json(state: &State, c: &NamedConfig, body: bool) -> serde_json::Value {
    let mut j = version_json(&c.active, body);
    j["latest_version"] = json!(c.latest.version);
    j["active_version"] = json!(c.active.version);
    j["agents_here"] = reach(state, &c.active.name);
    j
}

/// `GET /api/v1/configs`: every named config (active version, no bodies), by priority.
async fn list_configs(AxumState(state): AxumState<Shared>) -> Response {
    match state.control.store.configs().await {
        Ok(mut list) => {
            list.sort_by(|a, b| {
                b.active
                    .priority
                    .cmp(&a.active.priority)
                    .then_with(|| a.active.name.cmp(&b.active.name))
            });
            let list: Vec<_> = list.iter().map(|c| config_json(&state, c, false)).collect();
            Json(serde_json::Value::Array(list)).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn get_config(AxumState(state): AxumState<Shared>, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_config_name(&name) {
        return r;
    }
    match state.control.store.config(&name).await {
        Ok(Some(c)) => {
            let mut j = config_json(&state, &c, true);
            if c.latest.version != c.active.version {
                j["held"] = version_json(&c.latest, true);
            }
            Json(j).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no config {name}")),
        Err(e) => store_error(e),
    }
}

async fn config_history(AxumState(state): AxumState<Shared>, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_config_name(&name) {
        return r;
    }
    match state.control.store.config_history(&name).await {
        Ok(h) if h.is_empty() => error(StatusCode::NOT_FOUND, format!("no config {name}")),
        Ok(h) => Json(json!({
            "name": name,
            "versions": h.iter().map(|v| version_json(v, true)).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => store_error(e),
    }
}

/// `PUT /api/v1/configs/{name}` with `{"selector": {..}, "content_type": "..", "body": "..",
/// "priority": N, "activate": true}`: a new version, validated (template variables, then
/// `--validate-config`), stored, and given to every agent it wins for, now and later.
async fn put_config(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    if let Some(r) = bad_config_name(&name) {
        return r;
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let selector: BTreeMap<String, String> = match &v["selector"] {
        serde_json::Value::Null => BTreeMap::new(),
        serde_json::Value::Object(m) => {
            let mut out = BTreeMap::new();
            for (k, val) in m {
                let Some(val) = val.as_str() else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("selector value of {k:?} must be a string"),
                    );
                };
                out.insert(k.clone(), val.to_owned());
            }
            out
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "\"selector\" must be an object of strings",
            );
        }
    };
    let Some(config_body) = v["body"].as_str() else {
        return error(
            StatusCode::BAD_REQUEST,
            "\"body\" (the config, a string) is required",
        );
    };
    let ct = match &v["content_type"] {
        serde_json::Value::Null => "text/yaml",
        c => match c.as_str() {
            Some(c) => c,
            None => return error(StatusCode::BAD_REQUEST, "\"content_type\" must be a string"),
        },
    };
    let priority = match &v["priority"] {
        serde_json::Value::Null => 0,
        p => match p.as_i64() {
            Some(p) => p,
            None => return error(StatusCode::BAD_REQUEST, "\"priority\" must be an integer"),
        },
    };
    let activate = match &v["activate"] {
        serde_json::Value::Null => true,
        a => match a.as_bool() {
            Some(a) => a,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "\"activate\" must be true or false",
                );
            }
        },
    };
    if activate {
        if let Some(refused) = live_rollout(&state, &name).await {
            return refused;
        }
    }
    if let Err(e) = Template::parse(config_body.as_bytes(), &selector) {
        return error(StatusCode::BAD_REQUEST, format!("config {name}: {e}"));
    }
    if let Err(output) = state
        .control
        .validate(&name, ct, config_body.as_bytes())
        .await
    {
        if !output.starts_with("the validator refused") {
            // It did not run (could not start, timed out): not the config's fault.
            return error(StatusCode::INTERNAL_SERVER_ERROR, output);
        }
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": output })),
        )
            .into_response();
    }
    let stored = state
        .control
        .store
        .put_config(
            &name,
            &NewVersion {
                selector: &selector,
                priority,
                content_type: ct,
                body: config_body.as_bytes(),
                activate,
            },
            &actor,
        )
        .await;
    let c = match stored {
        Ok(c) => c,
        Err(e) => return store_error(e),
    };
    state.on_change(Change::Config(name.clone())).await;
    let mut j = config_json(&state, &c, false);
    j["agents"] = json!(
        state
            .fleet
            .desired_sources()
            .into_iter()
            .filter(|(_, d)| matches!(d, Some(i) if matches!(&i.source, Source::Named { name: n, .. } if *n == name)))
            .map(|(uid, _)| uid.to_string())
            .collect::<Vec<_>>()
    );
    Json(j).into_response()
}

async fn delete_config(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = bad_config_name(&name) {
        return r;
    }
    if let Some(refused) = live_rollout(&state, &name).await {
        return refused;
    }
    match state.control.store.delete_config(&name, &actor).await {
        Ok(true) => {
            state.on_change(Change::Config(name.clone())).await;
            Json(json!({ "deleted": name })).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no config {name}")),
        Err(e) => store_error(e),
    }
}

/// `POST /api/v1/rollouts` with `{"config", "batch_percent", "max_failure_percent",
/// "batch_wait_seconds", "rollback"}`.
async fn post_rollout(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let spec = match crate::rollout::Spec::parse(&v) {
        Ok(s) => s,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match state.start_rollout(spec, &actor).await {
        Ok(r) => (StatusCode::CREATED, Json(state.rollout_json(&r).await)).into_response(),
        Err((code, m)) => error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT),
            m,
        ),
    }
}

async fn list_rollouts(AxumState(state): AxumState<Shared>) -> Response {
    match state.control.store.rollouts().await {
        Ok(list) => {
            let mut out = Vec::with_capacity(list.len());
            for r in &list {
                out.push(state.rollout_json(r).await);
            }
            Json(serde_json::Value::Array(out)).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn get_rollout(AxumState(state): AxumState<Shared>, Path(id): Path<i64>) -> Response {
    match state.control.store.rollout(id).await {
        Ok(Some(r)) => Json(state.rollout_json(&r).await).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rollout {id}")),
        Err(e) => store_error(e),
    }
}

/// `POST /api/v1/rollouts/{id}/pause|resume|abort`.
async fn rollout_action(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path((id, action)): Path<(i64, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    match state.rollout_action(id, &action, &actor).await {
        Ok(r) => Json(state.rollout_json(&r).await).into_response(),
        Err((code, m)) => error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT),
            m,
        ),
    }
}

/// `GET /api/v1/audit?limit=N`: the newest entries first (100 by default, at most 1000).
async fn audit_log(
    AxumState(state): AxumState<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<i64>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    match state.control.store.audit_log(limit).await {
        Ok(log) => Json(json!(
            log.iter()
                .map(|e| json!({
                    "id": e.id,
                    "at_unix_ms": e.at_ms,
                    "who": e.who,
                    "address": e.address,
                    "action": e.action,
                    "target": e.target,
                    "detail": e.detail,
                }))
                .collect::<Vec<_>>()
        ))
        .into_response(),
        Err(e) => store_error(e),
    }
}

fn repo_error(e: RepoError) -> Response {
    match e {
        RepoError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        RepoError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
        RepoError::Conflict(m) => error(StatusCode::CONFLICT, m),
        RepoError::TooLarge(m) => error(StatusCode::PAYLOAD_TOO_LARGE, m),
    }
}

/// `GET /api/v1/packages`: the server's public key, every stored version (name, version,
/// size, sha256) and the package sets.
async fn list_packages(AxumState(state): AxumState<Shared>) -> Response {
    Json(state.packages.list_json()).into_response()
}

/// `PUT /api/v1/packages/{name}/{version}`: the body (`Content-Type:
/// application/octet-stream`) is the file. The server signs its SHA-256 with its key, unless
/// `X-Package-Signature` carries a signature made elsewhere (128 hex digits, PKG-21).
async fn put_package(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let octets = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/octet-stream"));
    if !octets {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "package uploads need Content-Type: application/octet-stream",
        );
    }
    let signature = match headers.get("x-package-signature") {
        None => None,
        Some(v) => match v.to_str().ok().and_then(unhex) {
            Some(sig) => Some(Bytes::from(sig)),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "X-Package-Signature must be hex (an Ed25519 signature is 128 digits)",
                );
            }
        },
    };
    let limit = state.packages.max_package_bytes();
    let content = match axum::body::to_bytes(body, limit).await {
        Ok(content) => content,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over the package limit of {limit} bytes (or broke off)"),
            );
        }
    };
    let was_there = state.packages.contains(&name, &version);
    let answer = match state
        .packages
        .put(&name, &version, content.clone(), signature.clone())
    {
        Ok(v) => v,
        Err(e) => return repo_error(e),
    };
    // Durable before it is acknowledged; taken back from memory if the database refused.
    if let Err(e) = state
        .control
        .store
        .put_package(&name, &version, &content, signature.as_deref(), &actor)
        .await
    {
        if !was_there {
            state.packages.remove(&name, &version);
        }
        return store_error(e);
    }
    Json(answer).into_response()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// `GET /api/v1/packages/{name}/{version}/file`: the download the offers point to. Needs
/// the agent's token from the offer's headers (401 without); one `Range` is answered with
/// 206 and `Content-Range` (PKG-7), a range outside the file with 416.
async fn package_file(
    AxumState(state): AxumState<Shared>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !state.packages.authorized(authorization) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "downloads need the Authorization header of the package offer",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let Some(file) = state.packages.file(&name, &version) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no package {name:?} version {version:?}"),
        );
    };
    let len = file.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let octets = (header::CONTENT_TYPE, "application/octet-stream");
    let ranges = (header::ACCEPT_RANGES, "bytes");
    match parse_range(range, len) {
        RangeAsk::Full => ([octets, ranges], file).into_response(),
        RangeAsk::Part(start, end) => {
            // `end < len`, which came from a usize.
            let part = file.slice(start as usize..=end as usize);
            (
                StatusCode::PARTIAL_CONTENT,
                [
                    octets,
                    ranges,
                    (
                        header::CONTENT_RANGE,
                        &format!("bytes {start}-{end}/{len}") as &str,
                    ),
                ],
                part,
            )
                .into_response()
        }
        RangeAsk::Unsatisfiable => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range {range:?} is not within the file's {len} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
    }
}

/// `PUT /api/v1/package-sets/{name}` with `{"selector": {"key": "value"}, "packages":
/// {"NAME": "VERSION"}}`: offers those packages to every agent whose attributes match (all
/// pairs; an empty selector matches every agent), now if connected, else when it connects.
async fn put_package_set(
    AxumState(state): AxumState<Shared>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let strings = |field: &str| -> Result<std::collections::BTreeMap<String, String>, String> {
        let bad = || format!("{field:?} must be an object of strings");
        match value.get(field) {
            None | Some(serde_json::Value::Null) => Ok(Default::default()),
            Some(serde_json::Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|v| (k.clone(), v.to_owned()))
                        .ok_or_else(bad)
                })
                .collect(),
            Some(_) => Err(bad()),
        }
    };
    let set = match (strings("selector"), strings("packages")) {
        (Ok(selector), Ok(packages)) => PackageSet { selector, packages },
        (Err(m), _) | (_, Err(m)) => return error(StatusCode::BAD_REQUEST, m),
    };
    let selector = set.selector.clone();
    let before = state.packages.set(&name);
    let row = crate::db::PackageSetRow {
        name: name.clone(),
        selector: set.selector.clone(),
        packages: set.packages.clone(),
    };
    if let Err(e) = state.packages.put_set(&name, set) {
        return repo_error(e);
    }
    if let Err(e) = state.control.store.put_package_set(&row, &actor).await {
        state.packages.restore_set(&name, before);
        return store_error(e);
    }
    let agents = state.push_packages(&selector);
    Json(json!({
        "package_set": name,
        "agents": agents.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    //! The UI's guard over a real loopback socket: raw HTTP/1.1 so that `Host` and `Origin`
    //! are exactly what a rebinding page's browser would send.
    use super::*;
    use crate::packages::Repo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves the UI on a loopback port with `extra` allowed hosts; returns its address.
    async fn serve(extra: &[&str]) -> SocketAddr {
        serve_state(extra, State::for_test(Repo::default()).await).await
    }

    async fn serve_state(extra: &[&str], state: Shared) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let app = router(state, HostPolicy::new(addr, &extra));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Sends one request with the given header lines; returns (status, lowercase headers).
    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[&str],
    ) -> (u16, String) {
        let (status, head, _) = exchange(addr, method, path, headers).await;
        (status, head)
    }

    /// Like [`request`], with the body (de-chunked).
    async fn exchange(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[&str],
    ) -> (u16, String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if method != "GET" {
            req.push_str("Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}");
        } else {
            req.push_str("\r\n");
        }
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
        let status = head[9..12].parse().unwrap();
        let mut rest = &answer[split + 4..];
        let body = if head.contains("transfer-encoding: chunked") {
            let mut body = Vec::new();
            loop {
                let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                let size = std::str::from_utf8(&rest[..eol]).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                if size == 0 {
                    break body;
                }
                body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 2 + size + 2..];
            }
        } else {
            rest.to_vec()
        };
        (status, head, body)
    }

    fn hardened(head: &str) -> bool {
        head.contains("content-security-policy: default-src 'none'; script-src 'self'")
            && head.contains("x-frame-options: deny")
            && head.contains("x-content-type-options: nosniff")
            && head.contains("referrer-policy: no-referrer")
    }

    #[tokio::test]
    async fn ui_rebinding_host_is_refused_with_421() {
        let addr = serve(&[]).await;
        let port = addr.port();
        for host in [
            format!("Host: attacker.example:{port}"),
            "Host: attacker.example".to_owned(),
            format!("Host: localhost.attacker.example:{port}"),
            format!("Host: 127.0.0.1:{}", port.wrapping_add(1)),
        ] {
            let (status, head) = request(addr, "GET", "/api/v1/agents", &[&host]).await;
            assert_eq!(status, 421, "{host}");
            assert!(hardened(&head), "{head}");
        }
        let (status, _) = request(addr, "GET", "/api/v1/agents", &[]).await;
        assert_eq!(status, 400, "no Host at all");
    }

    #[tokio::test]
    async fn ui_answers_its_own_loopback_names_and_allowed_hosts() {
        let addr = serve(&["ui.example", "other.example:8443"]).await;
        let port = addr.port();
        for host in [
            format!("127.0.0.1:{port}"),
            format!("LOCALHOST:{port}"),
            "ui.example".to_owned(),
            format!("ui.example:{port}"),
            "other.example:8443".to_owned(),
        ] {
            let (status, head) =
                request(addr, "GET", "/api/v1/agents", &[&format!("Host: {host}")]).await;
            assert_eq!(status, 200, "{host}");
            assert!(hardened(&head), "{head}");
        }
        let (status, _) =
            request(addr, "GET", "/api/v1/agents", &["Host: other.example:9999"]).await;
        assert_eq!(
            status, 421,
            "a host allowed with a port only matches that port"
        );
    }

    #[tokio::test]
    async fn ui_cross_origin_mutations_are_forbidden() {
        let addr = serve(&[]).await;
        let host = format!("Host: 127.0.0.1:{}", addr.port());
        for (method, path) in [
            ("POST", "/api/v1/agents/disconnect"),
            ("PUT", "/api/v1/configs/c"),
            (
                "PUT",
                "/api/v1/agents/00000000-0000-0000-0000-000000000000/config",
            ),
            ("PUT", "/api/v1/packages/tool/1"),
            ("PUT", "/api/v1/package-sets/s"),
        ] {
            for origin in [
                "Origin: http://attacker.example",
                "Origin: null",
                &format!("Origin: http://127.0.0.1:{}", addr.port() ^ 1),
            ] {
                let (status, head) = request(addr, method, path, &[&host, origin]).await;
                assert_eq!(status, 403, "{method} {path} {origin}");
                assert!(hardened(&head));
            }
        }
        // Same origin, or no Origin (curl, scripts): allowed.
        let same = format!("Origin: http://127.0.0.1:{}", addr.port());
        let (status, _) = request(addr, "POST", "/api/v1/agents/disconnect", &[&host, &same]).await;
        assert_eq!(status, 200);
        // Past the guard: refused for its body (`{}` has no config), not for its origin.
        let (status, _) = request(addr, "PUT", "/api/v1/configs/c", &[&host]).await;
        assert_eq!(status, 400);
        // A read with a foreign Origin is not a mutation; the browser's CORS keeps the answer
        // from the foreign page.
        let (status, _) = request(
            addr,
            "GET",
            "/api/v1/agents",
            &[&host, "Origin: http://attacker.example"],
        )
        .await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn ui_every_answer_is_hardened() {
        let addr = serve(&[]).await;
        let host = format!("Host: 127.0.0.1:{}", addr.port());
        for (path, want) in [
            ("/", 200),
            ("/ui/app.js", 200),
            ("/ui/style.css", 200),
            ("/api/v1/agents", 200),
            ("/api/v1/agents/not-a-uid", 400),
            ("/nowhere", 404),
        ] {
            let (status, head) = request(addr, "GET", path, &[&host]).await;
            assert_eq!(status, want, "{path}");
            assert!(hardened(&head), "{path}: {head}");
        }
    }

    /// The listing: every agent once, and no config body in it; half of them connected here
    /// (from memory), half saved in the store and gone.
    #[tokio::test]
    async fn the_agent_list_is_slim_and_lists_each_agent_once() {
        use opamp::proto::{AgentConfigMap, AgentToServer, EffectiveConfig};
        for agents in [0, 1, 256, 515] {
            let state = State::for_test(Repo::default()).await;
            for n in 0..agents {
                let mut b = [0u8; 16];
                b[0] = 1;
                b[14..].copy_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
                let msg = AgentToServer {
                    instance_uid: bytes::Bytes::copy_from_slice(&b),
                    effective_config: Some(EffectiveConfig {
                        config_map: Some(AgentConfigMap::single("secret-body", "text/yaml")),
                    }),
                    ..Default::default()
                };
                let uid = InstanceUid::try_from(&b[..]).unwrap();
                state.fleet.connected(uid, "websocket", None);
                let _ = state.fleet.report(uid, &msg);
                if n % 2 == 1 {
                    state.fleet.disconnected(uid);
                }
            }
            state.flush().await;
            let addr = serve_state(&[], state).await;
            let host = format!("Host: 127.0.0.1:{}", addr.port());
            let (status, head, body) = exchange(addr, "GET", "/api/v1/agents", &[&host]).await;
            assert_eq!(status, 200);
            assert!(head.contains("content-type: application/json"), "{head}");
            let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let list = list.as_array().unwrap();
            assert_eq!(list.len(), agents);
            let uids: std::collections::BTreeSet<_> = list
                .iter()
                .map(|a| a["instance_uid"].as_str().unwrap())
                .collect();
            assert_eq!(uids.len(), agents, "each agent once");
            assert!(!String::from_utf8_lossy(&body).contains("secret-body"));
            if let Some(a) = list.first() {
                assert_eq!(a["effective_config"][""]["size"], 11);
            }
        }
    }

    /// PKG-6, PKG-7: downloads need the agent's token; one range is answered with 206 and
    /// `Content-Range`, a range outside the file with 416.
    #[tokio::test]
    async fn package_downloads_check_the_token_and_answer_ranges() {
        let state = State::for_test(Repo::default()).await;
        state
            .packages
            .put("tool", "1", Bytes::from_static(b"0123456789"), None)
            .unwrap();
        let addr = serve_state(&[], state.clone()).await;
        let host = format!("Host: 127.0.0.1:{}", addr.port());
        let path = "/api/v1/packages/tool/1/file";
        let uid = InstanceUid::new_v7();
        let auth = format!("Authorization: {}", state.packages.authorization(uid));
        let (status, head, _) = exchange(addr, "GET", path, &[&host]).await;
        assert_eq!(status, 401);
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        let forged = format!("Authorization: Bearer {uid}.{}", "0".repeat(64));
        let (status, _, _) = exchange(addr, "GET", path, &[&host, &forged]).await;
        assert_eq!(status, 401);
        let (status, head, body) = exchange(addr, "GET", path, &[&host, &auth]).await;
        assert_eq!((status, &body[..]), (200, &b"0123456789"[..]));
        assert!(head.contains("accept-ranges: bytes"), "{head}");
        let (status, head, body) =
            exchange(addr, "GET", path, &[&host, &auth, "Range: bytes=4-"]).await;
        assert_eq!((status, &body[..]), (206, &b"456789"[..]));
        assert!(head.contains("content-range: bytes 4-9/10"), "{head}");
        let (status, _, body) =
            exchange(addr, "GET", path, &[&host, &auth, "Range: bytes=-2"]).await;
        assert_eq!((status, &body[..]), (206, &b"89"[..]));
        for bad in ["Range: bytes=10-", "Range: bytes=7-3", "Range: bytes=a-b"] {
            let (status, head, _) = exchange(addr, "GET", path, &[&host, &auth, bad]).await;
            assert_eq!(status, 416, "{bad}");
            assert!(head.contains("content-range: bytes */10"), "{head}");
        }
        let (status, _, _) =
            exchange(addr, "GET", "/api/v1/packages/tool/2/file", &[&host, &auth]).await;
        assert_eq!(status, 404);
    }

    /// Sends `body` with `content_type`; returns (status, JSON answer).
    async fn send_body(
        addr: SocketAddr,
        method: &str,
        path: &str,
        content_type: &str,
        extra: &str,
        body: &[u8],
    ) -> (u16, serde_json::Value) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Type: {content_type}\r\n{extra}Content-Length: {}\r\n\r\n",
            addr.port(),
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The server may answer (413) before it has read the whole body.
        let _ = s.write_all(body).await;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = String::from_utf8_lossy(&answer[9..12]).parse().unwrap();
        let json = serde_json::from_slice(&answer[split + 4..]).unwrap_or_default();
        (status, json)
    }

    /// Uploads and package sets over the API: clear 415, 413, 409, 404 and 400 answers.
    #[tokio::test]
    async fn package_uploads_and_sets_are_checked_and_bounded() {
        use crate::packages::{PackageLimits, Repo};
        let limits = PackageLimits {
            package_bytes: 1000,
            total_bytes: 1500,
            packages: 2,
            ..PackageLimits::default()
        };
        let state = State::for_test(Repo::new(limits, [1; 32], "http://127.0.0.1:1".into())).await;
        let addr = serve_state(&[], state.clone()).await;
        let put = "/api/v1/packages/tool/1";
        let oct = "application/octet-stream";
        let (status, _) = send_body(addr, "PUT", put, "text/plain", "", b"x").await;
        assert_eq!(status, 415);
        let (status, v) = send_body(addr, "PUT", put, oct, "", &[0; 1001]).await;
        assert_eq!(status, 413, "{v}");
        assert!(v["error"].as_str().unwrap().contains("1000 bytes"), "{v}");
        let (status, v) = send_body(addr, "PUT", put, oct, "", &[0; 1000]).await;
        assert_eq!((status, &v["size"]), (200, &serde_json::json!(1000)), "{v}");
        let (status, v) = send_body(addr, "PUT", put, oct, "", &[1; 10]).await;
        assert_eq!(status, 409, "immutable: {v}");
        let (status, v) =
            send_body(addr, "PUT", "/api/v1/packages/tool/2", oct, "", &[0; 600]).await;
        assert_eq!(status, 413, "total bytes: {v}");
        let bad_sig = "X-Package-Signature: zz\r\n";
        let (status, _) =
            send_body(addr, "PUT", "/api/v1/packages/tool/2", oct, bad_sig, b"x").await;
        assert_eq!(status, 400);
        let (status, _) = send_body(addr, "PUT", "/api/v1/packages/tool/2", oct, "", b"x").await;
        assert_eq!(status, 200);
        let (status, v) = send_body(addr, "PUT", "/api/v1/packages/tool/3", oct, "", b"y").await;
        assert_eq!(status, 409, "count: {v}");
        let sets = "/api/v1/package-sets/s";
        let json = "application/json";
        let (status, _) = send_body(addr, "PUT", sets, "text/plain", "", b"{}").await;
        assert_eq!(status, 415);
        let body = br#"{"selector": {"a": 1}, "packages": {}}"#;
        let (status, _) = send_body(addr, "PUT", sets, json, "", body).await;
        assert_eq!(status, 400);
        let body = br#"{"packages": {"tool": "9"}}"#;
        let (status, _) = send_body(addr, "PUT", sets, json, "", body).await;
        assert_eq!(status, 404);
        let body = br#"{"selector": {"service.name": "x"}, "packages": {"tool": "1"}}"#;
        let (status, v) = send_body(addr, "PUT", sets, json, "", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["agents"], serde_json::json!([]));
        let (status, _, body) = exchange(
            addr,
            "GET",
            "/api/v1/packages",
            &[&format!("Host: 127.0.0.1:{}", addr.port())],
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["packages"].as_array().unwrap().len(), 2);
        assert_eq!(v["total_bytes"], 1001);
        assert_eq!(v["package_sets"]["s"]["packages"]["tool"], "1");
    }

    /// The CSP allows only `script-src 'self'`: the UI must have no inline script or handler.
    #[test]
    fn ui_has_no_inline_script_or_style() {
        let html = include_str!("../ui/index.html").to_ascii_lowercase();
        let js = include_str!("../ui/app.js").to_ascii_lowercase();
        for tag in html.match_indices("<script").map(|(i, _)| &html[i..]) {
            let open = &tag[..tag.find('>').unwrap()];
            assert!(open.contains(" src="), "inline script: {open}");
        }
        for text in [&html, &js] {
            assert!(!text.contains(" style="), "inline style attribute");
            assert!(!text.contains("<style"), "inline style element");
            for handler in [
                " onclick=",
                " onload=",
                " onerror=",
                " onsubmit=",
                " onchange=",
            ] {
                assert!(!text.contains(handler), "inline handler {handler}");
            }
            assert!(!text.contains("javascript:"), "javascript: url");
        }
    }
}
