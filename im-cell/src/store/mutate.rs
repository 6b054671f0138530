//! Writes in two steps. [`decide`] checks a request against the state (ownership, existence,
//! membership, idempotency) and turns it into a [`Mutation`] carrying everything the cell
//! assigned (seq, message id, time). [`apply_mutation`] writes a mutation's rows, its sync
//! events and its cell-log entry. Live requests take both steps; an import or a log replay takes
//! only the second, so there is one path for the same data.

use super::export::{Excluded, space_named};
use super::fencing::{Grants, check_owner};
use super::records::{
    ConversationRecord, IdempotencyRecord, InboxRecord, Kind, LogRecord, MemberRecord,
    MessageRecord, Mutation, SyncKind, SyncRecord,
};
use super::tx::Tx;
use super::{Space, keys};
use crate::error::CellError;
use crate::limits::Limits;

/// What a request came to.
#[derive(Debug)]
pub enum Decision {
    /// Apply this mutation.
    Apply(Mutation),
    /// A retried send: answer as the first time, write nothing.
    Retry(IdempotencyRecord),
    /// Nothing changes (already read, already recalled, already members).
    Unchanged,
}

/// A live write, its shape already checked by the API layer.
#[derive(Debug, Clone)]
pub enum WriteRequest {
    CreateConversation {
        kind: Kind,
        members: Vec<String>,
    },
    AddMembers {
        members: Vec<String>,
    },
    RemoveMembers {
        members: Vec<String>,
    },
    Send {
        sender: String,
        client_msg_id: String,
        body: Vec<u8>,
        receivers: Vec<String>,
    },
    MarkRead {
        user: String,
        seq: u64,
    },
    Recall {
        user: String,
        seq: u64,
    },
    DeleteForMe {
        user: String,
        seq: u64,
    },
}

pub fn require_conversation(
    tx: &Tx,
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
    tx: &Tx,
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

/// The message at `seq` as `user` sees it: the shared one, or a private one in the user's inbox.
fn find_message(
    tx: &Tx,
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

use cellplane_api::clock::now_ms;

/// What deciding needs besides the state: who the cell is, its limits and its grants.
pub struct Decider<'a> {
    pub cell_id: &'a str,
    pub limits: &'a Limits,
    pub grants: &'a Grants,
}

impl Decider<'_> {
    /// Checks a live request to `tenant/conversation` at route `epoch` and decides what it
    /// writes.
    pub fn decide(
        &self,
        tx: &Tx,
        tenant: &str,
        conversation: &str,
        epoch: u64,
        request: WriteRequest,
    ) -> Result<Decision, CellError> {
        check_owner(self.grants, tenant, conversation, epoch)?;
        decide_owned(self.cell_id, self.limits, tx, tenant, conversation, request)
    }
}

/// Decides a request to a key this cell owns at the caller's epoch.
fn decide_owned(
    cell_id: &str,
    limits: &Limits,
    tx: &Tx,
    tenant: &str,
    conversation: &str,
    request: WriteRequest,
) -> Result<Decision, CellError> {
    let key = (tenant, conversation);
    match request {
        WriteRequest::CreateConversation { kind, members } => create(tx, key, kind, members),
        WriteRequest::AddMembers { members } => add_members(limits, tx, key, members),
        WriteRequest::RemoveMembers { members } => remove_members(tx, key, members),
        WriteRequest::Send {
            sender,
            client_msg_id,
            body,
            receivers,
        } => send(cell_id, tx, key, sender, client_msg_id, body, receivers),
        WriteRequest::MarkRead { user, seq } => mark_read(tx, key, user, seq),
        WriteRequest::Recall { user, seq } => recall(tx, key, user, seq),
        WriteRequest::DeleteForMe { user, seq } => delete_for_me(tx, key, user, seq),
    }
}

/// `(tenant, conversation)`.
type ConversationKey<'a> = (&'a str, &'a str);

