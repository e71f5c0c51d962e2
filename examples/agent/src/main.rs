//! The reference OpAMP agent.
//!
//! ```sh
//! cargo run --release -p opamp-reference-agent -- --endpoint ws://127.0.0.1:4320/v1/opamp
//! ```
//!
//! Each agent reports its description (`service.name`, `service.version`, `host.name`,
//! `os.type`), its health and its effective config, read from a file. A remote config is
//! applied by writing it to that file and reporting APPLIED, or FAILED with the reason; the
//! Restart command restarts the agent. Its instance uid and last remote config status persist
//! in a state directory, so a restarted process is the same agent, not a new one.
//!
//! With `--accept-packages KEY` it also installs the packages the server offers, signed with
//! that Ed25519 key, under `<state-dir>/agent-N/packages`.
//!
//! With `--accept-connection-settings` it accepts OpAMP connection settings the server offers
//! (a new endpoint, headers, TLS): the client tries them and keeps them only if the server
//! there answers (else it rolls back and reports FAILED); accepted settings are persisted in
//! the state dir and used at the next start, over `--endpoint` and `--header`.
//!
//! With `--csr` (implies `--accept-connection-settings`) it asks the server for a client
//! certificate (CSR flow, CSR-2): a key pair made here, the CSR sent to a server that
//! advertises AcceptsConnectionSettingsRequest, the issued certificate tried and persisted
//! like any offered settings. It asks at a start without a persisted certificate.
//!
//! Run `agent --help` for the flags (count of agents in one process, heartbeat, headers, TLS).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use opamp::async_trait;
use opamp::client::packages::{DownloadSettings, Ed25519Verifier, FsProvider};
use opamp::client::{Callbacks, MessageData, OpampClient, StartSettings};
use opamp::proto::{
    AgentCapabilitySet, AgentConfigMap, AgentDescription, AgentRemoteConfig, ComponentHealth,
    ConnectionSettingsStatus, ConnectionSettingsStatuses, EffectiveConfig, InstanceUid, KeyValue,
    Message, OpAmpConnectionSettings, RemoteConfigStatus, RemoteConfigStatuses,
    ServerToAgentCommand,
};
use tokio::sync::mpsc;

const USAGE: &str = "usage: opamp-reference-agent --endpoint URL [--count N] [--name NAME]
             [--state-dir DIR] [--heartbeat SECONDS] [--header NAME=VALUE]... [--tls-ca PEM]
             [--tls-cert PEM --tls-key PEM] [--dangerous-skip-tls-verify]
             [--accept-packages PUBKEY_HEX_OR_FILE] [--attribute KEY=VALUE]...
             [--watch-config] [--accept-connection-settings] [--csr]
  URL is ws://, wss://, http:// or https://, e.g. ws://127.0.0.1:4320/v1/opamp";

/// The initial effective config of an agent that has not received a remote one.
const LOCAL_CONFIG: &str = "# local configuration of the reference agent\nlog_level: info\n";

#[derive(Debug, Clone)]
struct Args {
    endpoint: String,
    count: usize,
    name: String,
    state_dir: PathBuf,
    heartbeat: Option<Duration>,
    headers: Vec<(HeaderName, HeaderValue)>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    dangerous_skip_tls_verify: bool,
    /// The Ed25519 public key package signatures must verify with (`--accept-packages`).
    package_key: Option<[u8; 32]>,
    /// Extra non-identifying attributes (`--attribute KEY=VALUE`).
    attributes: Vec<(String, String)>,
    /// Report the config file again when it changes on disk (`--watch-config`).
    watch_config: bool,
    /// Accept offered OpAMP connection settings and persist them (`--accept-connection-settings`).
    accept_connection_settings: bool,
    /// Ask the server for a client certificate (`--csr`).
    csr: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: String::new(),
        count: 1,
        name: "opamp-reference-agent".into(),
        state_dir: PathBuf::from("agent-state"),
        heartbeat: None,
        headers: Vec::new(),
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        dangerous_skip_tls_verify: false,
        package_key: None,
        attributes: Vec::new(),
        watch_config: false,
        accept_connection_settings: false,
        csr: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--endpoint" => args.endpoint = value()?,
            "--count" => args.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--name" => args.name = value()?,
            "--state-dir" => args.state_dir = value()?.into(),
            "--heartbeat" => {
                let secs: f64 = value()?.parse().map_err(|e| format!("--heartbeat: {e}"))?;
                args.heartbeat = Some(
                    Duration::try_from_secs_f64(secs).map_err(|e| format!("--heartbeat: {e}"))?,
                );
            }
            "--header" => {
                let v = value()?;
                let (name, val) = v.split_once('=').ok_or("--header takes NAME=VALUE")?;
                args.headers.push((
                    name.parse().map_err(|e| format!("--header {name}: {e}"))?,
                    val.parse().map_err(|e| format!("--header {name}: {e}"))?,
                ));
            }
            "--tls-ca" => args.tls_ca = Some(value()?.into()),
            "--tls-cert" => args.tls_cert = Some(value()?.into()),
            "--tls-key" => args.tls_key = Some(value()?.into()),
            "--dangerous-skip-tls-verify" => args.dangerous_skip_tls_verify = true,
            "--accept-packages" => args.package_key = Some(package_key(&value()?)?),
            "--attribute" => {
                let v = value()?;
                let (k, val) = v
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("--attribute {v}: expected KEY=VALUE"))?;
                args.attributes.push((k.to_owned(), val.to_owned()));
            }
            "--watch-config" => args.watch_config = true,
            "--accept-connection-settings" => args.accept_connection_settings = true,
            "--csr" => {
                args.csr = true;
                args.accept_connection_settings = true;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if args.endpoint.is_empty() {
        return Err(format!("--endpoint is required\n{USAGE}"));
    }
    if args.count == 0 {
        return Err("--count must be at least 1".into());
    }
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    Ok(args)
}

