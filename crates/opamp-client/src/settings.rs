//! What [`OpampClient::start`](crate::OpampClient::start) needs: [`StartSettings`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use opamp_proto::{
    AgentCapabilitySet, AgentDescription, AgentToServerFlagSet, ConnectionSettingsStatus,
    InstanceUid, OpAmpConnectionSettings,
};
#[cfg(feature = "tls")]
use opamp_transport::tls::{CertifiedKeyPem, ClientTls, TlsVersion};

use crate::callbacks::SettingsRejected;

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
    pub(crate) connection_settings_status: Option<ConnectionSettingsStatus>,
    pub(crate) connection_settings_timeout: Duration,
    #[cfg(feature = "tls")]
    pub(crate) dangerous_allow_offered_skip_verify: bool,
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
            connection_settings_status: None,
            connection_settings_timeout: Duration::from_secs(30),
            #[cfg(feature = "tls")]
            dangerous_allow_offered_skip_verify: false,
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

    /// The connection settings status the first message carries: what the agent last
    /// reported before it restarted (persist it with the settings, see
    /// [`Callbacks::on_opamp_connection_settings_applied`](crate::Callbacks::on_opamp_connection_settings_applied)).
    /// An APPLIED or FAILED status also marks its offer as handled, so that the server's
    /// repeat of it is not applied again (CS-2). Needs `ReportsConnectionSettingsStatus`.
    pub fn with_connection_settings_status(mut self, status: ConnectionSettingsStatus) -> Self {
        self.connection_settings_status = Some(status);
        self
    }

    /// How long offered OpAMP connection settings are tried, from their acceptance until the
    /// server at them answers, before they count as failed and the client goes back to its
    /// settings (CS-OP-4..CS-OP-6). Default 30 s; the connect timeout bounds each attempt
    /// too.
    pub fn with_connection_settings_timeout(mut self, timeout: Duration) -> Self {
        self.connection_settings_timeout = timeout;
        self
    }

    /// Let an offer's `tls.insecure_skip_verify` switch server certificate verification off.
    /// Without this (the default) such an offer is refused (FAILED): a server could otherwise
    /// remove all protection TLS gives with one message. For tests only.
    #[cfg(feature = "tls")]
    pub fn dangerous_allow_offered_insecure_skip_verify(mut self) -> Self {
        self.dangerous_allow_offered_skip_verify = true;
        self
    }

    /// These settings with offered OpAMP connection settings applied (CS-OP-1): what the
    /// client connects with when it tries an offer, and what an embedder calls at start with
    /// the settings it persisted (so a restarted agent uses them). Field by field:
    ///
    /// | offered | effect |
    /// |---|---|
    /// | `destination_endpoint` | the endpoint, when not empty; a `ws`, `wss`, `http` or `https` URL (CS-OP-9) |
    /// | `headers` | replace the static headers (CS-6); the header function still adds its own |
    /// | `certificate` | `cert` (+ `ca_cert`) and `private_key` become the client certificate; absent: no client certificate (CS-5); without `private_key`: refused |
    /// | `tls.ca_pem_contents` | the CAs trusted, with the system's roots if `include_system_ca_certs_pool` |
    /// | `tls.min_version`, `tls.max_version` | `"1.2"` or `"1.3"` (`"1.0"`, `"1.1"` as a minimum mean 1.2) |
    /// | `tls.insecure_skip_verify` | refused unless [`dangerous_allow_offered_insecure_skip_verify`](Self::dangerous_allow_offered_insecure_skip_verify) |
    /// | `tls.cipher_suites`, `proxy` | refused (not supported) |
    /// | `heartbeat_interval_seconds` | the heartbeat interval, when not 0 |
    ///
    /// A certificate or TLS part replaces a custom [`with_tls_config`](Self::with_tls_config).
    /// Without the `tls` feature, certificate and TLS parts are refused.
    pub fn with_opamp_connection_settings(
        &self,
        offer: &OpAmpConnectionSettings,
    ) -> Result<Self, SettingsRejected> {
        let mut s = self.clone();
        if !offer.destination_endpoint.is_empty() {
            s.endpoint = offer.destination_endpoint.clone();
            // CS-OP-9
            s.resolve()
                .map_err(|e| SettingsRejected::new(format!("destination_endpoint: {e}")))?;
        }
        if let Some(headers) = &offer.headers {
            let mut map = HeaderMap::new();
            for h in &headers.headers {
                let name = HeaderName::try_from(h.key.as_str()).map_err(|_| {
                    SettingsRejected::new(format!("invalid header name {:?}", h.key))
                })?;
                let value = HeaderValue::try_from(h.value.as_str()).map_err(|_| {
                    SettingsRejected::new(format!("invalid value of header {:?}", h.key))
                })?;
                map.append(name, value);
            }
            s.headers = map;
        }
        if offer.proxy.is_some() {
            return Err(SettingsRejected::new("proxy settings are not supported"));
        }
        #[cfg(not(feature = "tls"))]
        if offer.certificate.is_some() || offer.tls.is_some() {
            return Err(SettingsRejected::new(
                "certificate and TLS settings need the `tls` feature",
            ));
        }
        #[cfg(feature = "tls")]
        {
            s.apply_offered_tls(offer)?;
            // Checks the TLS parts too (the endpoint may be plain).
            opamp_transport::tls::client_config(&s.tls)
                .map_err(|e| SettingsRejected::new(format!("TLS settings: {e}")))?;
        }
        if offer.heartbeat_interval_seconds > 0 {
            s.heartbeat_interval = Duration::from_secs(offer.heartbeat_interval_seconds);
        }
        Ok(s)
    }

    #[cfg(feature = "tls")]
    fn apply_offered_tls(
        &mut self,
        offer: &OpAmpConnectionSettings,
    ) -> Result<(), SettingsRejected> {
        // CS-5: an offer without a certificate means no client certificate.
        self.tls.client_identity = match &offer.certificate {
            None => None,
            Some(c) if c.private_key.is_empty() => {
                return Err(SettingsRejected::new(
                    "an offered certificate without its private key (CSR flow) is not supported",
                ));
            }
            Some(c) => {
                let mut chain = c.cert.to_vec();
                if !c.ca_cert.is_empty() {
                    // CS-7: the CA is sent with the chain, never trusted.
                    chain.push(b'\n');
                    chain.extend_from_slice(&c.ca_cert);
                }
                Some(CertifiedKeyPem {
                    cert_chain: chain,
                    private_key: c.private_key.to_vec(),
                })
            }
        };
        if let Some(tls) = &offer.tls {
            if !tls.ca_pem_contents.is_empty() {
                self.tls.ca_pem = Some(tls.ca_pem_contents.clone().into_bytes());
                self.tls.include_system_roots = tls.include_system_ca_certs_pool;
            } else if tls.include_system_ca_certs_pool {
                self.tls.ca_pem = None;
            }
            if tls.insecure_skip_verify {
                if !self.dangerous_allow_offered_skip_verify {
                    return Err(SettingsRejected::new(
                        "insecure_skip_verify offered; this agent does not allow it",
                    ));
                }
                self.tls.dangerous_skip_verify = true;
            }
            if !tls.cipher_suites.is_empty() {
                return Err(SettingsRejected::new("cipher_suites are not supported"));
            }
            self.tls.min_version = tls_version(&tls.min_version, true)?;
            self.tls.max_version = tls_version(&tls.max_version, false)?;
        }
        if offer.certificate.is_some() || offer.tls.is_some() {
            self.tls_config = None;
        }
        Ok(())
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

/// An offered TLS version (`"1.2"`, `"1.3"`, or empty for the default).
#[cfg(feature = "tls")]
fn tls_version(v: &str, minimum: bool) -> Result<Option<TlsVersion>, SettingsRejected> {
    match v
        .trim()
        .trim_start_matches("TLSv")
        .trim_start_matches("TLS")
    {
        "" => Ok(None),
        // rustls speaks nothing older than 1.2: a lower minimum is met by 1.2.
        "1.0" | "1.1" if minimum => Ok(Some(TlsVersion::Tls12)),
        "1.2" => Ok(Some(TlsVersion::Tls12)),
        "1.3" => Ok(Some(TlsVersion::Tls13)),
        other => Err(SettingsRejected::new(format!(
            "unsupported TLS version {other:?}"
        ))),
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

    fn offer() -> OpAmpConnectionSettings {
        OpAmpConnectionSettings::default()
    }

    #[test]
    fn cs_op_9_cs_6_offered_endpoint_and_headers_replace_the_current_ones() {
        let base = StartSettings::new("ws://a:1/v1/opamp").with_header(
            HeaderName::from_static("x-old"),
            HeaderValue::from_static("1"),
        );
        let mut o = offer();
        o.destination_endpoint = "ws://b:2/v1/opamp".into();
        o.headers = Some(opamp_proto::Headers {
            headers: vec![opamp_proto::Header {
                key: "authorization".into(),
                value: "Bearer rotated".into(),
            }],
        });
        o.heartbeat_interval_seconds = 7;
        let s = base.with_opamp_connection_settings(&o).unwrap();
        assert_eq!(s.endpoint, "ws://b:2/v1/opamp");
        assert_eq!(s.headers.len(), 1);
        assert_eq!(s.headers["authorization"], "Bearer rotated");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(7));
        // An absent part keeps the current value (CS-3).
        let kept = base.with_opamp_connection_settings(&offer()).unwrap();
        assert_eq!(kept.endpoint, "ws://a:1/v1/opamp");
        assert!(kept.headers.contains_key("x-old"));

        for bad in ["ftp://b/", "not a url", "/v1/opamp"] {
            let mut o = offer();
            o.destination_endpoint = bad.into();
            assert!(base.with_opamp_connection_settings(&o).is_err(), "{bad}");
        }
        let mut o = offer();
        o.headers = Some(opamp_proto::Headers {
            headers: vec![opamp_proto::Header {
                key: "bad name".into(),
                value: "v".into(),
            }],
        });
        assert!(base.with_opamp_connection_settings(&o).is_err());
        let mut o = offer();
        o.proxy = Some(Default::default());
        assert!(base.with_opamp_connection_settings(&o).is_err(), "PRX");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn offered_tls_versions_ca_and_skip_verify() {
        let base = StartSettings::new("wss://a/");
        let tls = |f: &dyn Fn(&mut opamp_proto::TlsConnectionSettings)| {
            let mut t = opamp_proto::TlsConnectionSettings::default();
            f(&mut t);
            let mut o = offer();
            o.tls = Some(t);
            o
        };
        let s = base
            .with_opamp_connection_settings(&tls(&|t| {
                t.min_version = "1.3".into();
            }))
            .unwrap();
        assert_eq!(s.tls.min_version, Some(TlsVersion::Tls13));
        let s = base
            .with_opamp_connection_settings(&tls(&|t| t.min_version = "1.0".into()))
            .unwrap();
        assert_eq!(s.tls.min_version, Some(TlsVersion::Tls12));
        assert!(
            base.with_opamp_connection_settings(&tls(&|t| t.max_version = "1.1".into()))
                .is_err()
        );
        assert!(
            base.with_opamp_connection_settings(&tls(&|t| {
                t.min_version = "1.3".into();
                t.max_version = "1.2".into();
            }))
            .is_err(),
            "min above max"
        );
        assert!(
            base.with_opamp_connection_settings(&tls(&|t| t.cipher_suites = vec!["x".into()]))
                .is_err()
        );
        assert!(
            base.with_opamp_connection_settings(&tls(&|t| t.ca_pem_contents = "garbage".into()))
                .is_err(),
            "an unusable CA is refused before it is tried"
        );
        // insecure_skip_verify only under the dangerous name.
        let skip = tls(&|t| t.insecure_skip_verify = true);
        let e = base.with_opamp_connection_settings(&skip).unwrap_err();
        assert!(e.reason.contains("insecure_skip_verify"), "{e}");
        let s = base
            .clone()
            .dangerous_allow_offered_insecure_skip_verify()
            .with_opamp_connection_settings(&skip)
            .unwrap();
        assert!(s.tls.dangerous_skip_verify);
        // CS-5: an offer without a certificate means no client certificate; one without its
        // key is refused.
        let with_cert = base
            .clone()
            .with_tls_client_cert_pem("cert".as_bytes(), "key".as_bytes());
        let s = with_cert
            .with_opamp_connection_settings(&tls(&|_| {}))
            .unwrap();
        assert!(s.tls.client_identity.is_none());
        let mut o = offer();
        o.certificate = Some(opamp_proto::TlsCertificate {
            cert: "c".into(),
            ..Default::default()
        });
        assert!(base.with_opamp_connection_settings(&o).is_err());
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
