//! Migrations under concurrent writers: no acknowledged message is lost or duplicated, the
//! route moves with one more epoch, the old owner points writers to the new one.

use std::collections::BTreeMap;
use std::time::Duration;

use cellplane_api::detail::wrong_cell;
use cellplane_api::proto::cell::GetHistoryRequest;
use cellplane_api::proto::control::{
    MigrateConversationRequest, MigrateTenantRequest, MigrationPhase, Tier,
};
use cellplane_api::proto::routing::WatchRequest;
use cellplane_tests::measure::ms;

use super::{System, phase_name};
use cellplane_tests::traffic::{
    MEMBERS, Writers, conversation, create_groups, history, send_request, verify,
};

const TENANT: &str = "acme";
const WRITERS: usize = 16;
const CONVERSATIONS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_lose_nothing_while_a_tenant_and_then_one_conversation_move() {
    let system = System::start(&[(
        "hz",
        &[
            ("hz-a-normal-1", "a", "NORMAL"),
            ("hz-b-normal-2", "b", "NORMAL"),
        ],
    )])
    .await;
    let source = system.create_tenant(TENANT, Tier::Normal, "hz").await;
    assert_eq!(source, "hz-a-normal-1", "placement breaks ties by cell id");
    let target = "hz-b-normal-2";
    let (routes, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;

    // A watch from before the migrations, to see the switches as every IM service would.
    let leader = system.cluster.wait_for_leader().await;
    let mut watch = system
        .cluster
        .routing(leader)
        .watch(WatchRequest { from_revision: 0 })
        .await
        .expect("watch")
        .into_inner();

    let writers = Writers::start(messenger.clone(), TENANT, "run", WRITERS, CONVERSATIONS);
    writers.let_write(500).await;

    let migration = system
        .cluster
        .control(leader)
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: TENANT.into(),
            target_cell: target.into(),
        })
        .await
        .expect("migrate tenant")
        .into_inner();
    assert_eq!(migration.source_cell, source);
    assert_eq!(migration.source_epoch, 1);
    let done = system
        .wait_for_migration(&migration.migration_id, Duration::from_secs(60))
        .await;
    assert_eq!(phase_name(&done), "MIGRATION_PHASE_DONE", "{done:?}");
    let tenant_pause = done.switched_ms.saturating_sub(done.frozen_ms);
    writers.let_write(500).await;

    // The hottest conversation moves back to the first cell on its own.
    let hot = conversation(0);
    let leader = system.cluster.wait_for_leader().await;
    let back = system
        .cluster
        .control(leader)
        .migrate_conversation(MigrateConversationRequest {
            tenant_id: TENANT.into(),
            conversation_id: hot.clone(),
            target_cell: source.clone(),
        })
        .await
        .expect("migrate conversation")
        .into_inner();
    assert_eq!((back.source_cell.as_str(), back.source_epoch), (target, 2));
    let back_done = system
        .wait_for_migration(&back.migration_id, Duration::from_secs(60))
        .await;
    assert_eq!(
        phase_name(&back_done),
        "MIGRATION_PHASE_DONE",
        "{back_done:?}"
    );
    writers.let_write(500).await;
    let (acks, mut latencies) = writers.stop().await;

    // Routes: the tenant on the target at epoch 2, the hot group back on the source at 3.
    let tenant_route = routes.lookup(TENANT, "c1").expect("tenant route");
    assert_eq!(
        (tenant_route.cell_id.as_str(), tenant_route.epoch),
        (target, 2)
    );
    let hot_route = routes.lookup(TENANT, &hot).expect("hot route");
    assert_eq!(
        (
            hot_route.cell_id.as_str(),
            hot_route.epoch,
            hot_route.is_override
        ),
        (source.as_str(), 3, true)
    );

    // Every acknowledged message is in its owner's history exactly once, in seq order, and
    // the history holds nothing else.
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;

    // The source dropped the moved tenant's rows in CLEANUP, all but the group that came back.
    let agent = system.agent("hz");
    let mut old = agent.cell(&source).messaging();
    let gone = old
        .get_history(GetHistoryRequest {
            tenant_id: TENANT.into(),
            conversation_id: "c5".into(),
            user_id: MEMBERS[0].into(),
            before_seq: 0,
            limit: 10,
        })
        .await
        .expect_err("the source no longer holds c5");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    let (_, mut new) = messenger.owner(TENANT, "c5").expect("owner");
    assert!(!history(&mut new, TENANT, "c5").await.is_empty());

    // The old owner refuses later writes and names the new one.
    let mut late = send_request(TENANT, "c5", MEMBERS[0], "late", b"too late".to_vec());
    late.route_epoch = 1;
    let refused = old
        .send_message(late)
        .await
        .expect_err("the source no longer owns the tenant");
    let detail = wrong_cell(&refused).expect("WRONG_CELL detail");
    assert_eq!(
        (detail.current_cell_id.as_str(), detail.current_epoch),
        (target, 2)
    );

    // The watch announced both switches.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("watch keeps up")
            .expect("watch stream")
            .expect("watch open");
        for event in message.events {
            let route = event.route.expect("route");
            if route.tenant_id == TENANT && route.epoch > 1 {
                seen.push((route.conversation_id, route.cell_id, route.epoch));
            }
        }
    }
    assert_eq!(
        seen,
        vec![
            (String::new(), target.to_string(), 2),
            (hot.clone(), source.clone(), 3)
        ]
    );
    assert_eq!(
        MigrationPhase::try_from(done.phase),
        Ok(MigrationPhase::Done)
    );
    println!(
        "{} acknowledged sends; send latency p50 {} p99 {} max {}; write pause (FREEZING → SWITCHING) tenant {} ms, conversation {} ms",
        acks.len(),
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.percentile(100.0)),
        tenant_pause,
        back_done.switched_ms.saturating_sub(back_done.frozen_ms)
    );
}
