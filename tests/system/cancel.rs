//! Cancelling a migration, with the test playing the target's agent so that each phase is held
//! exactly as long as the test needs: cancel before the switch thaws the source and writers go
//! on there; cancel after the switch is refused.

use std::time::Duration;

use cellplane_api::detail::wrong_cell;
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, ExportRequest, KeyRequest, SendMessageRequest,
};
use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{
    CancelMigrationRequest, CellState, GetMigrationRequest, MigrateTenantRequest, Migration,
    MigrationPhase, RegisterCellRequest, ReportMigrationRequest, SetCellStateRequest, Tier,
};
use cellplane_tests::cell::CellProcess;
use tonic::Code;
use tonic::transport::Channel;

use cellplane_tests::traffic::history;

use super::System;

const TENANT: &str = "globex";

fn send(client_msg_id: &str, epoch: u64) -> SendMessageRequest {
    SendMessageRequest {
        tenant_id: TENANT.into(),
        conversation_id: "c0".into(),
        sender_id: "u0".into(),
        client_msg_id: client_msg_id.into(),
        body: b"hello".to_vec(),
        receiver_ids: Vec::new(),
        route_epoch: epoch,
        client_type: "test".into(),
        app_id: "system-tests".into(),
        ..Default::default()
    }
}

async fn phase_of(control: &mut ControlClient<Channel>, id: &str) -> MigrationPhase {
    let m = control
        .get_migration(GetMigrationRequest {
            migration_id: id.into(),
        })
        .await
        .expect("get migration")
        .into_inner();
    MigrationPhase::try_from(m.phase).expect("phase")
}

