//! The cell's storage: one fjall database (an LSM tree per keyspace, one shared journal) holding
//! conversations, members, messages, per-user inboxes, sync queues, grants and the cell log.
//!
//! All writes go through the [`writer`]: one thread that checks and applies requests in order
//! and commits them in batches, one fsync per batch. Reads go straight to the database; they see
//! only committed (and, before any answer is sent, durable) data.

pub mod export;
pub mod fencing;
pub mod foreign;
pub mod keys;
pub mod log_trim;
pub mod memory;
pub mod merge;
pub mod mutate;
pub mod records;
pub mod retention;
pub mod tx;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use fjall::compaction::filter::Factory;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::error::CellError;
use fencing::{Grant, Grants};
use records::{
    ConversationRecord, GrantRecord, InboxRecord, MemberRecord, MessageRecord, PromotionRecord,
    ReplicaRecord, SyncRecord, decode,
};

/// The keyspaces, one per kind of row.
#[derive(Clone)]
pub struct Spaces {
    pub conversations: Keyspace,
    pub members: Keyspace,
    pub user_conversations: Keyspace,
    pub messages: Keyspace,
    pub inbox: Keyspace,
    pub idempotency: Keyspace,
    pub sync: Keyspace,
    pub devices: Keyspace,
    pub grants: Keyspace,
    pub imports: Keyspace,
    pub log: Keyspace,
    /// A standby's position in its primary's cell log.
    pub replica: Keyspace,
    /// Offline notifications the notification sink did not take, kept for ops.
    pub undelivered: Keyspace,
}

/// Names a keyspace in the writer's overlay of uncommitted rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    Conversations,
    Members,
    UserConversations,
    Messages,
    Inbox,
    Idempotency,
    Sync,
    Grants,
    Imports,
    Log,
    Replica,
}

impl Spaces {
    pub fn get(&self, space: Space) -> &Keyspace {
        match space {
            Space::Conversations => &self.conversations,
            Space::Members => &self.members,
            Space::UserConversations => &self.user_conversations,
            Space::Messages => &self.messages,
            Space::Inbox => &self.inbox,
            Space::Idempotency => &self.idempotency,
            Space::Sync => &self.sync,
            Space::Grants => &self.grants,
            Space::Imports => &self.imports,
            Space::Log => &self.log,
            Space::Replica => &self.replica,
        }
    }
}

/// The database and its keyspaces. Cheap to clone; the database closes when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Store {
    pub db: Database,
    pub spaces: Spaces,
    _retention: Arc<Closing>,
}

