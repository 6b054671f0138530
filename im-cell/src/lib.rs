//! An IM cell: a complete IM server for the conversations the control plane granted it.
//!
//! - [`store`]: the fjall store, its keys and records, and the group-committing [`store::writer`];
//! - [`messaging`], [`sync`], [`admin`]: the gRPC services;
//! - [`pns`]: offline notifications to a webhook;
//! - [`replication`]: standbys that follow a primary's cell log, and their promotion;
//! - [`lease`]: the lease from the control plane the cell writes under;
//! - [`server`]: `serve(config, listener, shutdown)`.
//!
//! The cell knows nothing of the control plane: it obeys grants, revocations and freezes sent to
//! its admin API, and checks the route epoch of every write itself.

pub mod access;
pub mod admin;
pub mod config;
pub mod error;
pub mod lease;
pub mod limits;
pub mod messaging;
pub mod pns;
pub mod rate;
pub mod receipts;
pub mod replication;
pub mod server;
pub mod store;
pub mod sync;
