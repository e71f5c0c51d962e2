//! The reference programs' connection-settings offers over loopback (issue #15, CS-OP-*,
//! CSS-*): two reference servers and a reference agent as real processes. Server A offers
//! an endpoint nobody listens on: the agent tries it, rolls back to A and reports FAILED
//! (CS-OP-6), and stays on A. A then offers server B's endpoint (another process with its own
//! database): the agent moves, B shows it connected with APPLIED for that offer (CS-OP-5), A
//! shows it gone. Restarted with its old `--endpoint` (A's), the agent goes to B again: the
//! settings were persisted through the client's hook.
//!
//! `cargo test -p opamp-reference-server --test connection_settings` (builds the reference
//! agent first).

// Test helpers outside `#[test]` functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Scratch, agent_json, send_json, start_agent, start_server, uid_of, wait_for};
use serde_json::{Value, json};

/// A loopback port nothing listens on (bound, then released).
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("ws://127.0.0.1:{port}/v1/opamp")
}

fn offer(ui: &str, uid: &str, body: &Value) -> String {
    let path = format!("/api/v1/agents/{uid}/connection-settings");
    let (status, answer) = send_json(ui, "POST", &path, body);
    assert_eq!(status, 200, "POST {path}: {answer}");
    answer["hash"].as_str().unwrap().to_owned()
}

#[test]
fn cs_op_an_agent_is_moved_to_another_server_process_a_dead_endpoint_is_rolled_back_and_a_restart_keeps_the_move()
 {
    let scratch = Scratch::new("connection-settings");
    let dir = scratch.path();
    let a = start_server(&[], &dir.join("server-a.log"), &[]);
    let b = start_server(&[], &dir.join("server-b.log"), &[]);
    let agent_log = dir.join("mover.log");
    let logs = [a.log.as_path(), b.log.as_path(), agent_log.as_path()];
    let (agent, agent_dir) =
        start_agent(dir, "mover", &a.endpoint, &["--accept-connection-settings"]);
    let uid = uid_of(&agent_dir, &agent_log);
    wait_for("the agent on A", &logs, || {
        let v = agent_json(&a.ui, &uid);
        let caps = v["capabilities"].to_string();
        let ready = v["connected"] == true && caps.contains("ACCEPTS_OPAMP_CONNECTION_SETTINGS");
        (ready.then_some(()), v)
    });

    // An agent without the capability is refused (CS-OP-1): a second agent, no flag.
    let (_plain, plain_dir) = start_agent(dir, "plain", &a.endpoint, &[]);
    let plain_uid = uid_of(&plain_dir, &dir.join("plain.log"));
    wait_for("the plain agent on A", &logs, || {
        let v = agent_json(&a.ui, &plain_uid);
        ((v["connected"] == true).then_some(()), v)
    });
    let (status, answer) = send_json(
        &a.ui,
        "POST",
        &format!("/api/v1/agents/{plain_uid}/connection-settings"),
        &json!({ "endpoint": b.endpoint }),
    );
    assert_eq!(status, 409, "{answer}");
    // A bad body is refused before anything is offered.
    let (status, answer) = send_json(
        &a.ui,
        "POST",
        &format!("/api/v1/agents/{uid}/connection-settings"),
        &json!({ "endpoint": "ftp://127.0.0.1/x" }),
    );
    assert_eq!(status, 400, "{answer}");

    // CS-OP-6: a candidate at a dead port fails; the agent goes back to A and says FAILED.
    let dead = offer(&a.ui, &uid, &json!({ "endpoint": dead_endpoint() }));
    let failed = wait_for("FAILED for the dead endpoint on A", &logs, || {
        let v = agent_json(&a.ui, &uid);
        let s = &v["connection_settings_status"];
        let done = s["status"] == "FAILED"
            && s["hash"] == dead.as_str()
            && v["connection_settings_offer"]["state"] == "FAILED"
            && v["connected"] == true;
        (done.then(|| v.clone()), v)
    });
    assert!(
        !failed["connection_settings_status"]["error_message"]
            .as_str()
            .unwrap()
            .is_empty(),
        "FAILED carries the reason: {failed}"
    );
    assert_eq!(
        agent_json(&b.ui, &uid),
        Value::Null,
        "B never saw the agent yet"
    );

    // CS-OP-3..CS-OP-5: offered B's endpoint (and a header), the agent moves to B.
    let moved = offer(
        &a.ui,
        &uid,
        &json!({ "endpoint": b.endpoint, "headers": { "x-moved-by": "test" } }),
    );
    assert_ne!(moved, dead, "a different offer has a different hash");
    wait_for("APPLIED and connected on B", &logs, || {
        let v = agent_json(&b.ui, &uid);
        let s = &v["connection_settings_status"];
        let done =
            v["connected"] == true && s["status"] == "APPLIED" && s["hash"] == moved.as_str();
        (done.then_some(()), v)
    });
    wait_for("the agent gone from A", &logs, || {
        let v = agent_json(&a.ui, &uid);
        ((v["connected"] == false).then_some(()), v)
    });
    let saved = agent_dir.join("opamp_connection_settings.pb");
    assert!(saved.exists(), "{} is written", saved.display());

    // After a restart (with A's endpoint on the command line) the agent goes to B again.
    drop(agent);
    wait_for("B sees the agent leave", &logs, || {
        let v = agent_json(&b.ui, &uid);
        ((v["connected"] == false).then_some(()), v)
    });
    let (_agent, _) = start_agent(dir, "mover", &a.endpoint, &["--accept-connection-settings"]);
    wait_for("the restarted agent back on B", &logs, || {
        let v = agent_json(&b.ui, &uid);
        let s = &v["connection_settings_status"];
        let done =
            v["connected"] == true && s["status"] == "APPLIED" && s["hash"] == moved.as_str();
        (done.then_some(()), v)
    });
    let on_a = agent_json(&a.ui, &uid);
    assert_eq!(
        on_a["connected"], false,
        "not on A after the restart: {on_a}"
    );

    // The audit log on A names both offers.
    let (status, audit) = common::api(&a.ui, "GET", "/api/v1/audit?limit=50", &[], b"");
    assert_eq!(status, 200);
    let entries = audit.to_string();
    assert!(
        entries.contains(&dead) && entries.contains(&moved),
        "audit: {entries}"
    );
}
