//! Where the routing state is kept. The Routing and Control services speak to a
//! [`RouteStore`]; two implement it:
//!
//! - [`raft`]: the embedded Raft cluster (openraft, redb log, snapshot files): the default;
//! - [`etcd`]: records under one prefix of an etcd cluster, each write one transaction that
//!   compares the `mod_revision` of everything it decided on, and a mirror fed by an etcd watch.
//!
//! Both run the same deterministic [`ControlState::apply`](crate::state::ControlState::apply),
//! answer reads from a local [`view::SharedState`], and mean the same by a revision: it grows by
//! one or more with every write, a watch from revision R sees every route change after R - 1,
//! and a compacted revision is answered with OUT_OF_RANGE.

pub mod etcd;
pub mod raft;
pub mod view;

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use tonic::transport::Channel;

use crate::state::command::{Command, CommandError, CommandOutput};
use view::SharedState;

/// Why a store did not apply a command or answer a read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The command was refused by the rules; nothing changed.
    #[error(transparent)]
    Refused(#[from] CommandError),
    /// The store cannot be reached or has no quorum; the caller may retry. A write that timed
    /// out may still apply.
    #[error("{0}")]
    Unavailable(String),
    /// The store holds something this build cannot read.
    #[error("{0}")]
    Corrupt(String),
}

/// Where a command or a linearizable read was carried out.
#[derive(Debug)]
pub enum Routed<T> {
    /// Here, with this outcome.
    Here(T),
    /// Not here: another node must serve the request (the Raft leader); re-send it there.
    Forward(Channel),
}

/// A store of the control plane's state.
#[tonic::async_trait]
pub trait RouteStore: Send + Sync {
    /// Applies one command atomically against the newest state. `forwarded` says the request
    /// was already forwarded once, so it must not be forwarded again.
    async fn execute(
        &self,
        command: Command,
        forwarded: bool,
    ) -> Result<Routed<CommandOutput>, StoreError>;

    /// Waits until [`view`](Self::view) holds every write acknowledged before the call.
    async fn linearize(&self, forwarded: bool) -> Result<Routed<()>, StoreError>;

    /// The state this node answers from.
    fn view(&self) -> &Arc<SharedState>;

    /// Why this node's state may have fallen behind the cluster's for good, while it may
    /// have: it has been cut off from whatever decides (the Raft leader, etcd) for longer than
    /// an election takes. Route watches and listings end then, so that clients move to a node
    /// that is in touch.
    fn out_of_touch(&self) -> Option<String>;

    /// Whether this node should drive unfinished migrations now. Every drive is a
    /// compare-and-set, so two drivers are safe; one is cheaper.
    fn drives_migrations(&self) -> bool;

    /// The store's health and position, for `ClusterStatus`.
    async fn status(&self) -> Result<pb::ClusterStatusResponse, StoreError>;

    /// Adds or removes a control-plane node (on the leader; others forward), answering the
    /// members after the change.
    async fn change_membership(
        &self,
        change: crate::raft::membership::Change,
        forwarded: bool,
    ) -> Result<Routed<Vec<pb::Member>>, StoreError>;

    /// Stops background work; the store answers nothing afterwards.
    async fn shutdown(&self);
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Refused(refusal) => crate::control::status::command_error(refusal),
            StoreError::Unavailable(message) => tonic::Status::unavailable(message),
            StoreError::Corrupt(message) => tonic::Status::internal(message),
        }
    }
}
