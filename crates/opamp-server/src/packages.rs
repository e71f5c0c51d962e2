//! Building package offers and reading package statuses (PKG-*). Sans-IO, always built.
//!
//! [`PackagesOffer`] builds a [`PackagesAvailable`] with the hashes the spec asks the server
//! to compute (PKG-3, PKG-10, PKG-11); [`PackageFile`] is one `DownloadableFile`, its
//! SHA-256 `content_hash` (PKG-9) and optionally an Ed25519 signature of that digest, the form
//! `opamp_client::packages::Ed25519Verifier` checks. [`package_reports`] reads an agent's
//! [`PackageStatuses`]; [`has_offer`] tells whether an agent has an offer installed (PKG-15).
//!
//! Capability gating is the session core's: a `packages_available` goes only to agents with
//! `AcceptsPackages` from a server with `OffersPackages` (PKG-2), and not again once the agent
//! reported its `all_packages_hash`. To offer one set to many agents, put the built offer in a
//! [`SharedMessage`](crate::SharedMessage) (feature `tokio`): it is encoded once.
//!
//! # Hashes
//!
//! A package hash is the SHA-256 of, each length-prefixed, a domain tag, the name, the type,
//! the version, the URL, the content hash and the signature: everything offered but the
//! download headers. Headers are credentials (e.g. a per-agent token), not content: rotating
//! them must not make agents download again. The all-packages hash is the SHA-256 of the
//! names and package hashes in name order (PKG-3: server-provided packages only).

use std::collections::BTreeMap;

use bytes::Bytes;
use opamp_proto::{
    DownloadableFile, Header, Headers, PackageAvailable, PackageStatusEnum, PackageStatuses,
    PackageType, PackagesAvailable,
};
use sha2::{Digest, Sha256};

/// The SHA-256 of `content`: a `DownloadableFile.content_hash` (PKG-9).
pub fn content_hash(content: &[u8]) -> [u8; 32] {
    Sha256::digest(content).into()
}

/// One downloadable file of a package.
#[derive(Clone, PartialEq, Eq)]
pub struct PackageFile {
    url: String,
    content_hash: [u8; 32],
    signature: Bytes,
    headers: Vec<(String, String)>,
}

