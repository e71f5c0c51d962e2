//! `examples/server/openapi.json` against the running reference server: every operation the
//! document describes is called on a real server (with a real agent), its status must be one
//! the document lists, and its JSON must match the documented schema; every `/api/v1` route
//! of the server's router is in the document, and nothing else is.
//!
//! `cargo test -p opamp-reference-server --test openapi`

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::{Scratch, api_raw, start_agent, start_server, uid_of, wait_for};
use serde_json::{Value, json};

const SPEC: &str = include_str!("../openapi.json");

/// One call: method, documented path, concrete path, content type, body, expected status.
type Call<'a> = (&'a str, &'a str, String, &'a str, Vec<u8>, u16);
const ROUTER: &str = include_str!("../src/api.rs");

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(spec, &spec["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Where `value` does not match `schema` (OpenAPI 3.0's subset used by the document).
fn check(spec: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if value.is_null() {
        if schema["nullable"] != true && schema.get("allOf").is_none() {
            out.push(format!("{at}: null, not nullable"));
        }
        return;
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check(spec, s, value, at, out);
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "" => true,
        other => {
            out.push(format!("{at}: unknown type {other} in the document"));
            true
        }
    };
    if !ok {
        out.push(format!("{at}: {value} is not {ty}"));
        return;
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(value) {
            out.push(format!("{at}: {value} not in {e:?}"));
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object()) {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                out.push(format!("{at}: required {r} missing"));
            }
        }
        for (k, v) in obj {
            if let Some(p) = props.get(k) {
                check(spec, p, v, &format!("{at}.{k}"), out);
            }
        }
    }
    if let (Some(extra), Some(obj)) = (schema.get("additionalProperties"), value.as_object()) {
        if extra.is_object() {
            for (k, v) in obj {
                if !schema["properties"]
                    .as_object()
                    .is_some_and(|p| p.contains_key(k))
                {
                    check(spec, extra, v, &format!("{at}.{k}"), out);
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(spec, items, v, &format!("{at}[{i}]"), out);
        }
    }
}

#[test]
fn the_openapi_document_describes_the_running_server() {
    let spec: Value = serde_json::from_str(SPEC).expect("openapi.json is JSON");
    assert_eq!(spec["openapi"], "3.0.3");

    // The router's /api/v1 routes are the document's paths.
    let start = ROUTER.find("pub(crate) fn router(").unwrap();
    let body = &ROUTER[start..start + ROUTER[start..].find("\n}\n").unwrap()];
    let routed: BTreeSet<String> = body
        .split("\"/api/v1/")
        .skip(1)
        .map(|rest| format!("/api/v1/{}", &rest[..rest.find('"').unwrap()]))
        .collect();
    let documented: BTreeSet<String> = spec["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        routed, documented,
        "routes in src/api.rs vs paths in openapi.json"
    );

    let scratch = Scratch::new("openapi");
    let dir = scratch.path();
    let server = start_server(&[], &dir.join("server.log"), &[]);
    let ui = server.ui.clone();
    let (_agent, agent_dir) = start_agent(dir, "openapi-agent", &server.endpoint, &[]);
    let uid = uid_of(&agent_dir, &dir.join("openapi-agent.log"));
    wait_for("the agent", &[], || {
        let (s, _) = api_raw(&ui, "GET", &format!("/api/v1/agents/{uid}"), &[], b"");
        ((s == 200).then_some(()), Value::Null)
    });
    let j = |v: Value| v.to_string().into_bytes();
    let cfg = j(json!({"selector": {"service.name": "openapi-agent"}, "body": "a: 1\n"}));
    let held = j(
        json!({"selector": {"service.name": "openapi-agent"}, "body": "a: 2\n", "activate": false}),
    );
    let rollout = j(json!({"config": "c", "batch_percent": 100, "batch_wait_seconds": 3600}));
    let set = j(json!({"selector": {}, "packages": {"tool": "1.0"}}));
    let a = format!("/api/v1/agents/{uid}");
    // (method, documented path, concrete path, content type, body, expected status), in an
    // order that makes each call meaningful (the config exists before the rollout, ...).
    let calls: Vec<Call> = vec![
        (
            "get",
            "/api/v1/openapi.json",
            "/api/v1/openapi.json".into(),
            "",
            vec![],
            200,
        ),
        (
            "get",
            "/api/v1/agents",
            "/api/v1/agents".into(),
            "",
            vec![],
            200,
        ),
        ("get", "/api/v1/agents/{uid}", a.clone(), "", vec![], 200),
        (
            "get",
            "/api/v1/agents/{uid}",
            "/api/v1/agents/nope".into(),
            "",
            vec![],
            400,
        ),
        (
            "put",
            "/api/v1/configs/{name}",
            "/api/v1/configs/c".into(),
            "application/json",
            cfg,
            200,
        ),
        (
            "put",
            "/api/v1/configs/{name}",
            "/api/v1/configs/c".into(),
            "application/json",
            held,
            200,
        ),
        (
            "get",
            "/api/v1/configs/{name}",
            "/api/v1/configs/c".into(),
            "",
            vec![],
            200,
        ),
        (
            "get",
            "/api/v1/configs/{name}",
            "/api/v1/configs/none".into(),
            "",
            vec![],
            404,
        ),
        (
            "get",
            "/api/v1/configs",
            "/api/v1/configs".into(),
            "",
            vec![],
            200,
        ),
        (
            "get",
            "/api/v1/configs/{name}/history",
            "/api/v1/configs/c/history".into(),
            "",
            vec![],
            200,
        ),
        (
            "post",
            "/api/v1/rollouts",
            "/api/v1/rollouts".into(),
            "application/json",
            rollout.clone(),
            201,
        ),
        (
            "post",
            "/api/v1/rollouts",
            "/api/v1/rollouts".into(),
            "application/json",
            rollout,
            409,
        ),
        (
            "get",
            "/api/v1/rollouts",
            "/api/v1/rollouts".into(),
            "",
            vec![],
            200,
        ),
        (
            "get",
            "/api/v1/rollouts/{id}",
            "/api/v1/rollouts/1".into(),
            "",
            vec![],
            200,
        ),
        (
            "post",
            "/api/v1/rollouts/{id}/{action}",
            "/api/v1/rollouts/1/pause".into(),
            "application/json",
            b"{}".to_vec(),
            200,
        ),
        (
            "put",
            "/api/v1/agents/{uid}/config",
            format!("{a}/config"),
            "text/yaml",
            b"own: 1\n".to_vec(),
            200,
        ),
        (
            "delete",
            "/api/v1/agents/{uid}/config",
            format!("{a}/config"),
            "",
            vec![],
            200,
        ),
        (
            "put",
            "/api/v1/packages/{name}/{version}",
            "/api/v1/packages/tool/1.0".into(),
            "application/octet-stream",
            b"tool".to_vec(),
            200,
        ),
        (
            "get",
            "/api/v1/packages",
            "/api/v1/packages".into(),
            "",
            vec![],
            200,
        ),
        (
            "get",
            "/api/v1/packages/{name}/{version}/file",
            "/api/v1/packages/tool/1.0/file".into(),
            "",
            vec![],
            401,
        ),
        (
            "put",
            "/api/v1/package-sets/{name}",
            "/api/v1/package-sets/s".into(),
            "application/json",
            set,
            200,
        ),
        (
            "get",
            "/api/v1/audit",
            "/api/v1/audit?limit=5".into(),
            "",
            vec![],
            200,
        ),
        // Not while its rollout is live; after the abort it goes.
        (
            "delete",
            "/api/v1/configs/{name}",
            "/api/v1/configs/c".into(),
            "",
            vec![],
            409,
        ),
        (
            "post",
            "/api/v1/rollouts/{id}/{action}",
            "/api/v1/rollouts/1/abort".into(),
            "application/json",
            b"{}".to_vec(),
            200,
        ),
        (
            "delete",
            "/api/v1/configs/{name}",
            "/api/v1/configs/c".into(),
            "",
            vec![],
            200,
        ),
        (
            // This agent does not accept connection settings: 409 (the process test in
            // connection_settings.rs has the 200).
            "post",
            "/api/v1/agents/{uid}/connection-settings",
            format!("{a}/connection-settings"),
            "application/json",
            j(json!({"endpoint": "ws://127.0.0.1:1/v1/opamp"})),
            409,
        ),
        (
            "post",
            "/api/v1/agents/{uid}/restart",
            format!("{a}/restart"),
            "application/json",
            b"{}".to_vec(),
            200,
        ),
        (
            "post",
            "/api/v1/agents/disconnect",
            "/api/v1/agents/disconnect".into(),
            "application/json",
            b"{}".to_vec(),
            200,
        ),
    ];
    let mut problems = Vec::new();
    let mut called = BTreeSet::new();
    for (method, path, concrete, ct, body, expected) in &calls {
        let op = &spec["paths"][*path][*method];
        assert!(op.is_object(), "{method} {path} is not in the document");
        called.insert(format!("{method} {path}"));
        let headers: Vec<(&str, &str)> = if ct.is_empty() {
            vec![]
        } else {
            vec![("Content-Type", *ct)]
        };
        let (status, answer) = api_raw(&ui, &method.to_uppercase(), concrete, &headers, body);
        if status != *expected {
            problems.push(format!(
                "{method} {concrete}: status {status}, expected {expected}: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
        let Some(response) = op["responses"].get(status.to_string()) else {
            problems.push(format!(
                "{method} {concrete}: status {status} is not documented: {}",
                String::from_utf8_lossy(&answer)
            ));
            continue;
        };
        if let Some(schema) = response["content"]["application/json"].get("schema") {
            match serde_json::from_slice::<Value>(&answer) {
                Ok(v) => check(
                    &spec,
                    schema,
                    &v,
                    &format!("{method} {concrete}"),
                    &mut problems,
                ),
                Err(e) => problems.push(format!("{method} {concrete}: not JSON: {e}")),
            }
        }
    }
    // Every documented operation was called.
    let mut all = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
        {
            all.insert(format!("{method} {path}"));
        }
    }
    assert_eq!(called, all, "operations called vs documented");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
