//! Applying lease and failover commands: renewals, starting a failover, and its switch, which
//! moves every key of the failed cell to the promoted standby in the one command that records
//! it.

use std::sync::Arc;

use super::ControlState;
use super::command::{CommandError, CommandOutput, CommandResult, Entity, FailoverView};
use super::history::{EventKind, RouteEvent};
use super::model::{CellState, Protection, RouteKey, TenantState, Tier};
use crate::failover::record::{
    FailoverRecord, LeaseRecord, Ledger, MergedKey, Mode, Phase, display_id,
};
use crate::limits::{MAX_FAILOVERS_IN_FLIGHT, MAX_FINISHED_FAILOVERS};
use crate::migration::record::Phase as MigrationPhase;

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
            // out, or two cells could write one key. So must the lease of a standby not yet
            // ACTIVE: one that rejoined after a failover may still run as the primary it was,
            // with the grants it held, until its agent restarts it to follow; it writes
            // nothing as a standby, and renews again once it follows and is made ACTIVE.
            let joining_standby = cell.state == CellState::Joining && cell.standby_of.is_some();
            if matches!(cell.state, CellState::Failed | CellState::Demoted) || joining_standby {
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

    /// The cells a failover of `cell_id` may move its keys to, in the order it prefers them:
    /// its standbys, the in-region one first, then the remote one; for a LOW cell, which has
    /// none, the other LOW primaries of its region, least loaded first (a fallback for new
    /// messages). Only ACTIVE cells that are not in the middle of a bootstrap (which hold
    /// only part of the primary's data) nor failing over themselves.
    pub fn failover_targets(&self, cell_id: &Arc<str>) -> Vec<Arc<str>> {
        let Some(primary) = self.cells.get(cell_id) else {
            return Vec::new();
        };
        let usable = |id: &Arc<str>| {
            let bootstrapping = self
                .replication
                .get(id)
                .and_then(|r| r.replica)
                .is_some_and(|r| r.bootstrapping);
            self.cells
                .get(id)
                .is_some_and(|c| c.state == CellState::Active && !bootstrapping)
                && self.active_failover_of(id).is_none()
        };
        if primary.tier == Tier::Low {
            let mut fallbacks: Vec<(&Arc<str>, u64)> = self
                .cells
                .iter()
                .filter(|(id, c)| {
                    *id != cell_id
                        && c.tier == Tier::Low
                        && c.region == primary.region
                        && c.standby_of.is_none()
                        && usable(id)
                })
                .map(|(id, c)| (id, c.load))
                .collect();
            fallbacks.sort_by_key(|(id, load)| (*load, (*id).clone()));
            return fallbacks.into_iter().map(|(id, _)| id.clone()).collect();
        }
        let mut standbys = self.standbys_of(cell_id);
        standbys.retain(usable);
        standbys.sort_by_key(|id| {
            self.cells
                .get(id)
                .map(|c| c.region != primary.region)
                .unwrap_or(true)
        });
        standbys
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_failover(
        &mut self,
        cell_id: &Arc<str>,
        standby: Option<&Arc<str>>,
        mode: Mode,
        reason: &str,
        automatic: bool,
        expected_renewals: Option<u64>,
        now_ms: u64,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        let (cell_id, cell) = self.cell_entry(cell_id)?;
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
        let unfinished = self
            .failovers
            .values()
            .filter(|f| !f.phase.is_terminal())
            .count();
        if unfinished >= MAX_FAILOVERS_IN_FLIGHT {
            return Err(CommandError::Exhausted(format!(
                "{unfinished} failovers are unfinished, the most at once ({MAX_FAILOVERS_IN_FLIGHT}); retry once some finish"
            )));
        }
        if !matches!(cell.state, CellState::Active | CellState::Draining) {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} is {}; only an ACTIVE or DRAINING primary fails over",
                cell.state.name()
            )));
        }
        if mode == Mode::Planned {
            if cell.tier == Tier::Low {
                return Err(CommandError::FailedPrecondition(format!(
                    "mode: cell {cell_id:?} is LOW and has no standby to catch up; fail it over FORCED, or drain it"
                )));
            }
            if cell.state != CellState::Active {
                return Err(CommandError::FailedPrecondition(format!(
                    "cell_id: cell {cell_id:?} is {}; a PLANNED failover is of an ACTIVE cell (a draining one moves its keys by migrations)",
                    cell.state.name()
                )));
            }
            // Its freeze covers every key of the cell: no migration may hold one of them.
            if let Some((id, m)) = self.migrations.iter().find(|(_, m)| {
                !m.phase.is_terminal() && (m.source == cell_id || m.target == cell_id)
            }) {
                return Err(CommandError::Busy(format!(
                    "cell_id: cell {cell_id:?} takes part in {} ({}); wait for it or cancel it",
                    crate::migration::record::display_id(*id),
                    m.phase.name()
                )));
            }
        }
        let targets = self.failover_targets(&cell_id);
        let standby = match standby {
            Some(wanted) => targets.into_iter().find(|t| t == wanted).ok_or_else(|| {
                CommandError::FailedPrecondition(format!(
                    "standby: cell {wanted:?} is not an ACTIVE standby of {cell_id:?} that holds all its data, nor its fallback"
                ))
            })?,
            None if cell.tier == Tier::Low => targets.into_iter().next().ok_or_else(|| {
                CommandError::FailedPrecondition(format!(
                    "cell_id: cell {cell_id:?} is LOW and no other ACTIVE LOW primary of region {:?} can take its keys",
                    cell.region
                ))
            })?,
            None => targets.into_iter().next().ok_or_else(|| {
                CommandError::FailedPrecondition(format!(
                    "cell_id: cell {cell_id:?} ({}) has no ACTIVE standby to promote",
                    cell.tier.name()
                ))
            })?,
        };
        let fallback = cell.tier == Tier::Low;
        if let Some(expected) = expected_renewals {
            let renewals = self.leases.get(&cell_id).map_or(0, |l| l.renewals);
            if renewals != expected {
                return Err(CommandError::FailedPrecondition(format!(
                    "cell_id: cell {cell_id:?} renewed its lease since ({renewals} renewals, not {expected})"
                )));
            }
        }
        if let Some(cell) = self.cells.get_mut(&cell_id) {
            // FORCED: no renewal from now on. PLANNED: the cell keeps its lease and its keys
            // until the switch, but takes no new placement or move.
            cell.state = match mode {
                Mode::Forced => CellState::Failed,
                Mode::Planned => CellState::Draining,
            };
        }
        let mut record = FailoverRecord {
            cell_id,
            standby_cell: standby,
            fallback,
            mode,
            phase: match mode {
                Mode::Forced => Phase::Fencing,
                Mode::Planned => Phase::Freezing,
            },
            automatic,
            reason: reason.to_string(),
            tenants: Vec::new(),
            conversations: Vec::new(),
            keys_moved: 0,
            ledger: Ledger::default(),
            created_ms: now_ms,
            switched_ms: 0,
            done_ms: 0,
            updated_revision: revision,
            frozen_lsn: 0,
            frozen_ms: 0,
            error: None,
            merged: Vec::new(),
            merged_ms: 0,
        };
        if expected_renewals.is_some() && mode == Mode::Forced {
            self.switch_failover(&mut record, 0, now_ms, revision, events);
        }
        let id = revision;
        self.failovers.insert(id, record.clone());
        Ok(CommandOutput::Failover(Box::new(FailoverView {
            id,
            record,
        })))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn advance_failover(
        &mut self,
        id: u64,
        (from, to): (Phase, Phase),
        lsn: u64,
        error: Option<&str>,
        merged: &[MergedKey],
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
        super::check_advance(
            ("failover_id", &display_id(id)),
            (record.phase.name(), from.name(), to.name()),
            Phase::can_advance(from, to),
        )?;
        record.phase = to;
        match to {
            Phase::CatchingUp => {
                record.frozen_lsn = lsn;
                record.frozen_ms = now_ms;
            }
            Phase::Promoting => {
                if from == Phase::CatchingUp && lsn < record.frozen_lsn {
                    return Err(CommandError::FailedPrecondition(format!(
                        "lsn: standby {:?} has applied LSN {lsn} of the {} frozen on {:?}; it cannot take over yet",
                        record.standby_cell, record.frozen_lsn, record.cell_id
                    )));
                }
                self.switch_failover(&mut record, lsn, now_ms, revision, events);
            }
            Phase::Thawing => record.error = error.map(str::to_string),
            Phase::RolledBack => {
                if let Some(cell) = self.cells.get_mut(&record.cell_id)
                    && cell.state == CellState::Draining
                {
                    cell.state = CellState::Active;
                }
            }
            Phase::Done => record.done_ms = now_ms,
            Phase::Merged => {
                check_merged(&record, merged)?;
                record.merged = merged.to_vec();
                record.merged_ms = now_ms;
            }
            Phase::Fencing | Phase::Freezing => {
                unreachable!("no transition leads back to {}", to.name())
            }
        }
        record.updated_revision = revision;
        self.failovers.insert(id, record.clone());
        if to.is_terminal() {
            self.forget_old_failovers();
        }
        Ok(CommandOutput::Failover(Box::new(FailoverView {
            id,
            record,
        })))
    }

    /// The switch: every route key of the failed cell moves to the standby at its epoch + 1,
    /// the standby becomes a primary, migrations that needed the failed cell before their own
    /// switch fail, and the ledger records what the standby had. For a PLANNED failover the
    /// ledger is exact: the cell froze at `frozen_lsn` and the standby reported
    /// `standby_lsn` at or past it, so it lacks nothing.
    fn switch_failover(
        &mut self,
        record: &mut FailoverRecord,
        standby_lsn: u64,
        now_ms: u64,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) {
        let failed = record.cell_id.clone();
        let standby = record.standby_cell.clone();
        record.ledger = match record.mode {
            Mode::Planned => Ledger {
                primary_lsn: record.frozen_lsn,
                standby_lsn,
                in_sync: true,
            },
            Mode::Forced => Ledger {
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
            },
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
        for key in &overrides {
            if let Some(route) = self.overrides.get_mut(key) {
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
            cell.state = match record.mode {
                Mode::Forced => CellState::Failed,
                Mode::Planned => CellState::Demoted,
            };
        }
        if let Some(cell) = self.cells.get_mut(&standby) {
            cell.standby_of = None;
            cell.load += load;
        }
        self.protection.remove(&failed);
        record.tenants = tenants;
        record.conversations = overrides;
        record.keys_moved = moved;
        record.switched_ms = now_ms;
        // A fallback is a primary already: nothing to promote.
        if record.fallback {
            record.phase = Phase::Done;
            record.done_ms = now_ms;
        } else {
            record.phase = Phase::Promoting;
        }
    }

    /// Whether failovers explain why `cell_id`, configured to follow `configured` (or to be a
    /// primary), follows `now` instead: a standby that was promoted, a primary that rejoined
    /// as the standby of its successor, or a standby moved to its primary's successor.
    pub fn moved_by_failover(
        &self,
        cell_id: &str,
        configured: Option<&Arc<str>>,
        now: Option<&Arc<str>>,
    ) -> bool {
        let successor = |id: &str| self.successor(id).map(|(s, _)| s);
        match (configured, now) {
            (Some(primary), None) => self.promoted_from(cell_id) == Some(primary),
            (None, Some(now)) => successor(cell_id) == Some(now),
            (Some(primary), Some(now)) => successor(primary) == Some(now),
            (None, None) => false,
        }
    }

    /// The newest failover of `cell_id` that was not rolled back: the one that moved its keys
    /// away, or is moving them.
    fn newest_failover(&self, cell_id: &str) -> Option<&FailoverRecord> {
        self.failovers
            .values()
            .rev()
            .find(|f| *f.cell_id == *cell_id && f.phase != Phase::RolledBack)
    }

    /// The cell that took over from `cell_id` in its newest failover, once that one switched.
    /// An older, finished failover says nothing while a newer one is under way.
    fn successor(&self, cell_id: &str) -> Option<(&Arc<str>, &FailoverRecord)> {
        self.newest_failover(cell_id)
            .filter(|f| f.phase.switched())
            .map(|f| (&f.standby_cell, f))
    }

    pub(super) fn rejoin(&mut self, cell_id: &Arc<str>) -> CommandResult {
        let (cell_id, cell) = self.cell_entry(cell_id)?;
        let nothing = || {
            CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} was left behind by no finished failover; nothing to rejoin"
            ))
        };
        let new_primary = match &cell.standby_of {
            // A failed or demoted primary follows the cell that took its keys, once what only
            // it held was merged back; a LOW cell serves again as an empty primary.
            None if matches!(cell.state, CellState::Failed | CellState::Demoted) => {
                let failover = self.newest_failover(&cell_id).ok_or_else(nothing)?;
                let successor = &failover.standby_cell;
                if failover.phase != Phase::Merged {
                    return Err(CommandError::FailedPrecondition(format!(
                        "cell_id: cell {cell_id:?} may hold messages its successor {successor:?} lacks; its agent merges them back first (the failover is {})",
                        failover.phase.name()
                    )));
                }
                if failover.fallback {
                    let Some(cell) = self.cells.get_mut(&cell_id) else {
                        unreachable!("the cell was found above");
                    };
                    cell.state = CellState::Active;
                    let record = cell.clone();
                    // Its renewals were refused while it was FAILED, and the detector judges
                    // it by the newest one it saw: it would be failed again at once. Counting
                    // its return as a renewal gives it a lease to start renewing in; that
                    // only delays detection, and the cell still times its own lease.
                    if let Some(lease) = self.leases.get_mut(&cell_id) {
                        lease.renewals += 1;
                    }
                    return Ok(CommandOutput::Cell(Box::new(
                        self.cell_view(&cell_id, record),
                    )));
                }
                successor.clone()
            }
            // A standby whose primary was failed over follows the successor.
            Some(primary) => match self.cells.get(primary) {
                Some(p) if matches!(p.state, CellState::Failed | CellState::Demoted) => self
                    .successor(primary)
                    .map(|(successor, _)| successor.clone())
                    .filter(|successor| *successor != cell_id)
                    .ok_or_else(nothing)?,
                _ => return Err(nothing()),
            },
            None => return Err(nothing()),
        };
        let Some(primary) = self.cells.get(&new_primary) else {
            return Err(nothing());
        };
        if primary.standby_of.is_some() || primary.state != CellState::Active {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: its successor {new_primary:?} is not an ACTIVE primary"
            )));
        }
        let siblings: Vec<&super::model::CellRecord> = self
            .cells
            .iter()
            .filter(|(id, c)| **id != cell_id && c.standby_of.as_ref() == Some(&new_primary))
            .map(|(_, c)| c)
            .collect();
        super::standby_fits(&new_primary, primary, &siblings, &cell)
            .map_err(CommandError::FailedPrecondition)?;
        let Some(cell) = self.cells.get_mut(&cell_id) else {
            unreachable!("the cell was found above");
        };
        cell.standby_of = Some(new_primary);
        // A failed or demoted cell joins again (the table's way back); a standby moved to a
        // new primary stays ACTIVE, passed over by failovers while it bootstraps.
        if matches!(cell.state, CellState::Failed | CellState::Demoted) {
            cell.state = CellState::Joining;
        }
        let record = cell.clone();
        self.protection.remove(&cell_id);
        Ok(CommandOutput::Cell(Box::new(
            self.cell_view(&cell_id, record),
        )))
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

