//! The state as records: what a store that keeps records rather than a command log (etcd)
//! writes, and how records read back from it rebuild the same state.
//!
//! A write runs the ordinary deterministic [`ControlState::apply`] on a copy of the state, then
//! [`ControlState::changes_since`] says which records it changed. Counters the state derives
//! from other records (a cell's load, a tenant's override count, the revisions a record was
//! created and changed at) are not part of a record: the store provides the revisions and
//! [`ControlState::put_record`] keeps the counters, so two writers never contend on a counter.

use std::sync::Arc;

use imbl::OrdMap;

use super::history::{EventKind, RouteEvent};
use super::model::{
    CellRecord, OverrideRecord, ProtectionRecord, ReplicationHealth, RouteKey, TenantRecord,
};
use super::{ControlState, OverrideKey};
use crate::audit::entry::{AuditEntry, AuditId};
use crate::failover::record::{FailoverRecord, HaltRecord, LeaseRecord};
use crate::migration::record::MigrationRecord;

/// The key of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKey {
    Cell(Arc<str>),
    Tenant(Arc<str>),
    Override(OverrideKey),
    Migration(u64),
    /// The last epoch of a deleted tenant.
    Retired(Arc<str>),
    /// A primary's protection.
    Protection(Arc<str>),
    /// A cell's replication as its agent reported it.
    Replication(Arc<str>),
    /// A cell's lease renewals.
    Lease(Arc<str>),
    Failover(u64),
    /// Automatic failover stopped by a storm (one record, present while it is).
    FailoverHalt,
    /// One entry of the audit log.
    Audit(AuditId),
}

/// One record's value, without the fields the state derives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Cell(CellRecord),
    Tenant(TenantRecord),
    Override(OverrideRecord),
    Migration(MigrationRecord),
    Retired(u64),
    Protection(ProtectionRecord),
    Replication(ReplicationHealth),
    Lease(LeaseRecord),
    Failover(FailoverRecord),
    FailoverHalt(HaltRecord),
    Audit(AuditEntry),
}

impl Record {
    /// The record as stored: derived fields zeroed, so a change of a counter alone is no change.
    pub fn stored(self) -> Self {
        match self {
            Self::Cell(cell) => Self::Cell(CellRecord {
                load: 0,
                registered_revision: 0,
                ..cell
            }),
            Self::Tenant(tenant) => Self::Tenant(TenantRecord {
                override_count: 0,
                ..tenant
            }),
            Self::Migration(migration) => Self::Migration(MigrationRecord {
                updated_revision: 0,
                ..migration
            }),
            Self::Protection(protection) => Self::Protection(ProtectionRecord {
                revision: 0,
                ..protection
            }),
            Self::Failover(failover) => Self::Failover(FailoverRecord {
                updated_revision: 0,
                ..failover
            }),
            other => other,
        }
    }
}

/// A record a command changed: its new value, or `None` when it was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordChange {
    pub key: RecordKey,
    pub record: Option<Record>,
}

/// Appends the changes between two versions of one map, stored forms only.
fn diff_map<K: Ord + Clone, V: Clone + PartialEq>(
    before: &OrdMap<K, V>,
    after: &OrdMap<K, V>,
    key: impl Fn(&K) -> RecordKey,
    record: impl Fn(&V) -> Record,
    out: &mut Vec<RecordChange>,
) {
    // imbl skips the subtrees both versions share, so this costs the changes, not the map.
    for item in before.diff(after) {
        match item {
            imbl::ordmap::DiffItem::Add(k, v) => out.push(RecordChange {
                key: key(k),
                record: Some(record(v).stored()),
            }),
            imbl::ordmap::DiffItem::Update { old, new } => {
                let (was, now) = (record(old.1).stored(), record(new.1).stored());
                if was != now {
                    out.push(RecordChange {
                        key: key(new.0),
                        record: Some(now),
                    });
                }
            }
            imbl::ordmap::DiffItem::Remove(k, _) => out.push(RecordChange {
                key: key(k),
                record: None,
            }),
        }
    }
}

