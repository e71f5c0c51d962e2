//! What [`OpampClient::start`](crate::OpampClient::start) needs: [`StartSettings`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use opamp_proto::{AgentCapabilitySet, AgentDescription, AgentToServerFlagSet, InstanceUid};
#[cfg(feature = "tls")]
use opamp_transport::tls::{CertifiedKeyPem, ClientTls};

use crate::backoff::BackoffPolicy;
use crate::core::{DEFAULT_HEARTBEAT_INTERVAL, ServerGuards, TransportKind};
use crate::error::StartError;
use crate::packages::{DownloadSettings, PackagesStateProvider, SignatureVerifier};

/// What [`StartSettings::with_packages`] sets: the agent's packages and how to sync them.
#[derive(Clone)]
pub(crate) struct PackagesSettings {
    pub(crate) provider: Arc<dyn PackagesStateProvider>,
    pub(crate) verifier: Arc<dyn SignatureVerifier>,
    pub(crate) download: DownloadSettings,
}

/// A function called before every plain-HTTP request and every WebSocket handshake; the
/// headers it returns are added to the static ones (for rotating tokens, AUTH-1).
pub type HeaderFn = Arc<dyn Fn() -> HeaderMap + Send + Sync>;

/// The settings of an [`OpampClient`](crate::OpampClient).
///
/// Built with [`StartSettings::new`] and the `with_*` methods; every other setting has a safe
/// default:
///
/// | setting | default |
/// |---|---|
/// | instance uid | a fresh UUID v7 (UID-1, UID-2); persist it and pass it back on restart (UID-3) |
/// | capabilities | `ReportsStatus` only (CAP-1) |
/// | heartbeat / polling interval | 30 s (WS-14, HTTP-7, HB-3) |
/// | backoff | [`BackoffPolicy::default`]: 500 ms × 1.5 up to 60 s, ±50 % jitter, never gives up |
/// | message size limit | 64 MiB, both ways (WS-8, HTTP-13) |
/// | gzip request bodies (plain HTTP) | off; gzip responses are always accepted and decompressed with the limit |
/// | TLS (`wss`, `https`, feature `tls`) | the system's root certificates, no client certificate |
/// | connect / request timeout | 30 s |
/// | stop timeout | 5 s |
/// | bounds on the server | [`ServerGuards::default`] |
///
/// The endpoint's scheme picks the transport (GEN-4): `ws`/`wss` for WebSocket,
/// `http`/`https` for plain HTTP. Without the `tls` feature, `wss` and `https` are refused
/// with [`StartError::TlsDisabled`].
#[derive(Clone)]
#[non_exhaustive]
pub struct StartSettings {
    pub(crate) endpoint: String,
    pub(crate) headers: HeaderMap,
    pub(crate) header_fn: Option<HeaderFn>,
    #[cfg(feature = "tls")]
    pub(crate) tls: ClientTls,
    #[cfg(feature = "tls")]
    pub(crate) tls_config: Option<Arc<rustls::ClientConfig>>,
    pub(crate) instance_uid: InstanceUid,
    pub(crate) capabilities: AgentCapabilitySet,
    pub(crate) agent_description: Option<AgentDescription>,
    pub(crate) remote_config_status: Option<opamp_proto::RemoteConfigStatus>,
    pub(crate) flags: AgentToServerFlagSet,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) backoff: BackoffPolicy,
    pub(crate) max_message_size: usize,
    pub(crate) max_message_elements: usize,
    pub(crate) compression: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) stop_timeout: Duration,
    pub(crate) jitter_seed: Option<u64>,
    pub(crate) guards: ServerGuards,
    pub(crate) packages: Option<PackagesSettings>,
}

