//! The reference server's durable store: one interface ([`Store`]) over two SQL backends,
//! SQLite (one file, the default) and PostgreSQL (several server nodes on one database).
//!
//! The store's logic (schema, migrations, every query) is written once, against [`Backend`]:
//! a transaction of statements with `$N` parameters and rows of [`Val`]. A backend only runs
//! statements (SQLite rewrites `$N` to its own `?N`) and, for PostgreSQL, carries change
//! notifications between nodes (`LISTEN`/`NOTIFY`, see [`Change`]).
//!
//! What the API acknowledges (configs, overrides, rollouts, the audit log) is committed before
//! the answer goes out: SQLite runs in WAL mode with `synchronous=FULL`, PostgreSQL commits
//! durably by default. Agent records are written behind, in batches (see `crate::control`):
//! an agent re-reports its state when it reconnects (SEQ-2).

mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use opamp::async_trait;
use serde_json::Value;
use tokio::sync::mpsc;

/// One SQL value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Val {
    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Val::Text(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn blob(&self) -> Option<&[u8]> {
        match self {
            Val::Blob(b) => Some(b),
            _ => None,
        }
    }

    fn opt_text(s: Option<&str>) -> Val {
        s.map_or(Val::Null, |s| Val::Text(s.to_owned()))
    }

    fn opt_blob(b: Option<&[u8]>) -> Val {
        b.map_or(Val::Null, |b| Val::Blob(b.to_vec()))
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Self {
        Val::Text(s.to_owned())
    }
}

impl From<String> for Val {
    fn from(s: String) -> Self {
        Val::Text(s)
    }
}

impl From<i64> for Val {
    fn from(i: i64) -> Self {
        Val::Int(i)
    }
}

impl From<Vec<u8>> for Val {
    fn from(b: Vec<u8>) -> Self {
        Val::Blob(b)
    }
}

pub(crate) type Row = Vec<Val>;

/// One statement: SQL with `$1`, `$2`, ... and its parameters. The SQL is usually a
/// constant, shared by every statement of a batch (thousands of agent rows in one write).
#[derive(Debug, Clone)]
pub(crate) struct Stmt {
    pub(crate) sql: std::borrow::Cow<'static, str>,
    pub(crate) params: Vec<Val>,
}

fn stmt(sql: impl Into<std::borrow::Cow<'static, str>>, params: Vec<Val>) -> Stmt {
    Stmt {
        sql: sql.into(),
        params,
    }
}

/// Why a store operation failed.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// The database refused or could not be reached; the message says why.
    Db(String),
    /// Another writer changed the same row at the same time; the caller may retry.
    Conflict(String),
    /// What the database holds is not what this program wrote (a newer schema, say).
    Corrupt(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Db(m) => write!(f, "database error: {m}"),
            StoreError::Conflict(m) => write!(f, "concurrent update: {m}"),
            StoreError::Corrupt(m) => write!(f, "unexpected database content: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

/// The SQL flavour: the few places where the two databases differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A database connection the store runs its statements on.
#[async_trait]
pub(crate) trait Backend: Send + Sync + fmt::Debug + 'static {
    fn dialect(&self) -> Dialect;

    /// Runs `stmts` in one transaction, committed before this returns; the rows each
    /// statement returned, in order. Nothing is applied if one fails.
    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Vec<Row>>>;

    /// Changes made through other server processes on the same database, as they commit
    /// (`None` when only this process uses the database, as with SQLite).
    async fn listen(&self) -> Option<mpsc::Receiver<Change>>;
}

/// A change one node tells the others about (PostgreSQL `NOTIFY` on channel `opamp`, sent
/// in the transaction that makes the change, so delivered exactly when it commits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A named config was created, changed or deleted.
    Config(String),
    /// An agent's own config (override) was set or removed.
    Override(String),
    /// A rollout changed state or moved to its next batch.
    Rollout(i64),
    /// The Restart command for an agent, to the node it is connected to.
    Restart(String),
    /// A package version was uploaded (`NAME/VERSION`).
    Package(String),
    /// A package set was created or changed.
    PackageSet(String),
}

impl Change {
    fn payload(&self) -> String {
        match self {
            Change::Config(n) => format!("config:{n}"),
            Change::Override(u) => format!("override:{u}"),
            Change::Rollout(id) => format!("rollout:{id}"),
            Change::Restart(u) => format!("restart:{u}"),
            Change::Package(p) => format!("package:{p}"),
            Change::PackageSet(n) => format!("package-set:{n}"),
        }
    }

    pub(crate) fn parse(payload: &str) -> Option<Change> {
        let (kind, rest) = payload.split_once(':')?;
        Some(match kind {
            "config" => Change::Config(rest.to_owned()),
            "override" => Change::Override(rest.to_owned()),
            "rollout" => Change::Rollout(rest.parse().ok()?),
            "restart" => Change::Restart(rest.to_owned()),
            "package" => Change::Package(rest.to_owned()),
            "package-set" => Change::PackageSet(rest.to_owned()),
            _ => return None,
        })
    }
}

/// The schema, one migration per version, applied in order and recorded in `opamp_schema`.
/// `{blob}` and `{serial}` are the two types the dialects spell differently.
const MIGRATIONS: &[&str] = &[
    // 1: agents, named configs with their history, per-agent overrides, the audit log.
    "CREATE TABLE agents (
        uid TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        connected BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        transport TEXT,
        remote_addr TEXT,
        state {blob} NOT NULL,
        applied_config_hash {blob},
        applied_effective_hash {blob}
    );
    CREATE INDEX agents_node ON agents (node, connected);
    CREATE TABLE config_versions (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        selector TEXT NOT NULL,
        priority BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        body {blob} NOT NULL,
        created_ms BIGINT NOT NULL,
        author TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE configs (
        name TEXT PRIMARY KEY,
        version BIGINT NOT NULL,
        active_version BIGINT NOT NULL
    );
    CREATE TABLE overrides (
        uid TEXT PRIMARY KEY,
        content_type TEXT NOT NULL,
        body {blob} NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE TABLE audit (
        id {serial},
        at_ms BIGINT NOT NULL,
        who TEXT NOT NULL,
        address TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    )",
    // 2: staged rollouts.
    "CREATE TABLE rollouts (
        id {serial},
        config TEXT NOT NULL,
        from_version BIGINT NOT NULL,
        to_version BIGINT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        progress TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
    // 3: the package repository, and settings the nodes share (the generated signing key).
    "CREATE TABLE packages (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        content {blob} NOT NULL,
        signature {blob},
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE package_sets (
        name TEXT PRIMARY KEY,
        selector TEXT NOT NULL,
        packages TEXT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value {blob} NOT NULL
    )",
    // 4: one node drives a rollout at a time, under a lease another node takes over when it
    // runs out (the driving node died).
    "ALTER TABLE rollouts ADD COLUMN driver TEXT;
    ALTER TABLE rollouts ADD COLUMN lease_until_ms BIGINT NOT NULL DEFAULT 0",
    // 5: at most one live rollout per config, whichever node starts it.
    "CREATE UNIQUE INDEX rollouts_live ON rollouts (config) \
     WHERE state IN ('running', 'paused', 'halted')",
    // 6: what the node holding an agent knows of it beyond its reports (desired config, drift,
    // the offered hash), so that every node's API shows it.
    "ALTER TABLE agents ADD COLUMN view TEXT",
];

fn dialect_sql(sql: &str, d: Dialect) -> String {
    let (blob, serial) = match d {
        Dialect::Sqlite => ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        Dialect::Postgres => ("BYTEA", "BIGSERIAL PRIMARY KEY"),
    };
    sql.replace("{blob}", blob).replace("{serial}", serial)
}

/// Who made a change through the API, for the audit log.
#[derive(Debug, Clone)]
pub(crate) struct Actor {
    pub(crate) who: String,
    pub(crate) address: String,
}

/// A new version of a named config, as the API takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewVersion<'a> {
    /// Every pair must equal one of the agent's attributes.
    pub(crate) selector: &'a BTreeMap<String, String>,
    pub(crate) priority: i64,
    pub(crate) content_type: &'a str,
    pub(crate) body: &'a [u8],
    /// Give it to agents now (`false`: held for a staged rollout).
    pub(crate) activate: bool,
}

/// One version of a named config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConfigVersion {
    pub(crate) name: String,
    pub(crate) version: i64,
    /// Every pair must equal one of the agent's attributes (identifying or not).
    pub(crate) selector: BTreeMap<String, String>,
    pub(crate) priority: i64,
    pub(crate) content_type: String,
    pub(crate) body: Vec<u8>,
    pub(crate) created_ms: i64,
    pub(crate) author: String,
}

