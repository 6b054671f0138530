//! Applying migration commands: planning a migration, moving it through its phases, and the
//! switch, which moves the route in the same command that records it.

use std::sync::Arc;

use super::ControlState;
use super::command::{CommandError, CommandOutput, CommandResult, Entity, MigrationView};
use super::history::RouteEvent;
use super::model::{CellState, RouteKey, TenantState, Tier};
use crate::limits::{MAX_FINISHED_MIGRATIONS, MAX_MIGRATIONS_IN_FLIGHT};
use crate::migration::record::{MigrationRecord, Phase, Progress, display_id};
use crate::placement;

impl ControlState {
    /// The migration of `tenant_id` that has not finished, if any: at most one runs per tenant,
    /// so a tenant move and a move of one of its conversations never copy the same rows.
    pub fn active_migration_of(&self, tenant_id: &str) -> Option<(u64, &MigrationRecord)> {
        self.migrations
            .iter()
            .rev()
            .find(|(_, m)| !m.phase.is_terminal() && *m.key.tenant_id == *tenant_id)
            .map(|(id, m)| (*id, m))
    }

    /// Refuses a direct change to `tenant_id`'s routes while it migrates.
    pub(super) fn check_not_migrating(&self, tenant_id: &str) -> Result<(), CommandError> {
        match self.active_migration_of(tenant_id) {
            Some((id, m)) => Err(CommandError::FailedPrecondition(format!(
                "tenant_id: tenant {tenant_id:?} is migrating ({}, {}); wait for it or cancel it",
                display_id(id),
                m.phase.name()
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn start_migration(
        &mut self,
        key: &RouteKey,
        target_cell: Option<&Arc<str>>,
        new_tier: Option<Tier>,
        now_ms: u64,
        revision: u64,
    ) -> CommandResult {
        let current = self.resolve(key)?;
        let Some(tenant) = self.tenants.get(&key.tenant_id) else {
            return Err(CommandError::NotFound {
                what: Entity::Tenant,
                id: key.tenant_id.to_string(),
            });
        };
        if let Some((id, m)) = self.active_migration_of(&key.tenant_id) {
            return Err(CommandError::Busy(format!(
                "tenant_id: tenant {:?} is already migrating ({}, {} of {} to {:?}); wait for it or cancel it",
                key.tenant_id,
                display_id(id),
                m.phase.name(),
                m.key,
                m.target
            )));
        }
        let running = self
            .migrations
            .values()
            .filter(|m| !m.phase.is_terminal())
            .count();
        if running >= MAX_MIGRATIONS_IN_FLIGHT {
            return Err(CommandError::Exhausted(format!(
                "{running} migrations are running, the most at once ({MAX_MIGRATIONS_IN_FLIGHT}); retry once some finish"
            )));
        }
        if new_tier == Some(tenant.tier) {
            return Err(CommandError::FailedPrecondition(format!(
                "tier: tenant {:?} is already {}",
                key.tenant_id,
                tenant.tier.name()
            )));
        }
        let tier = new_tier.unwrap_or(tenant.tier);
        let target = match target_cell {
            Some(target) => target.clone(),
            None => placement::choose_primary(
                &self.cells,
                tier,
                &tenant.home_region,
                Some(&current.cell_id),
            )
            .ok_or_else(|| {
                CommandError::FailedPrecondition(format!(
                    "target_cell: no other ACTIVE cell of tier {} with spare capacity in region {:?}",
                    tier.name(),
                    tenant.home_region
                ))
            })?,
        };
        // A failover takes every key of its cell at once; a migration would race it.
        for cell_id in [&current.cell_id, &target] {
            if let Some((id, f)) = self.active_failover_of(cell_id) {
                return Err(CommandError::Busy(format!(
                    "cell {cell_id:?} is failing over ({}, {}); migrate after it",
                    crate::failover::record::display_id(id),
                    f.phase.name()
                )));
            }
        }
        let Some((target, cell)) = self.cells.get_key_value(&target) else {
            return Err(CommandError::Dangling {
                field: "target_cell".into(),
                what: Entity::Cell,
                id: target.to_string(),
            });
        };
        if *target == current.cell_id {
            return Err(CommandError::Invalid {
                field: "target_cell".into(),
                rule: format!("must differ from the source: {key} is already on cell {target:?}"),
            });
        }
        if cell.state != CellState::Active {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target:?} is {}, migrations go only to ACTIVE cells",
                cell.state.name()
            )));
        }
        if cell.standby_of.is_some() {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target:?} is a standby; migrations go to primary cells"
            )));
        }
        if cell.tier != tier {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target:?} is tier {}, tenant {:?} needs tier {}",
                cell.tier.name(),
                key.tenant_id,
                tier.name()
            )));
        }
        if key.conversation_id.is_none() && cell.spare() == 0 {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target:?} has no spare capacity ({} of {} tenants)",
                cell.load, cell.capacity
            )));
        }
        let record = MigrationRecord {
            key: key.clone(),
            source: current.cell_id.clone(),
            target: target.clone(),
            phase: Phase::Planned,
            source_epoch: current.epoch,
            new_tier,
            progress: Progress::default(),
            error: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            frozen_ms: 0,
            switched_ms: 0,
            purge_after_ms: None,
            updated_revision: revision,
        };
        self.migrations.insert(revision, record.clone());
        self.migrations_revision = revision;
        if let Some(tenant) = self.tenants.get_mut(&key.tenant_id) {
            tenant.state = TenantState::Migrating;
        }
        Ok(CommandOutput::Migration(MigrationView {
            id: revision,
            record,
        }))
    }

    /// Applies `AdvanceMigration`, whose fields are passed as they are.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn advance_migration(
        &mut self,
        id: u64,
        from: Phase,
        to: Phase,
        progress: &Progress,
        error: Option<&String>,
        now_ms: u64,
        purge_after_ms: Option<u64>,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        let Some(mut record) = self.migrations.get(&id).cloned() else {
            return Err(CommandError::NotFound {
                what: Entity::Migration,
                id: display_id(id),
            });
        };
        super::check_advance(
            ("migration_id", &display_id(id)),
            (record.phase.name(), from.name(), to.name()),
            Phase::can_advance(from, to),
        )?;
        record.progress.merge(progress);
        if to == Phase::Switching {
            let p = record.progress;
            if p.copied_lsn < p.frozen_lsn {
                return Err(CommandError::FailedPrecondition(format!(
                    "phase: {} cannot switch: the target has LSN {} of the {} frozen on the source",
                    display_id(id),
                    p.copied_lsn,
                    p.frozen_lsn
                )));
            }
            // The switch: the route moves, fenced by the epoch the migration started from.
            self.move_route(
                &record.key,
                record.source_epoch,
                &record.target,
                revision,
                events,
            )?;
            if let Some(tier) = record.new_tier
                && let Some(tenant) = self.tenants.get_mut(&record.key.tenant_id)
            {
                tenant.tier = tier;
            }
            record.switched_ms = now_ms;
            record.purge_after_ms = purge_after_ms;
        }
        if to == Phase::Freezing && from != Phase::Freezing {
            record.frozen_ms = now_ms;
        }
        if let Some(error) = error {
            record.error = Some(error.clone());
        }
        record.phase = to;
        record.updated_ms = now_ms;
        record.updated_revision = revision;
        if to.is_terminal()
            && let Some(tenant) = self.tenants.get_mut(&record.key.tenant_id)
        {
            tenant.state = TenantState::Active;
        }
        self.migrations.insert(id, record.clone());
        self.migrations_revision = revision;
        if to.is_terminal() {
            self.forget_old_migrations();
        }
        Ok(CommandOutput::Migration(MigrationView { id, record }))
    }

    /// Keeps the newest [`MAX_FINISHED_MIGRATIONS`] finished migrations, so the state does not
    /// grow with every migration ever run.
    fn forget_old_migrations(&mut self) {
        if self.migrations.len() <= MAX_FINISHED_MIGRATIONS {
            return;
        }
        let finished: Vec<u64> = self
            .migrations
            .iter()
            .filter(|(_, m)| m.phase.is_terminal())
            .map(|(id, _)| *id)
            .collect();
        for id in finished
            .iter()
            .take(finished.len().saturating_sub(MAX_FINISHED_MIGRATIONS))
        {
            self.migrations.remove(id);
        }
    }
}
