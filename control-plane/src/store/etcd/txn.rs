//! One command's changes as one etcd transaction.
//!
//! The transaction succeeds only if nothing the decision read has changed since the mirror
//! revision it was made at: every written record, and every record the written ones lean on (the
//! cell a route points to, the tenant a conversation belongs to, a migration's target), must
//! still have the `mod_revision` the mirror saw (0 for a record that did not exist). A tenant
//! deleted with its overrides also requires that none of its overrides changed since. A new
//! standby also rewrites its primary's record unchanged, so concurrent standbys of one primary
//! conflict. Placement counters (a cell's load) are derived, not stored, so concurrent writers
//! do not contend on them; the price is that capacity is checked against the mirror, which
//! concurrent creates on other nodes may overshoot by what they have in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};

use super::layout::{self, Layout, MetaKey};
use crate::state::ControlState;
use crate::state::records::{Record, RecordChange, RecordKey};
use crate::store::view::MachineState;

/// The records a changed record's validity leans on.
fn leans_on(record: &Record, key: &RecordKey, before: &ControlState) -> Vec<RecordKey> {
    match (record, key) {
        (Record::Cell(cell), _) => cell
            .standby_of
            .iter()
            .map(|primary| RecordKey::Cell(primary.clone()))
            .collect(),
        (Record::Tenant(tenant), _) => vec![RecordKey::Cell(tenant.primary_cell.clone())],
        (Record::Override(route), RecordKey::Override((tenant_id, _))) => vec![
            RecordKey::Cell(route.cell_id.clone()),
            RecordKey::Tenant(tenant_id.clone()),
        ],
        (Record::Migration(migration), RecordKey::Migration(id))
            if !before.migrations().contains_key(id) =>
        {
            vec![RecordKey::Cell(migration.target.clone())]
        }
        // A renewal is valid only while the cell is not failed; a failover only while the
        // cell's lease has not been renewed since it was decided: each fails the other's
        // compare.
        (Record::Lease(_), RecordKey::Lease(cell_id)) => vec![RecordKey::Cell(cell_id.clone())],
        (Record::Failover(failover), _) => vec![
            RecordKey::Lease(failover.cell_id.clone()),
            RecordKey::Cell(failover.standby_cell.clone()),
        ],
        _ => Vec::new(),
    }
}

/// The transaction that applies `changes`, decided on `before`.
pub fn build(layout: &Layout, before: &MachineState, changes: Vec<RecordChange>) -> Txn {
    let deleted_tenants: BTreeSet<Arc<str>> = changes
        .iter()
        .filter_map(|change| match (&change.key, &change.record) {
            (RecordKey::Tenant(id), None) => Some(id.clone()),
            _ => None,
        })
        .collect();
    let mut expected: BTreeMap<RecordKey, u64> = BTreeMap::new();
    let mut expect = |key: RecordKey| {
        let revision = before.mod_revisions.get(&key).copied().unwrap_or(0);
        expected.entry(key).or_insert(revision);
    };
    let mut operations = Vec::with_capacity(changes.len() + deleted_tenants.len() + 1);
    let mut touches: Vec<(Arc<str>, Record)> = Vec::new();
    for change in changes {
        match (change.key, change.record) {
            (RecordKey::Override((tenant_id, _)), None) if deleted_tenants.contains(&tenant_id) => {
                // Deleted below with the rest of the tenant's overrides, in one range.
            }
            (key, Some(record)) => {
                for dependency in leans_on(&record, &key, &before.control) {
                    expect(dependency);
                }
                if let Some(primary) = new_standby_of(&record, &key, &before.control) {
                    touches.push(primary);
                }
                operations.push(TxnOp::put(layout.key(&key), layout::encode(&record), None));
                expect(key);
            }
            (key, None) => {
                operations.push(TxnOp::delete(layout.key(&key), None));
                expect(key);
            }
        }
    }
    let mut compares: Vec<Compare> = expected
        .into_iter()
        .map(|(key, revision)| {
            Compare::mod_revision(layout.key(&key), CompareOp::Equal, revision as i64)
        })
        .collect();
    let decided_at = before.control.revision() as i64;
    for tenant_id in &deleted_tenants {
        let prefix = layout.overrides_of(tenant_id);
        compares.push(
            Compare::mod_revision(prefix.clone(), CompareOp::Less, decided_at + 1).with_prefix(),
        );
        operations.push(TxnOp::delete(
            prefix,
            Some(DeleteOptions::new().with_prefix()),
        ));
    }
    // A new standby rewrites its primary's record unchanged: two standbys registered at once
    // for one primary both lean on that record, so the second transaction fails its compare,
    // and decided again it sees the first ("at most one of each" holds).
    for (primary, record) in touches {
        operations.push(TxnOp::put(
            layout.key(&RecordKey::Cell(primary)),
            layout::encode(&record),
            None,
        ));
    }
    operations.push(TxnOp::put(layout.meta(MetaKey::Written), Vec::new(), None));
    Txn::new().when(compares).and_then(operations)
}

/// The primary of a cell record this change creates as a standby, with the primary's record
/// as stored.
fn new_standby_of(
    record: &Record,
    key: &RecordKey,
    before: &ControlState,
) -> Option<(Arc<str>, Record)> {
    let (Record::Cell(cell), RecordKey::Cell(id)) = (record, key) else {
        return None;
    };
    let primary = cell.standby_of.as_ref()?;
    if before.cells().contains_key(id) {
        return None;
    }
    let stored = Record::Cell(before.cells().get(primary)?.clone()).stored();
    Some((primary.clone(), stored))
}
