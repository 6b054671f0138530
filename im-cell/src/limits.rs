//! Every limit of a cell, named once, with its default. Each is enforced where requests enter and
//! tested at the limit and one past it.

use serde::{Deserialize, Serialize};

/// Limits a cell enforces; the defaults suit an enterprise IM deployment and can be overridden
/// in the cell's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest message body.
    pub max_body_bytes: usize,
    /// Most members of a group.
    pub max_group_members: usize,
    /// Most members added or removed in one call.
    pub max_members_per_call: usize,
    /// Most receivers of a private message.
    pub max_receivers: usize,
    /// Largest page of history.
    pub max_history_page: u32,
    /// A device further behind than this many events gets one REBASE instead of the backlog;
    /// events twice this far behind their user's newest are dropped (`store::retention`).
    pub rebase_backlog_events: u64,
    /// Most requests committed with one fsync.
    pub max_ops_per_commit: usize,
    /// Sends per second into one conversation (a burst of this many passes at once).
    pub sends_per_conversation_per_sec: u32,
    /// Sends per second by one sender.
    pub sends_per_sender_per_sec: u32,
    /// Sends per second from one client type ("ios", "web", ...).
    pub sends_per_client_type_per_sec: u32,
    /// Sends per second from one calling app or integration.
    pub sends_per_app_per_sec: u32,
    /// Longest a LOW-priority send over a rate limit waits for its turn before it is refused.
    pub low_priority_max_wait_ms: u64,
    /// Most LOW-priority sends waiting at once; past it they are refused like NORMAL ones.
    pub low_priority_max_waiting: usize,
    /// Largest request message Messaging and Sync decode.
    pub max_request_bytes: usize,
    /// Most streams (calls) one HTTP/2 connection may have open at once; a client's next call
    /// waits for one to end.
    pub max_streams_per_connection: u32,
    /// Most `Sync.Subscribe` streams (devices online) the cell serves at once.
    pub max_subscriptions: usize,
    /// Most of them on one connection (an IM front end multiplexes its devices' streams).
    pub max_subscriptions_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_group_members: 10_000,
            max_members_per_call: 1_000,
            max_receivers: 100,
            max_history_page: 200,
            rebase_backlog_events: 1_000,
            max_ops_per_commit: 1_024,
            sends_per_conversation_per_sec: 500,
            sends_per_sender_per_sec: 100,
            sends_per_client_type_per_sec: 100_000,
            sends_per_app_per_sec: 50_000,
            low_priority_max_wait_ms: 5_000,
            low_priority_max_waiting: 10_000,
            max_request_bytes: cellplane_api::limits::MAX_REQUEST_BYTES,
            max_streams_per_connection: cellplane_api::limits::MAX_STREAMS_PER_CONNECTION,
            max_subscriptions: 100_000,
            max_subscriptions_per_connection: 1_000,
        }
    }
}
