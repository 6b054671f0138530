//! The writer: one thread that checks and applies every write in order, and commits them in
//! batches — group commit, one fsync per batch.
//!
//! Requests queue while the previous batch is being made durable; the writer takes them all (up
//! to `max_ops_per_commit`), checks each against the state including the batch's own earlier
//! writes, stages its rows in one fjall write batch, appends its mutation to the cell log at the
//! next LSN, and assigns the `pts` of every sync event inside the same batch. Only after the
//! batch is committed and fsynced is any request answered, so an acknowledged write survives a
//! crash, and a seq or pts is never handed out twice: both live in the rows the batch writes,
//! not in a counter beside the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::records::{
    ConversationRecord, GrantRecord, IdempotencyRecord, InboxRecord, Kind, LogRecord, MemberRecord,
    MessageRecord, Mutation, SyncKind, SyncRecord, UserRecord, decode, encode,
};
use super::{Space, Store, keys};
use crate::error::CellError;
use crate::limits::Limits;
use crate::sync::hub::{Delivery, SyncHub};
use cellplane_api::proto::cell::WrongCell;

/// How long a writer refused for a frozen key should wait before retrying.
pub const FROZEN_RETRY_AFTER_MS: u64 = 50;

/// Requests waiting for the writer before new ones are refused with RESOURCE_EXHAUSTED.
const QUEUE_DEPTH: usize = 65_536;

/// A write, already validated for shape (ids, sizes) by the API layer.
#[derive(Debug, Clone)]
pub enum Op {
    CreateConversation {
        tenant: String,
        conversation: String,
        kind: Kind,
        members: Vec<String>,
        epoch: u64,
    },
    AddMembers {
        tenant: String,
        conversation: String,
        members: Vec<String>,
        epoch: u64,
    },
    RemoveMembers {
        tenant: String,
        conversation: String,
        members: Vec<String>,
        epoch: u64,
    },
    Send {
        tenant: String,
        conversation: String,
        sender: String,
        client_msg_id: String,
        body: Vec<u8>,
        receivers: Vec<String>,
        epoch: u64,
    },
    MarkRead {
        tenant: String,
        conversation: String,
        user: String,
        seq: u64,
        epoch: u64,
    },
    Recall {
        tenant: String,
        conversation: String,
        user: String,
        seq: u64,
        epoch: u64,
    },
    DeleteForMe {
        tenant: String,
        conversation: String,
        user: String,
        seq: u64,
        epoch: u64,
    },
    Grant {
        tenant: String,
        conversation: String,
        epoch: u64,
    },
    Revoke {
        tenant: String,
        conversation: String,
        new_cell: String,
        new_epoch: u64,
    },
    Freeze {
        tenant: String,
        conversation: String,
    },
    Unfreeze {
        tenant: String,
        conversation: String,
    },
}

/// A conversation as answers show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationView {
    pub kind: Kind,
    pub members: Vec<String>,
    pub created_ms: u64,
    pub last_seq: u64,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Conversation(ConversationView),
    Sent(IdempotencyRecord),
    Done,
    Frozen { last_lsn: u64 },
}

type Reply = oneshot::Sender<Result<Outcome, CellError>>;

/// Grants by `(tenant, conversation)`; an empty conversation is the whole tenant.
pub type Grants = HashMap<(String, String), GrantRecord>;

/// A handle to the writer thread. Cheap to clone; the thread stops when every handle is gone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::SyncSender<(Op, Reply)>,
    grants: Arc<RwLock<Grants>>,
}

impl Writer {
    /// Starts the writer over `store`.
    pub fn start(
        store: Store,
        cell_id: String,
        limits: Limits,
        hub: SyncHub,
    ) -> Result<Self, CellError> {
        let grants: Grants = store
            .grants()?
            .into_iter()
            .map(|(tenant, conversation, grant)| ((tenant, conversation), grant))
            .collect();
        let shared = Arc::new(RwLock::new(grants.clone()));
        let last_lsn = store.last_lsn()?;
        let (queue, requests) = mpsc::sync_channel(QUEUE_DEPTH);
        let mut state = WriterState {
            store,
            cell_id,
            limits,
            hub,
            grants,
            shared: shared.clone(),
            last_lsn,
        };
        std::thread::Builder::new()
            .name("cell-writer".into())
            .spawn(move || state.run(requests))
            .map_err(|e| CellError::Storage(format!("starting the writer: {e}")))?;
        Ok(Self {
            queue,
            grants: shared,
        })
    }

