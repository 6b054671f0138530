//! Every Control request a node converts into a command: decoded from arbitrary bytes, run
//! through its validator, checked against an agent's region, and, when valid, applied to a
//! small live state. Nothing may panic; a refused command must change nothing.

#![no_main]

use std::sync::{Arc, LazyLock};

use cellplane_api::proto::control as pb;
use cellplane_control_plane::audit::entry::AuditEntry;
use cellplane_control_plane::control::{convert, drains, failovers, scope};
use cellplane_control_plane::limits::DEFAULT_AUDIT_ENTRIES;
use cellplane_control_plane::state::ControlState;
use cellplane_control_plane::state::command::Command;
use cellplane_control_plane::state::model::{CellState, Tier};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Three regions' cells (primaries of each tier, standbys), tenants on them, a lease round.
static STATE: LazyLock<ControlState> = LazyLock::new(|| {
    let mut state = ControlState::default();
    let mut run = |command: Command| {
        let _ = state.apply(&command);
    };
    for (region, zone) in [("r1", "z0"), ("r2", "z0")] {
        for (tier, name) in [
            (Tier::High, "high"),
            (Tier::Normal, "normal"),
            (Tier::Low, "low"),
        ] {
            let primary: Arc<str> = format!("{region}-{name}").into();
            run(Command::RegisterCell {
                cell_id: primary.clone(),
                region: region.into(),
                zone: zone.into(),
                tier,
                endpoint: format!("{primary}:1").into(),
                capacity: 100,
                standby_of: None,
            });
            run(Command::SetCellState {
                cell_id: primary.clone(),
                state: CellState::Active,
            });
            if tier != Tier::Low {
                let standby: Arc<str> = format!("{primary}-s").into();
                run(Command::RegisterCell {
                    cell_id: standby.clone(),
                    region: region.into(),
                    zone: "z1".into(),
                    tier,
                    endpoint: format!("{standby}:1").into(),
                    capacity: 100,
                    standby_of: Some(primary.clone()),
                });
                run(Command::SetCellState {
                    cell_id: standby,
                    state: CellState::Active,
                });
            }
        }
    }
    for (tenant, tier) in [("t1", Tier::High), ("t2", Tier::Normal), ("t3", Tier::Low)] {
        run(Command::CreateTenant {
            tenant_id: tenant.into(),
            tier,
            home_region: "r1".into(),
        });
    }
    let cells: Vec<Arc<str>> = state.cells().keys().cloned().collect();
    let _ = state.apply(&Command::RenewLeases {
        cells,
        lease_ms: 2_000,
    });
    state
});

fn decoded<T: Message + Default>(bytes: &[u8]) -> Option<T> {
    T::decode(bytes).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let state = &*STATE;
    let command: Option<Command> = match which % 22 {
        0 => decoded(bytes).and_then(|r| convert::register_cell(r).ok()),
        1 => decoded(bytes).and_then(|r| convert::set_cell_state(r).ok()),
        2 => decoded(bytes).and_then(|r| convert::create_tenant(r).ok()),
        3 => decoded(bytes).and_then(|r| convert::move_route(r).ok()),
        4 => decoded(bytes).and_then(|r| convert::record_protection(r).ok()),
        5 => decoded(bytes).and_then(|r| convert::heartbeat(r).ok()),
        6 => decoded(bytes).and_then(|r| convert::migrate_tenant(r, 1).ok()),
        7 => decoded(bytes).and_then(|r| convert::migrate_conversation(r, 1).ok()),
        8 => decoded(bytes).and_then(|r| convert::set_tenant_tier(r, 1).ok()),
        9 => decoded(bytes).and_then(|r| failovers::renew_leases(r, 2_000).ok()),
        10 => decoded(bytes).and_then(|r| failovers::failover_cell(r).ok()),
        11 => decoded::<pb::ReportFailoverRequest>(bytes)
            .and_then(|r| failovers::report(state, &r).ok())
            .and_then(|(_, command)| command),
        12 => decoded::<pb::DrainCellRequest>(bytes).and_then(|r| drains::drain_cell(&r).ok()),
        13 => decoded::<pb::RemoveCellRequest>(bytes).and_then(|r| drains::remove_cell(&r).ok()),
        14 => {
            if let Some(request) = decoded::<pb::FailoverRegionRequest>(bytes)
                && let Ok(plan) = failovers::region_plan(state, &request)
            {
                let mut state = state.clone();
                for (_, command) in plan.into_iter().flatten() {
                    let _ = state.apply(&command);
                }
            }
            None
        }
        15 => {
            if let Some(request) = decoded::<pb::ReportMigrationRequest>(bytes) {
                let _ = convert::report(&request);
            }
            None
        }
        16 => decoded::<pb::RecordAuditRequest>(bytes).and_then(|r| {
            (!r.entries.is_empty()).then(|| Command::Audit {
                entries: r.entries.into_iter().map(AuditEntry::from_proto).collect(),
                keep: DEFAULT_AUDIT_ENTRIES,
            })
        }),
        17 => {
            let text = String::from_utf8_lossy(bytes);
            let _ = convert::migration_id(&text);
            let _ = failovers::failover_id(&text);
            let _ = failovers::check_reason(&text);
            let _ = cellplane_api::ids::validate_id("id", &text);
            let _ = cellplane_api::ids::validate_endpoint("endpoint", &text);
            let _ = cellplane_control_plane::audit::entry::parse_id(&text);
            None
        }
        18 => {
            // A client certificate as the role check reads it.
            let _ = cellplane_api::auth::common_name(bytes);
            None
        }
        19 => {
            let text = String::from_utf8_lossy(bytes);
            let overrides: Vec<String> = text.split(',').map(str::to_string).collect();
            let _ = cellplane_api::limits::with_overrides(
                &cellplane_control_plane::limits::Limits::default(),
                &overrides,
            );
            None
        }
        20 => decoded::<pb::ListTenantsRequest>(bytes).and_then(|r| {
            let _ = cellplane_control_plane::control::page_size(r.page_size);
            None
        }),
        _ => decoded(bytes).and_then(|r| convert::set_cell_state(r).ok()),
    };
    let Some(command) = command else {
        return;
    };
    // An agent confined to a region: its check must answer, whatever the command names.
    let _ = scope::check_command("r1", &command, state);
    let mut state = state.clone();
    let revision = state.revision();
    let (result, events) = state.apply(&command);
    if result.is_err() {
        assert_eq!(
            state.revision(),
            revision,
            "a refused command changed the state"
        );
        assert!(events.is_empty());
    }
});
