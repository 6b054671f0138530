//! Applying drains and removals: a primary evacuated by migrations, and a cell forgotten once
//! nothing needs it.

use std::sync::Arc;

use super::ControlState;
use super::command::{CommandError, CommandOutput, CommandResult};
use super::model::{CellState, RouteKey};

/// Where the evacuation of a cell stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainProgress {
    pub state: CellState,
    pub keys_left: u64,
    pub migrations_running: u64,
    pub last_error: Option<String>,
}

impl ControlState {
    /// Every route key routed to `cell_id`: tenants placed on it, in id order, then the
    /// conversations routed to it on their own.
    pub fn keys_on(&self, cell_id: &str) -> Vec<RouteKey> {
        let tenants = self
            .tenants
            .iter()
            .filter(|(_, t)| &*t.primary_cell == cell_id)
            .map(|(id, _)| RouteKey::tenant(id.clone()));
        let overrides = self
            .overrides
            .iter()
            .filter(|(_, o)| &*o.cell_id == cell_id)
            .map(|((tenant, conversation), _)| {
                RouteKey::conversation(tenant.clone(), conversation.clone())
            });
        tenants.chain(overrides).collect()
    }

    /// How far the evacuation of `cell_id` got; `None` for an unknown cell.
    pub fn drain_progress(&self, cell_id: &str) -> Option<DrainProgress> {
        let cell = self.cells.get(cell_id)?;
        let leaving = |m: &&crate::migration::record::MigrationRecord| &*m.source == cell_id;
        let migrations_running = self
            .migrations
            .values()
            .filter(leaving)
            .filter(|m| !m.phase.is_terminal())
            .count() as u64;
        let last_error = self
            .migrations
            .values()
            .rev()
            .filter(leaving)
            .find(|m| m.phase == crate::migration::record::Phase::Failed)
            .and_then(|m| m.error.clone());
        Some(DrainProgress {
            state: cell.state,
            keys_left: self.keys_on(cell_id).len() as u64,
            migrations_running,
            last_error,
        })
    }