fn create(
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    kind: Kind,
    members: Vec<String>,
) -> Result<Decision, CellError> {
    if tx
        .get::<ConversationRecord>(
            Space::Conversations,
            &keys::conversation(tenant, conversation),
        )?
        .is_some()
    {
        return Err(CellError::AlreadyExists(format!(
            "conversation_id: conversation {conversation:?} of tenant {tenant:?} already exists"
        )));
    }
    Ok(Decision::Apply(Mutation::CreateConversation {
        kind,
        member_ids: members,
        created_ms: now_ms(),
    }))
}

/// The members of a group; a single chat's are fixed.
fn group_members(
    tx: &Tx,
    (tenant, conversation): ConversationKey,
) -> Result<Vec<String>, CellError> {
    let record = require_conversation(tx, tenant, conversation)?;
    if record.kind == Kind::Single {
        return Err(CellError::invalid(
            "conversation_id",
            "a single chat has fixed members; create a group",
        ));
    }
    tx.members(tenant, conversation)
}

fn add_members(
    limits: &Limits,
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    members: Vec<String>,
) -> Result<Decision, CellError> {
    let current = group_members(tx, (tenant, conversation))?;
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
    if new.is_empty() {
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Apply(Mutation::AddMembers {
        member_ids: new,
        at_ms: now_ms(),
    }))
}

fn remove_members(
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    members: Vec<String>,
) -> Result<Decision, CellError> {
    let current = group_members(tx, (tenant, conversation))?;
    let gone: Vec<String> = members
        .into_iter()
        .filter(|m| current.contains(m))
        .collect();
    if gone.is_empty() {
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Apply(Mutation::RemoveMembers {
        member_ids: gone,
    }))
}

/// A send: a retry of an earlier one answers as the first time; a new one gets the next seq.
fn send(
    cell_id: &str,
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    sender: String,
    client_msg_id: String,
    body: Vec<u8>,
    receivers: Vec<String>,
) -> Result<Decision, CellError> {
    let idempotency_key = keys::idempotency(tenant, conversation, &sender, &client_msg_id);
    if let Some(first) = tx.get::<IdempotencyRecord>(Space::Idempotency, &idempotency_key)? {
        let stored = find_message(tx, tenant, conversation, &sender, first.seq)?;
        let same =
            stored.is_some_and(|m| m.recalled || (m.body == body && m.receiver_ids == receivers));
        return if same {
            Ok(Decision::Retry(first))
        } else {
            Err(CellError::AlreadyExists(format!(
                "client_msg_id: {client_msg_id:?} was already used by {sender:?} for a different message (seq {})",
                first.seq
            )))
        };
    }
    let record = require_conversation(tx, tenant, conversation)?;
    require_member(tx, tenant, conversation, &sender, "sender_id")?;
    for (i, receiver) in receivers.iter().enumerate() {
        if tx
            .get::<MemberRecord>(
                Space::Members,
                &keys::member(tenant, conversation, receiver),
            )?
            .is_none()
        {
            return Err(CellError::PermissionDenied(format!(
                "receiver_ids[{i}]: {receiver:?} is not a member of {conversation:?}"
            )));
        }
    }
    let seq = record.last_seq + 1;
    Ok(Decision::Apply(Mutation::Send {
        message: MessageRecord {
            message_id: format!("{cell_id}/{tenant}/{conversation}/{seq}"),
            seq,
            sender_id: sender,
            client_msg_id,
            body,
            server_time_ms: now_ms(),
            receiver_ids: receivers,
            recalled: false,
        },
    }))
}

fn mark_read(
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    user: String,
    seq: u64,
) -> Result<Decision, CellError> {
    let record = require_conversation(tx, tenant, conversation)?;
    let member = require_member(tx, tenant, conversation, &user, "user_id")?;
    if seq > record.last_seq {
        return Err(CellError::invalid(
            "seq",
            format!("must be at most the newest seq {}", record.last_seq),
        ));
    }
    if seq <= member.read_seq {
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Apply(Mutation::MarkRead { user_id: user, seq }))
}