/// A merge report names every key the failover moved, once each: a count for part of them
/// would pass for the whole ledger.
fn check_merged(record: &FailoverRecord, merged: &[MergedKey]) -> Result<(), CommandError> {
    let mut expected: Vec<(&str, &str)> = record
        .tenants
        .iter()
        .map(|t| (&**t, ""))
        .chain(record.conversations.iter().map(|(t, c)| (&**t, &**c)))
        .collect();
    let mut got: Vec<(&str, &str)> = merged
        .iter()
        .map(|k| (&*k.tenant_id, &*k.conversation_id))
        .collect();
    expected.sort_unstable();
    got.sort_unstable();
    if expected != got {
        return Err(CommandError::Invalid {
            field: "merged".into(),
            rule: format!(
                "must name each of the failover's {} keys once; it names {} ({} of them theirs)",
                expected.len(),
                got.len(),
                got.iter()
                    .filter(|k| expected.binary_search(k).is_ok())
                    .count()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::Command;
    use crate::state::model::{ReplicaHealth, ReplicationHealth, Tier};

    fn apply(state: &mut ControlState, command: Command) -> CommandResult {
        state.apply(&command).0
    }

    fn register(
        state: &mut ControlState,
        id: &str,
        (region, zone): (&str, &str),
        tier: Tier,
        standby_of: Option<&str>,
    ) {
        apply(
            state,
            Command::RegisterCell {
                cell_id: id.into(),
                region: region.into(),
                zone: zone.into(),
                tier,
                endpoint: format!("{id}:1").into(),
                capacity: 10,
                standby_of: standby_of.map(Arc::from),
            },
        )
        .expect("register");
        apply(
            state,
            Command::SetCellState {
                cell_id: id.into(),
                state: CellState::Active,
            },
        )
        .expect("activate");
    }

    /// A HIGH primary with an in-region and a remote standby, a NORMAL primary with one, a
    /// LOW cell; tenants on each primary and a conversation moved onto the HIGH one.
    fn system() -> ControlState {
        let mut state = ControlState::default();
        register(&mut state, "high", ("hz", "a"), Tier::High, None);
        register(
            &mut state,
            "high-remote",
            ("bj", "a"),
            Tier::High,
            Some("high"),
        );
        register(
            &mut state,
            "high-near",
            ("hz", "b"),
            Tier::High,
            Some("high"),
        );
        register(&mut state, "normal", ("hz", "a"), Tier::Normal, None);
        register(
            &mut state,
            "normal-s",
            ("hz", "c"),
            Tier::Normal,
            Some("normal"),
        );
        register(&mut state, "low", ("hz", "a"), Tier::Low, None);
        for (tenant, tier) in [
            ("t1", Tier::High),
            ("t2", Tier::High),
            ("n1", Tier::Normal),
            ("l1", Tier::Low),
        ] {
            apply(
                &mut state,
                Command::CreateTenant {
                    tenant_id: tenant.into(),
                    tier,
                    home_region: "hz".into(),
                },
            )
            .expect("create");
        }
        apply(
            &mut state,
            Command::MoveRoute {
                key: RouteKey::conversation("n1", "hot"),
                expected_epoch: 1,
                target_cell: "high".into(),
            },
        )
        .expect("move a conversation onto the HIGH cell");
        state
    }

    fn forced(cell_id: &str, expected_renewals: Option<u64>) -> Command {
        Command::StartFailover {
            cell_id: cell_id.into(),
            standby: None,
            mode: Mode::Forced,
            reason: "test".into(),
            automatic: expected_renewals.is_some(),
            expected_renewals,
            now_ms: 10,
        }
    }

    #[test]
    fn the_switch_moves_every_key_of_the_cell_to_its_in_region_standby_at_the_next_epoch() {
        let mut state = system();
        let revision = state.revision();
        let (result, events) = state.apply(&forced("high", Some(0)));
        let CommandOutput::Failover(view) = result.expect("failover") else {
            panic!("a failover answers its record");
        };
        assert_eq!(view.id, revision + 1);
        assert_eq!(&*view.record.standby_cell, "high-near", "in-region first");
        assert_eq!(view.record.phase, Phase::Promoting);
        assert_eq!(view.record.keys_moved, 3);
        assert_eq!(
            view.record.tenants,
            vec![Arc::<str>::from("t1"), Arc::from("t2")]
        );
        assert!(events.iter().all(|e| e.revision == revision + 1));
        let moved: Vec<(String, String, u64)> = events
            .iter()
            .map(|e| {
                (
                    e.route.key.to_string(),
                    e.route.cell_id.to_string(),
                    e.route.epoch,
                )
            })
            .collect();
        assert_eq!(
            moved,
            [
                ("t1".into(), "high-near".into(), 2),
                ("t2".into(), "high-near".into(), 2),
                ("n1/hot".into(), "high-near".into(), 3),
            ]
        );
        let cell = |id: &str| state.cells().get(id).cloned().expect("cell");
        assert_eq!(cell("high").state, CellState::Failed);
        assert_eq!(cell("high").load, 0);
        assert_eq!(cell("high-near").standby_of, None, "a primary now");
        assert_eq!(cell("high-near").load, 2);
        assert_eq!(
            cell("high-remote").standby_of.as_deref(),
            Some("high"),
            "the remote standby still names the failed primary"
        );
        assert_eq!(
            state
                .resolve(&RouteKey::conversation("n1", "other"))
                .map(|r| r.cell_id),
            Ok(Arc::from("normal")),
            "the tenant's other conversations stay"
        );
    }

    #[test]
    fn a_bootstrapping_or_inactive_standby_is_passed_over() {
        let mut state = system();
        apply(
            &mut state,
            Command::Report {
                cell_id: "high-near".into(),
                health: Default::default(),
                replication: Some(ReplicationHealth {
                    standbys: Vec::new(),
                    replica: Some(ReplicaHealth {
                        bootstrapping: true,
                        ..Default::default()
                    }),
                }),
            },
        )
        .expect("report");
        let CommandOutput::Failover(view) = apply(&mut state, forced("high", None)).expect("start")
        else {
            panic!("a failover");
        };
        assert_eq!(&*view.record.standby_cell, "high-remote");
        assert_eq!(view.record.phase, Phase::Fencing, "ops wait out the lease");
        assert_eq!(view.record.keys_moved, 0);
    }

    #[test]
    fn every_bad_failover_is_refused_and_changes_nothing() {
        let mut state = system();
        apply(
            &mut state,
            Command::RenewLeases {
                cells: vec!["normal".into()],
                lease_ms: 1_000,
            },
        )
        .expect("renew");
        let revision = state.revision();
        let refusals = [
            (forced("nope", None), "not found"),
            (forced("normal-s", None), "standby of"),
            (forced("low", None), "no other ACTIVE LOW primary"),
            (planned("low"), "LOW and has no standby"),
            (forced("normal", Some(0)), "renewed its lease since"),
        ];
        for (command, expected) in refusals {
            let err = apply(&mut state, command).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err}");
            assert_eq!(state.revision(), revision, "{expected}: nothing changed");
        }
        apply(&mut state, forced("normal", None)).expect("ops failover");
        let again = apply(&mut state, forced("normal", None)).expect_err("second failover");
        assert!(matches!(again, CommandError::Busy(_)), "{again:?}");
    }

    #[test]
    fn a_failing_cell_gets_no_renewal_and_its_failover_only_goes_forward() {
        let mut state = system();
        let CommandOutput::Failover(view) =
            apply(&mut state, forced("normal", None)).expect("start")
        else {
            panic!("a failover");
        };
        let renewed = apply(
            &mut state,
            Command::RenewLeases {
                cells: vec!["normal".into(), "normal-s".into(), "gone".into()],
                lease_ms: 1_000,
            },
        );
        let Ok(CommandOutput::Leases { granted, refused }) = renewed else {
            panic!("{renewed:?}");
        };
        assert_eq!(granted, vec![Arc::<str>::from("normal-s")]);
        assert_eq!(refused, vec![Arc::<str>::from("normal"), Arc::from("gone")]);
        let advance = |from, to| Command::AdvanceFailover {
            id: view.id,
            from,
            to,
            lsn: 0,
            error: None,
            merged: Vec::new(),
            now_ms: 20,
        };
        assert!(apply(&mut state, advance(Phase::Promoting, Phase::Done)).is_err());
        apply(&mut state, advance(Phase::Fencing, Phase::Promoting)).expect("switch");
        assert_eq!(route(&state, "n1"), Ok((Arc::from("normal-s"), 2)));
        assert!(
            apply(&mut state, advance(Phase::Fencing, Phase::Promoting)).is_err(),
            "a repeated switch is refused"
        );
        apply(&mut state, advance(Phase::Promoting, Phase::Done)).expect("done");
        assert!(state.active_failover_of("normal").is_none());
    }

    #[test]
    fn a_promoted_standby_registered_again_as_configured_stays_a_primary() {
        let mut state = system();
        apply(&mut state, forced("normal", Some(0))).expect("failover");
        // As its agent's config still describes it: the standby of "normal".
        let register_as_standby_of = |state: &mut ControlState, primary: &str| {
            apply(
                state,
                Command::RegisterCell {
                    cell_id: "normal-s".into(),
                    region: "hz".into(),
                    zone: "c".into(),
                    tier: Tier::Normal,
                    endpoint: "normal-s:1".into(),
                    capacity: 10,
                    standby_of: Some(primary.into()),
                },
            )
        };
        let again = register_as_standby_of(&mut state, "normal");
        let Ok(CommandOutput::Cell(view)) = again else {
            panic!("{again:?}");
        };
        assert_eq!(view.record.standby_of, None);
        let other = register_as_standby_of(&mut state, "high");
        assert!(matches!(other, Err(CommandError::AlreadyExists { .. })));
    }

    /// Starts tenant n1's move off the NORMAL cell: a tier change to HIGH.
    fn migrate_off_normal(state: &mut ControlState) {
        apply(
            state,
            Command::StartMigration {
                key: RouteKey::tenant("n1"),
                target_cell: None,
                new_tier: Some(Tier::High),
                now_ms: 1,
            },
        )
        .expect("tier change to HIGH");
    }

    #[test]
    fn a_migration_that_needs_the_failed_cell_fails_and_its_key_moves() {
        let mut state = system();
        migrate_off_normal(&mut state);
        apply(&mut state, forced("normal", Some(0))).expect("failover");
        let migration = state.migrations().values().next_back().expect("migration");
        assert_eq!(migration.phase, MigrationPhase::Failed);
        assert!(
            migration
                .error
                .as_deref()
                .unwrap_or("")
                .contains("failed over")
        );
        assert_eq!(
            state.tenants().get("n1").map(|t| t.state),
            Some(TenantState::Active)
        );
        assert_eq!(
            state.resolve(&RouteKey::tenant("n1")).map(|r| r.cell_id),
            Ok(Arc::from("normal-s"))
        );
    }

    /// Where a tenant's route points, and at which epoch.
    fn route(state: &ControlState, tenant: &str) -> Result<(Arc<str>, u64), CommandError> {
        state
            .resolve(&RouteKey::tenant(tenant))
            .map(|r| (r.cell_id, r.epoch))
    }

    fn planned(cell_id: &str) -> Command {
        Command::StartFailover {
            cell_id: cell_id.into(),
            standby: None,
            mode: Mode::Planned,
            reason: "maintenance".into(),
            automatic: false,
            expected_renewals: None,
            now_ms: 10,
        }
    }

    fn advance(id: u64, (from, to): (Phase, Phase), lsn: u64) -> Command {
        Command::AdvanceFailover {
            id,
            from,
            to,
            lsn,
            error: (to == Phase::Thawing).then(|| "too slow".to_string()),
            merged: Vec::new(),
            now_ms: 30,
        }
    }

    #[test]
    fn a_planned_failover_switches_only_once_the_standby_has_the_frozen_lsn() {
        let mut state = system();
        let CommandOutput::Failover(view) = apply(&mut state, planned("normal")).expect("start")
        else {
            panic!("a failover");
        };
        assert_eq!(view.record.phase, Phase::Freezing);
        let cell = |state: &ControlState, id: &str| state.cells().get(id).map(|c| c.state);
        assert_eq!(
            cell(&state, "normal"),
            Some(CellState::Draining),
            "no new placements"
        );
        let migrate = apply(
            &mut state,
            Command::StartMigration {
                key: RouteKey::tenant("n1"),
                target_cell: None,
                new_tier: Some(Tier::High),
                now_ms: 11,
            },
        );
        assert!(matches!(migrate, Err(CommandError::Busy(_))), "{migrate:?}");
        apply(
            &mut state,
            advance(view.id, (Phase::Freezing, Phase::CatchingUp), 120),
        )
        .expect("frozen");
        let early = apply(
            &mut state,
            advance(view.id, (Phase::CatchingUp, Phase::Promoting), 119),
        );
        assert!(early.is_err(), "the standby lacks LSN 120");
        let CommandOutput::Failover(view) = apply(
            &mut state,
            advance(view.id, (Phase::CatchingUp, Phase::Promoting), 125),
        )
        .expect("switch") else {
            panic!("a failover");
        };
        assert_eq!(
            view.record.ledger,
            Ledger {
                primary_lsn: 120,
                standby_lsn: 125,
                in_sync: true
            }
        );
        assert_eq!(view.record.frozen_ms, 30);
        assert_eq!(cell(&state, "normal"), Some(CellState::Demoted));
        assert_eq!(route(&state, "n1"), Ok((Arc::from("normal-s"), 2)));
    }

    #[test]
    fn a_planned_failover_given_up_leaves_the_cell_its_keys() {
        let mut state = system();
        let CommandOutput::Failover(view) = apply(&mut state, planned("normal")).expect("start")
        else {
            panic!("a failover");
        };
        apply(
            &mut state,
            advance(view.id, (Phase::Freezing, Phase::Thawing), 0),
        )
        .expect("give up");
        assert!(
            apply(
                &mut state,
                advance(view.id, (Phase::CatchingUp, Phase::Promoting), 9)
            )
            .is_err(),
            "no switch after giving up"
        );
        let CommandOutput::Failover(view) = apply(
            &mut state,
            advance(view.id, (Phase::Thawing, Phase::RolledBack), 0),
        )
        .expect("thawed") else {
            panic!("a failover");
        };
        assert_eq!(view.record.error.as_deref(), Some("too slow"));
        assert_eq!(
            state.cells().get("normal").map(|c| c.state),
            Some(CellState::Active)
        );
        assert_eq!(route(&state, "n1"), Ok((Arc::from("normal"), 1)));
    }

    #[test]
    fn only_a_planned_failover_before_its_switch_can_be_cancelled() {
        use crate::control::failovers::cancel;
        use cellplane_api::proto::control::CancelFailoverRequest;
        let mut state = system();
        let CommandOutput::Failover(view) = apply(&mut state, planned("normal")).expect("start")
        else {
            panic!("a failover");
        };
        let request = |reason: &str| CancelFailoverRequest {
            failover_id: format!("fo-{}", view.id),
            reason: reason.into(),
        };
        apply(
            &mut state,
            advance(view.id, (Phase::Freezing, Phase::CatchingUp), 120),
        )
        .expect("frozen");
        let (id, command) = cancel(&state, &request("window closed")).expect("cancellable");
        assert_eq!(id, view.id);
        apply(&mut state, command).expect("cancel");
        let record = &state.failovers()[&view.id];
        assert_eq!(record.phase, Phase::Thawing);
        assert_eq!(record.error.as_deref(), Some("cancelled: window closed"));
        let again = cancel(&state, &request("")).expect_err("thawing");
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);
        assert!(again.message().starts_with("failover_id:"), "{again:?}");
        apply(
            &mut state,
            advance(view.id, (Phase::Thawing, Phase::RolledBack), 0),
        )
        .expect("thawed");
        assert_eq!(route(&state, "n1"), Ok((Arc::from("normal"), 1)));

        // A FORCED one runs to its end; a bad id or reason is refused naming the field.
        let CommandOutput::Failover(forced) = apply(
            &mut state,
            Command::StartFailover {
                cell_id: "normal".into(),
                standby: None,
                mode: Mode::Forced,
                reason: "disk alarm".into(),
                automatic: false,
                expected_renewals: None,
                now_ms: 40,
            },
        )
        .expect("forced") else {
            panic!("a failover");
        };
        let refused = cancel(
            &state,
            &CancelFailoverRequest {
                failover_id: format!("fo-{}", forced.id),
                reason: String::new(),
            },
        )
        .expect_err("forced");
        assert!(refused.message().contains("FORCED"), "{refused:?}");
        let bad = cancel(
            &state,
            &CancelFailoverRequest {
                failover_id: "failover-1".into(),
                reason: String::new(),
            },
        )
        .expect_err("bad id");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().starts_with("failover_id"), "{bad:?}");
        let missing = cancel(
            &state,
            &CancelFailoverRequest {
                failover_id: "fo-999".into(),
                reason: String::new(),
            },
        )
        .expect_err("missing");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }

    #[test]
    fn a_planned_failover_waits_for_the_cells_migrations() {
        let mut state = system();
        migrate_off_normal(&mut state);
        let busy = apply(&mut state, planned("normal"));
        assert!(matches!(busy, Err(CommandError::Busy(_))), "{busy:?}");
    }

    /// Fails `cell_id` over by the detector's rule and finishes it, as its agent would.
    fn failed_over(state: &mut ControlState, cell_id: &str) -> u64 {
        let CommandOutput::Failover(view) = apply(state, forced(cell_id, Some(0))).expect("start")
        else {
            panic!("a failover");
        };
        apply(state, advance(view.id, (Phase::Promoting, Phase::Done), 0)).expect("done");
        view.id
    }

    fn rejoin(state: &mut ControlState, cell_id: &str) -> CommandResult {
        apply(
            state,
            Command::Rejoin {
                cell_id: cell_id.into(),
            },
        )
    }

    #[test]
    fn cells_a_failover_left_behind_rejoin_as_standbys_of_the_cell_that_took_over() {
        let mut state = system();
        assert!(rejoin(&mut state, "high").is_err(), "no failover yet");
        let id = failed_over(&mut state, "high");
        let cell = |state: &ControlState, id: &str| state.cells().get(id).cloned().expect("cell");
        // The remote standby follows the promoted in-region one; the old primary too.
        rejoin(&mut state, "high-remote").expect("re-point the remote standby");
        assert_eq!(
            cell(&state, "high-remote").standby_of.as_deref(),
            Some("high-near")
        );
        assert_eq!(cell(&state, "high-remote").state, CellState::Active);
        let keys = [("t1", "", 0), ("t2", "", 0), ("n1", "hot", 0)];
        apply(&mut state, merged(id, &keys)).expect("merged back");
        rejoin(&mut state, "high").expect("the old primary rejoins");
        let old = cell(&state, "high");
        assert_eq!(old.standby_of.as_deref(), Some("high-near"));
        assert_eq!(old.state, CellState::Joining);
        assert!(rejoin(&mut state, "high").is_err(), "once");
        assert!(rejoin(&mut state, "normal").is_err(), "never failed over");
        assert_eq!(state.standbys_of(&Arc::from("high-near")).len(), 2);
    }

    #[test]
    fn a_cell_failed_over_again_rejoins_only_once_its_newest_failover_is_merged() {
        let mut state = system();
        let active = |state: &mut ControlState, cell_id: &str| {
            apply(
                state,
                Command::SetCellState {
                    cell_id: cell_id.into(),
                    state: CellState::Active,
                },
            )
            .expect("ACTIVE");
        };
        // normal → normal-s, merged; normal rejoins; then back: normal-s → normal, merged.
        let there = failed_over(&mut state, "normal");
        apply(&mut state, merged(there, &[("n1", "", 0)])).expect("merged back");
        rejoin(&mut state, "normal").expect("rejoins normal-s");
        active(&mut state, "normal");
        let back = failed_over(&mut state, "normal-s");
        apply(&mut state, merged(back, &[("n1", "", 0)])).expect("merged back");
        rejoin(&mut state, "normal-s").expect("rejoins normal");
        active(&mut state, "normal-s");
        // normal fails again. Its first failover, long merged, says nothing of this one.
        let CommandOutput::Failover(again) =
            apply(&mut state, forced("normal", None)).expect("again")
        else {
            panic!("a failover");
        };
        let refused = rejoin(&mut state, "normal").expect_err("the newest failover is under way");
        assert!(
            refused.to_string().contains("(the failover is FENCING)"),
            "{refused}"
        );
        for step in [
            (Phase::Fencing, Phase::Promoting),
            (Phase::Promoting, Phase::Done),
        ] {
            apply(&mut state, advance(again.id, step, 0)).expect("forward");
        }
        assert!(
            rejoin(&mut state, "normal").is_err(),
            "DONE, not merged back yet"
        );
        apply(&mut state, merged(again.id, &[("n1", "", 0)])).expect("merged back");
        rejoin(&mut state, "normal").expect("rejoins normal-s again");
    }

    #[test]
    fn a_rejoined_cell_gets_no_lease_until_it_follows_and_is_active() {
        let mut state = system();
        let id = failed_over(&mut state, "high");
        apply(
            &mut state,
            merged(id, &[("t1", "", 0), ("t2", "", 0), ("n1", "hot", 0)]),
        )
        .expect("merged back");
        rejoin(&mut state, "high").expect("the old primary rejoins");
        let renew = |state: &mut ControlState| {
            let renewed = apply(
                state,
                Command::RenewLeases {
                    cells: vec!["high".into()],
                    lease_ms: 1_000,
                },
            );
            let Ok(CommandOutput::Leases { granted, .. }) = renewed else {
                panic!("{renewed:?}");
            };
            granted
        };
        // It may still run as the primary it was, holding its old grants.
        assert!(renew(&mut state).is_empty(), "a lease while JOINING");
        apply(
            &mut state,
            Command::SetCellState {
                cell_id: "high".into(),
                state: CellState::Active,
            },
        )
        .expect("it follows: ACTIVE");
        assert_eq!(renew(&mut state), vec![Arc::<str>::from("high")]);
    }

    fn merged(id: u64, keys: &[(&str, &str, u64)]) -> Command {
        Command::AdvanceFailover {
            id,
            from: Phase::Done,
            to: Phase::Merged,
            lsn: 0,
            error: None,
            merged: keys
                .iter()
                .map(|(tenant, conversation, messages)| MergedKey {
                    tenant_id: (*tenant).into(),
                    conversation_id: (*conversation).into(),
                    messages: *messages,
                })
                .collect(),
            now_ms: 40,
        }
    }

    #[test]
    fn a_failed_cell_rejoins_only_once_its_history_is_merged_back_and_counted() {
        let mut state = system();
        let id = failed_over(&mut state, "high");
        let err = rejoin(&mut state, "high").expect_err("not merged yet");
        assert!(err.to_string().contains("merges them back first"), "{err}");
        let revision = state.revision();
        for partial in [
            vec![("t1", "", 0)],
            vec![("t1", "", 0), ("t2", "", 0), ("n1", "hot", 0), ("x", "", 1)],
            vec![("t1", "", 0), ("t1", "", 0), ("n1", "hot", 0)],
        ] {
            let err = apply(&mut state, merged(id, &partial)).expect_err("not every key once");
            assert!(
                err.to_string().contains("each of the failover's 3 keys"),
                "{err}"
            );
        }
        assert_eq!(state.revision(), revision, "nothing changed");
        let CommandOutput::Failover(view) = apply(
            &mut state,
            merged(id, &[("t2", "", 0), ("n1", "hot", 2), ("t1", "", 1)]),
        )
        .expect("merged") else {
            panic!("a failover");
        };
        assert_eq!(view.record.phase, Phase::Merged);
        let ledger = view.record.to_proto(id).ledger.expect("ledger");
        assert!(ledger.merged);
        assert_eq!(ledger.missing_messages, 3);
        rejoin(&mut state, "high").expect("rejoins once merged");
        assert_eq!(
            state
                .cells()
                .get("high")
                .and_then(|c| c.standby_of.as_deref()),
            Some("high-near")
        );
    }

    #[test]
    fn a_low_cell_fails_over_to_a_fallback_and_comes_back_empty() {
        let mut state = system();
        register(&mut state, "low-2", ("hz", "b"), Tier::Low, None);
        register(&mut state, "low-far", ("bj", "a"), Tier::Low, None);
        let CommandOutput::Failover(view) =
            apply(&mut state, forced("low", Some(0))).expect("start")
        else {
            panic!("a failover");
        };
        let record = &view.record;
        assert!(record.fallback);
        assert_eq!(
            &*record.standby_cell, "low-2",
            "a LOW primary of its own region"
        );
        assert_eq!(record.phase, Phase::Done, "nothing to promote");
        assert_eq!(route(&state, "l1").expect("route"), ("low-2".into(), 2));
        assert_eq!(
            state.cells().get("low-2").map(|c| c.state),
            Some(CellState::Active)
        );
        apply(&mut state, merged(view.id, &[("l1", "", 5)])).expect("merged");
        let cell = rejoin(&mut state, "low").expect("rejoins");
        let CommandOutput::Cell(cell) = cell else {
            panic!("a cell");
        };
        assert_eq!(
            cell.record.state,
            CellState::Active,
            "an empty LOW primary again"
        );
        assert_eq!(cell.record.standby_of, None);
        // The fallback failing in turn has the first cell to go to.
        assert_eq!(
            state.failover_targets(&Arc::from("low-2"))[0],
            Arc::from("low")
        );
    }

    #[test]
    fn failovers_in_flight_stop_at_their_limit_and_one_past_is_refused() {
        let mut state = ControlState::default();
        for i in 0..=MAX_FAILOVERS_IN_FLIGHT {
            let primary = format!("p{i}");
            register(&mut state, &primary, ("hz", "a"), Tier::Normal, None);
            register(
                &mut state,
                &format!("s{i}"),
                ("hz", "b"),
                Tier::Normal,
                Some(&primary),
            );
        }
        // Started by ops, each waits out the cell's lease in FENCING: unfinished.
        for i in 0..MAX_FAILOVERS_IN_FLIGHT {
            apply(&mut state, forced(&format!("p{i}"), None)).expect("within the limit");
        }
        let revision = state.revision();
        let past = apply(
            &mut state,
            forced(&format!("p{MAX_FAILOVERS_IN_FLIGHT}"), None),
        )
        .expect_err("one past the limit");
        assert!(matches!(past, CommandError::Exhausted(_)), "{past:?}");
        assert_eq!(state.revision(), revision, "nothing changed");
    }
}
