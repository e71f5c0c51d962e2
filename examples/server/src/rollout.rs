//! Staged rollouts: a held config version given to the agents it targets batch by batch.
//!
//! `POST /api/v1/rollouts` takes a config whose latest version is held (`"activate": false`
//! at PUT) and the agents the config wins for (known to the store, by uid). Each batch is
//! `batch_percent` of them (at least one). A batch is done when each of its agents reported
//! APPLIED or FAILED for its rendered config; after `batch_wait_seconds` the next batch is
//! released. A batch whose FAILED share passes `max_failure_percent` halts the rollout; with
//! `rollback` the released agents go back to the previous version. When every batch is done
//! the new version becomes the config's active version (agents that join later get it).
//!
//! States: `running`, `paused`, `halted` (released agents keep the new version), `completed`,
//! `rolled_back`, `aborted` (released agents go back to the previous version). Every node runs
//! the driver loop; one node at a time drives a rollout, under a lease in its row (renewed at
//! each step, taken over by another node 5 s after it ran out). The progress
//! document: `targets` (uids), `batch_size`, `batches` (each `agents`, `released_ms`,
//! `done_ms`), `halted_reason`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use opamp::proto::{InstanceUid, RemoteConfigStatuses};
use serde_json::{Value, json};

use crate::State;
use crate::db::{Actor, RolloutRow, now_ms};
use crate::desired::Source;

/// Whether agents of a rollout in `state` keep what it released.
pub(crate) fn is_live(state: &str) -> bool {
    matches!(state, "running" | "paused" | "halted")
}

/// The uids of a JSON array of strings (`targets`, a batch's `agents`).
fn uids(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

/// The agents a rollout released.
pub(crate) fn released(progress: &Value) -> HashSet<String> {
    progress["batches"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| uids(&b["agents"]))
        .collect()
}

/// The spec of a rollout, checked.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) config: String,
    pub(crate) batch_percent: f64,
    pub(crate) max_failure_percent: f64,
    pub(crate) batch_wait_seconds: f64,
    pub(crate) rollback: bool,
}

impl Spec {
    pub(crate) fn parse(v: &Value) -> Result<Spec, String> {
        let config = v["config"]
            .as_str()
            .ok_or("\"config\" (the name of a config) is required")?
            .to_owned();
        let num = |key: &str, default: f64, lo: f64, hi: f64| -> Result<f64, String> {
            match &v[key] {
                Value::Null => Ok(default),
                n => n
                    .as_f64()
                    .filter(|x| (lo..=hi).contains(x))
                    .ok_or_else(|| format!("\"{key}\" must be a number from {lo} to {hi}")),
            }
        };
        Ok(Spec {
            config,
            batch_percent: num("batch_percent", 10.0, 0.01, 100.0)?,
            max_failure_percent: num("max_failure_percent", 0.0, 0.0, 100.0)?,
            batch_wait_seconds: num("batch_wait_seconds", 0.0, 0.0, 86400.0)?,
            rollback: match &v["rollback"] {
                Value::Null => false,
                b => b.as_bool().ok_or("\"rollback\" must be true or false")?,
            },
        })
    }

    fn json(&self) -> Value {
        json!({
            "config": self.config,
            "batch_percent": self.batch_percent,
            "max_failure_percent": self.max_failure_percent,
            "batch_wait_seconds": self.batch_wait_seconds,
            "rollback": self.rollback,
        })
    }

    fn from_json(v: &Value) -> Spec {
        Spec::parse(v).unwrap_or(Spec {
            config: String::new(),
            batch_percent: 100.0,
            max_failure_percent: 0.0,
            batch_wait_seconds: 0.0,
            rollback: false,
        })
    }
}

/// Per-batch counts.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Disconnected (from every node) or forgotten: not waited for.
    gone: usize,
    pending: usize,
    applying: usize,
    applied: usize,
    failed: usize,
}

