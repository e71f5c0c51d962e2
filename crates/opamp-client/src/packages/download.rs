//! [`Downloader`]: HTTP(S) GET of a `DownloadableFile`, bounded, resumable, hashed (PKG-6,
//! PKG-7, PKG-9).

use std::path::Path;
#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, HOST, LOCATION, RANGE};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use opamp_proto::DownloadableFile;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SHA256_LEN;
use super::fs::hex;
use crate::net::BoxedIo;

/// Limits and TLS settings of package downloads.
///
/// | setting | default |
/// | --- | --- |
/// | `max_size` | 1 GiB |
/// | `timeout` (whole download, resumes included) | 30 minutes |
/// | `connect_timeout` (each connection, TLS included) | 30 s |
/// | `idle_timeout` (no data: the connection counts as broken and is resumed) | 60 s |
/// | `max_redirects` | 5 |
/// | `max_resumes` (new connections after a broken one) | 5 |
/// | `progress_interval` (DOWNLOADING reports) | 1 s |
/// | `retry_failed_after` (same offer failed: not retried sooner; doubles per failure, up to 1 h) | 30 s |
/// | TLS (feature `tls`) | the system's root certificates |
///
/// No proxy is used.
#[derive(Clone)]
#[non_exhaustive]
pub struct DownloadSettings {
    /// The largest file accepted, in bytes.
    pub max_size: u64,
    /// Bound on a whole download, resumes included.
    pub timeout: Duration,
    /// Bound on opening each connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// A connection that brings no data (headers or body) for this long is taken for broken
    /// and resumed.
    pub idle_timeout: Duration,
    /// Redirects followed at most.
    pub max_redirects: u32,
    /// New connections after a broken one (continued with `Range`, PKG-7).
    pub max_resumes: u32,
    /// The shortest time between two DOWNLOADING reports of one package (PKG-12, PKG-20).
    pub progress_interval: Duration,
    /// A package whose install failed is not tried again at the same package hash before
    /// this long (PKG-8), doubling with each failure up to an hour: a server that repeats
    /// its offer does not cause a download loop. A new package hash is tried at once.
    pub retry_failed_after: Duration,
    #[cfg(feature = "tls")]
    tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            max_size: 1 << 30,
            timeout: Duration::from_secs(30 * 60),
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_redirects: 5,
            max_resumes: 5,
            progress_interval: Duration::from_secs(1),
            retry_failed_after: Duration::from_secs(30),
            #[cfg(feature = "tls")]
            tls_config: None,
        }
    }
}

impl DownloadSettings {
    /// Sets the largest file accepted.
    pub fn with_max_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes;
        self
    }

    /// Sets the bound on a whole download.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how long a connection may bring no data before it is resumed.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the number of resumes after broken connections.
    pub fn with_max_resumes(mut self, resumes: u32) -> Self {
        self.max_resumes = resumes;
        self
    }

    /// Sets the shortest time between two progress reports.
    pub fn with_progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }

    /// Sets the first pause before a failed package is tried again at the same hash.
    pub fn with_retry_failed_after(mut self, pause: Duration) -> Self {
        self.retry_failed_after = pause;
        self
    }

    /// Uses this rustls configuration for `https` downloads, e.g. the one the OpAMP
    /// connection uses (see [`StartSettings::with_tls_config`](crate::StartSettings::with_tls_config)).
    #[cfg(feature = "tls")]
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls_config = Some(config);
        self
    }

    #[cfg(feature = "tls")]
    pub(crate) fn has_tls_config(&self) -> bool {
        self.tls_config.is_some()
    }
}

impl std::fmt::Debug for DownloadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("DownloadSettings");
        d.field("max_size", &self.max_size)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_redirects", &self.max_redirects)
            .field("max_resumes", &self.max_resumes)
            .field("progress_interval", &self.progress_interval)
            .field("retry_failed_after", &self.retry_failed_after);
        #[cfg(feature = "tls")]
        d.field("tls_config", &self.tls_config.as_ref().map(|_| "<custom>"));
        d.finish()
    }
}

