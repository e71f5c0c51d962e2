//! [`PackageSyncer`]: runs the [`plan`] of an offer with real downloads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use opamp_proto::{PackageAvailable, PackageStatuses, PackagesAvailable};
use tokio::task::JoinHandle;

use super::fs::hex;
use super::{
    DownloadProgress, DownloadSettings, Downloader, InstalledPackage, PackageAction,
    PackagesStateProvider, SignatureVerifier, SignedFile, StatusBoard, plan,
};

/// Where a [`PackageSyncer`] sends the statuses to report: typically
/// [`OpampClient::set_package_statuses`](crate::OpampClient::set_package_statuses).
/// Called from the sync's task; it should not block.
pub trait StatusSink: Send + Sync + 'static {
    /// The statuses as they are now (a whole [`PackageStatuses`], PKG-13).
    fn report(&self, statuses: PackageStatuses);
}

impl<F: Fn(PackageStatuses) + Send + Sync + 'static> StatusSink for F {
    fn report(&self, statuses: PackageStatuses) {
        self(statuses)
    }
}

/// Downloads, verifies, installs and deletes packages as offers say, reporting each step.
///
/// [`offer`](Self::offer) starts a sync in a tokio task; an offer that arrives while one
/// runs cancels it (its download stops, its partial file is deleted, nothing half-installed
/// stays) and the new sync starts once the old one has stopped. [`sync`](Self::sync) runs one
/// in the caller's task.
///
/// An offer equal to the one being synced is ignored. A package whose install failed is not
/// tried again at the same package hash for a while
/// ([`DownloadSettings::retry_failed_after`], PKG-8); it stays reported as INSTALL_FAILED
/// with its message meanwhile.
///
/// Packages are handled one at a time, in name order. The all-packages hash is stored in the
/// provider only when every offered package is installed, so an offer that failed in part is
/// tried again when the server offers it again (on reconnect, PKG-15).
pub struct PackageSyncer {
    inner: Arc<Inner>,
    current: Mutex<Option<Running>>,
}

/// The sync under way (or last started), with its offer.
struct Running {
    offer: PackagesAvailable,
    handle: JoinHandle<PackageStatuses>,
}

/// A package hash whose install failed: when to try it again.
struct Failed {
    hash: Bytes,
    message: String,
    failures: u32,
    retry_at: Instant,
}

struct Inner {
    provider: Arc<dyn PackagesStateProvider>,
    verifier: Arc<dyn SignatureVerifier>,
    downloader: Downloader,
    sink: Arc<dyn StatusSink>,
    counter: AtomicU64,
    failed: Mutex<HashMap<String, Failed>>,
}

impl std::fmt::Debug for PackageSyncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageSyncer")
            .field("downloader", &self.inner.downloader)
            .finish_non_exhaustive()
    }
}

impl PackageSyncer {
    /// A syncer over `provider`, checking signatures with `verifier`, downloading with
    /// `settings`, reporting to `sink`.
    pub fn new(
        provider: Arc<dyn PackagesStateProvider>,
        verifier: Arc<dyn SignatureVerifier>,
        settings: DownloadSettings,
        sink: impl StatusSink,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                provider,
                verifier,
                downloader: Downloader::new(settings),
                sink: Arc::new(sink),
                counter: AtomicU64::new(0),
                failed: Mutex::new(HashMap::new()),
            }),
            current: Mutex::new(None),
        }
    }

    /// Starts syncing `offer` in a new task, cancelling the sync under way if any. Must be
    /// called within a tokio runtime. [`wait`](Self::wait) waits for it. An offer equal to
    /// the one whose sync is under way is ignored.
    pub fn offer(&self, offer: PackagesAvailable) {
        let inner = self.inner.clone();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|r| !r.handle.is_finished() && r.offer == offer)
        {
            return;
        }
        let previous = current.take().map(|r| r.handle);
        if let Some(previous) = &previous {
            previous.abort();
        }
        let running = offer.clone();
        let handle = tokio::spawn(async move {
            if let Some(previous) = previous {
                // The old sync stops at its next await; its provider call, if one is under
                // way, finishes first. Only then does the new one touch the provider.
                let _ = previous.await;
            }
            inner.sync(offer).await
        });
        *current = Some(Running {
            offer: running,
            handle,
        });
    }

    /// Waits for the sync [`offer`](Self::offer) started last; its final statuses, or `None`
    /// if there is none or it was cancelled by [`cancel`](Self::cancel).
    pub async fn wait(&self) -> Option<PackageStatuses> {
        let handle = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?
            .handle;
        handle.await.ok()
    }

    /// Cancels the sync under way, if any.
    pub fn cancel(&self) {
        if let Some(running) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            running.handle.abort();
        }
    }

    /// Syncs `offer` in the caller's task and returns the final statuses (also reported to
    /// the sink). Do not run it while an [`offer`](Self::offer)'s sync runs.
    pub async fn sync(&self, offer: PackagesAvailable) -> PackageStatuses {
        self.inner.sync(offer).await
    }
}

