//! One batch's staged writes: a fjall write batch plus an overlay, so the batch's later requests
//! read its earlier writes before anything is committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::export::{EXPORTED_SPACES, Excluded, row_of_key};
use super::memory::Memory;
use super::records::{
    LogRecord, MemberRecord, MessageRecord, Mutation, SyncRecord, decode, encode,
};
use super::{Space, Store, keys};
use crate::error::CellError;
use crate::sync::hub::Delivery;

/// Where a purge in slices goes on: an index into the exported keyspaces and the last key it
/// dropped there.
pub type PurgeCursor = (usize, Vec<u8>);

pub struct Tx {
    store: Store,
    pub batch: fjall::OwnedWriteBatch,
    /// Rows staged by this batch, by space (`None`: deleted).
    overlay: HashMap<Space, HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Membership changes of this batch by conversation: user → member after the change.
    membership: HashMap<(String, String), BTreeMap<String, bool>>,
    /// The LSN of the newest cell-log entry, staged ones included.
    pub lsn: u64,
    /// What the writer remembers between batches (see [`Memory`]).
    pub memory: Memory,
    /// Events for the online devices, published once the batch is durable.
    pub deliveries: Vec<Delivery>,
    pub writes: usize,
    /// Bytes of cell-log entries this batch appends.
    pub log_bytes: u64,
}

