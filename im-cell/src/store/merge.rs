//! Merging back what only a failed cell held. After a failover whose new owner may lack some of
//! the failed cell's messages (a LOW cell's fallback starts with none; an asynchronous standby
//! may be behind), the failed cell's export of each key is merged into the key's current owner:
//! conversations it does not have are created, missing members join, and every message it does
//! not have — by conversation, sender and client message id, the send's own idempotency key —
//! is appended at the owner's next seq, keeping its message id, sender, body and time. Members'
//! devices get one REBASE per conversation instead of the messages as new ones.
//!
//! Each merge has an id (the failover's), and the owner counts, in the same write, the messages
//! each merge added to each route key: a merge run again adds nothing and counts nothing, so the
//! count is exact however often a crash made the caller start over.

use std::collections::{BTreeMap, HashSet};

use super::export::row_conversation;
use super::keys;
use super::mutate::apply_mutation;
use super::records::{
    ConversationRecord, IdempotencyRecord, InboxRecord, Kind, MessageRecord, Mutation, SyncKind,
    SyncRecord, decode,
};
use super::tx::Tx;
use super::{Space, Store};
use crate::error::CellError;
use cellplane_api::clock::now_ms;

/// Messages merged per write at most.
pub const MERGE_BATCH_MESSAGES: usize = 256;

/// One conversation's part of a merge, applied in one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeBatch {
    pub merge_id: String,
    pub tenant: String,
    /// The route key's conversation (empty: the tenant's key): the count is kept per key.
    pub route_conversation: String,
    pub conversation: String,
    pub kind: Kind,
    pub created_ms: u64,
    pub members: Vec<String>,
    /// In the failed cell's seq order, private ones after the others.
    pub messages: Vec<MessageRecord>,
}

/// The conversation's own row and members, as the failed cell had them.
#[derive(Debug, Clone)]
struct Shape {
    kind: Kind,
    created_ms: u64,
    members: Vec<String>,
}

/// Turns the rows of a failed cell's export of one key into merge batches as they arrive.
/// Exports send each keyspace in turn (conversations, members, …, messages, inboxes), so the
/// conversations' shapes are known before their messages, and messages come grouped by
/// conversation: a batch is handed out when its conversation changes or it is full.
pub struct Collector {
    merge_id: String,
    tenant: String,
    route_conversation: String,
    shapes: BTreeMap<String, Shape>,
    pending: Option<(String, Vec<MessageRecord>)>,
    /// Conversations a batch was handed out for.
    merged: HashSet<String>,
}

impl Collector {
    pub fn new(merge_id: &str, tenant: &str, route_conversation: &str) -> Self {
        Self {
            merge_id: merge_id.to_string(),
            tenant: tenant.to_string(),
            route_conversation: route_conversation.to_string(),
            shapes: BTreeMap::new(),
            pending: None,
            merged: HashSet::new(),
        }
    }

