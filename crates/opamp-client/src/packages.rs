//! Packages offered by the server: what to download, what to delete, what to report
//! (PKG-1..PKG-21).
//!
//! Two layers, as for the protocol core:
//!
//! - Sans-IO (always built): [`plan`] compares an offered [`PackagesAvailable`] with what the
//!   agent has ([`InstalledPackage`]s and the all-packages hash, from a
//!   [`PackagesStateProvider`]) and returns the [`PackageAction`]s; a [`StatusBoard`] turns the
//!   steps of a sync into [`PackageStatuses`] that follow the spec's rules (PKG-13..PKG-20);
//!   [`DownloadProgress`] computes `download_details` at a bounded rate with the caller's
//!   `now`; [`SignatureVerifier`] is the hook for code signing (PKG-21) with
//!   [`Ed25519Verifier`] shipped. [`FsProvider`] is a ready provider that keeps packages in a
//!   directory (std file system calls, no async runtime).
//! - With feature `tokio`: [`PackageSyncer`] runs a sync (downloads over HTTP(S) with
//!   [`Downloader`], verification, install, delete) and reports statuses to a sink, cancelling
//!   the previous sync when a new offer arrives.
//!
//! # Using it with [`OpampClient`](crate::OpampClient)
//!
//! Declare `AcceptsPackages` and `ReportsPackageStatuses`, hand every
//! [`MessageData::packages_available`](crate::MessageData::packages_available) to
//! [`PackageSyncer::offer`] and report what the syncer's sink receives with
//! [`OpampClient::set_package_statuses`](crate::OpampClient::set_package_statuses). At start,
//! report [`initial_statuses`] so that the server knows what the agent has (PKG-13).
//!
//! # Signatures
//!
//! What a signature covers is agent-specific (PKG-9). [`Ed25519Verifier`] expects
//! `DownloadableFile.signature` to be the 64-byte Ed25519 signature of the file's 32-byte
//! SHA-256 digest (the same bytes as `content_hash`), so that a file is hashed once while it
//! is downloaded and never read again to be verified.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use opamp_proto::{
    PackageAvailable, PackageDownloadDetails, PackageStatus, PackageStatusEnum, PackageStatuses,
    PackageType, PackagesAvailable,
};

#[cfg(feature = "tokio")]
mod download;
mod fs;
#[cfg(feature = "tokio")]
mod syncer;
#[cfg(test)]
mod tests;

#[cfg(feature = "tokio")]
pub use download::{DownloadError, DownloadSettings, Downloader};
pub use fs::FsProvider;
#[cfg(feature = "tokio")]
pub use syncer::{PackageSyncer, StatusSink};

/// A package the agent has, as its [`PackagesStateProvider`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledPackage {
    /// The package's name (PKG-1).
    pub name: String,
    /// Its version, as offered when it was installed (may be empty).
    pub version: String,
    /// The server's package hash (`PackageAvailable.hash`) it was installed from (PKG-5).
    pub hash: Bytes,
    /// The SHA-256 of the file's content (`DownloadableFile.content_hash`, PKG-6, PKG-9).
    pub content_hash: Bytes,
    /// Top-level or add-on.
    pub package_type: PackageType,
}

