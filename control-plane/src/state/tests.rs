use std::sync::Arc;

use super::ControlState;
use super::command::{Command, CommandError, CommandOutput};
use super::history::EventKind;
use super::model::{CellState, RouteKey, Tier};

fn register(state: &mut ControlState, cell_id: &str, zone: &str, tier: Tier, capacity: u64) {
    let (result, _) = state.apply(&Command::RegisterCell {
        cell_id: Arc::from(cell_id),
        region: Arc::from("hz"),
        zone: Arc::from(zone),
        tier,
        endpoint: Arc::from(format!("127.0.0.1:{}", 7000 + state.cells().len())),
        capacity,
        standby_of: None,
    });
    result.expect("register");
    let (result, _) = state.apply(&Command::SetCellState {
        cell_id: Arc::from(cell_id),
        state: CellState::Active,
    });
    result.expect("activate");
}

fn create(
    state: &mut ControlState,
    tenant_id: &str,
    tier: Tier,
) -> Result<CommandOutput, CommandError> {
    state
        .apply(&Command::CreateTenant {
            tenant_id: Arc::from(tenant_id),
            tier,
            home_region: Arc::from("hz"),
        })
        .0
}

fn two_cells() -> ControlState {
    let mut state = ControlState::default();
    register(&mut state, "cell-a", "a", Tier::Normal, 100);
    register(&mut state, "cell-b", "b", Tier::Normal, 100);
    state
}

#[test]
fn every_applied_command_bumps_the_revision_and_refusals_do_not() {
    let mut state = two_cells();
    assert_eq!(state.revision(), 4);
    create(&mut state, "acme", Tier::Normal).expect("create");
    assert_eq!(state.revision(), 5);
    let refused = create(&mut state, "acme", Tier::Normal);
    assert!(matches!(refused, Err(CommandError::AlreadyExists { .. })));
    assert_eq!(state.revision(), 5);
}

#[test]
fn create_tenant_places_on_its_tier_and_reports_missing_capacity() {
    let mut state = two_cells();
    let created = create(&mut state, "acme", Tier::Normal).expect("create");
    let CommandOutput::Tenant(tenant) = created else {
        panic!("expected a tenant, got {created:?}");
    };
    assert_eq!(tenant.record.epoch, 1);
    assert_eq!(state.cells().get("cell-a").map(|c| c.load), Some(1));

    let err = create(&mut state, "bigco", Tier::High).expect_err("no HIGH cell");
    let CommandError::FailedPrecondition(message) = err else {
        panic!("expected FailedPrecondition, got {err:?}");
    };
    assert!(
        message.contains("HIGH") && message.contains("hz"),
        "{message}"
    );
}

#[test]
fn move_route_is_a_compare_and_set_on_the_epoch() {
    let mut state = two_cells();
    create(&mut state, "acme", Tier::Normal).expect("create");
    let key = RouteKey::tenant("acme");
    let (moved, events) = state.apply(&Command::MoveRoute {
        key: key.clone(),
        expected_epoch: 1,
        target_cell: Arc::from("cell-b"),
    });
    let CommandOutput::Route(route) = moved.expect("move") else {
        panic!("expected a route");
    };
    assert_eq!((route.cell_id.as_ref(), route.epoch), ("cell-b", 2));
    assert_eq!(events.len(), 1);
    assert_eq!(state.cells().get("cell-a").map(|c| c.load), Some(0));
    assert_eq!(state.cells().get("cell-b").map(|c| c.load), Some(1));

    let revision = state.revision();
    let (stale, events) = state.apply(&Command::MoveRoute {
        key: key.clone(),
        expected_epoch: 1,
        target_cell: Arc::from("cell-a"),
    });
    match stale {
        Err(CommandError::StaleEpoch { current, .. }) => {
            assert_eq!((current.cell_id.as_ref(), current.epoch), ("cell-b", 2));
        }
        other => panic!("expected StaleEpoch, got {other:?}"),
    }
    assert!(events.is_empty());
    assert_eq!(state.revision(), revision, "a refused move changes nothing");
}

