//! The drain planner: which migrations evacuate the DRAINING cells next. Pure, so the leader's
//! migration driver runs it on each tick and proposes what it says; a migration refused at
//! apply (no capacity left, say) is planned again on a later tick.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::state::ControlState;
use crate::state::command::Command;
use crate::state::model::CellState;

/// Migrations that evacuate one cell at once: enough to keep it moving, few enough that the
/// cells' other traffic does not notice.
pub const MIGRATIONS_PER_DRAIN: usize = 4;

/// The migrations to start now for every DRAINING primary: its keys (tenants first), skipping
/// tenants with a migration under way, up to [`MIGRATIONS_PER_DRAIN`] running per cell. Targets
/// are left to placement: an ACTIVE cell of the tenant's tier in its home region.
pub fn plan(state: &ControlState, now_ms: u64) -> Vec<Command> {
    let draining: Vec<&Arc<str>> = state
        .cells()
        .iter()
        .filter(|(id, c)| {
            // A cell in a PLANNED failover is DRAINING too, but its keys leave all at once.
            c.state == CellState::Draining
                && c.standby_of.is_none()
                && state.active_failover_of(id).is_none()
        })
        .map(|(id, _)| id)
        .collect();
    if draining.is_empty() {
        return Vec::new();
    }
    let migrating: BTreeSet<&Arc<str>> = state
        .migrations()
        .values()
        .filter(|m| !m.phase.is_terminal())
        .map(|m| &m.key.tenant_id)
        .collect();
    let mut commands = Vec::new();
    for cell_id in draining {
        let running = state
            .migrations()
            .values()
            .filter(|m| !m.phase.is_terminal() && m.source == *cell_id)
            .count();
        let mut planned: BTreeSet<Arc<str>> = BTreeSet::new();
        for key in state.keys_on(cell_id) {
            if running + planned.len() >= MIGRATIONS_PER_DRAIN {
                break;
            }
            // One migration per tenant: a tenant and its conversation never move at once.
            if migrating.contains(&key.tenant_id) || planned.contains(&key.tenant_id) {
                continue;
            }
            planned.insert(key.tenant_id.clone());
            commands.push(Command::StartMigration {
                key,
                target_cell: None,
                new_tier: None,
                now_ms,
            });
        }
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::{RouteKey, Tier};

    fn apply(state: &mut ControlState, command: Command) {
        state.apply(&command).0.expect("applies");
    }

    fn system(tenants: usize) -> ControlState {
        let mut state = ControlState::default();
        for (id, zone) in [("a", "z0"), ("b", "z1")] {
            apply(
                &mut state,
                Command::RegisterCell {
                    cell_id: id.into(),
                    region: "hz".into(),
                    zone: zone.into(),
                    tier: Tier::Normal,
                    endpoint: format!("{id}:1").into(),
                    capacity: 100,
                    standby_of: None,
                },
            );
        }
        // Only "a" takes placements while the tenants are created.
        apply(
            &mut state,
            Command::SetCellState {
                cell_id: "a".into(),
                state: CellState::Active,
            },
        );
        for i in 0..tenants {
            apply(
                &mut state,
                Command::CreateTenant {
                    tenant_id: format!("t{i:02}").into(),
                    tier: Tier::Normal,
                    home_region: "hz".into(),
                },
            );
        }
        apply(
            &mut state,
            Command::SetCellState {
                cell_id: "b".into(),
                state: CellState::Active,
            },
        );
        state
    }

    #[test]
    fn nothing_moves_until_a_cell_drains_then_a_few_keys_at_a_time() {
        let mut state = system(10);
        assert!(plan(&state, 1).is_empty());
        apply(
            &mut state,
            Command::DrainCell {
                cell_id: "a".into(),
            },
        );
        let first = plan(&state, 1);
        assert_eq!(first.len(), MIGRATIONS_PER_DRAIN);
        for command in first {
            apply(&mut state, command);
        }
        assert!(plan(&state, 2).is_empty(), "the cell's budget is in use");
        let started: Vec<_> = state.migrations().values().map(|m| m.key.clone()).collect();
        assert_eq!(started[0], RouteKey::tenant("t00"));
        assert!(state.migrations().values().all(|m| &*m.target == "b"));
    }

    #[test]
    fn a_tenant_moves_its_placement_and_its_own_conversations_one_at_a_time() {
        let mut state = system(1);
        apply(
            &mut state,
            Command::MoveRoute {
                key: RouteKey::conversation("t00", "hot"),
                expected_epoch: 1,
                target_cell: "b".into(),
            },
        );
        apply(
            &mut state,
            Command::MoveRoute {
                key: RouteKey::conversation("t00", "hot"),
                expected_epoch: 2,
                target_cell: "a".into(),
            },
        );
        apply(
            &mut state,
            Command::SetCellState {
                cell_id: "b".into(),
                state: CellState::Active,
            },
        );
        apply(
            &mut state,
            Command::DrainCell {
                cell_id: "a".into(),
            },
        );
        let planned = plan(&state, 1);
        assert_eq!(planned.len(), 1, "{planned:?}");
    }
}
