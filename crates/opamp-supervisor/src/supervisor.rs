//! The supervisor: one task that owns the agent process and the OpAMP client.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opamp_client::{Callbacks, ConnectError, MessageData, OpampClient, StartSettings};
use opamp_proto::{
    AgentDescription, AgentRemoteConfig, CommandType, ComponentHealth, EffectiveConfig,
    InstanceUid, KeyValue, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgentCommand,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::compose::{ComposedConfig, compose};
use crate::config::{ConfigError, RestartPolicy, SupervisorConfig};
use crate::error::{StartError, StopError};
use crate::health::{HealthEndpoint, Probe};
use crate::process::{AgentProcess, Exit, LaunchSpec, LogFile};
use crate::storage::Storage;

/// The longest `error_message` of a FAILED status and `last_error` of the health.
const MAX_ERROR_TEXT: usize = 4096;

/// What the supervisor's agent is doing, for embedders and tests; see
/// [`Supervisor::status`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct AgentStatus {
    /// The running agent's process id; `None` while it is not running.
    pub pid: Option<u32>,
    /// How many times the agent was started.
    pub starts: u64,
    /// How many of those starts were restarts after it exited on its own.
    pub crash_restarts: u64,
    /// How the agent last ended, if it did.
    pub last_exit: Option<Exit>,
    /// The last remote config status.
    pub remote_config_status: Option<RemoteConfigStatus>,
    /// The config files the agent was given.
    pub config_files: Vec<PathBuf>,
}

enum Command {
    Apply(AgentRemoteConfig),
    Restart,
    NewUid(InstanceUid),
    Stop,
}

/// A running supervisor: the agent process and the OpAMP client that reports on it.
///
/// [`Supervisor::start`] starts the agent with the last good config at once (from the storage
/// directory, so also while the server is unreachable) and connects to the server. From then
/// on one task:
///
/// - restarts the agent when it exits on its own, after a delay that grows exponentially
///   (`agent::restart_policy`) and starts over once the agent stayed up for `reset_after`;
/// - applies a remote config (RC-3): composes its files with the local ones, reports APPLYING,
///   restarts the agent with them, and reports APPLIED once the agent stayed up for
///   `agent::config_apply_timeout`, else FAILED with the agent's last stderr lines and runs the
///   previous config again (RC-5, RC-7). A config whose hash was already APPLIED or FAILED is
///   not applied again;
/// - restarts the agent on the Restart command (CMD-1);
/// - reports the files given to the agent as the effective config (EFF-1) and the process as
///   the health (HLT-1): running or not, exit code, restarts.
///
/// [`Supervisor::stop`] stops the agent (SIGTERM, SIGKILL after `agent::stop_timeout`) and
/// the client. If the supervisor is dropped instead, the task goes on until the runtime ends;
/// the agent is then killed.
#[derive(Debug)]
pub struct Supervisor {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
    uid: InstanceUid,
    status: watch::Receiver<AgentStatus>,
}

