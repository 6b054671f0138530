//! The state a node answers from, whichever store keeps it: the Raft replica's applied state,
//! or the etcd mirror's copy of the records. One writer (the state machine or the mirror)
//! changes it under a lock held only for an apply; readers take the lock for a query.

use std::sync::{Arc, RwLock};

use imbl::OrdMap;
use openraft::{BasicNode, LogId, StoredMembership};
use tokio::sync::broadcast;

use crate::raft::NodeId;
use crate::state::ControlState;
use crate::state::history::RouteEvent;
use crate::state::records::RecordKey;

/// How many watch signals a slow watcher may fall behind before it re-reads the history.
const WATCH_CHANNEL_CAPACITY: usize = 4096;

/// The route events of one revision.
#[derive(Debug)]
pub struct WatchBatch {
    pub revision: u64,
    pub events: Vec<RouteEvent>,
}

/// What watchers are told after each change.
#[derive(Debug, Clone)]
pub enum WatchSignal {
    Batch(Arc<WatchBatch>),
    /// The state jumped (a snapshot was installed, the mirror reloaded): re-read the history
    /// from where you were.
    Reset,
}

/// The control state and its store's bookkeeping, replaced together.
#[derive(Debug, Clone, Default)]
pub struct MachineState {
    /// Raft: the last applied log id and the membership, saved with every snapshot.
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// etcd: the `mod_revision` of every record, so a write can compare exactly what it decided
    /// on. Empty on Raft.
    pub mod_revisions: OrdMap<RecordKey, u64>,
    pub control: ControlState,
}

/// The state shared between its one writer and the services.
#[derive(Debug)]
pub struct SharedState {
    pub(crate) machine: RwLock<MachineState>,
    pub(crate) watch_tx: broadcast::Sender<WatchSignal>,
}

impl SharedState {
    /// A view starting from `machine`, with no watchers yet.
    pub fn new(machine: MachineState) -> Self {
        let (watch_tx, _) = broadcast::channel(WATCH_CHANNEL_CAPACITY);
        Self {
            machine: RwLock::new(machine),
            watch_tx,
        }
    }

    /// Reads the state under the lock; keep `read` short.
    pub fn read<T>(&self, read: impl FnOnce(&ControlState) -> T) -> T {
        let machine = self
            .machine
            .read()
            .expect("state lock poisoned: an apply panicked");
        read(&machine.control)
    }

    /// Subscribes to route events and reads the state at the same instant, so every event is
    /// either in what `read` saw or comes through the receiver, never both or neither.
    pub fn subscribe<T>(
        &self,
        read: impl FnOnce(&ControlState) -> T,
    ) -> (broadcast::Receiver<WatchSignal>, T) {
        let machine = self
            .machine
            .read()
            .expect("state lock poisoned: an apply panicked");
        (self.watch_tx.subscribe(), read(&machine.control))
    }

    /// A point-in-time copy of everything (O(1): the maps are persistent).
    pub fn snapshot(&self) -> MachineState {
        self.machine
            .read()
            .expect("state lock poisoned: an apply panicked")
            .clone()
    }

    /// Changes the state under the write lock: for the store's one writer.
    pub(crate) fn write<T>(&self, write: impl FnOnce(&mut MachineState) -> T) -> T {
        let mut machine = self
            .machine
            .write()
            .expect("state lock poisoned: an apply panicked");
        write(&mut machine)
    }

    /// Tells watchers what changed; having none is normal.
    pub(crate) fn publish(&self, signal: WatchSignal) {
        let _ = self.watch_tx.send(signal);
    }
}
