//! An OpAMP supervisor: runs an agent process that need not speak OpAMP, and manages it for
//! an OpAMP server, as contrib's `opampsupervisor` does for the Collector.
//!
//! ```text
//! opamp-proto  <-  opamp-client  <-  opamp-supervisor  <-  the `opamp-supervisor` program
//! ```
//!
//! The supervisor is the OpAMP client ([`opamp_client::OpampClient`]). It starts the agent
//! executable with its arguments plus `--config FILE` for each file of the composed config,
//! restarts it after a crash with exponential backoff, applies remote configs with rollback,
//! carries out the Restart command, and reports the agent's effective config and health. Its
//! state lives in `storage.directory` ([`Storage`]): the instance uid, the last remote config
//! and its status, and the last good config, so a restarted supervisor is the same agent and
//! runs the last good config even while the server is unreachable.
//!
//! - [`SupervisorConfig`]: the configuration, with `opampsupervisor`'s field names; it
//!   derives `serde::Deserialize` (the program reads it from YAML).
//! - [`Supervisor`]: the running supervisor.
//! - [`AgentProcess`], [`compose()`], [`Storage`]: the parts, usable on their own.
//!
//! The agent's stdout and stderr are kept in `agent.log` in the storage directory, rotated by
//! size ([`LogFile`]).
//!
//! When the agent has a health endpoint (`agent.health_check`, [`health`]), its answers are
//! part of the health, and a new config must leave it healthy to be APPLIED.
//!
//! Not (yet) here: agents that speak OpAMP themselves (the Collector's `opampextension`) and
//! packages.
//!
//! # Quick start
//!
//! ```no_run
//! use opamp_supervisor::{Supervisor, SupervisorConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = SupervisorConfig::new(
//!     "ws://127.0.0.1:4320/v1/opamp",
//!     "/usr/bin/my-agent",
//!     "/var/lib/my-agent/supervisor",
//! );
//! config.capabilities.accepts_remote_config = true;
//! config.capabilities.reports_remote_config = true;
//! config.capabilities.accepts_restart_command = true;
//! let supervisor = Supervisor::start(config)?;
//! println!("supervising as {}", supervisor.instance_uid());
//! tokio::signal::ctrl_c().await?;
//! supervisor.stop().await?; // SIGTERM to the agent, SIGKILL after agent.stop_timeout
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! - `tls` (default): `wss://` and `https://` endpoints and the `server::tls` settings,
//!   through `opamp-client/tls` (rustls). Without it such a configuration is refused at start.
//!
//! The supervisor always runs on tokio (`opamp-client/tokio`).
//!
//! # Cancel safety
//!
//! [`Supervisor::stop`] and [`AgentProcess::wait`] are cancel-safe; [`AgentProcess::stop`]
//! consumes the process, and dropping its future kills the agent.

pub mod compose;
pub mod config;
mod error;
pub mod health;
pub mod process;
pub mod storage;
mod supervisor;

pub use compose::{ComposedConfig, compose};
pub use config::{ConfigError, SupervisorConfig};
pub use error::{ComposeError, StartError, StopError, StorageError};
pub use process::{AgentProcess, Exit, LaunchSpec, LogFile};
pub use storage::Storage;
pub use supervisor::{AgentStatus, Supervisor};
