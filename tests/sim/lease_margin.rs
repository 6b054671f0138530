//! A cell's lease is measured on two clocks: the cell's, from a ticket it took before its
//! agent asked for the renewal, and the node's, from when it first saw the renewal. The node
//! fails the cell over only once `lease_ms + clock_drift_ms` has passed on its own clock, so
//! that the lease has surely run out on the cell's however the two clocks' rates differ,
//! within the 10% that the margin covers here. Without the margin a node whose clock runs fast
//! fails the cell while a cell whose clock runs slow still writes, and a writer that still
//! reaches the old primary is accepted there after the promoted standby took over.
//!
//! The scenario puts the clocks at the far ends the nemesis draws from: every node's 4% fast,
//! the primary's host's 4% slow (8.3% apart). The lease is 20 s with a 2 s margin: the margin
//! is a tenth of the lease, as by default, and the window it closes (1.6 s) is longer than a
//! forced failover takes, which with the default 2 s lease (a 160 ms window) it is not. The
//! primary's host (its agent and its cell) is cut off from the nodes while writers that
//! follow the routes and stale writers cut off from every node send to its tenant, each stale
//! send given up after 100 ms; the control plane fails the primary over on its own. No key
//! may have had two writers, and every acknowledged message must be in its history.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{FailoverMode, FailoverPhase, Tier};
use cellplane_api::simulation;
use cellplane_control_plane::config::NodeConfig;
use tokio::time::Instant;

use crate::failover::{self, Standby};
use crate::scenario::{self, Change, Changes, ask};
use crate::workload::{self, Acked};
use crate::world::{self, agent_host, host, nodes};

const TENANT: [&str; 1] = ["acme"];
/// Conversations of the tenant, each with a writer of each kind: the stale writers between
/// them reach the primary every 30 ms or so.
const GROUPS: usize = 4;
const LEASE_MS: u64 = 20_000;
const CLOCK_DRIFT_MS: u64 = 2_000;
const NODE_CLOCK_RATE: f64 = 1.04;
const PRIMARY_CLOCK_RATE: f64 = 0.96;
const STALE_WRITER: &str = "stale-writer";
/// How long both kinds of writers send: past the failover, which comes a lease after the cut.
const WRITE_FOR: Duration = Duration::from_secs(45);
/// How long after the cut the primary's host reaches the nodes again: past the failover.
const CUT_FOR: Duration = Duration::from_secs(28);

fn lease(config: &mut NodeConfig) {
    config.failover.lease_ms = LEASE_MS;
    config.failover.clock_drift_ms = CLOCK_DRIFT_MS;
}

/// Every node's clock runs fast and the primary's host's slow, from the start.
fn drift(_: &mut turmoil::Sim<'_>, dir: &std::path::Path) {
    for id in 1..=nodes() {
        simulation::set_clock_rate(&dir.join(host(id)), NODE_CLOCK_RATE);
    }
    let primary_host = agent_host(failover::pair()[0].0);
    simulation::set_clock_rate(&dir.join(primary_host), PRIMARY_CLOCK_RATE);
}