fn recall(
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    user: String,
    seq: u64,
) -> Result<Decision, CellError> {
    require_conversation(tx, tenant, conversation)?;
    require_member(tx, tenant, conversation, &user, "user_id")?;
    let Some(message) = find_message(tx, tenant, conversation, &user, seq)? else {
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
    if message.recalled {
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Apply(Mutation::Recall { user_id: user, seq }))
}

fn delete_for_me(
    tx: &Tx,
    (tenant, conversation): ConversationKey,
    user: String,
    seq: u64,
) -> Result<Decision, CellError> {
    require_conversation(tx, tenant, conversation)?;
    require_member(tx, tenant, conversation, &user, "user_id")?;
    if find_message(tx, tenant, conversation, &user, seq)?.is_none() {
        return Err(CellError::NotFound(format!(
            "seq: no message {seq} in {conversation:?}"
        )));
    }
    let inbox: InboxRecord = tx
        .get(Space::Inbox, &keys::inbox(tenant, &user, conversation, seq))?
        .unwrap_or_default();
    if inbox.deleted {
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Apply(Mutation::DeleteForMe {
        user_id: user,
        seq,
    }))
}

/// Who sees a message: every member, or the receivers of a private one and its sender.
fn audience(
    tx: &Tx,
    tenant: &str,
    conversation: &str,
    message: &MessageRecord,
) -> Result<Vec<String>, CellError> {
    if message.receiver_ids.is_empty() {
        return tx.members(tenant, conversation);
    }
    let mut audience = message.receiver_ids.clone();
    if !audience.contains(&message.sender_id) {
        audience.push(message.sender_id.clone());
    }
    Ok(audience)
}

fn event(kind: SyncKind, conversation: &str, seq: u64) -> impl Fn(u64) -> SyncRecord + '_ {
    move |pts| SyncRecord {
        pts,
        kind,
        conversation_id: conversation.to_string(),
        seq,
        message: None,
        user_ids: Vec::new(),
        joined: false,
    }
}

/// Applies another cell's log record (an import, a standby following its primary) without
/// sync events: devices catch up with a REBASE instead.
pub fn replay(tx: &mut Tx, record: LogRecord) -> Result<(), CellError> {
    super::foreign::check_record(&record)?;
    apply_mutation(
        tx,
        &record.tenant_id,
        &record.conversation_id,
        record.mutation,
        false,
    )
}