impl InstalledPackage {
    /// The package as it will be once `offered` is installed.
    pub fn from_offer(name: &str, offered: &PackageAvailable) -> Self {
        Self {
            name: name.to_owned(),
            version: offered.version.clone(),
            hash: offered.hash.clone(),
            content_hash: offered
                .file
                .as_ref()
                .map(|f| f.content_hash.clone())
                .unwrap_or_default(),
            package_type: PackageType::try_from(offered.r#type).unwrap_or(PackageType::TopLevel),
        }
    }
}

/// Where the agent keeps its packages; the agent implements it, or uses [`FsProvider`].
///
/// Calls are synchronous and short (file renames, metadata writes); the syncer makes them
/// one at a time. Every method may fail with an `io::Error`, which the syncer reports as the
/// package's (or the sync's) error message.
pub trait PackagesStateProvider: Send + Sync + 'static {
    /// The `all_packages_hash` of the last offer that was fully installed, if any (PKG-4).
    fn all_packages_hash(&self) -> io::Result<Option<Bytes>>;
    /// Remembers the `all_packages_hash` of an offer that is now fully installed.
    fn set_all_packages_hash(&self, hash: &[u8]) -> io::Result<()>;
    /// The packages the agent has.
    fn packages(&self) -> io::Result<Vec<InstalledPackage>>;
    /// A directory on the same file system as the installed packages, where downloads are
    /// written before [`install`](Self::install) moves them in (so the move is a rename).
    fn staging_dir(&self) -> io::Result<PathBuf>;
    /// Installs `file`, a downloaded and verified file in [`staging_dir`](Self::staging_dir)
    /// (already fsynced), as `package`, replacing what the agent had under that name. Must be
    /// atomic: on failure the old version stays as it was.
    fn install(&self, package: &InstalledPackage, file: &Path) -> io::Result<()>;
    /// Records a new version and package hash for a package whose content is unchanged
    /// (PKG-6: the file's content hash equals the offered one, nothing to download).
    fn update_metadata(&self, package: &InstalledPackage) -> io::Result<()>;
    /// Deletes a package the server no longer offers (PKG-5).
    fn delete(&self, name: &str) -> io::Result<()>;
}

/// What a sync does with one package.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum PackageAction {
    /// The agent has the offered package already (PKG-5: equal package hash).
    Keep {
        /// The package's name.
        name: String,
    },
    /// The content is the offered one but the package hash differs (PKG-6): only the
    /// metadata (version, hash) changes, nothing is downloaded.
    UpdateMetadata {
        /// The package's name.
        name: String,
        /// The offer.
        offered: PackageAvailable,
    },
    /// Download the offered file, verify and install it (PKG-5, PKG-6).
    Download {
        /// The package's name.
        name: String,
        /// The offer.
        offered: PackageAvailable,
    },
    /// The offer cannot be installed (no file, no URL, no SHA-256 content hash); reported
    /// as INSTALL_FAILED with `reason`.
    Refuse {
        /// The package's name.
        name: String,
        /// The offer.
        offered: PackageAvailable,
        /// Why, for the status's `error_message`.
        reason: String,
    },
    /// The agent has a package the server no longer offers: delete it (PKG-5).
    Delete {
        /// The package's name.
        name: String,
    },
}

impl PackageAction {
    /// The package this action is about.
    pub fn name(&self) -> &str {
        match self {
            Self::Keep { name }
            | Self::UpdateMetadata { name, .. }
            | Self::Download { name, .. }
            | Self::Refuse { name, .. }
            | Self::Delete { name } => name,
        }
    }
}

/// The SHA-256 digest length: `content_hash` must have it to be verified (PKG-9).
pub const SHA256_LEN: usize = 32;

