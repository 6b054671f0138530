//! The control plane's replicated state and the deterministic apply of commands to it.
//!
//! Nothing here does I/O: the Raft layer feeds committed commands in log order, and services read
//! through the query methods. Maps are persistent (`imbl`), so taking a snapshot is an O(1) clone
//! and reads are never blocked while a snapshot of ten million tenants is written.

mod audit;
pub mod command;
mod drains;
mod failovers;
pub mod history;
mod migrations;
pub mod model;
pub mod records;

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;

use crate::audit::entry::{AuditEntry, AuditId};
use crate::failover::record::{FailoverRecord, HaltRecord, LeaseRecord};
use crate::migration::record::MigrationRecord;
use crate::placement;
use command::{CellView, Command, CommandError, CommandOutput, CommandResult, Entity, TenantView};
use history::{Compacted, EventKind, History, RouteEvent};
use model::{
    CellRecord, CellState, OverrideRecord, Protection, ProtectionRecord, ReplicationHealth,
    RouteKey, RouteView, TenantRecord, TenantState,
};

/// Key of a conversation override: `(tenant_id, conversation_id)`, ordered so one tenant's
/// overrides are contiguous.
pub type OverrideKey = (Arc<str>, Arc<str>);

/// The whole replicated state.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    revision: u64,
    cells: OrdMap<Arc<str>, CellRecord>,
    tenants: OrdMap<Arc<str>, TenantRecord>,
    overrides: OrdMap<OverrideKey, OverrideRecord>,
    /// Every migration by id (the revision that created it), finished ones included.
    migrations: OrdMap<u64, MigrationRecord>,
    /// The highest epoch each deleted tenant's routes reached: a tenant created again under
    /// the same id starts above it, so a writer still holding an epoch of the deleted tenant
    /// can never write into the new one.
    retired: OrdMap<Arc<str>, u64>,
    /// Each primary's protection, as its agent last recorded it.
    protection: OrdMap<Arc<str>, ProtectionRecord>,
    /// Replication as each cell's agent last reported it.
    replication: OrdMap<Arc<str>, ReplicationHealth>,
    /// Each cell's lease renewals.
    leases: OrdMap<Arc<str>, LeaseRecord>,
    /// Every failover by id (the revision that created it), the newest finished ones included.
    failovers: OrdMap<u64, FailoverRecord>,
    /// Set while automatic failover is stopped by a storm.
    failover_halt: Option<HaltRecord>,
    /// The newest admin calls, oldest dropped first.
    audit: OrdMap<AuditId, AuditEntry>,
    /// The revision of the newest change to a migration, so migration watchers skip the many
    /// commands that touch none. Derived from the records when a snapshot is loaded.
    migrations_revision: u64,
    history: History,
}

/// A state's parts, as a snapshot stores them.
pub struct Parts {
    pub revision: u64,
    pub cells: OrdMap<Arc<str>, CellRecord>,
    pub tenants: OrdMap<Arc<str>, TenantRecord>,
    pub overrides: OrdMap<OverrideKey, OverrideRecord>,
    pub migrations: OrdMap<u64, MigrationRecord>,
    pub retired: OrdMap<Arc<str>, u64>,
    pub protection: OrdMap<Arc<str>, ProtectionRecord>,
    pub replication: OrdMap<Arc<str>, ReplicationHealth>,
    pub leases: OrdMap<Arc<str>, LeaseRecord>,
    pub failovers: OrdMap<u64, FailoverRecord>,
    pub failover_halt: Option<HaltRecord>,
    pub audit: OrdMap<AuditId, AuditEntry>,
    pub history: History,
}

impl ControlState {
    /// Reassembles a state from its parts, as a snapshot stores them.
    pub fn from_parts(parts: Parts) -> Self {
        let Parts {
            revision,
            cells,
            tenants,
            overrides,
            migrations,
            retired,
            protection,
            replication,
            leases,
            failovers,
            failover_halt,
            audit,
            history,
        } = parts;
        let migrations_revision = migrations
            .values()
            .map(|m| m.updated_revision)
            .max()
            .unwrap_or(0);
        Self {
            revision,
            cells,
            tenants,
            overrides,
            migrations,
            retired,
            protection,
            replication,
            leases,
            failovers,
            failover_halt,
            audit,
            migrations_revision,
            history,
        }
    }