    /// Takes one exported row; answers a batch that is ready.
    pub fn take(
        &mut self,
        space: Space,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<MergeBatch>, CellError> {
        let bad = |what: &str| CellError::invalid("rows", format!("a {space:?} row {what}"));
        let Some(conversation) = row_conversation(space, key, &self.tenant) else {
            return Ok(None);
        };
        let conversation = std::str::from_utf8(conversation)
            .map_err(|_| bad("names no conversation"))?
            .to_string();
        match space {
            Space::Conversations => {
                let record: ConversationRecord =
                    decode(value).map_err(|_| bad("is no conversation"))?;
                self.shapes.insert(
                    conversation,
                    Shape {
                        kind: record.kind,
                        created_ms: record.created_ms,
                        members: Vec::new(),
                    },
                );
                Ok(None)
            }
            Space::Members => {
                let (_, _, user) = keys::member_parts(key).ok_or_else(|| bad("names no member"))?;
                let shape = self
                    .shapes
                    .get_mut(&conversation)
                    .ok_or_else(|| bad("is of a conversation the export did not name"))?;
                shape.members.push(user.to_string());
                Ok(None)
            }
            Space::Messages => {
                let message: MessageRecord = decode(value).map_err(|_| bad("is no message"))?;
                self.push(conversation, message)
            }
            Space::Inbox => {
                let inbox: InboxRecord = decode(value).map_err(|_| bad("is no inbox entry"))?;
                match inbox.private {
                    Some(message) => self.push(conversation, message),
                    None => Ok(None),
                }
            }
            _ => Ok(None),
        }
    }

    fn push(
        &mut self,
        conversation: String,
        message: MessageRecord,
    ) -> Result<Option<MergeBatch>, CellError> {
        let ready = match &self.pending {
            Some((of, messages)) => *of != conversation || messages.len() >= MERGE_BATCH_MESSAGES,
            None => false,
        };
        let batch = if ready { self.flush()? } else { None };
        self.pending
            .get_or_insert_with(|| (conversation, Vec::new()))
            .1
            .push(message);
        Ok(batch)
    }

    fn flush(&mut self) -> Result<Option<MergeBatch>, CellError> {
        let Some((conversation, messages)) = self.pending.take() else {
            return Ok(None);
        };
        self.batch(conversation, messages).map(Some)
    }

    fn batch(
        &mut self,
        conversation: String,
        messages: Vec<MessageRecord>,
    ) -> Result<MergeBatch, CellError> {
        let shape = self.shapes.get(&conversation).ok_or_else(|| {
            CellError::invalid(
                "rows",
                format!("messages of {conversation:?} came without its conversation row"),
            )
        })?;
        self.merged.insert(conversation.clone());
        Ok(MergeBatch {
            merge_id: self.merge_id.clone(),
            tenant: self.tenant.clone(),
            route_conversation: self.route_conversation.clone(),
            kind: shape.kind,
            created_ms: shape.created_ms,
            members: shape.members.clone(),
            conversation,
            messages,
        })
    }

    /// The batches left once every row arrived: the last messages, and conversations that had
    /// none (they are created all the same).
    pub fn finish(mut self) -> Result<Vec<MergeBatch>, CellError> {
        let mut batches: Vec<MergeBatch> = self.flush()?.into_iter().collect();
        let quiet: Vec<String> = self
            .shapes
            .keys()
            .filter(|c| !self.merged.contains(*c))
            .cloned()
            .collect();
        for conversation in quiet {
            batches.push(self.batch(conversation, Vec::new())?);
        }
        Ok(batches)
    }
}

/// Where the owner counts what merge `merge_id` added to a route key. `#` is no id character,
/// so these never meet an import position (`tenant\0conversation\0source\0`).
fn receipt_key(merge_id: &str, tenant: &str, route_conversation: &str) -> Vec<u8> {
    keys::Key::new()
        .id("#merge")
        .id(merge_id)
        .id(tenant)
        .id(route_conversation)
        .into_bytes()
}

/// Messages merge `merge_id` added to the route key so far.
pub fn merged_so_far(
    store: &Store,
    merge_id: &str,
    tenant: &str,
    route_conversation: &str,
) -> Result<u64, CellError> {
    Ok(super::get(
        &store.spaces.imports,
        &receipt_key(merge_id, tenant, route_conversation),
    )?
    .unwrap_or(0))
}

/// Applies one batch on the key's owner (the writer checked the grant): creates the
/// conversation or adds missing members, appends each message not already held, and tells
/// the members' devices to fetch the conversation again when anything was added. Answers
/// what the merge added to the route key in all, this batch included.
pub fn merge(tx: &mut Tx, batch: MergeBatch) -> Result<u64, CellError> {
    let (tenant, conversation) = (batch.tenant.as_str(), batch.conversation.as_str());
    // Rebuilt from another cell's rows: checked like any record from another cell.
    super::foreign::ids("members", &batch.members)?;
    for message in &batch.messages {
        super::foreign::check_message(message)?;
    }
    let mut changed = false;
    let existing: Option<ConversationRecord> = tx.get(
        Space::Conversations,
        &keys::conversation(tenant, conversation),
    )?;
    // The seq of the newest message, as each append moves it.
    let mut last_seq = existing.as_ref().map_or(0, |r| r.last_seq);
    if existing.is_none() {
        apply_mutation(
            tx,
            tenant,
            conversation,
            Mutation::CreateConversation {
                kind: batch.kind,
                member_ids: batch.members.clone(),
                created_ms: batch.created_ms,
            },
            false,
        )?;
        changed = true;
    } else {
        let current = tx.members(tenant, conversation)?;
        let joining: Vec<String> = batch
            .members
            .iter()
            .filter(|m| !current.contains(m))
            .cloned()
            .collect();
        if !joining.is_empty() {
            apply_mutation(
                tx,
                tenant,
                conversation,
                Mutation::AddMembers {
                    member_ids: joining,
                    at_ms: now_ms(),
                },
                false,
            )?;
            changed = true;
        }
    }
    let mut added = 0u64;
    for mut message in batch.messages {
        let idempotency = keys::idempotency(
            tenant,
            conversation,
            &message.sender_id,
            &message.client_msg_id,
        );
        if tx
            .get::<IdempotencyRecord>(Space::Idempotency, &idempotency)?
            .is_some()
        {
            continue;
        }
        last_seq += 1;
        message.seq = last_seq;
        apply_mutation(tx, tenant, conversation, Mutation::Send { message }, false)?;
        added += 1;
    }
    if added > 0 || changed {
        for member in tx.members(tenant, conversation)? {
            tx.event(tenant, &member, |pts| SyncRecord {
                pts,
                kind: SyncKind::Rebase,
                conversation_id: conversation.to_string(),
                seq: last_seq,
                message: None,
                user_ids: Vec::new(),
                joined: false,
            })?;
        }
    }
    let receipt = receipt_key(&batch.merge_id, tenant, &batch.route_conversation);
    let total = tx.get::<u64>(Space::Imports, &receipt)?.unwrap_or(0) + added;
    if added > 0 {
        tx.put(Space::Imports, receipt, &total);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::export::{Excluded, ExportView, space_named};
    use crate::store::memory::Memory;

    fn message(sender: &str, id: &str, receivers: &[&str]) -> MessageRecord {
        MessageRecord {
            message_id: format!("failed/t/g/{id}"),
            seq: 0,
            sender_id: sender.into(),
            client_msg_id: id.into(),
            body: id.as_bytes().to_vec(),
            server_time_ms: 7,
            receiver_ids: receivers.iter().map(|r| r.to_string()).collect(),
            recalled: false,
        }
    }

    /// A store holding group `g` of `members` with `messages` sent in order.
    fn cell(members: &[&str], messages: &[MessageRecord]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 1_000).expect("store");
        let mut tx = Tx::new(store.clone(), 0, Memory::default());
        let create = Mutation::CreateConversation {
            kind: Kind::Group,
            member_ids: members.iter().map(|m| m.to_string()).collect(),
            created_ms: 5,
        };
        apply_mutation(&mut tx, "t", "g", create, true).expect("create");
        for (i, message) in messages.iter().enumerate() {
            let message = MessageRecord {
                seq: i as u64 + 1,
                ..message.clone()
            };
            apply_mutation(&mut tx, "t", "g", Mutation::Send { message }, true).expect("send");
        }
        tx.commit_durably().expect("commit");
        (dir, store)
    }

    /// Merges the export of tenant `t` of `failed` into `owner`; answers the count.
    fn merge_into(failed: &Store, owner: &Store) -> u64 {
        let mut collector = Collector::new("fo-9", "t", "");
        let mut batches = Vec::new();
        ExportView::open(failed)
            .expect("view")
            .rows("t", "", &Excluded::new(), |space, key, value| {
                let space = space_named(space).expect("exported space");
                batches.extend(collector.take(space, &key, &value).expect("row"));
                true
            })
            .expect("export");
        batches.extend(collector.finish().expect("finish"));
        let mut tx = Tx::new(
            owner.clone(),
            owner.last_lsn().expect("lsn"),
            Memory::default(),
        );
        let mut total = merged_so_far(owner, "fo-9", "t", "").expect("receipt");
        for batch in batches {
            total = merge(&mut tx, batch).expect("merge");
        }
        tx.commit_durably().expect("commit");
        total
    }

    #[test]
    fn what_the_owner_lacks_is_appended_once_and_counted_once() {
        let (m1, m2, m3) = (
            message("alice", "m1", &[]),
            message("bob", "m2", &[]),
            message("alice", "m3", &["carol"]),
        );
        let (_a, failed) = cell(&["alice", "bob", "carol"], &[m1.clone(), m2, m3]);
        // The owner had m1 (a standby that was behind) and took n1 since.
        let (_b, owner) = cell(&["alice", "bob"], &[m1, message("bob", "n1", &[])]);
        assert_eq!(merge_into(&failed, &owner), 2, "m2 and m3 were missing");
        let members = owner.members("t", "g").expect("members");
        assert!(members.contains(&"carol".to_string()), "{members:?}");
        let (history, _) = owner.history("t", "g", "carol", 0, 10).expect("history");
        let mut seen: Vec<(u64, String)> = history
            .iter()
            .map(|m| (m.seq, m.client_msg_id.clone()))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [(1, "m1"), (2, "n1"), (3, "m2"), (4, "m3")]
                .map(|(s, id)| (s, id.to_string()))
                .to_vec(),
            "missing messages follow the owner's own, at new seqs"
        );
        let rebase = owner
            .queued_events("t", "carol", 0, 100)
            .expect("events")
            .into_iter()
            .filter(|e| e.kind == SyncKind::Rebase)
            .count();
        assert!(rebase >= 1, "carol's devices fetch the conversation again");
        // Run again (the caller crashed before it recorded the count): nothing added, the
        // same count.
        assert_eq!(merge_into(&failed, &owner), 2);
        let (again, _) = owner.history("t", "g", "carol", 0, 10).expect("history");
        assert_eq!(again.len(), 4);
    }

