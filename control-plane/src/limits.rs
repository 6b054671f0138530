//! Every limit of a control-plane node, named once. Each is enforced where requests enter and
//! tested at the limit and one past it. The shared ones (ids, endpoints, batches, pages) are in
//! [`cellplane_api::limits`]; those here are the control plane's own.
//!
//! The limits a node's config may change are in [`Limits`] (`[limits]`, or `--limit
//! name=value`). The ones the replicated state applies are constants: every replica must
//! refuse alike, whatever its config says.

use serde::{Deserialize, Serialize};

/// What one node serves at most; `[limits]` in its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request message Routing and Control decode.
    pub max_request_bytes: usize,
    /// Most streams (calls) one HTTP/2 connection may have open at once; a client's next
    /// call waits for one to end.
    pub max_streams_per_connection: u32,
    /// Most `Watch` and `WatchMigration` streams the node serves at once.
    pub max_watches: usize,
    /// Most of them on one connection.
    pub max_watches_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: cellplane_api::limits::MAX_REQUEST_BYTES,
            max_streams_per_connection: cellplane_api::limits::MAX_STREAMS_PER_CONNECTION,
            max_watches: 10_000,
            max_watches_per_connection: 1_000,
        }
    }
}

impl Limits {
    /// Each limit must let at least one through.
    pub fn validate(&self) -> Result<(), cellplane_api::ids::ConfigError> {
        let positive = [
            ("limits.max_request_bytes", self.max_request_bytes),
            (
                "limits.max_streams_per_connection",
                self.max_streams_per_connection as usize,
            ),
            ("limits.max_watches", self.max_watches),
            (
                "limits.max_watches_per_connection",
                self.max_watches_per_connection,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(cellplane_api::ids::ConfigError::new(
                    field,
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

/// Migrations running at once (not yet finished, failed or cancelled), cluster-wide: a drain
/// or a burst of tier changes queues behind it rather than copying everything at once.
pub const MAX_MIGRATIONS_IN_FLIGHT: usize = 1_000;

/// Failovers unfinished at once (not yet DONE or rolled back), cluster-wide.
pub const MAX_FAILOVERS_IN_FLIGHT: usize = 256;

/// Finished migrations the state keeps; the oldest are dropped.
pub const MAX_FINISHED_MIGRATIONS: usize = 10_000;

/// Finished failovers the state keeps; the oldest are dropped.
pub const MAX_FINISHED_FAILOVERS: usize = 1_000;

/// Route events kept for watches to resume from.
pub const MAX_ROUTE_HISTORY: usize = 100_000;

/// Most cells one `RenewLeases` may name.
pub const MAX_CELLS_PER_RENEWAL: usize = 10_000;

/// Longest failover reason, in bytes.
pub const MAX_REASON_BYTES: usize = 256;

/// Most entries the audit log may be told to keep: every node holds them all in memory.
pub const MAX_AUDIT_ENTRIES: u32 = 1_000_000;

/// Entries the audit log keeps by default.
pub const DEFAULT_AUDIT_ENTRIES: u32 = 10_000;

/// Most audit entries one write (and one `RecordAudit`) carries.
pub const MAX_AUDIT_ENTRIES_PER_WRITE: usize = 512;

/// Most bytes of a request's text kept in an audit entry; longer ones are cut, marked `…`.
pub const MAX_AUDIT_REQUEST_TEXT: usize = 1_024;

/// Most bytes of a refusal's message kept in an audit entry.
pub const MAX_AUDIT_MESSAGE_TEXT: usize = 512;

/// Largest Raft message (an append of many entries, a snapshot chunk) peers exchange.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 << 20;

/// The operator's first back-off after a failed reconcile; it doubles with each failure in a
/// row, up to [`OPERATOR_BACKOFF_MAX_MS`].
pub const OPERATOR_BACKOFF_FIRST_MS: u64 = 200;

/// The operator's longest back-off: a control plane that comes back is noticed within it.
pub const OPERATOR_BACKOFF_MAX_MS: u64 = 30_000;

/// How often the operator looks again at a failover under way (or a migration whose watch
/// failed), to mirror its progress.
pub const OPERATOR_PROGRESS_POLL_MS: u64 = 250;

/// The longest a migration's reconcile waits on its watch for the next change before looking
/// again anyway; a deletion of its object waits at most this long too.
pub const OPERATOR_PROGRESS_WAIT_MS: u64 = 2_000;
