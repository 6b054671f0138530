//! The audit log: every admin call — who, what, when, and what it answered — kept in the
//! replicated state, the refused calls included.
//!
//! - [`entry`]: an entry as the state keeps it, and how a request becomes its text;
//! - [`layer`]: the tower layer that sees each call before the role check and its answer
//!   after, so a call refused for its role is recorded like any other;
//! - [`writer`]: batches the entries of concurrent calls into one write, on the leader or
//!   through it.
//!
//! An entry is written after its call answered and before the answer is sent: a call whose
//! answer reached the caller is in the log, unless the write failed (which the node logs and
//! counts in `cellplane_audit_lost_total`). A call whose node died before its entry committed
//! may have taken effect without one.

pub mod entry;
pub mod layer;
pub mod writer;
