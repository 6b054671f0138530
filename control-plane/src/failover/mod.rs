//! Leases, failure detection and failover (DESIGN §9).
//!
//! Every cell holds a lease its agent renews through the control plane ([`record::LeaseRecord`]
//! counts the renewals in the replicated state). The detector ([`detect`]) is pure: from when
//! this node saw each cell's newest renewal, it tells a cell suspected (renewals missed) from
//! failed (its lease has surely run out on the cell, clock drift included). A failover is a
//! record ([`record::FailoverRecord`]) moved through its phases by compare-and-set commands,
//! like a migration: FENCING (no more renewals; waiting out the lease) → PROMOTING (every key
//! moved to the standby at epoch + 1, in one command) → DONE (the standby's agent promoted
//! it). The leader's [`driver`] runs the detector and the waits; the agent does the promotion.

pub mod detect;
pub mod driver;
pub mod record;
