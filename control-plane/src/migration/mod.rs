//! The migration coordinator (DESIGN §7): moving a route key, history first, then the route.
//!
//! A migration is a record in the replicated state ([`record`]); every change to it is a Raft
//! command that compares its phase first. What to do next is decided by the pure [`step`]
//! function; the leader's [`driver`] feeds it the passage of time, and the Control service
//! feeds it the reports of the cell agent that carries the copy out. Nothing lives only in the
//! leader's memory, so a new leader, or a whole cluster restarted, goes on where the last
//! stopped.

pub mod driver;
pub mod record;
pub mod step;
