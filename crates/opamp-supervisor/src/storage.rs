//! What the supervisor keeps in `storage.directory`, so that a restarted supervisor (also
//! after `kill -9`) is the same agent and runs the last good config before it reaches its
//! server.
//!
//! | file | content |
//! |---|---|
//! | `instance_uid` | the agent's instance uid, hyphenated text (UID-1, UID-3) |
//! | `last_remote_config.pb` | the last `AgentRemoteConfig` received (protobuf) |
//! | `good_remote_config.pb` | the last one that was APPLIED (protobuf) |
//! | `remote_config_status.pb` | the last `RemoteConfigStatus` reported (protobuf) |
//! | `agent-config/` | the files given to the agent, one directory per composed config |
//! | `agent.pid` | the running agent's process id and executable, to stop an agent left running by a supervisor that was killed |
//!
//! Every file is written through a temporary file, `fsync` and a rename, so a crash leaves
//! the old or the new content, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use opamp_proto::{AgentRemoteConfig, InstanceUid, Message, RemoteConfigStatus};

use crate::error::StorageError;

/// The supervisor's state directory.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    /// Opens (creating it if needed) the state directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::new(&dir, e))?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where composed configs are written for the agent.
    pub fn agent_config_dir(&self) -> PathBuf {
        self.dir.join("agent-config")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The stored instance uid, or a new UUID v7 that is stored at once (UID-1, UID-3). A
    /// file that holds no uid is replaced, with a warning: being a new agent beats not
    /// starting.
    pub fn instance_uid(&self) -> Result<InstanceUid, StorageError> {
        let path = self.path("instance_uid");
        match std::fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse() {
                Ok(uid) => return Ok(uid),
                Err(_) => tracing::warn!(
                    path = %path.display(),
                    "the stored instance uid is not a UUID; using a new one"
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::new(&path, e)),
        }
        let uid = InstanceUid::new_v7();
        self.save_instance_uid(uid)?;
        Ok(uid)
    }

    /// Stores the instance uid, e.g. one the server assigned (UID-7).
    pub fn save_instance_uid(&self, uid: InstanceUid) -> Result<(), StorageError> {
        let path = self.path("instance_uid");
        write_atomic(&path, uid.to_string().as_bytes()).map_err(|e| StorageError::new(&path, e))
    }

    fn load<M: Message + Default>(&self, name: &str) -> Option<M> {
        let path = self.path(name);
        let bytes = std::fs::read(&path).ok()?;
        match M::decode(&bytes[..]) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring an unreadable state file: {e}");
                None
            }
        }
    }

    fn save<M: Message>(&self, name: &str, message: Option<&M>) -> Result<(), StorageError> {
        let path = self.path(name);
        match message {
            Some(m) => write_atomic(&path, &m.encode_to_vec()),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
        .map_err(|e| StorageError::new(&path, e))
    }

    /// The last remote config received.
    pub fn last_remote_config(&self) -> Option<AgentRemoteConfig> {
        self.load("last_remote_config.pb")
    }

    /// Stores the last remote config received.
    pub fn save_last_remote_config(&self, config: &AgentRemoteConfig) -> Result<(), StorageError> {
        self.save("last_remote_config.pb", Some(config))
    }

    /// The last remote config that was APPLIED.
    pub fn good_remote_config(&self) -> Option<AgentRemoteConfig> {
        self.load("good_remote_config.pb")
    }

    /// Stores (or, with `None`, forgets) the last remote config that was APPLIED.
    pub fn save_good_remote_config(
        &self,
        config: Option<&AgentRemoteConfig>,
    ) -> Result<(), StorageError> {
        self.save("good_remote_config.pb", config)
    }

    /// The last remote config status reported.
    pub fn remote_config_status(&self) -> Option<RemoteConfigStatus> {
        self.load("remote_config_status.pb")
    }

    /// Stores the last remote config status reported.
    pub fn save_remote_config_status(
        &self,
        status: &RemoteConfigStatus,
    ) -> Result<(), StorageError> {
        self.save("remote_config_status.pb", Some(status))
    }
}

impl Storage {
    /// The agent process recorded as running: its pid and executable.
    pub fn agent_pid(&self) -> Option<(u32, PathBuf)> {
        let text = std::fs::read_to_string(self.path("agent.pid")).ok()?;
        let (pid, exe) = text.split_once('\n')?;
        Some((
            pid.trim().parse().ok()?,
            PathBuf::from(exe.trim_end_matches('\n')),
        ))
    }

    /// Records the running agent's pid and executable.
    pub fn save_agent_pid(&self, pid: u32, executable: &Path) -> Result<(), StorageError> {
        let path = self.path("agent.pid");
        let text = format!("{pid}\n{}\n", executable.display());
        write_atomic(&path, text.as_bytes()).map_err(|e| StorageError::new(&path, e))
    }

    /// Forgets the running agent (it was stopped or exited).
    pub fn clear_agent_pid(&self) {
        let _ = std::fs::remove_file(self.path("agent.pid"));
    }
}

/// Writes `data` to `path` through a temporary file in the same directory, `fsync` and a
/// rename, then syncs the directory: after a crash `path` holds the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the directory is synced; not every platform can open a
    // directory, so a failure here is not an error.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use opamp_proto::{AgentConfigMap, RemoteConfigStatuses};

    #[test]
    fn uid_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().join("state")).unwrap();
        let uid = s.instance_uid().unwrap();
        assert_eq!(uid.as_array()[6] >> 4, 7, "UUID v7 (UID-2)");
        let again = Storage::open(dir.path().join("state")).unwrap();
        assert_eq!(again.instance_uid().unwrap(), uid);
        // A damaged file gives a new uid rather than no agent.
        std::fs::write(dir.path().join("state/instance_uid"), "garbage").unwrap();
        let fresh = again.instance_uid().unwrap();
        assert_ne!(fresh, uid);
        assert_eq!(again.instance_uid().unwrap(), fresh);
    }

    #[test]
    fn configs_and_status_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path()).unwrap();
        assert!(s.good_remote_config().is_none());
        let config = AgentRemoteConfig {
            config: Some(AgentConfigMap::single("a: 1", "text/yaml")),
            config_hash: Bytes::from_static(b"h1"),
        };
        s.save_good_remote_config(Some(&config)).unwrap();
        s.save_last_remote_config(&config).unwrap();
        let status = RemoteConfigStatus {
            last_remote_config_hash: Bytes::from_static(b"h1"),
            status: RemoteConfigStatuses::Applied as i32,
            error_message: String::new(),
        };
        s.save_remote_config_status(&status).unwrap();
        let s = Storage::open(dir.path()).unwrap();
        assert_eq!(s.good_remote_config(), Some(config.clone()));
        assert_eq!(s.last_remote_config(), Some(config));
        assert_eq!(s.remote_config_status(), Some(status));
        s.save_good_remote_config(None).unwrap();
        assert!(s.good_remote_config().is_none());
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
