//! The whole system in real processes: a control-plane cluster, cell agents running IM cells,
//! and writers that follow routes through migrations.

mod agent;
mod cancel;
mod cellctl;
mod crash;
mod demo;
mod drain;
mod failover;
mod failpoints;
mod fallback;
mod grpcurl;
mod migration;
mod processes;
mod standby;
mod tls;

pub use cellplane_tests::system::{System, phase_name};
