//! The web UI and the JSON API behind it (documented in README.md).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post, put};
use opamp::proto::{InstanceUid, ServerToAgent};
use opamp::server::SharedMessage;
use serde_json::json;

use crate::State;
use crate::store::{hex, remote_config};

type Shared = Arc<State>;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", include_str!("ui/index.html")) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript", include_str!("ui/app.js")) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css", include_str!("ui/style.css")) }),
        )
        .route("/api/agents", get(list_agents))
        .route("/api/agents/disconnect", post(disconnect_all))
        .route("/api/agents/{uid}", get(get_agent))
        .route("/api/agents/{uid}/config", put(put_agent_config))
        .route("/api/agents/{uid}/restart", post(restart_agent))
        .route("/api/config", put(put_config))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// POST actions take `Content-Type: application/json`: a page on another site can make a
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
            "POST requests need Content-Type: application/json",
        )
    })
}

fn bad_uid(text: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("not an instance uid: {text}"),
    )
}

async fn list_agents(AxumState(state): AxumState<Shared>) -> Response {
    Json(state.fleet.list_json()).into_response()
}

/// `POST /api/agents/disconnect`: closes every agent's connection; they reconnect.
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
    match state.fleet.agent_json(uid) {
        Some(agent) => Json(agent).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no agent {uid}")),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_owned()
}

/// `POST /api/agents/{uid}/restart`: sends the Restart command (CMD-1) to a connected agent
/// that accepts it (CMD-2).
async fn restart_agent(
    AxumState(state): AxumState<Shared>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = require_json(&headers) {
        return refused;
    }
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    match state.restart(uid) {
        Ok(()) => Json(json!({ "restarting": uid.to_string() })).into_response(),
        Err(msg) => error(StatusCode::CONFLICT, msg),
    }
}

/// `PUT /api/agents/{uid}/config`: the body becomes the agent's remote config.
async fn put_agent_config(
    AxumState(state): AxumState<Shared>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return bad_uid(&uid);
    };
    let config = remote_config(body, content_type(&headers));
    if state.fleet.offer_to(uid, &config).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no agent {uid}"));
    }
    state.push(
        uid,
        ServerToAgent {
            remote_config: Some(config.clone()),
            ..Default::default()
        },
    );
    Json(json!({ "config_hash": hex(&config.config_hash), "agents": [uid.to_string()] }))
        .into_response()
}

/// `PUT /api/config?selector=key=value`: the body becomes the remote config of every agent
/// whose identifying or non-identifying attribute `key` equals `value` (every agent without a
/// selector). The config is encoded once; each agent's message shares its bytes.
async fn put_config(
    AxumState(state): AxumState<Shared>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let selector = match query.get("selector").map(String::as_str) {
        None | Some("") => None,
        Some(s) => match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Some((k, v)),
            _ => return error(StatusCode::BAD_REQUEST, "selector must be key=value"),
        },
    };
    let config = remote_config(body, content_type(&headers));
    let targeted = state.fleet.offer_matching(selector, &config);
    // Encoded once; each agent gets the same bytes behind its own uid.
    let shared = SharedMessage::new(ServerToAgent {
        remote_config: Some(config.clone()),
        ..Default::default()
    });
    for uid in &targeted {
        state.push_shared(*uid, &shared);
    }
    Json(json!({
        "config_hash": hex(&config.config_hash),
        "agents": targeted.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
    .into_response()
}