    /// Submits a write and waits until it is durable (or refused).
    pub async fn submit(&self, op: Op) -> Result<Outcome, CellError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send((op, reply)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => CellError::ResourceExhausted(
                "the cell's write queue is full; retry after 100 ms".into(),
            ),
            mpsc::TrySendError::Disconnected(_) => CellError::Storage("the writer stopped".into()),
        })?;
        answer
            .await
            .map_err(|_| CellError::Storage("the writer dropped the request".into()))?
    }

    /// The grants as of the last committed batch.
    pub fn grants(&self) -> Grants {
        self.grants.read().map(|g| g.clone()).unwrap_or_default()
    }
}

struct WriterState {
    store: Store,
    cell_id: String,
    limits: Limits,
    hub: SyncHub,
    /// Authoritative while the writer runs: changed by grant ops as they are applied, reloaded
    /// from the store if a batch fails to commit.
    grants: Grants,
    shared: Arc<RwLock<Grants>>,
    last_lsn: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One batch's staged writes, readable by the batch's later requests.
struct Tx<'a> {
    store: &'a Store,
    batch: fjall::OwnedWriteBatch,
    overlay: HashMap<(Space, Vec<u8>), Option<Vec<u8>>>,
    /// Membership changes of this batch by conversation: user → member after the change.
    membership: HashMap<(String, String), BTreeMap<String, bool>>,
    lsn: u64,
    deliveries: Vec<Delivery>,
    writes: usize,
}

impl<'a> Tx<'a> {
    fn get<T: DeserializeOwned>(&self, space: Space, key: &[u8]) -> Result<Option<T>, CellError> {
        if let Some(staged) = self.overlay.get(&(space, key.to_vec())) {
            return match staged {
                Some(bytes) => Ok(Some(decode(bytes)?)),
                None => Ok(None),
            };
        }
        match self.store.spaces.get(space).get(key)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&mut self, space: Space, key: Vec<u8>, value: &T) {
        let bytes = encode(value);
        self.batch
            .insert(self.store.spaces.get(space), key.clone(), bytes.clone());
        self.overlay.insert((space, key), Some(bytes));
        self.writes += 1;
    }

    fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.batch.remove(self.store.spaces.get(space), key.clone());
        self.overlay.insert((space, key), None);
        self.writes += 1;
    }

    /// Members after this batch's changes so far.
    fn members(&self, tenant: &str, conversation: &str) -> Result<Vec<String>, CellError> {
        let mut members: BTreeMap<String, bool> = self
            .store
            .members(tenant, conversation)?
            .into_iter()
            .map(|m| (m, true))
            .collect();
        if let Some(changes) = self
            .membership
            .get(&(tenant.to_string(), conversation.to_string()))
        {
            for (user, member) in changes {
                members.insert(user.clone(), *member);
            }
        }
        Ok(members
            .into_iter()
            .filter(|(_, m)| *m)
            .map(|(u, _)| u)
            .collect())
    }

    fn set_member(
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
        self.membership
            .entry((tenant.to_string(), conversation.to_string()))
            .or_default()
            .insert(user.to_string(), record.is_some());
    }

    /// Appends a mutation to the cell log at the next LSN.
    fn log(&mut self, tenant: &str, conversation: &str, mutation: Mutation) {
        self.lsn += 1;
        let record = LogRecord {
            lsn: self.lsn,
            tenant_id: tenant.to_string(),
            conversation_id: conversation.to_string(),
            mutation,
        };
        self.put(Space::Log, keys::lsn(self.lsn), &record);
    }

    /// Appends an event to a user's sync queue at the user's next pts, in this same batch.
    fn event(
        &mut self,
        tenant: &str,
        user: &str,
        event: impl FnOnce(u64) -> SyncRecord,
    ) -> Result<(), CellError> {
        let key = keys::user(tenant, user);
        let mut head: UserRecord = self.get(Space::Users, &key)?.unwrap_or_default();
        head.last_pts += 1;
        let record = event(head.last_pts);
        assert_eq!(
            record.pts, head.last_pts,
            "an event carries the pts it was given"
        );
        self.put(Space::Users, key, &head);
        self.put(
            Space::Sync,
            keys::sync_event(tenant, user, head.last_pts),
            &record,
        );
        self.deliveries.push(Delivery {
            tenant: tenant.to_string(),
            user: user.to_string(),
            event: record,
        });
        Ok(())
    }
}

