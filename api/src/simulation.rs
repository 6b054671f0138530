//! Whether a deterministic simulation runs on this thread, its wall clock, and the faults it
//! injects into disks.
//!
//! A simulation runs every server on one thread, on a simulated clock. Stores that write on
//! threads of their own (the Raft log, the cell's writer) write on their host's runtime
//! instead there, so that when a write is durable depends on the simulated clock alone and
//! not on the machine's scheduler, and a crashed host's stores close with its tasks, as a
//! killed process's would. Outside a simulation the flag is never set and nothing changes.
//!
//! A simulation also sets the wall clock ([`set_wall_clock`]), and can stall a host's disk:
//! writes under a stalled directory wait, on the simulated clock, until the stall ends, as
//! they would behind a device that stopped answering, and a crash meanwhile loses them.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::Duration;

thread_local! {
    static SIMULATED: Cell<bool> = const { Cell::new(false) };
    static STALLED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    static WALL_CLOCK: Cell<Option<fn() -> u64>> = const { Cell::new(None) };
}

/// How often a stalled write looks again.
const STALL_POLL: Duration = Duration::from_millis(5);

/// Makes this thread a simulation's.
pub fn enter_on_this_thread() {
    SIMULATED.with(|simulated| simulated.set(true));
}

/// Whether a simulation runs on this thread.
pub fn active() -> bool {
    SIMULATED.with(Cell::get)
}

/// Makes [`crate::clock::now_ms`] on this thread read `clock` (milliseconds since the Unix
/// epoch) rather than the machine's clock: a simulation's wall clock follows its simulated
/// time, or timestamps and the waits computed from them would follow the machine's speed.
pub fn set_wall_clock(clock: fn() -> u64) {
    WALL_CLOCK.with(|wall| wall.set(Some(clock)));
}

/// The wall clock a simulation set on this thread.
pub(crate) fn wall_clock() -> Option<fn() -> u64> {
    WALL_CLOCK.with(Cell::get)
}

/// Stalls every write under `dir` until [`resume_disk`].
pub fn stall_disk(dir: &Path) {
    STALLED.with(|stalled| stalled.borrow_mut().push(dir.to_path_buf()));
}

/// Ends the stall of `dir`.
pub fn resume_disk(dir: &Path) {
    STALLED.with(|stalled| stalled.borrow_mut().retain(|held| held != dir));
}

fn stalled(path: &Path) -> bool {
    STALLED.with(|stalled| stalled.borrow().iter().any(|dir| path.starts_with(dir)))
}

/// Returns once a write to `path` may go ahead: at once, unless a simulation stalled its disk.
pub async fn disk_ready(path: &Path) {
    while stalled(path) {
        tokio::time::sleep(STALL_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_thread_that_entered_is_simulated() {
        assert!(!active());
        enter_on_this_thread();
        assert!(active());
        assert!(!std::thread::spawn(active).join().expect("thread"));
    }

    #[test]
    fn the_wall_clock_is_the_simulations_on_its_thread_only() {
        assert!(crate::clock::now_ms() > 1_700_000_000_000);
        set_wall_clock(|| 42);
        assert_eq!(crate::clock::now_ms(), 42);
        assert!(
            std::thread::spawn(crate::clock::now_ms)
                .join()
                .expect("thread")
                > 42
        );
    }

    #[tokio::test]
    async fn a_write_under_a_stalled_directory_waits_for_the_stall_to_end() {
        let dir = Path::new("/sim/n1");
        stall_disk(dir);
        assert!(stalled(&dir.join("raft.redb")));
        assert!(!stalled(Path::new("/sim/n2/raft.redb")));
        let write = tokio::spawn(async move { disk_ready(&dir.join("raft.redb")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!write.is_finished());
        resume_disk(dir);
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("the write goes ahead once the stall ends")
            .expect("task");
    }
}
