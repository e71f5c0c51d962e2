//! The supervisor's configuration, with the field names of contrib's `opampsupervisor`.
//!
//! The types derive [`serde::Deserialize`], so a program reads them from YAML (or any serde
//! format) as `opampsupervisor` does:
//!
//! ```yaml
//! server:
//!   endpoint: ws://127.0.0.1:4320/v1/opamp
//!   headers:
//!     Authorization: Bearer secret
//! capabilities:
//!   accepts_remote_config: true
//!   reports_remote_config: true
//!   accepts_restart_command: true
//! agent:
//!   executable: /usr/bin/my-agent
//!   args: [--verbose]
//!   env: { LOG_LEVEL: info }
//!   config_files: [/etc/my-agent/base.yaml, $REMOTE_CONFIG]
//!   config_apply_timeout: 5s
//! storage:
//!   directory: /var/lib/my-agent/supervisor
//! ```
//!
//! Fields of `opampsupervisor` that this supervisor does not act on are accepted (so its
//! configuration files load unchanged) and listed by [`SupervisorConfig::unsupported`]; a
//! program should warn about them. Fields that are ours only are marked as such.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The place of the remote configuration among `agent.config_files` (as in
/// `opampsupervisor`). Without it, the remote configuration files come after the local ones.
pub const REMOTE_CONFIG_PLACEHOLDER: &str = "$REMOTE_CONFIG";

/// `opampsupervisor`'s default storage directory.
pub const DEFAULT_STORAGE_DIRECTORY: &str = "/var/lib/otelcol/supervisor";

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field has a value the supervisor cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `server::endpoint` (written as `opampsupervisor` writes it).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// The OpAMP server to connect to (`server`).
    pub server: ServerConfig,
    /// What the supervisor declares and does (`capabilities`).
    pub capabilities: Capabilities,
    /// The agent process (`agent`).
    pub agent: AgentConfig,
    /// Where the supervisor keeps its state (`storage`).
    pub storage: StorageConfig,
}

impl SupervisorConfig {
    /// A configuration for the server at `endpoint` that runs `executable`, keeping its state
    /// in `storage_directory`; everything else has its default.
    pub fn new(
        endpoint: impl Into<String>,
        executable: impl Into<PathBuf>,
        storage_directory: impl Into<PathBuf>,
    ) -> Self {
        let mut config = Self::default();
        config.server.endpoint = endpoint.into();
        config.agent.executable = executable.into();
        config.storage.directory = storage_directory.into();
        config
    }

