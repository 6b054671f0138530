//! Every bad request gets the right code and a message naming the field and the rule, and
//! changes nothing.

use cellplane_api::detail;
use cellplane_api::proto::control::{
    CreateTenantRequest, GetTenantRequest, MoveRouteRequest, RegisterCellRequest,
    SetCellStateRequest, Tier,
};
use cellplane_api::proto::routing::{BatchLookupRequest, LookupRequest, RouteKey, lookup_result};
use cellplane_tests::cluster::Cluster;
use tonic::Code;

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    match result {
        Ok(value) => panic!("expected {code:?} mentioning {needle:?}, got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "message {:?} should mention {needle:?}",
                status.message()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_code_and_change_nothing() {
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    // Ask a follower too: validation happens before forwarding.
    let follower = cluster
        .running_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    cluster
        .create_tenant(leader, "acme")
        .await
        .expect("create acme");
    let before = cluster.revision_without_audit(leader).await;

    for via in [leader, follower] {
        let mut control = cluster.control(via);
        let mut routing = cluster.routing(via);
        let create = |tenant_id: &str, tier: i32| CreateTenantRequest {
            tenant_id: tenant_id.into(),
            tier,
            home_region: "hz".into(),
        };
        assert_status(
            control.create_tenant(create("", 2)).await,
            Code::InvalidArgument,
            "tenant_id: must not be empty",
        );
        assert_status(
            control.create_tenant(create(&"t".repeat(129), 2)).await,
            Code::InvalidArgument,
            "tenant_id: must be at most 128 bytes, got 129",
        );
        assert_status(
            control.create_tenant(create("bad/id", 2)).await,
            Code::InvalidArgument,
            "tenant_id: may only contain",
        );
        assert_status(
            control.create_tenant(create("new", 0)).await,
            Code::InvalidArgument,
            "tier: must be HIGH, NORMAL or LOW",
        );
        assert_status(
            control.create_tenant(create("new", 17)).await,
            Code::InvalidArgument,
            "tier:",
        );
        assert_status(
            control.create_tenant(create("acme", 2)).await,
            Code::AlreadyExists,
            "tenant_id: tenant \"acme\" already exists",
        );
        assert_status(
            control
                .create_tenant(create("vip", Tier::High as i32))
                .await,
            Code::FailedPrecondition,
            "no ACTIVE cell of tier HIGH",
        );
        assert_status(
            control
                .get_tenant(GetTenantRequest {
                    tenant_id: "ghost".into(),
                })
                .await,
            Code::NotFound,
            "tenant_id: tenant \"ghost\" does not exist",
        );
        assert_status(
            routing
                .lookup(LookupRequest {
                    tenant_id: "ghost".into(),
                    conversation_id: "c".into(),
                    consistency: 1,
                })
                .await,
            Code::NotFound,
            "tenant_id",
        );
        assert_status(
            routing
                .lookup(LookupRequest {
                    tenant_id: "acme".into(),
                    conversation_id: "c c".into(),
                    consistency: 2,
                })
                .await,
            Code::InvalidArgument,
            "conversation_id: may only contain",
        );
        assert_status(
            routing
                .lookup(LookupRequest {
                    tenant_id: "acme".into(),
                    conversation_id: String::new(),
                    consistency: 9,
                })
                .await,
            Code::InvalidArgument,
            "consistency",
        );
        assert_status(
            control
                .set_cell_state(SetCellStateRequest {
                    cell_id: "nowhere".into(),
                    state: 2,
                })
                .await,
            Code::NotFound,
            "cell_id: cell \"nowhere\" does not exist",
        );
        assert_status(
            control
                .register_cell(RegisterCellRequest {
                    cell_id: "cell-a".into(),
                    region: "hz".into(),
                    zone: "z".into(),
                    tier: Tier::Low as i32,
                    endpoint: "127.0.0.1:1".into(),
                    capacity: 5,
                    standby_of: String::new(),
                })
                .await,
            Code::AlreadyExists,
            "cell_id: cell \"cell-a\" already exists",
        );
        // Standbys follow the tiers; each refusal names standby_of and its rule.
        let standby = |region: &str, zone: &str, tier: Tier, of: &str| RegisterCellRequest {
            cell_id: "cell-s".into(),
            region: region.into(),
            zone: zone.into(),
            tier: tier as i32,
            endpoint: "127.0.0.1:2".into(),
            capacity: 5,
            standby_of: of.into(),
        };
        let refusals = [
            (
                standby("hz", "a", Tier::Normal, "cell-a"),
                "must not share its primary's zone",
            ),
            (
                standby("hz", "c", Tier::High, "cell-a"),
                "must have its primary's tier NORMAL",
            ),
            (
                standby("bj", "a", Tier::Normal, "cell-a"),
                "only HIGH cells have a remote standby",
            ),
            (
                standby("hz", "c", Tier::Normal, "cell-x"),
                "cell \"cell-x\" is not registered",
            ),
        ];
        for (request, rule) in refusals {
            let refused = control.register_cell(request).await.expect_err(rule);
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(
                refused.message().starts_with("standby_of:") && refused.message().contains(rule),
                "{:?} should name standby_of and {rule:?}",
                refused.message()
            );
        }
        assert_status(
            control
                .register_cell(standby("hz", "c", Tier::Normal, "cell-s"))
                .await,
            Code::InvalidArgument,
            "standby_of: a cell cannot be its own standby",
        );

        let move_to = |target: &str, epoch: u64| MoveRouteRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
            expected_epoch: epoch,
            target_cell: target.into(),
        };
        assert_status(
            control.move_route(move_to("cell-x", 1)).await,
            Code::FailedPrecondition,
            "target_cell: cell \"cell-x\" is not registered",
        );
        let stale = control
            .move_route(move_to("cell-b", 7))
            .await
            .expect_err("stale epoch");
        assert_eq!(stale.code(), Code::Aborted);
        assert!(stale.message().contains("expected_epoch"), "{stale:?}");
        let current = detail::decode(&stale)
            .and_then(|d| d.current_route)
            .expect("current route in detail");
        assert_eq!(current.epoch, 1);
        assert_eq!(current.tenant_id, "acme");
        assert_status(
            control.move_route(move_to("cell-b", 0)).await,
            Code::InvalidArgument,
            "expected_epoch",
        );

        // A batch answers per key; one bad key does not fail the others.
        let batch = routing
            .batch_lookup(BatchLookupRequest {
                keys: vec![
                    RouteKey {
                        tenant_id: "acme".into(),
                        conversation_id: "c1".into(),
                    },
                    RouteKey {
                        tenant_id: "".into(),
                        conversation_id: "c1".into(),
                    },
                    RouteKey {
                        tenant_id: "ghost".into(),
                        conversation_id: "".into(),
                    },
                ],
                consistency: 1,
            })
            .await
            .expect("batch")
            .into_inner();
        let codes: Vec<Option<i32>> = batch
            .results
            .iter()
            .map(|r| match &r.result {
                Some(lookup_result::Result::Route(_)) => None,
                Some(lookup_result::Result::Error(e)) => Some(e.code),
                None => Some(-1),
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                None,
                Some(Code::InvalidArgument as i32),
                Some(Code::NotFound as i32)
            ]
        );
        match &batch.results[1].result {
            Some(lookup_result::Result::Error(e)) => {
                assert!(e.message.contains("keys[1].tenant_id"), "{e:?}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    // A draining cell takes no moves.
    let mut control = cluster.control(leader);
    control
        .set_cell_state(SetCellStateRequest {
            cell_id: "cell-b".into(),
            state: 3,
        })
        .await
        .expect("drain cell-b");
    let after_drain = cluster.revision_without_audit(leader).await;
    assert_eq!(
        after_drain,
        before + 1,
        "refused requests changed the state"
    );
    let target = control
        .get_tenant(GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("acme")
        .into_inner();
    let other = if target.primary_cell == "cell-a" {
        "cell-b"
    } else {
        "cell-a"
    };
    let refused = control
        .move_route(MoveRouteRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
            expected_epoch: 1,
            target_cell: other.into(),
        })
        .await;
    if other == "cell-b" {
        assert_status(refused, Code::FailedPrecondition, "is DRAINING");
    } else {
        // acme was on the draining cell; it may still move away from it.
        refused.expect("move off the draining cell");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migrations_each_get_their_own_code_and_change_nothing() {
    use cellplane_api::proto::control::{
        CancelMigrationRequest, GetMigrationRequest, MigrateConversationRequest,
        MigrateTenantRequest, ReportMigrationRequest, SetTenantTierRequest,
    };
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[
            ("cell-a", "a", Tier::Normal),
            ("cell-b", "b", Tier::Normal),
            ("cell-h", "c", Tier::High),
            ("cell-d", "d", Tier::Normal),
        ])
        .await;
    let leader = cluster.wait_for_leader().await;
    let mut control = cluster.control(leader);
    control
        .set_cell_state(SetCellStateRequest {
            cell_id: "cell-d".into(),
            state: cellplane_api::proto::control::CellState::Draining as i32,
        })
        .await
        .expect("drain cell-d");
    cluster
        .create_tenant(leader, "acme")
        .await
        .expect("create acme");
    let home = control
        .get_tenant(GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("tenant")
        .into_inner()
        .primary_cell;
    let other = if home == "cell-a" { "cell-b" } else { "cell-a" };
    let before = cluster.revision_without_audit(leader).await;
    let follower = cluster
        .running_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");

    for via in [leader, follower] {
        let mut control = cluster.control(via);
        let tenant = |tenant_id: &str, target: &str| MigrateTenantRequest {
            tenant_id: tenant_id.into(),
            target_cell: target.into(),
        };
        assert_status(
            control.migrate_tenant(tenant("nobody", other)).await,
            Code::NotFound,
            "tenant_id: tenant \"nobody\" does not exist",
        );
        assert_status(
            control.migrate_tenant(tenant("acme", "cell-zz")).await,
            Code::NotFound,
            "target_cell: cell \"cell-zz\" does not exist",
        );
        assert_status(
            control.migrate_tenant(tenant("acme", &home)).await,
            Code::InvalidArgument,
            "target_cell: must differ from the source",
        );
        assert_status(
            control.migrate_tenant(tenant("acme", "cell-d")).await,
            Code::FailedPrecondition,
            "is DRAINING",
        );
        assert_status(
            control.migrate_tenant(tenant("acme", "cell-h")).await,
            Code::FailedPrecondition,
            "is tier HIGH, tenant \"acme\" needs tier NORMAL",
        );
        assert_status(
            control.migrate_tenant(tenant("a b", other)).await,
            Code::InvalidArgument,
            "tenant_id:",
        );
        assert_status(
            control
                .migrate_conversation(MigrateConversationRequest {
                    tenant_id: "acme".into(),
                    conversation_id: String::new(),
                    target_cell: other.into(),
                })
                .await,
            Code::InvalidArgument,
            "conversation_id: must not be empty",
        );
        assert_status(
            control
                .set_tenant_tier(SetTenantTierRequest {
                    tenant_id: "acme".into(),
                    tier: Tier::Normal as i32,
                })
                .await,
            Code::FailedPrecondition,
            "tier: tenant \"acme\" is already NORMAL",
        );
        assert_status(
            control
                .set_tenant_tier(SetTenantTierRequest {
                    tenant_id: "acme".into(),
                    tier: 0,
                })
                .await,
            Code::InvalidArgument,
            "tier: must be HIGH, NORMAL or LOW",
        );
        assert_status(
            control
                .get_migration(GetMigrationRequest {
                    migration_id: "42".into(),
                })
                .await,
            Code::InvalidArgument,
            "migration_id: must be mig-<number>",
        );
        assert_status(
            control
                .cancel_migration(CancelMigrationRequest {
                    migration_id: "mig-999999".into(),
                })
                .await,
            Code::NotFound,
            "migration_id: migration mig-999999 does not exist",
        );
        assert_status(
            control
                .report_migration(ReportMigrationRequest {
                    migration_id: "mig-1".into(),
                    phase: 77,
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "phase: must be a migration phase",
        );
    }
    let after = cluster.revision_without_audit(leader).await;
    assert_eq!(before, after, "no refused migration changed the state");

    // One migration per tenant: a second one, of the tenant or one of its conversations, is
    // refused while the first runs.
    let first = control
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: "acme".into(),
            target_cell: other.into(),
        })
        .await
        .expect("first migration")
        .into_inner();
    assert_status(
        control
            .migrate_conversation(MigrateConversationRequest {
                tenant_id: "acme".into(),
                conversation_id: "hot".into(),
                target_cell: other.into(),
            })
            .await,
        Code::AlreadyExists,
        &format!("is already migrating ({}", first.migration_id),
    );
    assert_status(
        control
            .move_route(MoveRouteRequest {
                tenant_id: "acme".into(),
                conversation_id: String::new(),
                expected_epoch: 1,
                target_cell: other.into(),
            })
            .await,
        Code::FailedPrecondition,
        "is migrating",
    );
}