impl Supervisor {
    /// Checks `config`, loads the state, starts the agent and connects to the server. Must
    /// be called inside a tokio runtime.
    pub fn start(config: SupervisorConfig) -> Result<Self, StartError> {
        config.validate()?;
        let storage = Storage::open(&config.storage.directory)?;
        let uid = match &config.agent.instance_id {
            Some(text) => text.parse().map_err(|e: opamp_proto::InvalidInstanceUid| {
                ConfigError::invalid("agent::instance_id", e.to_string())
            })?,
            None => storage.instance_uid()?,
        };

        // Leftovers of an earlier run; the good config is composed afresh.
        let config_root = storage.agent_config_dir();
        if let Ok(entries) = std::fs::read_dir(&config_root) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let good = storage.good_remote_config();
        let current = compose(
            &config.agent.config_files,
            good.as_ref().and_then(|g| g.config.as_ref()),
            &config_root.join("0"),
        )?;
        let effective = Arc::new(Mutex::new(current.effective_config()));

        let (commands, rx) = mpsc::unbounded_channel();
        let hooks = Arc::new(Hooks {
            commands: commands.clone(),
            effective: effective.clone(),
        });
        let mut settings = client_settings(&config, uid)?;
        let mut last_status = storage.remote_config_status();
        if !config.capabilities.accepts_remote_config {
            last_status = None;
        }
        // The first report carries the stored status, not UNSET (RC-3, RC-6).
        if config.capabilities.reports_remote_config {
            if let Some(status) = &last_status {
                settings = settings.with_remote_config_status(status.clone());
            }
        }
        let client = OpampClient::start(settings, hooks)?;
        // An apply the supervisor did not finish (it was stopped or killed): do it again.
        if let (Some(status), Some(last)) = (&last_status, storage.last_remote_config()) {
            if status.status == RemoteConfigStatuses::Applying as i32
                && status.last_remote_config_hash == last.config_hash
            {
                let _ = commands.send(Command::Apply(last));
            }
        }

        let (status_tx, status) = watch::channel(AgentStatus {
            remote_config_status: last_status.clone(),
            config_files: current.files.clone(),
            ..AgentStatus::default()
        });
        let log_file = (config.agent.log_max_bytes > 0).then(|| {
            Arc::new(LogFile::new(
                storage.dir().join("agent.log"),
                config.agent.log_max_bytes,
                config.agent.log_files_kept,
            ))
        });
        let health_endpoint = match &config.agent.health_check.endpoint {
            Some(url) => Some(
                HealthEndpoint::parse(url)
                    .map_err(|e| ConfigError::invalid("agent::health_check::endpoint", e))?,
            ),
            None => None,
        };
        let runner = Runner {
            log_file,
            health_endpoint,
            probe: None,
            next_probe: None,
            backoff: Backoff::new(config.agent.restart_policy.clone()),
            config,
            storage,
            client,
            effective,
            current,
            next_generation: 1,
            process: None,
            restart_at: None,
            stable_at: None,
            last_status,
            status: status_tx,
        };
        let task = tokio::spawn(runner.run(rx));
        Ok(Self {
            commands,
            task,
            uid,
            status,
        })
    }

    /// The agent's instance uid.
    pub fn instance_uid(&self) -> InstanceUid {
        self.uid
    }

    /// What the agent is doing now.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every change of [`status`](Self::status).
    pub fn subscribe(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Restarts the agent now, as the Restart command does.
    pub fn restart_agent(&self) {
        let _ = self.commands.send(Command::Restart);
    }

    /// Stops the agent gracefully and disconnects from the server. A config being applied
    /// is finished first (at most `agent::config_apply_timeout` plus the stop timeouts).
    /// Cancel-safe: dropping the future leaves the stop under way.
    pub async fn stop(self) -> Result<(), StopError> {
        let _ = self.commands.send(Command::Stop);
        self.task.await.map_err(|e| StopError::Task(e.to_string()))
    }
}

/// The client's callbacks: they hand everything to the supervisor's task.
struct Hooks {
    commands: mpsc::UnboundedSender<Command>,
    effective: Arc<Mutex<EffectiveConfig>>,
}

#[async_trait::async_trait]
impl Callbacks for Hooks {
    async fn on_connect(&self) {
        tracing::info!("connected to the OpAMP server");
    }

    async fn on_connect_failed(&self, error: &ConnectError) {
        tracing::warn!("OpAMP connection failed: {error}");
    }

    async fn on_message(&self, data: MessageData) {
        if let Some(uid) = data.new_instance_uid {
            let _ = self.commands.send(Command::NewUid(uid));
        }
        if let Some(config) = data.remote_config {
            let _ = self.commands.send(Command::Apply(config));
        }
    }

