//! The crash-point walk: a migration whose agent dies at each of its steps in turn — before
//! and after copy, catch-up, freeze, switch and cleanup (`cellplane_api::failpoint`) — with
//! its cells, while writers send. Restarted without the crash point, the agent resumes the
//! migration from what the control plane recorded, and it completes: no acknowledged message
//! lost or written twice, the tenant on the target.

use std::time::Duration;

use cellplane_api::proto::control::{MigrateTenantRequest, Tier};

use super::{System, phase_name};
use cellplane_tests::traffic::{Ack, Writers, create_groups, verify};

const TENANT: &str = "hooli";
const CONVERSATIONS: usize = 4;
const WRITERS: usize = 4;
const STEPS: [&str; 5] = ["copy", "catch-up", "freeze", "switch", "cleanup"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_completes_after_its_agent_crashes_at_each_step() {
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
    let cells = ["hz-a-normal-1", "hz-b-normal-2"];
    let mut on = cells
        .iter()
        .position(|c| *c == first)
        .expect("placed on a cell");
    let mut all_acks: Vec<Ack> = Vec::new();
    let points = STEPS.iter().flat_map(|step| {
        [
            format!("migrate-{step}-before"),
            format!("migrate-{step}-after"),
        ]
    });
    for (run, point) in points.enumerate() {
        let target = cells[1 - on];
        let agent = system
            .agents
            .iter_mut()
            .find(|a| a.region == "hz")
            .expect("the agent of hz");
        agent.kill().await;
        agent.set_crash_at(Some(&point));
        agent.restart();
        agent.wait_for_cells(Duration::from_secs(30)).await;
        let writers = Writers::start(
            messenger.clone(),
            TENANT,
            &format!("run{run}"),
            WRITERS,
            CONVERSATIONS,
        );
        writers.let_write(50).await;
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
        let agent = system
            .agents
            .iter_mut()
            .find(|a| a.region == "hz")
            .expect("the agent of hz");
        let status = agent
            .wait_exit(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("{point}: the agent did not reach its crash point"));
        assert!(
            cellplane_api::failpoint::killed(&status),
            "{point}: {status}"
        );
        agent.set_crash_at(None);
        agent.restart();
        let done = system
            .wait_for_migration(&migration.migration_id, Duration::from_secs(90))
            .await;
        writers.let_write(50).await;
        let (acks, _) = writers.stop().await;
        println!(
            "crashed at {point}: migration ended {}, {} sends acknowledged",
            phase_name(&done),
            acks.len()
        );
        assert_eq!(
            phase_name(&done),
            "MIGRATION_PHASE_DONE",
            "{point}: expected the migration to complete: {done:?}"
        );
        all_acks.extend(acks);
        // The migration can end before the restarted agent's cells all answer again.
        system
            .agent("hz")
            .wait_for_cells(Duration::from_secs(30))
            .await;
        verify(&messenger, TENANT, &all_acks, &Default::default()).await;
        let route = messenger.owner(TENANT, "c0").expect("route").0;
        assert_eq!(
            route.cell_id, target,
            "{point}: the tenant is on the target"
        );
        on = 1 - on;
    }
}