    #[test]
    fn a_conversation_the_owner_never_had_is_created_with_its_history() {
        let (_a, failed) = cell(
            &["alice", "bob"],
            &[message("alice", "m1", &[]), message("bob", "m2", &[])],
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let owner = Store::open(dir.path(), 1_000).expect("store");
        assert_eq!(merge_into(&failed, &owner), 2);
        let (history, _) = owner.history("t", "g", "bob", 0, 10).expect("history");
        assert_eq!(history.len(), 2);
        assert_eq!(history.iter().map(|m| m.seq).max(), Some(2));
        assert_eq!(
            history[0].message_id, "failed/t/g/m2",
            "message ids are kept"
        );
    }

    #[test]
    fn a_merge_of_a_key_without_rows_counts_what_earlier_runs_added() {
        let (_a, failed) = cell(&["alice"], &[message("alice", "m1", &[])]);
        let dir = tempfile::tempdir().expect("temp dir");
        let owner = Store::open(dir.path(), 1_000).expect("store");
        assert_eq!(merged_so_far(&owner, "fo-9", "t", "").expect("receipt"), 0);
        assert_eq!(merge_into(&failed, &owner), 1);
        // The failed cell purged the key meanwhile: its export has no rows, and the owner
        // answers what the merge added before.
        assert!(
            Collector::new("fo-9", "t", "")
                .finish()
                .expect("finish")
                .is_empty()
        );
        assert_eq!(merged_so_far(&owner, "fo-9", "t", "").expect("receipt"), 1);
        assert_eq!(
            merged_so_far(&owner, "fo-8", "t", "").expect("receipt"),
            0,
            "per merge"
        );
    }
}