fn wrong_cell(message: String, detail: WrongCell) -> CellError {
    CellError::WrongCell {
        message,
        detail: Box::new(detail),
    }
}

impl WriterState {
    fn run(&mut self, requests: mpsc::Receiver<(Op, Reply)>) {
        while let Ok(first) = requests.recv() {
            let mut pending = vec![first];
            while pending.len() < self.limits.max_ops_per_commit {
                match requests.try_recv() {
                    Ok(request) => pending.push(request),
                    Err(_) => break,
                }
            }
            self.commit_batch(pending);
        }
    }

    fn commit_batch(&mut self, pending: Vec<(Op, Reply)>) {
        let mut tx = Tx {
            store: &self.store,
            batch: self.store.db.batch(),
            overlay: HashMap::new(),
            membership: HashMap::new(),
            lsn: self.last_lsn,
            deliveries: Vec::new(),
            writes: 0,
        };
        let mut answers = Vec::with_capacity(pending.len());
        for (op, reply) in pending {
            let answer = apply(&self.cell_id, &self.limits, &mut self.grants, &mut tx, op);
            answers.push((reply, answer));
        }
        let lsn = tx.lsn;
        let deliveries = std::mem::take(&mut tx.deliveries);
        let ops = answers.len();
        let committed = if tx.writes == 0 {
            Ok(())
        } else {
            tx.batch
                .commit()
                .and_then(|()| self.store.db.persist(fjall::PersistMode::SyncAll))
                .map_err(|e| CellError::Storage(e.to_string()))
        };
        metrics::histogram!("cellplane_cell_ops_per_commit").record(ops as f64);
        match committed {
            Ok(()) => {
                self.last_lsn = lsn;
                if let Ok(mut shared) = self.shared.write() {
                    shared.clone_from(&self.grants);
                }
                for (reply, answer) in answers {
                    let _ = reply.send(answer);
                }
                self.hub.publish(deliveries);
            }
            Err(err) => {
                tracing::error!(error = %err, "commit failed; refusing the batch");
                // Nothing of the batch is durable: forget its grant changes too.
                if let Ok(grants) = self.store.grants() {
                    self.grants = grants.into_iter().map(|(t, c, g)| ((t, c), g)).collect();
                }
                for (reply, _) in answers {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Checks that this cell may write `(tenant, conversation)` at `epoch` now.
fn check_owner(
    grants: &Grants,
    tenant: &str,
    conversation: &str,
    epoch: u64,
) -> Result<(), CellError> {
    let conversation_grant = grants.get(&(tenant.to_string(), conversation.to_string()));
    let grant = conversation_grant.or_else(|| grants.get(&(tenant.to_string(), String::new())));
    let detail = |grant: Option<&GrantRecord>| WrongCell {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        cell_epoch: grant.map(|g| g.epoch).unwrap_or(0),
        current_cell_id: grant
            .and_then(|g| g.moved_to.as_ref().map(|(c, _)| c.clone()))
            .unwrap_or_default(),
        current_epoch: grant
            .and_then(|g| g.moved_to.as_ref().map(|(_, e)| *e))
            .unwrap_or(0),
        frozen: false,
        retry_after_ms: 0,
    };
    let Some(record) = grant else {
        return Err(wrong_cell(
            format!("route_epoch: this cell does not own {tenant}/{conversation}"),
            detail(None),
        ));
    };
    if let Some((cell, new_epoch)) = &record.moved_to {
        return Err(wrong_cell(
            format!(
                "route_epoch: {tenant}/{conversation} moved to cell {cell:?} at epoch {new_epoch}"
            ),
            detail(Some(record)),
        ));
    }
    if epoch != record.epoch {
        let rule = if epoch < record.epoch {
            "is stale"
        } else {
            "is newer than this cell's grant"
        };
        return Err(wrong_cell(
            format!(
                "route_epoch: {epoch} {rule} (the cell holds {tenant}/{conversation} at epoch {}); refresh the route",
                record.epoch
            ),
            detail(Some(record)),
        ));
    }
    if record.frozen {
        let mut frozen = detail(Some(record));
        frozen.frozen = true;
        frozen.retry_after_ms = FROZEN_RETRY_AFTER_MS;
        return Err(wrong_cell(
            format!(
                "{tenant}/{conversation} is frozen for a move; retry after {FROZEN_RETRY_AFTER_MS} ms"
            ),
            frozen,
        ));
    }
    Ok(())
}

fn conversation_view(
    tx: &Tx<'_>,
    tenant: &str,
    conversation: &str,
    record: &ConversationRecord,
) -> Result<ConversationView, CellError> {
    Ok(ConversationView {
        kind: record.kind,
        members: tx.members(tenant, conversation)?,
        created_ms: record.created_ms,
        last_seq: record.last_seq,
    })
}

fn require_conversation(
    tx: &Tx<'_>,
    tenant: &str,
    conversation: &str,
) -> Result<ConversationRecord, CellError> {
    tx.get(
        Space::Conversations,
        &keys::conversation(tenant, conversation),
    )?
    .ok_or_else(|| {
        CellError::NotFound(format!(
            "conversation_id: conversation {conversation:?} of tenant {tenant:?} does not exist"
        ))
    })
}

fn require_member(
    tx: &Tx<'_>,
    tenant: &str,
    conversation: &str,
    user: &str,
    field: &str,
) -> Result<MemberRecord, CellError> {
    tx.get(Space::Members, &keys::member(tenant, conversation, user))?
        .ok_or_else(|| {
            CellError::PermissionDenied(format!(
                "{field}: {user:?} is not a member of {conversation:?}"
            ))
        })
}

/// The message at `seq` as `user` sees it: shared, or a private one in the user's inbox.
fn find_message(
    tx: &Tx<'_>,
    tenant: &str,
    conversation: &str,
    user: &str,
    seq: u64,
) -> Result<Option<MessageRecord>, CellError> {
    if let Some(message) =
        tx.get::<MessageRecord>(Space::Messages, &keys::message(tenant, conversation, seq))?
    {
        return Ok(Some(message));
    }
    let inbox: Option<InboxRecord> =
        tx.get(Space::Inbox, &keys::inbox(tenant, user, conversation, seq))?;
    Ok(inbox.and_then(|i| i.private))
}

fn apply(
    cell_id: &str,
    limits: &Limits,
    grants: &mut Grants,
    tx: &mut Tx<'_>,
    op: Op,
) -> Result<Outcome, CellError> {
    match op {
        Op::CreateConversation {
            tenant,
            conversation,
            kind,
            members,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            let key = keys::conversation(&tenant, &conversation);
            if tx
                .get::<ConversationRecord>(Space::Conversations, &key)?
                .is_some()
            {
                return Err(CellError::AlreadyExists(format!(
                    "conversation_id: conversation {conversation:?} of tenant {tenant:?} already exists"
                )));
            }
            let created_ms = now_ms();
            let record = ConversationRecord {
                kind,
                created_ms,
                last_seq: 0,
                member_count: members.len() as u64,
            };
            tx.put(Space::Conversations, key, &record);
            let member = MemberRecord {
                joined_ms: created_ms,
                read_seq: 0,
            };
            for user in &members {
                tx.set_member(&tenant, &conversation, user, Some(&member));
            }
            for user in &members {
                tx.event(&tenant, user, |pts| SyncRecord {
                    pts,
                    kind: SyncKind::Membership,
                    conversation_id: conversation.clone(),
                    seq: 0,
                    message: None,
                    user_ids: members.clone(),
                    joined: true,
                })?;
            }
            tx.log(
                &tenant,
                &conversation,
                Mutation::CreateConversation {
                    kind,
                    member_ids: members,
                    created_ms,
                },
            );
            Ok(Outcome::Conversation(conversation_view(
                tx,
                &tenant,
                &conversation,
                &record,
            )?))
        }
        Op::AddMembers {
            tenant,
            conversation,
            members,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            let mut record = require_conversation(tx, &tenant, &conversation)?;
            if record.kind == Kind::Single {
                return Err(CellError::invalid(
                    "conversation_id",
                    "a single chat has fixed members; create a group",
                ));
            }
            let current = tx.members(&tenant, &conversation)?;
            let new: Vec<String> = members
                .into_iter()
                .filter(|m| !current.contains(m))
                .collect();
            if current.len() + new.len() > limits.max_group_members {
                return Err(CellError::invalid(
                    "member_ids",
                    format!(
                        "a group has at most {} members; it has {} and {} would join",
                        limits.max_group_members,
                        current.len(),
                        new.len()
                    ),
                ));
            }
            if !new.is_empty() {
                let at_ms = now_ms();
                record.member_count += new.len() as u64;
                tx.put(
                    Space::Conversations,
                    keys::conversation(&tenant, &conversation),
                    &record,
                );
                let member = MemberRecord {
                    joined_ms: at_ms,
                    read_seq: record.last_seq,
                };
                for user in &new {
                    tx.set_member(&tenant, &conversation, user, Some(&member));
                }
                for user in current.iter().chain(new.iter()) {
                    tx.event(&tenant, user, |pts| SyncRecord {
                        pts,
                        kind: SyncKind::Membership,
                        conversation_id: conversation.clone(),
                        seq: record.last_seq,
                        message: None,
                        user_ids: new.clone(),
                        joined: true,
                    })?;
                }
                tx.log(
                    &tenant,
                    &conversation,
                    Mutation::AddMembers {
                        member_ids: new,
                        at_ms,
                    },
                );
            }
            Ok(Outcome::Conversation(conversation_view(
                tx,
                &tenant,
                &conversation,
                &record,
            )?))
        }
        Op::RemoveMembers {
            tenant,
            conversation,
            members,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            let mut record = require_conversation(tx, &tenant, &conversation)?;
            if record.kind == Kind::Single {
                return Err(CellError::invalid(
                    "conversation_id",
                    "a single chat has fixed members",
                ));
            }
            let current = tx.members(&tenant, &conversation)?;
            let gone: Vec<String> = members
                .into_iter()
                .filter(|m| current.contains(m))
                .collect();
            if !gone.is_empty() {
                record.member_count = record.member_count.saturating_sub(gone.len() as u64);
                tx.put(
                    Space::Conversations,
                    keys::conversation(&tenant, &conversation),
                    &record,
                );
                for user in &gone {
                    tx.set_member(&tenant, &conversation, user, None);
                }
                for user in &current {
                    tx.event(&tenant, user, |pts| SyncRecord {
                        pts,
                        kind: SyncKind::Membership,
                        conversation_id: conversation.clone(),
                        seq: record.last_seq,
                        message: None,
                        user_ids: gone.clone(),
                        joined: false,
                    })?;
                }
                tx.log(
                    &tenant,
                    &conversation,
                    Mutation::RemoveMembers { member_ids: gone },
                );
            }
            Ok(Outcome::Conversation(conversation_view(
                tx,
                &tenant,
                &conversation,
                &record,
            )?))
        }
        Op::Send {
            tenant,
            conversation,
            sender,
            client_msg_id,
            body,
            receivers,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            let idempotency_key =
                keys::idempotency(&tenant, &conversation, &sender, &client_msg_id);
            if let Some(first) =
                tx.get::<IdempotencyRecord>(Space::Idempotency, &idempotency_key)?
            {
                // A retry: the same answer, if it is the same message.
                let stored = find_message(tx, &tenant, &conversation, &sender, first.seq)?;
                let same = stored.is_some_and(|m| m.body == body && m.receiver_ids == receivers);
                return if same {
                    Ok(Outcome::Sent(first))
                } else {
                    Err(CellError::AlreadyExists(format!(
                        "client_msg_id: {client_msg_id:?} was already used by {sender:?} for a different message (seq {})",
                        first.seq
                    )))
                };
            }
            let mut record = require_conversation(tx, &tenant, &conversation)?;
            require_member(tx, &tenant, &conversation, &sender, "sender_id")?;
            for (i, receiver) in receivers.iter().enumerate() {
                if tx
                    .get::<MemberRecord>(
                        Space::Members,
                        &keys::member(&tenant, &conversation, receiver),
                    )?
                    .is_none()
                {
                    return Err(CellError::PermissionDenied(format!(
                        "receiver_ids[{i}]: {receiver:?} is not a member of {conversation:?}"
                    )));
                }
            }
            let members = if receivers.is_empty() {
                tx.members(&tenant, &conversation)?
            } else {
                Vec::new()
            };
            record.last_seq += 1;
            let seq = record.last_seq;
            let server_time_ms = now_ms();
            let message = MessageRecord {
                message_id: format!("{cell_id}/{tenant}/{conversation}/{seq}"),
                seq,
                sender_id: sender.clone(),
                client_msg_id,
                body,
                server_time_ms,
                receiver_ids: receivers.clone(),
                recalled: false,
            };
            tx.put(
                Space::Conversations,
                keys::conversation(&tenant, &conversation),
                &record,
            );
            let audience: Vec<String> = if receivers.is_empty() {
                tx.put(
                    Space::Messages,
                    keys::message(&tenant, &conversation, seq),
                    &message,
                );
                members
            } else {
                // Private: a copy in the inbox of the sender and of each receiver.
                let mut audience = receivers.clone();
                if !audience.contains(&sender) {
                    audience.push(sender.clone());
                }
                for user in &audience {
                    let inbox = InboxRecord {
                        private: Some(message.clone()),
                        deleted: false,
                    };
                    tx.put(
                        Space::Inbox,
                        keys::inbox(&tenant, user, &conversation, seq),
                        &inbox,
                    );
                }
                audience
            };
            let answer = IdempotencyRecord {
                message_id: message.message_id.clone(),
                seq,
                server_time_ms,
            };
            tx.put(Space::Idempotency, idempotency_key, &answer);
            for user in &audience {
                tx.event(&tenant, user, |pts| SyncRecord {
                    pts,
                    kind: SyncKind::NewMessage,
                    conversation_id: conversation.clone(),
                    seq,
                    message: Some(message.clone()),
                    user_ids: Vec::new(),
                    joined: false,
                })?;
            }
            tx.log(&tenant, &conversation, Mutation::Send { message });
            metrics::counter!("cellplane_cell_messages_sent_total").increment(1);
            Ok(Outcome::Sent(answer))
        }
        Op::MarkRead {
            tenant,
            conversation,
            user,
            seq,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            let record = require_conversation(tx, &tenant, &conversation)?;
            let mut member = require_member(tx, &tenant, &conversation, &user, "user_id")?;
            if seq > record.last_seq {
                return Err(CellError::invalid(
                    "seq",
                    format!("must be at most the newest seq {}", record.last_seq),
                ));
            }
            if seq > member.read_seq {
                member.read_seq = seq;
                tx.put(
                    Space::Members,
                    keys::member(&tenant, &conversation, &user),
                    &member,
                );
                tx.event(&tenant, &user, |pts| SyncRecord {
                    pts,
                    kind: SyncKind::Read,
                    conversation_id: conversation.clone(),
                    seq,
                    message: None,
                    user_ids: vec![user.clone()],
                    joined: false,
                })?;
                tx.log(
                    &tenant,
                    &conversation,
                    Mutation::MarkRead { user_id: user, seq },
                );
            }
            Ok(Outcome::Done)
        }
        Op::Recall {
            tenant,
            conversation,
            user,
            seq,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            require_conversation(tx, &tenant, &conversation)?;
            require_member(tx, &tenant, &conversation, &user, "user_id")?;
            let Some(mut message) = find_message(tx, &tenant, &conversation, &user, seq)? else {
                return Err(CellError::NotFound(format!(
                    "seq: no message {seq} in {conversation:?}"
                )));
            };
            if message.sender_id != user {
                return Err(CellError::PermissionDenied(format!(
                    "user_id: only the sender {:?} may recall message {seq}",
                    message.sender_id
                )));
            }
            if !message.recalled {
                message.recalled = true;
                message.body.clear();
                let audience = if message.receiver_ids.is_empty() {
                    tx.put(
                        Space::Messages,
                        keys::message(&tenant, &conversation, seq),
                        &message,
                    );
                    tx.members(&tenant, &conversation)?
                } else {
                    let mut audience = message.receiver_ids.clone();
                    if !audience.contains(&message.sender_id) {
                        audience.push(message.sender_id.clone());
                    }
                    for member in &audience {
                        let key = keys::inbox(&tenant, member, &conversation, seq);
                        let mut inbox: InboxRecord =
                            tx.get(Space::Inbox, &key)?.unwrap_or_default();
                        inbox.private = Some(message.clone());
                        tx.put(Space::Inbox, key, &inbox);
                    }
                    audience
                };
                for member in &audience {
                    tx.event(&tenant, member, |pts| SyncRecord {
                        pts,
                        kind: SyncKind::Recall,
                        conversation_id: conversation.clone(),
                        seq,
                        message: None,
                        user_ids: vec![user.clone()],
                        joined: false,
                    })?;
                }
                tx.log(&tenant, &conversation, Mutation::Recall { seq });
            }
            Ok(Outcome::Done)
        }
        Op::DeleteForMe {
            tenant,
            conversation,
            user,
            seq,
            epoch,
        } => {
            check_owner(grants, &tenant, &conversation, epoch)?;
            require_conversation(tx, &tenant, &conversation)?;
            require_member(tx, &tenant, &conversation, &user, "user_id")?;
            if find_message(tx, &tenant, &conversation, &user, seq)?.is_none() {
                return Err(CellError::NotFound(format!(
                    "seq: no message {seq} in {conversation:?}"
                )));
            }
            let key = keys::inbox(&tenant, &user, &conversation, seq);
            let mut inbox: InboxRecord = tx.get(Space::Inbox, &key)?.unwrap_or_default();
            if !inbox.deleted {
                inbox.deleted = true;
                tx.put(Space::Inbox, key, &inbox);
                tx.event(&tenant, &user, |pts| SyncRecord {
                    pts,
                    kind: SyncKind::DeleteForMe,
                    conversation_id: conversation.clone(),
                    seq,
                    message: None,
                    user_ids: Vec::new(),
                    joined: false,
                })?;
                tx.log(
                    &tenant,
                    &conversation,
                    Mutation::DeleteForMe { user_id: user, seq },
                );
            }
            Ok(Outcome::Done)
        }
        Op::Grant {
            tenant,
            conversation,
            epoch,
        } => {
            let key = (tenant.clone(), conversation.clone());
            if let Some(existing) = grants.get(&key)
                && (epoch < existing.epoch
                    || (epoch == existing.epoch && existing.moved_to.is_some()))
            {
                return Err(CellError::invalid(
                    "epoch",
                    format!(
                        "must not go back: the cell held {tenant}/{conversation} at epoch {}",
                        existing.epoch
                    ),
                ));
            }
            let record = GrantRecord {
                epoch,
                frozen: false,
                moved_to: None,
            };
            tx.put(Space::Grants, keys::grant(&tenant, &conversation), &record);
            grants.insert(key, record);
            Ok(Outcome::Done)
        }
        Op::Revoke {
            tenant,
            conversation,
            new_cell,
            new_epoch,
        } => {
            let key = (tenant.clone(), conversation.clone());
            let epoch = grants.get(&key).map(|g| g.epoch).unwrap_or(0);
            let record = GrantRecord {
                epoch,
                frozen: false,
                moved_to: Some((new_cell, new_epoch)),
            };
            tx.put(Space::Grants, keys::grant(&tenant, &conversation), &record);
            grants.insert(key, record);
            Ok(Outcome::Done)
        }
        Op::Freeze {
            tenant,
            conversation,
        } => set_frozen(grants, tx, tenant, conversation, true),
        Op::Unfreeze {
            tenant,
            conversation,
        } => set_frozen(grants, tx, tenant, conversation, false),
    }
}

fn set_frozen(
    grants: &mut Grants,
    tx: &mut Tx<'_>,
    tenant: String,
    conversation: String,
    frozen: bool,
) -> Result<Outcome, CellError> {
    let key = (tenant.clone(), conversation.clone());
    let Some(record) = grants.get_mut(&key) else {
        return Err(CellError::NotFound(format!(
            "tenant_id: the cell holds no grant for {tenant}/{conversation}"
        )));
    };
    if record.moved_to.is_some() {
        return Err(CellError::invalid(
            "conversation_id",
            format!("{tenant}/{conversation} was revoked"),
        ));
    }
    record.frozen = frozen;
    let record = record.clone();
    tx.put(Space::Grants, keys::grant(&tenant, &conversation), &record);
    // Every write to the key so far is at or below this LSN; none comes after while frozen.
    Ok(Outcome::Frozen { last_lsn: tx.lsn })
}
