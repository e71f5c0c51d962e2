//! The public client handle and what both drivers share.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use opamp_proto::{
    AgentCapabilitySet, AgentDescription, AgentToServerFlagSet, AvailableComponents,
    ComponentHealth, ConnectionSettingsRequest, ConnectionSettingsStatus, CustomCapabilities,
    CustomMessage, InstanceUid, OpAmpConnectionSettings, PackageStatuses, RemoteConfigStatus,
    ServerCapabilitySet,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::callbacks::{Callbacks, SettingsRejected};
use crate::core::{ClientCore, CoreConfig, DriverAction, Event, Failure, TransportKind};
use crate::error::{ClientError, ConnectError, StartError, StopError};
use crate::packages::PackageSyncer;
use crate::settings::{Endpoint, StartSettings};

/// State shared by the handle and the driver task.
pub(crate) struct Shared {
    core: Mutex<ClientCore>,
    /// Wakes the driver after a setter changed something.
    pub(crate) wake: Notify,
    stop_requested: AtomicBool,
    pub(crate) stop_tx: watch::Sender<bool>,
    done_tx: watch::Sender<bool>,
    /// The driver task's id, to recognise `stop()` called from inside a callback.
    driver_task: OnceLock<tokio::task::Id>,
    /// The private key (PEM) of the last CSR sent, for the certificate the server issues
    /// for it (CSR-4, CSR-7).
    #[cfg(feature = "csr")]
    csr_key: Mutex<Option<String>>,
}

impl Shared {
    /// A new key pair and CSR for the current uid; the request goes out when the server
    /// takes it (CSR-2), the key is kept for the certificate (CSR-4).
    #[cfg(feature = "csr")]
    fn request_certificate(&self) -> Result<(), ClientError> {
        let uid = self.core().instance_uid();
        let request = crate::csr::CertificateRequest::generate(uid)?;
        self.core()
            .request_connection_settings(request.to_request())?;
        *self.csr_key.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(request.private_key_pem().to_owned());
        Ok(())
    }

    /// Locks the core. The lock is never held across an `.await`.
    pub(crate) fn core(&self) -> MutexGuard<'_, ClientCore> {
        // A panic while holding the lock can only come from a bug in the core; its state is
        // still a valid (if odd) protocol state, so carry on rather than poison every setter.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the WebSocket driver does with its connection after the events were dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkAction {
    /// Carry on.
    Keep,
    /// The server is UNAVAILABLE: goodbye, close, reconnect at `connect_at` (THR-2, WS-19).
    Reconnect,
    /// The server is unresponsive (half-open): drop the connection, reconnect at `connect_at`.
    Drop,
    /// Offered connection settings are to be tried: goodbye, close, connect with the
    /// candidate at `connect_at` (CS-OP-3).
    Switch,
}

/// Connection settings in effect: the settings and their parsed endpoint.
pub(crate) struct Active {
    pub(crate) settings: StartSettings,
    pub(crate) endpoint: Endpoint,
}

/// The current connection settings and, while an offer is tried, the candidate.
struct ConnState {
    current: Arc<Active>,
    candidate: Option<Arc<Active>>,
}

/// Everything a driver needs.
pub(crate) struct Driver {
    pub(crate) shared: Arc<Shared>,
    pub(crate) callbacks: Arc<dyn Callbacks>,
    /// The start settings: timeouts and limits. The connection's own settings (endpoint,
    /// headers, TLS) come from [`active`](Self::active).
    pub(crate) settings: StartSettings,
    conn: Mutex<ConnState>,
    /// Syncs `packages_available` offers, with [`StartSettings::with_packages`].
    pub(crate) packages: Option<PackageSyncer>,
}

impl Driver {
    fn conn(&self) -> MutexGuard<'_, ConnState> {
        // Only plain assignments happen under the lock.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The settings to connect with: the candidate while the core tries an offer (CS-OP-4),
    /// the current ones otherwise.
    pub(crate) fn active(&self) -> Arc<Active> {
        let trying = self.shared.core().is_trying_connection_settings();
        let conn = self.conn();
        match (&conn.candidate, trying) {
            (Some(candidate), true) => candidate.clone(),
            _ => conn.current.clone(),
        }
    }

