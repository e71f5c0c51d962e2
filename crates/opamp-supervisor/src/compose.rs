//! Composing the agent's config files: the local ones from `agent.config_files` and one file
//! per entry of the remote config's config map.
//!
//! Each composition is written into a directory of its own (`agent-config/<n>/`), so the
//! files of the config the agent runs are never touched while a new one is tried; rolling back
//! is running the old composition again.

use std::path::{Path, PathBuf};

use opamp_proto::{AgentConfigMap, AgentConfigObject, EffectiveConfig};

use crate::config::REMOTE_CONFIG_PLACEHOLDER;
use crate::error::ComposeError;
use crate::storage::write_atomic;

/// A composed config: the files given to the agent, in order, and what they held.
#[derive(Debug, Clone, PartialEq)]
pub struct ComposedConfig {
    /// Each is given to the agent as `--config FILE`, in this order.
    pub files: Vec<PathBuf>,
    /// The directory the remote files were written to, if any.
    pub dir: Option<PathBuf>,
    /// What the files held, keyed by the file's path as given to the agent (EFF-1).
    pub effective: AgentConfigMap,
}

impl ComposedConfig {
    /// The effective config to report.
    pub fn effective_config(&self) -> EffectiveConfig {
        EffectiveConfig {
            config_map: Some(self.effective.clone()),
        }
    }

    /// The arguments for the agent: `--config FILE` per file.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::with_capacity(self.files.len() * 2);
        for file in &self.files {
            args.push("--config".into());
            args.push(file.clone().into_os_string());
        }
        args
    }
}

/// Composes `local` (the `agent.config_files` entries) with `remote` (the remote config's map,
/// if any), writing the remote entries into `dir`, which must not exist yet or be empty.
///
/// Remote entries are written in key order as `remote-<i>-<key>.<ext>`; the key is reduced to
/// `[A-Za-z0-9._-]` so that nothing from the server names a path outside `dir`.
pub fn compose(
    local: &[String],
    remote: Option<&AgentConfigMap>,
    dir: &Path,
) -> Result<ComposedConfig, ComposeError> {
    let mut remote_files = Vec::new();
    if let Some(map) = remote.filter(|m| !m.config_map.is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ComposeError::Write {
            path: dir.to_owned(),
            source: e,
        })?;
        for (i, (key, object)) in map.config_map.iter().enumerate() {
            let path = dir.join(file_name(i, key, &object.content_type));
            write_atomic(&path, &object.body).map_err(|e| ComposeError::Write {
                path: path.clone(),
                source: e,
            })?;
            remote_files.push((path, object.content_type.clone(), object.body.clone()));
        }
    }
    let mut files = Vec::new();
    let mut effective = AgentConfigMap::default();
    let mut remote_placed = false;
    let push_remote = |files: &mut Vec<PathBuf>, effective: &mut AgentConfigMap| {
        for (path, content_type, body) in &remote_files {
            effective.config_map.insert(
                path.display().to_string(),
                AgentConfigObject {
                    body: body.clone(),
                    content_type: content_type.clone(),
                    ..Default::default()
                },
            );
            files.push(path.clone());
        }
    };
    for entry in local {
        if entry == REMOTE_CONFIG_PLACEHOLDER {
            if !remote_placed {
                push_remote(&mut files, &mut effective);
                remote_placed = true;
            }
            continue;
        }
        let path = PathBuf::from(entry);
        let body = std::fs::read(&path).map_err(|e| ComposeError::ReadLocal {
            path: path.clone(),
            source: e,
        })?;
        effective.config_map.insert(
            entry.clone(),
            AgentConfigObject {
                body: body.into(),
                content_type: content_type_of(&path).into(),
                ..Default::default()
            },
        );
        files.push(path);
    }
    if !remote_placed {
        push_remote(&mut files, &mut effective);
    }
    Ok(ComposedConfig {
        files,
        dir: (!remote_files.is_empty()).then(|| dir.to_owned()),
        effective,
    })
}

fn file_name(index: usize, key: &str, content_type: &str) -> String {
    let mut stem: String = key
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // No hidden files and no `..`.
    stem = stem.trim_start_matches('.').to_owned();
    if stem.is_empty() {
        stem = "config".into();
    }
    let has_ext = [".yaml", ".yml", ".json", ".toml", ".conf", ".txt"]
        .iter()
        .any(|ext| stem.ends_with(ext));
    let ext = if has_ext {
        ""
    } else if content_type.contains("json") {
        ".json"
    } else {
        ".yaml"
    };
    format!("remote-{index}-{stem}{ext}")
}

fn content_type_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => "text/yaml",
        Some("json") => "application/json",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn object(body: &'static str) -> AgentConfigObject {
        AgentConfigObject {
            body: Bytes::from_static(body.as_bytes()),
            content_type: "text/yaml".into(),
            ..Default::default()
        }
    }

    #[test]
    fn local_then_remote_or_at_the_placeholder() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.yaml");
        std::fs::write(&base, "base: 1\n").unwrap();
        let mut map = AgentConfigMap::default();
        map.config_map.insert("b".into(), object("b: 2"));
        map.config_map.insert("".into(), object("a: 1"));
        let local = vec![base.display().to_string()];

        let c = compose(&local, Some(&map), &tmp.path().join("g1")).unwrap();
        assert_eq!(c.files.len(), 3);
        assert_eq!(c.files[0], base);
        assert!(c.files[1].ends_with("remote-0-config.yaml"));
        assert!(c.files[2].ends_with("remote-1-b.yaml"));
        assert_eq!(std::fs::read_to_string(&c.files[2]).unwrap(), "b: 2");
        assert_eq!(c.effective.config_map.len(), 3);
        assert_eq!(
            c.effective.config_map[&base.display().to_string()].body,
            Bytes::from_static(b"base: 1\n")
        );

        let local = vec![
            REMOTE_CONFIG_PLACEHOLDER.to_owned(),
            base.display().to_string(),
        ];
        let c = compose(&local, Some(&map), &tmp.path().join("g2")).unwrap();
        assert_eq!(c.files.last(), Some(&base));
        let args = c.args();
        assert_eq!(args.len(), 6);
        assert_eq!(args[0], "--config");
    }

    #[test]
    fn server_keys_cannot_escape_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let mut map = AgentConfigMap::default();
        map.config_map
            .insert("../../etc/passwd".into(), object("x"));
        map.config_map.insert("/abs".into(), object("y"));
        map.config_map.insert("...".into(), object("z"));
        let dir = tmp.path().join("g");
        let c = compose(&[], Some(&map), &dir).unwrap();
        for f in &c.files {
            assert_eq!(f.parent(), Some(dir.as_path()), "{f:?}");
        }
    }

    #[test]
    fn a_missing_local_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = compose(&["/nonexistent/x.yaml".into()], None, tmp.path()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.yaml"), "{err}");
    }
}