impl std::fmt::Debug for PackageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may be credentials: only their names are shown.
        f.debug_struct("PackageFile")
            .field("url", &self.url)
            .field("content_hash", &Bytes::copy_from_slice(&self.content_hash))
            .field("signed", &!self.signature.is_empty())
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PackageFile {
    /// The file at `url` whose content is `content` (hashed here).
    pub fn new(url: impl Into<String>, content: &[u8]) -> Self {
        Self::with_content_hash(url, content_hash(content))
    }

    /// The file at `url` whose SHA-256 is `content_hash`, for files too large to hold.
    pub fn with_content_hash(url: impl Into<String>, content_hash: [u8; 32]) -> Self {
        Self {
            url: url.into(),
            content_hash,
            signature: Bytes::new(),
            headers: Vec::new(),
        }
    }

    /// A header the agent sends with its GET (PKG-6), e.g. an `Authorization` token.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A detached signature made elsewhere (PKG-21 advises keeping the signing key away from
    /// the OpAMP server).
    pub fn with_signature(mut self, signature: impl Into<Bytes>) -> Self {
        self.signature = signature.into();
        self
    }

    /// Signs the content hash with this Ed25519 key (32-byte seed): the signature that
    /// `opamp_client::packages::Ed25519Verifier` accepts with the matching public key.
    pub fn signed_ed25519(self, seed: &[u8; 32]) -> Self {
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let signature = key.sign(&self.content_hash).to_bytes();
        self.with_signature(Bytes::copy_from_slice(&signature))
    }

    /// The Ed25519 public key of a 32-byte seed, for the agents to trust.
    pub fn ed25519_public_key(seed: &[u8; 32]) -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes()
    }

    /// The content hash.
    pub fn content_hash(&self) -> &[u8; 32] {
        &self.content_hash
    }

    fn to_proto(&self) -> DownloadableFile {
        let headers = (!self.headers.is_empty()).then(|| Headers {
            headers: self
                .headers
                .iter()
                .map(|(key, value)| Header {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
        });
        DownloadableFile {
            download_url: self.url.clone(),
            content_hash: Bytes::copy_from_slice(&self.content_hash),
            signature: self.signature.clone(),
            headers,
        }
    }
}

/// Builds a [`PackagesAvailable`] with its package and all-packages hashes.
///
/// ```
/// use opamp_server::packages::{PackageFile, PackagesOffer};
///
/// let offer = PackagesOffer::new()
///     .top_level("", "1.4.0", PackageFile::new("https://repo.example/agent-1.4.0", b"..."))
///     .build();
/// assert_eq!(offer.all_packages_hash.len(), 32);
/// ```
#[derive(Clone, Debug, Default)]
pub struct PackagesOffer {
    packages: BTreeMap<String, (PackageType, String, PackageFile)>,
}

impl PackagesOffer {
    /// An empty offer: building it tells the agent to delete every package the server gave it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a top-level package (PKG-1; its name may be empty).
    pub fn top_level(
        self,
        name: impl Into<String>,
        version: impl Into<String>,
        file: PackageFile,
    ) -> Self {
        self.package(name, PackageType::TopLevel, version, file)
    }

    /// Adds (or replaces) an add-on package.
    pub fn addon(
        self,
        name: impl Into<String>,
        version: impl Into<String>,
        file: PackageFile,
    ) -> Self {
        self.package(name, PackageType::Addon, version, file)
    }

    /// Adds (or replaces) a package.
    pub fn package(
        mut self,
        name: impl Into<String>,
        kind: PackageType,
        version: impl Into<String>,
        file: PackageFile,
    ) -> Self {
        self.packages
            .insert(name.into(), (kind, version.into(), file));
        self
    }

    /// The offer, with every hash computed (PKG-3, PKG-10, PKG-11).
    pub fn build(&self) -> PackagesAvailable {
        let mut all = Sha256::new();
        field(&mut all, b"opamp-all-packages-v1");
        let mut packages = BTreeMap::new();
        for (name, (kind, version, file)) in &self.packages {
            let mut h = Sha256::new();
            field(&mut h, b"opamp-package-v1");
            field(&mut h, name.as_bytes());
            field(&mut h, &(*kind as i32).to_be_bytes());
            field(&mut h, version.as_bytes());
            field(&mut h, file.url.as_bytes());
            field(&mut h, &file.content_hash);
            field(&mut h, &file.signature);
            let hash: [u8; 32] = h.finalize().into();
            field(&mut all, name.as_bytes());
            field(&mut all, &hash);
            packages.insert(
                name.clone(),
                PackageAvailable {
                    r#type: *kind as i32,
                    version: version.clone(),
                    file: Some(file.to_proto()),
                    hash: Bytes::copy_from_slice(&hash),
                },
            );
        }
        let all: [u8; 32] = all.finalize().into();
        PackagesAvailable {
            packages,
            all_packages_hash: Bytes::copy_from_slice(&all),
        }
    }
}

/// Length-prefixed, so that no two field sequences hash alike.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// One package of an agent's [`PackageStatuses`], read.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PackageReport<'a> {
    /// The package's name (the map key, PKG-14).
    pub name: &'a str,
    /// The state; `None` for a value this version of the spec does not know.
    pub status: Option<PackageStatusEnum>,
    /// The version the agent has (empty when it has none, PKG-17).
    pub agent_has_version: &'a str,
    /// The package hash the agent has.
    pub agent_has_hash: &'a [u8],
    /// The version of the offer being or last installed (PKG-18).
    pub server_offered_version: &'a str,
    /// The package hash of that offer.
    pub server_offered_hash: &'a [u8],
    /// Why the install failed (INSTALL_FAILED only, PKG-19).
    pub error_message: &'a str,
    /// Download progress in percent and bytes per second (DOWNLOADING only, PKG-20).
    pub download: Option<(f64, f64)>,
}

/// The packages of `statuses`, in name order.
pub fn package_reports(statuses: &PackageStatuses) -> impl Iterator<Item = PackageReport<'_>> {
    statuses.packages.iter().map(|(name, s)| PackageReport {
        name,
        status: PackageStatusEnum::try_from(s.status).ok(),
        agent_has_version: &s.agent_has_version,
        agent_has_hash: &s.agent_has_hash,
        server_offered_version: &s.server_offered_version,
        server_offered_hash: &s.server_offered_hash,
        error_message: &s.error_message,
        download: s
            .download_details
            .map(|d| (d.download_percent, d.download_bytes_per_second)),
    })
}

