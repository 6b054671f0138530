//! Messages under the nemesis: the production agent and its cells beside the three nodes,
//! writers sending through the `Messenger` (`workload`) while tenants migrate between cells,
//! history first — to another cell of their tier or to the other tier, some cancelled on the
//! way. After the faults heal every migration must have ended, and the messages pass
//! `workload`'s checks: none lost or doubled, and one writer per key throughout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{
    CancelMigrationRequest, ListMigrationsRequest, MigrateTenantRequest, MigrationPhase,
    SetTenantTierRequest, Tier,
};

use crate::workload::{self, Acked};
use crate::world::{self, NODES, Progress};

const CELLS: usize = 3;
const TENANTS: [&str; 2] = ["acme", "globex"];
const GROUPS: usize = 2;
const RUN_FOR: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

async fn clients(progress: Arc<Mutex<Progress>>) -> Result<String, String> {
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
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    workload::spawn_writers(&mut tasks, &messenger, &TENANTS, GROUPS, until, &acked);
    // Every few seconds a tenant moves, history first: to another cell of its tier, or to
    // the other tier (NORMAL and LOW take turns). Every third move is cancelled a moment
    // later, wherever it has got to.
    tasks.spawn(async move {
        let mut n = 0usize;
        let mut low = [false; TENANTS.len()];
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(3)).await;
            n += 1;
            let (t, via) = (n % TENANTS.len(), (n as u64) % NODES + 1);
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
    while tasks.join_next().await.is_some() {}
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
        "{checked} acknowledged messages, {} migrations ({tiers} of tier; {} done, {} rolled back)",
        migrations.len(),
        ended(MigrationPhase::Done),
        ended(MigrationPhase::RolledBack)
    ))
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
    let hosts = (1..=NODES)
        .map(world::host)
        .chain([world::agent_host("hz")])
        .collect();
    world::run_clients(seed, sim, dir.path(), hosts, RUN_FOR, clients);
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