impl ControlState {
    /// The records that differ between `before` and this state, in record-kind order: cells,
    /// tenants, overrides, migrations, retired epochs, protection, replication, leases,
    /// failovers, the failover halt, audit entries.
    pub fn changes_since(&self, before: &ControlState) -> Vec<RecordChange> {
        let mut out = Vec::new();
        diff_map(
            &before.cells,
            &self.cells,
            |k| RecordKey::Cell(k.clone()),
            |v| Record::Cell(v.clone()),
            &mut out,
        );
        diff_map(
            &before.tenants,
            &self.tenants,
            |k| RecordKey::Tenant(k.clone()),
            |v| Record::Tenant(v.clone()),
            &mut out,
        );
        diff_map(
            &before.overrides,
            &self.overrides,
            |k| RecordKey::Override(k.clone()),
            |v| Record::Override(v.clone()),
            &mut out,
        );
        diff_map(
            &before.migrations,
            &self.migrations,
            |k| RecordKey::Migration(*k),
            |v| Record::Migration(v.clone()),
            &mut out,
        );
        diff_map(
            &before.retired,
            &self.retired,
            |k| RecordKey::Retired(k.clone()),
            |v| Record::Retired(*v),
            &mut out,
        );
        diff_map(
            &before.protection,
            &self.protection,
            |k| RecordKey::Protection(k.clone()),
            |v| Record::Protection(*v),
            &mut out,
        );
        diff_map(
            &before.replication,
            &self.replication,
            |k| RecordKey::Replication(k.clone()),
            |v| Record::Replication(v.clone()),
            &mut out,
        );
        diff_map(
            &before.leases,
            &self.leases,
            |k| RecordKey::Lease(k.clone()),
            |v| Record::Lease(*v),
            &mut out,
        );
        diff_map(
            &before.failovers,
            &self.failovers,
            |k| RecordKey::Failover(*k),
            |v| Record::Failover(v.clone()),
            &mut out,
        );
        if before.failover_halt != self.failover_halt {
            out.push(RecordChange {
                key: RecordKey::FailoverHalt,
                record: self.failover_halt.clone().map(Record::FailoverHalt),
            });
        }
        diff_map(
            &before.audit,
            &self.audit,
            |k| RecordKey::Audit(*k),
            |v| Record::Audit(v.clone()),
            &mut out,
        );
        out
    }