/// A named config as it stands: its latest version and the version agents are given
/// (`active`; older than `latest` while a staged rollout is under way or held).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NamedConfig {
    pub(crate) latest: ConfigVersion,
    pub(crate) active: ConfigVersion,
}

/// One agent's own config, above any named config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Override {
    pub(crate) uid: String,
    pub(crate) content_type: String,
    pub(crate) body: Vec<u8>,
    pub(crate) updated_ms: i64,
}

/// What the store keeps of an agent (see `crate::store::Fleet::saved`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AgentRow {
    pub(crate) uid: String,
    pub(crate) node: String,
    pub(crate) connected: bool,
    pub(crate) last_seen_ms: i64,
    pub(crate) transport: Option<String>,
    pub(crate) remote_addr: Option<String>,
    /// The agent's latest report of every part, as one encoded `AgentToServer`.
    pub(crate) state: Vec<u8>,
    /// The drift baseline: the config hash the agent last reported APPLIED for, and the hash
    /// of the effective config it reported with it.
    pub(crate) applied_config_hash: Option<Vec<u8>>,
    pub(crate) applied_effective_hash: Option<Vec<u8>>,
    /// JSON written by the node holding the agent: `desired_config`, `drift`, `remote_config`
    /// (its offered hash), for the API of every node.
    pub(crate) view: Option<String>,
}

/// One audit log entry.
#[derive(Debug, Clone)]
pub(crate) struct AuditEntry {
    pub(crate) id: i64,
    pub(crate) at_ms: i64,
    pub(crate) who: String,
    pub(crate) address: String,
    pub(crate) action: String,
    pub(crate) target: String,
    pub(crate) detail: String,
}

/// A rollout as stored: its spec and progress are JSON documents owned by `crate::rollout`.
#[derive(Debug, Clone)]
pub(crate) struct RolloutRow {
    pub(crate) id: i64,
    pub(crate) config: String,
    pub(crate) from_version: i64,
    pub(crate) to_version: i64,
    pub(crate) spec: Value,
    pub(crate) state: String,
    pub(crate) progress: Value,
    pub(crate) created_ms: i64,
    pub(crate) updated_ms: i64,
}

