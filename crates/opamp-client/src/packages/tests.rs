//! Deterministic tests of the sans-IO package decisions (no sockets, no clock).

use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use opamp_proto::{
    DownloadableFile, PackageAvailable, PackageStatusEnum, PackageType, PackagesAvailable,
};

use super::*;

fn sha(n: u8) -> Bytes {
    Bytes::from(vec![n; SHA256_LEN])
}

fn offered(version: &str, hash: &[u8], content: Bytes) -> PackageAvailable {
    PackageAvailable {
        r#type: PackageType::TopLevel as i32,
        version: version.into(),
        file: Some(DownloadableFile {
            download_url: "http://127.0.0.1:1/x".into(),
            content_hash: content,
            signature: Bytes::new(),
            headers: None,
        }),
        hash: Bytes::copy_from_slice(hash),
    }
}

fn have(name: &str, version: &str, hash: &[u8], content: Bytes) -> InstalledPackage {
    InstalledPackage {
        name: name.into(),
        version: version.into(),
        hash: Bytes::copy_from_slice(hash),
        content_hash: content,
        package_type: PackageType::TopLevel,
    }
}

fn offer(all: &[u8], packages: &[(&str, PackageAvailable)]) -> PackagesAvailable {
    PackagesAvailable {
        packages: packages
            .iter()
            .map(|(n, p)| ((*n).to_owned(), p.clone()))
            .collect(),
        all_packages_hash: Bytes::copy_from_slice(all),
    }
}

#[test]
fn pkg_4_equal_all_packages_hash_is_nothing_to_do() {
    let o = offer(b"all-1", &[("agent", offered("2", b"h2", sha(2)))]);
    let installed = [have("agent", "1", b"h1", sha(1))];
    assert_eq!(plan(&o, Some(b"all-1"), &installed), None);
    // A different or unknown aggregate: the packages are compared.
    assert!(plan(&o, Some(b"all-0"), &installed).is_some());
    assert!(plan(&o, None, &installed).is_some());
}

#[test]
fn pkg_3_empty_all_packages_hash_never_matches() {
    let o = offer(b"", &[]);
    assert_eq!(plan(&o, Some(b""), &[]), Some(vec![]));
}