impl StartSettings {
    /// Settings for the server at `endpoint`, e.g. `wss://opamp.example.com:4320/v1/opamp`.
    /// The URL is checked by `start`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            headers: HeaderMap::new(),
            header_fn: None,
            #[cfg(feature = "tls")]
            tls: ClientTls::default(),
            #[cfg(feature = "tls")]
            tls_config: None,
            instance_uid: InstanceUid::new_v7(),
            capabilities: AgentCapabilitySet::REPORTS_STATUS,
            agent_description: None,
            remote_config_status: None,
            flags: AgentToServerFlagSet::empty(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            backoff: BackoffPolicy::default(),
            max_message_size: opamp_proto::DEFAULT_MAX_MESSAGE_SIZE,
            max_message_elements: opamp_proto::DEFAULT_MAX_MESSAGE_ELEMENTS,
            compression: false,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(5),
            jitter_seed: None,
            guards: ServerGuards::default(),
            packages: None,
        }
    }

    /// The agent's instance uid (UID-1..UID-3).
    pub fn with_instance_uid(mut self, uid: InstanceUid) -> Self {
        self.instance_uid = uid;
        self
    }

    /// The agent's capabilities; `ReportsStatus` is always added (CAP-1). Setters for
    /// undeclared capabilities fail with [`ClientError::MissingCapability`](crate::ClientError::MissingCapability).
    pub fn with_capabilities(mut self, capabilities: AgentCapabilitySet) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Lets the client install the packages the server offers (PKG-*): it declares
    /// `AcceptsPackages` and `ReportsPackageStatuses` (added to
    /// [`with_capabilities`](Self::with_capabilities)' set), reports what `provider` has
    /// from the first message on (PKG-13), and syncs every `packages_available` with a
    /// [`PackageSyncer`](crate::packages::PackageSyncer) (downloads with `download`, the
    /// signature checked by `verifier`), reporting its statuses as it goes. A new offer
    /// cancels the sync under way. [`Callbacks::on_message`](crate::Callbacks::on_message)
    /// still sees the offer.
    ///
    /// Downloads over `https` use the client's TLS settings (CA, client certificate, or
    /// [`with_tls_config`](Self::with_tls_config)) unless `download` has its own.
    pub fn with_packages(
        mut self,
        provider: Arc<dyn PackagesStateProvider>,
        verifier: Arc<dyn SignatureVerifier>,
        download: DownloadSettings,
    ) -> Self {
        self.packages = Some(PackagesSettings {
            provider,
            verifier,
            download,
        });
        self
    }

    /// The agent description sent in the first message (DESC-*).
    pub fn with_agent_description(mut self, description: AgentDescription) -> Self {
        self.agent_description = Some(description);
        self
    }

    /// The remote config status the first message carries: what the agent last reported
    /// before it restarted (persist it, RC-3). Without it the first message says UNSET
    /// (RC-6), and a status set right after [`OpampClient::start`](crate::OpampClient::start)
    /// may come only with the second message. Needs `ReportsRemoteConfig`.
    pub fn with_remote_config_status(mut self, status: opamp_proto::RemoteConfigStatus) -> Self {
        self.remote_config_status = Some(status);
        self
    }

    /// `AgentToServer.flags` from the first message on, e.g. `RequestInstanceUid` (UID-5).
    pub fn with_flags(mut self, flags: AgentToServerFlagSet) -> Self {
        self.flags = flags;
        self
    }

    /// A header sent on every request and WebSocket handshake (AUTH-1), e.g. `Authorization`.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Headers sent on every request and WebSocket handshake.
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers.extend(headers);
        self
    }

    /// A function called before every request and handshake whose headers are added, for
    /// credentials that rotate.
    pub fn with_header_fn(mut self, f: impl Fn() -> HeaderMap + Send + Sync + 'static) -> Self {
        self.header_fn = Some(Arc::new(f));
        self
    }

    /// Trust only the CA certificates in this PEM instead of the system's roots.
    #[cfg(feature = "tls")]
    pub fn with_tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate chain and key (PEM) for mutual TLS.
    #[cfg(feature = "tls")]
    pub fn with_tls_client_cert_pem(
        mut self,
        cert_chain: impl Into<Vec<u8>>,
        private_key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_identity = Some(CertifiedKeyPem {
            cert_chain: cert_chain.into(),
            private_key: private_key.into(),
        });
        self
    }

    /// Use this rustls configuration for `wss`/`https` as is, instead of building one from the
    /// CA and client certificate settings. It should advertise ALPN `http/1.1` or none.
    #[cfg(feature = "tls")]
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls_config = Some(config);
        self
    }

    /// Accept any server certificate. This removes all protection TLS gives; for tests only.
    #[cfg(feature = "tls")]
    pub fn dangerous_skip_tls_verify(mut self) -> Self {
        self.tls.dangerous_skip_verify = true;
        self
    }

    /// The heartbeat interval (WebSocket, with `ReportsHeartbeat`) and plain-HTTP polling
    /// interval until the server offers one (HB-3). Must be at least one millisecond.
    pub fn with_heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// The reconnect backoff.
    pub fn with_backoff(mut self, policy: BackoffPolicy) -> Self {
        self.backoff = policy;
        self
    }

    /// The bounds on what a broken or hostile server can make the client do (reconnect
    /// storms, report, config and command loops, half-open connections); see
    /// [`ServerGuards`] for the defaults.
    pub fn with_server_guards(mut self, guards: ServerGuards) -> Self {
        self.guards = guards;
        self
    }

    /// Seeds the backoff jitter, for reproducible tests. By default it is seeded from the OS.
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }

    /// The size limit of a message in both directions, after decompression (WS-8, HTTP-13).
    pub fn with_max_message_size(mut self, limit: usize) -> Self {
        self.max_message_size = limit;
        self
    }

    /// The limit on the elements a `ServerToAgent` decodes into (config files, packages,
    /// headers, ...; [`opamp_proto::elements`]), checked before decoding: within the size
    /// limit a message can decode into ten times its size. A message past it is treated as
    /// malformed: the connection is closed (1009 over WebSocket) and retried with backoff.
    /// Default 262,144 ([`opamp_proto::DEFAULT_MAX_MESSAGE_ELEMENTS`]).
    pub fn with_max_message_elements(mut self, limit: usize) -> Self {
        self.max_message_elements = limit;
        self
    }

    /// Gzip plain-HTTP request bodies (HTTP-3). Off by default.
    pub fn with_compression(mut self, enabled: bool) -> Self {
        self.compression = enabled;
        self
    }

    /// The limit on establishing a connection (TCP, TLS, WebSocket handshake).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The limit on one plain-HTTP exchange, connection included (RETRY-1).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long [`OpampClient::stop`](crate::OpampClient::stop) waits for the disconnect
    /// message and the WebSocket close handshake.
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// The instance uid the client starts with.
    pub fn instance_uid(&self) -> InstanceUid {
        self.instance_uid
    }

    /// The download settings of packages, with the client's TLS settings when they have
    /// none of their own.
    pub(crate) fn package_download_settings(&self) -> Result<Option<DownloadSettings>, StartError> {
        let Some(packages) = &self.packages else {
            return Ok(None);
        };
        #[allow(unused_mut)]
        let mut download = packages.download.clone();
        #[cfg(feature = "tls")]
        if !download.has_tls_config() {
            let config = match &self.tls_config {
                Some(config) => config.clone(),
                None => opamp_transport::tls::client_config(&self.tls)
                    .map_err(|e| StartError::Tls(e.to_string()))?,
            };
            download = download.with_tls_config(config);
        }
        Ok(Some(download))
    }

    /// Checks the settings and derives what the drivers need.
    pub(crate) fn resolve(&self) -> Result<Endpoint, StartError> {
        let uri: Uri = self
            .endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| StartError::InvalidEndpoint(e.to_string()))?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| StartError::InvalidEndpoint("no scheme".into()))?
            .to_ascii_lowercase();
        let (transport, tls, default_port) = match scheme.as_str() {
            "ws" => (TransportKind::WebSocket, false, 80),
            "wss" => (TransportKind::WebSocket, true, 443),
            "http" => (TransportKind::Http, false, 80),
            "https" => (TransportKind::Http, true, 443),
            _ => return Err(StartError::UnsupportedScheme(scheme)),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| StartError::InvalidEndpoint("no host".into()))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(StartError::InvalidEndpoint("no host".into()));
        }
        if self.heartbeat_interval < Duration::from_millis(1) {
            return Err(StartError::InvalidSettings(
                "the heartbeat interval must be at least 1 ms",
            ));
        }
        if self.max_message_size < 64 {
            return Err(StartError::InvalidSettings(
                "the message size limit must be at least 64 bytes",
            ));
        }
        if self.max_message_elements == 0 {
            return Err(StartError::InvalidSettings(
                "the message element limit must be at least 1",
            ));
        }
        #[cfg(feature = "tls")]
        let tls_config = if tls {
            Some(match &self.tls_config {
                Some(config) => config.clone(),
                None => opamp_transport::tls::client_config(&self.tls)
                    .map_err(|e| StartError::Tls(e.to_string()))?,
            })
        } else {
            None
        };
        #[cfg(not(feature = "tls"))]
        if tls {
            return Err(StartError::TlsDisabled(scheme));
        }
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        Ok(Endpoint {
            port: authority.port_u16().unwrap_or(default_port),
            host_header: HeaderValue::from_str(authority.as_str())
                .map_err(|_| StartError::InvalidEndpoint("bad authority".into()))?,
            host,
            path_and_query,
            uri,
            transport,
            #[cfg(feature = "tls")]
            tls_config,
        })
    }
}

