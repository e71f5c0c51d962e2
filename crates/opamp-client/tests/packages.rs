//! Package syncs with real HTTP downloads over loopback, against a small raw-TCP file server
//! (ranges, cut connections, redirects, slow bodies), into an [`FsProvider`] on disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use opamp_client::packages::{
    DangerousAcceptUnsigned, DownloadSettings, Ed25519Verifier, FsProvider, PackageSyncer,
    PackagesStateProvider, SignatureVerifier,
};
use opamp_proto::{
    DownloadableFile, Header, Headers, PackageAvailable, PackageStatusEnum, PackageStatuses,
    PackageType, PackagesAvailable,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the test server answers one path.
#[derive(Clone)]
enum Serve {
    /// The file, with `Range: bytes=N-` support.
    File(Bytes),
    /// 404.
    NotFound,
    /// The first request without `Range` gets the full `Content-Length` but half the body,
    /// then the connection closes; later requests are served as `File`.
    CutOnce(Bytes),
    /// As `CutOnce`, but the connection stays open, silent, instead of closing.
    StallOnce(Bytes),
    /// The file, in chunks of this size every 100 ms.
    Slow(Bytes, usize),
    /// 302 to this URL.
    Redirect(String),
    /// The file only with this header (name, value); 401 without.
    RequireHeader(&'static str, &'static str, Bytes),
}

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
struct FileServer {
    base: String,
    routes: Arc<Mutex<HashMap<String, Serve>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    cut_done: Arc<AtomicBool>,
}

impl FileServer {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Over TLS with this configuration; URLs name the host `localhost`.
    async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        let server = Self {
            base,
            routes: Default::default(),
            seen: Default::default(),
            cut_done: Default::default(),
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = s.handle(stream).await;
                            }
                        }
                        None => {
                            let _ = s.handle(stream).await;
                        }
                    }
                });
            }
        });
        server
    }

    fn route(&self, path: &str, serve: Serve) -> String {
        self.routes.lock().unwrap().insert(path.to_owned(), serve);
        format!("{}{path}", self.base)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
    ) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() > 65536 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let path = lines
            .next()
            .unwrap_or("")
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let seen = Seen { path, headers };
        self.seen.lock().unwrap().push(seen.clone());
        let serve = self.routes.lock().unwrap().get(&seen.path).cloned();
        let stall = matches!(serve, Some(Serve::StallOnce(_)));
        let from: u64 = seen
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        match serve {
            None | Some(Serve::NotFound) => {
                let msg =
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                stream.write_all(msg).await?;
            }
            Some(Serve::Redirect(to)) => {
                let msg = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(msg.as_bytes()).await?;
            }
            Some(Serve::RequireHeader(name, value, data)) => {
                if seen.header(name) == Some(value) {
                    send_file(&mut stream, &data, from, None).await?;
                } else {
                    let msg =
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                    stream.write_all(msg).await?;
                }
            }
            Some(Serve::File(data)) => send_file(&mut stream, &data, from, None).await?,
            Some(Serve::Slow(data, chunk)) => {
                let pace = (chunk, Duration::from_millis(100));
                send_file(&mut stream, &data, from, Some(pace)).await?
            }
            Some(Serve::CutOnce(data)) | Some(Serve::StallOnce(data)) => {
                if from == 0 && !self.cut_done.swap(true, Ordering::SeqCst) {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    );
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(&data[..data.len() / 2]).await?;
                    stream.flush().await?;
                    if stall {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    // Cut: the rest never comes.
                } else {
                    send_file(&mut stream, &data, from, None).await?;
                }
            }
        }
        stream.shutdown().await
    }
}

async fn send_file<S: AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
    from: u64,
    pace: Option<(usize, Duration)>,
) -> std::io::Result<()> {
    let from = (from as usize).min(data.len());
    let head = if from > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
            data.len() - from,
            data.len() - 1,
            data.len()
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        )
    };
    stream.write_all(head.as_bytes()).await?;
    match pace {
        None => stream.write_all(&data[from..]).await?,
        Some((size, pace)) => {
            for chunk in data[from..].chunks(size) {
                stream.write_all(chunk).await?;
                stream.flush().await?;
                tokio::time::sleep(pace).await;
            }
        }
    }
    Ok(())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn content(tag: &str, len: usize) -> Bytes {
    tag.bytes().cycle().take(len).collect::<Vec<u8>>().into()
}

