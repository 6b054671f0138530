//! How long sync events are kept. A device more than the rebase threshold behind its user's
//! newest pts is sent one REBASE instead of the events, so events further back are read by
//! nobody; without a bound every user's queue would grow by one row per event forever. They are
//! dropped by a compaction filter, in the background and without a write of their own: an
//! event at least `kept` behind its user's newest does not survive the next compaction of its
//! table. The newest event of a queue always stays: its key is the user's newest pts.
//!
//! A reader can still race a compaction; it checks that the events it reads start right after
//! its cursor and sends a REBASE when they do not (`sync::DeviceStream`).

use std::sync::{Arc, RwLock};

use fjall::Keyspace;
use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};

use super::keys;

/// The sync keyspace as the filters read it, for each user's newest pts: set once the
/// database is open (compactions before that keep everything), and let go of when the store
/// closes. The database's config holds the filters' factory, and every keyspace holds the
/// database, so a keyspace kept here for good would keep the database — its files, its lock
/// and its threads — alive after its last handle is gone.
#[derive(Default)]
pub struct Queues(RwLock<Option<Keyspace>>);

impl Queues {
    pub fn set(&self, queues: Keyspace) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(queues);
        }
    }

    /// Lets the keyspace go: compactions from now on keep everything.
    pub fn close(&self) {
        if let Ok(mut slot) = self.0.write() {
            *slot = None;
        }
    }

    fn get(&self) -> Option<Keyspace> {
        self.0.read().ok().and_then(|slot| slot.clone())
    }
}

/// Makes the filter for each compaction of the sync keyspace.
pub struct SyncRetention {
    /// Events kept behind each user's head (at least 1: the newest).
    kept: u64,
    queues: Arc<Queues>,
}

impl SyncRetention {
    pub fn new(kept: u64, queues: Arc<Queues>) -> Self {
        Self {
            kept: kept.max(1),
            queues,
        }
    }
}

impl Factory for SyncRetention {
    fn name(&self) -> &str {
        "sync-retention"
    }

    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        Box::new(Filter {
            kept: self.kept,
            queues: self.queues.get(),
            user: Vec::new(),
            head: 0,
        })
    }
}

/// One compaction's filter. Keys come in order, so a user's events are together: the head is
/// read once per user.
struct Filter {
    kept: u64,
    queues: Option<Keyspace>,
    /// The user key (`tenant\0user\0`) whose head is `head`.
    user: Vec<u8>,
    head: u64,
}

impl Filter {
    /// The newest pts of the user whose key is `user`; 0 when unknown (everything is kept).
    fn head_of(&mut self, user: &[u8]) -> u64 {
        if self.user != user {
            self.user = user.to_vec();
            self.head = self
                .queues
                .as_ref()
                .and_then(|queues| super::newest_pts(queues, user).ok())
                .unwrap_or(0);
        }
        self.head
    }
}

impl CompactionFilter for Filter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _: &Context) -> CompactionFilterResult {
        let key: &[u8] = item.key();
        let user = key.len().checked_sub(8).and_then(|end| key.get(..end));
        let (Some(pts), Some(user)) = (keys::trailing_num(key), user) else {
            return Ok(Verdict::Keep);
        };
        if pts.saturating_add(self.kept) <= self.head_of(user) {
            Ok(Verdict::Remove)
        } else {
            Ok(Verdict::Keep)
        }
    }
}
