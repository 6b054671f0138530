//! Reading one route key's data out of a consistent snapshot of the store: its rows, or its
//! cell-log records after an LSN. Export feeds migration; the same log records feed replay.

use std::collections::HashSet;

use fjall::{Readable, Snapshot};

use super::records::{LogRecord, Mutation, decode};
use super::{Space, Store, keys};
use crate::error::CellError;

/// Rows or log records per export or replication chunk at most.
pub const EXPORT_CHUNK_ITEMS: usize = 512;

/// Bytes per chunk at most (one row may exceed it alone): well below gRPC's default 4 MiB
/// message limit, whatever the bodies' sizes.
pub const EXPORT_CHUNK_BYTES: usize = 1 << 20;

/// Keyspaces that hold a key's data and move with it. Sync queues, device cursors, grants and
/// import positions are the cell's own and stay.
pub const EXPORTED_SPACES: [(Space, &str); 6] = [
    (Space::Conversations, "conversations"),
    (Space::Members, "members"),
    (Space::UserConversations, "user_conversations"),
    (Space::Messages, "messages"),
    (Space::Inbox, "inbox"),
    (Space::Idempotency, "idempotency"),
];

/// What a standby holds of its primary besides the exported keyspaces: the grants.
const GRANTS: (Space, &str) = (Space::Grants, "grants");

/// Every keyspace a standby holds of its primary.
pub fn replicated_spaces() -> impl Iterator<Item = (Space, &'static str)> {
    EXPORTED_SPACES.into_iter().chain([GRANTS])
}

/// A replicated keyspace by name.
pub fn replicated_space_named(name: &str) -> Option<Space> {
    space_named(name).or_else(|| (name == GRANTS.1).then_some(GRANTS.0))
}

pub fn name_of(space: Space) -> Option<&'static str> {
    EXPORTED_SPACES
        .iter()
        .find(|(s, _)| *s == space)
        .map(|(_, name)| *name)
}

pub fn space_named(name: &str) -> Option<Space> {
    EXPORTED_SPACES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(space, _)| *space)
}

/// The conversations a tenant export leaves out: those with route keys of their own on this
/// cell (granted here, moved away, or frozen alone). They move, or stay, on their own.
pub type Excluded = HashSet<String>;

/// The conversation a row of `space` belongs to, when the row is the tenant's.
pub(crate) fn row_conversation<'k>(space: Space, key: &'k [u8], tenant: &str) -> Option<&'k [u8]> {
    let rest = key.strip_prefix(tenant.as_bytes())?.strip_prefix(&[0])?;
    let rest = match space {
        Space::Conversations | Space::Members | Space::Messages | Space::Idempotency => rest,
        Space::UserConversations | Space::Inbox => {
            let end = rest.iter().position(|b| *b == 0)?;
            &rest[end + 1..]
        }
        _ => return None,
    };
    let end = rest.iter().position(|b| *b == 0)?;
    Some(&rest[..end])
}

/// Whether a row of `space` belongs to the route key `(tenant, conversation)`; a tenant key
/// (empty conversation) leaves out the `excluded` conversations.
pub fn row_of_key(
    space: Space,
    key: &[u8],
    tenant: &str,
    conversation: &str,
    excluded: &Excluded,
) -> bool {
    match row_conversation(space, key, tenant) {
        None => false,
        Some(of) if conversation.is_empty() => {
            std::str::from_utf8(of).is_ok_and(|of| !excluded.contains(of))
        }
        Some(of) => of == conversation.as_bytes(),
    }
}

/// A consistent view to export from.
pub struct ExportView {
    snapshot: Snapshot,
    store: Store,
    /// The newest cell-log LSN the view contains.
    pub through_lsn: u64,
}

impl ExportView {
    pub fn open(store: &Store) -> Result<Self, CellError> {
        let snapshot = store.db.snapshot();
        let through_lsn = match snapshot.last_key_value(&store.spaces.log) {
            Some(item) => keys::trailing_num(&item.key()?).unwrap_or(0),
            None => 0,
        };
        Ok(Self {
            snapshot,
            store: store.clone(),
            through_lsn,
        })
    }

    /// Calls `emit` with every row of the key, space by space, in key order.
    pub fn rows(
        &self,
        tenant: &str,
        conversation: &str,
        excluded: &Excluded,
        mut emit: impl FnMut(&str, Vec<u8>, Vec<u8>) -> bool,
    ) -> Result<(), CellError> {
        let prefix = keys::Key::new().id(tenant).into_bytes();
        for (space, name) in EXPORTED_SPACES {
            for item in self.snapshot.prefix(self.store.spaces.get(space), &prefix) {
                let (key, value) = item.into_inner()?;
                if row_of_key(space, &key, tenant, conversation, excluded)
                    && !emit(name, key.to_vec(), value.to_vec())
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Calls `emit` with every row of every replicated keyspace (a standby's bootstrap), space
    /// by space, in key order.
    pub fn all_rows(
        &self,
        mut emit: impl FnMut(&str, Vec<u8>, Vec<u8>) -> bool,
    ) -> Result<(), CellError> {
        for (space, name) in replicated_spaces() {
            for item in self.snapshot.iter(self.store.spaces.get(space)) {
                let (key, value) = item.into_inner()?;
                if !emit(name, key.to_vec(), value.to_vec()) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Calls `emit` with the key's log records after `from_lsn`, up to `through_lsn`.
    pub fn log(
        &self,
        tenant: &str,
        conversation: &str,
        excluded: &Excluded,
        from_lsn: u64,
        mut emit: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<(), CellError> {
        let range = keys::lsn(from_lsn.saturating_add(1))..=keys::lsn(self.through_lsn);
        for item in self.snapshot.range(&self.store.spaces.log, range) {
            let value = item.value()?;
            let record: LogRecord = decode(&value)?;
            let fence = matches!(record.mutation, Mutation::Fence { .. });
            let matches = !fence
                && record.tenant_id == tenant
                && if conversation.is_empty() {
                    !excluded.contains(&record.conversation_id)
                } else {
                    record.conversation_id == conversation
                };
            if matches && !emit(value.to_vec()) {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_belong_to_their_tenant_and_conversation() {
        let none = Excluded::new();
        let inbox = keys::inbox("t", "alice", "c", 5);
        assert!(row_of_key(Space::Inbox, &inbox, "t", "c", &none));
        assert!(row_of_key(Space::Inbox, &inbox, "t", "", &none));
        assert!(!row_of_key(Space::Inbox, &inbox, "t", "c2", &none));
        assert!(!row_of_key(Space::Inbox, &inbox, "t2", "", &none));
        let message = keys::message("t", "c", 7);
        assert!(row_of_key(Space::Messages, &message, "t", "c", &none));
        assert!(!row_of_key(
            Space::Messages,
            &keys::message("t", "cc", 7),
            "t",
            "c",
            &none
        ));
        assert!(row_of_key(
            Space::UserConversations,
            &keys::user_conversation("t", "bob", "c"),
            "t",
            "c",
            &none
        ));
        let hot = Excluded::from(["c".to_string()]);
        assert!(
            !row_of_key(Space::Messages, &message, "t", "", &hot),
            "a conversation with its own route key is not part of its tenant's export"
        );
        assert!(!row_of_key(Space::Inbox, &inbox, "t", "", &hot));
        assert!(row_of_key(Space::Messages, &message, "t", "c", &hot));
    }
}