/// The durable store.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: Arc<dyn Backend>,
    /// Where it is, without a password, for logs.
    pub(crate) description: String,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const CONFIG_COLUMNS: &str =
    "name, version, selector, priority, content_type, body, created_ms, author";

fn config_version(row: &Row) -> Result<ConfigVersion> {
    let bad = || StoreError::Corrupt("a config_versions row".into());
    let selector: BTreeMap<String, String> =
        serde_json::from_str(row[2].text().ok_or_else(bad)?).map_err(|_| bad())?;
    Ok(ConfigVersion {
        name: row[0].text().ok_or_else(bad)?.to_owned(),
        version: row[1].int().ok_or_else(bad)?,
        selector,
        priority: row[3].int().ok_or_else(bad)?,
        content_type: row[4].text().ok_or_else(bad)?.to_owned(),
        body: row[5].blob().ok_or_else(bad)?.to_vec(),
        created_ms: row[6].int().ok_or_else(bad)?,
        author: row[7].text().ok_or_else(bad)?.to_owned(),
    })
}

impl Store {
    /// Opens the database at `url` (`sqlite://PATH` or `postgres://...`), creating the SQLite
    /// file and the schema on first use and applying newer migrations.
    pub(crate) async fn open(url: &str) -> Result<Store> {
        let (db, description): (Arc<dyn Backend>, String) =
            if let Some(path) = url.strip_prefix("sqlite://") {
                (
                    Arc::new(sqlite::Sqlite::open(path).await?),
                    format!("sqlite://{path}"),
                )
            } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                let shown = redact(url);
                (Arc::new(postgres::Postgres::connect(url).await?), shown)
            } else {
                return Err(StoreError::Db(format!(
                    "--database {}: expected sqlite://PATH or postgres://USER@HOST/DB",
                    redact(url)
                )));
            };
        let store = Store { db, description };
        store.migrate().await?;
        Ok(store)
    }

    pub(crate) fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    async fn tx(&self, stmts: Vec<Stmt>) -> Result<Vec<Vec<Row>>> {
        self.db.transaction(stmts).await
    }

    async fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Row>> {
        let mut rows = self.tx(vec![stmt(sql.to_owned(), params)]).await?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Applies the migrations the database has not seen. Two nodes starting at once on one
    /// PostgreSQL database: the second one's transaction fails on the first one's tables and
    /// it tries again, then finds them applied.
    async fn migrate(&self) -> Result<()> {
        let d = self.dialect();
        let mut attempts: u64 = 0;
        loop {
            attempts += 1;
            match self.migrate_once(d).await {
                // Several nodes starting at once: the losers retry (10 times, up to 1 s
                // apart, enough for the winner's few DDL transactions).
                Err(StoreError::Conflict(_) | StoreError::Db(_)) if attempts < 10 => {
                    let pause = 100 * attempts.min(10);
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                other => return other,
            }
        }
    }

    async fn migrate_once(&self, d: Dialect) -> Result<()> {
        self.tx(vec![stmt(
            "CREATE TABLE IF NOT EXISTS opamp_schema (version BIGINT NOT NULL)",
            vec![],
        )])
        .await?;
        let rows = self
            .query("SELECT MAX(version) FROM opamp_schema", vec![])
            .await?;
        let have = rows.first().and_then(|r| r[0].int()).unwrap_or(0) as usize;
        if have > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "the database has schema version {have}; this server knows {} (a newer \
                 server wrote it)",
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(have) {
            let version = (i + 1) as i64;
            let mut stmts: Vec<Stmt> = dialect_sql(m, d)
                .split(';')
                .filter(|s| !s.trim().is_empty())
                .map(|s| stmt(s.trim().to_owned(), vec![]))
                .collect();
            stmts.push(stmt(
                "INSERT INTO opamp_schema (version) VALUES ($1)",
                vec![Val::Int(version)],
            ));
            self.tx(stmts).await?;
            tracing::info!(version, "database schema migrated");
        }
        Ok(())
    }

    /// The schema version the database is at.
    pub(crate) async fn schema_version(&self) -> Result<i64> {
        let rows = self
            .query("SELECT MAX(version) FROM opamp_schema", vec![])
            .await?;
        Ok(rows.first().and_then(|r| r[0].int()).unwrap_or(0))
    }

    /// Changes committed by other nodes (PostgreSQL only).
    pub(crate) async fn listen(&self) -> Option<mpsc::Receiver<Change>> {
        self.db.listen().await
    }

    fn notify(&self, change: &Change) -> Option<Stmt> {
        (self.dialect() == Dialect::Postgres).then(|| {
            stmt(
                "SELECT pg_notify('opamp', $1)",
                vec![Val::Text(change.payload())],
            )
        })
    }

    fn audit(actor: &Actor, action: &str, target: &str, detail: &str) -> Stmt {
        stmt(
            "INSERT INTO audit (at_ms, who, address, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            vec![
                Val::Int(now_ms()),
                actor.who.as_str().into(),
                actor.address.as_str().into(),
                action.into(),
                target.into(),
                detail.into(),
            ],
        )
    }

    /// Stores a new version of config `name` (the next number, from 1), audited. With
    /// `activate` agents get it now; without, the version is held for a staged rollout
    /// (agents keep the active version until the rollout gives it to them).
    pub(crate) async fn put_config(
        &self,
        name: &str,
        new: &NewVersion<'_>,
        actor: &Actor,
    ) -> Result<NamedConfig> {
        let NewVersion {
            selector,
            priority,
            content_type,
            body,
            activate,
        } = *new;
        let selector_json = serde_json::to_string(selector).unwrap_or_else(|_| "{}".into());
        let mut stmts = vec![
            stmt(
                format!(
                    "INSERT INTO config_versions ({CONFIG_COLUMNS}) \
                     SELECT $1, COALESCE(MAX(version), 0) + 1, $2, CAST($3 AS BIGINT), $4, $5, \
                     CAST($6 AS BIGINT), $7 FROM config_versions WHERE name = $1 \
                     RETURNING version"
                ),
                vec![
                    name.into(),
                    selector_json.into(),
                    Val::Int(priority),
                    content_type.into(),
                    Val::Blob(body.to_vec()),
                    Val::Int(now_ms()),
                    actor.who.as_str().into(),
                ],
            ),
            // A config that does not exist yet starts with its first version active even when
            // held: there is nothing older to keep.
            stmt(
                "INSERT INTO configs (name, version, active_version) \
                 SELECT $1, MAX(version), MAX(version) FROM config_versions WHERE name = $1 \
                 ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, \
                 active_version = CASE WHEN CAST($2 AS BIGINT) = 1 THEN EXCLUDED.version \
                 ELSE configs.active_version END",
                vec![name.into(), Val::Int(i64::from(activate))],
            ),
            Self::audit(
                actor,
                "put_config",
                name,
                &format!(
                    "{} bytes of {content_type}, priority {priority}, selector {}{}",
                    body.len(),
                    serde_json::to_string(selector).unwrap_or_default(),
                    if activate { "" } else { ", held for a rollout" }
                ),
            ),
        ];
        stmts.extend(self.notify(&Change::Config(name.to_owned())));
        self.tx(stmts).await.map_err(|e| match e {
            StoreError::Db(m) if m.contains("UNIQUE") || m.contains("duplicate key") => {
                StoreError::Conflict(format!("config {name} was changed at the same time"))
            }
            other => other,
        })?;
        self.config(name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("config {name} vanished after PUT")))
    }

    /// Makes `version` the active version of `name` (tests; a rollout's end activates its
    /// version in `update_rollout`, guarded).
    #[cfg(test)]
    pub(crate) async fn activate(&self, name: &str, version: i64, actor: &Actor) -> Result<()> {
        let mut stmts = vec![
            stmt(
                "UPDATE configs SET active_version = $2 WHERE name = $1",
                vec![name.into(), Val::Int(version)],
            ),
            Self::audit(
                actor,
                "activate_config",
                name,
                &format!("version {version}"),
            ),
        ];
        stmts.extend(self.notify(&Change::Config(name.to_owned())));
        self.tx(stmts).await?;
        Ok(())
    }

    /// Deletes config `name` (its history stays); whether it existed.
    pub(crate) async fn delete_config(&self, name: &str, actor: &Actor) -> Result<bool> {
        let existed = !self
            .query(
                "SELECT name FROM configs WHERE name = $1",
                vec![name.into()],
            )
            .await?
            .is_empty();
        if !existed {
            return Ok(false);
        }
        let mut stmts = vec![
            stmt("DELETE FROM configs WHERE name = $1", vec![name.into()]),
            Self::audit(actor, "delete_config", name, ""),
        ];
        stmts.extend(self.notify(&Change::Config(name.to_owned())));
        self.tx(stmts).await?;
        Ok(true)
    }

    async fn version_of(&self, name: &str, version: i64) -> Result<Option<ConfigVersion>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {CONFIG_COLUMNS} FROM config_versions WHERE name = $1 AND version = $2"
                ),
                vec![name.into(), Val::Int(version)],
            )
            .await?;
        rows.first().map(config_version).transpose()
    }

    /// Config `name` as it stands, `None` if it does not exist (or was deleted).
    pub(crate) async fn config(&self, name: &str) -> Result<Option<NamedConfig>> {
        let rows = self
            .query(
                "SELECT version, active_version FROM configs WHERE name = $1",
                vec![name.into()],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let bad = || StoreError::Corrupt(format!("configs row {name}"));
        let (latest, active) = (row[0].int().ok_or_else(bad)?, row[1].int().ok_or_else(bad)?);
        let latest = self.version_of(name, latest).await?.ok_or_else(bad)?;
        let active = self.version_of(name, active).await?.ok_or_else(bad)?;
        Ok(Some(NamedConfig { latest, active }))
    }

    /// Every config as it stands, by name.
    pub(crate) async fn configs(&self) -> Result<Vec<NamedConfig>> {
        let rows = self
            .query(
                "SELECT v.name, v.version, v.selector, v.priority, v.content_type, v.body, \
                 v.created_ms, v.author, c.version = v.version, c.active_version = v.version \
                 FROM configs c JOIN config_versions v ON v.name = c.name \
                 AND (v.version = c.version OR v.version = c.active_version) ORDER BY v.name",
                vec![],
            )
            .await?;
        let mut out: Vec<NamedConfig> = Vec::new();
        let mut latest: Option<ConfigVersion> = None;
        let mut active: Option<ConfigVersion> = None;
        let flag = |v: &Val| matches!(v, Val::Int(1)) || matches!(v, Val::Text(t) if t == "t");
        for row in &rows {
            let v = config_version(row)?;
            if latest
                .as_ref()
                .or(active.as_ref())
                .is_some_and(|x| x.name != v.name)
            {
                if let (Some(l), Some(a)) = (latest.take(), active.take()) {
                    out.push(NamedConfig {
                        latest: l,
                        active: a,
                    });
                }
            }
            if flag(&row[8]) {
                latest = Some(v.clone());
            }
            if flag(&row[9]) {
                active = Some(v);
            }
        }
        if let (Some(l), Some(a)) = (latest, active) {
            out.push(NamedConfig {
                latest: l,
                active: a,
            });
        }
        Ok(out)
    }

    /// Every version of `name`, oldest first (also of a deleted config).
    pub(crate) async fn config_history(&self, name: &str) -> Result<Vec<ConfigVersion>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {CONFIG_COLUMNS} FROM config_versions WHERE name = $1 ORDER BY version"
                ),
                vec![name.into()],
            )
            .await?;
        rows.iter().map(config_version).collect()
    }

    /// Sets agent `uid`'s own config, audited.
    pub(crate) async fn put_override(
        &self,
        uid: &str,
        content_type: &str,
        body: &[u8],
        actor: &Actor,
    ) -> Result<()> {
        let mut stmts = vec![
            stmt(
                "INSERT INTO overrides (uid, content_type, body, updated_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (uid) DO UPDATE SET content_type = EXCLUDED.content_type, \
                 body = EXCLUDED.body, updated_ms = EXCLUDED.updated_ms",
                vec![
                    uid.into(),
                    content_type.into(),
                    Val::Blob(body.to_vec()),
                    Val::Int(now_ms()),
                ],
            ),
            Self::audit(
                actor,
                "put_agent_config",
                uid,
                &format!("{} bytes of {content_type}", body.len()),
            ),
        ];
        stmts.extend(self.notify(&Change::Override(uid.to_owned())));
        self.tx(stmts).await?;
        Ok(())
    }

    /// Removes agent `uid`'s own config; whether it had one.
    pub(crate) async fn delete_override(&self, uid: &str, actor: &Actor) -> Result<bool> {
        let had = !self
            .query("SELECT uid FROM overrides WHERE uid = $1", vec![uid.into()])
            .await?
            .is_empty();
        if had {
            let mut stmts = vec![
                stmt("DELETE FROM overrides WHERE uid = $1", vec![uid.into()]),
                Self::audit(actor, "delete_agent_config", uid, ""),
            ];
            stmts.extend(self.notify(&Change::Override(uid.to_owned())));
            self.tx(stmts).await?;
        }
        Ok(had)
    }

    fn override_row(row: &Row) -> Result<Override> {
        let bad = || StoreError::Corrupt("an overrides row".into());
        Ok(Override {
            uid: row[0].text().ok_or_else(bad)?.to_owned(),
            content_type: row[1].text().ok_or_else(bad)?.to_owned(),
            body: row[2].blob().ok_or_else(bad)?.to_vec(),
            updated_ms: row[3].int().ok_or_else(bad)?,
        })
    }

    pub(crate) async fn override_for(&self, uid: &str) -> Result<Option<Override>> {
        let rows = self
            .query(
                "SELECT uid, content_type, body, updated_ms FROM overrides WHERE uid = $1",
                vec![uid.into()],
            )
            .await?;
        rows.first().map(Self::override_row).transpose()
    }

    pub(crate) async fn overrides(&self) -> Result<Vec<Override>> {
        let rows = self
            .query(
                "SELECT uid, content_type, body, updated_ms FROM overrides ORDER BY uid",
                vec![],
            )
            .await?;
        rows.iter().map(Self::override_row).collect()
    }

    /// Writes agent records (insert or replace), in one transaction.
    pub(crate) async fn save_agents(&self, rows: Vec<AgentRow>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let stmts = rows
            .into_iter()
            .map(|r| {
                stmt(
                    "INSERT INTO agents (uid, node, connected, last_seen_ms, transport, remote_addr, \
                     state, applied_config_hash, applied_effective_hash, view) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (uid) DO UPDATE SET node = EXCLUDED.node, \
                     connected = EXCLUDED.connected, last_seen_ms = EXCLUDED.last_seen_ms, \
                     transport = EXCLUDED.transport, remote_addr = EXCLUDED.remote_addr, \
                     state = EXCLUDED.state, applied_config_hash = EXCLUDED.applied_config_hash, \
                     applied_effective_hash = EXCLUDED.applied_effective_hash, \
                     view = EXCLUDED.view \
                     WHERE EXCLUDED.connected = 1 OR agents.node = EXCLUDED.node",
                    vec![
                        r.uid.into(),
                        r.node.into(),
                        Val::Int(i64::from(r.connected)),
                        Val::Int(r.last_seen_ms),
                        Val::opt_text(r.transport.as_deref()),
                        Val::opt_text(r.remote_addr.as_deref()),
                        Val::Blob(r.state),
                        Val::opt_blob(r.applied_config_hash.as_deref()),
                        Val::opt_blob(r.applied_effective_hash.as_deref()),
                        Val::opt_text(r.view.as_deref()),
                    ],
                )
            })
            .collect();
        self.tx(stmts).await?;
        Ok(())
    }

    /// Marks every agent this node held disconnected (at start: a node that died left them
    /// marked connected).
    pub(crate) async fn release_node(&self, node: &str) -> Result<()> {
        // SQLite serves one process: every agent it shows connected was this one's.
        let stmt = match self.dialect() {
            Dialect::Sqlite => stmt(
                "UPDATE agents SET connected = 0 WHERE connected = 1",
                vec![],
            ),
            Dialect::Postgres => stmt(
                "UPDATE agents SET connected = 0 WHERE node = $1 AND connected = 1",
                vec![node.into()],
            ),
        };
        self.tx(vec![stmt]).await?;
        Ok(())
    }

    fn agent_row(row: &Row) -> Result<AgentRow> {
        let bad = || StoreError::Corrupt("an agents row".into());
        Ok(AgentRow {
            uid: row[0].text().ok_or_else(bad)?.to_owned(),
            node: row[1].text().ok_or_else(bad)?.to_owned(),
            connected: row[2].int().ok_or_else(bad)? != 0,
            last_seen_ms: row[3].int().ok_or_else(bad)?,
            transport: row[4].text().map(str::to_owned),
            remote_addr: row[5].text().map(str::to_owned),
            state: row[6].blob().ok_or_else(bad)?.to_vec(),
            applied_config_hash: row[7].blob().map(<[u8]>::to_vec),
            applied_effective_hash: row[8].blob().map(<[u8]>::to_vec),
            view: row[9].text().map(str::to_owned),
        })
    }

    const AGENT_COLUMNS: &str = "uid, node, connected, last_seen_ms, transport, remote_addr, \
                                 state, applied_config_hash, applied_effective_hash, view";

    /// One agent's record.
    pub(crate) async fn agent(&self, uid: &str) -> Result<Option<AgentRow>> {
        let rows = self
            .query(
                &format!("SELECT {} FROM agents WHERE uid = $1", Self::AGENT_COLUMNS),
                vec![uid.into()],
            )
            .await?;
        rows.first().map(Self::agent_row).transpose()
    }

    /// The records of `uids` that exist (one query for a batch of reconnecting agents).
    pub(crate) async fn agents_in(&self, uids: &[String]) -> Result<Vec<AgentRow>> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=uids.len()).map(|i| format!("${i}")).collect();
        let rows = self
            .query(
                &format!(
                    "SELECT {} FROM agents WHERE uid IN ({})",
                    Self::AGENT_COLUMNS,
                    placeholders.join(", ")
                ),
                uids.iter().map(|u| Val::Text(u.clone())).collect(),
            )
            .await?;
        rows.iter().map(Self::agent_row).collect()
    }

    /// Every agent's record, by uid.
    pub(crate) async fn agents(&self) -> Result<Vec<AgentRow>> {
        let rows = self
            .query(
                &format!("SELECT {} FROM agents ORDER BY uid", Self::AGENT_COLUMNS),
                vec![],
            )
            .await?;
        rows.iter().map(Self::agent_row).collect()
    }

    /// Forgets agents gone for longer than `older_than_ms` (the fleet's retention).
    pub(crate) async fn forget_agents(&self, before_ms: i64) -> Result<()> {
        self.tx(vec![stmt(
            "DELETE FROM agents WHERE connected = 0 AND last_seen_ms < $1",
            vec![Val::Int(before_ms)],
        )])
        .await?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub(crate) async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows = self
            .query(
                "SELECT id, at_ms, who, address, action, target, detail FROM audit \
                 ORDER BY id DESC LIMIT $1",
                vec![Val::Int(limit)],
            )
            .await?;
        let bad = || StoreError::Corrupt("an audit row".into());
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r[0].int().ok_or_else(bad)?,
                    at_ms: r[1].int().ok_or_else(bad)?,
                    who: r[2].text().ok_or_else(bad)?.to_owned(),
                    address: r[3].text().ok_or_else(bad)?.to_owned(),
                    action: r[4].text().ok_or_else(bad)?.to_owned(),
                    target: r[5].text().ok_or_else(bad)?.to_owned(),
                    detail: r[6].text().ok_or_else(bad)?.to_owned(),
                })
            })
            .collect()
    }

    /// Appends one audit entry on its own (for actions that change nothing stored).
    pub(crate) async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<()> {
        self.tx(vec![Self::audit(actor, action, target, detail)])
            .await?;
        Ok(())
    }

    /// Asks the node agent `uid` is connected to to restart it (PostgreSQL), audited.
    pub(crate) async fn restart_elsewhere(&self, uid: &str, actor: &Actor) -> Result<()> {
        let mut stmts = vec![Self::audit(
            actor,
            "restart",
            uid,
            "sent to the agent's node",
        )];
        stmts.extend(self.notify(&Change::Restart(uid.to_owned())));
        self.tx(stmts).await?;
        Ok(())
    }

    fn rollout_row(r: &Row) -> Result<RolloutRow> {
        let bad = || StoreError::Corrupt("a rollouts row".into());
        let json = |v: &Val| -> Result<Value> {
            serde_json::from_str(v.text().ok_or_else(bad)?).map_err(|_| bad())
        };
        Ok(RolloutRow {
            id: r[0].int().ok_or_else(bad)?,
            config: r[1].text().ok_or_else(bad)?.to_owned(),
            from_version: r[2].int().ok_or_else(bad)?,
            to_version: r[3].int().ok_or_else(bad)?,
            spec: json(&r[4])?,
            state: r[5].text().ok_or_else(bad)?.to_owned(),
            progress: json(&r[6])?,
            created_ms: r[7].int().ok_or_else(bad)?,
            updated_ms: r[8].int().ok_or_else(bad)?,
        })
    }

    const ROLLOUT_COLUMNS: &str =
        "id, config, from_version, to_version, spec, state, progress, created_ms, updated_ms";

    /// Creates a rollout; its id.
    pub(crate) async fn create_rollout(
        &self,
        config: &str,
        from_version: i64,
        to_version: i64,
        spec: &Value,
        progress: &Value,
        actor: &Actor,
    ) -> Result<RolloutRow> {
        let now = now_ms();
        let rows = self
            .tx(vec![
                stmt(
                    format!(
                        "INSERT INTO rollouts (config, from_version, to_version, spec, state, \
                         progress, created_ms, updated_ms) VALUES ($1, $2, $3, $4, 'running', $5, $6, $6) \
                         RETURNING {}",
                        Self::ROLLOUT_COLUMNS
                    ),
                    vec![
                        config.into(),
                        Val::Int(from_version),
                        Val::Int(to_version),
                        spec.to_string().into(),
                        progress.to_string().into(),
                        Val::Int(now),
                    ],
                ),
                Self::audit(
                    actor,
                    "create_rollout",
                    config,
                    &format!("version {from_version} -> {to_version}: {spec}"),
                ),
            ])
            .await
            .map_err(|e| match e {
                StoreError::Db(m) if m.contains("UNIQUE") || m.contains("duplicate key") => {
                    StoreError::Conflict(format!("a rollout of {config} is live already"))
                }
                other => other,
            })?;
        let row = rows
            .first()
            .and_then(|r| r.first())
            .ok_or_else(|| StoreError::Corrupt("INSERT INTO rollouts returned nothing".into()))?;
        let rollout = Self::rollout_row(row)?;
        if let Some(n) = self.notify(&Change::Rollout(rollout.id)) {
            self.tx(vec![n]).await?;
        }
        Ok(rollout)
    }

    /// Moves a rollout from state `from` to `state` with `progress`, only if it is still in
    /// `from` (an API pause or abort and the driver's step cannot overwrite each other);
    /// whether it moved. With `audit`, logged as that action; with `activate`
    /// (`config`, `from_version`, `to_version`), the config's active version moves to
    /// `to_version` in the same transaction, only if the rollout moved and the config still
    /// runs `from_version`.
    pub(crate) async fn update_rollout(
        &self,
        id: i64,
        from: &str,
        state: &str,
        progress: &Value,
        audit: Option<(&Actor, &str)>,
        activate: Option<(&str, i64, i64)>,
    ) -> Result<bool> {
        let now = now_ms();
        let mut stmts = vec![stmt(
            "UPDATE rollouts SET state = $2, progress = $3, updated_ms = $4 \
             WHERE id = $1 AND state = $5 RETURNING id",
            vec![
                Val::Int(id),
                state.into(),
                progress.to_string().into(),
                Val::Int(now),
                from.into(),
            ],
        )];
        // "It moved" is: in `state`, updated at `now` (inside this transaction); the numbers
        // of the parameters holding the id, the state and `now`.
        let moved = |id: u8, state: u8, now: u8| {
            format!(
                "EXISTS (SELECT 1 FROM rollouts WHERE id = CAST(${id} AS BIGINT) \
                 AND state = ${state} AND updated_ms = CAST(${now} AS BIGINT))"
            )
        };
        if let Some((actor, action)) = audit {
            stmts.push(stmt(
                format!(
                    "INSERT INTO audit (at_ms, who, address, action, target, detail) \
                     SELECT CAST($1 AS BIGINT), $2, $3, $4, $5, $6 WHERE {}",
                    moved(7, 8, 1)
                ),
                vec![
                    Val::Int(now),
                    actor.who.as_str().into(),
                    actor.address.as_str().into(),
                    action.into(),
                    format!("rollout {id}").into(),
                    state.into(),
                    Val::Int(id),
                    state.into(),
                ],
            ));
        }
        if let Some((config, from_version, to_version)) = activate {
            stmts.push(stmt(
                format!(
                    "UPDATE configs SET active_version = CAST($2 AS BIGINT) \
                     WHERE name = $3 AND active_version = CAST($4 AS BIGINT) AND {}",
                    moved(5, 6, 1)
                ),
                vec![
                    Val::Int(now),
                    Val::Int(to_version),
                    config.into(),
                    Val::Int(from_version),
                    Val::Int(id),
                    state.into(),
                ],
            ));
            stmts.extend(self.notify(&Change::Config(config.to_owned())));
        }
        stmts.extend(self.notify(&Change::Rollout(id)));
        let rows = self.tx(stmts).await?;
        Ok(rows.first().is_some_and(|r| !r.is_empty()))
    }

    /// Takes (or keeps) the lease of rollout `id` for `node` until `until_ms`: whether this
    /// node may drive it now. A lease held by another node is taken only once it ran out.
    pub(crate) async fn claim_rollout(&self, id: i64, node: &str, until_ms: i64) -> Result<bool> {
        let rows = self
            .tx(vec![stmt(
                "UPDATE rollouts SET driver = $2, lease_until_ms = $3 \
                 WHERE id = $1 AND (driver IS NULL OR driver = $2 OR lease_until_ms < $4) \
                 RETURNING id",
                vec![
                    Val::Int(id),
                    node.into(),
                    Val::Int(until_ms),
                    Val::Int(now_ms()),
                ],
            )])
            .await?;
        Ok(rows.first().is_some_and(|r| !r.is_empty()))
    }

    pub(crate) async fn rollout(&self, id: i64) -> Result<Option<RolloutRow>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {} FROM rollouts WHERE id = $1",
                    Self::ROLLOUT_COLUMNS
                ),
                vec![Val::Int(id)],
            )
            .await?;
        rows.first().map(Self::rollout_row).transpose()
    }

    pub(crate) async fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        let rows = self
            .query(
                &format!("SELECT {} FROM rollouts ORDER BY id", Self::ROLLOUT_COLUMNS),
                vec![],
            )
            .await?;
        rows.iter().map(Self::rollout_row).collect()
    }
}