    /// Checks what can be checked before starting: the endpoint's scheme, the executable,
    /// durations, the special config file names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let endpoint = self.server.endpoint.trim();
        if endpoint.is_empty() {
            return Err(ConfigError::invalid(
                "server::endpoint",
                "must be specified",
            ));
        }
        let scheme = endpoint
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        if !matches!(scheme.as_str(), "ws" | "wss" | "http" | "https") {
            return Err(ConfigError::invalid(
                "server::endpoint",
                format!("{endpoint:?} must start with ws://, wss://, http:// or https://"),
            ));
        }
        for name in self.server.headers.keys() {
            http::HeaderName::try_from(name.as_str())
                .map_err(|e| ConfigError::invalid("server::headers", format!("{name:?}: {e}")))?;
        }
        let tls = &self.server.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some()
            || tls.cert_pem.is_some() != tls.key_pem.is_some()
        {
            return Err(ConfigError::invalid(
                "server::tls",
                "a client certificate and its key go together",
            ));
        }
        let agent = &self.agent;
        if agent.executable.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "agent::executable",
                "must be specified",
            ));
        }
        if let Err(e) = std::fs::metadata(&agent.executable) {
            return Err(ConfigError::invalid(
                "agent::executable",
                format!("{}: {e}", agent.executable.display()),
            ));
        }
        if agent.config_apply_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "agent::config_apply_timeout",
                "must be positive",
            ));
        }
        if let Some(instance_id) = &agent.instance_id {
            instance_id
                .parse::<opamp_proto::InstanceUid>()
                .map_err(|e| ConfigError::invalid("agent::instance_id", e.to_string()))?;
        }
        for file in &agent.config_files {
            if file.starts_with('$') && file != REMOTE_CONFIG_PLACEHOLDER {
                return Err(ConfigError::invalid(
                    "agent::config_files",
                    format!(
                        "{file:?}: the only special file this supervisor knows is \
                         {REMOTE_CONFIG_PLACEHOLDER}"
                    ),
                ));
            }
        }
        let restart = &agent.restart_policy;
        if restart.initial_interval.is_zero() || restart.max_interval < restart.initial_interval {
            return Err(ConfigError::invalid(
                "agent::restart_policy",
                "initial_interval must be positive and at most max_interval",
            ));
        }
        if !(restart.multiplier >= 1.0 && restart.multiplier.is_finite()) {
            return Err(ConfigError::invalid(
                "agent::restart_policy::multiplier",
                "must be at least 1",
            ));
        }
        let health = &agent.health_check;
        if let Some(endpoint) = &health.endpoint {
            crate::health::HealthEndpoint::parse(endpoint)
                .map_err(|e| ConfigError::invalid("agent::health_check::endpoint", e))?;
            if health.interval.is_zero() || health.timeout.is_zero() {
                return Err(ConfigError::invalid(
                    "agent::health_check",
                    "interval and timeout must be positive",
                ));
            }
        }
        if self.storage.directory.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "storage::directory",
                "must be specified",
            ));
        }
        Ok(())
    }

    /// The fields that are set but that this supervisor does not act on, by their
    /// `opampsupervisor` names: capabilities it does not implement (they are not declared to
    /// the server) and agent options it ignores.
    pub fn unsupported(&self) -> Vec<&'static str> {
        let c = &self.capabilities;
        let a = &self.agent;
        [
            (
                c.accepts_opamp_connection_settings,
                "capabilities::accepts_opamp_connection_settings",
            ),
            (c.reports_own_metrics, "capabilities::reports_own_metrics"),
            (c.reports_own_logs, "capabilities::reports_own_logs"),
            (c.reports_own_traces, "capabilities::reports_own_traces"),
            (
                c.reports_available_components,
                "capabilities::reports_available_components",
            ),
            (c.accepts_packages, "capabilities::accepts_packages"),
            (
                c.reports_package_statuses,
                "capabilities::reports_package_statuses",
            ),
            (a.opamp_server_port.is_some(), "agent::opamp_server_port"),
            (a.use_hup_config_reload, "agent::use_hup_config_reload"),
            (a.validate_config, "agent::validate_config"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect()
    }
}

/// `server`: the OpAMP server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ServerConfig {
    /// `ws://`, `wss://`, `http://` or `https://` URL of the server's OpAMP endpoint.
    pub endpoint: String,
    /// Headers sent on every request and handshake, e.g. `Authorization`.
    pub headers: BTreeMap<String, HeaderValues>,
    /// TLS settings for `wss://` and `https://`.
    pub tls: TlsConfig,
}

/// One header's values: a string or a list of strings (Go's `http.Header` takes both).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    /// One value.
    One(String),
    /// Several values, sent as several headers of that name.
    Many(Vec<String>),
}

impl HeaderValues {
    /// The values.
    pub fn values(&self) -> &[String] {
        match self {
            Self::One(v) => std::slice::from_ref(v),
            Self::Many(v) => v,
        }
    }
}

impl fmt::Debug for HeaderValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values are often credentials.
        write!(f, "<{} value(s)>", self.values().len())
    }
}