async fn wait_phase(control: &mut ControlClient<Channel>, id: &str, phase: MigrationPhase) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while phase_of(control, id).await != phase {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never reached {phase:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn report(
    control: &mut ControlClient<Channel>,
    id: &str,
    phase: MigrationPhase,
    copied: u64,
    frozen: u64,
    done: bool,
) -> Migration {
    control
        .report_migration(ReportMigrationRequest {
            migration_id: id.into(),
            phase: phase as i32,
            copied_lsn: copied,
            source_lsn: copied.max(frozen),
            frozen_lsn: frozen,
            phase_done: done,
            ..Default::default()
        })
        .await
        .expect("report")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_before_the_switch_thaws_the_source_and_after_it_is_refused() {
    let system = System::start(&[("hz", &[("hz-a-normal-1", "a", "NORMAL")])]).await;
    // The target is a cell no agent runs: the test carries the migration out itself.
    let target = CellProcess::start("hz-t-normal-9", &[]).await;
    let leader = system.cluster.wait_for_leader().await;
    let mut control = system.cluster.control(leader);
    control
        .register_cell(RegisterCellRequest {
            cell_id: target.cell_id.clone(),
            region: "hz".into(),
            zone: "t".into(),
            tier: Tier::Normal as i32,
            endpoint: target.addr.clone(),
            capacity: 1,
            standby_of: String::new(),
        })
        .await
        .expect("register target");
    control
        .set_cell_state(SetCellStateRequest {
            cell_id: target.cell_id.clone(),
            state: CellState::Active as i32,
        })
        .await
        .expect("activate target");
    let source_id = system.create_tenant(TENANT, Tier::Normal, "hz").await;
    assert_eq!(
        source_id, "hz-a-normal-1",
        "the larger cell gets the tenant"
    );
    let (_, messenger) = system.messenger().await;
    messenger
        .create_conversation(CreateConversationRequest {
            tenant_id: TENANT.into(),
            conversation_id: "c0".into(),
            kind: ConversationKind::Group as i32,
            member_ids: vec!["u0".into(), "u1".into()],
            route_epoch: 0,
        })
        .await
        .expect("create conversation");
    messenger
        .send_message(send("before", 0))
        .await
        .expect("send");
    let source = system.agent("hz").cell(&source_id).clone();

    // First migration: held in FREEZING with the source frozen, then cancelled.
    let first = control
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: TENANT.into(),
            target_cell: target.cell_id.clone(),
        })
        .await
        .expect("migrate")
        .into_inner();
    let id = first.migration_id.clone();
    wait_phase(&mut control, &id, MigrationPhase::Copying).await;
    let m = report(&mut control, &id, MigrationPhase::Copying, 1, 0, true).await;
    assert_eq!(m.phase, MigrationPhase::CatchingUp as i32);
    let m = report(&mut control, &id, MigrationPhase::CatchingUp, 1, 0, false).await;
    assert_eq!(m.phase, MigrationPhase::Freezing as i32);
    let frozen = source
        .admin()
        .freeze(KeyRequest {
            tenant_id: TENANT.into(),
            conversation_id: String::new(),
        })
        .await
        .expect("freeze the source")
        .into_inner()
        .last_lsn;
    let refused = source
        .messaging()
        .send_message(send("while-frozen", 1))
        .await
        .expect_err("a frozen key refuses writes");
    assert!(
        wrong_cell(&refused).is_some_and(|d| d.frozen),
        "{refused:?}"
    );

    let cancelled = control
        .cancel_migration(CancelMigrationRequest {
            migration_id: id.clone(),
        })
        .await
        .expect("cancel before the switch")
        .into_inner();
    assert_eq!(cancelled.phase, MigrationPhase::RolledBack as i32);
    // The source's agent thaws the key; writers go on where they were, at the same epoch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match source
            .messaging()
            .send_message(send("after-cancel", 1))
            .await
        {
            Ok(answer) => {
                assert_eq!(answer.into_inner().seq, 2);
                break;
            }
            Err(status) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the source stayed frozen: {status}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let again = control
        .cancel_migration(CancelMigrationRequest { migration_id: id })
        .await
        .expect_err("a finished migration cannot be cancelled");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // Second migration: carried through the switch, then a cancel is refused.
    let second = control
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: TENANT.into(),
            target_cell: target.cell_id.clone(),
        })
        .await
        .expect("migrate again")
        .into_inner();
    let id = second.migration_id.clone();
    wait_phase(&mut control, &id, MigrationPhase::Copying).await;
    let source_process = SourceCell(source.clone());
    let copied = source_process.copy_to(&target).await;
    report(&mut control, &id, MigrationPhase::Copying, copied, 0, true).await;
    let m = report(
        &mut control,
        &id,
        MigrationPhase::CatchingUp,
        copied,
        0,
        false,
    )
    .await;
    assert_eq!(m.phase, MigrationPhase::Freezing as i32);
    let frozen_again = source
        .admin()
        .freeze(KeyRequest {
            tenant_id: TENANT.into(),
            conversation_id: String::new(),
        })
        .await
        .expect("freeze")
        .into_inner()
        .last_lsn;
    assert!(frozen_again >= frozen);
    let copied = source_process.copy_to(&target).await;
    // Frozen and copied: the target's history is the source's, message for message.
    let source_history = history(&mut source.messaging(), TENANT, "c0").await;
    assert_eq!(source_history.len(), 2);
    assert_eq!(
        history(&mut target.messaging(), TENANT, "c0").await,
        source_history,
        "history read from the target equals history read from the source before the switch"
    );
    let early = report(
        &mut control,
        &id,
        MigrationPhase::Freezing,
        copied,
        frozen_again + 1,
        true,
    )
    .await;
    assert_eq!(
        early.phase,
        MigrationPhase::Freezing as i32,
        "no switch while the target is behind the frozen LSN"
    );
    let m = report(
        &mut control,
        &id,
        MigrationPhase::Freezing,
        frozen_again + 1,
        frozen_again + 1,
        true,
    )
    .await;
    assert_eq!(m.phase, MigrationPhase::Switching as i32);
    let refused = control
        .cancel_migration(CancelMigrationRequest {
            migration_id: id.clone(),
        })
        .await
        .expect_err("no cancel after the switch");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("can no longer be rolled back"),
        "{refused:?}"
    );
    let m = report(
        &mut control,
        &id,
        MigrationPhase::Switching,
        copied,
        0,
        true,
    )
    .await;
    assert_eq!(m.phase, MigrationPhase::Cleanup as i32);
    let m = report(&mut control, &id, MigrationPhase::Cleanup, copied, 0, true).await;
    assert_eq!(m.phase, MigrationPhase::Done as i32);
    assert!(m.switched_ms >= m.frozen_ms);
}

/// The source cell, seen as the target's agent sees it.
struct SourceCell(cellplane_tests::agent::AgentCell);

impl SourceCell {
    /// Copies the key's snapshot into `target` as an agent would; answers the source LSN the
    /// target now holds.
    async fn copy_to(&self, target: &CellProcess) -> u64 {
        let export = self
            .0
            .admin()
            .export(ExportRequest {
                tenant_id: TENANT.into(),
                conversation_id: String::new(),
                from_lsn: 0,
                log_only: false,
            })
            .await
            .expect("export")
            .into_inner();
        let chunks: Vec<_> = futures::StreamExt::collect::<Vec<_>>(export)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("export chunks");
        target
            .admin()
            .import(futures::stream::iter(chunks))
            .await
            .expect("import")
            .into_inner()
            .source_lsn
    }
}
