//! The reference server's package repository (PKG-*): files uploaded over the API, signed by
//! the server's Ed25519 key, served with `Range` support behind a per-agent token, and
//! package sets that offer them to the agents whose attributes match. In memory, bounded by
//! [`PackageLimits`].

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use opamp::proto::{InstanceUid, PackagesAvailable};
use opamp::server::packages::{PackageFile, PackagesOffer, content_hash};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::store::{hex, lock};

/// What the repository keeps at most.
#[derive(Debug, Clone)]
pub(crate) struct PackageLimits {
    /// Bytes of one uploaded file.
    pub(crate) package_bytes: usize,
    /// Bytes of every stored file together.
    pub(crate) total_bytes: usize,
    /// Stored package versions.
    pub(crate) packages: usize,
    /// Package sets.
    pub(crate) sets: usize,
    /// Packages of one set, and attributes of one set's selector.
    pub(crate) set_entries: usize,
    /// Bytes of a name, version or selector key/value.
    pub(crate) text: usize,
}

impl Default for PackageLimits {
    fn default() -> Self {
        Self {
            package_bytes: 64 << 20,
            total_bytes: 256 << 20,
            packages: 256,
            sets: 64,
            set_entries: 32,
            text: 128,
        }
    }
}

/// Why an API call on the repository was refused, with its HTTP status.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RepoError {
    /// 400.
    Invalid(String),
    /// 404.
    NotFound(String),
    /// 409: a limit on counts, or a version uploaded again with another content.
    Conflict(String),
    /// 413: over the size limits.
    TooLarge(String),
}

/// One stored version.
#[derive(Debug)]
struct Stored {
    content: Bytes,
    sha256: [u8; 32],
    /// The offered file without the per-agent header: URL, content hash, signature.
    file: PackageFile,
    /// Signed by this server's key (not a signature uploaded with the file).
    server_signed: bool,
}

/// A package set: which agents (every `selector` attribute equal) get which versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageSet {
    pub(crate) selector: BTreeMap<String, String>,
    pub(crate) packages: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By (name, version).
    packages: BTreeMap<(String, String), Stored>,
    total_bytes: usize,
    sets: BTreeMap<String, PackageSet>,
}

/// The repository.
pub(crate) struct Repo {
    inner: Mutex<Inner>,
    limits: PackageLimits,
    /// The Ed25519 signing key's seed.
    seed: [u8; 32],
    /// The key of the per-agent download tokens.
    token_key: [u8; 32],
    /// `http://HOST:PORT` of the API listener, which serves the downloads.
    base_url: String,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys stay out of logs.
        f.debug_struct("Repo")
            .field("limits", &self.limits)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Default for Repo {
    fn default() -> Self {
        Self::new(
            PackageLimits::default(),
            rand::random(),
            "http://127.0.0.1:4321".into(),
        )
    }
}

/// Names and versions are used in URL paths as they are: a conservative alphabet.
fn check_name(what: &str, s: &str, limits: &PackageLimits) -> Result<(), RepoError> {
    let ok = !s.is_empty()
        && s.len() <= limits.text
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b))
        && s != "."
        && s != "..";
    if ok {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "{what} {s:?}: 1 to {} characters of A-Z a-z 0-9 . _ - + ~",
            limits.text
        )))
    }
}

