//! Errors, one type per domain.

use std::path::{Path, PathBuf};

use crate::config::ConfigError;

/// Reading or writing the state directory failed.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct StorageError {
    /// The file or directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

impl StorageError {
    pub(crate) fn new(path: &Path, source: std::io::Error) -> Self {
        Self {
            path: path.to_owned(),
            source,
        }
    }
}

/// Composing the agent's config files failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComposeError {
    /// A local config file (`agent.config_files`) could not be read.
    #[error("cannot read the local config file {}: {source}", path.display())]
    ReadLocal {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A remote config file could not be written.
    #[error("cannot write the config file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The supervisor could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is not usable.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The state directory is not usable.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The agent's initial config could not be composed.
    #[error("{0}")]
    Compose(#[from] ComposeError),
    /// A TLS file named in `server::tls` could not be read.
    #[error("server::tls: {}: {source}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The OpAMP client refused its settings.
    #[error("OpAMP client: {0}")]
    Client(#[from] opamp_client::StartError),
}

/// The supervisor's task ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StopError {
    /// The supervisor's task panicked or was cancelled.
    #[error("the supervisor task failed: {0}")]
    Task(String),
}