/// Writes a mutation: its rows, its sync events (when `events`), and its cell-log entry. A
/// mutation that does not fit the state (a replayed log out of order) is refused whole before
/// anything is staged.
pub fn apply_mutation(
    tx: &mut Tx,
    tenant: &str,
    conversation: &str,
    mutation: Mutation,
    events: bool,
) -> Result<(), CellError> {
    let conversation_key = keys::conversation(tenant, conversation);
    match &mutation {
        Mutation::CreateConversation {
            kind,
            member_ids,
            created_ms,
        } => {
            if tx
                .get::<ConversationRecord>(Space::Conversations, &conversation_key)?
                .is_some()
            {
                return Err(CellError::AlreadyExists(format!(
                    "conversation {tenant}/{conversation} exists"
                )));
            }
            let record = ConversationRecord {
                kind: *kind,
                created_ms: *created_ms,
                last_seq: 0,
            };
            tx.put(Space::Conversations, conversation_key, &record);
            let member = MemberRecord {
                joined_ms: *created_ms,
                read_seq: 0,
            };
            for user in member_ids {
                tx.set_member(tenant, conversation, user, Some(&member));
            }
            if events {
                for user in member_ids {
                    tx.event(tenant, user, |pts| SyncRecord {
                        user_ids: member_ids.clone(),
                        joined: true,
                        ..event(SyncKind::Membership, conversation, 0)(pts)
                    })?;
                }
            }
        }
        Mutation::AddMembers { member_ids, at_ms } => {
            let record = require_conversation(tx, tenant, conversation)?;
            let current = tx.members(tenant, conversation)?;
            let member = MemberRecord {
                joined_ms: *at_ms,
                read_seq: record.last_seq,
            };
            for user in member_ids {
                tx.set_member(tenant, conversation, user, Some(&member));
            }
            if events {
                for user in current.iter().chain(member_ids.iter()) {
                    tx.event(tenant, user, |pts| SyncRecord {
                        user_ids: member_ids.clone(),
                        joined: true,
                        ..event(SyncKind::Membership, conversation, record.last_seq)(pts)
                    })?;
                }
            }
        }
        Mutation::RemoveMembers { member_ids } => {
            let record = require_conversation(tx, tenant, conversation)?;
            let current = tx.members(tenant, conversation)?;
            for user in member_ids {
                tx.set_member(tenant, conversation, user, None);
            }
            if events {
                for user in &current {
                    tx.event(tenant, user, |pts| SyncRecord {
                        user_ids: member_ids.clone(),
                        joined: false,
                        ..event(SyncKind::Membership, conversation, record.last_seq)(pts)
                    })?;
                }
            }
        }
        Mutation::Send { message } => {
            let mut record = require_conversation(tx, tenant, conversation)?;
            if message.seq != record.last_seq + 1 {
                return Err(CellError::Storage(format!(
                    "message {} does not follow seq {} of {tenant}/{conversation}",
                    message.seq, record.last_seq
                )));
            }
            record.last_seq = message.seq;
            let audience = audience(tx, tenant, conversation, message)?;
            tx.put(Space::Conversations, conversation_key, &record);
            if message.receiver_ids.is_empty() {
                tx.put(
                    Space::Messages,
                    keys::message(tenant, conversation, message.seq),
                    message,
                );
            } else {
                // Private: a copy in the inbox of the sender and of each receiver.
                for user in &audience {
                    let key = keys::inbox(tenant, user, conversation, message.seq);
                    let mut inbox: InboxRecord = tx.get(Space::Inbox, &key)?.unwrap_or_default();
                    inbox.private = Some(message.clone());
                    tx.put(Space::Inbox, key, &inbox);
                }
            }
            let answer = IdempotencyRecord {
                message_id: message.message_id.clone(),
                seq: message.seq,
                server_time_ms: message.server_time_ms,
            };
            tx.put(
                Space::Idempotency,
                keys::idempotency(
                    tenant,
                    conversation,
                    &message.sender_id,
                    &message.client_msg_id,
                ),
                &answer,
            );
            if events {
                let shared = std::sync::Arc::new(message.clone());
                for user in &audience {
                    tx.event_about(
                        tenant,
                        user,
                        event(SyncKind::NewMessage, conversation, message.seq),
                        Some(&shared),
                    )?;
                }
            }
            metrics::counter!("cellplane_cell_messages_stored_total").increment(1);
        }
        Mutation::MarkRead { user_id, seq } => {
            let key = keys::member(tenant, conversation, user_id);
            let mut member: MemberRecord = tx.get(Space::Members, &key)?.ok_or_else(|| {
                CellError::Storage(format!(
                    "{user_id:?} is not a member of {tenant}/{conversation}"
                ))
            })?;
            member.read_seq = member.read_seq.max(*seq);
            tx.put(Space::Members, key, &member);
            if events {
                tx.event(tenant, user_id, |pts| SyncRecord {
                    user_ids: vec![user_id.clone()],
                    ..event(SyncKind::Read, conversation, *seq)(pts)
                })?;
            }
        }
        Mutation::Recall { user_id, seq } => {
            let Some(mut message) = find_message(tx, tenant, conversation, user_id, *seq)? else {
                return Err(CellError::Storage(format!(
                    "no message {seq} in {tenant}/{conversation}"
                )));
            };
            message.recalled = true;
            message.body.clear();
            let audience = audience(tx, tenant, conversation, &message)?;
            if message.receiver_ids.is_empty() {
                tx.put(
                    Space::Messages,
                    keys::message(tenant, conversation, *seq),
                    &message,
                );
            } else {
                for user in &audience {
                    let key = keys::inbox(tenant, user, conversation, *seq);
                    let mut inbox: InboxRecord = tx.get(Space::Inbox, &key)?.unwrap_or_default();
                    inbox.private = Some(message.clone());
                    tx.put(Space::Inbox, key, &inbox);
                }
            }
            if events {
                for user in &audience {
                    tx.event(tenant, user, |pts| SyncRecord {
                        user_ids: vec![user_id.clone()],
                        ..event(SyncKind::Recall, conversation, *seq)(pts)
                    })?;
                }
            }
        }
        Mutation::DeleteForMe { user_id, seq } => {
            let key = keys::inbox(tenant, user_id, conversation, *seq);
            let mut inbox: InboxRecord = tx.get(Space::Inbox, &key)?.unwrap_or_default();
            inbox.deleted = true;
            tx.put(Space::Inbox, key, &inbox);
            if events {
                tx.event(
                    tenant,
                    user_id,
                    event(SyncKind::DeleteForMe, conversation, *seq),
                )?;
            }
        }
        Mutation::Purge { excluded } => {
            let excluded: Excluded = excluded.iter().cloned().collect();
            tx.purge(tenant, conversation, &excluded, None, None)?;
        }
        Mutation::Fence { grant } => match grant {
            Some(grant) => tx.put(Space::Grants, keys::grant(tenant, conversation), grant),
            None => tx.delete(Space::Grants, keys::grant(tenant, conversation)),
        },
        Mutation::ImportRows { rows } => {
            for (name, key, value) in rows {
                super::foreign::check_row(name, key, value)?;
            }
            for (name, key, value) in rows {
                let space = space_named(name).ok_or_else(|| {
                    CellError::Storage(format!("imported rows name no keyspace {name:?}"))
                })?;
                tx.put_raw(space, key.clone(), value.clone());
            }
        }
    }
    tx.log(tenant, conversation, mutation);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::fencing::Grant;
    use crate::store::memory::Memory;

    /// A cell's store, its grants and one open batch, as the writer has them.
    struct Batch {
        _dir: tempfile::TempDir,
        tx: Tx,
        grants: Grants,
        limits: Limits,
    }

    impl Batch {
        fn new(grant: Grant) -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path(), 1_000).expect("store");
            Self {
                tx: Tx::new(store, 0, Memory::default()),
                grants: Grants::from([(("t".to_string(), String::new()), grant)]),
                limits: Limits::default(),
                _dir: dir,
            }
        }

        fn decide(&self, epoch: u64, request: WriteRequest) -> Result<Decision, CellError> {
            let decider = Decider {
                cell_id: "cell-a",
                limits: &self.limits,
                grants: &self.grants,
            };
            decider.decide(&self.tx, "t", "g", epoch, request)
        }

        /// Decides at epoch 1 and applies what was decided, as the writer does.
        fn write(&mut self, request: WriteRequest) -> Result<Decision, CellError> {
            let decision = self.decide(1, request)?;
            if let Decision::Apply(mutation) = &decision {
                apply_mutation(&mut self.tx, "t", "g", mutation.clone(), true)?;
            }
            Ok(decision)
        }
    }

    fn group(members: &[&str]) -> WriteRequest {
        WriteRequest::CreateConversation {
            kind: Kind::Group,
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn send(sender: &str, id: &str, body: &[u8]) -> WriteRequest {
        WriteRequest::Send {
            sender: sender.into(),
            client_msg_id: id.into(),
            body: body.to_vec(),
            receivers: Vec::new(),
        }
    }

    fn seq(decision: Decision) -> u64 {
        match decision {
            Decision::Apply(Mutation::Send { message }) => message.seq,
            Decision::Retry(first) => first.seq,
            other => panic!("not a send: {other:?}"),
        }
    }

    #[test]
    fn sends_take_the_next_seq_and_a_retry_gets_the_first_answer() {
        let mut batch = Batch::new(Grant::Owned { epoch: 1 });
        batch.write(group(&["alice", "bob"])).expect("create");
        assert_eq!(
            seq(batch.write(send("alice", "m1", b"hi")).expect("send")),
            1
        );
        assert_eq!(seq(batch.write(send("bob", "m1", b"yo")).expect("send")), 2);
        let retry = batch.write(send("alice", "m1", b"hi")).expect("retry");
        assert!(
            matches!(retry, Decision::Retry(ref first) if first.seq == 1),
            "{retry:?}"
        );
        let reused = batch
            .write(send("alice", "m1", b"other"))
            .expect_err("reused id");
        assert!(matches!(reused, CellError::AlreadyExists(_)), "{reused:?}");
        assert_eq!(
            seq(batch.write(send("alice", "m2", b"hi")).expect("send")),
            3
        );
    }

    #[test]
    fn only_members_send_and_receive() {
        let mut batch = Batch::new(Grant::Owned { epoch: 1 });
        batch.write(group(&["alice", "bob"])).expect("create");
        let stranger = batch
            .write(send("carol", "m1", b"hi"))
            .expect_err("not a member");
        assert!(stranger.to_string().starts_with("sender_id"), "{stranger}");
        let private = WriteRequest::Send {
            sender: "alice".into(),
            client_msg_id: "m2".into(),
            body: b"psst".to_vec(),
            receivers: vec!["bob".into(), "carol".into()],
        };
        let refused = batch.write(private).expect_err("carol is no member");
        assert!(
            refused.to_string().starts_with("receiver_ids[1]"),
            "{refused}"
        );
        let missing = batch.decide(1, send("alice", "m3", b"hi"));
        assert!(missing.is_ok(), "the group exists in the batch");
    }

    #[test]
    fn the_route_epoch_is_checked_before_anything_is_decided() {
        let batch = Batch::new(Grant::Owned { epoch: 3 });
        for epoch in [2, 4] {
            let err = batch
                .decide(epoch, group(&["alice"]))
                .expect_err("wrong epoch");
            assert!(matches!(err, CellError::WrongCell { .. }), "{err:?}");
            assert!(!err.retryable());
        }
        let frozen = Batch::new(Grant::Frozen { epoch: 1 });
        let err = frozen.decide(1, group(&["alice"])).expect_err("frozen");
        assert!(err.retryable(), "{err:?}");
    }

    #[test]
    fn repeated_changes_decide_to_change_nothing() {
        let mut batch = Batch::new(Grant::Owned { epoch: 1 });
        batch.write(group(&["alice", "bob"])).expect("create");
        batch.write(send("alice", "m1", b"hi")).expect("send");
        let read = || WriteRequest::MarkRead {
            user: "bob".into(),
            seq: 1,
        };
        assert!(matches!(batch.write(read()), Ok(Decision::Apply(_))));
        assert!(matches!(batch.write(read()), Ok(Decision::Unchanged)));
        let ahead = batch.write(WriteRequest::MarkRead {
            user: "bob".into(),
            seq: 2,
        });
        assert!(matches!(ahead, Err(CellError::Invalid { ref field, .. }) if field == "seq"));
        let recall = |user: &str| WriteRequest::Recall {
            user: user.into(),
            seq: 1,
        };
        assert!(matches!(
            batch.write(recall("bob")),
            Err(CellError::PermissionDenied(_))
        ));
        assert!(matches!(
            batch.write(recall("alice")),
            Ok(Decision::Apply(_))
        ));
        assert!(matches!(
            batch.write(recall("alice")),
            Ok(Decision::Unchanged)
        ));
        let again = WriteRequest::AddMembers {
            members: vec!["alice".into()],
        };
        assert!(matches!(batch.write(again), Ok(Decision::Unchanged)));
        let delete = || WriteRequest::DeleteForMe {
            user: "bob".into(),
            seq: 1,
        };
        assert!(matches!(batch.write(delete()), Ok(Decision::Apply(_))));
        assert!(matches!(batch.write(delete()), Ok(Decision::Unchanged)));
        let exists = batch.write(group(&["alice"])).expect_err("exists");
        assert!(matches!(exists, CellError::AlreadyExists(_)));
    }
}