/// Lets the retention filters' keyspace go with the last handle of the store.
struct Closing(Arc<retention::Queues>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

fn open_space(db: &Database, name: &str) -> Result<Keyspace, fjall::Error> {
    db.keyspace(name, KeyspaceCreateOptions::default)
}

impl Store {
    /// Opens (or creates) the store in `dir`, keeping at least `kept_events` sync events behind
    /// each user's newest ([`retention`]).
    pub fn open(dir: &Path, kept_events: u64) -> Result<Self, CellError> {
        let queues = Arc::new(retention::Queues::default());
        let retention: Arc<dyn Factory> =
            Arc::new(retention::SyncRetention::new(kept_events, queues.clone()));
        // fsyncs are ours to issue (one per batch), not the journal's.
        let db = Database::builder(dir)
            .manual_journal_persist(true)
            .with_compaction_filter_factories(Arc::new(move |name| {
                (name == "sync").then(|| retention.clone())
            }))
            .open()?;
        let spaces = Spaces {
            conversations: open_space(&db, "conversations")?,
            members: open_space(&db, "members")?,
            user_conversations: open_space(&db, "user_conversations")?,
            messages: open_space(&db, "messages")?,
            inbox: open_space(&db, "inbox")?,
            idempotency: open_space(&db, "idempotency")?,
            sync: open_space(&db, "sync")?,
            devices: open_space(&db, "devices")?,
            grants: open_space(&db, "grants")?,
            imports: open_space(&db, "imports")?,
            log: open_space(&db, "log")?,
            replica: open_space(&db, "replica")?,
            undelivered: open_space(&db, "undelivered")?,
        };
        queues.set(spaces.sync.clone());
        Ok(Self {
            db,
            spaces,
            _retention: Arc::new(Closing(queues)),
        })
    }

    pub fn conversation(
        &self,
        tenant: &str,
        conversation: &str,
    ) -> Result<Option<ConversationRecord>, CellError> {
        get(
            &self.spaces.conversations,
            &keys::conversation(tenant, conversation),
        )
    }

    pub fn member(
        &self,
        tenant: &str,
        conversation: &str,
        user: &str,
    ) -> Result<Option<MemberRecord>, CellError> {
        get(
            &self.spaces.members,
            &keys::member(tenant, conversation, user),
        )
    }

    /// Every member of a conversation, in id order.
    pub fn members(&self, tenant: &str, conversation: &str) -> Result<Vec<String>, CellError> {
        let mut members = Vec::new();
        for item in self
            .spaces
            .members
            .prefix(keys::members_prefix(tenant, conversation))
        {
            let key = item.key()?;
            if let Some(user) = keys::last_id(&key) {
                members.push(user.to_string());
            }
        }
        Ok(members)
    }

    /// The conversations a user belongs to.
    pub fn user_conversations(&self, tenant: &str, user: &str) -> Result<Vec<String>, CellError> {
        let mut conversations = Vec::new();
        for item in self
            .spaces
            .user_conversations
            .prefix(keys::user_conversations_prefix(tenant, user))
        {
            let key = item.key()?;
            if let Some(conversation) = keys::last_id(&key) {
                conversations.push(conversation.to_string());
            }
        }
        Ok(conversations)
    }

    /// The messages `user` can see with seq below `before_seq` (0 = all), newest first, at most
    /// `limit` and whether more exist: the conversation's messages merged with the user's private
    /// ones, without what the user deleted.
    pub fn history(
        &self,
        tenant: &str,
        conversation: &str,
        user: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<(Vec<MessageRecord>, bool), CellError> {
        let upper = if before_seq == 0 {
            u64::MAX
        } else {
            before_seq
        };
        let shared = self
            .spaces
            .messages
            .range(
                keys::message(tenant, conversation, 0)..keys::message(tenant, conversation, upper),
            )
            .rev();
        let own = self
            .spaces
            .inbox
            .range(
                keys::inbox(tenant, user, conversation, 0)
                    ..keys::inbox(tenant, user, conversation, upper),
            )
            .rev();
        let mut shared = shared.map(|item| -> Result<(u64, MessageRecord), CellError> {
            let (key, value) = item.into_inner()?;
            let seq = keys::trailing_num(&key).unwrap_or_default();
            Ok((seq, decode(&value)?))
        });
        let mut own = own.map(|item| -> Result<(u64, InboxRecord), CellError> {
            let (key, value) = item.into_inner()?;
            let seq = keys::trailing_num(&key).unwrap_or_default();
            Ok((seq, decode(&value)?))
        });
        let mut next_shared = shared.next().transpose()?;
        let mut next_own = own.next().transpose()?;
        let mut page = Vec::new();
        loop {
            let take_shared = match (&next_shared, &next_own) {
                (None, None) => break,
                (Some((s, _)), Some((o, _))) => s > o,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let visible = if take_shared {
                let Some((_, message)) = next_shared.take() else {
                    break;
                };
                next_shared = shared.next().transpose()?;
                Some(message)
            } else {
                let Some((seq, inbox)) = next_own.take() else {
                    break;
                };
                next_own = own.next().transpose()?;
                // The shared message at the same seq is this user's to hide or keep.
                let shared_here = match next_shared.take() {
                    Some((s, message)) if s == seq => {
                        next_shared = shared.next().transpose()?;
                        Some(message)
                    }
                    other => {
                        next_shared = other;
                        None
                    }
                };
                if inbox.deleted {
                    None
                } else {
                    inbox.private.or(shared_here)
                }
            };
            if let Some(message) = visible {
                if page.len() == limit {
                    return Ok((page, true));
                }
                page.push(message);
            }
        }
        Ok((page, false))
    }

    /// Sync events of a user after `after_pts`, oldest first, at most `limit`, as queued: a
    /// new message's event names the message without carrying it.
    pub fn queued_events(
        &self,
        tenant: &str,
        user: &str,
        after_pts: u64,
        limit: usize,
    ) -> Result<Vec<SyncRecord>, CellError> {
        let range = keys::sync_event(tenant, user, after_pts.saturating_add(1))
            ..keys::sync_event(tenant, user, u64::MAX);
        self.spaces
            .sync
            .range(range)
            .take(limit)
            .map(|item| Ok(decode(&item.value()?)?))
            .collect()
    }

    /// [`Store::queued_events`] with each new message attached, read from where it is kept
    /// (the conversation, or the user's inbox for a private one) as it is now, recalled or
    /// not. A message no longer on this cell (its conversation moved away) comes without one.
    pub fn sync_events(
        &self,
        tenant: &str,
        user: &str,
        after_pts: u64,
        limit: usize,
    ) -> Result<Vec<SyncRecord>, CellError> {
        let mut events = self.queued_events(tenant, user, after_pts, limit)?;
        for event in &mut events {
            if event.kind == records::SyncKind::NewMessage && event.message.is_none() {
                event.message = self
                    .message_for(tenant, user, &event.conversation_id, event.seq)?
                    .map(std::sync::Arc::new);
            }
        }
        Ok(events)
    }

    /// Message `seq` of a conversation as `user` sees it: the shared copy, or the private one
    /// in the user's inbox.
    fn message_for(
        &self,
        tenant: &str,
        user: &str,
        conversation: &str,
        seq: u64,
    ) -> Result<Option<MessageRecord>, CellError> {
        if let Some(message) = get::<MessageRecord>(
            &self.spaces.messages,
            &keys::message(tenant, conversation, seq),
        )? {
            return Ok(Some(message));
        }
        Ok(get::<InboxRecord>(
            &self.spaces.inbox,
            &keys::inbox(tenant, user, conversation, seq),
        )?
        .and_then(|inbox| inbox.private))
    }

    /// The newest pts of a user's queue: the key of its newest event (retention never drops
    /// that one), 0 when it has none.
    pub fn last_pts(&self, tenant: &str, user: &str) -> Result<u64, CellError> {
        Ok(newest_pts(&self.spaces.sync, &keys::user(tenant, user))?)
    }

    pub fn device_cursor(&self, tenant: &str, user: &str, device: &str) -> Result<u64, CellError> {
        let Some(value) = self
            .spaces
            .devices
            .get(keys::device(tenant, user, device))?
        else {
            return Ok(0);
        };
        Ok(decode(&value)?)
    }

    /// Moves a device's cursor forward (never back). Cursors are the device's own state, not
    /// part of any conversation, so they are neither logged nor exported.
    pub fn set_device_cursor(
        &self,
        tenant: &str,
        user: &str,
        device: &str,
        pts: u64,
    ) -> Result<u64, CellError> {
        let current = self.device_cursor(tenant, user, device)?;
        let cursor = current.max(pts);
        if cursor != current {
            self.spaces
                .devices
                .insert(keys::device(tenant, user, device), records::encode(&cursor))?;
        }
        Ok(cursor)
    }

    /// Every grant the cell holds.
    pub fn grants(&self) -> Result<Grants, CellError> {
        let mut grants = Grants::new();
        for item in self.spaces.grants.iter() {
            let (key, value) = item.into_inner()?;
            let mut parts = key.split(|b| *b == 0);
            let tenant = parts
                .next()
                .and_then(|p| std::str::from_utf8(p).ok())
                .unwrap_or_default();
            let conversation = parts
                .next()
                .and_then(|p| std::str::from_utf8(p).ok())
                .unwrap_or_default();
            let record: GrantRecord = decode(&value)?;
            grants.insert(
                (tenant.to_string(), conversation.to_string()),
                Grant::from(record),
            );
        }
        Ok(grants)
    }

    /// Where this cell stands as a standby in its primary's log (nothing applied yet when it
    /// never was one).
    pub fn replica(&self) -> Result<ReplicaRecord, CellError> {
        Ok(get(&self.spaces.replica, keys::REPLICA_POSITION)?.unwrap_or_default())
    }

    /// Makes this cell a standby of `primary`, durably, before it starts following. A position
    /// in another log than `primary`'s (the cell followed another primary, or was promoted)
    /// means nothing here: it starts over, so the first stream is a bootstrap that replaces
    /// everything it held. A position recorded before the primary was (data directories of
    /// earlier versions, where a standby only ever had one primary) is kept. Answers whether
    /// it started over.
    pub fn follow(&self, primary: &str) -> Result<bool, CellError> {
        let followed: Option<String> = get(&self.spaces.replica, keys::REPLICA_PRIMARY)?;
        // Promoted, it wrote its own log past what it had of any primary's, this one's too.
        let promoted = self.promotion()?.is_some();
        let same = !promoted
            && followed
                .as_deref()
                .is_none_or(|followed| followed == primary);
        if same && followed.is_some() {
            return Ok(false);
        }
        let mut batch = self.db.batch();
        batch.insert(
            &self.spaces.replica,
            keys::REPLICA_PRIMARY,
            records::encode(&primary.to_string()),
        );
        if !same {
            batch.insert(
                &self.spaces.replica,
                keys::REPLICA_POSITION,
                records::encode(&ReplicaRecord::default()),
            );
            batch.remove(&self.spaces.replica, keys::REPLICA_PROMOTED);
        }
        batch
            .commit()
            .and_then(|()| self.db.persist(fjall::PersistMode::SyncAll))
            .map_err(|e| CellError::Storage(e.to_string()))?;
        Ok(!same)
    }

    /// The primary this cell follows as a standby, if it was told one.
    pub fn followed(&self) -> Result<Option<String>, CellError> {
        get(&self.spaces.replica, keys::REPLICA_PRIMARY)
    }

    /// The promotion of this cell from standby to primary, if it was one.
    pub fn promotion(&self) -> Result<Option<PromotionRecord>, CellError> {
        get(&self.spaces.replica, keys::REPLICA_PROMOTED)
    }

    /// The encoded cell-log records after `after`, up to `through`, at most `max` of them (and
    /// about `max_bytes`), with their LSNs.
    pub fn log_after(
        &self,
        after: u64,
        through: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, CellError> {
        let mut records = Vec::new();
        let mut bytes = 0;
        let range = keys::lsn(after.saturating_add(1))..=keys::lsn(through);
        for item in self.spaces.log.range(range) {
            let (key, value) = item.into_inner()?;
            bytes += value.len();
            records.push((keys::trailing_num(&key).unwrap_or(0), value.to_vec()));
            if records.len() >= max || bytes >= max_bytes {
                break;
            }
        }
        Ok(records)
    }

    /// The LSN of the oldest cell-log entry the cell still keeps (0 when the log is empty).
    pub fn first_lsn(&self) -> Result<u64, CellError> {
        match self.spaces.log.first_key_value() {
            Some(item) => Ok(keys::trailing_num(&item.key()?).unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// The LSN of the newest cell-log entry.
    pub fn last_lsn(&self) -> Result<u64, CellError> {
        match self.spaces.log.last_key_value() {
            Some(item) => Ok(keys::trailing_num(&item.key()?).unwrap_or(0)),
            None => Ok(0),
        }
    }
}

fn get<T: serde::de::DeserializeOwned>(
    space: &Keyspace,
    key: &[u8],
) -> Result<Option<T>, CellError> {
    match space.get(key)? {
        Some(value) => Ok(Some(decode(&value)?)),
        None => Ok(None),
    }
}

/// The pts of the newest event in the queue whose key prefix is `user` (`tenant\0user\0`),
/// read from the sync keyspace `queues`; 0 for an empty queue.
pub fn newest_pts(queues: &Keyspace, user: &[u8]) -> Result<u64, fjall::Error> {
    match queues.prefix(user).next_back() {
        Some(item) => Ok(keys::trailing_num(&item.key()?).unwrap_or(0)),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_closed_in_a_process_opens_again_in_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 10).expect("open");
        let copy = store.clone();
        drop(store);
        assert!(
            matches!(Store::open(dir.path(), 10), Err(CellError::Storage(_))),
            "a clone still holds the database"
        );
        drop(copy);
        Store::open(dir.path(), 10).expect("reopened once every handle is gone");
    }

    #[test]
    fn a_promoted_cell_starts_over_when_it_follows_again_even_the_same_primary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 10).expect("open");
        store.follow("p").expect("a new standby follows p");
        assert!(
            !store.follow("p").expect("follow"),
            "its own primary again: it goes on"
        );
        // Promoted from p, it wrote a log of its own; failed over back to p, it rejoins p.
        store
            .spaces
            .replica
            .insert(
                keys::REPLICA_PROMOTED,
                records::encode(&PromotionRecord {
                    from: "p".into(),
                    applied_lsn: 7,
                }),
            )
            .expect("promote");
        assert!(store.follow("p").expect("follow"), "it starts over");
        assert_eq!(store.promotion().expect("promotion"), None);
        assert_eq!(store.replica().expect("replica"), ReplicaRecord::default());
        assert!(!store.follow("p").expect("follow"), "once");
    }
}
