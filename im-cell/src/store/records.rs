//! What the store keeps, encoded with postcard.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Single,
    Group,
}

/// A conversation's own row: written on create, membership change and every send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub kind: Kind,
    pub created_ms: u64,
    /// Seq of the newest message; the next send takes `last_seq + 1`.
    pub last_seq: u64,
}

/// A member of a conversation. Per-user state of a conversation lives here, with the
/// conversation, so one account writing to very many users does not concentrate writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub joined_ms: u64,
    /// The newest seq the member has read.
    pub read_seq: u64,
}

/// One message. A normal message is stored once per conversation; a private one is stored in the
/// inbox of its sender and each receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub message_id: String,
    pub seq: u64,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: Vec<u8>,
    pub server_time_ms: u64,
    /// Empty for a message to every member.
    pub receiver_ids: Vec<String>,
    pub recalled: bool,
}

/// A user's own state of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRecord {
    /// A private message to this user (or from them).
    pub private: Option<MessageRecord>,
    /// The user deleted the message for themselves.
    pub deleted: bool,
}

/// The first answer to a send, kept so a retry returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub message_id: String,
    pub seq: u64,
    pub server_time_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncKind {
    NewMessage,
    Read,
    Recall,
    Membership,
    DeleteForMe,
    /// History the user's devices hold of the conversation changed under them (a failed cell's
    /// messages merged back at new seqs): fetch it again.
    Rebase,
}

/// One event in a user's sync queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub pts: u64,
    pub kind: SyncKind,
    pub conversation_id: String,
    pub seq: u64,
    /// The new message, on events pushed to online devices and read back from the queue; the
    /// stored event leaves it out. Shared, so a group's hundreds of pushes copy no message.
    pub message: Option<Arc<MessageRecord>>,
    pub user_ids: Vec<String>,
    pub joined: bool,
}

/// The cell's grant for a route key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub epoch: u64,
    pub frozen: bool,
    /// Set when the key was revoked: where it went, so refused writers learn the new owner.
    pub moved_to: Option<(String, u64)>,
    /// A conversation entry made from the tenant's grant so that one conversation can be frozen
    /// alone (it is about to move away from its tenant's cell). Unfreezing removes it, so the
    /// conversation follows the tenant's grant again, including later epochs.
    pub inherited: bool,
}

/// A standby's position in its primary's cell log, written in the same batch as what it
/// applied, so it is exactly what the standby holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The newest primary LSN applied.
    pub applied_lsn: u64,
    /// A bootstrap began and has not finished: the rows are partial, and the standby starts
    /// over from nothing.
    pub bootstrapping: bool,
}

/// A standby's promotion to primary, kept so a restart never makes it a standby again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionRecord {
    /// The primary it followed.
    pub from: String,
    /// The newest primary LSN it had applied.
    pub applied_lsn: u64,
}

/// One entry of the cell log: the mutation with everything the cell assigned to it, so
/// replaying the log reproduces the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub lsn: u64,
    pub tenant_id: String,
    pub conversation_id: String,
    pub mutation: Mutation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    CreateConversation {
        kind: Kind,
        member_ids: Vec<String>,
        created_ms: u64,
    },
    AddMembers {
        member_ids: Vec<String>,
        at_ms: u64,
    },
    RemoveMembers {
        member_ids: Vec<String>,
    },
    Send {
        message: MessageRecord,
    },
    MarkRead {
        user_id: String,
        seq: u64,
    },
    /// The sender recalled a message.
    Recall {
        user_id: String,
        seq: u64,
    },
    DeleteForMe {
        user_id: String,
        seq: u64,
    },
    /// The key moved to another cell and its rows here are dropped; a tenant keeps the
    /// conversations that have route keys of their own on this cell.
    Purge {
        excluded: Vec<String>,
    },
    /// Rows of another cell's snapshot of the key, taken in by an import: (keyspace name, key,
    /// value). Logged like any change, so the cell log alone rebuilds a key that moved in
    /// (a replay, a standby).
    ImportRows {
        rows: Vec<(String, Vec<u8>, Vec<u8>)>,
    },
    /// The cell's grant of the key changed (`None`: removed). Logged so standbys hold their
    /// primary's grants and freezes; left out of exports, because a key's grant belongs to the
    /// cell that holds it.
    Fence {
        grant: Option<GrantRecord>,
    },
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain records into a Vec cannot fail: postcard fails only on unsupported serde
    // shapes, which none of these use.
    postcard::to_stdvec(value).expect("records always encode")
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
