//! The reference server as a durable control plane (issue #12), with real processes, real
//! sockets, a real SQLite file and a real PostgreSQL server: nothing acknowledged is lost to
//! `kill -9`; a selector config reaches an agent that joins later, rendered for it; the
//! validator and template checks refuse bad configs; drift is flagged; a staged rollout halts
//! at its failure threshold and rolls back; two nodes on one PostgreSQL serve one fleet.
//!
//! `cargo test -p opamp-reference-server --test control_plane`

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../src/db/testpg.rs"]
mod testpg;

use std::path::Path;
use std::time::Instant;

use common::{Scratch, agent_json, api, send_json, start_agent, start_server, uid_of, wait_for};
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn put_config(ui: &str, name: &str, body: Value) -> Value {
    let (status, v) = send_json(ui, "PUT", &format!("/api/v1/configs/{name}"), &body);
    assert_eq!(status, 200, "PUT config {name}: {v}");
    v
}

/// Waits until agent `uid` reports `status` for the config the server offers it (its own
/// `remote_config.hash`), or for `hash` when given.
fn wait_rcs(ui: &str, uid: &str, status: &str, hash: Option<&str>, logs: &[&Path]) -> Value {
    wait_for(&format!("{uid} {status} {hash:?}"), logs, || {
        let a = agent_json(ui, uid);
        let want = hash
            .map(str::to_owned)
            .or_else(|| a["remote_config"]["hash"].as_str().map(str::to_owned));
        let r = &a["remote_config_status"];
        let ok = a["connected"] == true
            && want.is_some()
            && r["hash"].as_str() == want.as_deref()
            && r["status"] == status;
        (ok.then(|| a.clone()), a)
    })
}

/// Waits until agent `uid` reports `body` as its effective config (the reference agent reports
/// APPLIED and then, in its next message, the effective config) and returns the agent.
fn wait_body(ui: &str, uid: &str, body: &str, logs: &[&Path]) -> Value {
    wait_for(&format!("{uid} effective config {body:?}"), logs, || {
        let a = agent_json(ui, uid);
        ((effective_body(&a) == body).then(|| a.clone()), a)
    })
}