    /// Whether a storm stopped automatic failover, and since when.
    pub fn failover_halt(&self) -> Option<&HaltRecord> {
        self.failover_halt.as_ref()
    }

    /// The audit log, oldest first.
    pub fn audit(&self) -> &OrdMap<AuditId, AuditEntry> {
        &self.audit
    }

    pub fn leases(&self) -> &OrdMap<Arc<str>, LeaseRecord> {
        &self.leases
    }

    pub fn failovers(&self) -> &OrdMap<u64, FailoverRecord> {
        &self.failovers
    }

    pub fn replication(&self) -> &OrdMap<Arc<str>, ReplicationHealth> {
        &self.replication
    }

    pub fn protection(&self) -> &OrdMap<Arc<str>, ProtectionRecord> {
        &self.protection
    }

    /// A tenant as answers show it, with its primary cell's protection and standbys.
    pub fn tenant_view(&self, tenant_id: &Arc<str>, record: TenantRecord) -> TenantView {
        let primary = &record.primary_cell;
        TenantView {
            tenant_id: tenant_id.clone(),
            protection: self.protection.get(primary).copied(),
            standby_cells: self.standbys_of(primary),
            record,
        }
    }

    /// The cells registered as standbys of `cell_id`.
    fn standbys_of(&self, cell_id: &Arc<str>) -> Vec<Arc<str>> {
        self.cells
            .iter()
            .filter(|(_, cell)| cell.standby_of.as_ref() == Some(cell_id))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A cell as answers show it: its record, its protection and its standbys.
    pub fn cell_view(&self, cell_id: &Arc<str>, record: CellRecord) -> CellView {
        CellView {
            cell_id: cell_id.clone(),
            record,
            protection: self.protection.get(cell_id).copied(),
            standbys: self.standbys_of(cell_id),
            replication: self.replication.get(cell_id).cloned(),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn compacted_revision(&self) -> u64 {
        self.history.compacted_revision()
    }

    pub fn cells(&self) -> &OrdMap<Arc<str>, CellRecord> {
        &self.cells
    }

    pub fn tenants(&self) -> &OrdMap<Arc<str>, TenantRecord> {
        &self.tenants
    }

    pub fn overrides(&self) -> &OrdMap<OverrideKey, OverrideRecord> {
        &self.overrides
    }

    pub fn migrations(&self) -> &OrdMap<u64, MigrationRecord> {
        &self.migrations
    }

    pub fn retired(&self) -> &OrdMap<Arc<str>, u64> {
        &self.retired
    }

    pub fn migrations_revision(&self) -> u64 {
        self.migrations_revision
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Applies one committed command. A refused command changes nothing; an applied one bumps the
    /// revision and returns the route events it caused, for the watch.
    pub fn apply(&mut self, command: &Command) -> (CommandResult, Vec<RouteEvent>) {
        let next_revision = self.revision + 1;
        let mut events = Vec::new();
        let result = match command {
            Command::RegisterCell {
                cell_id,
                region,
                zone,
                tier,
                endpoint,
                capacity,
                standby_of,
            } => {
                let record = CellRecord {
                    region: region.clone(),
                    zone: zone.clone(),
                    tier: *tier,
                    endpoint: endpoint.clone(),
                    state: CellState::Joining,
                    capacity: *capacity,
                    load: 0,
                    standby_of: standby_of.clone(),
                    registered_revision: next_revision,
                    health: None,
                };
                self.register_cell(cell_id, record)
            }
            Command::SetCellState { cell_id, state } => self.set_cell_state(cell_id, *state),
            Command::CreateTenant {
                tenant_id,
                tier,
                home_region,
            } => self.create_tenant(tenant_id, *tier, home_region, next_revision, &mut events),
            Command::DeleteTenant { tenant_id } => self
                .check_not_migrating(tenant_id)
                .and_then(|()| self.delete_tenant(tenant_id, next_revision, &mut events)),
            Command::MoveRoute {
                key,
                expected_epoch,
                target_cell,
            } => self.check_not_migrating(&key.tenant_id).and_then(|()| {
                self.move_route(
                    key,
                    *expected_epoch,
                    target_cell,
                    next_revision,
                    &mut events,
                )
            }),
            Command::StartMigration {
                key,
                target_cell,
                new_tier,
                now_ms,
            } => self.start_migration(key, target_cell.as_ref(), *new_tier, *now_ms, next_revision),
            Command::AdvanceMigration {
                id,
                from,
                to,
                progress,
                error,
                now_ms,
                purge_after_ms,
            } => self.advance_migration(
                *id,
                *from,
                *to,
                progress,
                error.as_ref(),
                *now_ms,
                *purge_after_ms,
                next_revision,
                &mut events,
            ),
            Command::Heartbeat { cell_id, health } => match self.cells.get_mut(cell_id) {
                Some(cell) => {
                    cell.health = Some(*health);
                    let record = cell.clone();
                    Ok(CommandOutput::Cell(Box::new(
                        self.cell_view(cell_id, record),
                    )))
                }
                None => Err(not_found(Entity::Cell, cell_id)),
            },
            Command::RecordProtection {
                cell_id,
                protection,
            } => self.record_protection(cell_id, *protection, next_revision),
            Command::Report {
                cell_id,
                health,
                replication,
            } => match self.cells.get_mut(cell_id) {
                Some(cell) => {
                    cell.health = Some(*health);
                    let record = cell.clone();
                    match replication {
                        Some(replication) => {
                            self.replication
                                .insert(cell_id.clone(), replication.clone());
                        }
                        None => {
                            self.replication.remove(cell_id);
                        }
                    }
                    Ok(CommandOutput::Cell(Box::new(
                        self.cell_view(cell_id, record),
                    )))
                }
                None => Err(not_found(Entity::Cell, cell_id)),
            },
            Command::RenewLeases { cells, lease_ms } => self.renew_leases(cells, *lease_ms),
            Command::DrainCell { cell_id } => self.drain_cell(cell_id),
            Command::Rejoin { cell_id } => self.rejoin(cell_id),
            Command::HaltAutomaticFailover { cells, now_ms } => {
                // The first halt names the storm; later ones change nothing.
                self.failover_halt.get_or_insert_with(|| HaltRecord {
                    since_ms: *now_ms,
                    cells: cells.clone(),
                });
                Ok(CommandOutput::Done {
                    revision: next_revision,
                })
            }
            Command::ResumeAutomaticFailover => match self.failover_halt.take() {
                Some(_) => Ok(CommandOutput::Done {
                    revision: next_revision,
                }),
                None => Err(CommandError::FailedPrecondition(
                    "automatic failover is not halted".into(),
                )),
            },
            Command::RemoveCell { cell_id } => self.remove_cell(cell_id, next_revision),
            Command::StartFailover {
                cell_id,
                standby,
                mode,
                reason,
                automatic,
                expected_renewals,
                now_ms,
            } => self.start_failover(
                cell_id,
                standby.as_ref(),
                *mode,
                reason,
                *automatic,
                *expected_renewals,
                *now_ms,
                next_revision,
                &mut events,
            ),
            Command::AdvanceFailover {
                id,
                from,
                to,
                lsn,
                error,
                merged,
                now_ms,
            } => self.advance_failover(
                *id,
                (*from, *to),
                *lsn,
                error.as_deref(),
                merged,
                *now_ms,
                next_revision,
                &mut events,
            ),
            Command::Audit { entries, keep } => self.record_audit(entries, *keep, next_revision),
            Command::Compact { revision } => {
                if *revision > self.revision {
                    Err(CommandError::Invalid {
                        field: "revision".into(),
                        rule: format!("must be at most the current revision {}", self.revision),
                    })
                } else {
                    self.history.compact(*revision);
                    Ok(CommandOutput::Done {
                        revision: next_revision,
                    })
                }
            }
        };
        if result.is_ok() {
            self.revision = next_revision;
            for event in &events {
                self.history.push(event.clone());
            }
        } else {
            assert!(events.is_empty(), "a refused command must not emit events");
        }
        (result, events)
    }

    fn register_cell(&mut self, cell_id: &Arc<str>, record: CellRecord) -> CommandResult {
        if let Some(existing) = self.cells.get(cell_id) {
            // An agent registers its cells again as its config describes them; a failover may
            // have changed whom a cell follows since, and the record says what it is now.
            let same = existing.region == record.region
                && existing.zone == record.zone
                && existing.tier == record.tier
                && existing.endpoint == record.endpoint
                && existing.capacity == record.capacity
                && (existing.standby_of == record.standby_of
                    || self.moved_by_failover(
                        cell_id,
                        record.standby_of.as_ref(),
                        existing.standby_of.as_ref(),
                    ));
            // Registering the same cell again is how an agent restarts; a different cell under
            // the same id is a mistake.
            return if same {
                Ok(CommandOutput::Cell(Box::new(
                    self.cell_view(cell_id, existing.clone()),
                )))
            } else {
                Err(CommandError::AlreadyExists {
                    what: Entity::Cell,
                    id: cell_id.to_string(),
                })
            };
        }
        if let Some(primary_id) = &record.standby_of {
            let Some(primary) = self.cells.get(primary_id) else {
                return Err(CommandError::FailedPrecondition(format!(
                    "standby_of: cell {primary_id:?} is not registered"
                )));
            };
            let siblings: Vec<&CellRecord> = self
                .cells
                .values()
                .filter(|cell| cell.standby_of.as_ref() == Some(primary_id))
                .collect();
            standby_fits(primary_id, primary, &siblings, &record)
                .map_err(CommandError::FailedPrecondition)?;
        }
        self.cells.insert(cell_id.clone(), record.clone());
        Ok(CommandOutput::Cell(Box::new(
            self.cell_view(cell_id, record),
        )))
    }

    fn record_protection(
        &mut self,
        cell_id: &Arc<str>,
        protection: Protection,
        revision: u64,
    ) -> CommandResult {
        let Some(cell) = self.cells.get(cell_id) else {
            return Err(not_found(Entity::Cell, cell_id));
        };
        if let Some(primary) = &cell.standby_of {
            return Err(CommandError::FailedPrecondition(format!(
                "cell_id: cell {cell_id:?} is a standby of {primary:?}; protection is a primary's"
            )));
        }
        let record = cell.clone();
        self.protection.insert(
            cell_id.clone(),
            ProtectionRecord {
                protection,
                revision,
            },
        );
        Ok(CommandOutput::Cell(Box::new(
            self.cell_view(cell_id, record),
        )))
    }

    fn set_cell_state(&mut self, cell_id: &Arc<str>, state: CellState) -> CommandResult {
        let Some(cell) = self.cells.get_mut(cell_id) else {
            return Err(not_found(Entity::Cell, cell_id));
        };
        if !CellState::can_move(cell.state, state) {
            return Err(CommandError::FailedPrecondition(format!(
                "state: cell {cell_id:?} cannot move from {} to {}",
                cell.state.name(),
                state.name()
            )));
        }
        cell.state = state;
        let record = cell.clone();
        Ok(CommandOutput::Cell(Box::new(
            self.cell_view(cell_id, record),
        )))
    }

    fn create_tenant(
        &mut self,
        tenant_id: &Arc<str>,
        tier: model::Tier,
        home_region: &Arc<str>,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        if self.tenants.contains_key(tenant_id) {
            return Err(CommandError::AlreadyExists {
                what: Entity::Tenant,
                id: tenant_id.to_string(),
            });
        }
        let Some(cell_id) = placement::choose_primary(&self.cells, tier, home_region, None) else {
            return Err(CommandError::FailedPrecondition(format!(
                "no ACTIVE cell of tier {} with spare capacity in region {home_region:?}",
                tier.name()
            )));
        };
        let Some(cell) = self.cells.get_mut(&cell_id) else {
            unreachable!("placement chose an unregistered cell {cell_id}");
        };
        cell.load += 1;
        let endpoint = cell.endpoint.clone();
        let epoch = self.retired.remove(tenant_id).map_or(1, |last| last + 1);
        let record = TenantRecord {
            tier,
            home_region: home_region.clone(),
            primary_cell: cell_id.clone(),
            epoch,
            state: TenantState::Active,
            override_count: 0,
        };
        self.tenants.insert(tenant_id.clone(), record.clone());
        events.push(RouteEvent {
            revision,
            kind: EventKind::Put,
            route: RouteView {
                key: RouteKey::tenant(tenant_id.clone()),
                cell_id,
                endpoint,
                epoch,
                revision,
                is_override: false,
            },
        });
        Ok(CommandOutput::Tenant(self.tenant_view(tenant_id, record)))
    }

    fn delete_tenant(
        &mut self,
        tenant_id: &Arc<str>,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        let Some(tenant) = self.tenants.get(tenant_id).cloned() else {
            return Err(not_found(Entity::Tenant, tenant_id));
        };
        let keys: Vec<OverrideKey> = self
            .tenant_overrides(tenant_id)
            .map(|(key, _)| key.clone())
            .collect();
        let last_epoch = self
            .tenant_overrides(tenant_id)
            .map(|(_, o)| o.epoch)
            .fold(tenant.epoch, u64::max);
        self.retired.insert(tenant_id.clone(), last_epoch);
        for key in keys {
            if let Some(record) = self.overrides.remove(&key) {
                let route = self.view(
                    RouteKey::conversation(key.0.clone(), key.1.clone()),
                    &record.cell_id,
                    record.epoch,
                    true,
                    revision,
                );
                events.push(RouteEvent {
                    revision,
                    kind: EventKind::Delete,
                    route,
                });
            }
        }
        self.tenants.remove(tenant_id);
        if let Some(cell) = self.cells.get_mut(&tenant.primary_cell) {
            cell.load = cell.load.saturating_sub(1);
        }
        let route = self.view(
            RouteKey::tenant(tenant_id.clone()),
            &tenant.primary_cell,
            tenant.epoch,
            false,
            revision,
        );
        events.push(RouteEvent {
            revision,
            kind: EventKind::Delete,
            route,
        });
        Ok(CommandOutput::Done { revision })
    }

    fn move_route(
        &mut self,
        key: &RouteKey,
        expected_epoch: u64,
        target_cell: &Arc<str>,
        revision: u64,
        events: &mut Vec<RouteEvent>,
    ) -> CommandResult {
        let current = self.resolve(key)?;
        if current.epoch != expected_epoch {
            return Err(CommandError::StaleEpoch {
                key: key.to_string(),
                expected: expected_epoch,
                current,
            });
        }
        let Some(target) = self.cells.get(target_cell) else {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target_cell:?} is not registered"
            )));
        };
        if target.state != CellState::Active {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target_cell:?} is {}, routes move only to ACTIVE cells",
                target.state.name()
            )));
        }
        if let Some(primary) = &target.standby_of {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: cell {target_cell:?} is a standby of {primary:?}; routes go to primary cells"
            )));
        }
        if current.cell_id == *target_cell {
            return Err(CommandError::FailedPrecondition(format!(
                "target_cell: key {key} is already routed to {target_cell:?}"
            )));
        }
        let new_epoch = expected_epoch + 1;
        let target_cell = self
            .cells
            .get_key_value(target_cell)
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| target_cell.clone());
        match &key.conversation_id {
            None => {
                let Some(tenant) = self.tenants.get_mut(&key.tenant_id) else {
                    return Err(not_found(Entity::Tenant, &key.tenant_id));
                };
                let source = std::mem::replace(&mut tenant.primary_cell, target_cell.clone());
                tenant.epoch = new_epoch;
                if let Some(cell) = self.cells.get_mut(&source) {
                    cell.load = cell.load.saturating_sub(1);
                }
                if let Some(cell) = self.cells.get_mut(&target_cell) {
                    cell.load += 1;
                }
            }
            Some(conversation_id) => {
                let override_key = (key.tenant_id.clone(), conversation_id.clone());
                let previous = self.overrides.insert(
                    override_key,
                    OverrideRecord {
                        cell_id: target_cell.clone(),
                        epoch: new_epoch,
                    },
                );
                if previous.is_none()
                    && let Some(tenant) = self.tenants.get_mut(&key.tenant_id)
                {
                    tenant.override_count += 1;
                }
            }
        }
        let route = self.view(
            key.clone(),
            &target_cell,
            new_epoch,
            key.conversation_id.is_some(),
            revision,
        );
        events.push(RouteEvent {
            revision,
            kind: EventKind::Put,
            route: route.clone(),
        });
        Ok(CommandOutput::Route(route))
    }

    fn view(
        &self,
        key: RouteKey,
        cell_id: &Arc<str>,
        epoch: u64,
        is_override: bool,
        revision: u64,
    ) -> RouteView {
        let endpoint = self
            .cells
            .get(cell_id)
            .map(|cell| cell.endpoint.clone())
            .unwrap_or_else(|| Arc::from(""));
        RouteView {
            key,
            cell_id: cell_id.clone(),
            endpoint,
            epoch,
            revision,
            is_override,
        }
    }

    /// The route of a key: its override if it has one, else its tenant's placement.
    pub fn resolve(&self, key: &RouteKey) -> Result<RouteView, CommandError> {
        let Some(tenant) = self.tenants.get(&key.tenant_id) else {
            return Err(not_found(Entity::Tenant, &key.tenant_id));
        };
        if let Some(conversation_id) = &key.conversation_id {
            let override_key = (key.tenant_id.clone(), conversation_id.clone());
            if let Some(record) = self.overrides.get(&override_key) {
                return Ok(self.view(
                    key.clone(),
                    &record.cell_id,
                    record.epoch,
                    true,
                    self.revision,
                ));
            }
        }
        Ok(self.view(
            key.clone(),
            &tenant.primary_cell,
            tenant.epoch,
            false,
            self.revision,
        ))
    }

    /// One tenant's overrides, in conversation order.
    pub fn tenant_overrides<'a>(
        &'a self,
        tenant_id: &Arc<str>,
    ) -> impl Iterator<Item = (&'a OverrideKey, &'a OverrideRecord)> + 'a {
        let tenant_id = tenant_id.clone();
        let start: OverrideKey = (tenant_id.clone(), Arc::from(""));
        self.overrides
            .range((Bound::Included(start), Bound::Unbounded))
            .take_while(move |((tenant, _), _)| *tenant == tenant_id)
    }

    /// Route events at or after `from_revision`.
    pub fn events_since(&self, from_revision: u64) -> Result<Vec<RouteEvent>, Compacted> {
        self.history.since(from_revision)
    }

    /// A page of tenants after `after` (exclusive), in id order.
    pub fn tenants_after(&self, after: Option<&str>, limit: usize) -> Vec<TenantView> {
        let lower = match after {
            Some(after) => Bound::Excluded(Arc::<str>::from(after)),
            None => Bound::Unbounded,
        };
        self.tenants
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(tenant_id, record)| self.tenant_view(tenant_id, record.clone()))
            .collect()
    }

    /// A page of routes after `after` (exclusive): every tenant's placement followed by its
    /// overrides, in key order.
    pub fn routes_after(&self, after: Option<&RouteKey>, limit: usize) -> Vec<RouteView> {
        let (tenant_lower, override_lower) = match after {
            None => (Bound::Unbounded, Bound::Unbounded),
            Some(RouteKey {
                tenant_id,
                conversation_id: None,
            }) => (
                Bound::Excluded(tenant_id.clone()),
                Bound::Included((tenant_id.clone(), Arc::from(""))),
            ),
            Some(RouteKey {
                tenant_id,
                conversation_id: Some(conversation_id),
            }) => (
                Bound::Excluded(tenant_id.clone()),
                Bound::Excluded((tenant_id.clone(), conversation_id.clone())),
            ),
        };
        let mut tenants = self
            .tenants
            .range((tenant_lower, Bound::Unbounded))
            .peekable();
        let mut overrides = self
            .overrides
            .range((override_lower, Bound::Unbounded))
            .peekable();
        let mut page = Vec::with_capacity(limit.min(4096));
        while page.len() < limit {
            // A tenant's placement sorts before its overrides: ("t", None) < ("t", Some(_)).
            let take_tenant = match (tenants.peek(), overrides.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((tenant_id, _)), Some(((override_tenant, _), _))) => {
                    tenant_id.as_ref() <= override_tenant.as_ref()
                }
            };
            let route = if take_tenant {
                let Some((tenant_id, tenant)) = tenants.next() else {
                    break;
                };
                self.view(
                    RouteKey::tenant(tenant_id.clone()),
                    &tenant.primary_cell,
                    tenant.epoch,
                    false,
                    self.revision,
                )
            } else {
                let Some(((tenant_id, conversation_id), record)) = overrides.next() else {
                    break;
                };
                self.view(
                    RouteKey::conversation(tenant_id.clone(), conversation_id.clone()),
                    &record.cell_id,
                    record.epoch,
                    true,
                    self.revision,
                )
            };
            page.push(route);
        }
        page
    }
}