    /// The current settings, whatever is tried.
    pub(crate) fn current(&self) -> Arc<Active> {
        self.conn().current.clone()
    }

    /// Candidate settings from an offer, or why they cannot be used.
    fn candidate(&self, offer: &OpAmpConnectionSettings) -> Result<Active, SettingsRejected> {
        let current = self.current();
        let settings = current.settings.with_opamp_connection_settings(offer)?;
        let endpoint = settings
            .resolve()
            .map_err(|e| SettingsRejected::new(e.to_string()))?;
        if endpoint.transport != current.endpoint.transport {
            return Err(SettingsRejected::new(
                "moving between WebSocket and plain HTTP is not supported",
            ));
        }
        Ok(Active { settings, endpoint })
    }

    /// Puts the key of the last CSR into an offered certificate that has none (CSR-4).
    #[cfg(feature = "csr")]
    fn with_csr_key(
        &self,
        mut settings: Box<OpAmpConnectionSettings>,
    ) -> Box<OpAmpConnectionSettings> {
        let key = self
            .shared
            .csr_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(cert), Some(key)) = (settings.certificate.as_mut(), key) {
            if cert.private_key.is_empty() && !cert.cert.is_empty() {
                cert.private_key = key.into_bytes().into();
            }
        }
        settings
    }

    /// The certificate issued for the last CSR is in use: its key is no longer pending, and
    /// the certificate is renewed at two thirds of its validity (CSR-8).
    #[cfg(feature = "csr")]
    fn csr_key_used(&self, settings: &OpAmpConnectionSettings) {
        let issued = {
            let mut key = self
                .shared
                .csr_key
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let issued = settings.certificate.as_ref().filter(|c| {
                key.as_ref()
                    .is_some_and(|k| c.private_key[..] == *k.as_bytes())
            });
            if issued.is_some() {
                *key = None;
            }
            issued
        };
        let Some(cert) = issued else {
            return;
        };
        match renewal_delay(&cert.cert, std::time::SystemTime::now()) {
            Some(delay) => {
                tracing::debug!(?delay, "client certificate renewal scheduled");
                self.shared
                    .core()
                    .schedule_certificate_renewal(Instant::now() + delay);
            }
            None => tracing::warn!("the issued certificate's validity could not be read"),
        }
    }

    /// Fetches the effective config from the embedder when the core asks for it.
    pub(crate) async fn refresh_effective_config(&self) {
        let wanted = self.shared.core().take_effective_config_request();
        if wanted {
            if let Some(config) = self.callbacks.get_effective_config().await {
                if let Err(e) = self.shared.core().set_effective_config(config) {
                    tracing::debug!("effective config not stored: {e}");
                }
            }
        }
    }

    /// Checks the core's timers (half-open server, deferred remote config), then calls the
    /// callbacks for every pending event, one at a time. Returns what the WebSocket driver
    /// must do with its connection.
    pub(crate) async fn dispatch_events(&self) -> LinkAction {
        self.shared.core().handle_timeout(Instant::now());
        let mut action = LinkAction::Keep;
        loop {
            let (event, driver) = {
                let mut core = self.shared.core();
                (core.poll_event(), core.poll_driver_action())
            };
            match driver {
                Some(DriverAction::Reconnect) => action = LinkAction::Reconnect,
                Some(DriverAction::DropConnection) => action = LinkAction::Drop,
                Some(DriverAction::SwitchConnection) => action = LinkAction::Switch,
                None => {}
            }
            let Some(event) = event else {
                return action;
            };
            match event {
                Event::Connected => self.callbacks.on_connect().await,
                Event::ServerError(e) => self.callbacks.on_error(&e).await,
                Event::Command(c) => self.callbacks.on_command(&c).await,
                Event::OpampConnectionSettings {
                    settings,
                    offer_hash,
                } => {
                    // CSR-4, CSR-7: a certificate issued for our CSR comes without its key.
                    #[cfg(feature = "csr")]
                    let settings = self.with_csr_key(settings);
                    // CS-4: nothing is applied before the embedder accepts.
                    let decision = self
                        .callbacks
                        .on_opamp_connection_settings(&settings, &offer_hash)
                        .await
                        .and_then(|()| self.candidate(&settings));
                    let now = Instant::now();
                    match decision {
                        Ok(candidate) => {
                            tracing::debug!("OpAMP connection settings accepted");
                            self.conn().candidate = Some(Arc::new(candidate));
                            let mut core = self.shared.core();
                            core.accept_opamp_connection_settings(now, &offer_hash, &settings);
                            if !core.is_trying_connection_settings() {
                                // Only the heartbeat changed: nothing to try.
                                self.conn().candidate = None;
                            }
                        }
                        Err(e) => {
                            tracing::info!("{e}");
                            self.shared.core().reject_opamp_connection_settings(
                                now,
                                &offer_hash,
                                &e.reason,
                            );
                        }
                    }
                }
                Event::OpampConnectionSettingsApplied {
                    settings,
                    offer_hash,
                } => {
                    {
                        let mut conn = self.conn();
                        if let Some(candidate) = conn.candidate.take() {
                            conn.current = candidate;
                        }
                    }
                    #[cfg(feature = "csr")]
                    self.csr_key_used(&settings);
                    tracing::info!("offered OpAMP connection settings applied");
                    self.callbacks
                        .on_opamp_connection_settings_applied(&settings, &offer_hash)
                        .await;
                }
                Event::OpampConnectionSettingsFailed { offer_hash, reason } => {
                    self.conn().candidate = None;
                    self.callbacks
                        .on_opamp_connection_settings_failed(&offer_hash, &reason)
                        .await;
                }
                Event::TelemetryConnectionSettings {
                    settings,
                    offer_hash,
                } => {
                    let decision = self
                        .callbacks
                        .on_telemetry_connection_settings(&settings, &offer_hash)
                        .await;
                    let now = Instant::now();
                    let mut core = self.shared.core();
                    match decision {
                        Ok(()) => core.accept_telemetry_connection_settings(now, &offer_hash),
                        Err(e) => {
                            core.reject_telemetry_connection_settings(now, &offer_hash, &e.reason)
                        }
                    }
                }
                Event::Message(data) => {
                    if let (Some(syncer), Some(offer)) = (&self.packages, &data.packages_available)
                    {
                        // PKG-4..PKG-6: a new offer cancels the sync under way.
                        syncer.offer(offer.clone());
                    }
                    self.callbacks.on_message(*data).await
                }
                Event::ReportTooLarge(e) => self.callbacks.on_report_too_large(&e).await,
                Event::RenewClientCertificate => {
                    // CSR-8, CSR-9
                    #[cfg(feature = "csr")]
                    if let Err(e) = self.shared.request_certificate() {
                        tracing::warn!("renewing the client certificate: {e}");
                    }
                }
                // The core's events are all handled above; a new one is logged until it is.
                #[allow(unreachable_patterns)]
                other => tracing::debug!(?other, "unhandled core event"),
            }
        }
    }

    /// Records a failed attempt and tells the embedder.
    pub(crate) async fn connect_failed(&self, error: &ConnectError) {
        let failure = match error.throttling() {
            Some(retry_after) => Failure::Throttled { retry_after },
            None => Failure::Transport,
        };
        let delay =
            self.shared
                .core()
                .handle_connect_error(Instant::now(), failure, &error.to_string());
        tracing::debug!(?delay, "connection failed: {error}");
        self.callbacks.on_connect_failed(error).await;
    }

    /// Resolves once `stop()` was called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.shared.stop_tx.subscribe();
        // The sender lives in `shared`, which outlives this future.
        let _ = rx.wait_for(|s| *s).await;
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.shared.stop_requested.load(Ordering::Acquire)
    }
}