impl State {
    /// Starts a rollout of `spec.config`'s held version; the rollout row.
    pub(crate) async fn start_rollout(
        &self,
        spec: Spec,
        actor: &Actor,
    ) -> Result<RolloutRow, (u16, String)> {
        let store = &self.control.store;
        let internal = |e: crate::db::StoreError| (500, e.to_string());
        let config = store
            .config(&spec.config)
            .await
            .map_err(internal)?
            .ok_or((404, format!("no config {}", spec.config)))?;
        if config.latest.version == config.active.version {
            return Err((
                409,
                format!(
                    "config {} has no held version to roll out: PUT it with \"activate\": false",
                    spec.config
                ),
            ));
        }
        let live = store.rollouts().await.map_err(internal)?;
        if let Some(r) = live
            .iter()
            .find(|r| r.config == spec.config && is_live(&r.state))
        {
            return Err((
                409,
                format!("rollout {} of {} is {}", r.id, r.config, r.state),
            ));
        }
        // The targets: every connected agent whose desired config is this one (one that left
        // would keep its batch pending forever; it gets the version when it comes back and
        // the rollout is over, or counts as gone).
        self.flush().await;
        let rows = store.agents().await.map_err(internal)?;
        let mut targets: Vec<String> = Vec::new();
        for row in rows.iter().filter(|r| r.connected) {
            let Some((attrs, _)) = crate::store::Fleet::row_attributes(row) else {
                continue;
            };
            let d = self.control.resolve(&row.uid, &attrs);
            if matches!(d.map(|d| d.source), Some(Source::Named { ref name, .. }) if *name == spec.config)
            {
                targets.push(row.uid.clone());
            }
        }
        targets.sort();
        let batch_size =
            ((targets.len() as f64 * spec.batch_percent / 100.0).ceil() as usize).max(1);
        let progress = json!({ "targets": targets, "batch_size": batch_size, "batches": [] });
        let row = store
            .create_rollout(
                &spec.config,
                config.active.version,
                config.latest.version,
                &spec.json(),
                &progress,
                actor,
            )
            .await
            .map_err(internal)?;
        Ok(row)
    }

