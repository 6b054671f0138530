//! Reading one route key's data out of a consistent snapshot of the store: its rows, or its
//! cell-log records after an LSN. Export feeds migration; the same log records feed replay.

use fjall::{Readable, Snapshot};

use super::records::{LogRecord, decode};
use super::{Space, Store, keys};
use crate::error::CellError;

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

pub fn space_named(name: &str) -> Option<Space> {
    EXPORTED_SPACES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(space, _)| *space)
}

/// Whether a row of `space` belongs to the route key `(tenant, conversation)`.
fn row_of_key(space: Space, key: &[u8], tenant: &str, conversation: &str) -> bool {
    let Some(rest) = key
        .strip_prefix(tenant.as_bytes())
        .and_then(|r| r.strip_prefix(&[0]))
    else {
        return false;
    };
    if conversation.is_empty() {
        return true;
    }
    let conversation = conversation.as_bytes();
    let starts_with_conversation = |bytes: &[u8]| {
        bytes
            .strip_prefix(conversation)
            .is_some_and(|r| r.first() == Some(&0))
    };
    match space {
        // tenant \0 conversation \0 ...
        Space::Conversations | Space::Members | Space::Messages | Space::Idempotency => {
            starts_with_conversation(rest)
        }
        // tenant \0 user \0 conversation \0 ...
        Space::UserConversations | Space::Inbox => match rest.iter().position(|b| *b == 0) {
            Some(end) => starts_with_conversation(&rest[end + 1..]),
            None => false,
        },
        _ => false,
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
        mut emit: impl FnMut(&str, Vec<u8>, Vec<u8>) -> bool,
    ) -> Result<(), CellError> {
        let prefix = keys::Key::new().id(tenant).into_bytes();
        for (space, name) in EXPORTED_SPACES {
            for item in self.snapshot.prefix(self.store.spaces.get(space), &prefix) {
                let (key, value) = item.into_inner()?;
                if row_of_key(space, &key, tenant, conversation)
                    && !emit(name, key.to_vec(), value.to_vec())
                {
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
        from_lsn: u64,
        mut emit: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<(), CellError> {
        let range = keys::lsn(from_lsn.saturating_add(1))..=keys::lsn(self.through_lsn);
        for item in self.snapshot.range(&self.store.spaces.log, range) {
            let value = item.value()?;
            let record: LogRecord = decode(&value)?;
            let matches = record.tenant_id == tenant
                && (conversation.is_empty() || record.conversation_id == conversation);
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
        let inbox = keys::inbox("t", "alice", "c", 5);
        assert!(row_of_key(Space::Inbox, &inbox, "t", "c"));
        assert!(row_of_key(Space::Inbox, &inbox, "t", ""));
        assert!(!row_of_key(Space::Inbox, &inbox, "t", "c2"));
        assert!(!row_of_key(Space::Inbox, &inbox, "t2", ""));
        let message = keys::message("t", "c", 7);
        assert!(row_of_key(Space::Messages, &message, "t", "c"));
        assert!(!row_of_key(
            Space::Messages,
            &keys::message("t", "cc", 7),
            "t",
            "c"
        ));
        assert!(row_of_key(
            Space::UserConversations,
            &keys::user_conversation("t", "bob", "c"),
            "t",
            "c"
        ));
    }
}
