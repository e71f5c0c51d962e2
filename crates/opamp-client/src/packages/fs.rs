//! [`FsProvider`]: packages kept in a directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use opamp_proto::PackageType;

use super::{InstalledPackage, PackagesStateProvider};

/// Packages in a directory, one sub-directory per package:
///
/// ```text
/// ROOT/all_packages_hash            hex of the last fully installed offer's hash
/// ROOT/staging/                     downloads in progress (emptied by `new`)
/// ROOT/packages/HEX(NAME)/content   the package's file
/// ROOT/packages/HEX(NAME)/meta      name, version, type, package hash, content hash
/// ```
///
/// Names are hex-encoded on disk, so no offered name can reach outside `ROOT`. Every file is
/// written to a temporary file, fsynced and renamed into place, then the directory is fsynced:
/// a crash leaves either the old or the new file. The content is renamed before the metadata;
/// a crash between the two leaves the old metadata, whose package hash then differs from the
/// offer, so the next sync downloads the package again.
#[derive(Debug)]
pub struct FsProvider {
    root: PathBuf,
    counter: AtomicU64,
}

const META: &str = "meta";
const CONTENT: &str = "content";

impl FsProvider {
    /// Uses (and creates) `root`, removing downloads an earlier run left unfinished.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(root.join("packages"))?;
        let staging = root.join("staging");
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir_all(&staging)?;
        Ok(Self {
            root,
            counter: AtomicU64::new(0),
        })
    }

    /// The installed file of package `name` (it may not exist).
    pub fn content_path(&self, name: &str) -> PathBuf {
        self.package_dir(name).join(CONTENT)
    }

    fn package_dir(&self, name: &str) -> PathBuf {
        self.root.join("packages").join(hex(name.as_bytes()))
    }

    /// Writes `data` to `dest` atomically: temporary file, fsync, rename, fsync of the
    /// directory.
    fn write_atomic(&self, dest: &Path, data: &[u8]) -> io::Result<()> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("staging")
            .join(format!("write-{}-{n}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, dest)?;
            sync_parent(dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn read_meta(&self, dir: &Path) -> io::Result<InstalledPackage> {
        let text = fs::read_to_string(dir.join(META))?;
        let mut p = InstalledPackage {
            name: String::new(),
            version: String::new(),
            hash: Bytes::new(),
            content_hash: Bytes::new(),
            package_type: PackageType::TopLevel,
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = unhex(value).ok_or_else(|| bad_meta(dir))?;
            match key {
                "name" => p.name = String::from_utf8(value).map_err(|_| bad_meta(dir))?,
                "version" => p.version = String::from_utf8(value).map_err(|_| bad_meta(dir))?,
                "hash" => p.hash = value.into(),
                "content_hash" => p.content_hash = value.into(),
                "type" if value == b"addon" => p.package_type = PackageType::Addon,
                _ => {}
            }
        }
        Ok(p)
    }

    fn write_meta(&self, package: &InstalledPackage) -> io::Result<()> {
        let kind: &[u8] = match package.package_type {
            PackageType::Addon => b"addon",
            PackageType::TopLevel => b"toplevel",
        };
        let text = format!(
            "name={}\nversion={}\ntype={}\nhash={}\ncontent_hash={}\n",
            hex(package.name.as_bytes()),
            hex(package.version.as_bytes()),
            hex(kind),
            hex(&package.hash),
            hex(&package.content_hash),
        );
        let dir = self.package_dir(&package.name);
        fs::create_dir_all(&dir)?;
        self.write_atomic(&dir.join(META), text.as_bytes())
    }
}

impl PackagesStateProvider for FsProvider {
    fn all_packages_hash(&self) -> io::Result<Option<Bytes>> {
        match fs::read_to_string(self.root.join("all_packages_hash")) {
            Ok(text) => Ok(Some(
                unhex(text.trim())
                    .ok_or_else(|| bad_meta(&self.root))?
                    .into(),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set_all_packages_hash(&self, hash: &[u8]) -> io::Result<()> {
        self.write_atomic(&self.root.join("all_packages_hash"), hex(hash).as_bytes())
    }

    fn packages(&self) -> io::Result<Vec<InstalledPackage>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.root.join("packages"))? {
            let dir = entry?.path();
            // A package directory without metadata was never fully installed.
            if !dir.join(META).exists() {
                continue;
            }
            out.push(self.read_meta(&dir)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn staging_dir(&self) -> io::Result<PathBuf> {
        Ok(self.root.join("staging"))
    }

    fn install(&self, package: &InstalledPackage, file: &Path) -> io::Result<()> {
        let dir = self.package_dir(&package.name);
        fs::create_dir_all(&dir)?;
        let dest = dir.join(CONTENT);
        fs::rename(file, &dest)?;
        sync_parent(&dest)?;
        self.write_meta(package)
    }

    fn update_metadata(&self, package: &InstalledPackage) -> io::Result<()> {
        self.write_meta(package)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let dir = self.package_dir(name);
        // The metadata first: without it the package no longer counts as installed.
        match fs::remove_file(dir.join(META)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn bad_meta(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unreadable package metadata in {}", path.display()),
    )
}

/// Makes a rename durable (a no-op where directories cannot be opened, as on Windows).
fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = (path, File::open);
    Ok(())
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