/// `--accept-packages`: 64 hex digits, or a file holding them.
fn package_key(arg: &str) -> Result<[u8; 32], String> {
    let text = match parse_hex32(arg.trim()) {
        Some(key) => return Ok(key),
        None => std::fs::read_to_string(arg).map_err(|e| {
            format!("--accept-packages: {arg:?} is neither 64 hex digits nor a readable file: {e}")
        })?,
    };
    parse_hex32(text.trim()).ok_or_else(|| {
        format!("--accept-packages: {arg} does not hold a 32-byte Ed25519 public key in hex")
    })
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One agent's files: its uid, its last remote config status and its effective config.
#[derive(Debug, Clone)]
struct AgentFiles {
    dir: PathBuf,
}

impl AgentFiles {
    fn uid_path(&self) -> PathBuf {
        self.dir.join("instance_uid")
    }
    fn status_path(&self) -> PathBuf {
        self.dir.join("remote_config_status.pb")
    }
    fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }
    /// The OpAMP connection settings last applied (CS-OP-5), encoded.
    fn connection_settings_path(&self) -> PathBuf {
        self.dir.join("opamp_connection_settings.pb")
    }
    /// The connection settings status last reported for an offer (APPLIED or FAILED).
    fn connection_settings_status_path(&self) -> PathBuf {
        self.dir.join("connection_settings_status.pb")
    }
    /// Where the packages the server offers are kept (`FsProvider`'s root).
    fn packages_dir(&self) -> PathBuf {
        self.dir.join("packages")
    }

    /// The persisted uid, or a new UUID v7 that is persisted at once (UID-1, UID-3).
    fn instance_uid(&self) -> std::io::Result<InstanceUid> {
        std::fs::create_dir_all(&self.dir)?;
        if let Ok(text) = std::fs::read_to_string(self.uid_path()) {
            if let Ok(uid) = text.trim().parse() {
                return Ok(uid);
            }
        }
        let uid = InstanceUid::new_v7();
        self.save_uid(uid)?;
        Ok(uid)
    }

    fn save_uid(&self, uid: InstanceUid) -> std::io::Result<()> {
        write_atomic(&self.uid_path(), uid.to_string().as_bytes())
    }

    fn status(&self) -> Option<RemoteConfigStatus> {
        let bytes = std::fs::read(self.status_path()).ok()?;
        RemoteConfigStatus::decode(&bytes[..]).ok()
    }

    fn save_status(&self, status: &RemoteConfigStatus) -> std::io::Result<()> {
        write_atomic(&self.status_path(), &status.encode_to_vec())
    }

    fn connection_settings(&self) -> Option<OpAmpConnectionSettings> {
        let bytes = std::fs::read(self.connection_settings_path()).ok()?;
        OpAmpConnectionSettings::decode(&bytes[..]).ok()
    }

    fn connection_settings_status(&self) -> Option<ConnectionSettingsStatus> {
        let bytes = std::fs::read(self.connection_settings_status_path()).ok()?;
        ConnectionSettingsStatus::decode(&bytes[..]).ok()
    }

    fn save_connection_settings_status(
        &self,
        hash: &[u8],
        status: ConnectionSettingsStatuses,
        error_message: &str,
    ) -> std::io::Result<()> {
        let status = ConnectionSettingsStatus {
            last_connection_settings_hash: hash.to_vec().into(),
            status: status as i32,
            error_message: error_message.to_owned(),
        };
        write_atomic(
            &self.connection_settings_status_path(),
            &status.encode_to_vec(),
        )
    }

    fn effective_config(&self) -> EffectiveConfig {
        let body = std::fs::read(self.config_path()).unwrap_or_else(|_| LOCAL_CONFIG.into());
        EffectiveConfig {
            config_map: Some(AgentConfigMap::single(body, "text/yaml")),
        }
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(tmp, path)
}

/// [`write_atomic`] for a file holding a private key: readable by the owner only (Unix).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Checks a remote config and writes it as the agent's config file. The reference agent
/// accepts any non-empty UTF-8 text, except text containing `INVALID`: that word is the
/// reference's way to show a FAILED status with its message.
fn apply(files: &AgentFiles, config: &AgentRemoteConfig) -> Result<(), String> {
    let map = config
        .config
        .as_ref()
        .ok_or("the remote config has no config map")?;
    let object = match map.config_map.get("") {
        Some(object) => object,
        None if map.config_map.len() == 1 => map.config_map.values().next().ok_or("empty")?,
        None => {
            return Err(format!(
                "expected one config object, got {}",
                map.config_map.len()
            ));
        }
    };
    let text = std::str::from_utf8(&object.body).map_err(|_| "the config is not UTF-8 text")?;
    if text.trim().is_empty() {
        return Err("the config is empty".into());
    }
    if text.contains("INVALID") {
        return Err("rejected: config contains INVALID".into());
    }
    write_atomic(&files.config_path(), text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", files.config_path().display()))
}

enum Event {
    Restart,
}

/// Restart commands are carried out at most this often (CMD-1): more are ignored.
const RESTART_MIN_INTERVAL: Duration = Duration::from_secs(10);

struct Agent {
    index: usize,
    files: AgentFiles,
    client: OnceLock<OpampClient>,
    events: mpsc::UnboundedSender<Event>,
}

impl Agent {
    fn client(&self) -> Option<&OpampClient> {
        self.client.get()
    }

    fn set_status(&self, status: RemoteConfigStatus) {
        if let Err(e) = self.files.save_status(&status) {
            eprintln!(
                "agent {}: cannot persist the remote config status: {e}",
                self.index
            );
        }
        if let Some(client) = self.client() {
            if let Err(e) = client.set_remote_config_status(status) {
                eprintln!("agent {}: {e}", self.index);
            }
        }
    }
}

#[async_trait]
impl Callbacks for Agent {
    async fn on_connect(&self) {
        eprintln!("agent {}: connected", self.index);
    }

    async fn on_connect_failed(&self, error: &opamp::client::ConnectError) {
        eprintln!("agent {}: connection failed: {error}", self.index);
    }

    async fn on_message(&self, data: MessageData) {
        if let Some(uid) = data.new_instance_uid {
            eprintln!("agent {}: the server assigned the uid {uid}", self.index);
            if let Err(e) = self.files.save_uid(uid) {
                eprintln!("agent {}: cannot persist the new uid: {e}", self.index);
            }
        }
        let Some(config) = data.remote_config else {
            return;
        };
        let hash = config.config_hash.clone();
        if self.files.status().is_some_and(|s| {
            s.last_remote_config_hash == hash && s.status != RemoteConfigStatuses::Unset as i32
        }) {
            return; // already handled this config (REP-7: no report without a change)
        }
        let status = match apply(&self.files, &config) {
            Ok(()) => {
                eprintln!("agent {}: applied remote config", self.index);
                RemoteConfigStatus {
                    last_remote_config_hash: hash,
                    status: RemoteConfigStatuses::Applied as i32,
                    error_message: String::new(),
                }
            }
            Err(reason) => {
                eprintln!("agent {}: remote config failed: {reason}", self.index);
                RemoteConfigStatus {
                    last_remote_config_hash: hash,
                    status: RemoteConfigStatuses::Failed as i32,
                    error_message: reason,
                }
            }
        };
        let applied = status.status == RemoteConfigStatuses::Applied as i32;
        self.set_status(status);
        if applied {
            if let Some(client) = self.client() {
                let _ = client.update_effective_config();
            }
        }
    }

    async fn on_command(&self, _command: &ServerToAgentCommand) {
        // Restart is the only command (CMD-1); the supervisor loop performs it.
        let _ = self.events.send(Event::Restart);
    }

    async fn get_effective_config(&self) -> Option<EffectiveConfig> {
        Some(self.files.effective_config())
    }

    /// CS-OP-5: the settings are in use; persist them (settings first, then the status: a
    /// crash between the two re-reports nothing wrong, the server's repeat is applied again
    /// and succeeds) so that the next start uses them.
    async fn on_opamp_connection_settings_applied(
        &self,
        settings: &OpAmpConnectionSettings,
        offer_hash: &[u8],
    ) {
        // The settings may hold the client certificate's private key (CSR-7).
        let saved = write_private(
            &self.files.connection_settings_path(),
            &settings.encode_to_vec(),
        )
        .and_then(|()| {
            self.files.save_connection_settings_status(
                offer_hash,
                ConnectionSettingsStatuses::Applied,
                "",
            )
        });
        match saved {
            Ok(()) => eprintln!(
                "agent {}: connection settings applied, now at {}",
                self.index,
                if settings.destination_endpoint.is_empty() {
                    "the same endpoint"
                } else {
                    &settings.destination_endpoint
                }
            ),
            Err(e) => eprintln!(
                "agent {}: connection settings applied but not persisted: {e}",
                self.index
            ),
        }
    }

    /// CS-OP-6: rolled back. The FAILED status is persisted so that a restarted agent does
    /// not try the same offer again (CS-2); the settings in use stay as they were.
    async fn on_opamp_connection_settings_failed(&self, offer_hash: &[u8], reason: &str) {
        eprintln!(
            "agent {}: offered connection settings failed, rolled back: {reason}",
            self.index
        );
        if let Err(e) = self.files.save_connection_settings_status(
            offer_hash,
            ConnectionSettingsStatuses::Failed,
            reason,
        ) {
            eprintln!(
                "agent {}: cannot persist the connection settings status: {e}",
                self.index
            );
        }
    }
}

fn settings(
    args: &Args,
    index: usize,
    uid: InstanceUid,
    files: &AgentFiles,
) -> Result<StartSettings, String> {
    let name = if args.count == 1 {
        args.name.clone()
    } else {
        format!("{}-{index}", args.name)
    };
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let description = AgentDescription {
        identifying_attributes: vec![
            KeyValue::new("service.name", &name),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", uid.to_string()),
        ],
        non_identifying_attributes: [
            KeyValue::new("host.name", &host),
            KeyValue::new("os.type", std::env::consts::OS),
        ]
        .into_iter()
        .chain(args.attributes.iter().map(|(k, v)| KeyValue::new(k, v)))
        .collect(),
    };
    let capabilities = AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_EFFECTIVE_CONFIG
        | AgentCapabilitySet::REPORTS_HEALTH
        | AgentCapabilitySet::REPORTS_HEARTBEAT
        | AgentCapabilitySet::ACCEPTS_RESTART_COMMAND;
    let capabilities = if args.accept_connection_settings {
        capabilities
            | AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS
            | AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS
    } else {
        capabilities
    };
    let mut s = StartSettings::new(args.endpoint.clone())
        .with_instance_uid(uid)
        .with_capabilities(capabilities)
        .with_agent_description(description);
    // RC-3: the status reported before a restart is in the first message, not UNSET.
    if let Some(status) = files.status() {
        s = s.with_remote_config_status(status);
    }
    if let Some(interval) = args.heartbeat {
        s = s.with_heartbeat_interval(interval);
    }
    for (name, value) in &args.headers {
        s = s.with_header(name.clone(), value.clone());
    }
    if let Some(ca) = &args.tls_ca {
        s = s.with_tls_ca_pem(std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        s = s.with_tls_client_cert_pem(read(cert)?, read(key)?);
    }
    if args.dangerous_skip_tls_verify {
        s = s.dangerous_skip_tls_verify();
    }
    if let Some(key) = &args.package_key {
        // PKG-*: offered packages are downloaded, checked (SHA-256, then the Ed25519
        // signature of the digest by the trusted key, PKG-21) and kept in the state dir.
        let dir = files.packages_dir();
        let provider = FsProvider::new(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let verifier =
            Ed25519Verifier::new([&key[..]]).map_err(|e| format!("--accept-packages: {e}"))?;
        s = s.with_packages(
            Arc::new(provider),
            Arc::new(verifier),
            DownloadSettings::default(),
        );
    }
    if args.accept_connection_settings {
        // Settings accepted before a restart win over the flags (the server moved the
        // agent); the status marks their offer as handled (CS-2).
        // Saved settings this build cannot use (they were usable when applied) leave the
        // flags in force, with a warning, rather than an agent that does not start.
        if let Some(saved) = files.connection_settings() {
            match s.with_opamp_connection_settings(&saved) {
                Ok(moved) => s = moved,
                Err(e) => eprintln!(
                    "agent {index}: ignoring {}: {e}",
                    files.connection_settings_path().display()
                ),
            }
        }
        if let Some(status) = files.connection_settings_status() {
            s = s.with_connection_settings_status(status);
        }
    }
    Ok(s)
}

/// Runs one agent until `stop` fires, restarting it on the Restart command.
async fn run_agent(
    args: Arc<Args>,
    index: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let files = AgentFiles {
        dir: args.state_dir.join(format!("agent-{index}")),
    };
    let mut restarted: Option<std::time::Instant> = None;
    loop {
        let uid = files
            .instance_uid()
            .map_err(|e| format!("{}: {e}", files.dir.display()))?;
        let (events, mut event_rx) = mpsc::unbounded_channel();
        let agent = Arc::new(Agent {
            index,
            files: files.clone(),
            client: OnceLock::new(),
            events,
        });
        let client = OpampClient::start(settings(&args, index, uid, &files)?, agent.clone())
            .map_err(|e| format!("agent {index}: {e}"))?;
        let started = SystemTime::now();
        client
            .set_health(ComponentHealth {
                healthy: true,
                start_time_unix_nano: unix_nanos(started),
                status: "running".into(),
                status_time_unix_nano: unix_nanos(started),
                ..Default::default()
            })
            .map_err(|e| format!("agent {index}: {e}"))?;
        let _ = agent.client.set(client);
        // After the handle is set: a config applied by `on_message` before that (the client
        // connects at once) saved its status but could not report it.
        if let (Some(status), Some(client)) = (files.status(), agent.client()) {
            let _ = client.set_remote_config_status(status);
        }
        eprintln!("agent {index}: started as {uid}");
        // CSR-2: a certificate from the server, unless one from an earlier run is in use.
        let has_certificate = files
            .connection_settings()
            .is_some_and(|s| s.certificate.is_some());
        if args.csr && !has_certificate {
            if let Some(client) = agent.client() {
                match client.request_client_certificate() {
                    Ok(()) => eprintln!("agent {index}: requested a client certificate"),
                    Err(e) => eprintln!("agent {index}: cannot request a certificate: {e}"),
                }
            }
        }

        let mut watch = tokio::time::interval(Duration::from_secs(1));
        let mut last_config = std::fs::read(files.config_path()).ok();
        let restart = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break false,
                _ = watch.tick(), if args.watch_config => {
                    // A config changed on disk by someone else: the effective config moved
                    // (the server flags that as drift).
                    let now = std::fs::read(files.config_path()).ok();
                    if now != last_config {
                        last_config = now;
                        if let Some(client) = agent.client() {
                            let _ = client.update_effective_config();
                        }
                    }
                }
                Some(Event::Restart) = event_rx.recv() => {
                    // The new client's own guard starts afresh: a server sending Restart
                    // in every reply must not restart the agent in a loop.
                    let since = restarted.map(|at| at.elapsed());
                    if let Some(since) = since.filter(|s| *s < RESTART_MIN_INTERVAL) {
                        eprintln!(
                            "agent {index}: ignoring Restart: restarted {since:.1?} ago \
                             (at most one per {RESTART_MIN_INTERVAL:?})"
                        );
                        continue;
                    }
                    break true;
                }
            }
        };
        if let Some(client) = agent.client() {
            if let Err(e) = client.stop().await {
                eprintln!("agent {index}: stop: {e}");
            }
        }
        if !restart {
            return Ok(());
        }
        eprintln!("agent {index}: restarting");
        restarted = Some(std::time::Instant::now());
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => Arc::new(args),
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = tokio::task::JoinSet::new();
    for index in 0..args.count {
        agents.spawn(run_agent(args.clone(), index, stop_rx.clone()));
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!("stopping");
        let _ = stop_tx.send(true);
    });
    let mut failed = false;
    while let Some(result) = agents.join_next().await {
        if let Ok(Err(msg)) | Err(msg) = result.map_err(|e| e.to_string()) {
            eprintln!("{msg}");
            failed = true;
        }
    }
    std::process::exit(i32::from(failed));
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