#[test]
fn moves_only_to_registered_active_cells_other_than_the_owner() {
    let mut state = two_cells();
    create(&mut state, "acme", Tier::Normal).expect("create");
    let attempt = |state: &mut ControlState, target: &str| {
        state
            .apply(&Command::MoveRoute {
                key: RouteKey::tenant("acme"),
                expected_epoch: 1,
                target_cell: Arc::from(target),
            })
            .0
    };
    assert!(
        matches!(attempt(&mut state, "nowhere"), Err(CommandError::FailedPrecondition(m)) if m.contains("not registered"))
    );
    assert!(
        matches!(attempt(&mut state, "cell-a"), Err(CommandError::FailedPrecondition(m)) if m.contains("already routed"))
    );
    state
        .apply(&Command::SetCellState {
            cell_id: Arc::from("cell-b"),
            state: CellState::Draining,
        })
        .0
        .expect("drain");
    assert!(
        matches!(attempt(&mut state, "cell-b"), Err(CommandError::FailedPrecondition(m)) if m.contains("DRAINING"))
    );
}

#[test]
fn overrides_win_over_placement_and_their_epoch_never_goes_back() {
    let mut state = two_cells();
    create(&mut state, "acme", Tier::Normal).expect("create");
    let conversation = RouteKey::conversation("acme", "big-group");
    let (result, _) = state.apply(&Command::MoveRoute {
        key: conversation.clone(),
        expected_epoch: 1,
        target_cell: Arc::from("cell-b"),
    });
    result.expect("override");
    let route = state.resolve(&conversation).expect("resolve");
    assert!(route.is_override);
    assert_eq!((route.cell_id.as_ref(), route.epoch), ("cell-b", 2));
    let other = state
        .resolve(&RouteKey::conversation("acme", "small"))
        .expect("resolve");
    assert_eq!(
        (other.cell_id.as_ref(), other.epoch, other.is_override),
        ("cell-a", 1, false)
    );
    assert_eq!(
        state.tenants().get("acme").map(|t| t.override_count),
        Some(1)
    );
}

#[test]
fn delete_tenant_removes_overrides_and_emits_deletes_at_one_revision() {
    let mut state = two_cells();
    create(&mut state, "acme", Tier::Normal).expect("create");
    for conversation in ["g1", "g2"] {
        state
            .apply(&Command::MoveRoute {
                key: RouteKey::conversation("acme", conversation),
                expected_epoch: 1,
                target_cell: Arc::from("cell-b"),
            })
            .0
            .expect("override");
    }
    let (result, events) = state.apply(&Command::DeleteTenant {
        tenant_id: Arc::from("acme"),
    });
    result.expect("delete");
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|e| e.kind == EventKind::Delete && e.revision == state.revision())
    );
    assert!(state.overrides().is_empty());
    assert!(matches!(
        state.resolve(&RouteKey::tenant("acme")),
        Err(CommandError::NotFound { .. })
    ));
    assert_eq!(state.cells().get("cell-a").map(|c| c.load), Some(0));
}

#[test]
fn routes_page_through_placements_and_overrides_in_key_order() {
    let mut state = ControlState::default();
    register(&mut state, "cell-a", "a", Tier::Normal, 1000);
    register(&mut state, "cell-b", "b", Tier::Normal, 1000);
    for tenant in ["t1", "t2", "t3"] {
        create(&mut state, tenant, Tier::Normal).expect("create");
    }
    for (tenant, conversation) in [("t1", "c1"), ("t1", "c2"), ("t3", "c9")] {
        state
            .apply(&Command::MoveRoute {
                key: RouteKey::conversation(tenant, conversation),
                expected_epoch: 1,
                target_cell: Arc::from("cell-b"),
            })
            .0
            .expect("override");
    }
    let mut seen = Vec::new();
    let mut after: Option<RouteKey> = None;
    loop {
        let page = state.routes_after(after.as_ref(), 2);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.key.clone());
        seen.extend(page.into_iter().map(|r| r.key.to_string()));
    }
    assert_eq!(seen, ["t1", "t1/c1", "t1/c2", "t2", "t3", "t3/c9"]);
}

#[test]
fn registering_the_same_cell_again_is_idempotent_but_a_different_one_is_refused() {
    let mut state = two_cells();
    let same = state.cells().get("cell-a").cloned().expect("cell");
    let (again, _) = state.apply(&Command::RegisterCell {
        cell_id: Arc::from("cell-a"),
        region: same.region.clone(),
        zone: same.zone.clone(),
        tier: same.tier,
        endpoint: same.endpoint.clone(),
        capacity: same.capacity,
        standby_of: None,
    });
    assert!(again.is_ok());
    let (different, _) = state.apply(&Command::RegisterCell {
        cell_id: Arc::from("cell-a"),
        region: same.region.clone(),
        zone: same.zone.clone(),
        tier: Tier::Low,
        endpoint: same.endpoint.clone(),
        capacity: same.capacity,
        standby_of: None,
    });
    assert!(matches!(different, Err(CommandError::AlreadyExists { .. })));
}