impl Drop for PackageSyncer {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Deletes a staging file unless it was moved away (installed) or the sync goes on.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Inner {
    async fn sync(&self, offer: PackagesAvailable) -> PackageStatuses {
        let provider = &*self.provider;
        let state = provider
            .packages()
            .and_then(|p| Ok((p, provider.all_packages_hash()?)));
        let (installed, all_hash) = match state {
            Ok(s) => s,
            Err(e) => {
                // PKG-16: an error not tied to one package.
                let mut board = StatusBoard {
                    server_hash: offer.all_packages_hash.clone(),
                    ..Default::default()
                };
                board.set_error(format!("reading the installed packages: {e}"));
                let statuses = board.snapshot();
                self.sink.report(statuses.clone());
                return statuses;
            }
        };
        let Some(actions) = plan(&offer, all_hash.as_deref(), &installed) else {
            // PKG-4: the agent has this offer; report it as installed (PKG-12, PKG-15).
            let keep: Vec<_> = offer
                .packages
                .keys()
                .map(|name| PackageAction::Keep { name: name.clone() })
                .collect();
            let statuses = StatusBoard::begin(&installed, &offer, &keep).snapshot();
            self.sink.report(statuses.clone());
            return statuses;
        };
        let mut board = StatusBoard::begin(&installed, &offer, &actions);
        self.sink.report(board.snapshot());
        for action in &actions {
            match action {
                PackageAction::Keep { .. } | PackageAction::Refuse { .. } => {}
                PackageAction::UpdateMetadata { name, offered } => {
                    // PKG-6: same content, nothing to download.
                    match provider.update_metadata(&InstalledPackage::from_offer(name, offered)) {
                        Ok(()) => board.installed(name),
                        Err(e) => board.failed(name, format!("recording the new version: {e}")),
                    }
                    self.sink.report(board.snapshot());
                }
                PackageAction::Download { name, offered } => {
                    if let Some(message) = self.failed_recently(name, &offered.hash) {
                        // PKG-8: this very offer failed a moment ago.
                        board.failed(name, message);
                        continue;
                    }
                    match self.install(name, offered, &mut board).await {
                        Ok(()) => {
                            self.failed_map().remove(name);
                            board.installed(name);
                        }
                        Err(message) => {
                            self.record_failure(name, &offered.hash, &message);
                            board.failed(name, message);
                        }
                    }
                    self.sink.report(board.snapshot());
                }
                PackageAction::Delete { name } => {
                    // PKG-5: no longer offered.
                    match provider.delete(name) {
                        Ok(()) => board.removed(name),
                        Err(e) => board.set_error(format!("deleting package {name:?}: {e}")),
                    }
                }
            }
        }
        if board.all_installed() {
            if let Err(e) = provider.set_all_packages_hash(&offer.all_packages_hash) {
                board.set_error(format!("recording the all-packages hash: {e}"));
            }
        }
        // PKG-12, PKG-15: the final report, with the offer's all-packages hash.
        let statuses = board.snapshot();
        self.sink.report(statuses.clone());
        statuses
    }

    fn failed_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failed>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The message of a failure of this package hash whose retry time has not come.
    fn failed_recently(&self, name: &str, hash: &Bytes) -> Option<String> {
        let failed = self.failed_map();
        let f = failed.get(name)?;
        (f.hash == *hash && Instant::now() < f.retry_at).then(|| f.message.clone())
    }

    fn record_failure(&self, name: &str, hash: &Bytes, message: &str) {
        let mut failed = self.failed_map();
        let failures = match failed.get(name) {
            Some(f) if f.hash == *hash => f.failures.saturating_add(1),
            _ => 1,
        };
        let first = self.downloader.settings().retry_failed_after;
        let pause = first
            .saturating_mul(1 << (failures - 1).min(16))
            .min(Duration::from_secs(3600).max(first));
        failed.insert(
            name.to_owned(),
            Failed {
                hash: hash.clone(),
                message: message.to_owned(),
                failures,
                retry_at: Instant::now() + pause,
            },
        );
    }

    /// Downloads, verifies and installs one package; the INSTALL_FAILED message on failure.
    async fn install(
        &self,
        name: &str,
        offered: &PackageAvailable,
        board: &mut StatusBoard,
    ) -> Result<(), String> {
        let Some(file) = &offered.file else {
            return Err("the offer has no downloadable file".into());
        };
        let staging = self
            .provider
            .staging_dir()
            .map_err(|e| format!("no staging directory: {e}"))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let staged = Staged(staging.join(format!("download-{}-{n}", hex(name.as_bytes()))));
        let settings = self.downloader.settings();
        let mut progress = DownloadProgress::new(Instant::now(), None, settings.progress_interval);
        // PKG-12, PKG-20: DOWNLOADING with its details, at most once per interval.
        board.downloading(name, progress.details(0, Instant::now()));
        self.sink.report(board.snapshot());
        let sink = &self.sink;
        let sha256 = {
            let mut on_progress = |received: u64, total: Option<u64>| {
                progress.set_total(total);
                if let Some(details) = progress.update(received, Instant::now()) {
                    board.downloading(name, details);
                    sink.report(board.snapshot());
                }
            };
            self.downloader
                .download(file, &staged.0, &mut on_progress)
                .await
                .map_err(|e| e.to_string())?
        };
        // PKG-21: the signature, through the agent's verifier.
        self.verifier
            .verify(&SignedFile {
                name,
                version: &offered.version,
                sha256: &sha256,
                path: &staged.0,
                signature: &file.signature,
            })
            .map_err(|why| format!("bad signature: {why}"))?;
        board.installing(name);
        self.sink.report(board.snapshot());
        self.provider
            .install(&InstalledPackage::from_offer(name, offered), &staged.0)
            .map_err(|e| format!("install failed: {e}"))
    }
}
