//! Failovers under the nemesis: a HIGH primary in region `hz` with its standby in region
//! `fs`, each run by its region's agent on a host of its own, beside the three nodes. Writers
//! send to HIGH tenants placed on the primary, beside lagging writers whose route cache the
//! nemesis cuts off from the nodes (`workload`); ops fail the current primary over, planned,
//! every few seconds; the nemesis crashes and cuts off agents (their cells with them) and
//! nodes, so the control plane also fails primaries over on its own when their leases run
//! out. After the heal every failover must have ended, the pair must be a primary and its
//! ACTIVE standby again, and the messages pass `workload`'s checks: none lost or doubled, at
//! the seq acknowledged (what a standby not in sync lacked comes back by merge-back, at a new
//! seq), and one writer per key throughout.
//!
//! Three runs of it: a synchronous standby that the primary waits for longer than any run,
//! so every failover is from a standby in sync and loses nothing; one it waits for 500 ms
//! before it asks to go on alone; and an asynchronous one. With the last two a failover may
//! promote a standby that lacks what the primary acknowledged, and only the primary's lease
//! keeps it from writing on once its successor took over: a lagging writer still sending to
//! it is what the one-writer check would catch.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{
    CellState, Failover, FailoverCellRequest, FailoverMode, FailoverPhase, GetTenantRequest,
    ListCellsRequest, ListFailoversRequest, Tier,
};

use crate::workload::{self, Acked};
use crate::world::{self, Progress, nodes};

const TENANTS: [&str; 2] = ["acme", "globex"];
const GROUPS: usize = 2;
const RUN_FOR: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a primary waits for its synchronous standby before it asks to go on without it:
/// longer than any run, so a standby in sync has every acknowledged message.
const WAITS_FOR_ITS_STANDBY: u64 = 600_000;
/// Soon enough that primaries go on alone in some runs.
const GOES_ON_ALONE: u64 = 500;

/// How the primary's sends wait for its standby.
#[derive(Clone, Copy)]
pub enum Standby {
    /// Every send waits for the standby, for at most this many ms before the primary asks to
    /// go on alone.
    Synchronous(u64),
    /// No send waits for it.
    Asynchronous,
}

/// The two cells of the pair: the primary in `hz`, its standby in `fs`.
pub fn pair() -> [(&'static str, &'static str); 2] {
    [("hz", "hz-high-1"), ("fs", "fs-high-1")]
}

async fn clients(
    progress: Arc<Mutex<Progress>>,
    acked: Arc<Mutex<Acked>>,
    lagging: Arc<AtomicBool>,
) -> Result<String, String> {
    let phase = |p: &str| world::phase(&progress, p);
    phase("set-up");
    workload::create_tenants(&TENANTS, Tier::High, "hz").await;
    let messenger = workload::messenger().await?;
    workload::create_groups(&messenger, &TENANTS, GROUPS).await;
    progress.lock().expect("progress").started = true;
    phase("writers and failovers");
    let watcher = tokio::spawn(world::watch_leader(progress.clone()));
    let until = tokio::time::Instant::now() + RUN_FOR;
    let mut tasks = tokio::task::JoinSet::new();
    workload::spawn_writers(
        &mut tasks,
        &messenger,
        (&TENANTS, GROUPS),
        "w",
        until,
        &acked,
    );
    // Ops move the tenants' primary to its standby every few seconds, planned.
    tasks.spawn(async move {
        let mut n = 0u64;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(7)).await;
            n += 1;
            let via = n % nodes() + 1;
            let Ok(Ok(tenant)) = tokio::time::timeout(
                CALL_TIMEOUT,
                world::control(via).get_tenant(GetTenantRequest {
                    tenant_id: TENANTS[0].into(),
                }),
            )
            .await
            else {
                continue;
            };
            let primary = tenant.into_inner().primary_cell;
            let _ = tokio::time::timeout(
                CALL_TIMEOUT,
                world::control(via).failover_cell(FailoverCellRequest {
                    cell_id: primary,
                    mode: FailoverMode::Planned as i32,
                    reason: "simulated maintenance".into(),
                }),
            )
            .await;
        }
    });
    while tasks.join_next().await.is_some() {}
    workload::finished(&lagging).await;
    watcher.abort();

    let failovers = ended(&phase).await;
    pair_restored(&phase).await;
    // A standby in sync has every message its primary acknowledged, so the failed cell of
    // such a failover is held to the seqs it acknowledged below. Its ledger may still count
    // messages merged back: ones the failed cell wrote and never acknowledged, whose writer
    // gave up. A standby not in sync may have lacked acknowledged ones too; the merge-back
    // brought them over at new seqs.
    let behind = behind(&failovers);

    phase("reading every history");
    let acked = acked.lock().expect("acked").clone();
    workload::one_writer(&acked, &behind)?;
    let checked = workload::check_histories(&messenger, &acked, &behind).await?;
    let cells: std::collections::BTreeSet<&str> =
        acked.values().flatten().map(|a| a.cell.as_str()).collect();
    let done = |planned: bool| {
        failovers
            .iter()
            .filter(|f| {
                f.phase == FailoverPhase::Merged as i32
                    && (f.mode == FailoverMode::Planned as i32) == planned
            })
            .count()
    };
    let behind_standby = failovers
        .iter()
        .filter(|f| f.ledger.as_ref().is_some_and(|l| !l.in_sync))
        .count();
    Ok(format!(
        "{checked} acknowledged messages by {cells:?}, {} failovers ({} planned and {} forced \
         merged; {behind_standby} from a standby not in sync)",
        failovers.len(),
        done(true),
        done(false)
    ))
}

