//! The SQLite backend: one file, one connection, statements run on tokio's blocking pool.

use std::sync::{Arc, Mutex};

use opamp::async_trait;
use rusqlite::types::{Value as SqlValue, ValueRef};
use tokio::sync::mpsc;

use super::{Backend, Change, Dialect, Result, Row, Stmt, StoreError, Val};

#[derive(Debug)]
pub(crate) struct Sqlite {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

/// `$N` (the store's spelling) to `?N` (SQLite's positional parameters), outside quotes.
fn positional(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        if c == '\'' {
            quoted = !quoted;
        }
        out.push(if c == '$' && !quoted { '?' } else { c });
    }
    out
}

fn to_sql(v: &Val) -> SqlValue {
    match v {
        Val::Null => SqlValue::Null,
        Val::Int(i) => SqlValue::Integer(*i),
        Val::Text(s) => SqlValue::Text(s.clone()),
        Val::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

fn from_sql(v: ValueRef<'_>) -> Val {
    match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        ValueRef::Real(f) => Val::Int(f as i64),
        ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Val::Blob(b.to_vec()),
    }
}

impl Sqlite {
    /// Opens (creating) the database file at `path`.
    pub(crate) async fn open(path: &str) -> Result<Self> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || -> Result<rusqlite::Connection> {
            if let Some(dir) = std::path::Path::new(&path).parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
                }
            }
            let conn = rusqlite::Connection::open(&path)
                .map_err(|e| StoreError::Db(format!("{path}: {e}")))?;
            // WAL with FULL sync: a commit is on disk before the API answers, and readers do
            // not block the writer.
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
            )
            .map_err(|e| StoreError::Db(format!("{path}: {e}")))?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Db(format!("opening the database: {e}")))??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }
}

#[async_trait]
impl Backend for Sqlite {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Vec<Row>>> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let tx = conn.transaction().map_err(db_err)?;
            let mut out = Vec::with_capacity(stmts.len());
            // A batch repeats one statement (agent rows): rewritten once, not per row.
            let mut last: Option<(&str, String)> = None;
            for s in &stmts {
                if last.as_ref().is_none_or(|(sql, _)| *sql != &*s.sql) {
                    last = Some((&*s.sql, positional(&s.sql)));
                }
                let sql = last.as_ref().map_or("", |(_, p)| p.as_str());
                let mut prepared = tx.prepare_cached(sql).map_err(db_err)?;
                let columns = prepared.column_count();
                let params: Vec<SqlValue> = s.params.iter().map(to_sql).collect();
                let mut rows = prepared
                    .query(rusqlite::params_from_iter(params))
                    .map_err(db_err)?;
                let mut got = Vec::new();
                while let Some(row) = rows.next().map_err(db_err)? {
                    let mut r = Vec::with_capacity(columns);
                    for i in 0..columns {
                        r.push(from_sql(row.get_ref(i).map_err(db_err)?));
                    }
                    got.push(r);
                }
                out.push(got);
            }
            tx.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Db(format!("a database task failed: {e}")))?
    }

    async fn listen(&self) -> Option<mpsc::Receiver<Change>> {
        None
    }
}
