//! How long the Raft log's oldest unwritten job has waited for the disk. A node whose disk
//! stalls still hears from its leader (heartbeats carry no entries to write), so it is not
//! silent, yet it acknowledges and applies nothing new: its state falls behind while it looks
//! in touch. `Touch` counts such a node out of touch once the wait passes its grace.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// When each job still waiting for the log's writer was queued, oldest first: the writer takes
/// jobs in the order they were queued, so the front is the one waiting longest. Clones share it.
#[derive(Clone, Default)]
pub struct DiskWait(Arc<Mutex<VecDeque<Instant>>>);

impl DiskWait {
    /// A job was queued for the writer at `now`.
    pub fn queued(&self, now: Instant) {
        if let Ok(mut queued) = self.0.lock() {
            queued.push_back(now);
        }
    }

    /// The writer finished (wrote, or failed to write) the `jobs` oldest queued jobs.
    pub fn written(&self, jobs: usize) {
        if let Ok(mut queued) = self.0.lock() {
            let jobs = jobs.min(queued.len());
            queued.drain(..jobs);
        }
    }

    /// How long the oldest unwritten job has waited at `now`; zero when none waits.
    pub fn waited(&self, now: Instant) -> Duration {
        self.0
            .lock()
            .ok()
            .and_then(|queued| {
                queued
                    .front()
                    .map(|since| now.saturating_duration_since(*since))
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_that_of_the_oldest_job_not_yet_written() {
        let wait = DiskWait::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(wait.waited(at(5_000)), Duration::ZERO);
        wait.queued(at(0));
        wait.queued(at(100));
        wait.queued(at(200));
        assert_eq!(wait.waited(at(300)), Duration::from_millis(300));
        // A batch of the two oldest written: the third has waited since it was queued.
        wait.written(2);
        assert_eq!(wait.waited(at(300)), Duration::from_millis(100));
        // A steady flow of writes never waits long, however long the queue was never empty.
        for ms in (400..10_000).step_by(100) {
            wait.queued(at(ms));
            wait.written(1);
            assert!(wait.waited(at(ms)) <= Duration::from_millis(200));
        }
        wait.written(5);
        assert_eq!(wait.waited(at(20_000)), Duration::ZERO);
    }
}
