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
//! they would behind a device that stopped answering, and a crash meanwhile loses them. It can
//! make a host's clock run fast or slow ([`set_clock_rate`]), as leases see it, and deliver
//! every Raft message to a host twice ([`duplicate_to`]). A store that writes through
//! [`files`] loses, in a crash of the machine, what it wrote without a sync.

pub mod files;

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::Duration;

thread_local! {
    static SIMULATED: Cell<bool> = const { Cell::new(false) };
    static STALLED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    static WALL_CLOCK: Cell<Option<fn() -> u64>> = const { Cell::new(None) };
    static CLOCK_RATES: RefCell<Vec<(PathBuf, f64)>> = const { RefCell::new(Vec::new()) };
    static DUPLICATED: RefCell<Vec<(String, Duration)>> = const { RefCell::new(Vec::new()) };
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

/// Makes the monotonic clock ([`crate::clock::Monotonic`]) of every process keeping its data
/// under `dir` run at `rate` times the simulation's: a machine's clock running fast or slow.
/// A rate of 1 ends the drift (what the clock gained or lost stays).
pub fn set_clock_rate(dir: &Path, rate: f64) {
    CLOCK_RATES.with(|rates| {
        let mut rates = rates.borrow_mut();
        rates.retain(|(drifting, _)| drifting != dir);
        if rate != 1.0 {
            rates.push((dir.to_path_buf(), rate));
        }
    });
}

/// The rate the clock of a process keeping its data under `path` runs at.
pub(crate) fn clock_rate(path: &Path) -> f64 {
    CLOCK_RATES.with(|rates| {
        rates
            .borrow()
            .iter()
            .find(|(dir, _)| path.starts_with(dir))
            .map_or(1.0, |(_, rate)| *rate)
    })
}

/// Runs `produce`, a reader of a snapshot that hands what it read to `emit` a piece at a time
/// and stops when `emit` answers false (nobody takes more), and sends the pieces to `out`.
/// Outside a simulation it runs on a blocking thread and its pieces go as they come. In a
/// simulation it runs on this thread and its pieces go once it is done, so that when they
/// arrive follows the simulated clock rather than the machine's threads.
pub async fn produce<T, R>(
    out: tokio::sync::mpsc::Sender<T>,
    produce: impl FnOnce(&mut dyn FnMut(T) -> bool) -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError>
where
    T: Send + 'static,
    R: Send + 'static,
{
    if active() {
        let mut pieces = Vec::new();
        let produced = produce(&mut |piece| {
            pieces.push(piece);
            true
        });
        for piece in pieces {
            if out.send(piece).await.is_err() {
                break;
            }
        }
        return Ok(produced);
    }
    tokio::task::spawn_blocking(move || produce(&mut |piece| out.blocking_send(piece).is_ok()))
        .await
}

/// Makes every Raft message to `host` arrive twice, the copy `after` the original (`None` ends
/// it): a network that duplicates and delays, so that a stale copy may land after newer
/// messages. TCP never shows a peer a duplicated segment, but a retransmitting proxy or a
/// resent call does.
pub fn duplicate_to(host: &str, after: Option<Duration>) {
    DUPLICATED.with(|duplicated| {
        let mut duplicated = duplicated.borrow_mut();
        duplicated.retain(|(to, _)| to != host);
        if let Some(after) = after {
            duplicated.push((host.to_string(), after));
        }
    });
}

/// How long after a message to `addr` (`host:port`) a simulation delivers its copy; `None`
/// when it does not duplicate them, as always outside a simulation.
pub fn duplicate_after(addr: &str) -> Option<Duration> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    DUPLICATED.with(|duplicated| {
        duplicated
            .borrow()
            .iter()
            .find(|(to, _)| to == host)
            .map(|(_, after)| *after)
    })
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
    fn messages_to_a_duplicated_host_have_a_copy_until_the_fault_ends() {
        let after = Duration::from_millis(120);
        duplicate_to("n2", Some(after));
        assert_eq!(duplicate_after("n2:9000"), Some(after));
        // Another host, even one whose name starts the same, keeps single messages.
        assert_eq!(duplicate_after("n3:9000"), None);
        assert_eq!(duplicate_after("n22:9000"), None);
        // Set again, the newest delay holds; ended, none.
        duplicate_to("n2", Some(after * 2));
        assert_eq!(duplicate_after("n2:9000"), Some(after * 2));
        duplicate_to("n2", None);
        assert_eq!(duplicate_after("n2:9000"), None);
        // Another thread, another simulation.
        duplicate_to("n2", Some(after));
        assert_eq!(
            std::thread::spawn(|| duplicate_after("n2:9000"))
                .join()
                .expect("thread"),
            None
        );
    }

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

    async fn produced(pieces: u32, taken: usize) -> (u32, Vec<u32>) {
        let (out, mut received) = tokio::sync::mpsc::channel(2);
        let producing = tokio::spawn(produce(out, move |emit| {
            (0..pieces).take_while(|n| emit(*n)).count() as u32
        }));
        let mut got = Vec::new();
        while got.len() < taken {
            match received.recv().await {
                Some(piece) => got.push(piece),
                None => break,
            }
        }
        drop(received);
        (producing.await.expect("task").expect("producer"), got)
    }

    #[tokio::test]
    async fn a_producer_hands_its_pieces_over_in_order_on_a_thread_or_inline() {
        assert_eq!(produced(5, 5).await, (5, vec![0, 1, 2, 3, 4]));
        // Nobody takes more: a producer on its thread stops.
        let (emitted, got) = produced(1_000, 1).await;
        assert_eq!(got, vec![0]);
        assert!(emitted < 1_000, "{emitted}");
        enter_on_this_thread();
        // Inline, every piece is read first, then sent while someone takes them.
        assert_eq!(produced(5, 5).await, (5, vec![0, 1, 2, 3, 4]));
        assert_eq!(produced(1_000, 1).await.1, vec![0]);
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
