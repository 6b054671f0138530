//! Where each record lives in etcd, and how it is encoded.
//!
//! Under the configured prefix `P`:
//!
//! | key                               | value                                  |
//! |-----------------------------------|----------------------------------------|
//! | `P/cells/{cell_id}`               | the cell (JSON)                        |
//! | `P/tenants/{tenant_id}`           | the tenant and its placement (JSON)    |
//! | `P/overrides/{tenant}/{conv}`     | a conversation's own route (JSON)      |
//! | `P/migrations/{id:020}`           | a migration (JSON)                     |
//! | `P/retired/{tenant_id}`           | the last epoch of a deleted tenant     |
//! | `P/protection/{cell_id}`          | a primary's protection (JSON)          |
//! | `P/replication/{cell_id}`         | a cell's replication, as reported      |
//! | `P/leases/{cell_id}`              | a cell's lease renewals (JSON)         |
//! | `P/failovers/{id:020}`            | a failover (JSON)                      |
//! | `P/failover-halt/storm`           | automatic failover stopped (JSON)      |
//! | `P/meta/compacted`                | the revision history was compacted to  |
//! | `P/meta/written`                  | touched by every write                 |
//!
//! Ids never contain `/`, so a key parses back unambiguously. Values are JSON so an operator can
//! read them with `etcdctl get --prefix P`.

use std::sync::Arc;

use crate::state::records::{Record, RecordKey};

/// A key under the prefix that is not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    /// The revision the store's history was compacted to.
    Compacted,
    /// Put by every write, so its `mod_revision` is the revision of the newest write under
    /// the prefix: what a linearizable read must wait for.
    Written,
}

/// What a key under the prefix names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Record(RecordKey),
    Meta(MetaKey),
}

/// A value that does not decode as the record its key names.
#[derive(Debug, thiserror::Error)]
#[error("etcd key {key:?}: {reason}")]
pub struct LayoutError {
    pub key: String,
    pub reason: String,
}

/// The key space of one control plane in etcd.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` starts and ends with `/` (checked by the config).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The etcd key a record is stored under.
    pub fn key(&self, key: &RecordKey) -> String {
        let p = &self.prefix;
        match key {
            RecordKey::Cell(id) => format!("{p}cells/{id}"),
            RecordKey::Tenant(id) => format!("{p}tenants/{id}"),
            RecordKey::Override((tenant, conversation)) => {
                format!("{p}overrides/{tenant}/{conversation}")
            }
            RecordKey::Migration(id) => format!("{p}migrations/{id:020}"),
            RecordKey::Retired(id) => format!("{p}retired/{id}"),
            RecordKey::Protection(id) => format!("{p}protection/{id}"),
            RecordKey::Replication(id) => format!("{p}replication/{id}"),
            RecordKey::Lease(id) => format!("{p}leases/{id}"),
            RecordKey::Failover(id) => format!("{p}failovers/{id:020}"),
            RecordKey::FailoverHalt => format!("{p}failover-halt/storm"),
            RecordKey::Audit((revision, index)) => format!("{p}audit/{revision:020}.{index:05}"),
        }
    }

    /// The etcd key of a bookkeeping entry.
    pub fn meta(&self, key: MetaKey) -> String {
        match key {
            MetaKey::Compacted => format!("{}meta/compacted", self.prefix),
            MetaKey::Written => format!("{}meta/written", self.prefix),
        }
    }

    /// The prefix of one tenant's overrides.
    pub fn overrides_of(&self, tenant_id: &str) -> String {
        format!("{}overrides/{tenant_id}/", self.prefix)
    }

    /// What `key` names; `None` for a key under the prefix this build does not know.
    pub fn parse(&self, key: &[u8]) -> Option<Parsed> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let (kind, rest) = key.split_once('/')?;
        let id = || -> Option<Arc<str>> { (!rest.is_empty()).then(|| Arc::from(rest)) };
        Some(match kind {
            "cells" => Parsed::Record(RecordKey::Cell(id()?)),
            "tenants" => Parsed::Record(RecordKey::Tenant(id()?)),
            "overrides" => {
                let (tenant, conversation) = rest.split_once('/')?;
                if tenant.is_empty() || conversation.is_empty() {
                    return None;
                }
                Parsed::Record(RecordKey::Override((
                    Arc::from(tenant),
                    Arc::from(conversation),
                )))
            }
            "migrations" => Parsed::Record(RecordKey::Migration(rest.parse().ok()?)),
            "retired" => Parsed::Record(RecordKey::Retired(id()?)),
            "protection" => Parsed::Record(RecordKey::Protection(id()?)),
            "replication" => Parsed::Record(RecordKey::Replication(id()?)),
            "leases" => Parsed::Record(RecordKey::Lease(id()?)),
            "failovers" => Parsed::Record(RecordKey::Failover(rest.parse().ok()?)),
            "failover-halt" if rest == "storm" => Parsed::Record(RecordKey::FailoverHalt),
            "audit" => Parsed::Record(RecordKey::Audit(crate::audit::entry::parse_id(rest)?)),
            "meta" => match rest {
                "compacted" => Parsed::Meta(MetaKey::Compacted),
                "written" => Parsed::Meta(MetaKey::Written),
                _ => return None,
            },
            _ => return None,
        })
    }
}

