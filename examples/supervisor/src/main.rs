//! `opamp-supervisor`: runs an agent and manages it for an OpAMP server.
//!
//! ```sh
//! opamp-supervisor --config supervisor.yaml
//! ```
//!
//! The configuration file has the layout of contrib's `opampsupervisor` (`server`,
//! `capabilities`, `agent`, `storage`); see the `opamp-supervisor` crate for the fields.
//! `${env:NAME}` and `${NAME}` in it are replaced by the environment variable (empty if
//! unset), as `opampsupervisor` does. SIGTERM or Ctrl-C stops the agent gracefully, then the
//! supervisor.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use opamp_supervisor::{Supervisor, SupervisorConfig};

const USAGE: &str = "usage: opamp-supervisor --config FILE
  FILE is a YAML file in the layout of opampsupervisor's: server, capabilities, agent, storage";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<PathBuf, String> {
    let mut config = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => {
                config = Some(it.next().ok_or(format!("--config needs a file\n{USAGE}"))?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => match other.strip_prefix("--config=") {
                Some(file) => config = Some(file.to_owned()),
                None => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            },
        }
    }
    config
        .map(PathBuf::from)
        .ok_or_else(|| format!("--config is required\n{USAGE}"))
}

/// Replaces `${env:NAME}` and `${NAME}` by the variable's value (empty if unset).
fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        let name = name.strip_prefix("env:").unwrap_or(name);
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            out.push_str(&lookup(name).unwrap_or_default());
        } else {
            out.push_str(&rest[start..start + 3 + end]);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Sections of `opampsupervisor`'s file this supervisor has no use for: not worth a warning.
const IGNORED_SECTIONS: &[&str] = &["telemetry", "healthcheck", "extensions"];

/// Reads, parses and checks the configuration file; the error is a message for the user.
/// Also returns the keys it does not know (typos, or `opampsupervisor` fields not listed in
/// [`IGNORED_SECTIONS`]), as `agent.restart_polcy`.
fn load(path: &Path) -> Result<(SupervisorConfig, Vec<String>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = expand_env(&text, |name| std::env::var(name).ok());
    let mut unknown = Vec::new();
    let config: SupervisorConfig = if text.trim().is_empty() {
        SupervisorConfig::default()
    } else {
        let deserializer = serde_yaml::Deserializer::from_str(&text);
        serde_ignored::deserialize(deserializer, |key| {
            let key = key.to_string();
            if !IGNORED_SECTIONS
                .iter()
                .any(|s| key == *s || key.starts_with(&format!("{s}.")))
            {
                unknown.push(key);
            }
        })
        .map_err(|e| format!("{}: {e}", path.display()))?
    };
    config
        .validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, unknown))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match parse_args(std::env::args().skip(1)).and_then(|path| load(&path)) {
        Ok((config, unknown)) => {
            for key in unknown {
                tracing::warn!("unknown configuration key {key}; ignored");
            }
            config
        }
        Err(message) => {
            eprintln!("opamp-supervisor: {message}");
            return ExitCode::from(2);
        }
    };
    for field in config.unsupported() {
        tracing::warn!("{field} is set but not supported by this supervisor; ignored");
    }
    let supervisor = match Supervisor::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("opamp-supervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("supervising as instance {}", supervisor.instance_uid());
    shutdown_signal().await;
    tracing::info!("stopping");
    match supervisor.stop().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opamp-supervisor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("supervisor.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_an_opampsupervisor_config() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let path = write(
            dir.path(),
            &format!(
                r#"
server:
  endpoint: wss://opamp.example.com:4320/v1/opamp
  headers:
    Authorization: Bearer ${{env:OPAMP_TEST_TOKEN_UNSET}}x
    X-Multi: [a, b]
  tls:
    insecure_skip_verify: true
    ca_file: /etc/ca.pem
capabilities:
  accepts_remote_config: true
  reports_remote_config: true
  reports_effective_config: true
  accepts_restart_command: true
  reports_own_metrics: true
agent:
  executable: {exe}
  args: [--verbose]
  env:
    LOG_LEVEL: debug
  config_files: [/etc/base.yaml, $REMOTE_CONFIG]
  config_apply_timeout: 2s
  bootstrap_timeout: 1m
  orphan_detection_interval: 500ms
  description:
    non_identifying_attributes:
      deployment.environment: prod
  restart_policy:
    initial_interval: 250ms
storage:
  directory: {dir}
telemetry:
  logs:
    level: debug
"#,
                exe = exe.display(),
                dir = dir.path().display()
            ),
        );
        let (c, unknown) = load(&path).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(c.server.endpoint, "wss://opamp.example.com:4320/v1/opamp");
        assert_eq!(
            c.server.headers["Authorization"].values(),
            ["Bearer x".to_owned()]
        );
        assert_eq!(c.server.headers["X-Multi"].values().len(), 2);
        assert!(c.server.tls.insecure_skip_verify);
        assert!(c.capabilities.accepts_remote_config && c.capabilities.accepts_restart_command);
        assert!(c.capabilities.reports_health, "default");
        assert_eq!(c.agent.args, ["--verbose"]);
        assert_eq!(c.agent.env["LOG_LEVEL"], "debug");
        assert_eq!(c.agent.config_files, ["/etc/base.yaml", "$REMOTE_CONFIG"]);
        assert_eq!(c.agent.config_apply_timeout, Duration::from_secs(2));
        assert_eq!(c.agent.bootstrap_timeout, Duration::from_secs(60));
        assert_eq!(
            c.agent.restart_policy.initial_interval,
            Duration::from_millis(250)
        );
        assert_eq!(c.agent.restart_policy.multiplier, 2.0, "default");
        assert_eq!(c.storage.directory, dir.path());
        assert_eq!(c.unsupported(), ["capabilities::reports_own_metrics"]);
    }

    #[test]
    fn bad_files_give_readable_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("missing.yaml")).unwrap_err();
        assert!(
            err.contains("missing.yaml") && err.contains("No such file"),
            "{err}"
        );

        let path = write(dir.path(), "server:\n  endpoint: [not, a, string]\n");
        let err = load(&path).unwrap_err();
        assert!(
            err.contains("server.endpoint") && err.contains("line 2"),
            "{err}"
        );

        let path = write(
            dir.path(),
            "server: {endpoint: ws://x/}\nagent:\n  config_apply_timeout: 5 seconds\n",
        );
        let err = load(&path).unwrap_err();
        assert!(err.contains("invalid duration \"5 seconds\""), "{err}");
        assert!(
            err.contains("unknown unit") && err.contains("line 3"),
            "{err}"
        );

        let path = write(
            dir.path(),
            "server: {endpoint: ws://x/}\nagent: {executable: /nonexistent/agent}\n",
        );
        let err = load(&path).unwrap_err();
        assert!(
            err.contains("agent::executable") && err.contains("/nonexistent/agent"),
            "{err}"
        );

        let path = write(dir.path(), "agent: {executable: /bin/sh}\n");
        let err = load(&path).unwrap_err();
        assert!(err.contains("server::endpoint: must be specified"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "server: {endpoint: ws://x/, endpont: y}\nagent:\n  executable: /bin/sh\n  restart_polcy: {}\ntelemetry: {logs: {level: info}}\n",
        );
        let (_, unknown) = load(&path).unwrap();
        assert_eq!(unknown, ["server.endpont", "agent.restart_polcy"]);
    }

    #[test]
    fn env_expansion() {
        let lookup = |n: &str| (n == "A").then(|| "1".to_owned());
        assert_eq!(expand_env("x ${env:A} ${A} ${B}.", lookup), "x 1 1 .");
        assert_eq!(expand_env("${not valid} ${", lookup), "${not valid} ${");
        assert_eq!(expand_env("$A plain", lookup), "$A plain");
    }

    #[test]
    fn args() {
        let a = |v: &[&str]| parse_args(v.iter().map(|s| s.to_string()));
        assert_eq!(a(&["--config", "s.yaml"]), Ok(PathBuf::from("s.yaml")));
        assert_eq!(a(&["--config=s.yaml"]), Ok(PathBuf::from("s.yaml")));
        assert!(a(&[]).unwrap_err().contains("--config is required"));
        assert!(a(&["--bogus"]).unwrap_err().contains("unknown argument"));
    }
}
