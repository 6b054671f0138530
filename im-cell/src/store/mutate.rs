//! Writes in two steps. [`decide`] checks a request against the state (ownership, existence,
//! membership, idempotency) and turns it into a [`Mutation`] carrying everything the cell
//! assigned (seq, message id, time). [`apply_mutation`] writes a mutation's rows, its sync
//! events and its cell-log entry. Live requests take both steps; an import or a log replay takes
//! only the second, so there is one path for the same data.

use super::export::Excluded;
use super::fencing::{Grants, check_owner};
use super::records::{
    ConversationRecord, IdempotencyRecord, InboxRecord, Kind, MemberRecord, MessageRecord,
    Mutation, SyncKind, SyncRecord,
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
    match request {
        WriteRequest::CreateConversation { kind, members } => {
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
        WriteRequest::AddMembers { members } => {
            let record = require_conversation(tx, tenant, conversation)?;
            if record.kind == Kind::Single {
                return Err(CellError::invalid(
                    "conversation_id",
                    "a single chat has fixed members; create a group",
                ));
            }
            let current = tx.members(tenant, conversation)?;
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
        WriteRequest::RemoveMembers { members } => {
            let record = require_conversation(tx, tenant, conversation)?;
            if record.kind == Kind::Single {
                return Err(CellError::invalid(
                    "conversation_id",
                    "a single chat has fixed members",
                ));
            }
            let current = tx.members(tenant, conversation)?;
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
        WriteRequest::Send {
            sender,
            client_msg_id,
            body,
            receivers,
        } => {
            let idempotency_key = keys::idempotency(tenant, conversation, &sender, &client_msg_id);
            if let Some(first) =
                tx.get::<IdempotencyRecord>(Space::Idempotency, &idempotency_key)?
            {
                let stored = find_message(tx, tenant, conversation, &sender, first.seq)?;
                let same = stored
                    .is_some_and(|m| m.recalled || (m.body == body && m.receiver_ids == receivers));
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
        WriteRequest::MarkRead { user, seq } => {
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
        WriteRequest::Recall { user, seq } => {
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
        WriteRequest::DeleteForMe { user, seq } => {
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
    }
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
    }
    tx.log(tenant, conversation, mutation);
    Ok(())
}