impl Tx {
    /// The store as of the last commit, without this batch's writes.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn new(store: Store, lsn: u64, memory: Memory) -> Self {
        let batch = store.db.batch();
        Self {
            store,
            batch,
            overlay: HashMap::new(),
            membership: HashMap::new(),
            lsn,
            memory,
            deliveries: Vec::new(),
            writes: 0,
            log_bytes: 0,
        }
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        space: Space,
        key: &[u8],
    ) -> Result<Option<T>, CellError> {
        if let Some(staged) = self.overlay.get(&space).and_then(|rows| rows.get(key)) {
            return match staged {
                Some(bytes) => Ok(Some(decode(bytes)?)),
                None => Ok(None),
            };
        }
        let remembered = Memory::remembers(space);
        if remembered && let Some(decoded) = self.memory.with_row(space, key, decode) {
            return Ok(Some(decoded?));
        }
        match self.store.spaces.get(space).get(key)? {
            Some(bytes) => {
                if remembered {
                    self.memory.keep_row(space, key, &bytes);
                }
                Ok(Some(decode(&bytes)?))
            }
            None => Ok(None),
        }
    }

    pub fn put<T: Serialize>(&mut self, space: Space, key: Vec<u8>, value: &T) {
        self.put_raw(space, key, encode(value));
    }

    /// Stages an already encoded row (an imported one).
    pub fn put_raw(&mut self, space: Space, key: Vec<u8>, bytes: Vec<u8>) {
        self.note_membership(space, &key, true);
        self.writes += 1;
        if space == Space::Sync {
            // Queue rows are appended, never read back within a batch: no overlay copy.
            self.batch.insert(self.store.spaces.get(space), key, bytes);
            return;
        }
        self.batch
            .insert(self.store.spaces.get(space), key.clone(), bytes.clone());
        self.overlay
            .entry(space)
            .or_default()
            .insert(key, Some(bytes));
    }

    pub fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.note_membership(space, &key, false);
        self.batch.remove(self.store.spaces.get(space), key.clone());
        self.overlay.entry(space).or_default().insert(key, None);
        self.writes += 1;
    }

    /// Records a member row written (`member`) or deleted, so [`Tx::members`] sees the change
    /// before the batch commits.
    fn note_membership(&mut self, space: Space, key: &[u8], member: bool) {
        if space == Space::Members
            && let Some((tenant, conversation, user)) = keys::member_parts(key)
        {
            self.membership
                .entry((tenant.to_string(), conversation.to_string()))
                .or_default()
                .insert(user.to_string(), member);
        }
    }

    /// Deletes the rows of the route key `(tenant, conversation)` that move with it (a tenant
    /// keeps its `excluded` conversations), rows staged in this batch included, and the key's
    /// import positions: all of them, or at most `limit` stored rows after `from`. Answers
    /// where to go on when stored rows remain.
    pub fn purge(
        &mut self,
        tenant: &str,
        conversation: &str,
        excluded: &Excluded,
        limit: Option<usize>,
        from: Option<&PurgeCursor>,
    ) -> Result<Option<PurgeCursor>, CellError> {
        let prefix = keys::Key::new().id(tenant).into_bytes();
        let limit = limit.unwrap_or(usize::MAX);
        let (first_space, after) = match from {
            Some((space, key)) => (*space, Some(key.clone())),
            None => (0, None),
        };
        let mut doomed: Vec<(usize, Space, Vec<u8>)> = Vec::new();
        let mut next = None;
        'spaces: for (i, (space, _)) in EXPORTED_SPACES.iter().enumerate().skip(first_space) {
            let keyspace = self.store.spaces.get(*space);
            // Resume after the last dropped key rather than walking its tombstones again.
            let rows = match (&after, i == first_space) {
                (Some(key), true) => keyspace.range::<Vec<u8>, _>((
                    std::ops::Bound::Excluded(key.clone()),
                    std::ops::Bound::Unbounded,
                )),
                _ => keyspace.prefix(&prefix),
            };
            for item in rows {
                let key = item.key()?;
                if !key.starts_with(&prefix) {
                    break;
                }
                if row_of_key(*space, &key, tenant, conversation, excluded) {
                    if doomed.len() == limit {
                        next = doomed.last().map(|(i, _, key)| (*i, key.clone()));
                        break 'spaces;
                    }
                    doomed.push((i, *space, key.to_vec()));
                }
            }
        }
        let mut doomed: Vec<(Space, Vec<u8>)> = doomed
            .into_iter()
            .map(|(_, space, key)| (space, key))
            .collect();
        for (space, key, value) in self.staged() {
            let exported = EXPORTED_SPACES.iter().any(|(s, _)| *s == space);
            if exported && value.is_some() && row_of_key(space, key, tenant, conversation, excluded)
            {
                doomed.push((space, key.to_vec()));
            }
        }
        let positions = keys::Key::new().id(tenant).id(conversation).into_bytes();
        for item in self.store.spaces.get(Space::Imports).prefix(&positions) {
            doomed.push((Space::Imports, item.key()?.to_vec()));
        }
        for (space, key) in doomed {
            self.delete(space, key);
        }
        Ok(next)
    }

    /// Rows staged by this batch so far (`None`: deleted).
    pub fn staged(&self) -> impl Iterator<Item = (Space, &[u8], Option<&[u8]>)> {
        self.overlay.iter().flat_map(|(space, rows)| {
            rows.iter()
                .map(|(key, value)| (*space, key.as_slice(), value.as_deref()))
        })
    }

    /// Members after this batch's changes so far, in id order.
    pub fn members(&self, tenant: &str, conversation: &str) -> Result<Vec<String>, CellError> {
        let prefix = keys::members_prefix(tenant, conversation);
        let committed = match self.memory.member_list(&prefix) {
            Some(list) => list,
            None => {
                let list = Arc::new(self.store.members(tenant, conversation)?);
                self.memory.keep_member_list(prefix, list.clone());
                list
            }
        };
        let Some(changes) = self
            .membership
            .get(&(tenant.to_string(), conversation.to_string()))
        else {
            return Ok(committed.as_ref().clone());
        };
        let mut members: BTreeMap<&str, bool> =
            committed.iter().map(|m| (m.as_str(), true)).collect();
        for (user, member) in changes {
            members.insert(user, *member);
        }
        Ok(members
            .into_iter()
            .filter(|(_, m)| *m)
            .map(|(u, _)| u.to_string())
            .collect())
    }

    pub fn set_member(
        &mut self,
        tenant: &str,
        conversation: &str,
        user: &str,
        record: Option<&MemberRecord>,
    ) {
        match record {
            Some(record) => {
                self.put(
                    Space::Members,
                    keys::member(tenant, conversation, user),
                    record,
                );
                self.put(
                    Space::UserConversations,
                    keys::user_conversation(tenant, user, conversation),
                    &(),
                );
            }
            None => {
                self.delete(Space::Members, keys::member(tenant, conversation, user));
                self.delete(
                    Space::UserConversations,
                    keys::user_conversation(tenant, user, conversation),
                );
            }
        }
    }

    /// Appends a mutation to the cell log at the next LSN.
    pub fn log(&mut self, tenant: &str, conversation: &str, mutation: Mutation) {
        self.lsn += 1;
        let record = LogRecord {
            lsn: self.lsn,
            tenant_id: tenant.to_string(),
            conversation_id: conversation.to_string(),
            mutation,
        };
        let encoded = encode(&record);
        self.log_bytes += encoded.len() as u64;
        self.put_raw(Space::Log, keys::lsn(self.lsn), encoded);
    }

    /// Appends an event to a user's sync queue at the user's next pts, in this same batch.
    pub fn event(
        &mut self,
        tenant: &str,
        user: &str,
        event: impl FnOnce(u64) -> SyncRecord,
    ) -> Result<(), CellError> {
        self.event_about(tenant, user, event, None)
    }

    /// Commits the staged rows and makes them durable (one fsync). The staged rows stay
    /// readable through [`Tx::staged`] for the writer to remember.
    pub fn commit_durably(&mut self) -> Result<(), CellError> {
        let batch = std::mem::replace(&mut self.batch, self.store.db.batch());
        batch
            .commit()
            .and_then(|()| self.store.db.persist(fjall::PersistMode::SyncAll))
            .map_err(|e| CellError::Storage(e.to_string()))
    }

    /// Appends one event to a user's queue. A new message's event is stored without the
    /// message, which is stored once with its conversation (or in the user's inbox, private):
    /// the queue names it by seq and readers fetch it ([`Store::sync_events`]); online devices
    /// get it pushed with the message attached.
    pub fn event_about(
        &mut self,
        tenant: &str,
        user: &str,
        event: impl FnOnce(u64) -> SyncRecord,
        message: Option<&Arc<MessageRecord>>,
    ) -> Result<(), CellError> {
        // A user's newest pts is the key of the newest event in the queue: it is stored in the
        // same write as the event itself, and the writer remembers it between batches.
        let key = keys::user(tenant, user);
        let last_pts = match self.memory.heads.get(&key) {
            Some(pts) => pts,
            None => self.store.last_pts(tenant, user)?,
        };
        let pts = last_pts + 1;
        let mut record = event(pts);
        assert_eq!(record.pts, pts, "an event carries the pts it was given");
        self.memory.heads.set(key, pts);
        self.put(Space::Sync, keys::sync_event(tenant, user, pts), &record);
        record.message = message.cloned();
        self.deliveries.push(Delivery {
            tenant: tenant.to_string(),
            user: user.to_string(),
            event: record,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(mut tx: Tx) {
        tx.commit_durably().expect("commit");
    }

    fn blank(pts: u64) -> SyncRecord {
        SyncRecord {
            pts,
            kind: super::super::records::SyncKind::Read,
            conversation_id: "c".into(),
            seq: 0,
            message: None,
            user_ids: Vec::new(),
            joined: false,
        }
    }

    /// pts carry on across batches from the writer's memory, and without it (a restart, a
    /// refused batch) from the newest event in the user's own queue.
    #[test]
    fn pts_continue_across_batches_and_from_the_stored_queue() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 1_000).expect("store");
        let mut tx = Tx::new(store.clone(), 0, Memory::default());
        tx.event("t", "alice", blank).expect("event");
        tx.event("t", "alice", blank).expect("event");
        for _ in 0..5 {
            tx.event("t", "alice2", blank).expect("event");
        }
        let memory = std::mem::take(&mut tx.memory);
        commit(tx);
        assert_eq!(store.last_pts("t", "alice").expect("read"), 2);
        assert_eq!(store.last_pts("t", "alice2").expect("read"), 5);
        assert_eq!(store.last_pts("t", "nobody").expect("read"), 0);

        let mut tx = Tx::new(store.clone(), 0, memory);
        tx.event("t", "alice", blank).expect("event");
        assert_eq!(tx.deliveries.last().map(|d| d.event.pts), Some(3));
        commit(tx);

        let mut tx = Tx::new(store.clone(), 0, Memory::default());
        tx.event("t", "alice", blank).expect("event");
        assert_eq!(tx.deliveries.last().map(|d| d.event.pts), Some(4));
    }

    #[test]
    fn a_purge_in_slices_drops_every_row_of_the_key_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 1_000).expect("store");
        let mut tx = Tx::new(store.clone(), 0, Memory::default());
        for seq in 1..=25 {
            tx.put_raw(Space::Messages, keys::message("t", "c", seq), vec![1]);
            tx.put_raw(Space::Messages, keys::message("t", "keep", seq), vec![2]);
            tx.put_raw(Space::Messages, keys::message("other", "c", seq), vec![3]);
        }
        tx.put_raw(Space::Members, keys::member("t", "c", "alice"), vec![4]);
        commit(tx);

        let keep = Excluded::from(["keep".to_string()]);
        let mut after = None;
        let mut slices = 0;
        loop {
            let mut tx = Tx::new(store.clone(), 0, Memory::default());
            let next = tx
                .purge("t", "", &keep, Some(4), after.as_ref())
                .expect("purge");
            commit(tx);
            slices += 1;
            match next {
                Some(cursor) => after = Some(cursor),
                None => break,
            }
            assert!(slices < 100, "the purge must make progress");
        }
        assert_eq!(slices, 7, "26 rows in slices of 4");
        let left = |tenant: &str| {
            store
                .spaces
                .messages
                .prefix(keys::Key::new().id(tenant).into_bytes())
                .count()
        };
        assert_eq!(left("t"), 25, "the excluded conversation stays");
        assert_eq!(left("other"), 25, "another tenant is untouched");
        assert_eq!(
            store.members("t", "c").expect("members"),
            Vec::<String>::new()
        );
    }
}