/// Why a download failed. The `Display` text is what INSTALL_FAILED reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// The server answered with a status that is not a success (or a redirect followed).
    #[error("download failed: HTTP status {0}")]
    HttpStatus(StatusCode),
    /// The file is larger than [`DownloadSettings::max_size`].
    #[error("download failed: file too large (over {limit} bytes)")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The SHA-256 of what was downloaded is not the offered `content_hash`.
    #[error("hash mismatch: the offer says sha256 {expected}, the file is {actual}")]
    HashMismatch {
        /// The offered hash, hex.
        expected: String,
        /// The file's hash, hex.
        actual: String,
    },
    /// The whole download took longer than [`DownloadSettings::timeout`].
    #[error("download failed: timed out")]
    Timeout,
    /// The URL cannot be used.
    #[error("download failed: bad URL: {0}")]
    BadUrl(String),
    /// An offered header is not a valid HTTP header.
    #[error("download failed: bad offered header: {0}")]
    BadHeader(String),
    /// More redirects than [`DownloadSettings::max_redirects`].
    #[error("download failed: too many redirects")]
    TooManyRedirects,
    /// A partial answer that does not continue where the file stopped.
    #[error("download failed: bad Content-Range: {0}")]
    BadRange(String),
    /// The connection broke and could not be resumed within [`DownloadSettings::max_resumes`].
    #[error("download failed: {0}")]
    Connection(String),
    /// Writing the file failed.
    #[error("download failed: writing the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Downloads `DownloadableFile`s over HTTP/1.1, with or without TLS.
#[derive(Clone, Debug, Default)]
pub struct Downloader {
    settings: DownloadSettings,
}

/// One attempt's failure: worth resuming, or not.
enum Attempt {
    Broken(String),
    Fatal(DownloadError),
}

impl From<DownloadError> for Attempt {
    fn from(e: DownloadError) -> Self {
        Attempt::Fatal(e)
    }
}

impl From<std::io::Error> for Attempt {
    fn from(e: std::io::Error) -> Self {
        Attempt::Fatal(e.into())
    }
}

/// The file as it is being written, with its running hash.
struct Partial {
    file: tokio::fs::File,
    hasher: Sha256,
    received: u64,
}

impl Downloader {
    /// A downloader with these settings.
    pub fn new(settings: DownloadSettings) -> Self {
        Self { settings }
    }

    /// The settings.
    pub fn settings(&self) -> &DownloadSettings {
        &self.settings
    }