/// Decides what to do with an offer (PKG-4, PKG-5, PKG-6). `None`: nothing to do, the
/// agent's all-packages hash is the offered one. An empty offered hash never matches (PKG-3
/// says it must be set; an unset one tells nothing).
///
/// Actions come in name order: offered packages, then the deletions.
pub fn plan(
    offer: &PackagesAvailable,
    all_packages_hash: Option<&[u8]>,
    installed: &[InstalledPackage],
) -> Option<Vec<PackageAction>> {
    // PKG-4: step 1.
    if !offer.all_packages_hash.is_empty()
        && all_packages_hash == Some(&offer.all_packages_hash[..])
    {
        return None;
    }
    let have: BTreeMap<&str, &InstalledPackage> =
        installed.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut actions = Vec::new();
    for (name, offered) in &offer.packages {
        let name = name.clone();
        let current = have.get(name.as_str());
        // PKG-5: step 2, the package hash.
        if let Some(current) = current {
            if !offered.hash.is_empty() && current.hash == offered.hash {
                actions.push(PackageAction::Keep { name });
                continue;
            }
        }
        let file = match &offered.file {
            Some(f) if !f.download_url.is_empty() => f,
            _ => {
                let reason = "the offer has no downloadable file".to_owned();
                actions.push(PackageAction::Refuse {
                    name,
                    offered: offered.clone(),
                    reason,
                });
                continue;
            }
        };
        if file.content_hash.len() != SHA256_LEN {
            let reason = format!(
                "the offer's content_hash is {} bytes, not a SHA-256 (32 bytes)",
                file.content_hash.len()
            );
            actions.push(PackageAction::Refuse {
                name,
                offered: offered.clone(),
                reason,
            });
            continue;
        }
        // PKG-6: step 3, the content hash.
        if current.is_some_and(|c| c.content_hash == file.content_hash) {
            actions.push(PackageAction::UpdateMetadata {
                name,
                offered: offered.clone(),
            });
        } else {
            actions.push(PackageAction::Download {
                name,
                offered: offered.clone(),
            });
        }
    }
    // PKG-5: packages the server did not offer are deleted.
    for p in installed {
        if !offer.packages.contains_key(&p.name) {
            actions.push(PackageAction::Delete {
                name: p.name.clone(),
            });
        }
    }
    Some(actions)
}

/// The statuses to report when the agent starts, before any offer: every package it has,
/// INSTALLED (PKG-13, PKG-17), with the all-packages hash it has.
pub fn initial_statuses(provider: &dyn PackagesStateProvider) -> io::Result<PackageStatuses> {
    let installed = provider.packages()?;
    let mut board = StatusBoard::from_installed(&installed);
    if let Some(hash) = provider.all_packages_hash()? {
        board.server_hash = hash;
    }
    Ok(board.snapshot())
}

/// The package statuses during a sync, kept to the spec's rules whatever the order of
/// updates: `error_message` only with INSTALL_FAILED, `download_details` only with
/// DOWNLOADING, `server_offered_*` with every state a server offer started (PKG-17..PKG-20).
#[derive(Clone, Debug, Default)]
pub struct StatusBoard {
    packages: BTreeMap<String, PackageStatus>,
    server_hash: Bytes,
    error: String,
}

impl StatusBoard {
    /// Every installed package as INSTALLED, with what the agent has (PKG-13, PKG-17); no
    /// server offer yet.
    pub fn from_installed(installed: &[InstalledPackage]) -> Self {
        let packages = installed
            .iter()
            .map(|p| {
                let status = PackageStatus {
                    name: p.name.clone(),
                    agent_has_version: p.version.clone(),
                    agent_has_hash: p.hash.clone(),
                    status: PackageStatusEnum::Installed as i32,
                    ..Default::default()
                };
                (p.name.clone(), status)
            })
            .collect();
        Self {
            packages,
            ..Default::default()
        }
    }

    /// The start of a sync of `offer` with `actions` (from [`plan`]): kept packages
    /// INSTALLED, downloads INSTALL_PENDING, refused offers INSTALL_FAILED, all with the
    /// offered version and hash (PKG-18). Deleted packages stay listed (the agent still has
    /// them, PKG-13) until [`removed`](Self::removed).
    pub fn begin(
        installed: &[InstalledPackage],
        offer: &PackagesAvailable,
        actions: &[PackageAction],
    ) -> Self {
        let mut board = Self::from_installed(installed);
        board.server_hash = offer.all_packages_hash.clone();
        for action in actions {
            let name = action.name();
            let Some(offered) = offer.packages.get(name) else {
                continue;
            };
            let entry = board.entry(name);
            entry.server_offered_version = offered.version.clone();
            entry.server_offered_hash = offered.hash.clone();
            match action {
                PackageAction::Keep { .. } => set_state(entry, PackageStatusEnum::Installed),
                PackageAction::UpdateMetadata { .. } | PackageAction::Download { .. } => {
                    set_state(entry, PackageStatusEnum::InstallPending)
                }
                PackageAction::Refuse { reason, .. } => {
                    set_state(entry, PackageStatusEnum::InstallFailed);
                    entry.error_message = reason.clone();
                }
                PackageAction::Delete { .. } => {}
            }
        }
        board
    }

