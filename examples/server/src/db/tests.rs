//! The store on real databases: a SQLite file and a PostgreSQL server (see `testpg`).

use std::collections::BTreeMap;

use super::*;

#[path = "testpg.rs"]
pub(crate) mod testpg;

fn actor() -> Actor {
    Actor {
        who: "test".into(),
        address: "127.0.0.1:1".into(),
    }
}

fn scratch_sqlite() -> (String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "opamp-db-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    (format!("sqlite://{}/fleet.db", dir.display()), dir)
}

fn selector(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Every store operation, the same on both databases.
async fn exercise(url: &str) {
    let store = Store::open(url).await.expect("open");
    assert_eq!(
        store.schema_version().await.unwrap(),
        MIGRATIONS.len() as i64
    );
    // Opening again finds the schema applied.
    let again = Store::open(url).await.expect("open again");
    assert_eq!(
        again.schema_version().await.unwrap(),
        MIGRATIONS.len() as i64
    );

    let a = actor();
    let sel = selector(&[("environment", "prod")]);
    let c1 = store
        .put_config(
            "base",
            &NewVersion {
                selector: &sel,
                priority: 5,
                content_type: "text/yaml",
                body: b"v: 1\n",
                activate: true,
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!((c1.latest.version, c1.active.version), (1, 1));
    assert_eq!(c1.latest.selector, sel);
    assert_eq!(c1.latest.priority, 5);
    // A held version: latest moves, active stays.
    let c2 = store
        .put_config(
            "base",
            &NewVersion {
                selector: &sel,
                priority: 5,
                content_type: "text/yaml",
                body: b"v: 2\n",
                activate: false,
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!((c2.latest.version, c2.active.version), (2, 1));
    assert_eq!(c2.active.body, b"v: 1\n");
    store.activate("base", 2, &a).await.unwrap();
    let c = store.config("base").await.unwrap().unwrap();
    assert_eq!((c.latest.version, c.active.version), (2, 2));
    // A held first version is active at once: there is nothing older.
    let other = store
        .put_config(
            "other",
            &NewVersion {
                selector: &BTreeMap::new(),
                priority: 0,
                content_type: "text/plain",
                body: b"x",
                activate: false,
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!(other.active.version, 1);
    let all = store.configs().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|c| c.latest.name.as_str())
            .collect::<Vec<_>>(),
        ["base", "other"]
    );
    assert_eq!(all[0].active.body, b"v: 2\n");

    // Deleted: gone from the list, its history kept, and a new PUT continues the numbering.
    assert!(store.delete_config("base", &a).await.unwrap());
    assert!(!store.delete_config("base", &a).await.unwrap());
    assert!(store.config("base").await.unwrap().is_none());
    let history = store.config_history("base").await.unwrap();
    assert_eq!(
        history.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(history[0].body, b"v: 1\n");
    let c3 = store
        .put_config(
            "base",
            &NewVersion {
                selector: &sel,
                priority: 5,
                content_type: "text/yaml",
                body: b"v: 3\n",
                activate: true,
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!(c3.latest.version, 3);

    // Overrides.
    store
        .put_override("0190-uid", "text/yaml", b"own: 1\n", &a)
        .await
        .unwrap();
    store
        .put_override("0190-uid", "text/yaml", b"own: 2\n", &a)
        .await
        .unwrap();
    let o = store.override_for("0190-uid").await.unwrap().unwrap();
    assert_eq!(o.body, b"own: 2\n");
    assert_eq!(store.overrides().await.unwrap().len(), 1);
    assert!(store.delete_override("0190-uid", &a).await.unwrap());
    assert!(store.override_for("0190-uid").await.unwrap().is_none());

    // Agents: written, replaced, released by node.
    let row = AgentRow {
        uid: "u1".into(),
        node: "n1".into(),
        connected: true,
        last_seen_ms: 10,
        transport: Some("websocket".into()),
        remote_addr: None,
        state: vec![1, 2, 3],
        applied_config_hash: Some(vec![9; 32]),
        applied_effective_hash: None,
        view: Some("{}".into()),
    };
    store.save_agents(vec![row.clone()]).await.unwrap();
    let mut changed = row.clone();
    changed.state = vec![4];
    changed.last_seen_ms = 20;
    store.save_agents(vec![changed.clone()]).await.unwrap();
    assert_eq!(store.agent("u1").await.unwrap(), Some(changed.clone()));
    store.release_node("n1").await.unwrap();
    assert!(!store.agent("u1").await.unwrap().unwrap().connected);
    store.forget_agents(15).await.unwrap();
    assert_eq!(store.agents().await.unwrap().len(), 1, "seen at 20, kept");
    store.forget_agents(25).await.unwrap();
    assert!(store.agents().await.unwrap().is_empty());

    // Rollouts.
    let r = store
        .create_rollout(
            "base",
            2,
            3,
            &serde_json::json!({"batch_percent": 10}),
            &serde_json::json!({"batches": []}),
            &a,
        )
        .await
        .unwrap();
    assert_eq!(r.state, "running");
    let moved = store
        .update_rollout(
            r.id,
            "running",
            "paused",
            &serde_json::json!({"batches": [1]}),
            Some((&a, "pause")),
            None,
        )
        .await
        .unwrap();
    assert!(moved);
    // From a state it is not in: nothing moves, nothing is logged.
    let moved = store
        .update_rollout(
            r.id,
            "running",
            "completed",
            &serde_json::json!({}),
            Some((&a, "completed")),
            Some(("base", 3, 99)),
        )
        .await
        .unwrap();
    assert!(!moved);
    let r = store.rollout(r.id).await.unwrap().unwrap();
    assert_eq!(r.state, "paused");
    assert_eq!(r.progress["batches"][0], 1);
    assert_eq!(store.rollouts().await.unwrap().len(), 1);
    assert_eq!(
        store.config("base").await.unwrap().unwrap().active.version,
        3,
        "not activated by a rollout that did not complete"
    );
    // A second live rollout of one config is refused by the database itself.
    let second = store
        .create_rollout(
            "base",
            3,
            4,
            &serde_json::json!({}),
            &serde_json::json!({}),
            &a,
        )
        .await;
    assert!(matches!(second, Err(StoreError::Conflict(_))), "{second:?}");
    // Completed from paused (as the test moves it): the version becomes active with it.
    let moved = store
        .update_rollout(
            r.id,
            "paused",
            "completed",
            &serde_json::json!({}),
            None,
            Some(("base", 3, 2)),
        )
        .await
        .unwrap();
    assert!(moved);
    assert_eq!(
        store.config("base").await.unwrap().unwrap().active.version,
        2
    );

    // The audit log: every change above, newest first, with who and from where.
    let log = store.audit_log(100).await.unwrap();
    let actions: Vec<&str> = log.iter().rev().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "put_config",
            "put_config",
            "activate_config",
            "put_config",
            "delete_config",
            "put_config",
            "put_agent_config",
            "put_agent_config",
            "delete_agent_config",
            "create_rollout",
            "pause"
        ]
    );
    assert!(
        log.iter()
            .all(|e| e.who == "test" && e.address == "127.0.0.1:1")
    );
}

#[tokio::test]
async fn store_on_sqlite() {
    let (url, dir) = scratch_sqlite();
    exercise(&url).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_postgres() {
    let url = tokio::task::spawn_blocking(testpg::database).await.unwrap();
    exercise(&url).await;
}

/// A change committed through one store reaches a listener on the same database (another
/// node) as it commits: LISTEN/NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_reach_other_nodes() {
    let url = tokio::task::spawn_blocking(testpg::database).await.unwrap();
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let mut changes = b.listen().await.expect("PostgreSQL listens");
    // Once LISTEN took effect the listener says so with a catch-up (`Config("")`: reload
    // everything), so nothing committed before it is missed.
    let first = tokio::time::timeout(std::time::Duration::from_secs(20), changes.recv())
        .await
        .expect("the catch-up after LISTEN")
        .expect("open");
    assert_eq!(first, Change::Config(String::new()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let got = loop {
        a.put_config(
            "c",
            &NewVersion {
                selector: &BTreeMap::new(),
                priority: 0,
                content_type: "text/plain",
                body: b"x",
                activate: true,
            },
            &actor(),
        )
        .await
        .unwrap();
        match tokio::time::timeout(std::time::Duration::from_millis(500), changes.recv()).await {
            Ok(Some(change)) => break change,
            _ if std::time::Instant::now() > deadline => panic!("no notification"),
            _ => {}
        }
    };
    assert_eq!(got, Change::Config("c".into()));
    a.put_override("u", "text/plain", b"y", &actor())
        .await
        .unwrap();
    let next = loop {
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv())
            .await
            .expect("a notification")
            .expect("open");
        if c != Change::Config("c".into()) {
            break c;
        }
    };
    assert_eq!(next, Change::Override("u".into()));
    // SQLite has nobody to tell.
    let (sqlite, dir) = scratch_sqlite();
    assert!(Store::open(&sqlite).await.unwrap().listen().await.is_none());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn urls_are_redacted_and_checked() {
    assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u@h/db");
    assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = rt.block_on(Store::open("mysql://u:pw@h/db")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("sqlite://PATH") && !text.contains("pw"),
        "{text}"
    );
}
