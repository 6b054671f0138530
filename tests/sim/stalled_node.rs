//! A node whose disk stalls goes on hearing from its leader, so it is not out of touch, yet its
//! state no longer moves: a watch open on it falls silent without failing. The agent must not
//! stay on it. Each node's disk stalls in turn, wherever the agent's calls and watches are,
//! and while it is stalled a tenant migrates through the other nodes: every migration must
//! finish well within the coordinator's no-progress limit (30 s), which it reaches only if
//! the agent hears of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{
    GetMigrationRequest, MigrateTenantRequest, MigrationPhase, Tier,
};
use cellplane_api::simulation;
use tokio::time::Instant;

use crate::workload;
use crate::world::{self, host, nodes};

const TENANT: [&str; 1] = ["acme"];
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a migration through a stalled node's peers may take.
const MIGRATES_WITHIN: Duration = Duration::from_secs(15);

/// The disk the clients want stalled now, if any; the driver carries it out.
#[derive(Default)]
struct Stall {
    wanted: Option<u64>,
    applied: Option<u64>,
    done: bool,
}

/// Asks `call` of every node but `stalled` in turn until one answers.
async fn elsewhere<T, F, Fut>(stalled: u64, mut call: F) -> Option<T>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    world::until_done(CALL_TIMEOUT, |via| {
        let others: Vec<u64> = (1..=nodes()).filter(|id| *id != stalled).collect();
        call(others[(via as usize) % others.len()])
    })
    .await
}

/// Migrates the tenant to its other cell through the nodes but `stalled`: how long it took.
async fn migrate(stalled: u64) -> Result<Duration, String> {
    let began = Instant::now();
    let migration = elsewhere(stalled, |via| async move {
        world::control(via)
            .migrate_tenant(MigrateTenantRequest {
                tenant_id: TENANT[0].into(),
                target_cell: String::new(),
            })
            .await
    })
    .await
    .ok_or("the migration was not started")?;
    loop {
        let id = migration.migration_id.clone();
        let m = elsewhere(stalled, |via| {
            let id = id.clone();
            async move {
                world::control(via)
                    .get_migration(GetMigrationRequest { migration_id: id })
                    .await
            }
        })
        .await
        .ok_or("the migration was not found")?;
        if m.phase == MigrationPhase::Done as i32 {
            return Ok(began.elapsed());
        }
        if [MigrationPhase::Failed, MigrationPhase::RolledBack]
            .iter()
            .any(|p| m.phase == *p as i32)
        {
            return Err(format!(
                "node {stalled} stalled: {} ended {:?} after {:.1} s: {}",
                m.migration_id,
                MigrationPhase::try_from(m.phase),
                began.elapsed().as_secs_f64(),
                m.error
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn clients(stall: Arc<Mutex<Stall>>) -> Result<Vec<Duration>, String> {
    workload::create_tenants(&TENANT, Tier::Normal, "hz").await;
    let messenger = workload::messenger().await?;
    workload::create_groups(&messenger, &TENANT, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut took = Vec::new();
    for node in 1..=nodes() {
        stall.lock().expect("stall").wanted = Some(node);
        while stall.lock().expect("stall").applied != Some(node) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let migrated = migrate(node).await?;
        if migrated > MIGRATES_WITHIN {
            return Err(format!(
                "node {node} stalled: the migration took {:.1} s",
                migrated.as_secs_f64()
            ));
        }
        took.push(migrated);
        stall.lock().expect("stall").wanted = None;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stall.lock().expect("stall").done = true;
    Ok(took)
}

/// How long each migration took, or what went wrong; `None` until the clients finish.
type Outcome = Option<Result<Vec<Duration>, String>>;

fn run(seed: u64) -> Vec<Duration> {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build(seed, dir.path(), Duration::from_secs(200));
    let cells = (1..=2)
        .map(|n| world::cell("hz", &format!("cell-{n}"), "NORMAL", 7000 + n as u16))
        .collect();
    world::add_agent(&mut sim, dir.path(), "hz", cells);
    let stall: Arc<Mutex<Stall>> = Arc::default();
    let outcome: Arc<Mutex<Outcome>> = Arc::default();
    {
        let (running, outcome) = (clients(stall.clone()), outcome.clone());
        sim.client("clients", async move {
            *outcome.lock().expect("outcome") = Some(running.await);
            Ok(())
        });
    }
    while !sim.step().unwrap_or_else(|e| panic!("seed {seed}: {e}")) {
        let mut stall = stall.lock().expect("stall");
        if stall.wanted != stall.applied {
            if let Some(node) = stall.applied.take() {
                simulation::resume_disk(&dir.path().join(host(node)));
            }
            if let Some(node) = stall.wanted {
                simulation::stall_disk(&dir.path().join(host(node)));
            }
            stall.applied = stall.wanted;
        }
    }
    let outcome = outcome.lock().expect("outcome").take();
    outcome
        .unwrap_or_else(|| panic!("seed {seed}: the clients never finished"))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

#[test]
fn the_agent_leaves_a_node_whose_disk_stalls() {
    crate::seeds::for_each(
        "stalled_node::the_agent_leaves_a_node_whose_disk_stalls",
        &[1, 2],
        |seed| {
            let took = run(seed);
            eprintln!("seed {seed}: migrations took {took:?}");
        },
    );
}
