//! One process per data directory. Every cellplane server (`cellplane serve` and `dev`,
//! `cell-agent`, `im-cell`) holds an exclusive lock on its data directory while it runs: two
//! processes on one directory would write one store twice, or fight over its port while an
//! orphan of an earlier run went on serving. The lock is the operating system's (`flock`), so
//! it goes with its process however that ends, even `kill -9`; the file names the holder's pid
//! for the message the next one prints.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The file in the data directory that is locked.
pub const LOCK_FILE: &str = "cellplane.lock";

/// The exit code of a server that found its data directory held: a supervisor does not
/// restart it as if it had crashed.
pub const EXIT_DIR_LOCKED: i32 = 75;

#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error(
        "data directory {} is in use by process {pid} (it holds {LOCK_FILE}); stop that process or use another directory",
        dir.display()
    )]
    Held { dir: PathBuf, pid: String },
    #[error("locking data directory {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, DirLockError> {
        let io = |source| DirLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(io)?;
                file.rewind().map_err(io)?;
                write!(file, "{}", std::process::id()).map_err(io)?;
                Ok(Self { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                file.read_to_string(&mut pid).map_err(io)?;
                let pid = pid.trim();
                Err(DirLockError::Held {
                    dir: dir.to_path_buf(),
                    pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                })
            }
            Err(TryLockError::Error(source)) => Err(io(source)),
        }
    }

    /// Like [`DirLock::acquire`], exiting with [`EXIT_DIR_LOCKED`] when another process
    /// holds the directory: for a server's `main`, before it opens anything in it.
    pub fn acquire_or_exit(dir: &Path) -> Result<Self, DirLockError> {
        match Self::acquire(dir) {
            Err(held @ DirLockError::Held { .. }) => {
                tracing::error!("{held}");
                eprintln!("error: {held}");
                std::process::exit(EXIT_DIR_LOCKED);
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let first = DirLock::acquire(&data).expect("first");
        // flock locks belong to the open file: a second open in this process conflicts too.
        match DirLock::acquire(&data) {
            Err(DirLockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(&data).expect("free again once dropped");
    }
}