impl Repo {
    /// A repository signing with `seed`, serving downloads from `base_url`.
    pub(crate) fn new(limits: PackageLimits, seed: [u8; 32], base_url: String) -> Self {
        Self {
            inner: Mutex::default(),
            limits,
            seed,
            token_key: rand::random(),
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    /// The same repository with download tokens keyed by `key` (kept in the store, so that
    /// every node and every restart accepts the tokens of the others).
    pub(crate) fn with_token_key(mut self, key: [u8; 32]) -> Self {
        self.token_key = key;
        self
    }

    /// The public key agents trust (`agent --accept-packages`).
    pub(crate) fn public_key(&self) -> [u8; 32] {
        PackageFile::ed25519_public_key(&self.seed)
    }

    /// The largest upload.
    pub(crate) fn max_package_bytes(&self) -> usize {
        self.limits.package_bytes
    }

    /// Stores `content` as `name` `version`, signed by the server's key, or with `signature`
    /// (64 bytes, made elsewhere) when given. Uploading the same content again is a no-op.
    pub(crate) fn put(
        &self,
        name: &str,
        version: &str,
        content: Bytes,
        signature: Option<Bytes>,
    ) -> Result<Value, RepoError> {
        let limits = &self.limits;
        check_name("package name", name, limits)?;
        check_name("version", version, limits)?;
        if content.len() > limits.package_bytes {
            return Err(RepoError::TooLarge(format!(
                "the file has {} bytes; packages are limited to {} bytes",
                content.len(),
                limits.package_bytes
            )));
        }
        if let Some(sig) = &signature {
            if sig.len() != 64 {
                return Err(RepoError::Invalid(format!(
                    "the signature has {} bytes, not 64 (Ed25519)",
                    sig.len()
                )));
            }
        }
        let sha256 = content_hash(&content);
        let url = format!("{}/api/v1/packages/{name}/{version}/file", self.base_url);
        let unsigned = PackageFile::with_content_hash(url, sha256);
        let server_signed = signature.is_none();
        let file = match signature {
            Some(sig) => unsigned.with_signature(sig),
            None => unsigned.signed_ed25519(&self.seed),
        };
        let mut inner = lock(&self.inner);
        let key = (name.to_owned(), version.to_owned());
        if let Some(old) = inner.packages.get(&key) {
            if old.file == file {
                return Ok(package_json(name, version, old));
            }
            return Err(RepoError::Conflict(format!(
                "{name} {version} exists with other content or signature: versions are immutable"
            )));
        }
        if inner.packages.len() >= limits.packages {
            return Err(RepoError::Conflict(format!(
                "the repository holds its limit of {} package versions",
                limits.packages
            )));
        }
        if inner.total_bytes + content.len() > limits.total_bytes {
            return Err(RepoError::TooLarge(format!(
                "the repository holds {} of its {} bytes: no room for {} more",
                inner.total_bytes,
                limits.total_bytes,
                content.len()
            )));
        }
        inner.total_bytes += content.len();
        let stored = Stored {
            // A copy: the request's buffer is not kept alive with the rest of it.
            content: Bytes::copy_from_slice(&content),
            sha256,
            file,
            server_signed,
        };
        let answer = package_json(name, version, &stored);
        inner.packages.insert(key, stored);
        Ok(answer)
    }

    /// `GET /api/v1/packages`.
    pub(crate) fn list_json(&self) -> Value {
        let inner = lock(&self.inner);
        json!({
            "public_key": hex(&self.public_key()),
            "total_bytes": inner.total_bytes,
            "packages": inner
                .packages
                .iter()
                .map(|((n, v), s)| package_json(n, v, s))
                .collect::<Vec<_>>(),
            "package_sets": inner
                .sets
                .iter()
                .map(|(name, set)| (name.clone(), json!({
                    "selector": set.selector,
                    "packages": set.packages,
                })))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// The file of `name` `version`.
    pub(crate) fn file(&self, name: &str, version: &str) -> Option<Bytes> {
        let inner = lock(&self.inner);
        inner
            .packages
            .get(&(name.to_owned(), version.to_owned()))
            .map(|s| s.content.clone())
    }

    fn mac(&self, uid: InstanceUid) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"opamp-reference-download-token-v1");
        h.update(self.token_key);
        h.update(uid.to_bytes());
        h.finalize().into()
    }

    /// The `Authorization` value that lets agent `uid` download (offered in the file's
    /// headers, PKG-6).
    pub(crate) fn authorization(&self, uid: InstanceUid) -> String {
        format!("Bearer {uid}.{}", hex(&self.mac(uid)))
    }

    /// Whether `authorization` is a token this server gave an agent.
    pub(crate) fn authorized(&self, authorization: Option<&str>) -> bool {
        let Some((uid, mac)) = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| t.split_once('.'))
        else {
            return false;
        };
        let Ok(uid) = uid.parse::<InstanceUid>() else {
            return false;
        };
        let want = hex(&self.mac(uid));
        // Compared in constant time.
        want.len() == mac.len()
            && want
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Creates or replaces package set `name`; every package must be in the repository.
    pub(crate) fn put_set(&self, name: &str, set: PackageSet) -> Result<(), RepoError> {
        let limits = &self.limits;
        check_name("package set name", name, limits)?;
        if set.packages.len() > limits.set_entries || set.selector.len() > limits.set_entries {
            return Err(RepoError::Invalid(format!(
                "a set has at most {} packages and {} selector attributes",
                limits.set_entries, limits.set_entries
            )));
        }
        for (k, v) in &set.selector {
            if k.is_empty() || k.len() > limits.text || v.len() > limits.text {
                return Err(RepoError::Invalid(format!(
                    "selector keys are 1 to {} bytes, values at most {}",
                    limits.text, limits.text
                )));
            }
        }
        let mut inner = lock(&self.inner);
        for (package, version) in &set.packages {
            if !inner
                .packages
                .contains_key(&(package.clone(), version.clone()))
            {
                return Err(RepoError::NotFound(format!(
                    "no package {package:?} version {version:?}: upload it first"
                )));
            }
        }
        if !inner.sets.contains_key(name) && inner.sets.len() >= limits.sets {
            return Err(RepoError::Conflict(format!(
                "the server holds its limit of {} package sets",
                limits.sets
            )));
        }
        inner.sets.insert(name.to_owned(), set);
        Ok(())
    }

    /// Takes back an upload the database did not store (nothing was acknowledged).
    pub(crate) fn remove(&self, name: &str, version: &str) {
        let mut inner = lock(&self.inner);
        if let Some(old) = inner
            .packages
            .remove(&(name.to_owned(), version.to_owned()))
        {
            inner.total_bytes -= old.content.len();
        }
    }

    /// Whether `name` `version` is held.
    pub(crate) fn contains(&self, name: &str, version: &str) -> bool {
        lock(&self.inner)
            .packages
            .contains_key(&(name.to_owned(), version.to_owned()))
    }

    /// Package set `name`, if it exists.
    pub(crate) fn set(&self, name: &str) -> Option<PackageSet> {
        lock(&self.inner).sets.get(name).cloned()
    }

    /// Puts package set `name` back as it was (`None`: it did not exist).
    pub(crate) fn restore_set(&self, name: &str, set: Option<PackageSet>) {
        let mut inner = lock(&self.inner);
        match set {
            Some(set) => inner.sets.insert(name.to_owned(), set),
            None => inner.sets.remove(name),
        };
    }

    /// Whether any package set exists (cheap check before matching agents).
    pub(crate) fn has_sets(&self) -> bool {
        !lock(&self.inner).sets.is_empty()
    }

    /// The offer for agent `uid`: the packages of every set whose selector `matches` it, in
    /// set name order (a later set's version of a package wins). `None` when no set matches:
    /// the agent's packages are then left as they are.
    pub(crate) fn offer_for(
        &self,
        uid: InstanceUid,
        matches: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Option<PackagesAvailable> {
        let inner = lock(&self.inner);
        let mut chosen: BTreeMap<&str, &str> = BTreeMap::new();
        let mut any = false;
        for set in inner.sets.values() {
            if matches(&set.selector) {
                any = true;
                for (p, v) in &set.packages {
                    chosen.insert(p, v);
                }
            }
        }
        if !any {
            return None;
        }
        let authorization = self.authorization(uid);
        let mut offer = PackagesOffer::new();
        for (name, version) in chosen {
            let Some(stored) = inner.packages.get(&(name.to_owned(), version.to_owned())) else {
                continue; // sets only name stored versions, and versions are never removed
            };
            let file = stored
                .file
                .clone()
                .with_header("Authorization", authorization.clone());
            offer = offer.addon(name, version, file);
        }
        Some(offer.build())
    }
}

fn package_json(name: &str, version: &str, s: &Stored) -> Value {
    json!({
        "name": name,
        "version": version,
        "size": s.content.len(),
        "sha256": hex(&s.sha256),
        "signed_by": if s.server_signed { "server" } else { "uploader" },
    })
}

/// What a `Range` header asks of a file of `len` bytes (RFC 9110 §14).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeAsk {
    /// No range, or one in a unit other than bytes, or several ranges: the whole file (200).
    Full,
    /// Bytes `start..=end` (206).
    Part(u64, u64),
    /// Malformed or outside the file (416).
    Unsatisfiable,
}

/// Parses a single `bytes=` range; several ranges are answered with the whole file.
pub(crate) fn parse_range(header: Option<&str>, len: u64) -> RangeAsk {
    let Some(h) = header else {
        return RangeAsk::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAsk::Full;
    };
    if spec.contains(',') {
        return RangeAsk::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Unsatisfiable;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", suffix) => match num(suffix) {
            Some(n) if n > 0 && len > 0 => RangeAsk::Part(len.saturating_sub(n), len - 1),
            _ => RangeAsk::Unsatisfiable,
        },
        (start, "") => match num(start) {
            Some(s) if s < len => RangeAsk::Part(s, len - 1),
            _ => RangeAsk::Unsatisfiable,
        },
        (start, end) => match (num(start), num(end)) {
            (Some(s), Some(e)) if s <= e && s < len => RangeAsk::Part(s, e.min(len - 1)),
            _ => RangeAsk::Unsatisfiable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(limits: PackageLimits) -> Repo {
        Repo::new(limits, [7; 32], "http://127.0.0.1:1".into())
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeAsk::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(parse_range(Some("bytes=2-"), 10), Part(2, 9));
        assert_eq!(parse_range(Some("bytes=2-4"), 10), Part(2, 4));
        assert_eq!(parse_range(Some("bytes=2-400"), 10), Part(2, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=x-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=+1-2"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[test]
    fn the_repository_is_bounded_in_bytes_and_count() {
        let r = repo(PackageLimits {
            package_bytes: 100,
            total_bytes: 150,
            packages: 3,
            ..PackageLimits::default()
        });
        let body = |n: usize| Bytes::from(vec![b'x'; n]);
        assert!(matches!(
            r.put("a", "1", body(101), None),
            Err(RepoError::TooLarge(_))
        ));
        r.put("a", "1", body(100), None).unwrap();
        assert!(matches!(
            r.put("a", "2", body(51), None),
            Err(RepoError::TooLarge(_))
        ));
        r.put("a", "2", body(25), None).unwrap();
        // Same content again: accepted, nothing added; other content: immutable.
        r.put("a", "2", body(25), None).unwrap();
        assert!(matches!(
            r.put("a", "2", body(24), None),
            Err(RepoError::Conflict(_))
        ));
        r.put("b", "1", body(1), None).unwrap();
        assert!(matches!(
            r.put("c", "1", body(1), None),
            Err(RepoError::Conflict(_))
        ));
        assert_eq!(r.list_json()["total_bytes"], 126);
        for bad in ["", "..", "a/b", "a b", &"n".repeat(200)] {
            assert!(
                matches!(r.put(bad, "1", body(1), None), Err(RepoError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            r.put("d", "1", body(1), Some(Bytes::from_static(b"short"))),
            Err(RepoError::Invalid(_))
        ));
    }

    #[test]
    fn tokens_are_per_agent_and_checked() {
        let r = repo(PackageLimits::default());
        let a: InstanceUid = "01890000-0000-7000-8000-000000000001".parse().unwrap();
        let b: InstanceUid = "01890000-0000-7000-8000-000000000002".parse().unwrap();
        let ta = r.authorization(a);
        assert!(r.authorized(Some(&ta)));
        assert_ne!(ta, r.authorization(b));
        let forged = ta.replace(&a.to_string(), &b.to_string());
        assert!(!r.authorized(Some(&forged)));
        assert!(!r.authorized(None));
        assert!(!r.authorized(Some("Bearer ")));
        assert!(!r.authorized(Some(&ta[..ta.len() - 1])));
        let other_server = repo(PackageLimits::default());
        assert!(!other_server.authorized(Some(&ta)));
    }

    #[test]
    fn sets_offer_signed_files_to_matching_agents_only() {
        use ed25519_dalek::Verifier;
        let r = repo(PackageLimits::default());
        r.put("tool", "1", Bytes::from_static(b"v1"), None).unwrap();
        r.put("tool", "2", Bytes::from_static(b"v2"), None).unwrap();
        let set = |v: &str| PackageSet {
            selector: [("service.name".to_owned(), "x".to_owned())].into(),
            packages: [("tool".to_owned(), v.to_owned())].into(),
        };
        assert!(matches!(
            r.put_set("s", set("3")),
            Err(RepoError::NotFound(_))
        ));
        r.put_set("s", set("1")).unwrap();
        let uid = InstanceUid::new_v7();
        assert!(r.offer_for(uid, |_| false).is_none());
        let offer = r
            .offer_for(uid, |sel| {
                sel.get("service.name").map(String::as_str) == Some("x")
            })
            .unwrap();
        let file = offer.packages["tool"].file.clone().unwrap();
        assert_eq!(
            file.download_url,
            "http://127.0.0.1:1/api/v1/packages/tool/1/file"
        );
        assert_eq!(&file.content_hash[..], &content_hash(b"v1"));
        let key = ed25519_dalek::VerifyingKey::from_bytes(&r.public_key()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&file.signature).unwrap();
        assert!(key.verify(&file.content_hash, &sig).is_ok());
        let header = &file.headers.unwrap().headers[0];
        assert!(r.authorized(Some(&header.value)));
        r.put_set("s", set("2")).unwrap();
        let v2 = r.offer_for(uid, |_| true).unwrap();
        assert_ne!(v2.all_packages_hash, offer.all_packages_hash);
        assert_eq!(v2.packages["tool"].version, "2");
    }
}
