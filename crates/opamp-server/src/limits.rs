//! Resource limits of connections: the budget for bytes of incomplete messages, the read
//! meter of a WebSocket, the pace rule of plain-HTTP bodies, and the standalone server's
//! table of open connections (which sheds silent ones first). See [`ConnectionLimits`].

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{BUDGET_EXEMPT_MESSAGE_SIZE, ConnectionLimits, FD_RESERVE};
use crate::connection::Connection;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The server-wide budget for bytes of incomplete WebSocket messages and plain-HTTP bodies.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Counts `n` more bytes of a message that now has `message` bytes; false when the
    /// budget is exceeded (the bytes stay counted until released). Small messages may use a
    /// reserve of a quarter of the budget beyond it, so that good agents' heartbeats pass
    /// while large stalled messages hold the budget, and memory stays bounded even so.
    fn charge(&self, n: usize, message: usize) -> bool {
        let used = self.used.fetch_add(n, Ordering::AcqRel).saturating_add(n);
        used <= self.max
            || (message <= BUDGET_EXEMPT_MESSAGE_SIZE
                && used <= self.max.saturating_add(self.max / 4))
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes counted now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// The error [`Metered`] reads fail with once the budget refused the message in progress.
#[derive(Debug, thiserror::Error)]
#[error("incomplete-message budget exhausted")]
pub(crate) struct OverBudget;

/// What a WebSocket read so far: shared by the [`Metered`] stream inside the WebSocket and
/// the connection loop, which reads the timestamps for its timers.
#[derive(Debug)]
pub(crate) struct Meter {
    budget: Arc<Budget>,
    base: Instant,
    /// Bytes read since the last complete message (the message in progress, roughly).
    pending: AtomicUsize,
    /// When the first byte of the message in progress arrived, ms after `base`.
    started_ms: AtomicU64,
    /// When the last byte arrived, ms after `base`.
    last_read_ms: AtomicU64,
    refused: AtomicBool,
}

impl Meter {
    pub(crate) fn new(budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            base: Instant::now(),
            pending: AtomicUsize::new(0),
            started_ms: AtomicU64::new(0),
            last_read_ms: AtomicU64::new(0),
            refused: AtomicBool::new(false),
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn on_read(&self, n: usize) -> io::Result<()> {
        let now = self.ms(Instant::now());
        self.last_read_ms.store(now, Ordering::Relaxed);
        let before = self.pending.fetch_add(n, Ordering::Relaxed);
        if before == 0 {
            self.started_ms.store(now, Ordering::Relaxed);
        }
        if self.budget.charge(n, before.saturating_add(n)) {
            Ok(())
        } else {
            self.refused.store(true, Ordering::Relaxed);
            Err(io::Error::other(OverBudget))
        }
    }

    /// A message (data or control) was completed: its bytes leave the budget.
    pub(crate) fn message_done(&self) {
        let n = self.pending.swap(0, Ordering::Relaxed);
        self.budget.release(n);
    }

    /// The message in progress: when its first byte came and how many bytes arrived.
    pub(crate) fn in_progress(&self) -> Option<(Instant, usize)> {
        let pending = self.pending.load(Ordering::Relaxed);
        (pending > 0).then(|| (self.at(self.started_ms.load(Ordering::Relaxed)), pending))
    }

    /// When the last byte arrived (the connection's start before any).
    pub(crate) fn last_read(&self) -> Instant {
        self.at(self.last_read_ms.load(Ordering::Relaxed))
    }

    /// When the connection started.
    pub(crate) fn started(&self) -> Instant {
        self.base
    }

    /// Whether the budget refused the message in progress.
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.budget.release(*self.pending.get_mut());
    }
}

/// A byte stream whose reads are metered (timestamps, budget); writes pass through.
#[derive(Debug)]
pub(crate) struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, meter: Arc<Meter>) -> Self {
        Self { inner, meter }
    }

    pub(crate) fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.meter.refused() {
            return Poll::Ready(Err(io::Error::other(OverBudget)));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            self.meter.on_read(n)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Bytes of a plain-HTTP body counted in the [`Budget`] until dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    amount: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.amount);
    }
}