impl fmt::Debug for StartSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be credentials: only their names are shown.
        let mut f = f.debug_struct("StartSettings");
        f.field("endpoint", &self.endpoint)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("header_fn", &self.header_fn.as_ref().map(|_| "<fn>"));
        #[cfg(feature = "tls")]
        f.field("tls", &self.tls)
            .field("tls_config", &self.tls_config.as_ref().map(|_| "<custom>"));
        f.field("instance_uid", &self.instance_uid)
            .field("capabilities", &self.capabilities)
            .field("flags", &self.flags)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("backoff", &self.backoff)
            .field("max_message_size", &self.max_message_size)
            .field("max_message_elements", &self.max_message_elements)
            .field("compression", &self.compression)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("stop_timeout", &self.stop_timeout)
            .field("guards", &self.guards)
            .field(
                "packages",
                &self.packages.as_ref().map(|p| p.download.clone()),
            )
            .finish_non_exhaustive()
    }
}

/// The parsed endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) uri: Uri,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) host_header: HeaderValue,
    pub(crate) path_and_query: String,
    pub(crate) transport: TransportKind,
    #[cfg(feature = "tls")]
    pub(crate) tls_config: Option<Arc<rustls::ClientConfig>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_4_scheme_picks_the_transport() {
        let e = StartSettings::new("ws://127.0.0.1:4320/v1/opamp")
            .resolve()
            .unwrap();
        assert_eq!(e.transport, TransportKind::WebSocket);
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 4320));
        assert_eq!(e.path_and_query, "/v1/opamp");
        #[cfg(feature = "tls")]
        assert!(e.tls_config.is_none());
        let e = StartSettings::new("HTTP://[::1]/v1/opamp?x=1")
            .resolve()
            .unwrap();
        assert_eq!(e.transport, TransportKind::Http);
        assert_eq!((e.host.as_str(), e.port), ("::1", 80));
        assert_eq!(e.path_and_query, "/v1/opamp?x=1");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn gen_4_tls_schemes_get_a_tls_config() {
        let e = StartSettings::new("https://example.com")
            .dangerous_skip_tls_verify()
            .resolve()
            .unwrap();
        assert_eq!(e.port, 443);
        assert!(e.tls_config.is_some());
        assert_eq!(e.path_and_query, "/");
    }

    #[test]
    fn bad_endpoints_and_settings_are_refused() {
        assert!(matches!(
            StartSettings::new("ftp://x/").resolve(),
            Err(StartError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            StartSettings::new("not a url").resolve(),
            Err(StartError::InvalidEndpoint(_))
        ));
        assert!(matches!(
            StartSettings::new("/v1/opamp").resolve(),
            Err(StartError::InvalidEndpoint(_))
        ));
        assert!(matches!(
            StartSettings::new("ws://x/")
                .with_heartbeat_interval(Duration::ZERO)
                .resolve(),
            Err(StartError::InvalidSettings(_))
        ));
        #[cfg(feature = "tls")]
        assert!(matches!(
            StartSettings::new("wss://x/")
                .with_tls_ca_pem("garbage")
                .resolve(),
            Err(StartError::Tls(_))
        ));
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_schemes_need_the_tls_feature() {
        for url in ["wss://x/", "https://x/"] {
            assert!(matches!(
                StartSettings::new(url).resolve(),
                Err(StartError::TlsDisabled(_))
            ));
        }
    }

    #[test]
    fn debug_hides_header_values() {
        let s = StartSettings::new("ws://x/").with_header(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        let text = format!("{s:?}");
        assert!(text.contains("authorization"));
        assert!(!text.contains("secret"));
    }
}
