//! The audit log: every admin call — who, what, when, and what it answered — kept in the
//! replicated state, the refused calls included.
//!
//! - [`entry`]: an entry as the state keeps it, and how a request becomes its text;
//! - [`layer`]: the tower layer that sees each call before the role check and its answer
//!   after, so a call refused for its role is recorded like any other;
//! - [`writer`]: batches the entries of concurrent calls into one write, on the leader or
//!   through it.
//!
//! An entry is queued as its call answers and written with the next write, milliseconds later:
//! the answer does not wait for it. A write that fails is logged and counted in
//! `cellplane_audit_lost_total`; a node that dies with entries queued loses them (the calls of
//! its last moments may have taken effect without an entry).

pub mod entry;
pub mod layer;
pub mod writer;
