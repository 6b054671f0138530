//! Standby cells: a primary streams its cell log to the standbys that pull it
//! ([`primary`]); a standby follows its primary's log, bootstrapping from a snapshot of the
//! whole cell when it has nothing or fell behind what the primary keeps ([`standby`]).
//! [`ReplicationState`] is what both sides know for status and metrics.

pub mod gate;
pub mod primary;
pub mod role;
pub mod standby;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use cellplane_api::proto::cell as pb;

use gate::SyncGate;

/// Commits remembered for measuring standbys' lag in time.
const COMMITS_REMEMBERED: usize = 100_000;

/// A standby as its primary sees it.
#[derive(Debug, Clone, Default)]
struct Follower {
    acked_lsn: u64,
    connected: bool,
    bootstraps: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// On a primary: the standbys that follow it.
    followers: BTreeMap<String, Follower>,
    /// On a primary: recent commits, (LSN, when it became durable), oldest first.
    commits: VecDeque<(u64, Instant)>,
    /// On a standby: where it stands.
    replica: pb::ReplicaStatus,
}

/// What this cell knows of replication, shared by the services; cheap to clone.
#[derive(Clone)]
pub struct ReplicationState {
    inner: Arc<Mutex<Inner>>,
    /// Told every acknowledgement, so synchronous answers go once the standbys have them.
    gate: SyncGate,
}

impl ReplicationState {
    pub fn new(gate: SyncGate) -> Self {
        Self {
            inner: Arc::default(),
            gate,
        }
    }

    pub fn gate(&self) -> &SyncGate {
        &self.gate
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A primary's commit became durable at `lsn`.
    pub fn committed(&self, lsn: u64, at: Instant) {
        let mut inner = self.lock();
        inner.commits.push_back((lsn, at));
        while inner.commits.len() > COMMITS_REMEMBERED {
            inner.commits.pop_front();
        }
    }

    fn follower_connected(&self, standby: &str, acked_lsn: u64) {
        {
            let mut inner = self.lock();
            let follower = inner.followers.entry(standby.to_string()).or_default();
            follower.connected = true;
            follower.acked_lsn = acked_lsn;
        }
        // What it applied before it connected is durable there.
        self.gate.acked(standby, acked_lsn);
    }

    fn follower_bootstraps(&self, standby: &str) {
        let mut inner = self.lock();
        inner
            .followers
            .entry(standby.to_string())
            .or_default()
            .bootstraps += 1;
        metrics::counter!("cellplane_cell_standby_bootstraps_total", "standby" => standby.to_string())
            .increment(1);
    }

    fn follower_acked(&self, standby: &str, lsn: u64) {
        {
            let mut inner = self.lock();
            let follower = inner.followers.entry(standby.to_string()).or_default();
            follower.acked_lsn = follower.acked_lsn.max(lsn);
        }
        self.gate.acked(standby, lsn);
    }

    fn follower_gone(&self, standby: &str) {
        if let Some(follower) = self.lock().followers.get_mut(standby) {
            follower.connected = false;
        }
    }

    /// Each standby of this primary, with its lag behind `durable_lsn` in LSNs and in time.
    pub fn standbys(&self, durable_lsn: u64, now: Instant) -> Vec<pb::StandbyStatus> {
        let inner = self.lock();
        inner
            .followers
            .iter()
            .map(|(cell_id, follower)| {
                let lag_lsns = durable_lsn.saturating_sub(follower.acked_lsn);
                // The first remembered commit past what the standby has: it has been waiting
                // at least since then.
                let lag = if lag_lsns == 0 {
                    Duration::ZERO
                } else {
                    // Commits are in LSN order: a binary search, not a scan of 100,000.
                    let first = inner
                        .commits
                        .partition_point(|(lsn, _)| *lsn <= follower.acked_lsn);
                    inner
                        .commits
                        .get(first)
                        .map(|(_, at)| now.saturating_duration_since(*at))
                        .unwrap_or_default()
                };
                let status = pb::StandbyStatus {
                    cell_id: cell_id.clone(),
                    acked_lsn: follower.acked_lsn,
                    lag_lsns,
                    lag_ms: lag.as_millis() as u64,
                    connected: follower.connected,
                    bootstraps: follower.bootstraps,
                };
                metrics::gauge!("cellplane_cell_standby_lag_lsns", "standby" => cell_id.clone())
                    .set(lag_lsns as f64);
                metrics::gauge!("cellplane_cell_standby_lag_seconds", "standby" => cell_id.clone())
                    .set(lag.as_secs_f64());
                status
            })
            .collect()
    }

    /// On a standby: where it stands.
    pub fn replica(&self) -> pb::ReplicaStatus {
        self.lock().replica
    }

    fn update_replica(&self, change: impl FnOnce(&mut pb::ReplicaStatus)) {
        let mut inner = self.lock();
        change(&mut inner.replica);
        let replica = &inner.replica;
        metrics::gauge!("cellplane_cell_replica_applied_lsn").set(replica.applied_lsn as f64);
        metrics::gauge!("cellplane_cell_replica_lag_lsns")
            .set(replica.primary_lsn.saturating_sub(replica.applied_lsn) as f64);
        metrics::gauge!("cellplane_cell_replica_bootstrapping").set(if replica.bootstrapping {
            1.0
        } else {
            0.0
        });
    }
}
