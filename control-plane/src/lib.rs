//! The cellplane control plane: a replicated map from conversations to the cells that own them,
//! served over gRPC.
//!
//! - [`state`]: the replicated state and the deterministic apply of commands (no I/O);
//! - [`placement`]: the pure choice of a cell for a tenant;
//! - [`migration`], [`drain`], [`failover`]: moving keys: one at a time, a cell's all by
//!   migrations, or a failed cell's all at once to its standby;
//! - [`store`]: where the state is kept, behind one trait: the embedded Raft cluster or etcd;
//! - [`raft`]: openraft's log store, state machine, snapshots and network;
//! - [`routing`] and [`control`]: the public gRPC services;
//! - [`audit`]: the log of admin calls, kept in the replicated state;
//! - [`node`]: one control-plane node, `serve(listener, shutdown)`;
//! - [`operator`]: the Kubernetes operator, reconciling cellplane resources against the Control API;
//! - [`config`]: what a node is told to be, validated once.

pub mod audit;
pub mod config;
pub mod control;
pub mod ctl;
pub mod dev;
pub mod drain;
pub mod failover;
pub mod limits;
pub mod migration;
pub mod node;
pub mod operator;
pub mod placement;
pub mod raft;
pub mod routing;
pub mod state;
pub mod store;
