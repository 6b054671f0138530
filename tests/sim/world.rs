//! The simulated world: three control-plane nodes, each a turmoil host running the
//! production node, with its data directory kept across crashes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellplane_control_plane::config::{NodeConfig, RaftTuning, StoreConfig};
use cellplane_control_plane::node;

use crate::net;

pub const NODES: u64 = 3;
pub const PORT: u16 = 9000;

pub fn host(id: u64) -> String {
    format!("n{id}")
}

pub fn endpoint(id: u64) -> String {
    format!("{}:{PORT}", host(id))
}

fn config(id: u64, data_dir: PathBuf) -> NodeConfig {
    NodeConfig {
        node_id: id,
        listen: ([0, 0, 0, 0], PORT).into(),
        data_dir,
        peers: (1..=NODES).map(|id| (id, endpoint(id))).collect(),
        store: StoreConfig::Raft,
        metrics_listen: None,
        raft: RaftTuning::default(),
        migration: Default::default(),
        failover: Default::default(),
        tls: None,
        auth: None,
        shutdown_grace_ms: NodeConfig::DEFAULT_SHUTDOWN_GRACE_MS,
        audit_entries: cellplane_control_plane::limits::DEFAULT_AUDIT_ENTRIES,
        limits: Default::default(),
    }
}

/// A simulation of `seed`, with the nodes' data under `dir`, running at most `limit` of
/// simulated time.
pub fn build<'a>(seed: u64, dir: &Path, limit: Duration) -> turmoil::Sim<'a> {
    // Election timeouts drawn from the seed, and the Raft log written inline.
    cellplane_control_plane::raft::runtime::simulate_on_this_thread(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(limit)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        // Connections waiting to be accepted: turmoil panics past it where a kernel would
        // drop the SYN, and clients retrying against a node that stalls can queue many.
        .tcp_capacity(4096)
        .build();
    for id in 1..=NODES {
        let config = config(id, dir.join(host(id)));
        sim.host(host(id), move || {
            let config = config.clone();
            async move {
                let listener = net::listen(PORT).await?;
                node::serve_with(config, net::tls(), listener, std::future::pending()).await?;
                Ok(())
            }
        });
    }
    sim
}