/// What the clients saw.
struct Report {
    /// How long after the cut the keys moved to the standby, by the leader's wall clock.
    switched_after: Duration,
    /// Sends the stale writers had acknowledged by the old primary after the cut: it went on
    /// writing while its lease lasted.
    stale_after_cut: usize,
    /// From the old primary's last acknowledged send to the first its successor acknowledged:
    /// how much room the margin left.
    room: Duration,
    acknowledged: usize,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

async fn clients(changes: Changes, acked: Arc<Mutex<Acked>>) -> Result<Report, String> {
    let [(primary_region, primary), _] = failover::pair();
    workload::create_tenants(&TENANT, Tier::High, primary_region).await;
    let messenger = workload::messenger().await?;
    workload::create_groups(&messenger, &TENANT, GROUPS).await;
    scenario::cut_off_stale_writers(STALE_WRITER, &acked, &changes).await;
    let mut writers = tokio::task::JoinSet::new();
    let until = Instant::now() + WRITE_FOR;
    workload::spawn_writers(
        &mut writers,
        &messenger,
        (&TENANT, GROUPS),
        "w",
        until,
        &acked,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut_at = now();
    let cut_wall_ms = cellplane_api::clock::now_ms();
    for id in 1..=nodes() {
        ask(
            &changes,
            Change::Partition(agent_host(primary_region), host(id)),
        );
    }
    tokio::time::sleep(CUT_FOR).await;
    for id in 1..=nodes() {
        ask(
            &changes,
            Change::Repair(agent_host(primary_region), host(id)),
        );
    }
    while writers.join_next().await.is_some() {}
    let failovers = failover::ended(&|_: &str| {}).await;
    failover::pair_restored(&|_: &str| {}).await;
    let forced: Vec<_> = failovers
        .iter()
        .filter(|f| f.cell_id == primary && f.mode == FailoverMode::Forced as i32)
        .collect();
    let [forced] = forced.as_slice() else {
        return Err(format!(
            "one forced failover of {primary} expected, not {failovers:?}"
        ));
    };
    if forced.phase != FailoverPhase::Merged as i32 {
        return Err(format!("the failover did not merge: {forced:?}"));
    }

    let acked = acked.lock().expect("acked").clone();
    let behind = failover::behind(&failovers);
    workload::one_writer(&acked, &behind)?;
    workload::check_histories(&messenger, &acked, &behind).await?;
    let all = || acked.values().flatten();
    let last_of_old = all()
        .filter(|a| a.cell == primary)
        .map(|a| a.returned)
        .max()
        .unwrap_or_default();
    let first_of_new = all()
        .filter(|a| a.cell != primary)
        .map(|a| a.returned)
        .min()
        .unwrap_or_default();
    Ok(Report {
        room: first_of_new.saturating_sub(last_of_old),
        switched_after: Duration::from_millis(forced.switched_ms.saturating_sub(cut_wall_ms)),
        stale_after_cut: all()
            .filter(|a| a.id.contains("stale") && a.invoked > cut_at)
            .count(),
        acknowledged: all().count(),
    })
}

fn run(seed: u64) -> Report {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build_with(seed, dir.path(), Duration::from_secs(240), 3, lease);
    failover::add_pair(&mut sim, dir.path(), Standby::Asynchronous);
    let changes: Changes = Arc::default();
    ask(&changes, Change::Run(drift));
    let acked: Arc<Mutex<Acked>> = Arc::default();
    scenario::add_stale_writers(
        &mut sim,
        STALE_WRITER,
        (&TENANT, GROUPS),
        (
            Duration::from_millis(100),
            WRITE_FOR + Duration::from_secs(10),
        ),
        &acked,
    );
    let clients = clients(changes.clone(), acked);
    scenario::run(seed, sim, dir.path(), &changes, clients)
}

#[test]
fn a_cell_is_failed_over_only_once_its_lease_ran_out_on_a_slower_clock() {
    crate::seeds::for_each(
        "lease_margin::a_cell_is_failed_over_only_once_its_lease_ran_out_on_a_slower_clock",
        &[1, 2],
        |seed| {
            let report = run(seed);
            eprintln!(
                "seed {seed}: the keys moved {:.2} s after the cut; the old primary took {} \
                 stale sends after it, the last {} ms before its successor's first; {} sends \
                 acknowledged",
                report.switched_after.as_secs_f64(),
                report.stale_after_cut,
                report.room.as_millis(),
                report.acknowledged
            );
            // The stale writers must have reached the old primary while its lease lasted,
            // or the scenario could not show two writers.
            assert!(
                report.stale_after_cut > 0,
                "seed {seed}: no stale send reached the old primary after the cut"
            );
        },
    );
}