/// Whether the agent reports `offer` fully installed: it echoes the offer's all-packages hash
/// (PKG-15) and has every offered package at its offered hash, INSTALLED.
pub fn has_offer(statuses: &PackageStatuses, offer: &PackagesAvailable) -> bool {
    statuses.server_provided_all_packages_hash == offer.all_packages_hash
        && offer.packages.iter().all(|(name, p)| {
            statuses.packages.get(name).is_some_and(|s| {
                s.status == PackageStatusEnum::Installed as i32 && s.agent_has_hash == p.hash
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer_of(version: &str, url: &str) -> PackagesAvailable {
        PackagesOffer::new()
            .top_level("agent", version, PackageFile::new(url, b"content"))
            .build()
    }

    #[test]
    fn pkg_10_pkg_11_hashes_cover_every_field_but_headers() {
        let base = offer_of("1", "http://x/a");
        assert_eq!(base, offer_of("1", "http://x/a"), "deterministic");
        assert_ne!(
            base.all_packages_hash,
            offer_of("2", "http://x/a").all_packages_hash
        );
        assert_ne!(
            base.all_packages_hash,
            offer_of("1", "http://x/b").all_packages_hash
        );
        let file = PackageFile::new("http://x/a", b"content");
        let other_content = PackagesOffer::new()
            .top_level("agent", "1", PackageFile::new("http://x/a", b"other"))
            .build();
        assert_ne!(
            base.packages["agent"].hash,
            other_content.packages["agent"].hash
        );
        let signed = PackagesOffer::new()
            .top_level("agent", "1", file.clone().signed_ed25519(&[3; 32]))
            .build();
        assert_ne!(base.packages["agent"].hash, signed.packages["agent"].hash);
        let addon = PackagesOffer::new()
            .addon("agent", "1", file.clone())
            .build();
        assert_ne!(base.packages["agent"].hash, addon.packages["agent"].hash);
        let with_token = PackagesOffer::new()
            .top_level("agent", "1", file.with_header("authorization", "Bearer t"))
            .build();
        assert_eq!(
            base.packages["agent"].hash,
            with_token.packages["agent"].hash
        );
        assert_eq!(base.all_packages_hash, with_token.all_packages_hash);
        let headers = with_token.packages["agent"]
            .file
            .as_ref()
            .unwrap()
            .headers
            .as_ref();
        assert_eq!(headers.unwrap().headers[0].value, "Bearer t");
        // PKG-3: the aggregate covers the names.
        let renamed = PackagesOffer::new()
            .top_level("agent2", "1", PackageFile::new("http://x/a", b"content"))
            .build();
        assert_ne!(base.all_packages_hash, renamed.all_packages_hash);
        assert_eq!(
            &base.packages["agent"].file.as_ref().unwrap().content_hash[..],
            &content_hash(b"content")
        );
    }

    #[test]
    fn ed25519_signature_is_over_the_content_hash() {
        use ed25519_dalek::Verifier;
        let seed = [5; 32];
        let file = PackageFile::new("http://x", b"data").signed_ed25519(&seed);
        let key = ed25519_dalek::VerifyingKey::from_bytes(&PackageFile::ed25519_public_key(&seed))
            .unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&file.to_proto().signature).unwrap();
        assert!(key.verify(&content_hash(b"data"), &sig).is_ok());
    }

    #[test]
    fn pkg_15_has_offer_needs_the_echoed_hash_and_every_package_installed() {
        use opamp_proto::PackageStatus;
        let offer = offer_of("1", "http://x/a");
        let mut statuses = PackageStatuses {
            server_provided_all_packages_hash: offer.all_packages_hash.clone(),
            ..Default::default()
        };
        let mut agent = PackageStatus {
            name: "agent".into(),
            agent_has_version: "1".into(),
            agent_has_hash: offer.packages["agent"].hash.clone(),
            status: PackageStatusEnum::Downloading as i32,
            download_details: Some(opamp_proto::PackageDownloadDetails {
                download_percent: 50.0,
                download_bytes_per_second: 10.0,
            }),
            ..Default::default()
        };
        statuses.packages.insert("agent".into(), agent.clone());
        assert!(!has_offer(&statuses, &offer));
        let report = package_reports(&statuses).next().unwrap();
        assert_eq!(report.status, Some(PackageStatusEnum::Downloading));
        assert_eq!(report.download, Some((50.0, 10.0)));
        agent.status = PackageStatusEnum::Installed as i32;
        agent.download_details = None;
        statuses.packages.insert("agent".into(), agent);
        assert!(has_offer(&statuses, &offer));
        statuses.server_provided_all_packages_hash = Bytes::from_static(b"old");
        assert!(!has_offer(&statuses, &offer));
    }
}