fn effective_body(a: &Value) -> String {
    a["effective_config"][""]["body"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn kill9_of_the_server_loses_nothing_the_api_acknowledged() {
    let scratch = Scratch::new("cp-kill9");
    let dir = scratch.path();
    let db = format!("sqlite://{}/control.db", dir.display());
    let port = free_port();
    let opamp = format!("127.0.0.1:{port}");
    let args = ["--opamp-addr", opamp.as_str(), "--database", db.as_str()];
    let log1 = dir.join("server-1.log");
    let mut server = start_server(&args, &log1, &[]);
    let ui = server.ui.clone();
    let (_agent, agent_dir) = start_agent(dir, "durable-a", &server.endpoint, &[]);
    let agent_log = dir.join("durable-a.log");
    let logs = [agent_log.as_path(), log1.as_path()];
    let uid = uid_of(&agent_dir, &agent_log);

    let sel = json!({"service.name": "durable-a"});
    let v1 = put_config(&ui, "base", json!({"selector": sel, "body": "base: 1\n"}));
    assert_eq!(v1["version"], 1, "{v1}");
    let v2 = put_config(&ui, "base", json!({"selector": sel, "body": "base: 2\n"}));
    assert_eq!(v2["version"], 2, "{v2}");
    let v2_hash = v2["config_hash"].as_str().unwrap().to_owned();
    wait_rcs(&ui, &uid, "APPLIED", Some(&v2_hash), &logs);
    put_config(
        &ui,
        "other",
        json!({"selector": {"team": "nobody"}, "priority": 5, "body": "other: 1\n"}),
    );
    let (status, own) = api(
        &ui,
        "PUT",
        &format!("/api/v1/agents/{uid}/config"),
        &[("Content-Type", "text/yaml"), ("X-Opamp-User", "alice")],
        b"own: 1\n",
    );
    assert_eq!(status, 200, "{own}");
    let own_hash = own["config_hash"].as_str().unwrap().to_owned();
    let a = wait_rcs(&ui, &uid, "APPLIED", Some(&own_hash), &logs);
    assert_eq!(a["desired_config"]["source"], "override", "{a}");
    assert_eq!(a["desired_config"]["outranked"], json!(["base"]), "{a}");

    // A package and a package set (signed by the key generated at first start).
    let (status, pkg) = api(
        &ui,
        "PUT",
        "/api/v1/packages/tool/1.0",
        &[("Content-Type", "application/octet-stream")],
        b"tool v1",
    );
    assert_eq!(status, 200, "{pkg}");
    let (status, set) = send_json(
        &ui,
        "PUT",
        "/api/v1/package-sets/tools",
        &json!({"selector": {"service.name": "nobody"}, "packages": {"tool": "1.0"}}),
    );
    assert_eq!(status, 200, "{set}");
    let key = server.package_key.clone();

    // kill -9: no shutdown, no final write.
    server.proc.kill9();
    let log2 = dir.join("server-2.log");
    let server = start_server(&args, &log2, &[]);
    let ui = server.ui.clone();
    let logs = [agent_log.as_path(), log2.as_path()];
    assert_eq!(server.package_key, key, "the generated signing key is kept");
    let (_, packages) = api(&ui, "GET", "/api/v1/packages", &[], b"");
    assert_eq!(
        packages["packages"][0]["sha256"], pkg["sha256"],
        "{packages}"
    );
    assert_eq!(packages["packages"][0]["signed_by"], "server", "{packages}");
    assert_eq!(
        packages["package_sets"]["tools"]["packages"]["tool"], "1.0",
        "{packages}"
    );

    let (_, configs) = api(&ui, "GET", "/api/v1/configs", &[], b"");
    let names: Vec<&str> = configs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "base"], "by priority: {configs}");
    assert_eq!(configs[1]["version"], 2);
    let (_, history) = api(&ui, "GET", "/api/v1/configs/base/history", &[], b"");
    let bodies: Vec<&str> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["base: 1\n", "base: 2\n"], "{history}");
    let (_, audit) = api(&ui, "GET", "/api/v1/audit", &[], b"");
    let actions: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| (e["action"].as_str().unwrap(), e["who"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("put_config", "anonymous"),
            ("put_config", "anonymous"),
            ("put_config", "anonymous"),
            ("put_agent_config", "alice"),
            ("put_package", "anonymous"),
            ("put_package_set", "anonymous")
        ],
        "{audit}"
    );
    assert!(
        audit[0]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{audit}"
    );

    // The agent reconnects by itself; the server still gives it its own config.
    let a = wait_rcs(&ui, &uid, "APPLIED", Some(&own_hash), &logs);
    assert_eq!(a["desired_config"]["source"], "override", "{a}");
    // Without its own config it goes back to the named one.
    let (status, _) = api(
        &ui,
        "DELETE",
        &format!("/api/v1/agents/{uid}/config"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let a = wait_rcs(&ui, &uid, "APPLIED", Some(&v2_hash), &logs);
    wait_body(&ui, &uid, "base: 2\n", &logs);
    assert_eq!(a["desired_config"]["name"], "base", "{a}");
    assert_eq!(a["desired_config"]["version"], 2, "{a}");
}

#[test]
fn a_selector_config_reaches_agents_that_join_later_rendered_validated_and_drift_is_flagged() {
    let scratch = Scratch::new("cp-selector");
    let dir = scratch.path();
    let log = dir.join("server.log");
    // The validator refuses a config containing FORBIDDEN, with its own message.
    let validator = "if grep -q FORBIDDEN; then echo \"FORBIDDEN is not allowed in $OPAMP_CONFIG_NAME\" >&2; exit 3; fi";
    let server = start_server(&["--validate-config", validator], &log, &[]);
    let ui = server.ui.clone();

    // Template checks at PUT time: an unknown variable is a 400, nothing is stored.
    let (status, e) = send_json(
        &ui,
        "PUT",
        "/api/v1/configs/tmpl",
        &json!({"selector": {"environment": "staging"}, "body": "x: ${attr:region}\n"}),
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("${attr:region}"),
        "{e}"
    );
    let (status, e) = send_json(
        &ui,
        "PUT",
        "/api/v1/configs/tmpl",
        &json!({"selector": {"environment": "staging"}, "body": "x: FORBIDDEN\n"}),
    );
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("FORBIDDEN is not allowed in tmpl"),
        "{e}"
    );
    let (status, _) = api(&ui, "GET", "/api/v1/configs/tmpl", &[], b"");
    assert_eq!(status, 404, "refused configs are not stored");

    let put = put_config(
        &ui,
        "tmpl",
        json!({
            "selector": {"environment": "staging"},
            "body": "name: ${attr:service.name:-?}\nenv: ${attr:environment}\nregion: ${attr:region:-none}\n",
        }),
    );
    assert_eq!(put["templated"], true, "{put}");
    assert_eq!(put["agents"], json!([]), "no agent yet: {put}");

    // Two agents join later: one matches (and has a region), one does not.
    let endpoint = server.endpoint.clone();
    let (_late, late_dir) = start_agent(
        dir,
        "late-1",
        &endpoint,
        &[
            "--attribute",
            "environment=staging",
            "--attribute",
            "region=eu",
            "--watch-config",
        ],
    );
    let (_other, other_dir) = start_agent(
        dir,
        "other-1",
        &endpoint,
        &["--attribute", "environment=prod"],
    );
    let late_log = dir.join("late-1.log");
    let logs = [late_log.as_path(), log.as_path()];
    let late = uid_of(&late_dir, &late_log);
    let other = uid_of(&other_dir, &dir.join("other-1.log"));
    wait_rcs(&ui, &late, "APPLIED", None, &logs);
    let a = wait_body(
        &ui,
        &late,
        "name: late-1\nenv: staging\nregion: eu\n",
        &logs,
    );
    assert_eq!(a["desired_config"]["name"], "tmpl", "{a}");
    assert_eq!(a["drift"]["drifted"], false, "{a}");
    let o = wait_for("the other agent's effective config", &logs, || {
        let o = agent_json(&ui, &other);
        (
            o["effective_config"][""]["body"]
                .is_string()
                .then(|| o.clone()),
            o,
        )
    });
    assert_eq!(o["desired_config"], Value::Null, "{o}");
    assert_eq!(
        o["drift"]["drifted"], true,
        "runs a config nobody gives it: {o}"
    );

    // Someone edits the agent's config file by hand: the effective config moved.
    std::fs::write(late_dir.join("config.yaml"), "name: edited by hand\n").unwrap();
    let a = wait_for("drift flagged", &logs, || {
        let a = agent_json(&ui, &late);
        ((a["drift"]["drifted"] == true).then(|| a.clone()), a)
    });
    assert!(
        a["drift"]["reason"]
            .as_str()
            .unwrap()
            .contains("effective config changed"),
        "{a}"
    );
    // A new version brings it back in line.
    put_config(
        &ui,
        "tmpl",
        json!({"selector": {"environment": "staging"}, "body": "name: ${attr:service.name:-?}\nv: 2\n"}),
    );
    wait_rcs(&ui, &late, "APPLIED", None, &logs);
    wait_body(&ui, &late, "name: late-1\nv: 2\n", &logs);
    let a = wait_for("drift cleared", &logs, || {
        let a = agent_json(&ui, &late);
        ((a["drift"]["drifted"] == false).then(|| a.clone()), a)
    });
    assert_eq!(a["desired_config"]["version"], 2, "{a}");
}