    async fn on_command(&self, command: &ServerToAgentCommand) {
        if command.r#type == CommandType::Restart as i32 {
            let _ = self.commands.send(Command::Restart);
        } else {
            tracing::warn!("ignoring an unknown command type {}", command.r#type);
        }
    }

    async fn get_effective_config(&self) -> Option<EffectiveConfig> {
        Some(match self.effective.lock() {
            Ok(e) => e.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

fn client_settings(
    config: &SupervisorConfig,
    uid: InstanceUid,
) -> Result<StartSettings, StartError> {
    let server = &config.server;
    let mut settings = StartSettings::new(server.endpoint.trim())
        .with_instance_uid(uid)
        .with_capabilities(config.capabilities.declared())
        .with_agent_description(description(config, uid));
    for (name, values) in &server.headers {
        let header = http::HeaderName::try_from(name.as_str())
            .map_err(|e| ConfigError::invalid("server::headers", format!("{name:?}: {e}")))?;
        for value in values.values() {
            let value = http::HeaderValue::try_from(value.as_str())
                .map_err(|e| ConfigError::invalid("server::headers", format!("{name:?}: {e}")))?;
            settings = settings.with_header(header.clone(), value);
        }
    }
    #[cfg(feature = "tls")]
    {
        settings = with_tls(settings, &server.tls)?;
    }
    #[cfg(not(feature = "tls"))]
    {
        let tls = &server.tls;
        let endpoint = server.endpoint.trim().to_ascii_lowercase();
        let set = tls.insecure_skip_verify
            || tls.ca_file.is_some()
            || tls.ca_pem.is_some()
            || tls.cert_file.is_some()
            || tls.cert_pem.is_some();
        if set || endpoint.starts_with("wss:") || endpoint.starts_with("https:") {
            return Err(ConfigError::invalid(
                "server::tls",
                "this supervisor was built without the `tls` feature",
            )
            .into());
        }
    }
    Ok(settings)
}

#[cfg(feature = "tls")]
fn with_tls(
    mut settings: StartSettings,
    tls: &crate::config::TlsConfig,
) -> Result<StartSettings, StartError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| StartError::TlsFile {
            path: path.clone(),
            source: e,
        })
    };
    let ca = match (&tls.ca_file, &tls.ca_pem) {
        (Some(file), _) => Some(read(file)?),
        (None, Some(pem)) => Some(pem.clone().into_bytes()),
        (None, None) => None,
    };
    if let Some(ca) = ca {
        settings = settings.with_tls_ca_pem(ca);
    }
    let cert = match (&tls.cert_file, &tls.key_file, &tls.cert_pem, &tls.key_pem) {
        (Some(cert), Some(key), _, _) => Some((read(cert)?, read(key)?)),
        (_, _, Some(cert), Some(key)) => {
            Some((cert.clone().into_bytes(), key.clone().into_bytes()))
        }
        _ => None,
    };
    if let Some((cert, key)) = cert {
        settings = settings.with_tls_client_cert_pem(cert, key);
    }
    if tls.insecure_skip_verify {
        settings = settings.dangerous_skip_tls_verify();
    }
    Ok(settings)
}

fn description(config: &SupervisorConfig, uid: InstanceUid) -> AgentDescription {
    let name = config
        .agent
        .executable
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "agent".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let merge = |base: Vec<(String, String)>,
                 extra: &std::collections::BTreeMap<String, String>| {
        let mut out: Vec<(String, String)> = base
            .into_iter()
            .filter(|(k, _)| !extra.contains_key(k))
            .collect();
        out.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect()
    };
    let d = &config.agent.description;
    AgentDescription {
        identifying_attributes: merge(
            vec![
                ("service.name".into(), name),
                ("service.instance.id".into(), uid.to_string()),
            ],
            &d.identifying_attributes,
        ),
        non_identifying_attributes: merge(
            vec![
                ("host.name".into(), host),
                ("os.type".into(), std::env::consts::OS.into()),
            ],
            &d.non_identifying_attributes,
        ),
    }
}

/// Exponential backoff between restarts after the agent exits on its own.
#[derive(Debug)]
struct Backoff {
    policy: RestartPolicy,
    next: Duration,
}

impl Backoff {
    fn new(policy: RestartPolicy) -> Self {
        Self {
            next: policy.initial_interval,
            policy,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        // Not `mul_f64`: it panics on overflow, and both numbers come from a config file.
        let grown = Duration::try_from_secs_f64(self.next.as_secs_f64() * self.policy.multiplier)
            .unwrap_or(self.policy.max_interval);
        self.next = grown.min(self.policy.max_interval);
        delay
    }

    fn reset(&mut self) {
        self.next = self.policy.initial_interval;
    }
}

struct Runner {
    config: SupervisorConfig,
    storage: Storage,
    client: OpampClient,
    effective: Arc<Mutex<EffectiveConfig>>,
    /// The config the agent runs (the last good one).
    current: ComposedConfig,
    next_generation: u64,
    process: Option<AgentProcess>,
    backoff: Backoff,
    /// When to start the agent again after it exited on its own.
    restart_at: Option<Instant>,
    /// When the running agent counts as stable and the backoff starts over.
    stable_at: Option<Instant>,
    last_status: Option<RemoteConfigStatus>,
    status: watch::Sender<AgentStatus>,
    log_file: Option<Arc<LogFile>>,
    health_endpoint: Option<HealthEndpoint>,
    /// The last probe of the running agent's health endpoint.
    probe: Option<Probe>,
    next_probe: Option<Instant>,
}

async fn exited(process: &mut Option<AgentProcess>) -> Exit {
    match process {
        Some(p) => p.wait().await,
        None => std::future::pending().await,
    }
}

/// `now + d`, or a year from now if that overflows (durations come from a config file).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(Duration::from_secs(365 * 86400)))
        .unwrap_or(now)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Runner {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        if let Some((pid, executable)) = self.storage.agent_pid() {
            crate::process::stop_leftover(pid, &executable, self.config.agent.stop_timeout).await;
            self.storage.clear_agent_pid();
        }
        self.start_agent(&self.current.clone());
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None | Some(Command::Stop) => break,
                    Some(Command::Apply(config)) => self.apply(config).await,
                    Some(Command::Restart) => self.restart().await,
                    Some(Command::NewUid(uid)) => {
                        tracing::info!("the server assigned the instance uid {uid}");
                        if let Err(e) = self.storage.save_instance_uid(uid) {
                            tracing::error!("cannot persist the new instance uid: {e}");
                        }
                    }
                },
                exit = exited(&mut self.process) => self.on_exit(exit),
                () = sleep_until(self.restart_at) => {
                    self.restart_at = None;
                    self.start_agent(&self.current.clone());
                }
                () = sleep_until(self.stable_at) => {
                    self.stable_at = None;
                    self.backoff.reset();
                }
                () = sleep_until(self.next_probe) => self.probe_health().await,
            }
        }
        if let Some(process) = self.process.take() {
            let exit = process.stop(self.config.agent.stop_timeout).await;
            self.status.send_modify(|s| s.last_exit = Some(exit));
        }
        self.storage.clear_agent_pid();
        self.status.send_modify(|s| s.pid = None);
        if let Err(e) = self.client.stop().await {
            tracing::warn!("stopping the OpAMP client: {e}");
        }
    }

    fn launch_spec(&self, composed: &ComposedConfig) -> LaunchSpec {
        let agent = &self.config.agent;
        let mut args: Vec<std::ffi::OsString> = agent.args.iter().map(Into::into).collect();
        args.extend(composed.args());
        LaunchSpec {
            executable: agent.executable.clone(),
            args,
            env: agent
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stderr_lines: agent.stderr_lines,
            passthrough_logs: agent.passthrough_logs,
            log_file: self.log_file.clone(),
        }
    }

    fn spawn(&mut self, composed: &ComposedConfig) -> std::io::Result<()> {
        let process = AgentProcess::spawn(&self.launch_spec(composed))?;
        let pid = process.pid();
        if let Some(pid) = pid {
            if let Err(e) = self
                .storage
                .save_agent_pid(pid, &self.config.agent.executable)
            {
                tracing::warn!("cannot record the agent's pid: {e}");
            }
        }
        self.stable_at = Some(later(self.config.agent.restart_policy.reset_after));
        self.restart_at = None;
        self.probe = None;
        self.next_probe = self
            .health_endpoint
            .as_ref()
            // The first probe soon: until then the agent does not count as healthy.
            .map(|_| {
                Instant::now()
                    + self
                        .config
                        .agent
                        .health_check
                        .interval
                        .min(Duration::from_secs(1))
            });
        self.process = Some(process);
        self.status.send_modify(|s| {
            s.pid = pid;
            s.starts += 1;
        });
        Ok(())
    }

    /// Starts the agent with `composed`; if it cannot start, tries again after the backoff.
    fn start_agent(&mut self, composed: &ComposedConfig) {
        match self.spawn(composed) {
            Ok(()) => self.report_running(),
            Err(e) => {
                let delay = self.backoff.next_delay();
                tracing::error!(
                    "cannot start {}: {e}; trying again in {delay:?}",
                    self.config.agent.executable.display()
                );
                self.restart_at = Some(later(delay));
                self.report_health(ComponentHealth {
                    healthy: false,
                    status: format!("cannot start the agent; retrying in {delay:.1?}"),
                    last_error: format!("{}: {e}", self.config.agent.executable.display()),
                    status_time_unix_nano: unix_nanos(SystemTime::now()),
                    ..Default::default()
                });
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        self.process = None;
        self.probe = None;
        self.next_probe = None;
        self.storage.clear_agent_pid();
        self.stable_at = None;
        let delay = self.backoff.next_delay();
        tracing::warn!(
            "the agent {}; restarting it in {delay:.1?}",
            exit.describe()
        );
        self.restart_at = Some(later(delay));
        self.report_health(ComponentHealth {
            healthy: false,
            status: format!("agent {}; restarting in {delay:.1?}", exit.describe()),
            last_error: tail_text(&exit.stderr),
            status_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes: self.health_attributes(Some(&exit)),
            ..Default::default()
        });
        self.status.send_modify(|s| {
            s.pid = None;
            s.crash_restarts += 1;
            s.last_exit = Some(exit);
        });
    }

    async fn restart(&mut self) {
        tracing::info!("restarting the agent (Restart command)");
        if let Some(process) = self.process.take() {
            let exit = process.stop(self.config.agent.stop_timeout).await;
            self.status.send_modify(|s| s.last_exit = Some(exit));
        }
        self.start_agent(&self.current.clone());
    }

    async fn apply(&mut self, remote: AgentRemoteConfig) {
        let hash = remote.config_hash.clone();
        if let Some(last) = &self.last_status {
            let done = last.status == RemoteConfigStatuses::Applied as i32
                || last.status == RemoteConfigStatuses::Failed as i32;
            if done && last.last_remote_config_hash == hash {
                tracing::debug!("remote config already handled");
                return;
            }
        }
        if let Err(e) = self.storage.save_last_remote_config(&remote) {
            tracing::error!("cannot persist the remote config: {e}");
        }
        self.set_status(&hash, RemoteConfigStatuses::Applying, String::new());

        let dir = self
            .storage
            .agent_config_dir()
            .join(self.next_generation.to_string());
        self.next_generation += 1;
        let candidate = match compose(
            &self.config.agent.config_files,
            remote.config.as_ref(),
            &dir,
        ) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.set_status(&hash, RemoteConfigStatuses::Failed, e.to_string());
                return;
            }
        };

        if let Some(process) = self.process.take() {
            let exit = process.stop(self.config.agent.stop_timeout).await;
            self.status.send_modify(|s| s.last_exit = Some(exit));
        }
        self.restart_at = None;
        let failure = match self.spawn(&candidate) {
            Err(e) => Some(format!(
                "cannot start {} with the new config: {e}",
                self.config.agent.executable.display()
            )),
            Ok(()) => {
                self.report_running();
                let grace = self.config.agent.config_apply_timeout;
                let failure = tokio::select! {
                    exit = exited(&mut self.process) => {
                        let message = format!(
                            "the agent {} {:.1?} after starting with the new config \
                             (it must stay up for {grace:?}); its last output:\n{}",
                            exit.describe(),
                            exit.uptime,
                            tail_text(&exit.stderr),
                        );
                        self.process = None;
                        self.status.send_modify(|s| {
                            s.pid = None;
                            s.last_exit = Some(exit);
                        });
                        Some(message)
                    }
                    () = tokio::time::sleep(grace) => None,
                };
                match (&failure, &self.health_endpoint) {
                    (None, Some(endpoint)) => {
                        let probe = endpoint.probe(self.config.agent.health_check.timeout).await;
                        let unhealthy = (!probe.healthy).then(|| {
                            format!(
                                "the agent runs but its health check is failing {grace:?} after \
                                 starting with the new config: {}",
                                probe.status
                            )
                        });
                        self.probe = Some(probe);
                        unhealthy
                    }
                    _ => failure,
                }
            }
        };

        match failure {
            None => {
                tracing::info!("remote config applied");
                let old = std::mem::replace(&mut self.current, candidate);
                if let Some(old_dir) = old.dir {
                    let _ = std::fs::remove_dir_all(old_dir);
                }
                if let Err(e) = self.storage.save_good_remote_config(Some(&remote)) {
                    tracing::error!("cannot persist the applied config: {e}");
                }
                self.backoff.reset();
                self.report_running();
                self.publish_effective();
                self.set_status(&hash, RemoteConfigStatuses::Applied, String::new());
            }
            Some(message) => {
                tracing::warn!("remote config failed; rolling back: {message}");
                if let Some(process) = self.process.take() {
                    process.stop(self.config.agent.stop_timeout).await;
                }
                if let Some(dir) = &candidate.dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
                self.set_status(&hash, RemoteConfigStatuses::Failed, truncate(message));
                self.start_agent(&self.current.clone());
            }
        }
        self.status
            .send_modify(|s| s.config_files = self.current.files.clone());
    }

    fn set_status(&mut self, hash: &Bytes, status: RemoteConfigStatuses, message: String) {
        let status = RemoteConfigStatus {
            last_remote_config_hash: hash.clone(),
            status: status as i32,
            error_message: message,
        };
        if let Err(e) = self.storage.save_remote_config_status(&status) {
            tracing::error!("cannot persist the remote config status: {e}");
        }
        if self.config.capabilities.reports_remote_config {
            if let Err(e) = self.client.set_remote_config_status(status.clone()) {
                tracing::debug!("remote config status not reported: {e}");
            }
        }
        self.last_status = Some(status.clone());
        self.status
            .send_modify(|s| s.remote_config_status = Some(status));
    }

    fn publish_effective(&self) {
        match self.effective.lock() {
            Ok(mut e) => *e = self.current.effective_config(),
            Err(poisoned) => *poisoned.into_inner() = self.current.effective_config(),
        }
        if self.config.capabilities.reports_effective_config {
            if let Err(e) = self.client.update_effective_config() {
                tracing::debug!("effective config not reported: {e}");
            }
        }
    }

    fn health_attributes(&self, exit: Option<&Exit>) -> Vec<KeyValue> {
        let status = self.status.borrow();
        let mut attributes = vec![
            KeyValue::new(
                "agent.starts",
                i64::try_from(status.starts).unwrap_or(i64::MAX),
            ),
            KeyValue::new(
                "agent.restarts",
                i64::try_from(status.crash_restarts + u64::from(exit.is_some()))
                    .unwrap_or(i64::MAX),
            ),
        ];
        if let Some(code) = exit.and_then(|e| e.code) {
            attributes.push(KeyValue::new("agent.exit_code", i64::from(code)));
        }
        attributes
    }

    fn report_running(&self) {
        let Some(process) = &self.process else {
            return;
        };
        let status = self.status.borrow().clone();
        let pid = process
            .pid()
            .map_or_else(String::new, |p| format!(" (pid {p})"));
        let mut attributes = self.health_attributes(None);
        if let Some(exit) = &status.last_exit {
            if let Some(code) = exit.code {
                attributes.push(KeyValue::new("agent.last_exit_code", i64::from(code)));
            }
        }
        let now = unix_nanos(SystemTime::now());
        let mut health = ComponentHealth {
            healthy: true,
            start_time_unix_nano: unix_nanos(process.started_at()),
            status: format!("running{pid}, restarts: {}", status.crash_restarts),
            status_time_unix_nano: now,
            attributes,
            ..Default::default()
        };
        if let Some(endpoint) = &self.health_endpoint {
            // Not known until the first probe: not healthy yet (HLT-1).
            let (healthy, text) = match &self.probe {
                Some(p) => (p.healthy, p.status.clone()),
                None => (false, "not checked yet".to_owned()),
            };
            health.healthy = healthy;
            if !healthy {
                health.last_error = format!("health check {}: {text}", endpoint.url());
            }
            health.component_health_map.insert(
                "health_check".into(),
                ComponentHealth {
                    healthy,
                    status: text,
                    status_time_unix_nano: now,
                    ..Default::default()
                },
            );
        }
        self.report_health(health);
    }

    async fn probe_health(&mut self) {
        let (Some(endpoint), Some(_)) = (&self.health_endpoint, &self.process) else {
            self.next_probe = None;
            return;
        };
        let check = &self.config.agent.health_check;
        let probe = endpoint.probe(check.timeout).await;
        self.next_probe = Some(later(check.interval));
        if self.probe.as_ref() != Some(&probe) {
            if !probe.healthy {
                tracing::warn!("the agent's health check fails: {}", probe.status);
            }
            self.probe = Some(probe);
            self.report_running();
        }
    }

    fn report_health(&self, health: ComponentHealth) {
        if !self.config.capabilities.reports_health {
            return;
        }
        if let Err(e) = self.client.set_health(health) {
            tracing::debug!("health not reported: {e}");
        }
    }
}

fn tail_text(lines: &[String]) -> String {
    truncate(lines.join("\n"))
}

/// Keeps the end of `text` (the last lines matter most) within [`MAX_ERROR_TEXT`] bytes.
fn truncate(text: String) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text;
    }
    let mut start = text.len() - MAX_ERROR_TEXT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_starts_over() {
        let mut b = Backoff::new(RestartPolicy {
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(500),
            multiplier: 2.0,
            reset_after: Duration::from_secs(1),
        });
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        // Huge numbers from a config file cap instead of panicking.
        let mut b = Backoff::new(RestartPolicy {
            initial_interval: Duration::from_secs(u64::MAX / 2),
            max_interval: Duration::MAX,
            multiplier: 1e300,
            reset_after: Duration::from_secs(1),
        });
        b.next_delay();
        assert_eq!(b.next_delay(), Duration::MAX);
    }

    #[test]
    fn error_text_keeps_the_end() {
        let long = format!("{}END", "é".repeat(MAX_ERROR_TEXT));
        let t = truncate(long);
        assert!(t.len() <= MAX_ERROR_TEXT + '…'.len_utf8());
        assert!(t.ends_with("END"));
        assert_eq!(truncate("short".into()), "short");
    }
}