/// An offer of `data` at `url`: content hash its SHA-256, package hash over version and
/// content (PKG-11), signed by `key` if given.
fn package(url: &str, version: &str, data: &[u8], key: Option<&SigningKey>) -> PackageAvailable {
    let content_hash = sha256(data);
    let signature = key
        .map(|k| Bytes::copy_from_slice(&k.sign(&content_hash).to_bytes()))
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    h.update(content_hash);
    h.update(&signature);
    PackageAvailable {
        r#type: PackageType::TopLevel as i32,
        version: version.into(),
        file: Some(DownloadableFile {
            download_url: url.into(),
            content_hash: Bytes::copy_from_slice(&content_hash),
            signature,
            headers: None,
        }),
        hash: Bytes::copy_from_slice(&h.finalize()),
    }
}

fn offer(all: &str, packages: Vec<(&str, PackageAvailable)>) -> PackagesAvailable {
    PackagesAvailable {
        packages: packages
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect(),
        all_packages_hash: Bytes::copy_from_slice(all.as_bytes()),
    }
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

struct Agent {
    dir: PathBuf,
    provider: Arc<FsProvider>,
    syncer: PackageSyncer,
    reports: Arc<Mutex<Vec<PackageStatuses>>>,
}

impl Agent {
    fn new(verifier: Arc<dyn SignatureVerifier>) -> Self {
        Self::with_settings(verifier, fast_settings())
    }

    fn with_settings(verifier: Arc<dyn SignatureVerifier>, settings: DownloadSettings) -> Self {
        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("opamp-pkg-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let provider = Arc::new(FsProvider::new(&dir).unwrap());
        let reports: Arc<Mutex<Vec<PackageStatuses>>> = Default::default();
        let sink = reports.clone();
        let syncer = PackageSyncer::new(
            provider.clone(),
            verifier,
            settings,
            move |s: PackageStatuses| sink.lock().unwrap().push(s),
        );
        Self {
            dir,
            provider,
            syncer,
            reports,
        }
    }

    fn installed(&self, name: &str) -> Option<(String, Vec<u8>)> {
        let p = self
            .provider
            .packages()
            .unwrap()
            .into_iter()
            .find(|p| p.name == name)?;
        Some((
            p.version,
            std::fs::read(self.provider.content_path(name)).ok()?,
        ))
    }

    fn reported_states(&self, name: &str) -> Vec<PackageStatusEnum> {
        let mut states: Vec<PackageStatusEnum> = Vec::new();
        for r in self.reports.lock().unwrap().iter() {
            if let Some(s) = r.packages.get(name) {
                let s = PackageStatusEnum::try_from(s.status).unwrap();
                if states.last() != Some(&s) {
                    states.push(s);
                }
            }
        }
        states
    }

    fn staging_is_empty(&self) -> bool {
        std::fs::read_dir(self.dir.join("staging"))
            .unwrap()
            .next()
            .is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fast_settings() -> DownloadSettings {
    DownloadSettings::default()
        .with_timeout(Duration::from_secs(20))
        .with_progress_interval(Duration::from_millis(50))
}

fn unsigned() -> Arc<dyn SignatureVerifier> {
    Arc::new(DangerousAcceptUnsigned)
}

fn status_of(s: &PackageStatuses, name: &str) -> (PackageStatusEnum, String, String) {
    let p = &s.packages[name];
    assert_eq!(p.name, name, "PKG-14");
    (
        PackageStatusEnum::try_from(p.status).unwrap(),
        p.agent_has_version.clone(),
        p.error_message.clone(),
    )
}

#[tokio::test]
async fn pkg_12_pkg_15_offer_installed_and_reported_with_version_and_headers() {
    let server = FileServer::start().await;
    let data = content("agent-v1 ", 200_000);
    let url = server.route(
        "/agent",
        Serve::RequireHeader("authorization", "Bearer agent-token", data.clone()),
    );
    // Ten chunks 100 ms apart, so that progress is reported between them.
    let slow_url = server.route("/agent-slow", Serve::Slow(data.clone(), 20_000));
    let mut pkg = package(&url, "1.0.0", &data, None);
    // PKG-6: the offered headers go with the GET.
    pkg.file.as_mut().unwrap().headers = Some(Headers {
        headers: vec![Header {
            key: "Authorization".into(),
            value: "Bearer agent-token".into(),
        }],
    });
    let agent = Agent::new(unsigned());
    let statuses = agent
        .syncer
        .sync(offer("all-1", vec![("agent", pkg)]))
        .await;
    // Without the header: 401.
    let other = Agent::new(unsigned());
    let refused = other
        .syncer
        .sync(offer(
            "all-1",
            vec![("agent", package(&url, "1.0.0", &data, None))],
        ))
        .await;
    assert!(status_of(&refused, "agent").2.contains("HTTP status 401"));

    assert_eq!(
        status_of(&statuses, "agent"),
        (PackageStatusEnum::Installed, "1.0.0".into(), String::new())
    );
    assert_eq!(&statuses.server_provided_all_packages_hash[..], b"all-1");
    assert!(statuses.error_message.is_empty());
    assert_eq!(
        agent.installed("agent"),
        Some(("1.0.0".into(), data.to_vec()))
    );
    assert_eq!(
        agent.provider.all_packages_hash().unwrap().as_deref(),
        Some(&b"all-1"[..])
    );
    assert_eq!(
        agent.reported_states("agent"),
        [
            PackageStatusEnum::InstallPending,
            PackageStatusEnum::Downloading,
            PackageStatusEnum::Installing,
            PackageStatusEnum::Installed
        ]
    );
    assert!(agent.staging_is_empty());

    // PKG-20: details only while downloading, bounded in rate, and they reach 100 %.
    let agent = Agent::new(unsigned());
    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![("agent", package(&slow_url, "1.0.0", &data, None))],
        ))
        .await;
    assert_eq!(status_of(&s, "agent").0, PackageStatusEnum::Installed);
    let reports = agent.reports.lock().unwrap().clone();
    let downloading = reports
        .iter()
        .filter(|r| r.packages["agent"].status == PackageStatusEnum::Downloading as i32)
        .count();
    assert!(
        (3..=12).contains(&downloading),
        "{downloading} DOWNLOADING reports"
    );
    let mut last_percent = 0.0;
    for r in &reports {
        let p = &r.packages["agent"];
        if p.status == PackageStatusEnum::Downloading as i32 {
            last_percent = p.download_details.unwrap().download_percent;
        } else {
            assert!(p.download_details.is_none());
        }
    }
    assert_eq!(last_percent, 100.0);
}

#[tokio::test]
async fn pkg_9_corrupt_file_is_hash_mismatch_and_old_version_kept() {
    let server = FileServer::start().await;
    let v1 = content("v1 ", 10_000);
    let v2 = content("v2 ", 10_000);
    let url1 = server.route("/v1", Serve::File(v1.clone()));
    let agent = Agent::new(unsigned());
    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![("agent", package(&url1, "1", &v1, None))],
        ))
        .await;
    assert_eq!(status_of(&s, "agent").0, PackageStatusEnum::Installed);

    // The server serves other bytes than the offer's content hash says.
    let url2 = server.route("/v2", Serve::File(content("corrupt ", 10_000)));
    let s = agent
        .syncer
        .sync(offer(
            "all-2",
            vec![("agent", package(&url2, "2", &v2, None))],
        ))
        .await;
    let (state, has, error) = status_of(&s, "agent");
    assert_eq!(state, PackageStatusEnum::InstallFailed);
    assert!(error.starts_with("hash mismatch"), "{error}");
    // PKG-18: the old version is still what the agent has; the offer is reported too.
    assert_eq!(has, "1");
    assert_eq!(s.packages["agent"].server_offered_version, "2");
    assert_eq!(agent.installed("agent"), Some(("1".into(), v1.to_vec())));
    // Not fully installed: the aggregate stays the old one, so a re-offer is tried again.
    assert_eq!(
        agent.provider.all_packages_hash().unwrap().as_deref(),
        Some(&b"all-1"[..])
    );
    assert!(agent.staging_is_empty());
}