/// The value stored for a record (its stored form, derived fields zeroed).
pub fn encode(record: &Record) -> Vec<u8> {
    let encoded = match record {
        Record::Cell(cell) => serde_json::to_vec(cell),
        Record::Tenant(tenant) => serde_json::to_vec(tenant),
        Record::Override(record) => serde_json::to_vec(record),
        Record::Migration(migration) => serde_json::to_vec(migration),
        Record::Retired(epoch) => serde_json::to_vec(epoch),
        Record::Protection(protection) => serde_json::to_vec(protection),
        Record::Replication(replication) => serde_json::to_vec(replication),
        Record::Lease(lease) => serde_json::to_vec(lease),
        Record::Failover(failover) => serde_json::to_vec(failover),
        Record::FailoverHalt(halt) => serde_json::to_vec(halt),
        Record::Audit(entry) => serde_json::to_vec(entry),
    };
    encoded.expect("records always serialize to JSON")
}

/// Reads back the record stored under `key`.
pub fn decode(key: &RecordKey, value: &[u8]) -> Result<Record, LayoutError> {
    let decoded = match key {
        RecordKey::Cell(_) => serde_json::from_slice(value).map(Record::Cell),
        RecordKey::Tenant(_) => serde_json::from_slice(value).map(Record::Tenant),
        RecordKey::Override(_) => serde_json::from_slice(value).map(Record::Override),
        RecordKey::Migration(_) => serde_json::from_slice(value).map(Record::Migration),
        RecordKey::Retired(_) => serde_json::from_slice(value).map(Record::Retired),
        RecordKey::Protection(_) => serde_json::from_slice(value).map(Record::Protection),
        RecordKey::Replication(_) => serde_json::from_slice(value).map(Record::Replication),
        RecordKey::Lease(_) => serde_json::from_slice(value).map(Record::Lease),
        RecordKey::Failover(_) => serde_json::from_slice(value).map(Record::Failover),
        RecordKey::FailoverHalt => serde_json::from_slice(value).map(Record::FailoverHalt),
        RecordKey::Audit(_) => serde_json::from_slice(value).map(Record::Audit),
    };
    decoded.map_err(|e| LayoutError {
        key: format!("{key:?}"),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back() {
        let layout = Layout::new("/cp/");
        for key in [
            RecordKey::Cell(Arc::from("hz-a-1")),
            RecordKey::Tenant(Arc::from("acme")),
            RecordKey::Override((Arc::from("acme"), Arc::from("g1"))),
            RecordKey::Migration(42),
            RecordKey::Retired(Arc::from("gone")),
            RecordKey::Protection(Arc::from("hz-a-1")),
            RecordKey::Replication(Arc::from("hz-a-1")),
            RecordKey::Lease(Arc::from("hz-a-1")),
            RecordKey::Failover(7),
            RecordKey::FailoverHalt,
            RecordKey::Audit((12, 3)),
        ] {
            let text = layout.key(&key);
            assert_eq!(layout.parse(text.as_bytes()), Some(Parsed::Record(key)));
        }
        assert_eq!(
            layout.parse(layout.meta(MetaKey::Written).as_bytes()),
            Some(Parsed::Meta(MetaKey::Written))
        );
        assert_eq!(layout.parse(b"/cp/tenants/"), None);
        assert_eq!(layout.parse(b"/cp/overrides/acme"), None);
        assert_eq!(layout.parse(b"/other/tenants/acme"), None);
        assert_eq!(layout.parse(b"/cp/unknown/x"), None);
    }

    #[test]
    fn migration_keys_sort_by_id() {
        let layout = Layout::new("/cp/");
        assert!(layout.key(&RecordKey::Migration(9)) < layout.key(&RecordKey::Migration(10)));
    }
}