    /// Downloads `file` into `dest` (created or truncated), fsyncs it and checks its SHA-256
    /// against `content_hash` when that is a SHA-256 (PKG-9); returns the SHA-256.
    /// `progress(received, total)` is called after each chunk.
    ///
    /// The offered headers go with the request to the offered URL's origin only, never to
    /// another origin a redirect leads to. A connection that breaks is resumed with
    /// `Range: bytes=N-` (PKG-7), at most `max_resumes` times; a server that answers a range
    /// request with the whole file (200) is read from the start again.
    pub async fn download(
        &self,
        file: &DownloadableFile,
        dest: &Path,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<[u8; SHA256_LEN], DownloadError> {
        tokio::time::timeout(
            self.settings.timeout,
            self.download_inner(file, dest, progress),
        )
        .await
        .map_err(|_| DownloadError::Timeout)?
    }

    async fn download_inner(
        &self,
        file: &DownloadableFile,
        dest: &Path,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<[u8; SHA256_LEN], DownloadError> {
        let url: Uri = file
            .download_url
            .parse()
            .map_err(|e: http::uri::InvalidUri| DownloadError::BadUrl(e.to_string()))?;
        let headers = offered_headers(file)?;
        let mut partial = Partial {
            file: tokio::fs::File::create(dest).await?,
            hasher: Sha256::new(),
            received: 0,
        };
        let mut resumes = 0;
        loop {
            match self.attempt(&url, &headers, &mut partial, progress).await {
                Ok(()) => break,
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Broken(why)) => {
                    if resumes >= self.settings.max_resumes {
                        return Err(DownloadError::Connection(format!(
                            "{why} (after {resumes} resumes)"
                        )));
                    }
                    resumes += 1;
                    tracing::debug!(
                        url = %url,
                        received = partial.received,
                        "package download broke ({why}); resuming"
                    );
                    let pause = Duration::from_millis(100 << resumes.min(5));
                    tokio::time::sleep(pause).await;
                }
            }
        }
        partial.file.flush().await?;
        partial.file.sync_all().await?;
        let digest: [u8; SHA256_LEN] = partial.hasher.finalize().into();
        if file.content_hash.len() == SHA256_LEN && file.content_hash[..] != digest[..] {
            return Err(DownloadError::HashMismatch {
                expected: hex(&file.content_hash),
                actual: hex(&digest),
            });
        }
        Ok(digest)
    }

    /// One GET (following redirects), appending to `partial`.
    async fn attempt(
        &self,
        origin_url: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        partial: &mut Partial,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<(), Attempt> {
        let mut url = origin_url.clone();
        let mut redirects = 0;
        let response = loop {
            let same_origin = origin(&url) == origin(origin_url);
            let offered: &[_] = if same_origin { headers } else { &[] };
            let response = self.get(&url, offered, partial.received).await?;
            let status = response.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                if redirects >= self.settings.max_redirects {
                    return Err(DownloadError::TooManyRedirects.into());
                }
                redirects += 1;
                let location = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or(DownloadError::HttpStatus(status))?;
                url = resolve(&url, location)?;
                continue;
            }
            break response;
        };
        let status = response.status();
        let total = match status {
            StatusCode::OK => {
                if partial.received > 0 {
                    // The server ignored the range: start over.
                    partial.file.set_len(0).await?;
                    partial.file.seek(std::io::SeekFrom::Start(0)).await?;
                    partial.hasher = Sha256::new();
                    partial.received = 0;
                }
                content_length(&response)
            }
            StatusCode::PARTIAL_CONTENT if partial.received > 0 => {
                let (start, total) = content_range(&response)?;
                if start != partial.received {
                    return Err(DownloadError::BadRange(format!(
                        "starts at {start}, the file has {} bytes",
                        partial.received
                    ))
                    .into());
                }
                total
            }
            other => return Err(DownloadError::HttpStatus(other).into()),
        };
        let limit = self.settings.max_size;
        if total.is_some_and(|t| t > limit) {
            return Err(DownloadError::TooLarge { limit }.into());
        }
        progress(partial.received, total);
        let mut body = response.into_body();
        let idle = self.settings.idle_timeout;
        loop {
            let frame = tokio::time::timeout(idle, body.frame())
                .await
                .map_err(|_| Attempt::Broken(format!("no data for {idle:?}")))?;
            let Some(frame) = frame else {
                break;
            };
            let frame = frame.map_err(|e| Attempt::Broken(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if partial.received + data.len() as u64 > limit {
                return Err(DownloadError::TooLarge { limit }.into());
            }
            partial.file.write_all(&data).await?;
            partial.hasher.update(&data);
            partial.received += data.len() as u64;
            progress(partial.received, total);
        }
        if let Some(total) = total {
            if partial.received < total {
                return Err(Attempt::Broken(format!(
                    "connection closed after {} of {total} bytes",
                    partial.received
                )));
            }
        }
        Ok(())
    }

    /// Sends one GET and returns the answer's head with its streaming body.
    async fn get(
        &self,
        url: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        from: u64,
    ) -> Result<http::Response<hyper::body::Incoming>, Attempt> {
        let (https, host, port) = target(url)?;
        let io = tokio::time::timeout(
            self.settings.connect_timeout,
            self.connect(https, &host, port),
        )
        .await
        .map_err(|_| Attempt::Broken("connect timed out".into()))??;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Attempt::Broken(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("package download connection: {e}");
            }
        });
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .body(Empty::<Bytes>::new())
            .map_err(|e| DownloadError::BadUrl(e.to_string()))?;
        let authority = url.authority().map_or("", |a| a.as_str());
        let host_header =
            HeaderValue::from_str(authority).map_err(|e| DownloadError::BadUrl(e.to_string()))?;
        let h = request.headers_mut();
        h.insert(HOST, host_header);
        // PKG-6: the offered headers, only to the offered origin.
        for (name, value) in headers {
            h.append(name.clone(), value.clone());
        }
        if from > 0 {
            // PKG-7: continue where the broken connection stopped.
            let range = HeaderValue::from_str(&format!("bytes={from}-"))
                .map_err(|e| DownloadError::BadUrl(e.to_string()))?;
            h.insert(RANGE, range);
        }
        let idle = self.settings.idle_timeout;
        tokio::time::timeout(idle, sender.send_request(request))
            .await
            .map_err(|_| Attempt::Broken(format!("no answer for {idle:?}")))?
            .map_err(|e| Attempt::Broken(e.to_string()))
    }

    async fn connect(&self, https: bool, host: &str, port: u16) -> Result<BoxedIo, Attempt> {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| Attempt::Broken(format!("connecting to {host}:{port}: {e}")))?;
        if !https {
            return Ok(Box::new(tcp));
        }
        #[cfg(feature = "tls")]
        {
            let config = match &self.settings.tls_config {
                Some(c) => c.clone(),
                None => opamp_transport::tls::client_config(&Default::default())
                    .map_err(|e| Attempt::Fatal(DownloadError::Connection(e.to_string())))?,
            };
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| DownloadError::BadUrl(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    let message = format!("TLS: {e}");
                    // A certificate or protocol error (InvalidData) will not go away by
                    // trying again; a connection that broke during the handshake may.
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        Attempt::Fatal(DownloadError::Connection(message))
                    } else {
                        Attempt::Broken(message)
                    }
                })?;
            Ok(Box::new(tls))
        }
        #[cfg(not(feature = "tls"))]
        {
            drop(tcp);
            Err(DownloadError::BadUrl("https needs the `tls` feature".into()).into())
        }
    }
}