    fn entry(&mut self, name: &str) -> &mut PackageStatus {
        // PKG-14: the key is the name, and the name is always set.
        self.packages
            .entry(name.to_owned())
            .or_insert_with(|| PackageStatus {
                name: name.to_owned(),
                ..Default::default()
            })
    }

    /// `name` is downloading, with its progress (PKG-12, PKG-20).
    pub fn downloading(&mut self, name: &str, details: PackageDownloadDetails) {
        let entry = self.entry(name);
        set_state(entry, PackageStatusEnum::Downloading);
        entry.download_details = Some(details);
    }

    /// `name` is downloaded and verified, being installed.
    pub fn installing(&mut self, name: &str) {
        set_state(self.entry(name), PackageStatusEnum::Installing);
    }

    /// `name` is installed: the agent has the offered version (PKG-17).
    pub fn installed(&mut self, name: &str) {
        let entry = self.entry(name);
        set_state(entry, PackageStatusEnum::Installed);
        entry.agent_has_version = entry.server_offered_version.clone();
        entry.agent_has_hash = entry.server_offered_hash.clone();
    }

    /// Installing `name` failed; what the agent had before stays reported (PKG-18, PKG-19).
    pub fn failed(&mut self, name: &str, message: impl Into<String>) {
        let entry = self.entry(name);
        set_state(entry, PackageStatusEnum::InstallFailed);
        entry.error_message = message.into();
    }

    /// `name` was deleted: the agent no longer has it, so it is no longer listed (PKG-13).
    pub fn removed(&mut self, name: &str) {
        self.packages.remove(name);
    }

    /// An error not tied to one package (PKG-16), e.g. the provider failing to list packages.
    pub fn set_error(&mut self, message: impl Into<String>) {
        self.error = message.into();
    }

    /// The status of one package, if listed.
    pub fn get(&self, name: &str) -> Option<&PackageStatus> {
        self.packages.get(name)
    }

    /// Whether every offered package is installed (none pending, failed or in progress).
    pub fn all_installed(&self) -> bool {
        self.error.is_empty()
            && self
                .packages
                .values()
                .all(|p| p.status == PackageStatusEnum::Installed as i32)
    }

    /// The statuses to report, with `server_provided_all_packages_hash` (PKG-15).
    pub fn snapshot(&self) -> PackageStatuses {
        PackageStatuses {
            packages: self.packages.clone(),
            server_provided_all_packages_hash: self.server_hash.clone(),
            error_message: self.error.clone(),
        }
    }
}

/// PKG-19, PKG-20: the error only with INSTALL_FAILED, download details only with
/// DOWNLOADING.
fn set_state(entry: &mut PackageStatus, state: PackageStatusEnum) {
    entry.status = state as i32;
    if state != PackageStatusEnum::InstallFailed {
        entry.error_message.clear();
    }
    if state != PackageStatusEnum::Downloading {
        entry.download_details = None;
    }
}

/// Download progress of one file: `download_details` (PKG-20) at most once per interval.
#[derive(Clone, Debug)]
pub struct DownloadProgress {
    start: Instant,
    total: Option<u64>,
    interval: Duration,
    last_report: Option<Instant>,
}

impl DownloadProgress {
    /// A download started at `start`, of `total` bytes if known, reported at most once per
    /// `interval`.
    pub fn new(start: Instant, total: Option<u64>, interval: Duration) -> Self {
        Self {
            start,
            total,
            interval,
            last_report: None,
        }
    }