/// One stored package version: its file and, when it was uploaded signed, its signature.
#[derive(Debug, Clone)]
pub(crate) struct PackageRow {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) content: Vec<u8>,
    pub(crate) signature: Option<Vec<u8>>,
}

/// One stored package set (selector and packages as JSON objects of strings).
#[derive(Debug, Clone)]
pub(crate) struct PackageSetRow {
    pub(crate) name: String,
    pub(crate) selector: BTreeMap<String, String>,
    pub(crate) packages: BTreeMap<String, String>,
}

impl Store {
    /// The value of setting `key`; `default` is stored first when there is none (the first
    /// node to start decides, the others read its value).
    pub(crate) async fn setting_or_insert(&self, key: &str, default: &[u8]) -> Result<Vec<u8>> {
        let rows = self
            .tx(vec![
                stmt(
                    "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    vec![key.into(), Val::Blob(default.to_vec())],
                ),
                stmt(
                    "SELECT value FROM settings WHERE key = $1",
                    vec![key.into()],
                ),
            ])
            .await?;
        rows.get(1)
            .and_then(|r| r.first())
            .and_then(|r| r[0].blob())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| StoreError::Corrupt(format!("setting {key}")))
    }

    /// Stores a package version (versions are immutable: the same upload again is a no-op).
    pub(crate) async fn put_package(
        &self,
        name: &str,
        version: &str,
        content: &[u8],
        signature: Option<&[u8]>,
        actor: &Actor,
    ) -> Result<()> {
        let mut stmts = vec![
            stmt(
                "INSERT INTO packages (name, version, content, signature, created_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name, version) DO NOTHING",
                vec![
                    name.into(),
                    version.into(),
                    Val::Blob(content.to_vec()),
                    Val::opt_blob(signature),
                    Val::Int(now_ms()),
                ],
            ),
            Self::audit(
                actor,
                "put_package",
                &format!("{name}/{version}"),
                &format!("{} bytes", content.len()),
            ),
        ];
        stmts.extend(self.notify(&Change::Package(format!("{name}/{version}"))));
        self.tx(stmts).await?;
        Ok(())
    }

    fn package_row(r: &Row) -> Result<PackageRow> {
        let bad = || StoreError::Corrupt("a packages row".into());
        Ok(PackageRow {
            name: r[0].text().ok_or_else(bad)?.to_owned(),
            version: r[1].text().ok_or_else(bad)?.to_owned(),
            content: r[2].blob().ok_or_else(bad)?.to_vec(),
            signature: r[3].blob().map(<[u8]>::to_vec),
        })
    }

    /// Every package version, by name and version.
    pub(crate) async fn packages(&self) -> Result<Vec<PackageRow>> {
        let rows = self
            .query(
                "SELECT name, version, content, signature FROM packages ORDER BY name, version",
                vec![],
            )
            .await?;
        rows.iter().map(Self::package_row).collect()
    }

    pub(crate) async fn package(&self, name: &str, version: &str) -> Result<Option<PackageRow>> {
        let rows = self
            .query(
                "SELECT name, version, content, signature FROM packages WHERE name = $1 AND version = $2",
                vec![name.into(), version.into()],
            )
            .await?;
        rows.first().map(Self::package_row).transpose()
    }

    /// Creates or replaces a package set.
    pub(crate) async fn put_package_set(&self, set: &PackageSetRow, actor: &Actor) -> Result<()> {
        let selector = serde_json::to_string(&set.selector).unwrap_or_else(|_| "{}".into());
        let packages = serde_json::to_string(&set.packages).unwrap_or_else(|_| "{}".into());
        let mut stmts = vec![
            stmt(
                "INSERT INTO package_sets (name, selector, packages, updated_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET selector = EXCLUDED.selector, \
                 packages = EXCLUDED.packages, updated_ms = EXCLUDED.updated_ms",
                vec![
                    set.name.as_str().into(),
                    selector.clone().into(),
                    packages.clone().into(),
                    Val::Int(now_ms()),
                ],
            ),
            Self::audit(
                actor,
                "put_package_set",
                &set.name,
                &format!("selector {selector}, packages {packages}"),
            ),
        ];
        stmts.extend(self.notify(&Change::PackageSet(set.name.clone())));
        self.tx(stmts).await?;
        Ok(())
    }

    fn package_set_row(r: &Row) -> Result<PackageSetRow> {
        let bad = || StoreError::Corrupt("a package_sets row".into());
        let map = |v: &Val| -> Result<BTreeMap<String, String>> {
            serde_json::from_str(v.text().ok_or_else(bad)?).map_err(|_| bad())
        };
        Ok(PackageSetRow {
            name: r[0].text().ok_or_else(bad)?.to_owned(),
            selector: map(&r[1])?,
            packages: map(&r[2])?,
        })
    }

    pub(crate) async fn package_sets(&self) -> Result<Vec<PackageSetRow>> {
        let rows = self
            .query(
                "SELECT name, selector, packages FROM package_sets ORDER BY name",
                vec![],
            )
            .await?;
        rows.iter().map(Self::package_set_row).collect()
    }

    pub(crate) async fn package_set(&self, name: &str) -> Result<Option<PackageSetRow>> {
        let rows = self
            .query(
                "SELECT name, selector, packages FROM package_sets WHERE name = $1",
                vec![name.into()],
            )
            .await?;
        rows.first().map(Self::package_set_row).transpose()
    }
}

/// `url` without its password, for logs and errors.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