impl ControlState {
    /// A registered cell with its interned id, or `NOT_FOUND`.
    fn cell_entry(&self, cell_id: &str) -> Result<(Arc<str>, CellRecord), CommandError> {
        self.cells
            .get_key_value(cell_id)
            .map(|(id, cell)| (id.clone(), cell.clone()))
            .ok_or_else(|| CommandError::NotFound {
                what: Entity::Cell,
                id: cell_id.to_string(),
            })
    }
}

/// The compare-and-set of a record's phase: refused unless the record (`field` names its id,
/// shown as `id`) is at `from` now and the record's table allows `from` → `to`.
fn check_advance(
    (field, id): (&str, &str),
    (now, from, to): (&str, &str, &str),
    allowed: bool,
) -> Result<(), CommandError> {
    if now != from {
        return Err(CommandError::FailedPrecondition(format!(
            "{field}: {id} is {now}, not {from}"
        )));
    }
    if !allowed {
        return Err(CommandError::FailedPrecondition(format!(
            "phase: {id} cannot go from {from} to {to}"
        )));
    }
    Ok(())
}

fn not_found(what: Entity, id: &Arc<str>) -> CommandError {
    CommandError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// Whether a cell may be registered as a standby of `primary` (whose other standbys are
/// `siblings`), as the tiers say: a NORMAL or HIGH primary has one in-region standby, in another
/// zone of its region; a HIGH primary also has one remote standby, in another region; a LOW
/// primary has none; a standby has its primary's tier and no standby of its own. The error
/// names the field and the rule.
pub fn standby_fits(
    primary_id: &str,
    primary: &CellRecord,
    siblings: &[&CellRecord],
    standby: &CellRecord,
) -> Result<(), String> {
    if primary.standby_of.is_some() {
        return Err(format!(
            "standby_of: cell {primary_id:?} is itself a standby; a standby follows a primary"
        ));
    }
    if primary.tier != standby.tier {
        return Err(format!(
            "standby_of: a standby must have its primary's tier {}",
            primary.tier.name()
        ));
    }
    if primary.tier == model::Tier::Low {
        return Err("standby_of: LOW cells keep one copy and have no standby".into());
    }
    let in_region = standby.region == primary.region;
    if in_region && standby.zone == primary.zone {
        return Err(format!(
            "standby_of: a standby must not share its primary's zone {}/{}",
            standby.region, standby.zone
        ));
    }
    if !in_region && primary.tier != model::Tier::High {
        return Err(format!(
            "standby_of: a {} primary's standby is in its own region {:?}; only HIGH cells have a remote standby",
            primary.tier.name(),
            primary.region
        ));
    }
    let taken = siblings
        .iter()
        .any(|sibling| (sibling.region == primary.region) == in_region);
    if taken {
        let which = if in_region { "in-region" } else { "remote" };
        return Err(format!(
            "standby_of: cell {primary_id:?} already has its {which} standby"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
