//! The PostgreSQL backend: a small pool of connections for statements, and one connection
//! that `LISTEN`s on channel `opamp` for the changes other nodes commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use opamp::async_trait;
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{Backend, Change, Dialect, Result, Row, Stmt, StoreError, Val};

/// Connections in the pool: statements of concurrent API requests and the agent writer run
/// side by side.
const POOL: usize = 4;
/// How long opening a connection may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one transaction may take before its connection is given up.
const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) struct Postgres {
    url: String,
    pool: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &super::redact(&self.url))
            .finish_non_exhaustive()
    }
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        StoreError::Db(format!("duplicate key: {text}"))
    } else if e.code() == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) {
        StoreError::Conflict(text)
    } else {
        StoreError::Db(text)
    }
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) => match *ty {
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
            Val::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn read_row(row: &tokio_postgres::Row) -> std::result::Result<Row, tokio_postgres::Error> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Val::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Val::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Val::Int(v.into())),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Val::Int(v.into())),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Val::Blob),
            Type::VOID => None,
            _ => row.try_get::<_, Option<String>>(i)?.map(Val::Text),
        };
        out.push(v.unwrap_or(Val::Null));
    }
    Ok(out)
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| StoreError::Db(format!("{}: {e}", super::redact(url))))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

impl Postgres {
    pub(crate) async fn connect(url: &str) -> Result<Self> {
        // The first connection now, so that a wrong URL is an error at start.
        let first = connect(url).await?;
        let mut pool = vec![Mutex::new(Some(first))];
        pool.extend((1..POOL).map(|_| Mutex::new(None)));
        Ok(Self {
            url: url.to_owned(),
            pool,
            next: AtomicUsize::new(0),
        })
    }

    async fn run(
        client: &mut Client,
        stmts: &[Stmt],
    ) -> std::result::Result<Vec<Vec<Row>>, tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let mut out = Vec::with_capacity(stmts.len());
        for s in stmts {
            let params: Vec<&(dyn ToSql + Sync)> =
                s.params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            let rows = tx.query(&*s.sql, &params).await?;
            out.push(
                rows.iter()
                    .map(read_row)
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            );
        }
        tx.commit().await?;
        Ok(out)
    }
}

#[async_trait]
impl Backend for Postgres {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Vec<Row>>> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % POOL];
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let fresh = tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.url))
                .await
                .map_err(|_| {
                    StoreError::Db(format!(
                        "{}: no connection within {CONNECT_TIMEOUT:?}",
                        super::redact(&self.url)
                    ))
                })??;
            *guard = Some(fresh);
        }
        let client = guard
            .as_mut()
            .ok_or_else(|| StoreError::Db("no connection".into()))?;
        match tokio::time::timeout(STATEMENT_TIMEOUT, Self::run(client, &stmts)).await {
            Ok(result) => result.map_err(db_err),
            Err(_) => {
                // A hung database: this connection is given up (its transaction rolls back
                // when the server notices), the next call opens another.
                *guard = None;
                Err(StoreError::Db(format!(
                    "the database did not answer within {STATEMENT_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn listen(&self) -> Option<mpsc::Receiver<Change>> {
        let (tx, rx) = mpsc::channel(1024);
        let url = self.url.clone();
        tokio::spawn(listener(url, Arc::new(tx)));
        Some(rx)
    }
}

/// Keeps one connection `LISTEN`ing on `opamp` and forwards what arrives; pings it every
/// 30 s and reconnects after a broken or silent connection. After every `LISTEN` it sends
/// [`Change::Config`] of `""`: the receiver reloads everything (`crate::control`), so what
/// committed while nobody listened is not lost.
async fn listener(url: String, tx: Arc<mpsc::Sender<Change>>) {
    loop {
        match tokio_postgres::connect(&url, NoTls).await {
            Ok((client, mut connection)) => {
                let (note_tx, mut note_rx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    loop {
                        let msg = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                        match msg {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                if note_tx.send(n.payload().to_owned()).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!("PostgreSQL LISTEN connection: {e}");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                if let Err(e) = client.batch_execute("LISTEN opamp").await {
                    tracing::warn!("LISTEN opamp: {e}");
                } else {
                    // What committed before LISTEN took effect (at start: between loading the
                    // state and now; after a reconnect: while it was down) is caught up with
                    // a reload of everything.
                    let _ = tx.send(Change::Config(String::new())).await;
                    let mut ping = tokio::time::interval(std::time::Duration::from_secs(30));
                    ping.tick().await;
                    loop {
                        tokio::select! {
                            payload = note_rx.recv() => {
                                let Some(payload) = payload else { break };
                                if let Some(change) = Change::parse(&payload) {
                                    if tx.send(change).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            // A half-open connection would be silent forever: ask it.
                            _ = ping.tick() => {
                                let alive = tokio::time::timeout(
                                    std::time::Duration::from_secs(10),
                                    client.simple_query("SELECT 1"),
                                )
                                .await;
                                if !matches!(alive, Ok(Ok(_))) {
                                    tracing::warn!("PostgreSQL LISTEN connection unresponsive; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!("PostgreSQL LISTEN connect: {e}"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