#[test]
fn pkg_5_pkg_6_keep_update_download_delete() {
    let o = offer(
        b"all-2",
        &[
            ("same", offered("1", b"hs", sha(1))),
            ("meta", offered("1.1", b"hm2", sha(3))),
            ("changed", offered("2", b"hc2", sha(5))),
            ("new", offered("1", b"hn", sha(6))),
        ],
    );
    let installed = [
        have("same", "1", b"hs", sha(1)),
        have("meta", "1.0", b"hm1", sha(3)),
        have("changed", "1", b"hc1", sha(4)),
        have("gone", "1", b"hg", sha(7)),
    ];
    let actions = plan(&o, Some(b"all-1"), &installed).expect("a plan");
    let kinds: Vec<_> = actions
        .iter()
        .map(|a| match a {
            PackageAction::Keep { name } => format!("keep {name}"),
            PackageAction::UpdateMetadata { name, .. } => format!("meta {name}"),
            PackageAction::Download { name, .. } => format!("download {name}"),
            PackageAction::Refuse { name, .. } => format!("refuse {name}"),
            PackageAction::Delete { name } => format!("delete {name}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "download changed",
            "meta meta",
            "download new",
            "keep same",
            "delete gone"
        ]
    );
}

#[test]
fn pkg_9_offer_without_sha256_or_file_is_refused() {
    let mut no_file = offered("1", b"h", sha(1));
    no_file.file = None;
    let o = offer(
        b"all",
        &[
            ("short", offered("1", b"h", Bytes::from_static(b"md5ish"))),
            ("nofile", no_file),
        ],
    );
    let actions = plan(&o, None, &[]).expect("a plan");
    assert!(
        matches!(&actions[0], PackageAction::Refuse { name, .. } if name == "nofile"),
        "{actions:?}"
    );
    match &actions[1] {
        PackageAction::Refuse { name, reason, .. } => {
            assert_eq!(name, "short");
            assert!(reason.contains("not a SHA-256"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pkg_17_pkg_18_pkg_19_statuses_through_a_sync() {
    let installed = [have("agent", "1", b"h1", sha(1))];
    let o = offer(b"all-2", &[("agent", offered("2", b"h2", sha(2)))]);
    let actions = plan(&o, None, &installed).expect("a plan");
    let mut board = StatusBoard::begin(&installed, &o, &actions);
    let s = board.get("agent").expect("listed").clone();
    assert_eq!(s.status, PackageStatusEnum::InstallPending as i32);
    assert_eq!(s.agent_has_version, "1");
    assert_eq!(&s.server_offered_hash[..], b"h2");
    assert_eq!(s.server_offered_version, "2");

    let now = Instant::now();
    let mut progress = DownloadProgress::new(now, Some(1000), Duration::from_secs(1));
    let details = progress
        .update(500, now + Duration::from_secs(2))
        .expect("first");
    board.downloading("agent", details);
    let s = board.get("agent").expect("listed");
    assert_eq!(s.status, PackageStatusEnum::Downloading as i32);
    assert!(s.download_details.is_some());

    // PKG-19: failed keeps what the agent has; PKG-20: no download details any more.
    board.failed("agent", "hash mismatch");
    let s = board.get("agent").expect("listed").clone();
    assert_eq!(s.status, PackageStatusEnum::InstallFailed as i32);
    assert_eq!(s.error_message, "hash mismatch");
    assert_eq!(s.agent_has_version, "1");
    assert_eq!(&s.agent_has_hash[..], b"h1");
    assert!(s.download_details.is_none());
    assert!(!board.all_installed());

    // PKG-19: installed clears the error; the agent now has the offered version.
    board.installing("agent");
    assert!(board.get("agent").expect("listed").error_message.is_empty());
    board.installed("agent");
    let snap = board.snapshot();
    let s = &snap.packages["agent"];
    assert_eq!(s.status, PackageStatusEnum::Installed as i32);
    assert_eq!(s.agent_has_version, "2");
    assert_eq!(&s.agent_has_hash[..], b"h2");
    // PKG-14, PKG-15.
    assert_eq!(s.name, "agent");
    assert_eq!(&snap.server_provided_all_packages_hash[..], b"all-2");
    assert!(snap.error_message.is_empty());
    assert!(board.all_installed());
}

#[test]
fn pkg_13_deleted_package_is_no_longer_listed_and_new_one_has_nothing() {
    let installed = [have("old", "1", b"h", sha(1))];
    let o = offer(b"all", &[("new", offered("1", b"hn", sha(2)))]);
    let actions = plan(&o, None, &installed).expect("a plan");
    let mut board = StatusBoard::begin(&installed, &o, &actions);
    // PKG-17: offered but not installed: nothing the agent has.
    let new = board.get("new").expect("listed");
    assert!(new.agent_has_version.is_empty() && new.agent_has_hash.is_empty());
    // Still listed until deleted: the agent has it.
    assert!(board.get("old").is_some());
    board.removed("old");
    assert!(board.get("old").is_none());
}

#[test]
fn pkg_20_download_progress_is_rate_bounded() {
    let t0 = Instant::now();
    let mut p = DownloadProgress::new(t0, None, Duration::from_secs(1));
    let first = p.update(0, t0).expect("the first update reports");
    assert_eq!(first.download_percent, 0.0);
    assert!(p.update(100, t0 + Duration::from_millis(500)).is_none());
    p.set_total(Some(1000));
    let d = p
        .update(250, t0 + Duration::from_secs(1))
        .expect("an interval later");
    assert_eq!(d.download_percent, 25.0);
    assert_eq!(d.download_bytes_per_second, 250.0);
    assert!(p.update(300, t0 + Duration::from_millis(1500)).is_none());
    let d = p.update(1000, t0 + Duration::from_secs(2)).expect("again");
    assert_eq!(d.download_percent, 100.0);
    assert_eq!(d.download_bytes_per_second, 500.0);
}

#[test]
fn pkg_21_ed25519_verifier_accepts_the_trusted_key_only() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let other = SigningKey::from_bytes(&[8; 32]);
    let verifier =
        Ed25519Verifier::new([key.verifying_key().as_bytes().as_slice()]).expect("a valid key");
    let digest = [9u8; SHA256_LEN];
    let good = key.sign(&digest).to_bytes();
    let bad = other.sign(&digest).to_bytes();
    fn file<'a>(digest: &'a [u8; SHA256_LEN], signature: &'a [u8]) -> SignedFile<'a> {
        SignedFile {
            name: "agent",
            version: "1",
            sha256: digest,
            path: std::path::Path::new("unused"),
            signature,
        }
    }
    assert_eq!(verifier.verify(&file(&digest, &good)), Ok(()));
    assert!(verifier.verify(&file(&digest, &bad)).is_err());
    assert!(verifier.verify(&file(&[0; SHA256_LEN], &good)).is_err());
    assert!(verifier.verify(&file(&digest, b"")).is_err());
    assert!(verifier.verify(&file(&digest, b"short")).is_err());
    assert!(Ed25519Verifier::new([&[1u8; 5][..]]).is_err());
    assert!(Ed25519Verifier::new(std::iter::empty()).is_err());
}

#[test]
fn fs_provider_installs_atomically_and_deletes() {
    let dir = std::env::temp_dir().join(format!("opamp-pkg-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = FsProvider::new(&dir).expect("provider");
    assert_eq!(p.all_packages_hash().expect("read"), None);
    assert!(p.packages().expect("list").is_empty());
    // A name that would escape the root if used as a path.
    let name = "../../etc/passwd";
    let staged = p.staging_dir().expect("staging").join("f");
    std::fs::write(&staged, b"content").expect("write");
    let pkg = have(name, "1\nx", b"h\0", sha(3));
    p.install(&pkg, &staged).expect("install");
    assert!(!staged.exists(), "moved in");
    assert_eq!(p.packages().expect("list"), std::slice::from_ref(&pkg));
    assert_eq!(
        std::fs::read(p.content_path(name)).expect("read"),
        b"content"
    );
    assert!(p.content_path(name).starts_with(&dir));
    p.set_all_packages_hash(b"all").expect("set");
    assert_eq!(
        p.all_packages_hash().expect("read").as_deref(),
        Some(&b"all"[..])
    );
    p.delete(name).expect("delete");
    assert!(p.packages().expect("list").is_empty());
    p.delete(name).expect("deleting twice is fine");
    let _ = std::fs::remove_dir_all(&dir);
}
