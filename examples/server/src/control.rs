//! The control plane: desired state from the store, applied to the agents connected to this
//! node; changes from other nodes (PostgreSQL NOTIFY) applied as they commit; agent records
//! written behind to the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use opamp::proto::{InstanceUid, ServerToAgent};
use opamp::server::SharedMessage;

use crate::State;
use crate::db::{Change, NamedConfig, Override, Store, StoreError};
use crate::desired::{self, Candidate, Rolling};
use crate::store::lock;

/// How often changed agent records are written.
const WRITE_EVERY: Duration = Duration::from_millis(250);
/// Departed agents stay in the store this long.
const DEPARTED_TTL: Duration = Duration::from_secs(3600);

/// The desired state this node holds in memory: every named config (ranked) and override.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) store: Store,
    /// This node's name, stored with each agent it holds.
    pub(crate) node: String,
    candidates: RwLock<Arc<Vec<Candidate>>>,
    overrides: RwLock<HashMap<String, Override>>,
    /// Bumped on every change of desired state: an agent whose offer is older is recomputed.
    epoch: AtomicU64,
    /// `--validate-config`: a shell command that gets a new config version on stdin.
    pub(crate) validator: Option<String>,
    /// At most this many validators run at once (each may take 30 s).
    validators: tokio::sync::Semaphore,
    /// One reload at a time, read and install together: two overlapping reloads could
    /// otherwise install the older snapshot last.
    reload: tokio::sync::Mutex<()>,
    /// One write of agent records at a time: an older batch must not commit after a newer one.
    pub(crate) writing: tokio::sync::Mutex<()>,
}

impl Control {
    pub(crate) async fn new(
        store: Store,
        node: String,
        validator: Option<String>,
    ) -> Result<Self, StoreError> {
        store.release_node(&node).await?;
        let control = Self {
            store,
            node,
            candidates: RwLock::default(),
            overrides: RwLock::default(),
            epoch: AtomicU64::new(1),
            validator,
            validators: tokio::sync::Semaphore::new(4),
            reload: tokio::sync::Mutex::new(()),
            writing: tokio::sync::Mutex::new(()),
        };
        control.reload_configs().await?;
        control.reload_overrides().await?;
        Ok(control)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads every named config and running rollout again.
    pub(crate) async fn reload_configs(&self) -> Result<(), StoreError> {
        let _one = self.reload.lock().await;
        let configs = self.store.configs().await?;
        let rollouts = self.store.rollouts().await?;
        let mut candidates: Vec<Candidate> = configs.into_iter().map(candidate).collect();
        for r in rollouts
            .iter()
            .filter(|r| crate::rollout::is_live(&r.state))
        {
            let Some(c) = candidates.iter_mut().find(|c| c.active.name == r.config) else {
                continue;
            };
            if c.active.version != r.from_version {
                continue;
            }
            let history = self.store.config_history(&r.config).await?;
            let Some(v) = history.into_iter().find(|v| v.version == r.to_version) else {
                continue;
            };
            let released: HashSet<String> = crate::rollout::released(&r.progress);
            let template = desired::Template::parse(&v.body, &v.selector)
                .ok()
                .flatten();
            let config = crate::store::remote_config(
                bytes::Bytes::from(v.body.clone()),
                v.content_type.clone(),
            );
            c.rolling = Some(Rolling {
                version: v,
                template,
                config,
                released,
            });
        }
        desired::rank(&mut candidates);
        *self.candidates.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(candidates);
        self.bump();
        Ok(())
    }

    /// Reads every override again.
    async fn reload_overrides(&self) -> Result<(), StoreError> {
        let _one = self.reload.lock().await;
        let all = self.store.overrides().await?;
        *self.overrides.write().unwrap_or_else(|e| e.into_inner()) =
            all.into_iter().map(|o| (o.uid.clone(), o)).collect();
        self.bump();
        Ok(())
    }

    async fn reload_override(&self, uid: &str) -> Result<(), StoreError> {
        let _one = self.reload.lock().await;
        let o = self.store.override_for(uid).await?;
        let mut map = self.overrides.write().unwrap_or_else(|e| e.into_inner());
        match o {
            Some(o) => map.insert(uid.to_owned(), o),
            None => map.remove(uid),
        };
        drop(map);
        self.bump();
        Ok(())
    }

    /// The desired config of agent `uid` with `attrs`.
    pub(crate) fn resolve(
        &self,
        uid: &str,
        attrs: &desired::Attributes,
    ) -> Option<desired::Desired> {
        let candidates = self
            .candidates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let overrides = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        desired::resolve(uid, attrs, overrides.get(uid), &candidates)
    }

    /// Runs the validator on a new config version (body on stdin, 30 s at most, 4 at once):
    /// `Err` starting with "the validator refused" and its output when it refuses (422 at the
    /// API), another `Err` when it could not run (500).
    pub(crate) async fn validate(
        &self,
        name: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let Some(cmd) = &self.validator else {
            return Ok(());
        };
        let _slot = self
            .validators
            .acquire()
            .await
            .map_err(|_| "the validator queue is closed".to_owned())?;
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .env("OPAMP_CONFIG_NAME", name)
            .env("OPAMP_CONFIG_CONTENT_TYPE", content_type)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("the validator {cmd:?} did not start: {e}"))?;
        let mut stdin = child.stdin.take();
        let body = body.to_vec();
        let feed = async move {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(&body).await;
            }
            drop(stdin);
        };
        // Fed and read at once: a validator that writes before it has read all its input
        // must not block on a full pipe while the body waits to be written.
        let run = async {
            let ((), out) = tokio::join!(feed, child.wait_with_output());
            out
        };
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .map_err(|_| format!("the validator {cmd:?} did not finish within 30 s"))?
            .map_err(|e| format!("the validator {cmd:?}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        if text.len() > 64 * 1024 {
            let mut cut = 64 * 1024;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        Err(format!(
            "the validator refused the config ({}): {}",
            out.status,
            text.trim_end()
        ))
    }
}

fn candidate(c: NamedConfig) -> Candidate {
    Candidate::new(c.active)
}

impl State {
    /// Recomputes the desired config of `uid` when its offer is older than the desired state
    /// (or `force`, after its description changed); whether it did (the reply the caller had
    /// computed may then be stale).
    pub(crate) fn refresh_offer(&self, uid: InstanceUid, force: bool) -> bool {
        let epoch = self.control.epoch();
        if !force && self.fleet.offer_epoch(uid) >= epoch {
            return false;
        }
        let Some(attrs) = self.fleet.attributes(uid) else {
            return false;
        };
        let d = self.control.resolve(&uid.to_string(), &attrs);
        let _ = self.fleet.set_desired(uid, epoch, d);
        true
    }

