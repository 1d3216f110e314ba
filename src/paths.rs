//! Where walkie keeps its files (XDG base directories; docs/ARCHITECTURE.md, "Interfaces that
//! stay stable").
//!
//! Each directory honours the usual variable and falls back to the XDG default; the
//! runtime directory falls back to `/tmp/walkie-<uid>` when `XDG_RUNTIME_DIR` is unset
//! (cron, a bare `su`), created 0700.

use std::path::{Path, PathBuf};

/// The set of paths one walkie instance uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `$XDG_CONFIG_HOME/walkie/config.toml`
    pub config_file: PathBuf,
    /// `$XDG_STATE_HOME/walkie`
    pub state_dir: PathBuf,
    /// `$XDG_DATA_HOME/walkie`
    pub data_dir: PathBuf,
    /// `$XDG_RUNTIME_DIR/walkie`
    pub runtime_dir: PathBuf,
}

impl Paths {
    /// Paths from the process environment.
    pub fn from_env() -> Paths {
        Paths::from_lookup(
            |k| std::env::var_os(k).map(PathBuf::from),
            nix::unistd::getuid().as_raw(),
        )
    }

    /// Paths from an arbitrary variable lookup (tests).
    pub fn from_lookup(var: impl Fn(&str) -> Option<PathBuf>, uid: u32) -> Paths {
        let abs = |k: &str| var(k).filter(|p| p.is_absolute());
        let home = var("HOME").unwrap_or_else(|| PathBuf::from("/"));
        let config_home = abs("XDG_CONFIG_HOME").unwrap_or_else(|| home.join(".config"));
        let state_home = abs("XDG_STATE_HOME").unwrap_or_else(|| home.join(".local/state"));
        let data_home = abs("XDG_DATA_HOME").unwrap_or_else(|| home.join(".local/share"));
        let runtime = abs("XDG_RUNTIME_DIR")
            .map(|d| d.join("walkie"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/walkie-{uid}")));
        Paths {
            config_file: config_home.join("walkie/config.toml"),
            state_dir: state_home.join("walkie"),
            data_dir: data_home.join("walkie"),
            runtime_dir: runtime,
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    pub fn tasks_dir(&self) -> PathBuf {
        self.state_dir.join("tasks")
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.data_dir.join("scratch")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }

    /// The instance lock: one daemon per state directory (instance.rs).
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("walkie.lock")
    }

    /// Creates walkie's own directories (state, data, runtime) or checks the ones that
    /// exist: 0700, of this user, not links (see [`crate::files::ensure_private_dir`]).
    pub fn ensure_private_dirs(&self) -> Result<(), crate::files::DirError> {
        for dir in [&self.state_dir, &self.data_dir, &self.runtime_dir] {
            crate::files::ensure_private_dir(dir)?;
        }
        Ok(())
    }
}

/// Expands a leading `~/` (or a lone `~`) against `$HOME`.
pub fn expand_home(p: &str) -> PathBuf {
    let home = || {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/".into())
    };
    if p == "~" {
        home()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home().join(rest)
    } else {
        Path::new(p).to_path_buf()
    }
}

/// Creates `dir` (and parents) with mode 0700 for the last component if it is new.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdg_variables_win_and_relative_ones_are_ignored() {
        let p = Paths::from_lookup(
            |k| match k {
                "HOME" => Some("/home/u".into()),
                "XDG_STATE_HOME" => Some("/s".into()),
                "XDG_CONFIG_HOME" => Some("relative".into()),
                _ => None,
            },
            1000,
        );
        assert_eq!(p.state_file(), PathBuf::from("/s/walkie/state.json"));
        assert_eq!(
            p.config_file,
            PathBuf::from("/home/u/.config/walkie/config.toml")
        );
        assert_eq!(p.data_dir, PathBuf::from("/home/u/.local/share/walkie"));
        assert_eq!(
            p.control_socket(),
            PathBuf::from("/tmp/walkie-1000/control.sock")
        );
    }
}
