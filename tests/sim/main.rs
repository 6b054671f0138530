//! The deterministic simulation: control-plane nodes, and the clients that use them, in one
//! process on turmoil's simulated network and clock, with a seeded nemesis that crashes and
//! restarts nodes, partitions them (both ways and one way), and holds, delays and reorders
//! their messages. The servers are the production ones (`node::serve_with` over
//! `cellplane_api::net`), Raft is the production openraft with its redb log, and only the
//! network, the clock and the election timeouts' generator are the simulation's.
//!
//! A seed decides everything: the faults, their timing, every message's latency. A failure
//! prints its seed, and `SIM_SEED=<seed> cargo test -p cellplane-tests --test sim` replays it
//! exactly; `SIM_SEEDS=<n>` runs n random seeds instead of the fixed ones (`scripts/soak.sh`).

mod catch_up;
mod cut_off;
mod failover;
mod late_grant;
mod lease_margin;
mod messages;
mod nemesis;
mod net;
mod one_cut;
mod routes;
mod scenario;
mod seeds;
mod stalled_node;
mod workload;
mod world;