/// Why a plain-HTTP body was not read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Over the message size limit (HTTP-14): 413.
    TooLarge,
    /// Not complete within the body timeout or behind the pace floor: 408.
    TooSlow,
    /// The incomplete-bytes budget is exhausted: 503 with `Retry-After`.
    OverBudget,
    /// The stream failed: 400.
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads a whole plain-HTTP body of at most `limit` bytes. It must be complete within
/// `timeout` of the call (the end of the request head) and keep the pace of `limits`. A body
/// with a `Content-Length` takes its whole length from `budget` at once (so its buffer is
/// allocated once, at its size); a chunked one takes what arrives. The returned [`Charge`]
/// gives it back when dropped.
pub(crate) async fn read_body<B>(
    body: B,
    content_length: Option<u64>,
    limit: usize,
    timeout: Duration,
    limits: &ConnectionLimits,
    budget: &Arc<Budget>,
) -> Result<(Bytes, Charge), BodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut charge = Charge {
        budget: budget.clone(),
        amount: 0,
    };
    let announced = content_length.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    if let Some(length) = announced {
        if length > limit {
            return Err(BodyError::TooLarge);
        }
        charge.amount = length;
        if !budget.charge(length, length) {
            return Err(BodyError::OverBudget);
        }
    }
    let start = Instant::now();
    let hard = start + timeout;
    let mut received = 0usize;
    let mut last_progress = start;
    // One frame is kept as it is; more are copied into one buffer: a body of many tiny
    // chunks must not cost a `Bytes` handle (and a pinned read buffer) per chunk.
    let mut first: Option<Bytes> = None;
    let mut all = BytesMut::new();
    let mut body = std::pin::pin!(body);
    loop {
        let deadline = hard.min(limits.message_deadline(start, received, last_progress));
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::TooSlow),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if data.is_empty() {
            continue;
        }
        if received.saturating_add(data.len()) > limit {
            return Err(BodyError::TooLarge);
        }
        received += data.len();
        last_progress = Instant::now();
        if announced.is_none() {
            charge.amount += data.len();
            if !budget.charge(data.len(), charge.amount) {
                return Err(BodyError::OverBudget);
            }
        }
        if first.is_none() && all.is_empty() {
            first = Some(data);
        } else {
            if let Some(first) = first.take() {
                // Within the limit and the budget already taken.
                all.reserve(announced.unwrap_or(0).max(first.len() + data.len()));
                all.extend_from_slice(&first);
            }
            all.extend_from_slice(&data);
        }
    }
    let bytes = first.unwrap_or_else(|| all.freeze());
    Ok((bytes, charge))
}

/// The standalone server's open TCP connections, with those that never delivered an OpAMP
/// message in age order, so that the oldest silent one is shed first at the limit.
#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    open: AtomicUsize,
    silent: Mutex<Silent>,
}

#[derive(Debug, Default)]
struct Silent {
    next_id: u64,
    by_age: BTreeMap<u64, Weak<Slot>>,
}

/// One open TCP connection in the [`ConnTable`]; dropped when the connection is gone (its
/// serving task and, after an upgrade, its WebSocket task, both hold it).
#[derive(Debug)]
pub(crate) struct Slot {
    table: Arc<ConnTable>,
    id: u64,
    /// Wakes the HTTP serving task of a shed connection.
    shed_notify: Notify,
    /// The WebSocket of an upgraded connection, closed (1013) when it is shed.
    ws: Mutex<Option<Connection>>,
    shed: AtomicBool,
    /// Still counted in `open` (a shed slot leaves the count at once).
    counted: AtomicBool,
    request_seen: AtomicBool,
}

impl ConnTable {
    /// Admits a new connection under `max`: sheds the oldest silent connection if the table
    /// is full; `None` when every connection is a real agent.
    pub(crate) fn admit(self: &Arc<Self>, max: Option<usize>) -> Option<Arc<Slot>> {
        // Shed slots are dropped after the lock is released: their drop takes it.
        let mut shed = Vec::new();
        let admitted = self.admit_locked(max, &mut shed);
        drop(shed);
        admitted
    }