    /// The status of `uid` for the config it should run now: counted in a batch. `None` when
    /// the agent is connected nowhere (gone).
    async fn batch_status(
        &self,
        uid: &str,
    ) -> Option<(Option<i32>, Option<Vec<u8>>, Option<bytes::Bytes>)> {
        let parsed = uid.parse::<InstanceUid>().ok()?;
        // Connected here: memory. Elsewhere: the store.
        let (attrs, status) = match self.fleet.connected_status(parsed) {
            Some(status) => (self.fleet.attributes(parsed), status),
            None => {
                let row = self
                    .control
                    .store
                    .agent(uid)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.connected)?;
                let (a, s) = crate::store::Fleet::row_attributes(&row)?;
                (Some(a), s)
            }
        };
        let expected = attrs
            .and_then(|a| self.control.resolve(uid, &a))
            .map(|d| d.remote_config.config_hash);
        Some(match status {
            Some(s) => (
                Some(s.status),
                Some(s.last_remote_config_hash.to_vec()),
                expected,
            ),
            None => (None, None, expected),
        })
    }

    async fn count(&self, agents: &[String]) -> Counts {
        let mut c = Counts::default();
        for uid in agents {
            let Some((status, hash, expected)) = self.batch_status(uid).await else {
                c.gone += 1;
                continue;
            };
            let current = matches!((&hash, &expected), (Some(h), Some(e)) if h[..] == e[..]);
            match status {
                Some(s) if current && s == RemoteConfigStatuses::Applied as i32 => c.applied += 1,
                Some(s) if current && s == RemoteConfigStatuses::Failed as i32 => c.failed += 1,
                Some(s) if current && s == RemoteConfigStatuses::Applying as i32 => c.applying += 1,
                _ => c.pending += 1,
            }
        }
        c
    }

    /// Writes each batch's counts into `progress` (`final`): a rollout that ended shows what
    /// its batches reached then, not what a later change makes of them.
    async fn freeze_counts(&self, progress: &mut Value) {
        let Some(batches) = progress["batches"].as_array().cloned() else {
            return;
        };
        for (i, b) in batches.iter().enumerate() {
            let agents: Vec<String> = uids(&b["agents"]);
            let c = self.count(&agents).await;
            progress["batches"][i]["final"] = json!({
                "pending": c.pending, "applying": c.applying, "applied": c.applied,
                "failed": c.failed, "gone": c.gone,
            });
        }
    }

    /// A rollout with its per-batch counts, for the API.
    pub(crate) async fn rollout_json(&self, r: &RolloutRow) -> Value {
        let mut batches = Vec::new();
        for (i, b) in r.progress["batches"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let agents: Vec<String> = uids(&b["agents"]);
            let c = match &b["final"] {
                Value::Object(f) => {
                    let n = |k: &str| f.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                    Counts {
                        gone: n("gone"),
                        pending: n("pending"),
                        applying: n("applying"),
                        applied: n("applied"),
                        failed: n("failed"),
                    }
                }
                _ => self.count(&agents).await,
            };
            batches.push(json!({
                "index": i,
                "agents": agents,
                "released_unix_ms": b["released_ms"],
                "done_unix_ms": b["done_ms"],
                "pending": c.pending,
                "applying": c.applying,
                "applied": c.applied,
                "failed": c.failed,
                "gone": c.gone,
            }));
        }
        let targets = r.progress["targets"].as_array().map_or(0, Vec::len);
        let released = released(&r.progress).len();
        json!({
            "id": r.id,
            "config": r.config,
            "from_version": r.from_version,
            "to_version": r.to_version,
            "state": r.state,
            "spec": r.spec,
            "targets": targets,
            "released": released,
            "batch_size": r.progress["batch_size"],
            "batches": batches,
            "halted_reason": r.progress["halted_reason"],
            "created_unix_ms": r.created_ms,
            "updated_unix_ms": r.updated_ms,
        })
    }

    /// One step of every live rollout: release, halt or complete. Runs every second.
    pub(crate) async fn drive_rollouts(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let system = Actor {
            who: "rollout".into(),
            address: self.control.node.clone(),
        };
        loop {
            tick.tick().await;
            let Ok(rollouts) = self.control.store.rollouts().await else {
                continue;
            };
            for r in rollouts.into_iter().filter(|r| r.state == "running") {
                if let Err(e) = self.step(r, &system).await {
                    tracing::warn!("rollout step: {e}");
                }
            }
        }
    }

    async fn step(&self, r: RolloutRow, system: &Actor) -> Result<(), crate::db::StoreError> {
        // One node at a time: the lease is renewed at every step (every 500 ms), and another
        // node takes the rollout over 5 s after its driver stopped renewing it.
        let store = &self.control.store;
        if !store
            .claim_rollout(r.id, &self.control.node, now_ms() + 5_000)
            .await?
        {
            return Ok(());
        }
        let spec = Spec::from_json(&r.spec);
        let mut progress = r.progress.clone();
        let targets: Vec<String> = uids(&progress["targets"]);
        let batch_size = progress["batch_size"].as_u64().unwrap_or(1).max(1) as usize;
        let now = now_ms();
        let batches = progress["batches"].as_array().cloned().unwrap_or_default();
        if let Some(last) = batches.last() {
            let agents: Vec<String> = uids(&last["agents"]);
            let c = self.count(&agents).await;
            let failed_pct = 100.0 * c.failed as f64 / agents.len().max(1) as f64;
            // A batch an operator resumed past (after a halt) is not judged again.
            let accepted = last["accepted"] == true;
            if failed_pct > spec.max_failure_percent && !accepted {
                progress["halted_reason"] = json!(format!(
                    "batch {} failed on {} of {} agents ({failed_pct:.1} % > {} %)",
                    batches.len() - 1,
                    c.failed,
                    agents.len(),
                    spec.max_failure_percent
                ));
                let state = if spec.rollback {
                    "rolled_back"
                } else {
                    "halted"
                };
                if state == "rolled_back" {
                    self.freeze_counts(&mut progress).await;
                }
                store
                    .update_rollout(
                        r.id,
                        "running",
                        state,
                        &progress,
                        Some((system, state)),
                        None,
                    )
                    .await?;
                self.on_change(crate::db::Change::Rollout(r.id)).await;
                return Ok(());
            }
            if c.pending + c.applying > 0 {
                return Ok(());
            }
            let done_ms = match last["done_ms"].as_i64() {
                Some(t) => t,
                None => {
                    progress["batches"][batches.len() - 1]["done_ms"] = json!(now);
                    if !store
                        .update_rollout(r.id, "running", "running", &progress, None, None)
                        .await?
                    {
                        return Ok(()); // paused or aborted meanwhile
                    }
                    now
                }
            };
            if (now - done_ms) < (spec.batch_wait_seconds * 1000.0) as i64 {
                return Ok(());
            }
        }
        let released_n: usize = batches
            .iter()
            .map(|b| b["agents"].as_array().map_or(0, Vec::len))
            .sum();
        if released_n >= targets.len() {
            self.freeze_counts(&mut progress).await;
            // Completed and the version active, in one transaction, only if still running.
            store
                .update_rollout(
                    r.id,
                    "running",
                    "completed",
                    &progress,
                    Some((system, "completed")),
                    Some((&r.config, r.from_version, r.to_version)),
                )
                .await?;
            self.on_change(crate::db::Change::Rollout(r.id)).await;
            return Ok(());
        }
        let next: Vec<String> =
            targets[released_n..(released_n + batch_size).min(targets.len())].to_vec();
        let mut list = batches;
        list.push(json!({ "agents": next, "released_ms": now, "done_ms": null }));
        progress["batches"] = Value::Array(list);
        if store
            .update_rollout(r.id, "running", "running", &progress, None, None)
            .await?
        {
            self.on_change(crate::db::Change::Rollout(r.id)).await;
        }
        Ok(())
    }

    /// `pause`, `resume` or `abort` a rollout.
    pub(crate) async fn rollout_action(
        &self,
        id: i64,
        action: &str,
        actor: &Actor,
    ) -> Result<RolloutRow, (u16, String)> {
        let store = &self.control.store;
        let internal = |e: crate::db::StoreError| (500, e.to_string());
        let r = store
            .rollout(id)
            .await
            .map_err(internal)?
            .ok_or((404, format!("no rollout {id}")))?;
        let next = match (action, r.state.as_str()) {
            ("pause", "running") => "paused",
            ("resume", "paused" | "halted") => "running",
            ("abort", "running" | "paused" | "halted") => "aborted",
            ("pause" | "resume" | "abort", state) => {
                return Err((409, format!("rollout {id} is {state}: cannot {action} it")));
            }
            _ => return Err((404, format!("no action {action}: pause, resume or abort"))),
        };
        let mut progress = r.progress.clone();
        if next == "running" {
            progress["halted_reason"] = Value::Null;
            // Resumed after a halt: the operator accepts the failed batch; the next follows.
            if r.state == "halted" {
                if let Some(last) = progress["batches"]
                    .as_array_mut()
                    .and_then(|b| b.last_mut())
                {
                    last["accepted"] = json!(true);
                }
            }
        }
        if next == "aborted" {
            self.freeze_counts(&mut progress).await;
        }
        let moved = store
            .update_rollout(id, &r.state, next, &progress, Some((actor, action)), None)
            .await
            .map_err(internal)?;
        if !moved {
            return Err((
                409,
                format!("rollout {id} changed state meanwhile: try again"),
            ));
        }
        self.on_change(crate::db::Change::Rollout(id)).await;
        store
            .rollout(id)
            .await
            .map_err(internal)?
            .ok_or((404, format!("no rollout {id}")))
    }
}
