//! Applying lease and failover commands: renewals, starting a failover, and its switch, which
//! moves every key of the failed cell to the promoted standby in the one command that records
//! it.

use std::sync::Arc;

use super::ControlState;
use super::command::{CommandError, CommandOutput, CommandResult, Entity, FailoverView};
use super::history::{EventKind, RouteEvent};
use super::model::{CellState, Protection, RouteKey, TenantState};
use crate::failover::record::{FailoverRecord, LeaseRecord, Ledger, Mode, Phase, display_id};
use crate::migration::record::Phase as MigrationPhase;

/// Finished failovers kept for people to look at; older ones are forgotten.
pub const MAX_FINISHED_FAILOVERS: usize = 1_000;

impl ControlState {
    /// The failover of `cell_id` that has not finished, if any.
    pub fn active_failover_of(&self, cell_id: &str) -> Option<(u64, &FailoverRecord)> {
        self.failovers
            .iter()
            .rev()
            .find(|(_, f)| !f.phase.is_terminal() && *f.cell_id == *cell_id)
            .map(|(id, f)| (*id, f))
    }

    /// The cell a standby was promoted from by a failover, if it was.
    pub fn promoted_from(&self, cell_id: &str) -> Option<&Arc<str>> {
        self.failovers
            .values()
            .rev()
            .find(|f| *f.standby_cell == *cell_id)
            .map(|f| &f.cell_id)
    }

    pub(super) fn renew_leases(&mut self, cells: &[Arc<str>], lease_ms: u64) -> CommandResult {
        let mut granted = Vec::with_capacity(cells.len());
        let mut refused = Vec::new();
        for cell_id in cells {
            let Some((id, cell)) = self.cells.get_key_value(cell_id) else {
                refused.push(cell_id.clone());
                continue;
            };
            // A failed or demoted cell's keys are on their way elsewhere: its lease must run
            // out, or two cells could write one key.
            if matches!(cell.state, CellState::Failed | CellState::Demoted) {
                refused.push(id.clone());
                continue;
            }
            let id = id.clone();
            let renewals = self.leases.get(&id).map_or(0, |l| l.renewals) + 1;
            self.leases
                .insert(id.clone(), LeaseRecord { renewals, lease_ms });
            granted.push(id);
        }
        Ok(CommandOutput::Leases { granted, refused })
    }

