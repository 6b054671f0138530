//! Messages under the nemesis: the production agent and its cells beside the three nodes,
//! writers sending through the `Messenger` (`workload`) while tenants migrate between cells,
//! history first — to another cell of their tier or to the other tier, some cancelled on the
//! way — and NORMAL cells are drained and put back in turn. After the faults heal every
//! migration must have ended, and the messages pass `workload`'s checks: none lost or doubled,
//! and one writer per key throughout.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{
    CancelMigrationRequest, CellState, DrainCellRequest, GetTenantRequest, ListMigrationsRequest,
    MigrateTenantRequest, MigrationPhase, SetCellStateRequest, SetTenantTierRequest, Tier,
};

use crate::workload::{self, Acked};
use crate::world::{self, Progress, nodes};

const CELLS: usize = 3;
const TENANTS: [&str; 2] = ["acme", "globex"];
const GROUPS: usize = 2;
const RUN_FOR: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the drainer keeps asking a call through the nodes before it gives the call up.
const DRAIN_CALL_FOR: Duration = Duration::from_secs(20);

async fn clients(
    progress: Arc<Mutex<Progress>>,
    acked: Arc<Mutex<Acked>>,
    lagging: Arc<AtomicBool>,
) -> Result<String, String> {
    let phase = |p: &str| world::phase(&progress, p);
    phase("set-up");
    // The agent registers its cells; tenants are placed once they are ACTIVE.
    workload::create_tenants(&TENANTS, Tier::Normal, "hz").await;
    let messenger = workload::messenger().await?;
    workload::create_groups(&messenger, &TENANTS, GROUPS).await;
    progress.lock().expect("progress").started = true;
    phase("writers and migrations");
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
    // Every few seconds a tenant moves, history first: to another cell of its tier, or to
    // the other tier (NORMAL and LOW take turns). Every third move is cancelled a moment
    // later, wherever it has got to.
    tasks.spawn(async move {
        let mut n = 0usize;
        let mut low = [false; TENANTS.len()];
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(3)).await;
            n += 1;
            let (t, via) = (n % TENANTS.len(), (n as u64) % nodes() + 1);
            let tenant = TENANTS[t];
            let started = if n % 4 == 3 {
                low[t] = !low[t];
                let tier = if low[t] { Tier::Low } else { Tier::Normal };
                tokio::time::timeout(
                    CALL_TIMEOUT,
                    world::control(via).set_tenant_tier(SetTenantTierRequest {
                        tenant_id: tenant.into(),
                        tier: tier as i32,
                    }),
                )
                .await
            } else {
                tokio::time::timeout(
                    CALL_TIMEOUT,
                    world::control(via).migrate_tenant(MigrateTenantRequest {
                        tenant_id: tenant.into(),
                        target_cell: String::new(),
                    }),
                )
                .await
            };
            if n.is_multiple_of(3)
                && let Ok(Ok(migration)) = started
            {
                tokio::time::sleep(Duration::from_millis(100 * (n % 7) as u64)).await;
                let _ = tokio::time::timeout(
                    CALL_TIMEOUT,
                    world::control(via).cancel_migration(CancelMigrationRequest {
                        migration_id: migration.into_inner().migration_id,
                    }),
                )
                .await;
            }
        }
    });
    // Every 7 s a NORMAL tenant's cell is drained, and made ACTIVE again 2–4 s later, whether or not
    // its evacuation has finished; the migrations a drain started run on either way.
    let drainer = tokio::spawn(async move {
        let (mut drained, mut refused) = (0usize, 0usize);
        for n in 0usize.. {
            tokio::time::sleep(Duration::from_secs(7)).await;
            if tokio::time::Instant::now() >= until {
                break;
            }
            // The cell of one of the tenants, so that the drain has something to move.
            let tenant_id = TENANTS[n % TENANTS.len()].to_string();
            let placed = persist(|via| {
                let tenant_id = tenant_id.clone();
                async move {
                    world::control(via)
                        .get_tenant(GetTenantRequest { tenant_id })
                        .await
                }
            })
            .await;
            let cell_id = match placed {
                Some(Ok(tenant)) if tenant.tier == Tier::Normal as i32 => tenant.primary_cell,
                _ => format!("cell-{}", n % CELLS + 1),
            };
            let drain = persist(|via| {
                let cell_id = cell_id.clone();
                async move {
                    world::control(via)
                        .drain_cell(DrainCellRequest { cell_id })
                        .await
                }
            })
            .await;
            match drain {
                Some(Ok(_)) => drained += 1,
                Some(Err(_)) => refused += 1,
                None => return Err(format!("no node answered the drain of {cell_id}")),
            }
            tokio::time::sleep(Duration::from_millis(2_000 + 500 * (n % 5) as u64)).await;
            let back = persist(|via| {
                let cell_id = cell_id.clone();
                async move {
                    world::control(via)
                        .set_cell_state(SetCellStateRequest {
                            cell_id,
                            state: CellState::Active as i32,
                        })
                        .await
                }
            })
            .await;
            match back {
                Some(Ok(_)) => {}
                Some(Err(status)) => {
                    return Err(format!(
                        "{cell_id} was refused ACTIVE after its drain: {status:?}"
                    ));
                }
                None => return Err(format!("no node answered making {cell_id} ACTIVE again")),
            }
        }
        Ok((drained, refused))
    });
    while tasks.join_next().await.is_some() {}
    workload::finished(&lagging).await;
    let (drained, refused) = drainer.await.map_err(|e| format!("the drainer: {e}"))??;
    watcher.abort();

    phase("waiting for every migration to end");
    let migrations = loop {
        let listed = world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .list_migrations(ListMigrationsRequest {
                    active_only: false,
                    tenant_id: String::new(),
                })
                .await
        })
        .await
        .map(|l| l.migrations)
        .unwrap_or_default();
        let ended = [
            MigrationPhase::Done,
            MigrationPhase::Failed,
            MigrationPhase::RolledBack,
        ]
        .map(|p| p as i32);
        let unfinished: Vec<String> = listed
            .iter()
            .filter(|m| !ended.contains(&m.phase))
            .map(|m| format!("{m:?}"))
            .collect();
        if unfinished.is_empty() {
            break listed;
        }
        phase(&format!(
            "waiting for every migration to end: {}",
            unfinished.join("; ")
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    phase("reading every history");
    let acked = acked.lock().expect("acked").clone();
    let in_sync = workload::Behind::new();
    workload::one_writer(&acked, &in_sync)?;
    let checked = workload::check_histories(&messenger, &acked, &in_sync).await?;
    let ended = |phase: MigrationPhase| {
        migrations
            .iter()
            .filter(|m| m.phase == phase as i32)
            .count()
    };
    let tiers = migrations
        .iter()
        .filter(|m| m.new_tier != Tier::Unspecified as i32)
        .count();
    Ok(format!(
        "{checked} acknowledged messages, {} migrations ({tiers} of tier; {} done, {} rolled back), {drained} drains ({refused} refused)",
        migrations.len(),
        ended(MigrationPhase::Done),
        ended(MigrationPhase::RolledBack)
    ))
}

/// Asks `call` through each node in turn until one answers it, for at most [`DRAIN_CALL_FOR`]:
/// its answer, a refusal included, or `None` when no node answered in time.
async fn persist<T, F, Fut>(mut call: F) -> Option<Result<T, tonic::Status>>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + DRAIN_CALL_FOR;
    for attempt in 0u64.. {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        match tokio::time::timeout(CALL_TIMEOUT, call(attempt % nodes() + 1)).await {
            Ok(Ok(answer)) => return Some(Ok(answer.into_inner())),
            // No leader, or a node going away: another node may answer.
            Ok(Err(status))
                if !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                return Some(Err(status));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

fn run(seed: u64) {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build(seed, dir.path(), RUN_FOR + Duration::from_secs(150));
    let cells = (1..=CELLS)
        .map(|n| world::cell("hz", &format!("cell-{n}"), "NORMAL", 7000 + n as u16))
        .chain([world::cell("hz", "cell-low", "LOW", 7100)])
        .collect();
    world::add_agent(&mut sim, dir.path(), "hz", cells);
    // Every server may crash: a node, or the agent's host with its cells, which restart from
    // their disks at the heal.
    let hosts = (1..=nodes())
        .map(world::host)
        .chain([world::agent_host("hz")])
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

const FIXED: [u64; 2] = [1, 2];

#[test]
fn acknowledged_messages_survive_migrations_under_the_nemesis() {
    crate::seeds::for_each(
        "messages::acknowledged_messages_survive_migrations_under_the_nemesis",
        &FIXED,
        run,
    );
}

/// Replaying a seed gives the same run: the same acknowledgements, each with its seq, cell,
/// epoch and instants, and the same faults at the same instants.
#[test]
fn a_seed_replays_exactly() {
    crate::seeds::replays_exactly(
        "messages::acknowledged_messages_survive_migrations_under_the_nemesis",
        5,
        1_000,
    );
}