#[tokio::test]
async fn pkg_21_bad_signature_is_install_failed() {
    let server = FileServer::start().await;
    let trusted = SigningKey::from_bytes(&[1; 32]);
    let other = SigningKey::from_bytes(&[2; 32]);
    let verifier =
        Arc::new(Ed25519Verifier::new([trusted.verifying_key().as_bytes().as_slice()]).unwrap());
    let agent = Agent::new(verifier);
    let data = content("signed ", 5000);
    let url = server.route("/signed", Serve::File(data.clone()));

    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![("agent", package(&url, "1", &data, Some(&other)))],
        ))
        .await;
    let (state, has, error) = status_of(&s, "agent");
    assert_eq!(state, PackageStatusEnum::InstallFailed);
    assert!(error.starts_with("bad signature"), "{error}");
    assert!(has.is_empty(), "PKG-17: nothing installed");
    assert_eq!(agent.installed("agent"), None);

    // Unsigned is refused too; the trusted key's signature is installed.
    let s = agent
        .syncer
        .sync(offer(
            "all-2",
            vec![("agent", package(&url, "1", &data, None))],
        ))
        .await;
    assert!(status_of(&s, "agent").2.starts_with("bad signature"));
    let s = agent
        .syncer
        .sync(offer(
            "all-3",
            vec![("agent", package(&url, "1", &data, Some(&trusted)))],
        ))
        .await;
    assert_eq!(status_of(&s, "agent").0, PackageStatusEnum::Installed);
    assert!(agent.staging_is_empty());
}

