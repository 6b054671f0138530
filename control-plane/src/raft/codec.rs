//! The encoding of Raft messages, log entries and snapshot frames: postcard, a compact serde
//! format, behind one version number so a node refuses bytes it cannot read instead of
//! misreading them.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Version of everything encoded here. Bump it when any encoded type changes shape.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding failed: {0}")]
    Encode(#[source] postcard::Error),
    #[error("decoding failed: {0}")]
    Decode(#[source] postcard::Error),
    #[error("payload format {found} is not the supported format {FORMAT}")]
    Format { found: u32 },
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_stdvec(value).map_err(CodecError::Encode)
}

/// Appends the encoding of `value` to `buf`, reusing its allocation.
pub fn encode_into<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> Result<(), CodecError> {
    let taken = std::mem::take(buf);
    *buf = postcard::to_extend(value, taken).map_err(CodecError::Encode)?;
    Ok(())
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(CodecError::Decode)
}

/// Decodes a versioned payload.
pub fn decode_versioned<T: DeserializeOwned>(format: u32, bytes: &[u8]) -> Result<T, CodecError> {
    if format != FORMAT {
        return Err(CodecError::Format { found: format });
    }
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};

    use super::*;
    use crate::raft::TypeConfig;
    use crate::state::command::{Command, CommandBatch};
    use crate::state::model::RouteKey;

    #[test]
    fn log_entries_round_trip() {
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 42);
        let entries: Vec<Entry<TypeConfig>> = vec![
            Entry {
                log_id,
                payload: EntryPayload::Normal(CommandBatch(vec![
                    Command::MoveRoute {
                        key: RouteKey::conversation("acme", "group-1"),
                        expected_epoch: 7,
                        target_cell: Arc::from("hz-b-normal-1"),
                    },
                    Command::Compact { revision: 3 },
                ])),
            },
            Entry {
                log_id,
                payload: EntryPayload::Membership(Membership::new(
                    vec![[1u64, 2, 3].into_iter().collect()],
                    None,
                )),
            },
            Entry {
                log_id,
                payload: EntryPayload::Blank,
            },
        ];
        let bytes = encode(&entries).expect("encode");
        let decoded: Vec<Entry<TypeConfig>> = decode(&bytes).expect("decode");
        assert_eq!(format!("{entries:?}"), format!("{decoded:?}"));
    }

    #[test]
    fn refuses_unknown_formats() {
        let bytes = encode(&1u64).expect("encode");
        assert!(matches!(
            decode_versioned::<u64>(FORMAT + 1, &bytes),
            Err(CodecError::Format { .. })
        ));
    }
}