    pub(super) fn drain_cell(&mut self, cell_id: &Arc<str>) -> CommandResult {
        let (cell_id, cell) = self.cell_entry(cell_id)?;
        if let Some(primary) = &cell.standby_of {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} is a standby of {primary:?}; it holds no keys of its own to drain"
            )));
        }
        match cell.state {
            CellState::Draining => {
                return Ok(CommandOutput::Cell(Box::new(
                    self.cell_view(&cell_id, cell),
                )));
            }
            CellState::Active => {}
            other => {
                return Err(CommandError::FailedPrecondition(format!(
                    "cell_id: cell {cell_id:?} is {}; only an ACTIVE cell is drained",
                    other.name()
                )));
            }
        }
        let another = self.cells.iter().any(|(id, c)| {
            *id != cell_id
                && c.state == CellState::Active
                && c.standby_of.is_none()
                && c.tier == cell.tier
                && c.region == cell.region
        });
        if !another {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} is the last ACTIVE {} cell of region {:?}; its keys would have nowhere to go",
                cell.tier.name(),
                cell.region
            )));
        }
        let Some(cell) = self.cells.get_mut(&cell_id) else {
            unreachable!("the cell was found above");
        };
        cell.state = CellState::Draining;
        let record = cell.clone();
        Ok(CommandOutput::Cell(Box::new(
            self.cell_view(&cell_id, record),
        )))
    }

    pub(super) fn remove_cell(&mut self, cell_id: &Arc<str>, revision: u64) -> CommandResult {
        let (cell_id, cell) = self.cell_entry(cell_id)?;
        let refuse = |why: String| {
            Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} {why}; it cannot be removed"
            )))
        };
        if !matches!(
            cell.state,
            CellState::Draining | CellState::Failed | CellState::Demoted
        ) {
            return refuse(format!("is {}; drain it first", cell.state.name()));
        }
        let keys = self.keys_on(&cell_id).len();
        if keys > 0 {
            return refuse(format!("still holds {keys} route keys"));
        }
        let standbys = self.standbys_of(&cell_id);
        if !standbys.is_empty() {
            return refuse(format!("has standbys {standbys:?}; remove them first"));
        }
        let busy = self
            .migrations
            .values()
            .any(|m| !m.phase.is_terminal() && (m.source == cell_id || m.target == cell_id));
        if busy || self.active_failover_of(&cell_id).is_some() {
            return refuse("is part of a migration or failover under way".into());
        }
        self.cells.remove(&cell_id);
        self.leases.remove(&cell_id);
        self.protection.remove(&cell_id);
        self.replication.remove(&cell_id);
        Ok(CommandOutput::Done { revision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::Command;
    use crate::state::model::Tier;

    fn apply(state: &mut ControlState, command: Command) -> CommandResult {
        state.apply(&command).0
    }

    fn cells(ids: &[(&str, Tier)]) -> ControlState {
        let mut state = ControlState::default();
        for (i, (id, tier)) in ids.iter().enumerate() {
            apply(
                &mut state,
                Command::RegisterCell {
                    cell_id: (*id).into(),
                    region: "hz".into(),
                    zone: format!("z{i}").into(),
                    tier: *tier,
                    endpoint: format!("{id}:1").into(),
                    capacity: 10,
                    standby_of: None,
                },
            )
            .expect("register");
            apply(
                &mut state,
                Command::SetCellState {
                    cell_id: (*id).into(),
                    state: CellState::Active,
                },
            )
            .expect("activate");
        }
        state
    }

    #[test]
    fn a_drain_needs_somewhere_for_the_keys_to_go_and_is_idempotent() {
        let mut state = cells(&[("a", Tier::Normal), ("b", Tier::Normal), ("l", Tier::Low)]);
        let drain = |id: &str| Command::DrainCell { cell_id: id.into() };
        let revision = state.revision();
        let last = apply(&mut state, drain("l")).expect_err("the only LOW cell");
        assert!(last.to_string().contains("last ACTIVE LOW"), "{last}");
        assert!(matches!(
            apply(&mut state, drain("nope")),
            Err(CommandError::NotFound { .. })
        ));
        assert_eq!(state.revision(), revision, "refusals change nothing");
        apply(&mut state, drain("a")).expect("drain a");
        assert_eq!(
            state.cells().get("a").map(|c| c.state),
            Some(CellState::Draining)
        );
        apply(&mut state, drain("a")).expect("again: its progress");
        let b = apply(&mut state, drain("b")).expect_err("b is now the last NORMAL cell");
        assert!(b.to_string().contains("nowhere to go"), "{b}");
    }

    #[test]
    fn only_an_empty_drained_cell_is_removed() {
        let mut state = cells(&[("a", Tier::Normal), ("b", Tier::Normal)]);
        apply(
            &mut state,
            Command::CreateTenant {
                tenant_id: "t".into(),
                tier: Tier::Normal,
                home_region: "hz".into(),
            },
        )
        .expect("create");
        let on = state
            .resolve(&RouteKey::tenant("t"))
            .expect("route")
            .cell_id;
        let remove = |id: &str| Command::RemoveCell { cell_id: id.into() };
        let active = apply(&mut state, remove(&on)).expect_err("ACTIVE");
        assert!(active.to_string().contains("drain it first"), "{active}");
        apply(
            &mut state,
            Command::DrainCell {
                cell_id: on.clone(),
            },
        )
        .expect("drain");
        let progress = state.drain_progress(&on).expect("progress");
        assert_eq!((progress.keys_left, progress.migrations_running), (1, 0));
        let full = apply(&mut state, remove(&on)).expect_err("still holds t");
        assert!(full.to_string().contains("1 route keys"), "{full}");
        let other = if &*on == "a" { "b" } else { "a" };
        apply(
            &mut state,
            Command::MoveRoute {
                key: RouteKey::tenant("t"),
                expected_epoch: 1,
                target_cell: other.into(),
            },
        )
        .expect("move away");
        apply(&mut state, remove(&on)).expect("removed");
        assert!(!state.cells().contains_key(&*on));
    }
}