/// `server::tls`, as the Collector's `configtls.ClientConfig`.
#[derive(Clone, Default, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TlsConfig {
    /// `insecure`: plain text for gRPC in the Collector; the endpoint's scheme decides here.
    pub insecure: bool,
    /// `insecure_skip_verify`: accept any server certificate. For tests only.
    pub insecure_skip_verify: bool,
    /// `ca_file`: trust only the CA certificates in this PEM file.
    pub ca_file: Option<PathBuf>,
    /// `ca_pem`: the same, inline.
    pub ca_pem: Option<String>,
    /// `cert_file`: client certificate chain (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// `cert_pem`: the same, inline.
    pub cert_pem: Option<String>,
    /// `key_file`: the client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// `key_pem`: the same, inline.
    pub key_pem: Option<String>,
    /// `server_name_override`: accepted, not supported (the endpoint's host is checked).
    pub server_name_override: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("insecure", &self.insecure)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("ca_file", &self.ca_file)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("cert_file", &self.cert_file)
            .field("cert_pem", &self.cert_pem.as_ref().map(|_| "<pem>"))
            .field("key_file", &self.key_file)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .field("server_name_override", &self.server_name_override)
            .finish()
    }
}

/// `capabilities`: the same names and, where this supervisor implements them, the same
/// defaults as `opampsupervisor`. `ReportsStatus` is always declared.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[non_exhaustive]
#[allow(clippy::struct_excessive_bools)]
pub struct Capabilities {
    /// Apply remote configs (default false).
    pub accepts_remote_config: bool,
    /// Report the status of remote configs (default false).
    pub reports_remote_config: bool,
    /// Report the config given to the agent (default true).
    pub reports_effective_config: bool,
    /// Report the agent process's health (default true).
    pub reports_health: bool,
    /// Restart the agent on the server's Restart command (default false).
    pub accepts_restart_command: bool,
    /// Send WebSocket heartbeats (default true).
    pub reports_heartbeat: bool,
    /// Not supported; never declared.
    pub accepts_opamp_connection_settings: bool,
    /// Not supported; never declared. (`opampsupervisor` defaults it to true; here false.)
    pub reports_own_metrics: bool,
    /// Not supported; never declared.
    pub reports_own_logs: bool,
    /// Not supported; never declared.
    pub reports_own_traces: bool,
    /// Not supported; never declared.
    pub reports_available_components: bool,
    /// Not supported; never declared.
    pub accepts_packages: bool,
    /// Not supported; never declared.
    pub reports_package_statuses: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            accepts_remote_config: false,
            reports_remote_config: false,
            reports_effective_config: true,
            reports_health: true,
            accepts_restart_command: false,
            reports_heartbeat: true,
            accepts_opamp_connection_settings: false,
            reports_own_metrics: false,
            reports_own_logs: false,
            reports_own_traces: false,
            reports_available_components: false,
            accepts_packages: false,
            reports_package_statuses: false,
        }
    }
}

impl Capabilities {
    /// The capabilities declared to the server: `ReportsStatus` and the implemented ones that
    /// are set (CAP-1).
    pub fn declared(&self) -> opamp_proto::AgentCapabilitySet {
        use opamp_proto::AgentCapabilitySet as C;
        let mut set = C::REPORTS_STATUS;
        for (on, cap) in [
            (self.accepts_remote_config, C::ACCEPTS_REMOTE_CONFIG),
            (self.reports_remote_config, C::REPORTS_REMOTE_CONFIG),
            (self.reports_effective_config, C::REPORTS_EFFECTIVE_CONFIG),
            (self.reports_health, C::REPORTS_HEALTH),
            (self.accepts_restart_command, C::ACCEPTS_RESTART_COMMAND),
            (self.reports_heartbeat, C::REPORTS_HEARTBEAT),
        ] {
            if on {
                set |= cap;
            }
        }
        set
    }
}