    /// The standby a failover of `cell_id` promotes: its in-region standby first, else its
    /// remote one; only an ACTIVE standby that is not in the middle of a bootstrap (which
    /// holds only part of the primary's data).
    fn failover_target(&self, cell_id: &Arc<str>) -> Option<Arc<str>> {
        let primary = self.cells.get(cell_id)?;
        let usable = |id: &Arc<str>| {
            let bootstrapping = self
                .replication
                .get(id)
                .and_then(|r| r.replica)
                .is_some_and(|r| r.bootstrapping);
            self.cells
                .get(id)
                .is_some_and(|c| c.state == CellState::Active && !bootstrapping)
        };
        let mut standbys = self.standbys_of(cell_id);
        standbys.retain(usable);
        standbys.sort_by_key(|id| {
            self.cells
                .get(id)
                .map(|c| c.region != primary.region)
                .unwrap_or(true)
        });
        standbys.into_iter().next()
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_failover(
        &mut self,
        cell_id: &Arc<str>,
        mode: Mode,
        reason: &str,
        automatic: bool,
        expected_renewals: Option<u64>,
        now_ms: u64,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        let Some((cell_id, cell)) = self.cells.get_key_value(cell_id) else {
            return Err(CommandError::NotFound {
                what: Entity::Cell,
                id: cell_id.to_string(),
            });
        };
        let cell_id = cell_id.clone();
        if let Some(primary) = &cell.standby_of {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} is a standby of {primary:?}; only primaries fail over"
            )));
        }
        if let Some((id, f)) = self.active_failover_of(&cell_id) {
            return Err(CommandError::Busy(format!(
                "cell_id: cell {cell_id:?} is already failing over ({}, {})",
                display_id(id),
                f.phase.name()
            )));
        }
        if !matches!(cell.state, CellState::Active | CellState::Draining) {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} is {}; only an ACTIVE or DRAINING primary fails over",
                cell.state.name()
            )));
        }
        let Some(standby) = self.failover_target(&cell_id) else {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} ({}) has no ACTIVE standby to promote",
                cell.tier.name()
            )));
        };
        if let Some(expected) = expected_renewals {
            let renewals = self.leases.get(&cell_id).map_or(0, |l| l.renewals);
            if renewals != expected {
                return Err(CommandError::FailedPrecondition(format!(
                    "cell_id: cell {cell_id:?} renewed its lease since ({renewals} renewals, not {expected})"
                )));
            }
        }
        if let Some(cell) = self.cells.get_mut(&cell_id) {
            cell.state = CellState::Failed;
        }
        let mut record = FailoverRecord {
            cell_id,
            standby_cell: standby,
            mode,
            phase: Phase::Fencing,
            automatic,
            reason: reason.to_string(),
            tenants: Vec::new(),
            keys_moved: 0,
            ledger: Ledger::default(),
            created_ms: now_ms,
            switched_ms: 0,
            done_ms: 0,
            updated_revision: revision,
        };
        if expected_renewals.is_some() {
            self.switch_failover(&mut record, now_ms, revision, events);
        }
        let id = revision;
        self.failovers.insert(id, record.clone());
        Ok(CommandOutput::Failover(FailoverView { id, record }))
    }

    pub(super) fn advance_failover(
        &mut self,
        id: u64,
        from: Phase,
        to: Phase,
        now_ms: u64,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        let Some(mut record) = self.failovers.get(&id).cloned() else {
            return Err(CommandError::NotFound {
                what: Entity::Failover,
                id: display_id(id),
            });
        };
        if record.phase != from {
            return Err(CommandError::FailedPrecondition(format!(
                "failover_id: {} is {}, not {}",
                display_id(id),
                record.phase.name(),
                from.name()
            )));
        }
        if !Phase::can_advance(from, to) {
            return Err(CommandError::FailedPrecondition(format!(
                "phase: {} cannot go from {} to {}",
                display_id(id),
                from.name(),
                to.name()
            )));
        }
        match to {
            Phase::Promoting => self.switch_failover(&mut record, now_ms, revision, events),
            Phase::Done => {
                record.phase = Phase::Done;
                record.done_ms = now_ms;
            }
            Phase::Fencing => unreachable!("no transition leads back to FENCING"),
        }
        record.updated_revision = revision;
        self.failovers.insert(id, record.clone());
        if to.is_terminal() {
            self.forget_old_failovers();
        }
        Ok(CommandOutput::Failover(FailoverView { id, record }))
    }

    /// The switch: every route key of the failed cell moves to the standby at its epoch + 1,
    /// the standby becomes a primary, migrations that needed the failed cell before their own
    /// switch fail, and the ledger records what the standby had.
    fn switch_failover(
        &mut self,
        record: &mut FailoverRecord,
        now_ms: u64,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) {
        let failed = record.cell_id.clone();
        let standby = record.standby_cell.clone();
        record.ledger = Ledger {
            primary_lsn: self
                .cells
                .get(&failed)
                .and_then(|c| c.health)
                .map_or(0, |h| h.last_lsn),
            standby_lsn: self
                .replication
                .get(&standby)
                .and_then(|r| r.replica)
                .map_or(0, |r| r.applied_lsn),
            in_sync: self
                .protection
                .get(&failed)
                .is_some_and(|p| p.protection == Protection::InSync),
        };
        // Migrations that still need the failed cell (as the source that copies out, or the
        // target before it owns the key) cannot finish: they fail, and the key moves with
        // the rest.
        let stuck: Vec<u64> = self
            .migrations
            .iter()
            .filter(|(_, m)| m.phase.before_switch() && (m.source == failed || m.target == failed))
            .map(|(id, _)| *id)
            .collect();
        for id in stuck {
            if let Some(mut migration) = self.migrations.get(&id).cloned() {
                migration.phase = MigrationPhase::Failed;
                migration.error = Some(format!("cell {failed:?} failed over to {standby:?}"));
                migration.updated_ms = now_ms;
                migration.updated_revision = revision;
                if let Some(tenant) = self.tenants.get_mut(&migration.key.tenant_id) {
                    tenant.state = TenantState::Active;
                }
                self.migrations.insert(id, migration);
                self.migrations_revision = revision;
            }
        }
        let endpoint = self
            .cells
            .get(&standby)
            .map(|c| c.endpoint.clone())
            .unwrap_or_else(|| Arc::from(""));
        let mut moved = 0u64;
        let tenants: Vec<Arc<str>> = self
            .tenants
            .iter()
            .filter(|(_, t)| t.primary_cell == failed)
            .map(|(id, _)| id.clone())
            .collect();
        for tenant_id in &tenants {
            if let Some(tenant) = self.tenants.get_mut(tenant_id) {
                tenant.primary_cell = standby.clone();
                tenant.epoch += 1;
                moved += 1;
                events.push(RouteEvent {
                    revision,
                    kind: EventKind::Put,
                    route: super::model::RouteView {
                        key: RouteKey::tenant(tenant_id.clone()),
                        cell_id: standby.clone(),
                        endpoint: endpoint.clone(),
                        epoch: tenant.epoch,
                        revision,
                        is_override: false,
                    },
                });
            }
        }
        let overrides: Vec<_> = self
            .overrides
            .iter()
            .filter(|(_, o)| o.cell_id == failed)
            .map(|(key, _)| key.clone())
            .collect();
        for key in overrides {
            if let Some(route) = self.overrides.get_mut(&key) {
                route.cell_id = standby.clone();
                route.epoch += 1;
                moved += 1;
                events.push(RouteEvent {
                    revision,
                    kind: EventKind::Put,
                    route: super::model::RouteView {
                        key: RouteKey::conversation(key.0.clone(), key.1.clone()),
                        cell_id: standby.clone(),
                        endpoint: endpoint.clone(),
                        epoch: route.epoch,
                        revision,
                        is_override: true,
                    },
                });
            }
        }
        let load = tenants.len() as u64;
        if let Some(cell) = self.cells.get_mut(&failed) {
            cell.load = 0;
        }
        if let Some(cell) = self.cells.get_mut(&standby) {
            cell.standby_of = None;
            cell.load += load;
        }
        self.protection.remove(&failed);
        record.tenants = tenants;
        record.keys_moved = moved;
        record.phase = Phase::Promoting;
        record.switched_ms = now_ms;
    }

    /// Keeps the newest [`MAX_FINISHED_FAILOVERS`] finished failovers.
    fn forget_old_failovers(&mut self) {
        let finished = self
            .failovers
            .values()
            .filter(|f| f.phase.is_terminal())
            .count();
        if finished <= MAX_FINISHED_FAILOVERS {
            return;
        }
        let forget: Vec<u64> = self
            .failovers
            .iter()
            .filter(|(_, f)| f.phase.is_terminal())
            .take(finished - MAX_FINISHED_FAILOVERS)
            .map(|(id, _)| *id)
            .collect();
        for id in forget {
            self.failovers.remove(&id);
        }
    }
}