fn offered_headers(
    file: &DownloadableFile,
) -> Result<Vec<(HeaderName, HeaderValue)>, DownloadError> {
    let Some(headers) = &file.headers else {
        return Ok(Vec::new());
    };
    headers
        .headers
        .iter()
        .map(|h| {
            let name = HeaderName::try_from(h.key.as_str())
                .map_err(|_| DownloadError::BadHeader(format!("name {:?}", h.key)))?;
            let value = HeaderValue::try_from(h.value.as_str())
                .map_err(|_| DownloadError::BadHeader(format!("value of {:?}", h.key)))?;
            Ok((name, value))
        })
        .collect()
}

/// Scheme, host and port: what "same origin" compares.
fn origin(url: &Uri) -> Option<(String, String, u16)> {
    let (https, host, port) = target(url).ok()?;
    Some((
        if https { "https" } else { "http" }.to_owned(),
        host.to_ascii_lowercase(),
        port,
    ))
}

fn target(url: &Uri) -> Result<(bool, String, u16), DownloadError> {
    let https = match url.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        other => {
            return Err(DownloadError::BadUrl(format!(
                "scheme {other:?} is not http or https"
            )));
        }
    };
    let host = url
        .host()
        .ok_or_else(|| DownloadError::BadUrl("no host".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok((https, host, port))
}

/// A `Location`, absolute or relative to `base`.
fn resolve(base: &Uri, location: &str) -> Result<Uri, DownloadError> {
    let bad = |e: &dyn std::fmt::Display| DownloadError::BadUrl(format!("redirect: {e}"));
    let uri: Uri = location.parse().map_err(|e| bad(&e))?;
    if uri.scheme().is_some() {
        return Ok(uri);
    }
    if !location.starts_with('/') {
        return Err(bad(&"relative Location without a leading '/'"));
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = uri.path_and_query().cloned();
    Uri::from_parts(parts).map_err(|e| bad(&e))
}

fn content_length(response: &http::Response<hyper::body::Incoming>) -> Option<u64> {
    response
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `Content-Range: bytes START-END/TOTAL`: the start, and the total if known.
fn content_range(
    response: &http::Response<hyper::body::Incoming>,
) -> Result<(u64, Option<u64>), DownloadError> {
    let value = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| DownloadError::BadRange("missing".into()))?;
    let bad = || DownloadError::BadRange(value.to_owned());
    let rest = value.strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = rest.split_once('/').ok_or_else(bad)?;
    let (start, _end) = range.split_once('-').ok_or_else(bad)?;
    let start = start.trim().parse().map_err(|_| bad())?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().map_err(|_| bad())?),
    };
    Ok((start, total))
}