/// The cells whose failover promoted a standby that was not in sync: what they acknowledged
/// may have come back by merge-back, at new seqs.
pub fn behind(failovers: &[Failover]) -> workload::Behind {
    failovers
        .iter()
        .filter(|f| f.ledger.as_ref().is_some_and(|l| !l.in_sync))
        .map(|f| f.cell_id.clone())
        .collect()
}

/// Waits until every failover has ended (MERGED or ROLLED_BACK), telling `phase` what it
/// waits for; every failover there was.
pub async fn ended(phase: &impl Fn(&str)) -> Vec<Failover> {
    phase("waiting for every failover to end");
    let ended = [FailoverPhase::Merged, FailoverPhase::RolledBack].map(|p| p as i32);
    loop {
        let listed = world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .list_failovers(ListFailoversRequest { active_only: false })
                .await
        })
        .await
        .map(|l| l.failovers)
        .unwrap_or_default();
        let unfinished: Vec<String> = listed
            .iter()
            .filter(|f| !ended.contains(&f.phase))
            .map(|f| format!("{f:?}"))
            .collect();
        if unfinished.is_empty() {
            break listed;
        }
        phase(&format!(
            "waiting for every failover to end: {}",
            unfinished.join("; ")
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the pair protects its tenants again, whatever happened: both cells ACTIVE, one
/// the standby of the other.
pub async fn pair_restored(phase: &impl Fn(&str)) {
    phase("waiting for the pair to be a primary and its ACTIVE standby again");
    loop {
        let cells = world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .list_cells(ListCellsRequest {
                    region: String::new(),
                })
                .await
        })
        .await
        .map(|l| l.cells)
        .unwrap_or_default();
        let active = cells
            .iter()
            .filter(|c| c.state == CellState::Active as i32)
            .count();
        let standbys = cells.iter().filter(|c| !c.standby_of.is_empty()).count();
        if active == 2 && standbys == 1 {
            break;
        }
        let states: Vec<String> = cells
            .iter()
            .map(|c| {
                format!(
                    "{} {:?} standby of {:?}",
                    c.cell_id,
                    c.state(),
                    c.standby_of
                )
            })
            .collect();
        phase(&format!(
            "waiting for the pair to be a primary and its ACTIVE standby again: {}",
            states.join("; ")
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn run(seed: u64, standby: Standby) {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build(seed, dir.path(), RUN_FOR + Duration::from_secs(150));
    add_pair(&mut sim, dir.path(), standby);
    let hosts = (1..=nodes())
        .map(world::host)
        .chain(pair().map(|(region, _)| world::agent_host(region)))
        .collect();
    workload::run(
        seed,
        sim,
        (dir.path(), hosts),
        (&TENANTS, GROUPS),
        RUN_FOR,
        clients,
    );
}

/// Runs the agents of the pair, each with its cell, the standby's replication as `standby`.
pub fn add_pair(sim: &mut turmoil::Sim<'_>, dir: &std::path::Path, standby: Standby) {
    let [(primary_region, primary), (standby_region, cell_of_standby)] = pair();
    let mut high = world::cell(primary_region, primary, "HIGH", 7001);
    let mut remote = world::cell(standby_region, cell_of_standby, "HIGH", 7001);
    remote.standby_of = Some(primary.into());
    remote.primary_endpoint = high.advertise.clone();
    match standby {
        Standby::Synchronous(timeout_ms) => {
            high.sync_standbys = Some(vec![cell_of_standby.into()]);
            high.sync_timeout_ms = Some(timeout_ms);
            // Promoted, it waits for the old primary once that rejoins as its standby.
            remote.sync_standbys = Some(vec![primary.into()]);
            remote.sync_timeout_ms = Some(timeout_ms);
        }
        Standby::Asynchronous => {
            high.sync_standbys = Some(Vec::new());
            remote.sync_standbys = Some(Vec::new());
        }
    }
    world::add_agent(sim, dir, primary_region, vec![high]);
    world::add_agent(sim, dir, standby_region, vec![remote]);
}

const FIXED: [u64; 2] = [1, 2];

#[test]
fn failovers_lose_nothing_acknowledged_and_never_make_two_writers() {
    crate::seeds::for_each(
        "failover::failovers_lose_nothing_acknowledged_and_never_make_two_writers",
        &FIXED,
        |seed| run(seed, Standby::Synchronous(WAITS_FOR_ITS_STANDBY)),
    );
}

#[test]
fn a_primary_that_goes_on_alone_loses_nothing_it_acknowledged() {
    crate::seeds::for_each(
        "failover::a_primary_that_goes_on_alone_loses_nothing_it_acknowledged",
        &FIXED,
        |seed| run(seed, Standby::Synchronous(GOES_ON_ALONE)),
    );
}

#[test]
fn a_primary_with_an_asynchronous_standby_is_fenced_by_its_lease_alone() {
    crate::seeds::for_each(
        "failover::a_primary_with_an_asynchronous_standby_is_fenced_by_its_lease_alone",
        &FIXED,
        |seed| run(seed, Standby::Asynchronous),
    );
}

/// Replaying a seed gives the same run, failovers and all: the same acknowledgements, each
/// with its seq, cell, epoch and instants, and the same faults at the same instants.
#[test]
fn a_seed_replays_exactly() {
    crate::seeds::replays_exactly(
        "failover::a_primary_with_an_asynchronous_standby_is_fenced_by_its_lease_alone",
        5,
        1_000,
    );
}
