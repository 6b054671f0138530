//! Whether a node is in touch with a leader. A node cut off from the others but not from its
//! clients goes on answering reads from its own state, which no longer moves: a route watch
//! through it would stay open and say nothing, and an agent reloading its routes from it would
//! grant what moved away long ago. Once it has heard from no leader for a while, its watches
//! and route listings end, so that clients go to a node that is in touch (etcd's
//! require-leader). Lookups go on: a SERIALIZABLE one asked for a possibly stale answer.
//!
//! A node whose disk stalls is behind in the same way while it still hears from its leader:
//! it can acknowledge, and so apply, nothing its log has not written. It is out of touch once
//! its log's oldest unwritten job has waited longer than the same grace ([`DiskWait`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::metrics::RaftMetrics;
use tokio::sync::watch;
use tokio::time::Instant;

use super::disk_wait::DiskWait;
use super::{NodeId, Raft};

/// How long a node has heard from no leader: a leader counts from the last moment a quorum
/// acknowledged it (`millis_since_quorum_ack`), anyone else from the moment it lost its leader
/// (`leaderless_for`, `None` while it has one).
pub fn silent_for(
    leads: bool,
    millis_since_quorum_ack: Option<u64>,
    leaderless_for: Option<Duration>,
) -> Duration {
    if leads {
        Duration::from_millis(millis_since_quorum_ack.unwrap_or(0))
    } else {
        leaderless_for.unwrap_or_default()
    }
}

/// Follows a node's Raft metrics to know since when it has had no leader.
pub struct Touch {
    id: NodeId,
    metrics: watch::Receiver<RaftMetrics<NodeId, BasicNode>>,
    leaderless_since: Arc<Mutex<Option<Instant>>>,
    disk_wait: DiskWait,
    /// Silence, or a wait for the disk, past which the node is out of touch: three election
    /// timeouts, so that an ordinary election after a leader's crash (one timeout and a vote)
    /// ends no watch.
    grace: Duration,
}

impl Touch {
    /// Starts following `raft`'s metrics (until it shuts down) and its log's `disk_wait`.
    pub fn follow(
        raft: &Raft,
        id: NodeId,
        election_timeout_max: Duration,
        disk_wait: DiskWait,
    ) -> Self {
        let leaderless_since = Arc::new(Mutex::new(None));
        tokio::spawn(track(raft.metrics(), leaderless_since.clone()));
        Self {
            id,
            metrics: raft.metrics(),
            leaderless_since,
            disk_wait,
            grace: election_timeout_max * 3,
        }
    }

    /// Why the node's state may be behind for good, when it has heard from no leader, or its
    /// log has waited for its disk, for longer than the grace; `None` while it is in touch.
    pub fn out_of_touch(&self) -> Option<String> {
        let waited = self.disk_wait.waited(Instant::now());
        if waited > self.grace {
            return Some(format!(
                "node {}'s Raft log has waited {:.1} s for its disk (more than {:.1} s), so its routes may be behind",
                self.id,
                waited.as_secs_f64(),
                self.grace.as_secs_f64()
            ));
        }
        let (leads, acked) = {
            let metrics = self.metrics.borrow();
            (
                metrics.current_leader == Some(self.id),
                metrics.millis_since_quorum_ack,
            )
        };
        let leaderless_for = self
            .leaderless_since
            .lock()
            .expect("leader tracking poisoned")
            .map(|since| since.elapsed());
        let silent = silent_for(leads, acked, leaderless_for);
        (silent > self.grace).then(|| {
            format!(
                "node {} has heard from no leader for {:.1} s (more than {:.1} s), so its routes may be behind",
                self.id,
                silent.as_secs_f64(),
                self.grace.as_secs_f64()
            )
        })
    }
}

/// Notes when the node loses its leader and forgets it when it has one again.
async fn track(
    mut metrics: watch::Receiver<RaftMetrics<NodeId, BasicNode>>,
    leaderless_since: Arc<Mutex<Option<Instant>>>,
) {
    loop {
        let leaderless = metrics.borrow_and_update().current_leader.is_none();
        {
            let mut since = leaderless_since.lock().expect("leader tracking poisoned");
            match (leaderless, *since) {
                (true, None) => *since = Some(Instant::now()),
                (false, Some(_)) => *since = None,
                _ => {}
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_counts_from_its_last_quorum_and_others_from_losing_their_leader() {
        let second = Duration::from_secs(1);
        assert_eq!(silent_for(true, Some(1_500), None), second * 3 / 2);
        // Its own word counts for a leader: a follower's tracking is not looked at.
        assert_eq!(
            silent_for(true, Some(20), Some(second * 9)),
            Duration::from_millis(20)
        );
        assert_eq!(silent_for(true, None, None), Duration::ZERO);
        assert_eq!(silent_for(false, Some(1_500), None), Duration::ZERO);
        assert_eq!(silent_for(false, None, Some(second * 4)), second * 4);
    }
}