/// `agent`: the process the supervisor runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The agent's executable.
    pub executable: PathBuf,
    /// Arguments given before the `--config` ones.
    pub args: Vec<String>,
    /// Environment variables added to the supervisor's own.
    pub env: BTreeMap<String, String>,
    /// Local config files, each given as `--config FILE`, in this order;
    /// [`REMOTE_CONFIG_PLACEHOLDER`] marks where the remote config's files go (after the
    /// local ones without it).
    pub config_files: Vec<String>,
    /// How long the agent must stay up after a new config before it counts as APPLIED
    /// (default 5 s).
    #[serde(deserialize_with = "go_duration")]
    pub config_apply_timeout: Duration,
    /// Fixed instance uid (a UUID) instead of the one kept in the storage directory.
    pub instance_id: Option<String>,
    /// Attributes added to the agent description reported to the server.
    pub description: DescriptionConfig,
    /// Copy the agent's stdout and stderr into the supervisor's log (default false).
    pub passthrough_logs: bool,
    /// Accepted for compatibility; there is no agent bootstrap here.
    #[serde(deserialize_with = "go_duration")]
    pub bootstrap_timeout: Duration,
    /// Accepted for compatibility; unused.
    #[serde(deserialize_with = "go_duration")]
    pub orphan_detection_interval: Duration,
    /// Not supported (there is no OpAMP endpoint for the agent).
    pub opamp_server_port: Option<u16>,
    /// Not supported (a new config restarts the agent).
    pub use_hup_config_reload: bool,
    /// Not supported.
    pub validate_config: bool,
    /// Ours: how long the agent has after SIGTERM before SIGKILL (default 10 s).
    #[serde(deserialize_with = "go_duration")]
    pub stop_timeout: Duration,
    /// Ours: how the agent is restarted after it exits on its own.
    pub restart_policy: RestartPolicy,
    /// Ours: the agent's own health endpoint, if it has one.
    pub health_check: HealthCheckConfig,
    /// Ours: how many of the agent's last stderr lines go into a FAILED status and the
    /// health's `last_error` (default 20).
    pub stderr_lines: usize,
    /// Ours: the agent's stdout and stderr are kept in `agent.log` in the storage directory,
    /// rotated at this size (default 10 MiB; 0 keeps no log file).
    pub log_max_bytes: u64,
    /// Ours: how many rotated log files are kept, `agent.log.1` the newest (default 3).
    pub log_files_kept: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            executable: PathBuf::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            config_files: Vec::new(),
            config_apply_timeout: Duration::from_secs(5),
            instance_id: None,
            description: DescriptionConfig::default(),
            passthrough_logs: false,
            bootstrap_timeout: Duration::from_secs(3),
            orphan_detection_interval: Duration::from_secs(5),
            opamp_server_port: None,
            use_hup_config_reload: false,
            validate_config: false,
            stop_timeout: Duration::from_secs(10),
            restart_policy: RestartPolicy::default(),
            health_check: HealthCheckConfig::default(),
            stderr_lines: 20,
            log_max_bytes: 10 << 20,
            log_files_kept: 3,
        }
    }
}

/// `agent::description`: attributes added to what the supervisor reports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct DescriptionConfig {
    /// Added to (or replacing) the identifying attributes (`service.name`, ...).
    pub identifying_attributes: BTreeMap<String, String>,
    /// Added to (or replacing) the non-identifying attributes (`host.name`, ...).
    pub non_identifying_attributes: BTreeMap<String, String>,
}

/// Ours (`agent::restart_policy`): exponential backoff between restarts of an agent that
/// exits on its own. The delay starts at `initial_interval`, is multiplied by `multiplier`
/// after each exit up to `max_interval`, and starts over once the agent has stayed up for
/// `reset_after`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// The first delay (default 1 s).
    #[serde(deserialize_with = "go_duration")]
    pub initial_interval: Duration,
    /// The largest delay (default 1 min).
    #[serde(deserialize_with = "go_duration")]
    pub max_interval: Duration,
    /// The growth per exit (default 2).
    pub multiplier: f64,
    /// The uptime after which the delay starts over (default 30 s).
    #[serde(deserialize_with = "go_duration")]
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            multiplier: 2.0,
            reset_after: Duration::from_secs(30),
        }
    }
}