/// Registers `cell_id` in `region`/`zone` as a standby of `primary`; the refusal's message.
fn register_standby(
    state: &mut ControlState,
    cell_id: &str,
    (region, zone): (&str, &str),
    tier: Tier,
    primary: &str,
) -> Result<(), String> {
    let (result, _) = state.apply(&Command::RegisterCell {
        cell_id: Arc::from(cell_id),
        region: Arc::from(region),
        zone: Arc::from(zone),
        tier,
        endpoint: Arc::from("127.0.0.1:9"),
        capacity: 10,
        standby_of: Some(Arc::from(primary)),
    });
    match result {
        Ok(_) => Ok(()),
        Err(CommandError::FailedPrecondition(message)) => Err(message),
        Err(other) => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
}

#[test]
fn standbys_follow_the_tiers() {
    let mut state = ControlState::default();
    register(&mut state, "high", "a", Tier::High, 10);
    register(&mut state, "normal", "a", Tier::Normal, 10);
    register(&mut state, "low", "a", Tier::Low, 10);
    let refused = |result: Result<(), String>, rule: &str| {
        let message = result.expect_err("refused");
        assert!(
            message.starts_with("standby_of:") && message.contains(rule),
            "{message:?} should name standby_of and {rule:?}"
        );
    };
    let revision = state.revision();
    refused(
        register_standby(&mut state, "s", ("hz", "a"), Tier::High, "high"),
        "zone",
    );
    refused(
        register_standby(&mut state, "s", ("hz", "b"), Tier::Normal, "high"),
        "tier HIGH",
    );
    refused(
        register_standby(&mut state, "s", ("hz", "b"), Tier::Low, "low"),
        "no standby",
    );
    refused(
        register_standby(&mut state, "s", ("bj", "a"), Tier::Normal, "normal"),
        "only HIGH cells have a remote standby",
    );
    refused(
        register_standby(&mut state, "s", ("hz", "b"), Tier::High, "nobody"),
        "not registered",
    );
    assert_eq!(state.revision(), revision, "refusals change nothing");

    register_standby(&mut state, "high-b", ("hz", "b"), Tier::High, "high").expect("in-region");
    register_standby(&mut state, "high-bj", ("bj", "a"), Tier::High, "high").expect("remote");
    register_standby(&mut state, "normal-b", ("hz", "b"), Tier::Normal, "normal")
        .expect("in-region");
    refused(
        register_standby(&mut state, "high-c", ("hz", "c"), Tier::High, "high"),
        "already has its in-region standby",
    );
    refused(
        register_standby(&mut state, "high-sh", ("sh", "a"), Tier::High, "high"),
        "already has its remote standby",
    );
    refused(
        register_standby(&mut state, "chained", ("hz", "c"), Tier::High, "high-b"),
        "is itself a standby",
    );
}

#[test]
fn protection_is_recorded_for_primaries_at_its_revision() {
    use super::model::Protection;
    let mut state = ControlState::default();
    register(&mut state, "primary", "a", Tier::Normal, 10);
    register_standby(&mut state, "standby", ("hz", "b"), Tier::Normal, "primary").expect("standby");
    let record = |state: &mut ControlState, cell: &str, protection| {
        state
            .apply(&Command::RecordProtection {
                cell_id: Arc::from(cell),
                protection,
            })
            .0
    };
    let Ok(CommandOutput::Cell(view)) = record(&mut state, "primary", Protection::Degraded) else {
        panic!("recorded");
    };
    let recorded = view.protection.expect("protection");
    assert_eq!(recorded.protection, Protection::Degraded);
    assert_eq!(recorded.revision, state.revision());
    assert_eq!(view.standbys, vec![Arc::<str>::from("standby")]);
    let before = state.revision();
    let refused = record(&mut state, "standby", Protection::InSync);
    assert!(
        matches!(refused, Err(CommandError::FailedPrecondition(ref m)) if m.contains("standby"))
    );
    assert!(matches!(
        record(&mut state, "nobody", Protection::InSync),
        Err(CommandError::NotFound { .. })
    ));
    assert_eq!(state.revision(), before, "refusals change nothing");
}

#[test]
fn a_standby_is_never_placed_on_nor_routed_to() {
    let mut state = ControlState::default();
    register(&mut state, "primary", "a", Tier::Normal, 10);
    register_standby(&mut state, "standby", ("hz", "b"), Tier::Normal, "primary").expect("standby");
    state
        .apply(&Command::SetCellState {
            cell_id: Arc::from("standby"),
            state: CellState::Active,
        })
        .0
        .expect("activate");
    for i in 0..5 {
        create(&mut state, &format!("t{i}"), Tier::Normal).expect("create");
        let route = state
            .resolve(&RouteKey::tenant(format!("t{i}")))
            .expect("route");
        assert_eq!(&*route.cell_id, "primary");
    }
    let (moved, _) = state.apply(&Command::MoveRoute {
        key: RouteKey::tenant("t0"),
        expected_epoch: 1,
        target_cell: Arc::from("standby"),
    });
    assert!(
        matches!(moved, Err(CommandError::FailedPrecondition(ref m)) if m.contains("is a standby")),
        "{moved:?}"
    );
}

#[test]
fn compaction_cannot_pass_the_current_revision() {
    let mut state = two_cells();
    create(&mut state, "acme", Tier::Normal).expect("create");
    let current = state.revision();
    let (refused, _) = state.apply(&Command::Compact {
        revision: current + 1,
    });
    assert!(matches!(refused, Err(CommandError::Invalid { ref field, .. }) if field == "revision"));
    state
        .apply(&Command::Compact { revision: current })
        .0
        .expect("compact");
    assert!(state.events_since(current).is_err());
    assert_eq!(state.events_since(current + 1).map(|e| e.len()), Ok(0));
}

mod migrations {
    use super::*;
    use crate::migration::record::{Phase, Progress};

    fn start(
        state: &mut ControlState,
        key: RouteKey,
        target: Option<&str>,
        new_tier: Option<Tier>,
    ) -> Result<(u64, crate::migration::record::MigrationRecord), CommandError> {
        match state
            .apply(&Command::StartMigration {
                key,
                target_cell: target.map(Arc::from),
                new_tier,
                now_ms: 1,
            })
            .0?
        {
            CommandOutput::Migration(view) => Ok((view.id, view.record)),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn advance(
        state: &mut ControlState,
        id: u64,
        from: Phase,
        to: Phase,
        progress: Progress,
    ) -> Result<CommandOutput, CommandError> {
        state
            .apply(&Command::AdvanceMigration {
                id,
                from,
                to,
                progress,
                error: None,
                now_ms: 2,
                purge_after_ms: Some(2),
            })
            .0
    }

    fn at(copied: u64, frozen: u64) -> Progress {
        Progress {
            copied_lsn: copied,
            source_lsn: copied,
            frozen_lsn: frozen,
            ..Progress::default()
        }
    }

    #[test]
    fn bad_migrations_are_refused_each_with_its_reason() {
        let mut state = two_cells();
        register(&mut state, "cell-h", "c", Tier::High, 100);
        create(&mut state, "acme", Tier::Normal).expect("create");
        let tenant = || RouteKey::tenant("acme");
        assert!(matches!(
            start(&mut state, RouteKey::tenant("nobody"), Some("cell-b"), None),
            Err(CommandError::NotFound { .. })
        ));
        assert!(matches!(
            start(&mut state, tenant(), Some("cell-zz"), None),
            Err(CommandError::Dangling { .. })
        ));
        assert!(matches!(
            start(&mut state, tenant(), Some("cell-a"), None),
            Err(CommandError::Invalid { ref field, .. }) if field == "target_cell"
        ));
        assert!(matches!(
            start(&mut state, tenant(), Some("cell-h"), None),
            Err(CommandError::FailedPrecondition(ref m)) if m.contains("tier HIGH")
        ));
        state
            .apply(&Command::SetCellState {
                cell_id: Arc::from("cell-b"),
                state: CellState::Draining,
            })
            .0
            .expect("drain");
        assert!(matches!(
            start(&mut state, tenant(), Some("cell-b"), None),
            Err(CommandError::FailedPrecondition(ref m)) if m.contains("DRAINING")
        ));
        let revision = state.revision();
        assert!(
            start(&mut state, tenant(), None, None).is_err(),
            "placement finds no other ACTIVE NORMAL cell"
        );
        assert_eq!(state.revision(), revision, "refusals change nothing");
    }

    #[test]
    fn a_migration_switches_the_route_once_the_target_has_everything() {
        let mut state = two_cells();
        create(&mut state, "acme", Tier::Normal).expect("create");
        let (id, m) = start(&mut state, RouteKey::tenant("acme"), None, None).expect("start");
        assert_eq!((m.source.as_ref(), m.target.as_ref()), ("cell-a", "cell-b"));
        assert_eq!(m.source_epoch, 1);
        assert!(
            matches!(
                start(
                    &mut state,
                    RouteKey::conversation("acme", "c1"),
                    Some("cell-b"),
                    None
                ),
                Err(CommandError::Busy(_))
            ),
            "one migration per tenant at a time"
        );
        assert!(
            state
                .apply(&Command::MoveRoute {
                    key: RouteKey::tenant("acme"),
                    expected_epoch: 1,
                    target_cell: Arc::from("cell-b"),
                })
                .0
                .is_err(),
            "a migrating tenant's route does not move by hand"
        );
        advance(&mut state, id, Phase::Planned, Phase::Copying, at(0, 0)).expect("copy");
        assert!(
            advance(&mut state, id, Phase::Planned, Phase::Copying, at(0, 0)).is_err(),
            "phase changes compare the phase first"
        );
        advance(&mut state, id, Phase::Copying, Phase::CatchingUp, at(10, 0)).expect("catch up");
        advance(
            &mut state,
            id,
            Phase::CatchingUp,
            Phase::Freezing,
            at(10, 0),
        )
        .expect("freeze");
        let early = advance(
            &mut state,
            id,
            Phase::Freezing,
            Phase::Switching,
            at(11, 12),
        );
        assert!(
            early.is_err(),
            "no switch before the target reached the freeze LSN"
        );
        assert_eq!(
            state
                .resolve(&RouteKey::tenant("acme"))
                .expect("route")
                .epoch,
            1
        );
        let (result, events) = state.apply(&Command::AdvanceMigration {
            id,
            from: Phase::Freezing,
            to: Phase::Switching,
            progress: at(12, 12),
            error: None,
            now_ms: 3,
            purge_after_ms: Some(3),
        });
        result.expect("switch");
        let route = state.resolve(&RouteKey::tenant("acme")).expect("route");
        assert_eq!((route.cell_id.as_ref(), route.epoch), ("cell-b", 2));
        assert_eq!(events.len(), 1, "the switch is announced to watches");
        assert!(
            advance(
                &mut state,
                id,
                Phase::Switching,
                Phase::RolledBack,
                at(12, 12)
            )
            .is_err(),
            "no rollback after the switch"
        );
        advance(&mut state, id, Phase::Switching, Phase::Cleanup, at(12, 12)).expect("cleanup");
        advance(&mut state, id, Phase::Cleanup, Phase::Done, at(12, 12)).expect("done");
        assert_eq!(
            state.tenants().get("acme").map(|t| t.state),
            Some(super::super::model::TenantState::Active)
        );
        assert_eq!(state.cells().get("cell-b").map(|c| c.load), Some(1));
        assert_eq!(state.cells().get("cell-a").map(|c| c.load), Some(0));
    }

    #[test]
    fn a_conversation_moves_alone_and_a_tier_change_applies_at_the_switch() {
        let mut state = two_cells();
        register(&mut state, "cell-h", "c", Tier::High, 100);
        create(&mut state, "acme", Tier::Normal).expect("create");
        let key = RouteKey::conversation("acme", "hot");
        let (id, _) = start(&mut state, key.clone(), Some("cell-b"), None).expect("start");
        for (from, to) in [
            (Phase::Planned, Phase::Copying),
            (Phase::Copying, Phase::CatchingUp),
            (Phase::CatchingUp, Phase::Freezing),
            (Phase::Freezing, Phase::Switching),
        ] {
            advance(&mut state, id, from, to, at(5, 5)).expect("advance");
        }
        let route = state.resolve(&key).expect("route");
        assert_eq!(
            (route.cell_id.as_ref(), route.epoch, route.is_override),
            ("cell-b", 2, true)
        );
        let tenant = state.resolve(&RouteKey::tenant("acme")).expect("tenant");
        assert_eq!((tenant.cell_id.as_ref(), tenant.epoch), ("cell-a", 1));
        advance(&mut state, id, Phase::Switching, Phase::Cleanup, at(5, 5)).expect("cleanup");
        advance(&mut state, id, Phase::Cleanup, Phase::Done, at(5, 5)).expect("done");

        let (id, m) = start(&mut state, RouteKey::tenant("acme"), None, Some(Tier::High))
            .expect("tier change");
        assert_eq!(m.target.as_ref(), "cell-h");
        assert_eq!(
            state.tenants().get("acme").map(|t| t.tier),
            Some(Tier::Normal)
        );
        for (from, to) in [
            (Phase::Planned, Phase::Copying),
            (Phase::Copying, Phase::CatchingUp),
            (Phase::CatchingUp, Phase::Freezing),
            (Phase::Freezing, Phase::Switching),
        ] {
            advance(&mut state, id, from, to, at(9, 9)).expect("advance");
        }
        assert_eq!(
            state.tenants().get("acme").map(|t| t.tier),
            Some(Tier::High)
        );
    }

    #[test]
    fn only_the_newest_finished_migrations_are_kept() {
        use crate::limits::MAX_FINISHED_MIGRATIONS;
        let mut state = two_cells();
        create(&mut state, "acme", Tier::Normal).expect("create");
        let mut first = None;
        for _ in 0..=MAX_FINISHED_MIGRATIONS {
            let (id, _) =
                start(&mut state, RouteKey::tenant("acme"), Some("cell-b"), None).expect("start");
            first.get_or_insert(id);
            advance(&mut state, id, Phase::Planned, Phase::RolledBack, at(0, 0)).expect("cancel");
        }
        assert_eq!(state.migrations().len(), MAX_FINISHED_MIGRATIONS);
        assert!(
            !state
                .migrations()
                .contains_key(&first.expect("a migration")),
            "the oldest finished migration is forgotten"
        );
    }

    #[test]
    fn a_rolled_back_migration_leaves_the_route_alone() {
        let mut state = two_cells();
        create(&mut state, "acme", Tier::Normal).expect("create");
        let (id, _) =
            start(&mut state, RouteKey::tenant("acme"), Some("cell-b"), None).expect("start");
        advance(&mut state, id, Phase::Planned, Phase::RolledBack, at(0, 0)).expect("cancel");
        let route = state.resolve(&RouteKey::tenant("acme")).expect("route");
        assert_eq!((route.cell_id.as_ref(), route.epoch), ("cell-a", 1));
        start(&mut state, RouteKey::tenant("acme"), Some("cell-b"), None)
            .expect("a finished migration no longer blocks the tenant");
    }
}

#[test]
fn a_tenant_created_again_starts_above_every_epoch_of_the_deleted_one() {
    let mut state = two_cells();
    create(&mut state, "acme", Tier::Normal).expect("create");
    let hot = RouteKey::conversation("acme", "hot");
    state
        .apply(&Command::MoveRoute {
            key: hot.clone(),
            expected_epoch: 1,
            target_cell: Arc::from("cell-b"),
        })
        .0
        .expect("move the hot group");
    assert_eq!(state.resolve(&hot).expect("route").epoch, 2);
    state
        .apply(&Command::DeleteTenant {
            tenant_id: Arc::from("acme"),
        })
        .0
        .expect("delete");
    create(&mut state, "acme", Tier::Normal).expect("create again");
    let again = state.resolve(&hot).expect("route");
    assert_eq!(
        again.epoch, 3,
        "a writer holding epoch 1 or 2 of the deleted tenant is fenced off"
    );
    assert!(state.retired().is_empty(), "the tombstone is consumed");
}

/// Replays each command's record changes into a second state, as the etcd mirror does, and
/// checks both states and their route events agree: the counters the records leave out
/// (load, override counts) come back the same.
#[test]
fn record_changes_rebuild_the_same_state_and_events() {
    use super::records::RecordKey;
    let mut state = ControlState::default();
    let mut mirror = ControlState::default();
    let mut created: std::collections::HashMap<RecordKey, u64> = Default::default();
    let mut step = |state: &mut ControlState, mirror: &mut ControlState, command: Command| {
        let before = state.clone();
        let (result, events) = state.apply(&command);
        result.expect("command applies");
        let revision = state.revision();
        let mut replayed = Vec::new();
        for change in state.changes_since(&before) {
            match change.record {
                Some(record) => {
                    let first = *created.entry(change.key.clone()).or_insert(revision);
                    let event = mirror
                        .put_record(change.key, record, revision, first)
                        .expect("kinds match");
                    replayed.extend(event);
                }
                None => {
                    created.remove(&change.key);
                    replayed.extend(mirror.delete_record(&change.key, revision));
                }
            }
        }
        mirror.advance_to(revision);
        let shape = |events: &[super::history::RouteEvent]| -> Vec<(String, String, u64, bool)> {
            let mut shaped: Vec<_> = events
                .iter()
                .map(|e| {
                    (
                        e.route.key.to_string(),
                        e.route.cell_id.to_string(),
                        e.route.epoch,
                        e.kind == EventKind::Put,
                    )
                })
                .collect();
            shaped.sort();
            shaped
        };
        assert_eq!(shape(&events), shape(&replayed), "{command:?}");
    };
    for (cell, zone) in [("cell-a", "a"), ("cell-b", "b")] {
        step(
            &mut state,
            &mut mirror,
            Command::RegisterCell {
                cell_id: Arc::from(cell),
                region: Arc::from("hz"),
                zone: Arc::from(zone),
                tier: Tier::Normal,
                endpoint: Arc::from(format!("{cell}:1")),
                capacity: 10,
                standby_of: None,
            },
        );
        step(
            &mut state,
            &mut mirror,
            Command::SetCellState {
                cell_id: Arc::from(cell),
                state: CellState::Active,
            },
        );
    }
    for tenant in ["t1", "t2", "t3"] {
        step(
            &mut state,
            &mut mirror,
            Command::CreateTenant {
                tenant_id: Arc::from(tenant),
                tier: Tier::Normal,
                home_region: Arc::from("hz"),
            },
        );
    }
    let t1 = state.resolve(&RouteKey::tenant("t1")).expect("t1");
    let other = if &*t1.cell_id == "cell-a" {
        "cell-b"
    } else {
        "cell-a"
    };
    step(
        &mut state,
        &mut mirror,
        Command::MoveRoute {
            key: RouteKey::tenant("t1"),
            expected_epoch: 1,
            target_cell: Arc::from(other),
        },
    );
    for conversation in ["g1", "g2"] {
        let current = state
            .resolve(&RouteKey::conversation("t2", conversation))
            .expect("route");
        let target = if &*current.cell_id == "cell-a" {
            "cell-b"
        } else {
            "cell-a"
        };
        step(
            &mut state,
            &mut mirror,
            Command::MoveRoute {
                key: RouteKey::conversation("t2", conversation),
                expected_epoch: current.epoch,
                target_cell: Arc::from(target),
            },
        );
    }
    step(
        &mut state,
        &mut mirror,
        Command::StartMigration {
            key: RouteKey::tenant("t3"),
            target_cell: None,
            new_tier: None,
            now_ms: 1,
        },
    );
    step(
        &mut state,
        &mut mirror,
        Command::DeleteTenant {
            tenant_id: Arc::from("t2"),
        },
    );
    // Three audit writes into a log of two: the oldest entries are deleted records.
    for round in 0..3u64 {
        step(
            &mut state,
            &mut mirror,
            Command::Audit {
                entries: vec![crate::audit::entry::AuditEntry {
                    at_ms: round,
                    identity: Arc::from("ops"),
                    peer: Arc::from("127.0.0.1:9"),
                    method: Arc::from("Control/DeleteTenant"),
                    request: "{ tenant_id: \"t2\" }".into(),
                    code: 0,
                    message: String::new(),
                    node_id: 1,
                }],
                keep: 2,
            },
        );
    }
    assert_eq!(mirror.audit(), state.audit());
    assert_eq!(state.audit().len(), 2);
    step(
        &mut state,
        &mut mirror,
        Command::CreateTenant {
            tenant_id: Arc::from("t2"),
            tier: Tier::Normal,
            home_region: Arc::from("hz"),
        },
    );
    for protection in [
        super::model::Protection::CatchingUp,
        super::model::Protection::InSync,
    ] {
        step(
            &mut state,
            &mut mirror,
            Command::RecordProtection {
                cell_id: Arc::from("cell-a"),
                protection,
            },
        );
    }
    step(
        &mut state,
        &mut mirror,
        Command::Report {
            cell_id: Arc::from("cell-a"),
            health: Default::default(),
            replication: Some(super::model::ReplicationHealth::default()),
        },
    );
    // A standby of cell-a, leases, and a failover that moves cell-a's keys to it.
    step(
        &mut state,
        &mut mirror,
        Command::RegisterCell {
            cell_id: Arc::from("cell-c"),
            region: Arc::from("hz"),
            zone: Arc::from("c"),
            tier: Tier::Normal,
            endpoint: Arc::from("cell-c:1"),
            capacity: 10,
            standby_of: Some(Arc::from("cell-a")),
        },
    );
    step(
        &mut state,
        &mut mirror,
        Command::SetCellState {
            cell_id: Arc::from("cell-c"),
            state: CellState::Active,
        },
    );
    step(
        &mut state,
        &mut mirror,
        Command::RenewLeases {
            cells: vec![Arc::from("cell-a"), Arc::from("cell-c")],
            lease_ms: 2_000,
        },
    );
    step(
        &mut state,
        &mut mirror,
        Command::StartFailover {
            cell_id: Arc::from("cell-a"),
            standby: None,
            mode: crate::failover::record::Mode::Forced,
            reason: "test".into(),
            automatic: true,
            expected_renewals: Some(1),
            now_ms: 5,
        },
    );
    assert_eq!(mirror.protection(), state.protection());
    assert_eq!(mirror.replication(), state.replication());
    assert_eq!(mirror.leases(), state.leases());
    assert_eq!(
        mirror
            .failovers()
            .values()
            .map(|f| (f.phase, f.keys_moved))
            .collect::<Vec<_>>(),
        state
            .failovers()
            .values()
            .map(|f| (f.phase, f.keys_moved))
            .collect::<Vec<_>>()
    );
    assert_eq!(mirror.cells().get("cell-c"), state.cells().get("cell-c"));
    step(
        &mut state,
        &mut mirror,
        Command::HaltAutomaticFailover {
            cells: vec![Arc::from("cell-b")],
            now_ms: 6,
        },
    );
    assert!(state.failover_halt().is_some());
    assert_eq!(mirror.failover_halt(), state.failover_halt());
    step(&mut state, &mut mirror, Command::ResumeAutomaticFailover);
    assert_eq!(mirror.failover_halt(), None);
    assert!(
        state.apply(&Command::ResumeAutomaticFailover).0.is_err(),
        "nothing to resume"
    );

    let loads = |s: &ControlState| -> Vec<(String, u64)> {
        s.cells()
            .iter()
            .map(|(id, c)| (id.to_string(), c.load))
            .collect()
    };
    assert_eq!(loads(&mirror), loads(&state), "cell loads");
    assert_eq!(
        mirror.tenants(),
        state.tenants(),
        "tenants, override counts included"
    );
    assert_eq!(mirror.overrides(), state.overrides());
    assert_eq!(mirror.retired(), state.retired());
    assert_eq!(
        mirror.migrations().keys().collect::<Vec<_>>(),
        state.migrations().keys().collect::<Vec<_>>()
    );
    assert_eq!(mirror.revision(), state.revision());
    assert_eq!(
        mirror.resolve(&RouteKey::tenant("t2")).map(|r| r.epoch),
        state.resolve(&RouteKey::tenant("t2")).map(|r| r.epoch)
    );
}

#[test]
fn migrations_in_flight_stop_at_their_limit_and_one_past_is_refused() {
    use crate::limits::MAX_MIGRATIONS_IN_FLIGHT;
    let mut state = ControlState::default();
    for (cell, zone) in [("cell-a", "a"), ("cell-b", "b")] {
        for command in [
            Command::RegisterCell {
                cell_id: Arc::from(cell),
                region: Arc::from("hz"),
                zone: Arc::from(zone),
                tier: Tier::Normal,
                endpoint: Arc::from(format!("{cell}:1")),
                capacity: 1_000_000,
                standby_of: None,
            },
            Command::SetCellState {
                cell_id: Arc::from(cell),
                state: CellState::Active,
            },
        ] {
            state.apply(&command).0.expect("cell");
        }
    }
    let migrate = |i: usize| Command::StartMigration {
        key: RouteKey::tenant(format!("t{i}").as_str()),
        target_cell: None,
        new_tier: None,
        now_ms: 1,
    };
    for i in 0..=MAX_MIGRATIONS_IN_FLIGHT {
        state
            .apply(&Command::CreateTenant {
                tenant_id: Arc::from(format!("t{i}")),
                tier: Tier::Normal,
                home_region: Arc::from("hz"),
            })
            .0
            .expect("create");
    }
    for i in 0..MAX_MIGRATIONS_IN_FLIGHT {
        state.apply(&migrate(i)).0.expect("within the limit");
    }
    let revision = state.revision();
    let past = state
        .apply(&migrate(MAX_MIGRATIONS_IN_FLIGHT))
        .0
        .expect_err("one past the limit");
    assert!(matches!(past, CommandError::Exhausted(_)), "{past:?}");
    assert_eq!(state.revision(), revision, "nothing changed");
}