    fn admit_locked(
        self: &Arc<Self>,
        max: Option<usize>,
        shed: &mut Vec<Arc<Slot>>,
    ) -> Option<Arc<Slot>> {
        let mut silent = lock(&self.silent);
        if let Some(max) = max {
            while self.open.load(Ordering::Acquire) >= max {
                let (_, oldest) = silent.by_age.pop_first()?;
                if let Some(slot) = oldest.upgrade() {
                    tracing::debug!("connection limit reached; closing the oldest silent one");
                    slot.shed();
                    shed.push(slot);
                }
            }
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        let id = silent.next_id;
        silent.next_id += 1;
        let slot = Arc::new(Slot {
            table: self.clone(),
            id,
            shed_notify: Notify::new(),
            ws: Mutex::new(None),
            shed: AtomicBool::new(false),
            counted: AtomicBool::new(true),
            request_seen: AtomicBool::new(false),
        });
        silent.by_age.insert(id, Arc::downgrade(&slot));
        Some(slot)
    }

    /// Sheds the oldest silent connection, if any (the process ran out of descriptors).
    pub(crate) fn shed_oldest(&self) {
        let oldest = lock(&self.silent).by_age.pop_first();
        if let Some(slot) = oldest.and_then(|(_, weak)| weak.upgrade()) {
            slot.shed();
        }
    }

    /// Number of open connections counted.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Slot {
    fn shed(&self) {
        let ws = lock(&self.ws);
        self.shed.store(true, Ordering::Release);
        if self.counted.swap(false, Ordering::AcqRel) {
            self.table.open.fetch_sub(1, Ordering::AcqRel);
        }
        match ws.as_ref() {
            Some(conn) => conn.disconnect(),
            None => self.shed_notify.notify_one(),
        }
    }

    /// Whether the connection was shed to admit another.
    pub(crate) fn is_shed(&self) -> bool {
        self.shed.load(Ordering::Acquire)
    }

    /// Resolves once the connection is shed (HTTP serving task).
    pub(crate) async fn shed_requested(&self) {
        self.shed_notify.notified().await;
    }

    /// The connection became a WebSocket; shedding it now closes `conn`. False when it was
    /// shed already.
    pub(crate) fn attach_websocket(&self, conn: &Connection) -> bool {
        let mut ws = lock(&self.ws);
        if self.is_shed() {
            return false;
        }
        *ws = Some(conn.clone());
        true
    }

    /// The connection delivered an OpAMP message: it is no longer shed before others.
    pub(crate) fn mark_active(&self) {
        lock(&self.table.silent).by_age.remove(&self.id);
        // The WebSocket handle is not needed any more.
        lock(&self.ws).take();
    }

    /// A request head arrived on this connection.
    pub(crate) fn mark_request(&self) {
        self.request_seen.store(true, Ordering::Release);
    }

    /// Whether a request head arrived on this connection.
    pub(crate) fn request_seen(&self) -> bool {
        self.request_seen.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table.silent).by_age.remove(&self.id);
        if *self.counted.get_mut() {
            self.table.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The slot of the connection a request came on, as a request extension.
#[derive(Debug, Clone)]
pub(crate) struct SlotExt(pub(crate) Arc<Slot>);

/// The default connection limit: the file-descriptor soft limit minus [`FD_RESERVE`].
pub(crate) fn default_max_connections() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let soft = fd_soft_limit(&limits)?;
    Some(soft.saturating_sub(FD_RESERVE).max(1))
}

/// Parses the soft "Max open files" limit from `/proc/self/limits`.
fn fd_soft_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_soft_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63619                63619                processes \n\
                    Max open files            20000                524288               files     \n";
        assert_eq!(fd_soft_limit(text), Some(20000));
        assert_eq!(
            fd_soft_limit("Max open files            unlimited            unlimited   files"),
            None
        );
        #[cfg(target_os = "linux")]
        assert!(default_max_connections().is_some());
    }

    #[test]
    fn budget_refuses_large_messages_first_and_releases() {
        let budget = Budget::new(100_000);
        assert!(budget.charge(90_000, 90_000));
        // Over the budget: a large message is refused, a small one is not...
        assert!(!budget.charge(20_000, 110_000));
        assert!(budget.charge(10, 10));
        // ... until the reserve of a quarter of the budget is used up too.
        assert!(!budget.charge(20_000, 10));
        budget.release(130_010);
        assert_eq!(budget.used(), 0);
        let meter = Meter::new(budget.clone());
        meter.on_read(500).unwrap();
        assert_eq!(budget.used(), 500);
        drop(meter);
        assert_eq!(budget.used(), 0, "a dropped meter gives its bytes back");
    }

    #[test]
    fn the_oldest_silent_connection_is_shed_first() {
        let table = Arc::new(ConnTable::default());
        let a = table.admit(Some(2)).unwrap();
        let b = table.admit(Some(2)).unwrap();
        a.mark_active();
        // Full: `b` is the oldest silent one; `a` is a real agent and stays.
        let c = table.admit(Some(2)).unwrap();
        assert!(b.is_shed() && !a.is_shed() && !c.is_shed());
        assert_eq!(table.open(), 2);
        c.mark_active();
        assert!(table.admit(Some(2)).is_none(), "all real agents: refuse");
        drop(b);
        assert_eq!(table.open(), 2, "a shed slot left the count when shed");
        drop(a);
        assert_eq!(table.open(), 1);
    }
}
