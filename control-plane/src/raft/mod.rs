//! openraft glue: the type configuration, the durable log store, the state machine with its
//! snapshots, and the gRPC network between nodes. Each is its own module, as openraft splits them
//! into separate traits.

pub mod codec;
pub mod disk_wait;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod proposer;
pub mod read_index;
pub mod runtime;
mod simulated_disk;
pub mod snapshot;
pub mod state_machine;
#[cfg(test)]
mod storage_suite;
pub mod touch;
pub mod transport;

use crate::state::command::{Applied, CommandBatch};

openraft::declare_raft_types!(
    /// The control plane's Raft types: commands in, command results out, nodes addressed by
    /// their gRPC address, snapshots as files on disk.
    pub TypeConfig:
        D = CommandBatch,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = runtime::Runtime,
);

/// A running Raft node of the control plane.
pub type Raft = openraft::Raft<TypeConfig>;

/// Node ids are small integers chosen by the operator (`--node-id`).
pub type NodeId = u64;