/// Ours (`agent::health_check`): the agent's own HTTP health endpoint (for the Collector, its
/// `health_check` extension, e.g. `http://127.0.0.1:13133/`). When set, the agent is healthy
/// only while the endpoint answers 2xx (polled every `interval`), and a new config is APPLIED
/// only if it answers 2xx at the end of `agent::config_apply_timeout`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct HealthCheckConfig {
    /// `http://host:port/path`; none by default.
    pub endpoint: Option<String>,
    /// How often it is polled (default 5 s).
    #[serde(deserialize_with = "go_duration")]
    pub interval: Duration,
    /// How long one probe may take (default 2 s).
    #[serde(deserialize_with = "go_duration")]
    pub timeout: Duration,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `storage`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct StorageConfig {
    /// Where the instance uid, the remote configs and their status and the files given to
    /// the agent are kept (default [`DEFAULT_STORAGE_DIRECTORY`]).
    pub directory: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            directory: PathBuf::from(DEFAULT_STORAGE_DIRECTORY),
        }
    }
}

/// Parses a Go duration (`time.ParseDuration`): a sequence of decimal numbers with units
/// `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`, e.g. `300ms`, `1.5s`, `1m30s`; `0` alone is zero.
/// Negative durations are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err(format!("{text:?}: negative durations are not allowed"));
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a number, e.g. 5s or 250ms"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{text:?}: missing unit (ns, us, ms, s, m, h)")),
            other => return Err(format!("{text:?}: unknown unit {other:?}")),
        };
        total += value * seconds;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{text:?}: {e}"))
}

fn go_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_go_duration(&text).map_err(|e| serde::de::Error::custom(format!("invalid duration {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("10us"), Ok(Duration::from_micros(10)));
        for bad in ["", "5", "-1s", "5x", "s", "1..2s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn declared_capabilities_are_the_implemented_ones() {
        use opamp_proto::AgentCapabilitySet as C;
        let mut caps = Capabilities {
            accepts_remote_config: true,
            accepts_packages: true,
            reports_own_metrics: true,
            ..Capabilities::default()
        };
        let set = caps.declared();
        assert!(set.contains(C::REPORTS_STATUS | C::ACCEPTS_REMOTE_CONFIG | C::REPORTS_HEALTH));
        assert!(!set.intersects(C::ACCEPTS_PACKAGES | C::REPORTS_OWN_METRICS));
        caps.reports_health = false;
        assert!(!caps.declared().contains(C::REPORTS_HEALTH));
    }

    #[test]
    fn validation_names_the_field() {
        let exe = std::env::current_exe().unwrap();
        let ok = SupervisorConfig::new("ws://127.0.0.1:4320/v1/opamp", &exe, "/tmp/x");
        assert_eq!(ok.validate(), Ok(()));
        let field = |c: &SupervisorConfig| match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            Ok(()) => "ok",
        };
        let mut c = ok.clone();
        c.server.endpoint = "ftp://x".into();
        assert_eq!(field(&c), "server::endpoint");
        let mut c = ok.clone();
        c.agent.executable = "/nonexistent/agent".into();
        assert_eq!(field(&c), "agent::executable");
        let mut c = ok.clone();
        c.agent.config_files = vec!["$OPAMP_EXTENSION_CONFIG".into()];
        assert_eq!(field(&c), "agent::config_files");
        let mut c = ok.clone();
        c.agent.instance_id = Some("not-a-uuid".into());
        assert_eq!(field(&c), "agent::instance_id");
        let mut c = ok;
        c.server
            .headers
            .insert("bad header".into(), HeaderValues::One("x".into()));
        assert_eq!(field(&c), "server::headers");
    }
}