    /// Sets the total size once known (a `Content-Length`, a `Content-Range`).
    pub fn set_total(&mut self, total: Option<u64>) {
        if total.is_some() {
            self.total = total;
        }
    }

    /// `received` bytes so far at `now`: the details to report, or `None` when the last report
    /// is less than an interval ago. The first call reports.
    pub fn update(&mut self, received: u64, now: Instant) -> Option<PackageDownloadDetails> {
        if let Some(last) = self.last_report {
            if now.saturating_duration_since(last) < self.interval {
                return None;
            }
        }
        self.last_report = Some(now);
        Some(self.details(received, now))
    }

    /// The details at `now`, whatever the interval.
    pub fn details(&self, received: u64, now: Instant) -> PackageDownloadDetails {
        let percent = match self.total {
            Some(0) => 100.0,
            Some(total) => (received as f64 * 100.0 / total as f64).min(100.0),
            None => 0.0,
        };
        let secs = now.saturating_duration_since(self.start).as_secs_f64();
        let rate = if secs > 0.0 {
            received as f64 / secs
        } else {
            0.0
        };
        PackageDownloadDetails {
            download_percent: percent,
            download_bytes_per_second: rate,
        }
    }
}

/// What a [`SignatureVerifier`] checks: a downloaded file whose SHA-256 matched the offer.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct SignedFile<'a> {
    /// The package's name.
    pub name: &'a str,
    /// The offered version.
    pub version: &'a str,
    /// The file's SHA-256, computed while downloading and equal to `content_hash`.
    pub sha256: &'a [u8; SHA256_LEN],
    /// The file itself (in the staging directory), for verifiers that read it.
    pub path: &'a Path,
    /// `DownloadableFile.signature` (may be empty).
    pub signature: &'a [u8],
}

/// Checks the signature of a downloaded file before it is installed (PKG-9, PKG-21).
pub trait SignatureVerifier: Send + Sync + 'static {
    /// `Ok` to install the file; `Err` with the reason, reported as INSTALL_FAILED
    /// "bad signature: {reason}".
    fn verify(&self, file: &SignedFile<'_>) -> Result<(), String>;
}

/// Installs files without checking any signature: only their SHA-256 is checked. PKG-21 asks
/// for code signing of executables; use this only where the content is not executed or
/// the channel and server are trusted otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct DangerousAcceptUnsigned;

impl SignatureVerifier for DangerousAcceptUnsigned {
    fn verify(&self, _: &SignedFile<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// Ed25519 signatures of the file's SHA-256 digest (see [Signatures](self#signatures)),
/// by any of the trusted keys. A missing signature is refused.
#[derive(Clone, Debug)]
pub struct Ed25519Verifier {
    keys: Vec<ed25519_dalek::VerifyingKey>,
}

/// A public key that is not an Ed25519 key.
#[derive(Debug, thiserror::Error)]
#[error("invalid Ed25519 public key: {0}")]
pub struct InvalidKey(String);

impl Ed25519Verifier {
    /// Trusts the given 32-byte public keys.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, InvalidKey> {
        let keys = keys
            .into_iter()
            .map(|k| {
                let bytes: [u8; 32] = k
                    .try_into()
                    .map_err(|_| InvalidKey(format!("{} bytes, not 32", k.len())))?;
                ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map_err(|e| InvalidKey(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(InvalidKey("no key given".into()));
        }
        Ok(Self { keys })
    }
}

impl SignatureVerifier for Ed25519Verifier {
    fn verify(&self, file: &SignedFile<'_>) -> Result<(), String> {
        if file.signature.is_empty() {
            return Err("the offer has no signature".into());
        }
        let signature = ed25519_dalek::Signature::from_slice(file.signature)
            .map_err(|_| format!("{} bytes, not an Ed25519 signature", file.signature.len()))?;
        if self
            .keys
            .iter()
            .any(|k| k.verify_strict(file.sha256, &signature).is_ok())
        {
            Ok(())
        } else {
            Err("not signed by a trusted key".into())
        }
    }
}