/// An OpAMP client: connects, reports the agent's status, and hands what the server sends
/// to the [`Callbacks`].
///
/// One driver task, spawned by [`start`](Self::start), owns the connection; the setters only
/// update the status held by the protocol core and wake the driver, so they never block on the
/// network and a burst of them becomes one message (RETRY-4). Each setter returns
/// [`ClientError::MissingCapability`] when the matching capability was not declared and
/// [`ClientError::Stopped`] after [`stop`](Self::stop).
///
/// The handle is cheap to clone. Dropping the last clone aborts the driver task without any
/// network I/O (no disconnect message); call [`stop`](Self::stop) for a clean goodbye.
#[derive(Clone)]
pub struct OpampClient {
    shared: Arc<Shared>,
    task: Arc<TaskGuard>,
    stop_timeout: Duration,
}

/// Aborts the driver when the last handle goes away. No I/O in `Drop`.
struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fmt::Debug for OpampClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.shared.core();
        f.debug_struct("OpampClient")
            .field("instance_uid", &core.instance_uid())
            .field("transport", &core.transport())
            .field("connected", &core.is_connected())
            .field("stopped", &core.is_stopped())
            .finish_non_exhaustive()
    }
}

impl OpampClient {
    /// Starts a client: checks the settings and spawns its driver task on the current tokio
    /// runtime, which connects right away and keeps reconnecting until [`stop`](Self::stop).
    ///
    /// Fails when the settings are invalid or when called outside a tokio runtime.
    pub fn start(
        settings: StartSettings,
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<Self, StartError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        let endpoint = settings.resolve()?;
        let download = settings.package_download_settings()?;
        let mut capabilities = settings.capabilities;
        if settings.packages.is_some() {
            capabilities |=
                AgentCapabilitySet::ACCEPTS_PACKAGES | AgentCapabilitySet::REPORTS_PACKAGE_STATUSES;
        }
        let mut config = CoreConfig::new(settings.instance_uid, capabilities, endpoint.transport);
        config.heartbeat_interval = settings.heartbeat_interval;
        config.backoff = settings.backoff.clone();
        config.max_message_size = settings.max_message_size;
        config.jitter_seed = settings.jitter_seed;
        config.guards = settings.guards.clone();
        config.connection_settings_timeout = settings.connection_settings_timeout;
        let mut core = ClientCore::new(config, Instant::now());
        if let Some(description) = settings.agent_description.clone() {
            core.set_agent_description(description)
                .map_err(|_| StartError::InvalidSettings("the agent description is empty"))?;
        }
        core.set_flags(settings.flags)
            .map_err(|_| StartError::InvalidSettings("flags"))?;
        if let Some(status) = settings.remote_config_status.clone() {
            core.set_remote_config_status(status).map_err(|_| {
                StartError::InvalidSettings("a remote config status needs ReportsRemoteConfig")
            })?;
        }

        if let Some(status) = settings.connection_settings_status.clone() {
            core.set_connection_settings_status(status).map_err(|_| {
                StartError::InvalidSettings(
                    "a connection settings status needs ReportsConnectionSettingsStatus",
                )
            })?;
        }

        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            wake: Notify::new(),
            stop_requested: AtomicBool::new(false),
            stop_tx: watch::Sender::new(false),
            done_tx: watch::Sender::new(false),
            driver_task: OnceLock::new(),
            #[cfg(feature = "csr")]
            csr_key: Mutex::new(None),
        });
        let stop_timeout = settings.stop_timeout;
        let packages = match (&settings.packages, download) {
            (Some(p), Some(download)) => {
                // PKG-13: what the agent has, from the first message on.
                match crate::packages::initial_statuses(&*p.provider) {
                    Ok(statuses) => {
                        let _ = shared.core().set_package_statuses(statuses);
                    }
                    Err(e) => tracing::warn!("reading the installed packages: {e}"),
                }
                let sink = shared.clone();
                Some(PackageSyncer::new(
                    p.provider.clone(),
                    p.verifier.clone(),
                    download,
                    move |statuses| {
                        // Fails only once the client is stopped: nothing is reported then.
                        if sink.core().set_package_statuses(statuses).is_ok() {
                            sink.wake.notify_one();
                        }
                    },
                ))
            }
            _ => None,
        };
        let transport = endpoint.transport;
        let driver = Driver {
            shared: shared.clone(),
            callbacks,
            conn: Mutex::new(ConnState {
                current: Arc::new(Active {
                    settings: settings.clone(),
                    endpoint,
                }),
                candidate: None,
            }),
            settings,
            packages,
        };
        let task = runtime.spawn(async move {
            let _ = driver.shared.driver_task.set(tokio::task::id());
            match transport {
                TransportKind::WebSocket => crate::ws::run(&driver).await,
                TransportKind::Http => crate::http::run(&driver).await,
            }
            let _ = driver.shared.core().stop(Instant::now());
            driver.shared.done_tx.send_replace(true);
        });
        Ok(Self {
            shared,
            task: Arc::new(TaskGuard(task)),
            stop_timeout,
        })
    }

    fn update(
        &self,
        f: impl FnOnce(&mut ClientCore) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        if self.shared.stop_requested.load(Ordering::Acquire) {
            return Err(ClientError::Stopped);
        }
        f(&mut self.shared.core())?;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Sets the agent description (DESC-*); it must have at least one attribute.
    pub fn set_agent_description(&self, description: AgentDescription) -> Result<(), ClientError> {
        self.update(|c| c.set_agent_description(description))
    }

    /// Sets the agent's health (HLT-*); needs `ReportsHealth`.
    pub fn set_health(&self, health: ComponentHealth) -> Result<(), ClientError> {
        self.update(|c| c.set_health(health))
    }

    /// Reports a changed effective configuration (EFF-2): the client calls
    /// [`Callbacks::get_effective_config`] and sends the result. Needs
    /// `ReportsEffectiveConfig`.
    pub fn update_effective_config(&self) -> Result<(), ClientError> {
        self.update(|c| c.request_effective_config())
    }

    /// Sets the remote config status (RC-5, RC-7); needs `ReportsRemoteConfig`.
    pub fn set_remote_config_status(&self, status: RemoteConfigStatus) -> Result<(), ClientError> {
        self.update(|c| c.set_remote_config_status(status))
    }

    /// Sets the package statuses (PKG-13..PKG-19); needs `ReportsPackageStatuses`.
    pub fn set_package_statuses(&self, statuses: PackageStatuses) -> Result<(), ClientError> {
        self.update(|c| c.set_package_statuses(statuses))
    }

    /// Sets the custom capabilities the agent supports (CUS-1).
    pub fn set_custom_capabilities(
        &self,
        capabilities: CustomCapabilities,
    ) -> Result<(), ClientError> {
        self.update(|c| c.set_custom_capabilities(capabilities))
    }

    /// Sends a custom message (CUS-5). Its capability must be declared with
    /// [`set_custom_capabilities`](Self::set_custom_capabilities); while one message waits to
    /// be sent, the next fails with [`ClientError::CustomMessagePending`].
    pub fn send_custom_message(&self, message: CustomMessage) -> Result<(), ClientError> {
        self.update(|c| c.send_custom_message(message))
    }

    /// Sets the available components (AVC-*); needs `ReportsAvailableComponents`.
    pub fn set_available_components(
        &self,
        components: AvailableComponents,
    ) -> Result<(), ClientError> {
        self.update(|c| c.set_available_components(components))
    }

    /// Sets the connection settings status (CSS-1); needs `ReportsConnectionSettingsStatus`.
    pub fn set_connection_settings_status(
        &self,
        status: ConnectionSettingsStatus,
    ) -> Result<(), ClientError> {
        self.update(|c| c.set_connection_settings_status(status))
    }

    /// Asks the server for connection settings, e.g. a certificate from a CSR (CSR-2); needs
    /// `AcceptsOpAMPConnectionSettings`, and the server's `AcceptsConnectionSettingsRequest`
    /// once its capabilities are known (CAP-4).
    pub fn request_connection_settings(
        &self,
        request: ConnectionSettingsRequest,
    ) -> Result<(), ClientError> {
        self.update(|c| c.request_connection_settings(request))
    }

    /// Starts the CSR flow (CSR-2, feature `csr`): generates a key pair and a CSR carrying
    /// the instance uid, keeps the key, and sends the request to the server once it has
    /// advertised `AcceptsConnectionSettingsRequest` (held until its capabilities are known;
    /// refused with [`ClientError::ServerLacksCapability`] when they lack it). The server's
    /// answer, an OpAMP connection offer with the issued certificate and no private key
    /// (CSR-4), goes through [`Callbacks::on_opamp_connection_settings`] and is tried like any
    /// other offer, with the kept key put in (CSR-7): the settings given to
    /// [`Callbacks::on_opamp_connection_settings_applied`] then hold that private key, so
    /// persist them safely. Calling it again (e.g. before the certificate expires, or after
    /// the server assigned a new uid, CSR-8, CSR-9) replaces the pending key. Needs
    /// `AcceptsOpAMPConnectionSettings`.
    ///
    /// Once a certificate from this flow is in use, the client renews it by itself at two
    /// thirds of its validity, and at once when the server assigns a new instance uid
    /// (CSR-8, CSR-9).
    #[cfg(feature = "csr")]
    pub fn request_client_certificate(&self) -> Result<(), ClientError> {
        if self.shared.stop_requested.load(Ordering::Acquire) {
            return Err(ClientError::Stopped);
        }
        self.shared.request_certificate()?;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Sets `AgentToServer.flags` (e.g. `RequestInstanceUid`, UID-5).
    pub fn set_flags(&self, flags: AgentToServerFlagSet) -> Result<(), ClientError> {
        self.update(|c| c.set_flags(flags))
    }

    /// The instance uid in use; it changes when the server assigns one (UID-7).
    pub fn instance_uid(&self) -> InstanceUid {
        self.shared.core().instance_uid()
    }

    /// The server's last non-zero capabilities (CAP-3); empty until it answered.
    pub fn server_capabilities(&self) -> ServerCapabilitySet {
        self.shared.core().server_capabilities()
    }

    /// Whether the client is connected (WebSocket open, or last plain-HTTP request answered).
    pub fn is_connected(&self) -> bool {
        self.shared.core().is_connected()
    }

    /// Stops the client: sends a last message with `agent_disconnect` (WS-16, HTTP-11), closes
    /// the WebSocket with a close frame and waits for the close handshake, all bounded by the
    /// stop timeout; after it the driver task is aborted. Setters fail with
    /// [`ClientError::Stopped`] from the moment this is called.
    ///
    /// Called from inside a callback, it only signals the driver and returns at once (the
    /// goodbye happens when the callback returns), so it never deadlocks.
    ///
    /// Cancel safety: dropping the future leaves the stop under way; the driver still says
    /// goodbye and exits.
    pub async fn stop(&self) -> Result<(), StopError> {
        if self.shared.stop_requested.swap(true, Ordering::AcqRel) {
            return Err(StopError::AlreadyStopped);
        }
        self.shared.stop_tx.send_replace(true);
        self.shared.wake.notify_one();
        let in_callback =
            tokio::task::try_id().is_some_and(|id| self.shared.driver_task.get() == Some(&id));
        if in_callback {
            return Ok(());
        }
        let mut done = self.shared.done_tx.subscribe();
        // The driver bounds its goodbye by the stop timeout; a little slack lets it finish.
        let limit = self.stop_timeout + Duration::from_millis(250);
        match tokio::time::timeout(limit, done.wait_for(|d| *d)).await {
            Ok(_) => Ok(()),
            Err(_) => {
                self.task.0.abort();
                Err(StopError::Timeout)
            }
        }
    }
}

/// How long after `now` a certificate (PEM) is due for renewal: at two thirds of its
/// validity (CSR-8); zero when that is past. `None` if it cannot be read.
#[cfg(feature = "csr")]
fn renewal_delay(cert_pem: &[u8], now: std::time::SystemTime) -> Option<Duration> {
    use std::time::UNIX_EPOCH;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let validity = cert.validity();
    let at = |t: i64| Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?));
    let from = at(validity.not_before.timestamp())?;
    let to = at(validity.not_after.timestamp())?;
    let renew = from + to.duration_since(from).ok()? * 2 / 3;
    Some(renew.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(all(test, feature = "csr"))]
mod tests {
    use super::*;

    #[test]
    fn csr_8_renewal_at_two_thirds_of_the_validity() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 4, 1); // 90 days
        let pem = params.self_signed(&key).unwrap().pem();
        let start = std::time::UNIX_EPOCH + Duration::from_secs(1_893_456_000); // 2030-01-01
        assert_eq!(
            renewal_delay(pem.as_bytes(), start),
            Some(Duration::from_secs(60 * 86400))
        );
        let late = start + Duration::from_secs(70 * 86400);
        assert_eq!(renewal_delay(pem.as_bytes(), late), Some(Duration::ZERO));
        assert_eq!(renewal_delay(b"garbage", start), None);
    }
}
