//! Files on a simulated host's disk, which a crash of the host leaves as they were at their
//! last sync.
//!
//! A store that writes through [`File`] in a simulation keeps its bytes in memory twice: as
//! the machine's page cache holds them, which reads see, and as the device last made them
//! durable. A sync makes the durable image the cached one. When the nemesis crashes a host
//! ([`crash`]), the handles its processes opened stop working (a killed process runs no
//! destructors, so nothing they would have written lands), and a crash of the machine also
//! throws away what each file had not synced. A crash of the process alone keeps it: the
//! kernel writes its page cache out on its own.
//!
//! The images live for the whole test process, keyed by path, so a restarted host finds its
//! files where it left them. Outside a simulation nothing opens one.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Default)]
struct Image {
    /// What reads see: the page cache.
    cached: Vec<u8>,
    /// What the last sync made durable.
    durable: Vec<u8>,
    /// Byte ranges of `cached` written since the last sync.
    dirty: Vec<Range<usize>>,
    /// Bumped by every crash; a handle from before one is a dead process's.
    lives: u64,
}

/// Every simulated file, by path. Not per thread: a store may read from a blocking thread.
static IMAGES: Mutex<BTreeMap<PathBuf, Image>> = Mutex::new(BTreeMap::new());

fn images() -> MutexGuard<'static, BTreeMap<PathBuf, Image>> {
    IMAGES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Image {
    fn sync(&mut self) {
        self.durable.resize(self.cached.len(), 0);
        for range in self.dirty.drain(..) {
            let range = range.start.min(self.cached.len())..range.end.min(self.cached.len());
            self.durable[range.clone()].copy_from_slice(&self.cached[range]);
        }
    }
}

/// A handle on a simulated file, as one process opened it.
#[derive(Debug)]
pub struct File {
    path: PathBuf,
    life: u64,
}

fn offset(offset: u64, len: usize) -> io::Result<Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset past memory"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::other("offset past memory"))?;
    Ok(start..end)
}

impl File {
    /// Opens the file at `path`, empty if it never existed.
    pub fn open(path: &Path) -> Self {
        let life = images().entry(path.to_path_buf()).or_default().lives;
        Self {
            path: path.to_path_buf(),
            life,
        }
    }

    /// Runs `f` on the file's image while the process that opened it lives.
    fn with<R>(&self, f: impl FnOnce(&mut Image) -> io::Result<R>) -> io::Result<R> {
        let mut images = images();
        match images.get_mut(&self.path) {
            Some(image) if image.lives == self.life => f(image),
            _ => Err(io::Error::other(format!(
                "{}: the host crashed after this handle was opened",
                self.path.display()
            ))),
        }
    }

    /// The file's size in bytes, as reads see it.
    pub fn size(&self) -> io::Result<u64> {
        self.with(|image| Ok(image.cached.len() as u64))
    }

    /// Fills `out` from `at`; an error past the end, as a short read would be.
    pub fn read(&self, at: u64, out: &mut [u8]) -> io::Result<()> {
        let range = offset(at, out.len())?;
        self.with(|image| {
            let bytes = image.cached.get(range).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                )
            })?;
            out.copy_from_slice(bytes);
            Ok(())
        })
    }

    /// Writes `data` at `at`, growing the file with zeros up to it if need be.
    pub fn write(&self, at: u64, data: &[u8]) -> io::Result<()> {
        let range = offset(at, data.len())?;
        self.with(|image| {
            if image.cached.len() < range.end {
                image.cached.resize(range.end, 0);
            }
            image.cached[range.clone()].copy_from_slice(data);
            image.dirty.push(range);
            Ok(())
        })
    }

    /// Truncates or extends the file (with zeros) to `len` bytes.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length past memory"))?;
        self.with(|image| {
            let grown = image.cached.len()..len;
            image.cached.resize(len, 0);
            if !grown.is_empty() {
                image.dirty.push(grown);
            }
            Ok(())
        })
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.with(|image| {
            image.sync();
            Ok(())
        })
    }
}

/// The host whose files lie under `dir` crashed: the handles its processes held stop
/// working, and when the whole `machine` went down, each file loses what it had not synced.
pub fn crash(dir: &Path, machine: bool) {
    let mut images = images();
    for (path, image) in images.iter_mut() {
        if !path.starts_with(dir) {
            continue;
        }
        image.lives += 1;
        if machine {
            image.cached.clone_from(&image.durable);
            image.dirty.clear();
        } else {
            image.sync();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(file: &File) -> Vec<u8> {
        let mut out = vec![0; file.size().expect("size") as usize];
        file.read(0, &mut out).expect("read");
        out
    }

    #[test]
    fn a_machine_crash_keeps_what_was_synced_and_nothing_after() {
        let dir = tempfile::tempdir().expect("dir");
        let file = File::open(&dir.path().join("host/log"));
        file.write(0, b"durable").expect("write");
        file.sync().expect("sync");
        file.write(0, b"DUR").expect("write");
        file.write(7, b" and more").expect("write");
        assert_eq!(contents(&file), b"DURable and more");

        crash(&dir.path().join("host"), true);
        let err = file.write(0, b"x").expect_err("a dead process's handle");
        assert!(err.to_string().contains("crashed"), "{err}");
        assert_eq!(
            contents(&File::open(&dir.path().join("host/log"))),
            b"durable"
        );
    }

    #[test]
    fn a_process_crash_keeps_the_page_cache() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("host/log");
        let file = File::open(&path);
        file.write(0, b"cached").expect("write");
        crash(&dir.path().join("host"), false);
        assert!(file.sync().is_err());
        let reopened = File::open(&path);
        assert_eq!(contents(&reopened), b"cached");
        // And it is durable now: a machine crash later keeps it.
        crash(&dir.path().join("host"), true);
        assert_eq!(contents(&File::open(&path)), b"cached");
    }

    #[test]
    fn a_crash_touches_only_the_hosts_files_and_truncation_is_a_write() {
        let dir = tempfile::tempdir().expect("dir");
        let (ours, theirs) = (dir.path().join("a/log"), dir.path().join("ab/log"));
        let (file, other) = (File::open(&ours), File::open(&theirs));
        file.write(0, b"0123456789").expect("write");
        file.sync().expect("sync");
        file.set_len(4).expect("truncate");
        file.set_len(6).expect("extend");
        assert_eq!(contents(&file), b"0123\0\0");
        other.write(0, b"unsynced").expect("write");

        crash(&dir.path().join("a"), true);
        assert_eq!(contents(&File::open(&ours)), b"0123456789");
        assert_eq!(contents(&other), b"unsynced", "another host's file");
        assert!(file.read(8, &mut [0; 4]).is_err());
    }
}
