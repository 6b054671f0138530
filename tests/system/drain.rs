//! Draining a cell with 50 tenants while writers write to some of them: every tenant moves,
//! history first, and no writer sees an error; the empty cell can then be removed, and the
//! last cell of its tier cannot be drained.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{
    CellState, DrainCellRequest, GetDrainRequest, ListTenantsRequest, RemoveCellRequest,
    SetCellStateRequest, Tier,
};
use cellplane_tests::traffic::{Writers, create_groups, verify};
use tonic::Code;

use super::System;

const SOURCE: &str = "hz-a-normal-1";
const TARGET: &str = "hz-b-normal-2";
const TENANTS: usize = 50;
/// Tenants with writers during the drain.
const BUSY: usize = 5;

async fn set_state(system: &System, cell_id: &str, state: CellState) {
    let leader = system.cluster.wait_for_leader().await;
    system
        .cluster
        .control(leader)
        .set_cell_state(SetCellStateRequest {
            cell_id: cell_id.into(),
            state: state as i32,
        })
        .await
        .expect("set cell state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_cell_moves_every_tenant_with_no_error_to_writers() {
    let system =
        System::start(&[("hz", &[(SOURCE, "a", "NORMAL"), (TARGET, "b", "NORMAL")])]).await;
    // Every tenant on the source: the target takes no placements while they are created.
    set_state(&system, TARGET, CellState::Draining).await;
    for i in 0..TENANTS {
        let placed = system
            .create_tenant(&format!("t{i:02}"), Tier::Normal, "hz")
            .await;
        assert_eq!(placed, SOURCE);
    }
    set_state(&system, TARGET, CellState::Active).await;
    let (_, messenger) = system.messenger().await;
    let mut writers = Vec::new();
    for i in 0..BUSY {
        let tenant = format!("t{i:02}");
        create_groups(&messenger, &tenant, 2).await;
        writers.push((
            tenant.clone(),
            Writers::start(messenger.clone(), &tenant, "drain", 2, 2),
        ));
    }
    for (_, w) in &writers {
        w.let_write(20).await;
    }

    let leader = system.cluster.wait_for_leader().await;
    let mut control = system.cluster.control(leader);
    let started = control
        .drain_cell(DrainCellRequest {
            cell_id: SOURCE.into(),
        })
        .await
        .expect("drain")
        .into_inner();
    assert_eq!(started.state, CellState::Draining as i32);
    assert_eq!(started.keys_left, TENANTS as u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let leader = system.cluster.wait_for_leader().await;
        let progress = system
            .cluster
            .control(leader)
            .get_drain(GetDrainRequest {
                cell_id: SOURCE.into(),
            })
            .await
            .expect("drain progress")
            .into_inner();
        if progress.keys_left == 0 && progress.migrations_running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the drain stalled: {progress:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (tenant, w) in writers {
        w.let_write(20).await;
        let (acks, _) = w.stop().await;
        verify(&messenger, &tenant, &acks, &BTreeMap::new()).await;
        assert!(
            acks.iter().any(|a| a.cell() == TARGET),
            "{tenant} moved under writes"
        );
    }
    let leader = system.cluster.wait_for_leader().await;
    let mut control = system.cluster.control(leader);
    let tenants = control
        .list_tenants(ListTenantsRequest::default())
        .await
        .expect("tenants")
        .into_inner()
        .tenants;
    assert_eq!(tenants.len(), TENANTS);
    assert!(
        tenants
            .iter()
            .all(|t| t.primary_cell == TARGET && t.epoch == 2),
        "every tenant moved once"
    );

    let err = control
        .drain_cell(DrainCellRequest {
            cell_id: TARGET.into(),
        })
        .await
        .expect_err("the last NORMAL cell");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    control
        .remove_cell(RemoveCellRequest {
            cell_id: SOURCE.into(),
        })
        .await
        .expect("remove the drained cell");
}