#[tokio::test]
async fn http_404_and_too_large_are_install_failed_with_the_reason() {
    let server = FileServer::start().await;
    let data = content("big ", 4096);
    let missing = server.route("/missing", Serve::NotFound);
    let big = server.route("/big", Serve::File(data.clone()));
    let agent = Agent::with_settings(unsigned(), fast_settings().with_max_size(1000));
    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![
                ("missing", package(&missing, "1", b"x", None)),
                ("big", package(&big, "1", &data, None)),
            ],
        ))
        .await;
    let (state, _, error) = status_of(&s, "missing");
    assert_eq!(state, PackageStatusEnum::InstallFailed);
    assert!(error.contains("HTTP status 404"), "{error}");
    let (state, _, error) = status_of(&s, "big");
    assert_eq!(state, PackageStatusEnum::InstallFailed);
    assert!(error.contains("too large"), "{error}");
    assert!(agent.provider.packages().unwrap().is_empty());
    assert!(agent.staging_is_empty());
}

#[tokio::test]
async fn pkg_8_repeated_offer_of_a_failed_package_is_not_downloaded_in_a_loop() {
    let server = FileServer::start().await;
    let missing = server.route("/missing", Serve::NotFound);
    let settings = fast_settings().with_retry_failed_after(Duration::from_millis(300));
    let agent = Agent::with_settings(unsigned(), settings);
    let o = offer("all-1", vec![("agent", package(&missing, "1", b"x", None))]);
    for _ in 0..3 {
        let s = agent.syncer.sync(o.clone()).await;
        let (state, _, error) = status_of(&s, "agent");
        assert_eq!(state, PackageStatusEnum::InstallFailed);
        assert!(error.contains("HTTP status 404"), "{error}");
    }
    assert_eq!(server.seen().len(), 1, "one download for three offers");
    // After the pause the same offer is tried again; now the file is there.
    tokio::time::sleep(Duration::from_millis(350)).await;
    server.route("/missing", Serve::File(Bytes::from_static(b"x")));
    let s = agent.syncer.sync(o).await;
    assert_eq!(status_of(&s, "agent").0, PackageStatusEnum::Installed);
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn an_offer_equal_to_the_running_one_does_not_restart_it() {
    let server = FileServer::start().await;
    let data = content("once ", 64 * 5);
    let url = server.route("/once", Serve::Slow(data.clone(), 64));
    let agent = Agent::new(unsigned());
    let o = offer("all-1", vec![("agent", package(&url, "1", &data, None))]);
    agent.syncer.offer(o.clone());
    tokio::time::sleep(Duration::from_millis(150)).await;
    agent.syncer.offer(o.clone());
    agent.syncer.offer(o);
    let s = agent.syncer.wait().await.expect("statuses");
    assert_eq!(status_of(&s, "agent").0, PackageStatusEnum::Installed);
    assert_eq!(server.seen().len(), 1, "not restarted");
}

#[tokio::test]
async fn pkg_7_connection_cut_halfway_is_resumed_with_range() {
    let server = FileServer::start().await;
    let data = content("resumable ", 300_000);
    let url = server.route("/cut", Serve::CutOnce(data.clone()));
    let agent = Agent::new(unsigned());
    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![("agent", package(&url, "7", &data, None))],
        ))
        .await;
    assert_eq!(
        status_of(&s, "agent"),
        (PackageStatusEnum::Installed, "7".into(), String::new())
    );
    assert_eq!(agent.installed("agent"), Some(("7".into(), data.to_vec())));
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].header("range"), None);
    assert_eq!(
        seen[1].header("range"),
        Some(format!("bytes={}-", data.len() / 2).as_str())
    );
}

