//! The cell agent: one per region. It runs the region's IM cells as child processes, registers
//! them with the control plane, reports their health, keeps their grants equal to the routes,
//! and carries out the migrations that target them.
//!
//! The agent holds no state of its own: what its cells own is in the routes, what they must do
//! is in the migrations, and both are in the control plane. A restarted agent reloads both and
//! repairs whatever it finds half done.

pub mod agent;
pub mod cells;
pub mod config;
pub mod failover;
pub mod grants;
pub mod lease;
pub mod merge;
pub mod migrate;
pub mod protection;
pub mod roles;
pub mod supervisor;