fn rollout(ui: &str, id: i64) -> Value {
    let (status, r) = api(ui, "GET", &format!("/api/v1/rollouts/{id}"), &[], b"");
    assert_eq!(status, 200, "{r}");
    r
}

fn wait_rollout(ui: &str, id: i64, logs: &[&Path], done: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("rollout {id}"), logs, || {
        let r = rollout(ui, id);
        (done(&r).then(|| r.clone()), r)
    })
}

#[test]
fn a_staged_rollout_halts_at_its_failure_threshold_rolls_back_and_completes_when_good() {
    let scratch = Scratch::new("cp-rollout");
    let dir = scratch.path();
    let log = dir.join("server.log");
    let server = start_server(&[], &log, &[]);
    let ui = server.ui.clone();
    // Three agents that take any config, one that fails on its marker (mode=INVALID).
    let (_good, _) = start_agent(
        dir,
        "ro",
        &server.endpoint,
        &["--count", "3", "--attribute", "fleet=ro"],
    );
    let (_bad, bad_dir) = start_agent(
        dir,
        "ro-bad",
        &server.endpoint,
        &["--attribute", "fleet=ro", "--attribute", "mode=INVALID"],
    );
    let logs = [log.as_path(), &dir.join("ro.log"), &dir.join("ro-bad.log")];
    let bad = uid_of(&bad_dir, &dir.join("ro-bad.log"));
    let uids: Vec<String> = (0..3)
        .map(|i| {
            uid_of(
                &dir.join("ro").join(format!("agent-{i}")),
                &dir.join("ro.log"),
            )
        })
        .chain([bad.clone()])
        .collect();

    let sel = json!({"fleet": "ro"});
    let v1 = put_config(&ui, "ro", json!({"selector": sel, "body": "mode: v1\n"}));
    let v1_hash = v1["config_hash"].as_str().unwrap().to_owned();
    for uid in &uids {
        wait_rcs(&ui, uid, "APPLIED", Some(&v1_hash), &logs);
    }
    // Nothing held yet: nothing to roll out.
    let spec = json!({"config": "ro", "batch_percent": 25, "max_failure_percent": 0,
                      "batch_wait_seconds": 0, "rollback": true});
    let (status, e) = send_json(&ui, "POST", "/api/v1/rollouts", &spec);
    assert_eq!(status, 409, "{e}");

    // v2 is held: agents keep v1 until the rollout gives it to them. It renders to INVALID
    // on the bad agent only.
    let v2 = put_config(
        &ui,
        "ro",
        json!({"selector": sel, "body": "mode: ${attr:mode:-v2}\n", "activate": false}),
    );
    assert_eq!(
        (v2["version"].clone(), v2["latest_version"].clone()),
        (json!(1), json!(2)),
        "{v2}"
    );
    let (status, r) = send_json(&ui, "POST", "/api/v1/rollouts", &spec);
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["targets"], 4, "{r}");
    assert_eq!(r["batch_size"], 1, "{r}");
    let id = r["id"].as_i64().unwrap();
    let r = wait_rollout(&ui, id, &logs, |r| r["state"] == "rolled_back");
    let batches = r["batches"].as_array().unwrap();
    let last = batches.last().unwrap();
    assert_eq!(
        last["agents"],
        json!([bad]),
        "the halting batch is the bad agent's: {r}"
    );
    assert!(
        r["halted_reason"]
            .as_str()
            .unwrap()
            .contains("failed on 1 of 1"),
        "{r}"
    );
    // Rolled back: every agent runs v1 again (the released good ones came back from v2).
    for uid in &uids {
        wait_rcs(&ui, uid, "APPLIED", Some(&v1_hash), &logs);
    }
    let (_, c) = api(&ui, "GET", "/api/v1/configs/ro", &[], b"");
    assert_eq!(c["active_version"], 1, "{c}");

    // A good version, in two batches of two with a long wait: pause, resume, abort.
    put_config(
        &ui,
        "ro",
        json!({"selector": sel, "body": "mode: v3\n", "activate": false}),
    );
    let slow = json!({"config": "ro", "batch_percent": 50, "max_failure_percent": 0,
                      "batch_wait_seconds": 3600});
    let (status, r) = send_json(&ui, "POST", "/api/v1/rollouts", &slow);
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_i64().unwrap();
    let r = wait_rollout(&ui, id, &logs, |r| {
        r["batches"][0]["applied"] == 2 && r["state"] == "running"
    });
    assert_eq!(r["released"], 2, "the second batch waits: {r}");
    for (action, state) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("abort", "aborted"),
    ] {
        let (status, r) = send_json(
            &ui,
            "POST",
            &format!("/api/v1/rollouts/{id}/{action}"),
            &json!({}),
        );
        assert_eq!(status, 200, "{action}: {r}");
        assert_eq!(r["state"], state, "{r}");
    }
    let (status, _) = send_json(
        &ui,
        "POST",
        &format!("/api/v1/rollouts/{id}/resume"),
        &json!({}),
    );
    assert_eq!(status, 409, "an aborted rollout stays aborted");
    for uid in &uids {
        wait_rcs(&ui, uid, "APPLIED", Some(&v1_hash), &logs);
    }

    // The same version in one batch: completed, and v3 is the active version.
    let all = json!({"config": "ro", "batch_percent": 100, "max_failure_percent": 0});
    let (status, r) = send_json(&ui, "POST", "/api/v1/rollouts", &all);
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_i64().unwrap();
    let r = wait_rollout(&ui, id, &logs, |r| r["state"] == "completed");
    assert_eq!(r["batches"][0]["applied"], 4, "{r}");
    let (_, c) = api(&ui, "GET", "/api/v1/configs/ro", &[], b"");
    assert_eq!(c["active_version"], 3, "{c}");
    let v3_hash = c["config_hash"].as_str().unwrap().to_owned();
    for uid in &uids {
        wait_rcs(&ui, uid, "APPLIED", Some(&v3_hash), &logs);
    }
}

