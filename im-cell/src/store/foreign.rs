//! What a cell takes from another cell — a standby from its primary, an import or a merge from
//! a migration's source — is checked before anything of it is staged: the ids a record carries
//! obey the id rules (so the keys built from them stay within the store's bounds), and rows
//! taken as they are fit the store's keys and values. A record that does not is refused whole,
//! as a corrupt or hostile peer's data, never applied in part and never a panic of the writer.

use cellplane_api::ids::{validate_id, validate_optional_id};

use super::records::{LogRecord, MessageRecord, Mutation};
use crate::error::CellError;

/// The store's bound on a key (fjall's: a key's length is a u16).
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// The store's bound on a value (fjall's: a value's length is a u32).
pub const MAX_VALUE_BYTES: usize = u32::MAX as usize;

fn refused(what: String) -> CellError {
    CellError::Storage(format!("a record from another cell is refused: {what}"))
}

fn id(field: &str, value: &str) -> Result<(), CellError> {
    validate_id(field, value).map_err(|e| refused(e.to_string()))
}

/// User ids another cell sent (members, receivers).
pub fn ids(field: &str, values: &[String]) -> Result<(), CellError> {
    for (i, value) in values.iter().enumerate() {
        id(&format!("{field}[{i}]"), value)?;
    }
    Ok(())
}

/// A row taken as it is (a snapshot's, an import's).
pub fn check_row(space: &str, key: &[u8], value: &[u8]) -> Result<(), CellError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(refused(format!(
            "a row of {space} has a key of {} bytes (1 to {MAX_KEY_BYTES})",
            key.len()
        )));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(refused(format!(
            "a row of {space} has a value of {} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// A message another cell sent (in a log record, or rebuilt from its rows by a merge).
pub fn check_message(message: &MessageRecord) -> Result<(), CellError> {
    id("message.sender_id", &message.sender_id)?;
    id("message.client_msg_id", &message.client_msg_id)?;
    ids("message.receiver_ids", &message.receiver_ids)
}

/// A log record another cell sent.
pub fn check_record(record: &LogRecord) -> Result<(), CellError> {
    id("tenant_id", &record.tenant_id)?;
    validate_optional_id("conversation_id", &record.conversation_id)
        .map_err(|e| refused(e.to_string()))?;
    match &record.mutation {
        Mutation::CreateConversation { member_ids, .. }
        | Mutation::AddMembers { member_ids, .. }
        | Mutation::RemoveMembers { member_ids } => ids("member_ids", member_ids),
        Mutation::Send { message } => check_message(message),
        Mutation::MarkRead { user_id, .. }
        | Mutation::Recall { user_id, .. }
        | Mutation::DeleteForMe { user_id, .. } => id("user_id", user_id),
        Mutation::Purge { excluded } => ids("excluded", excluded),
        Mutation::ImportRows { rows } => rows
            .iter()
            .try_for_each(|(space, key, value)| check_row(space, key, value)),
        Mutation::Fence { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mutation: Mutation) -> LogRecord {
        LogRecord {
            lsn: 1,
            tenant_id: "t".into(),
            conversation_id: "c".into(),
            mutation,
        }
    }

    #[test]
    fn rows_outside_the_store_bounds_and_ids_outside_the_rules_are_refused() {
        let rows = |key: Vec<u8>| Mutation::ImportRows {
            rows: vec![("messages".into(), key, vec![1])],
        };
        assert!(check_record(&record(rows(vec![1]))).is_ok());
        assert!(check_record(&record(rows(vec![1; MAX_KEY_BYTES]))).is_ok());
        assert!(
            check_record(&record(rows(Vec::new()))).is_err(),
            "empty key"
        );
        assert!(
            check_record(&record(rows(vec![1; MAX_KEY_BYTES + 1]))).is_err(),
            "one byte past"
        );
        let members = |name: String| Mutation::AddMembers {
            member_ids: vec![name],
            at_ms: 1,
        };
        assert!(check_record(&record(members("a".repeat(128)))).is_ok());
        assert!(check_record(&record(members("a".repeat(70_000)))).is_err());
        let mut long_tenant = record(Mutation::Fence { grant: None });
        long_tenant.tenant_id = "t".repeat(129);
        assert!(check_record(&long_tenant).is_err());
    }

    /// The input `cargo fuzz` (cell_records) found: a log record whose imported row has an
    /// empty key, which made the store assert and the writer panic when replayed.
    #[test]
    fn the_fuzzers_empty_imported_key_is_refused_not_a_panic() {
        const FOUND: &[u8] = &[
            0, 8, 8, 0, 0, 0, 0, 0, 0, 0, 2, 8, 8, 8, 8, 8, 109, 101, 115, 115, 97, 103, 101, 115,
            0, 3, 2, 0, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 252, 0, 0, 255, 255, 255, 226, 36, 36, 40, 36, 35,
        ];
        let record: LogRecord = super::super::records::decode(FOUND).expect("it decodes");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::Store::open(dir.path(), 10).expect("store");
        let mut tx =
            crate::store::tx::Tx::new(store, record.lsn, crate::store::memory::Memory::default());
        let refused = crate::store::mutate::replay(&mut tx, record).expect_err("refused");
        assert!(refused.to_string().contains("another cell"), "{refused}");
    }
}