    /// Moves the state to `revision` without a record change (the store advanced elsewhere).
    pub fn advance_to(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// Drops route history up to `revision`, as the store's compaction did.
    pub fn compact_history(&mut self, revision: u64) {
        self.history.compact(revision);
    }

    /// Starts the history at `revision`: nothing before it can be replayed.
    pub fn start_history_at(&mut self, revision: u64) {
        self.history = super::history::History::from_parts(Default::default(), revision);
    }

    /// Writes one record read back from the store at `revision` (the record was created at
    /// `created_revision`), keeping the derived counters, and returns the route event it
    /// causes. The caller records events in the history ([`ControlState::record_events`]) when
    /// they are news, not when loading, and moves the revision once the whole revision is
    /// applied.
    pub fn put_record(
        &mut self,
        key: RecordKey,
        record: Record,
        revision: u64,
        created_revision: u64,
    ) -> Result<Option<RouteEvent>, RecordMismatch> {
        let event = match (key, record) {
            (RecordKey::Cell(cell_id), Record::Cell(mut cell)) => {
                cell.load = self.cells.get(&cell_id).map_or_else(
                    || {
                        self.tenants
                            .values()
                            .filter(|t| t.primary_cell == cell_id)
                            .count() as u64
                    },
                    |old| old.load,
                );
                cell.registered_revision = created_revision;
                self.cells.insert(cell_id, cell);
                None
            }
            (RecordKey::Tenant(tenant_id), Record::Tenant(mut tenant)) => {
                let old = self.tenants.get(&tenant_id).cloned();
                tenant.override_count = match &old {
                    Some(old) => old.override_count,
                    None => self.tenant_overrides(&tenant_id).count() as u64,
                };
                let moved = old.as_ref().is_none_or(|o| {
                    o.primary_cell != tenant.primary_cell || o.epoch != tenant.epoch
                });
                if old.as_ref().map(|o| &o.primary_cell) != Some(&tenant.primary_cell) {
                    if let Some(old) = &old
                        && let Some(cell) = self.cells.get_mut(&old.primary_cell)
                    {
                        cell.load = cell.load.saturating_sub(1);
                    }
                    if let Some(cell) = self.cells.get_mut(&tenant.primary_cell) {
                        cell.load += 1;
                    }
                }
                let route = moved.then(|| {
                    self.view(
                        RouteKey::tenant(tenant_id.clone()),
                        &tenant.primary_cell,
                        tenant.epoch,
                        false,
                        revision,
                    )
                });
                self.tenants.insert(tenant_id, tenant);
                route.map(|route| (EventKind::Put, route))
            }
            (RecordKey::Override(key), Record::Override(record)) => {
                let old = self.overrides.get(&key).cloned();
                if old.is_none()
                    && let Some(tenant) = self.tenants.get_mut(&key.0)
                {
                    tenant.override_count += 1;
                }
                let moved = old.as_ref() != Some(&record);
                let route = moved.then(|| {
                    self.view(
                        RouteKey::conversation(key.0.clone(), key.1.clone()),
                        &record.cell_id,
                        record.epoch,
                        true,
                        revision,
                    )
                });
                self.overrides.insert(key, record);
                route.map(|route| (EventKind::Put, route))
            }
            (RecordKey::Migration(id), Record::Migration(mut migration)) => {
                migration.updated_revision = revision;
                self.migrations.insert(id, migration);
                self.migrations_revision = revision;
                None
            }
            (RecordKey::Retired(tenant_id), Record::Retired(epoch)) => {
                self.retired.insert(tenant_id, epoch);
                None
            }
            (RecordKey::Protection(cell_id), Record::Protection(mut protection)) => {
                protection.revision = revision;
                self.protection.insert(cell_id, protection);
                None
            }
            (RecordKey::Replication(cell_id), Record::Replication(replication)) => {
                self.replication.insert(cell_id, replication);
                None
            }
            (RecordKey::Lease(cell_id), Record::Lease(lease)) => {
                self.leases.insert(cell_id, lease);
                None
            }
            (RecordKey::Failover(id), Record::Failover(mut failover)) => {
                failover.updated_revision = revision;
                self.failovers.insert(id, failover);
                None
            }
            (RecordKey::FailoverHalt, Record::FailoverHalt(halt)) => {
                self.failover_halt = Some(halt);
                None
            }
            (RecordKey::Audit(id), Record::Audit(entry)) => {
                self.audit.insert(id, entry);
                None
            }
            (key, _) => return Err(RecordMismatch(key)),
        };
        Ok(event.map(|(kind, route)| RouteEvent {
            revision,
            kind,
            route,
        }))
    }

    /// Appends route events to the history watches resume from.
    pub fn record_events(&mut self, events: &[RouteEvent]) {
        for event in events {
            self.history.push(event.clone());
        }
    }

    /// Removes one record deleted in the store at `revision`, keeping the derived counters, and
    /// returns the route event it causes (see [`ControlState::put_record`]).
    pub fn delete_record(&mut self, key: &RecordKey, revision: u64) -> Option<RouteEvent> {
        let event = match key {
            RecordKey::Cell(cell_id) => {
                self.cells.remove(cell_id);
                None
            }
            RecordKey::Tenant(tenant_id) => self.tenants.remove(tenant_id).map(|tenant| {
                if let Some(cell) = self.cells.get_mut(&tenant.primary_cell) {
                    cell.load = cell.load.saturating_sub(1);
                }
                self.view(
                    RouteKey::tenant(tenant_id.clone()),
                    &tenant.primary_cell,
                    tenant.epoch,
                    false,
                    revision,
                )
            }),
            RecordKey::Override(key) => self.overrides.remove(key).map(|record| {
                if let Some(tenant) = self.tenants.get_mut(&key.0) {
                    tenant.override_count = tenant.override_count.saturating_sub(1);
                }
                self.view(
                    RouteKey::conversation(key.0.clone(), key.1.clone()),
                    &record.cell_id,
                    record.epoch,
                    true,
                    revision,
                )
            }),
            RecordKey::Migration(id) => {
                self.migrations.remove(id);
                self.migrations_revision = revision;
                None
            }
            RecordKey::Retired(tenant_id) => {
                self.retired.remove(tenant_id);
                None
            }
            RecordKey::Protection(cell_id) => {
                self.protection.remove(cell_id);
                None
            }
            RecordKey::Replication(cell_id) => {
                self.replication.remove(cell_id);
                None
            }
            RecordKey::Lease(cell_id) => {
                self.leases.remove(cell_id);
                None
            }
            RecordKey::Failover(id) => {
                self.failovers.remove(id);
                None
            }
            RecordKey::FailoverHalt => {
                self.failover_halt = None;
                None
            }
            RecordKey::Audit(id) => {
                self.audit.remove(id);
                None
            }
        };
        event.map(|route| RouteEvent {
            revision,
            kind: EventKind::Delete,
            route,
        })
    }
}

/// A record of one kind stored under the key of another: the store's data is corrupt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record kind does not match its key {0:?}")]
pub struct RecordMismatch(pub RecordKey);
