//! The wall clock, as every component records times: milliseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by this machine's clock (a simulation's, on its thread);
/// 0 for a clock set before it.
pub fn now_ms() -> u64 {
    if let Some(simulated) = crate::simulation::wall_clock() {
        return simulated();
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A process's monotonic clock, as leases are measured on: tokio's clock, except in a
/// simulation whose nemesis made the clock of the host keeping the process's data run fast or
/// slow ([`crate::simulation::set_clock_rate`]). Clones share the clock.
#[derive(Debug, Clone, Default)]
pub struct Monotonic {
    /// The process's data directory, which names its host in a simulation.
    dir: Option<std::path::PathBuf>,
    /// Where the rate last changed: (tokio's clock, this clock, the rate since).
    anchor: std::sync::Arc<std::sync::Mutex<Option<Anchor>>>,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    real: tokio::time::Instant,
    drifted: tokio::time::Instant,
    rate: f64,
}

impl Monotonic {
    /// The clock of the process keeping its data under `dir`.
    pub fn of(dir: &std::path::Path) -> Self {
        Self {
            dir: Some(dir.to_path_buf()),
            anchor: Default::default(),
        }
    }

    pub fn now(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        match &self.dir {
            Some(dir) if crate::simulation::active() => {
                self.drifted(now, crate::simulation::clock_rate(dir))
            }
            _ => now,
        }
    }

    /// `now` by a clock that ran at each rate it was given since it was first read, and runs
    /// at `rate` from now on: never backwards, whatever the rates.
    fn drifted(&self, now: tokio::time::Instant, rate: f64) -> tokio::time::Instant {
        let mut anchor = self
            .anchor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let at = anchor.get_or_insert(Anchor {
            real: now,
            drifted: now,
            rate,
        });
        let drifted = at.drifted + now.saturating_duration_since(at.real).mul_f64(at.rate);
        if at.rate != rate {
            *at = Anchor {
                real: now,
                drifted,
                rate,
            };
        }
        drifted
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_drifting_clock_runs_at_each_rate_in_turn_and_never_backwards() {
        let clock = Monotonic::of(Path::new("/sim/cell"));
        let start = Instant::now();
        assert_eq!(clock.drifted(start, 1.0), start);
        // The rate is seen to change a second later: that second ran at the old one.
        let at = clock.drifted(start + SECOND, 0.9);
        assert_eq!(at - start, SECOND);
        let slow = clock.drifted(start + 2 * SECOND, 1.1);
        assert_eq!(slow - at, Duration::from_millis(900));
        let fast = clock.drifted(start + 3 * SECOND, 1.1);
        assert_eq!(fast - slow, Duration::from_millis(1100));
        // An instant from before the rate last changed reads as that moment, not earlier.
        assert_eq!(clock.drifted(start + 2 * SECOND, 1.1), slow);
    }

    #[test]
    fn in_a_simulation_a_process_clock_runs_at_its_hosts_rate() {
        std::thread::spawn(|| {
            crate::simulation::enter_on_this_thread();
            crate::simulation::set_clock_rate(Path::new("/sim/host"), 0.5);
            let (drifting, steady) = (
                Monotonic::of(Path::new("/sim/host/cell")),
                Monotonic::of(Path::new("/sim/other/cell")),
            );
            let before = Instant::now();
            let (first, other_first) = (drifting.now(), steady.now());
            std::thread::sleep(Duration::from_millis(100));
            let (second, other_second) = (drifting.now(), steady.now());
            let real = Instant::now() - before;
            let drifted = second - first;
            assert!(drifted >= Duration::from_millis(50), "{drifted:?}");
            assert!(
                drifted <= real.mul_f64(0.5) + Duration::from_micros(1),
                "{drifted:?} in {real:?}"
            );
            assert!(other_second - other_first >= Duration::from_millis(100));
        })
        .join()
        .expect("the test's thread");
    }

    #[test]
    fn outside_a_simulation_the_clock_is_tokios() {
        crate::simulation::set_clock_rate(Path::new("/sim"), 0.5);
        let clock = Monotonic::of(Path::new("/sim/cell"));
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let now = clock.now();
        assert!(
            now - before >= Duration::from_millis(20),
            "{:?}",
            now - before
        );
    }
}