#[test]
fn two_nodes_on_one_postgres_serve_one_fleet_and_survive_a_node() {
    let db = testpg::database();
    let scratch = Scratch::new("cp-nodes");
    let dir = scratch.path();
    let (log_a, log_b) = (dir.join("node-a.log"), dir.join("node-b.log"));
    let a = start_server(&["--database", &db, "--node-id", "node-a"], &log_a, &[]);
    let b_port = free_port();
    let b_addr = format!("127.0.0.1:{b_port}");
    let mut b = start_server(
        &[
            "--database",
            &db,
            "--node-id",
            "node-b",
            "--opamp-addr",
            &b_addr,
        ],
        &log_b,
        &[],
    );
    let (_agent, agent_dir) = start_agent(dir, "on-b", &b.endpoint, &[]);
    let agent_log = dir.join("on-b.log");
    let logs = [agent_log.as_path(), log_a.as_path(), log_b.as_path()];
    let uid = uid_of(&agent_dir, &agent_log);
    wait_for("the agent seen from node A", &logs, || {
        let v = agent_json(&a.ui, &uid);
        (
            (v["connected"] == true && v["node"] == "node-b").then_some(()),
            v,
        )
    });

    // A config made through node A reaches the agent on node B.
    let t0 = Instant::now();
    let put = put_config(&a.ui, "shared", json!({"body": "from: node-a\n"}));
    let hash = put["config_hash"].as_str().unwrap().to_owned();
    wait_rcs(&b.ui, &uid, "APPLIED", Some(&hash), &logs);
    let took = t0.elapsed();
    println!("push through node A to APPLIED on node B: {took:?}");
    let v = wait_body(&b.ui, &uid, "from: node-a\n", &logs);
    assert_eq!(v["node"], "node-b");
    // An override through A as well.
    let (status, own) = api(
        &a.ui,
        "PUT",
        &format!("/api/v1/agents/{uid}/config"),
        &[("Content-Type", "text/yaml")],
        b"own: via-a\n",
    );
    assert_eq!(status, 200, "{own}");
    wait_rcs(&b.ui, &uid, "APPLIED", own["config_hash"].as_str(), &logs);
    let (status, _) = api(
        &a.ui,
        "DELETE",
        &format!("/api/v1/agents/{uid}/config"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    wait_rcs(&b.ui, &uid, "APPLIED", Some(&hash), &logs);

    // A rollout made through node A (one node drives it, under a lease) reaches the agent on
    // node B, and its state is the same seen from both nodes.
    let held = put_config(
        &a.ui,
        "shared",
        json!({"body": "from: rollout\n", "activate": false}),
    );
    assert_eq!(held["latest_version"], 2, "{held}");
    let (status, r) = send_json(
        &a.ui,
        "POST",
        "/api/v1/rollouts",
        &json!({"config": "shared", "batch_percent": 100}),
    );
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["targets"], 1, "the agent on node B is a target: {r}");
    let id = r["id"].as_i64().unwrap();
    let r = wait_rollout(&b.ui, id, &logs, |r| r["state"] == "completed");
    assert_eq!(r["batches"][0]["applied"], 1, "{r}");
    wait_rcs(&b.ui, &uid, "APPLIED", None, &logs);
    wait_body(&b.ui, &uid, "from: rollout\n", &logs);
    assert_eq!(rollout(&a.ui, id)["state"], "completed");

    // Node B dies. A new version is made while it is down; a node that takes over B's address
    // (as behind a load balancer) gives the reconnecting agent its config.
    b.proc.kill9();
    let put = put_config(&a.ui, "shared", json!({"body": "from: node-a\nv: 2\n"}));
    let hash2 = put["config_hash"].as_str().unwrap().to_owned();
    assert_eq!(put["agents"], json!([]), "nobody connected to node A");
    let log_c = dir.join("node-c.log");
    let c = start_server(
        &[
            "--database",
            &db,
            "--node-id",
            "node-c",
            "--opamp-addr",
            &b_addr,
        ],
        &log_c,
        &[],
    );
    let logs = [agent_log.as_path(), log_a.as_path(), log_c.as_path()];
    wait_rcs(&c.ui, &uid, "APPLIED", Some(&hash2), &logs);
    wait_body(&c.ui, &uid, "from: node-a\nv: 2\n", &logs);
    let seen = wait_for("node A sees the agent on node C", &logs, || {
        let v = agent_json(&a.ui, &uid);
        let ok = v["node"] == "node-c"
            && v["connected"] == true
            && v["remote_config_status"]["hash"] == hash2.as_str();
        (ok.then(|| v.clone()), v)
    });
    assert_eq!(seen["remote_config_status"]["status"], "APPLIED", "{seen}");
    // What node C knows of it (its desired config, its drift) is shown by node A too.
    let seen = wait_for("node A shows node C's view", &logs, || {
        let v = agent_json(&a.ui, &uid);
        (
            (v["desired_config"]["name"] == "shared").then(|| v.clone()),
            v,
        )
    });
    assert_eq!(seen["drift"]["drifted"], false, "{seen}");
    assert_eq!(seen["remote_config"]["hash"], hash2.as_str(), "{seen}");
    let (_, list) = api(&a.ui, "GET", "/api/v1/agents", &[], b"");
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "one agent, listed once: {list}"
    );
}
