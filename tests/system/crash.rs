//! Migrations survive crashes: SIGKILL the control-plane leader in COPYING and in FREEZING, the
//! target cell in COPYING, the source cell in CATCHING_UP, and the whole control plane in
//! CATCHING_UP. Each migration is expected to complete (every crash here heals well within the
//! coordinator's timeouts: an election, a cell restarted by its agent, a cluster restarted from
//! its disks), with no acknowledged message lost and one writer per key.

use std::collections::BTreeMap;
use std::time::Duration;

use cellplane_api::client::Messenger;
use cellplane_api::proto::control::{
    MigrateTenantRequest, MigrationPhase, Tier, WatchMigrationRequest,
};

use super::{System, phase_name};
use cellplane_tests::traffic::{
    Ack, MEMBERS, Writers, conversation, create_groups, send_request, verify,
};

const TENANT: &str = "initech";
const CONVERSATIONS: usize = 8;
const WRITERS: usize = 8;
/// Preloaded history, so that copying takes long enough to crash something in the middle.
const PRELOAD_PER_CONVERSATION: u64 = 60;
const PRELOAD_BODY_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone, Copy)]
enum Crash {
    Leader,
    TargetCell,
    SourceCell,
    /// Every control-plane node at once, restarted half a second later.
    ControlPlane,
}

fn rank(phase: MigrationPhase) -> u8 {
    match phase {
        MigrationPhase::Unspecified => 0,
        MigrationPhase::Planned => 1,
        MigrationPhase::Copying => 2,
        MigrationPhase::CatchingUp => 3,
        MigrationPhase::Freezing => 4,
        MigrationPhase::Switching => 5,
        MigrationPhase::Cleanup => 6,
        MigrationPhase::Done | MigrationPhase::RolledBack | MigrationPhase::Failed => 7,
    }
}

/// Waits until the migration reaches `phase` (or passes it); answers the phase seen.
async fn reach(system: &System, id: &str, phase: MigrationPhase) -> MigrationPhase {
    let leader = system.cluster.wait_for_leader().await;
    let mut stream = system
        .cluster
        .control(leader)
        .watch_migration(WatchMigrationRequest {
            migration_id: id.into(),
        })
        .await
        .expect("watch migration")
        .into_inner();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the migration moves")
            .expect("watch")
            .expect("watch open");
        let seen = MigrationPhase::try_from(m.phase).expect("phase");
        if rank(seen) >= rank(phase) {
            return seen;
        }
    }
}

async fn preload(messenger: &Messenger) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let sends = futures::future::join_all((0..CONVERSATIONS).map(|i| async move {
        for n in 0..PRELOAD_PER_CONVERSATION {
            messenger
                .send_message(send_request(
                    TENANT,
                    &conversation(i),
                    MEMBERS[0],
                    &format!("preload-{n}"),
                    vec![b'x'; PRELOAD_BODY_BYTES],
                ))
                .await
                .expect("preload");
        }
        i
    }))
    .await;
    for i in sends {
        counts.insert(conversation(i), PRELOAD_PER_CONVERSATION);
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_complete_through_crashes_of_the_leader_and_of_either_cell() {
    let mut system = System::start(&[(
        "hz",
        &[
            ("hz-a-normal-1", "a", "NORMAL"),
            ("hz-b-normal-2", "b", "NORMAL"),
        ],
    )])
    .await;
    let first = system.create_tenant(TENANT, Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;
    let preloaded = preload(&messenger).await;
    let cells = ["hz-a-normal-1", "hz-b-normal-2"];
    let mut on = cells
        .iter()
        .position(|c| *c == first)
        .expect("placed on a cell");
    let mut all_acks: Vec<Ack> = Vec::new();

    let scenarios = [
        (Crash::Leader, MigrationPhase::Copying),
        (Crash::Leader, MigrationPhase::Freezing),
        (Crash::TargetCell, MigrationPhase::Copying),
        (Crash::SourceCell, MigrationPhase::CatchingUp),
        (Crash::ControlPlane, MigrationPhase::CatchingUp),
    ];
    for (run, (crash, at)) in scenarios.into_iter().enumerate() {
        let (source, target) = (cells[on], cells[1 - on]);
        let writers = Writers::start(
            messenger.clone(),
            TENANT,
            &format!("run{run}"),
            WRITERS,
            CONVERSATIONS,
        );
        writers.let_write(100).await;
        let leader = system.cluster.wait_for_leader().await;
        let migration = system
            .cluster
            .control(leader)
            .migrate_tenant(MigrateTenantRequest {
                tenant_id: TENANT.into(),
                target_cell: target.into(),
            })
            .await
            .expect("migrate")
            .into_inner();
        let seen = reach(&system, &migration.migration_id, at).await;
        assert!(
            rank(seen) < rank(MigrationPhase::Done),
            "{crash:?}: the migration ended before the crash, so this scenario would test nothing"
        );
        let mut killed_node = None;
        match crash {
            Crash::Leader => {
                let leader = system.cluster.wait_for_leader().await;
                system.cluster.kill(leader).await;
                killed_node = Some(leader);
            }
            Crash::TargetCell => system.agent("hz").kill_cell(target),
            Crash::SourceCell => system.agent("hz").kill_cell(source),
            Crash::ControlPlane => {
                let nodes = system.cluster.running_ids();
                for node in &nodes {
                    system.cluster.kill(*node).await;
                }
                // Cells keep taking writes for the keys they own while no node is up.
                tokio::time::sleep(Duration::from_millis(500)).await;
                for node in nodes {
                    system.cluster.restart(node);
                }
            }
        }
        let done = system
            .wait_for_migration(&migration.migration_id, Duration::from_secs(90))
            .await;
        writers.let_write(100).await;
        let (acks, mut latencies) = writers.stop().await;
        println!(
            "{crash:?} crashed at {} (aimed at {}): migration ended {}{}; {} sends, slowest {:?}",
            seen.as_str_name(),
            at.as_str_name(),
            phase_name(&done),
            if done.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", done.error)
            },
            acks.len(),
            latencies.percentile(100.0)
        );
        assert_eq!(
            phase_name(&done),
            "MIGRATION_PHASE_DONE",
            "{crash:?} at {at:?}: expected the migration to complete: {done:?}"
        );
        all_acks.extend(acks);
        verify(&messenger, TENANT, &all_acks, &preloaded).await;
        let route = messenger.owner(TENANT, "c0").expect("route").0;
        assert_eq!(
            route.cell_id, target,
            "{crash:?}: the tenant is on the target"
        );
        if let Some(node) = killed_node {
            system.cluster.restart(node);
        }
        on = 1 - on;
    }
}