    /// Recomputes every connected agent's desired config after a change and pushes what
    /// changed; identical configs are encoded once. Returns the agents pushed to.
    pub(crate) fn apply_desired(&self) -> Vec<InstanceUid> {
        let epoch = self.control.epoch();
        let mut shared: HashMap<bytes::Bytes, SharedMessage> = HashMap::new();
        let mut pushed = Vec::new();
        for (uid, attrs) in self.fleet.stale(epoch) {
            let d = self.control.resolve(&uid.to_string(), &attrs);
            if let Some(config) = self.fleet.set_desired(uid, epoch, d) {
                let msg = shared.entry(config.config_hash.clone()).or_insert_with(|| {
                    SharedMessage::new(ServerToAgent {
                        remote_config: Some(config),
                        ..Default::default()
                    })
                });
                self.push_shared(uid, msg);
                pushed.push(uid);
            }
        }
        pushed
    }

    /// Applies a change (made here, or committed by another node) to the local agents.
    pub(crate) async fn on_change(&self, change: Change) {
        let result = match &change {
            // `""`: notifications may have been missed (the listener reconnected): everything.
            Change::Config(name) if name.is_empty() => {
                let result = match self.control.reload_configs().await {
                    Ok(()) => self.control.reload_overrides().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = self.load_packages().await {
                    tracing::warn!("reloading the package repository: {e}");
                }
                result
            }
            Change::Config(_) | Change::Rollout(_) => self.control.reload_configs().await,
            Change::Override(uid) => self.control.reload_override(uid).await,
            Change::Package(key) => {
                if let Some((name, version)) = key.split_once('/') {
                    self.load_package(name, version).await;
                }
                return;
            }
            Change::PackageSet(name) => {
                match self.control.store.package_set(name).await {
                    Ok(Some(row)) => {
                        let selector = row.selector.clone();
                        let set = crate::packages::PackageSet {
                            selector: row.selector,
                            packages: row.packages,
                        };
                        // Its packages may have been uploaded through another node.
                        for (p, v) in &set.packages {
                            self.load_package(p, v).await;
                        }
                        if self.packages.set(name).as_ref() != Some(&set) {
                            if let Err(e) = self.packages.put_set(name, set) {
                                tracing::warn!(name, "package set from another node: {e:?}");
                            }
                            self.push_packages(&selector);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(name, "reading a package set: {e}"),
                }
                return;
            }
            Change::Restart(uid) => {
                if let Ok(uid) = uid.parse::<InstanceUid>() {
                    if lock(&self.connections).contains_key(&uid) {
                        if let Err(e) = self.restart(uid) {
                            tracing::warn!(%uid, "restart from another node: {e}");
                        }
                    }
                }
                return;
            }
        };
        match result {
            Ok(()) => {
                self.apply_desired();
            }
            Err(e) => tracing::warn!(?change, "reloading desired state: {e}"),
        }
    }

    /// Takes a package version stored by another node into this node's repository.
    pub(crate) async fn load_package(&self, name: &str, version: &str) {
        if self.packages.contains(name, version) {
            return;
        }
        match self.control.store.package(name, version).await {
            Ok(Some(row)) => {
                let signature = row.signature.map(bytes::Bytes::from);
                if let Err(e) =
                    self.packages
                        .put(name, version, bytes::Bytes::from(row.content), signature)
                {
                    tracing::warn!(name, version, "a stored package does not fit: {e:?}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(name, version, "reading a package: {e}"),
        }
    }

    /// Loads the stored package repository (at start).
    pub(crate) async fn load_packages(&self) -> Result<(), StoreError> {
        for row in self.control.store.packages().await? {
            let signature = row.signature.map(bytes::Bytes::from);
            if let Err(e) = self.packages.put(
                &row.name,
                &row.version,
                bytes::Bytes::from(row.content),
                signature,
            ) {
                tracing::warn!(
                    name = row.name,
                    version = row.version,
                    "a stored package does not fit: {e:?}"
                );
            }
        }
        for row in self.control.store.package_sets().await? {
            let set = crate::packages::PackageSet {
                selector: row.selector,
                packages: row.packages,
            };
            if let Err(e) = self.packages.put_set(&row.name, set) {
                tracing::warn!(name = row.name, "a stored package set does not fit: {e:?}");
            }
        }
        Ok(())
    }

    /// The agent listing: agents connected here from memory, every other from the store;
    /// slim (no bodies), by uid.
    pub(crate) async fn list_agents(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let local = self.fleet.connected_json(&self.control.node);
        let local_uids: HashSet<String> = local.keys().cloned().collect();
        let rows = self.control.store.agents().await?;
        let mut all: BTreeMap<String, serde_json::Value> = local;
        for row in rows.iter().filter(|r| !local_uids.contains(&r.uid)) {
            // A record in memory that has left (it may reconnect here) is as fresh as its row.
            if let Some(v) = self.fleet.row_json(row, false) {
                all.insert(row.uid.clone(), v);
            }
        }
        Ok(all.into_values().collect())
    }

    /// One agent in full: from memory when it is connected here, else from the store.
    pub(crate) async fn agent(
        &self,
        uid: InstanceUid,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        if let Some(v) = self.fleet.connected_agent_json(uid, &self.control.node) {
            return Ok(Some(v));
        }
        let Some(row) = self.control.store.agent(&uid.to_string()).await? else {
            return Ok(self.fleet.agent_json(uid));
        };
        Ok(self.fleet.row_json(&row, true))
    }

    /// Takes back the drift baselines of reconnecting agents from the store, off their
    /// admission path and in batches (one query for up to 500 agents): a new connection is
    /// answered without waiting for the database.
    pub(crate) async fn restore_baselines(
        self: Arc<Self>,
        mut uids: tokio::sync::mpsc::Receiver<InstanceUid>,
    ) {
        const BATCH: usize = 500;
        while let Some(first) = uids.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match uids.try_recv() {
                    Ok(uid) => batch.push(uid),
                    Err(_) => break,
                }
            }
            let keys: Vec<String> = batch.iter().map(ToString::to_string).collect();
            match self.control.store.agents_in(&keys).await {
                Ok(rows) => {
                    for row in rows {
                        if let Ok(uid) = row.uid.parse::<InstanceUid>() {
                            self.fleet.restore_baseline(uid, &row);
                        }
                    }
                }
                Err(e) => tracing::warn!("reading {} saved agent records: {e}", batch.len()),
            }
        }
    }

    /// Writes changed agent records every 250 ms; forgets departed ones after an hour.
    pub(crate) async fn write_behind(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WRITE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            self.flush().await;
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = tokio::time::Instant::now();
                let before = crate::db::now_ms() - DEPARTED_TTL.as_millis() as i64;
                if let Err(e) = self.control.store.forget_agents(before).await {
                    tracing::warn!("forgetting departed agents: {e}");
                }
            }
        }
    }

    /// Writes the changed agent records now.
    pub(crate) async fn flush(&self) {
        let _one = self.control.writing.lock().await;
        let rows = self.fleet.take_dirty(&self.control.node);
        if rows.is_empty() {
            return;
        }
        let uids: Vec<InstanceUid> = rows.iter().filter_map(|r| r.uid.parse().ok()).collect();
        if let Err(e) = self.control.store.save_agents(rows).await {
            tracing::warn!("writing {} agent records: {e}", uids.len());
            self.fleet.mark_dirty(uids);
        }
    }

    /// Applies what other nodes commit, as it arrives.
    pub(crate) async fn follow(self: Arc<Self>) {
        let Some(mut changes) = self.control.store.listen().await else {
            return;
        };
        while let Some(first) = changes.recv().await {
            // What arrived meanwhile, each change once (a burst of NOTIFYs is one reload).
            let mut batch = vec![first];
            while let Ok(more) = changes.try_recv() {
                if !batch.contains(&more) {
                    batch.push(more);
                }
            }
            for change in batch {
                self.on_change(change).await;
            }
        }
    }
}