#[tokio::test]
async fn pkg_7_silent_connection_is_resumed_after_the_idle_timeout() {
    let server = FileServer::start().await;
    let data = content("stalled ", 100_000);
    let url = server.route("/stall", Serve::StallOnce(data.clone()));
    let settings = fast_settings().with_idle_timeout(Duration::from_millis(300));
    let agent = Agent::with_settings(unsigned(), settings);
    let started = std::time::Instant::now();
    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![("agent", package(&url, "1", &data, None))],
        ))
        .await;
    assert_eq!(status_of(&s, "agent").0, PackageStatusEnum::Installed);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(agent.installed("agent"), Some(("1".into(), data.to_vec())));
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1].header("range"),
        Some(format!("bytes={}-", data.len() / 2).as_str())
    );
}

#[tokio::test]
async fn pkg_5_package_removed_from_the_offer_is_deleted() {
    let server = FileServer::start().await;
    let a = content("a", 100);
    let b = content("b", 100);
    let url_a = server.route("/a", Serve::File(a.clone()));
    let url_b = server.route("/b", Serve::File(b.clone()));
    let agent = Agent::new(unsigned());
    let s = agent
        .syncer
        .sync(offer(
            "all-ab",
            vec![
                ("a", package(&url_a, "1", &a, None)),
                ("b", package(&url_b, "1", &b, None)),
            ],
        ))
        .await;
    assert_eq!(s.packages.len(), 2);
    let s = agent
        .syncer
        .sync(offer("all-a", vec![("a", package(&url_a, "1", &a, None))]))
        .await;
    assert_eq!(s.packages.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(agent.installed("b"), None);
    assert!(!agent.provider.content_path("b").exists());
    assert_eq!(agent.installed("a"), Some(("1".into(), a.to_vec())));
    // "a" was kept by its package hash: downloaded once only (PKG-5).
    assert_eq!(server.seen().iter().filter(|r| r.path == "/a").count(), 1);
}

#[tokio::test]
async fn pkg_4_equal_all_packages_hash_downloads_nothing() {
    let server = FileServer::start().await;
    let data = content("same ", 1000);
    let url = server.route("/same", Serve::File(data.clone()));
    let agent = Agent::new(unsigned());
    let o = offer("all-1", vec![("agent", package(&url, "1", &data, None))]);
    agent.syncer.sync(o.clone()).await;
    assert_eq!(server.seen().len(), 1);
    let s = agent.syncer.sync(o).await;
    assert_eq!(server.seen().len(), 1, "nothing downloaded again");
    assert_eq!(
        status_of(&s, "agent"),
        (PackageStatusEnum::Installed, "1".into(), String::new())
    );
    assert_eq!(&s.server_provided_all_packages_hash[..], b"all-1");
}

#[tokio::test]
async fn pkg_6_offered_headers_are_not_sent_to_another_origin_after_a_redirect() {
    let origin = FileServer::start().await;
    let other = FileServer::start().await;
    let data = content("moved ", 1000);
    let there = other.route("/file", Serve::File(data.clone()));
    let same = origin.route("/file", Serve::File(data.clone()));
    let via_other = origin.route("/to-other", Serve::Redirect(there));
    let via_same = origin.route("/to-same", Serve::Redirect("/file".into()));
    let with_token = |url: &str| {
        let mut p = package(url, "1", &data, None);
        p.file.as_mut().unwrap().headers = Some(Headers {
            headers: vec![Header {
                key: "x-token".into(),
                value: "secret".into(),
            }],
        });
        p
    };
    let agent = Agent::new(unsigned());
    let s = agent
        .syncer
        .sync(offer(
            "all-1",
            vec![("o", with_token(&via_other)), ("s", with_token(&via_same))],
        ))
        .await;
    assert_eq!(status_of(&s, "o").0, PackageStatusEnum::Installed);
    assert_eq!(status_of(&s, "s").0, PackageStatusEnum::Installed);
    let at_other = other.seen();
    assert_eq!(at_other.len(), 1);
    assert_eq!(at_other[0].header("x-token"), None, "not to another origin");
    let at_origin = origin.seen();
    assert_eq!(at_origin.len(), 3);
    assert!(
        at_origin
            .iter()
            .all(|r| r.header("x-token") == Some("secret"))
    );
    let _ = same;
}

#[tokio::test]
async fn new_offer_mid_download_cancels_the_old_sync() {
    let server = FileServer::start().await;
    let slow = content("slow ", 64 * 100); // 10 s at 64 bytes per 100 ms
    let fast = content("fast ", 1000);
    let slow_url = server.route("/slow", Serve::Slow(slow.clone(), 64));
    let fast_url = server.route("/fast", Serve::File(fast.clone()));
    let agent = Agent::new(unsigned());
    agent.syncer.offer(offer(
        "all-slow",
        vec![("slow", package(&slow_url, "1", &slow, None))],
    ));
    // Wait until the slow package is downloading.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !agent
        .reported_states("slow")
        .contains(&PackageStatusEnum::Downloading)
    {
        assert!(tokio::time::Instant::now() < deadline, "never downloading");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.syncer.offer(offer(
        "all-fast",
        vec![("fast", package(&fast_url, "2", &fast, None))],
    ));
    let s = tokio::time::timeout(Duration::from_secs(5), agent.syncer.wait())
        .await
        .expect("the new sync does not wait for the old download")
        .expect("the new sync's statuses");
    assert_eq!(s.packages.keys().collect::<Vec<_>>(), ["fast"]);
    assert_eq!(&s.server_provided_all_packages_hash[..], b"all-fast");
    assert_eq!(agent.installed("slow"), None);
    assert_eq!(agent.installed("fast"), Some(("2".into(), fast.to_vec())));
    assert!(agent.staging_is_empty(), "the partial download is deleted");
    // The last report is the new sync's.
    let last = agent.reports.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last, s);
}

/// `StartSettings::with_packages` over plain HTTP: the capabilities are declared, the offer
/// in a ServerToAgent is installed from the same server, and the client reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkg_2_pkg_12_with_packages_installs_offers_and_reports_through_the_client() {
    use opamp_client::OpampClient;
    use opamp_proto::{AgentCapabilitySet, AgentToServer, ServerToAgent};

    let data = content("e2e ", 50_000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AgentToServer>();
    let addr_slot: Arc<std::sync::OnceLock<String>> = Default::default();
    let slot = addr_slot.clone();
    let file = data.clone();
    let addr = common::http_server(move |_, parts, body| {
        let tx = tx.clone();
        let slot = slot.clone();
        let file = file.clone();
        async move {
            if parts.uri.path() == "/pkg/agent" {
                return http::Response::new(http_body_util::Full::new(file));
            }
            let msg = common::decode_request(&parts, &body);
            let accepts = AgentCapabilitySet::from_bits_truncate(msg.capabilities)
                .contains(AgentCapabilitySet::ACCEPTS_PACKAGES);
            let _ = tx.send(msg.clone());
            let mut answer: ServerToAgent = common::ack(&msg);
            // PKG-2: offered only to an agent that accepts packages.
            if accepts && msg.sequence_num == 0 {
                let url = format!("{}/pkg/agent", slot.get().unwrap());
                answer.packages_available = Some(offer(
                    "all-e2e",
                    vec![("agent", package(&url, "3.1", &file, None))],
                ));
            }
            common::ok(&answer)
        }
    })
    .await;
    addr_slot.set(format!("http://{addr}")).unwrap();

    let n = DIRS.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("opamp-pkg-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let provider = Arc::new(FsProvider::new(&dir).unwrap());
    let settings = common::settings(format!("http://{addr}/v1/opamp"))
        .with_agent_description(common::description())
        .with_heartbeat_interval(Duration::from_millis(200))
        .with_packages(provider.clone(), unsigned(), fast_settings());
    let (recorder, _cbs) = common::Recorder::new();
    let client = OpampClient::start(settings, recorder).unwrap();

    let first = common::recv(&mut rx).await;
    let caps = AgentCapabilitySet::from_bits_truncate(first.capabilities);
    assert!(caps.contains(
        AgentCapabilitySet::ACCEPTS_PACKAGES | AgentCapabilitySet::REPORTS_PACKAGE_STATUSES
    ));
    // PKG-13: the (empty) statuses from the first message on.
    assert!(first.package_statuses.is_some());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let installed = loop {
        let msg = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("INSTALLED reported in time")
            .unwrap();
        if let Some(s) = msg.package_statuses {
            if s.packages.get("agent").is_some_and(|p| {
                p.status == PackageStatusEnum::Installed as i32 && p.agent_has_version == "3.1"
            }) {
                break s;
            }
        }
    };
    assert_eq!(&installed.server_provided_all_packages_hash[..], b"all-e2e");
    assert_eq!(
        std::fs::read(provider.content_path("agent")).unwrap(),
        data.to_vec()
    );
    client.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

mod with_opamp_server {
    //! The workspace's server offers signed packages built with `opamp_server::packages`
    //! over WebSocket; the client installs v1, then the upgrade to v2 the server offers once
    //! it sees v1 installed (PKG-15).

    use super::*;
    use async_trait::async_trait;
    use opamp_client::OpampClient;
    use opamp_proto::{AgentToServer, ServerToAgent};
    use opamp_server::packages::{PackageFile, PackagesOffer, has_offer, package_reports};
    use opamp_server::{
        Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
    };

    const SERVER_KEY: [u8; 32] = [42; 32];

    struct Fleet(Arc<Agents>);

    #[async_trait]
    impl ServerCallbacks for Fleet {
        async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
            ConnectionResponse::accept(self.0.clone())
        }
    }

    struct Agents {
        v1: PackagesAvailable,
        v2: PackagesAvailable,
        upgraded: AtomicBool,
        done: tokio::sync::mpsc::UnboundedSender<PackageStatuses>,
    }

    #[async_trait]
    impl ConnectionCallbacks for Agents {
        async fn on_message(&self, _: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
            let statuses = msg.package_statuses.unwrap_or_default();
            if has_offer(&statuses, &self.v1) {
                // The upgrade, once v1 is reported installed.
                self.upgraded.store(true, Ordering::SeqCst);
            }
            if has_offer(&statuses, &self.v2) {
                let _ = self.done.send(statuses);
                return None;
            }
            let offer = if self.upgraded.load(Ordering::SeqCst) {
                self.v2.clone()
            } else {
                self.v1.clone()
            };
            // Offered on every message: the session core drops an offer the agent was
            // already sent on this WebSocket stream.
            Some(ServerToAgent {
                packages_available: Some(offer),
                ..Default::default()
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signed_upgrade_from_the_workspace_server_over_websocket() {
        let files = FileServer::start().await;
        let v1 = content("agent v1 ", 30_000);
        let v2 = content("agent v2 ", 40_000);
        let token = ("authorization", "Bearer per-agent");
        let url1 = files.route(
            "/agent/1",
            Serve::RequireHeader(token.0, token.1, v1.clone()),
        );
        let url2 = files.route(
            "/agent/2",
            Serve::RequireHeader(token.0, token.1, v2.clone()),
        );
        let file = |url: &str, data: &[u8]| {
            PackageFile::new(url, data)
                .with_header(token.0, token.1)
                .signed_ed25519(&SERVER_KEY)
        };
        let offer1 = PackagesOffer::new()
            .top_level("agent", "1.0", file(&url1, &v1))
            .build();
        let offer2 = PackagesOffer::new()
            .top_level("agent", "2.0", file(&url2, &v2))
            .build();
        let (done, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let agents = Arc::new(Agents {
            v1: offer1,
            v2: offer2.clone(),
            upgraded: AtomicBool::new(false),
            done,
        });
        let config = ServerConfig::builder()
            .listen_addr("127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap();
        let server = Server::bind(config, Arc::new(Fleet(agents))).await.unwrap();

        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("opamp-pkg-ws-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let provider = Arc::new(FsProvider::new(&dir).unwrap());
        let public = PackageFile::ed25519_public_key(&SERVER_KEY);
        let verifier = Arc::new(Ed25519Verifier::new([public.as_slice()]).unwrap());
        let settings = common::settings(format!("ws://{}/v1/opamp", server.local_addr()))
            .with_agent_description(common::description())
            .with_packages(provider.clone(), verifier, fast_settings());
        let (recorder, _cbs) = common::Recorder::new();
        let client = OpampClient::start(settings, recorder).unwrap();

        let statuses = tokio::time::timeout(Duration::from_secs(15), done_rx.recv())
            .await
            .expect("v2 reported installed in time")
            .unwrap();
        let report: Vec<_> = package_reports(&statuses).collect();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].status, Some(PackageStatusEnum::Installed));
        assert_eq!(report[0].agent_has_version, "2.0");
        assert_eq!(
            std::fs::read(provider.content_path("agent")).unwrap(),
            v2.to_vec()
        );
        assert_eq!(
            files.seen().iter().filter(|r| r.path == "/agent/1").count(),
            1
        );
        assert_eq!(
            files.seen().iter().filter(|r| r.path == "/agent/2").count(),
            1
        );
        client.stop().await.unwrap();
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `https` downloads with the client's TLS settings (`with_tls_ca_pem`), the OpAMP
/// connection itself being plain HTTP; without the CA the download fails with a TLS error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_download_uses_the_clients_tls_settings() {
    use opamp_client::OpampClient;
    use opamp_proto::ServerToAgent;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let identity = opamp_transport::tls::CertifiedKeyPem {
        cert_chain: cert.pem().into_bytes(),
        private_key: key.serialize_pem().into_bytes(),
    };
    let files =
        FileServer::start_tls(opamp_transport::tls::server_config(&identity, None).unwrap()).await;
    let data = content("over tls ", 20_000);
    let url = files.route("/tls", Serve::File(data.clone()));
    let the_offer = offer("all-tls", vec![("agent", package(&url, "1", &data, None))]);

    for trust_ca in [true, false] {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PackageStatuses>();
        let o = the_offer.clone();
        let addr = common::http_server(move |_, parts, body| {
            let tx = tx.clone();
            let o = o.clone();
            async move {
                let msg = common::decode_request(&parts, &body);
                if let Some(s) = &msg.package_statuses {
                    let _ = tx.send(s.clone());
                }
                let mut answer: ServerToAgent = common::ack(&msg);
                answer.packages_available = Some(o);
                common::ok(&answer)
            }
        })
        .await;
        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("opamp-pkg-tls-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let provider = Arc::new(FsProvider::new(&dir).unwrap());
        let mut settings = common::settings(format!("http://{addr}/v1/opamp"))
            .with_agent_description(common::description())
            .with_heartbeat_interval(Duration::from_millis(200))
            .with_packages(provider.clone(), unsigned(), fast_settings());
        if trust_ca {
            settings = settings.with_tls_ca_pem(ca.pem());
        }
        let (recorder, _cbs) = common::Recorder::new();
        let client = OpampClient::start(settings, recorder).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let done = loop {
            let s = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("a final status in time")
                .unwrap();
            let state = s.packages.get("agent").map(|p| p.status);
            if state == Some(PackageStatusEnum::Installed as i32)
                || state == Some(PackageStatusEnum::InstallFailed as i32)
            {
                break s;
            }
        };
        let (state, version, error) = status_of(&done, "agent");
        if trust_ca {
            assert_eq!(state, PackageStatusEnum::Installed, "{error}");
            assert_eq!(version, "1");
            assert_eq!(
                std::fs::read(provider.content_path("agent")).unwrap(),
                data.to_vec()
            );
        } else {
            assert_eq!(state, PackageStatusEnum::InstallFailed);
            assert!(error.contains("TLS"), "{error}");
        }
        client.stop().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
