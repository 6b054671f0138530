//! Writes audit entries: one write at a time per node, carrying every entry that arrived while
//! the previous one was in flight, so a burst of admin calls costs a few writes, not one each.
//! On a Raft follower the write goes to the leader through `Control.RecordAudit`.
//!
//! A call's answer does not wait for its entry's write: waiting would add a commit round to
//! every admin call and, measured with `MoveRoute` at 1 to 256 clients, halved their
//! throughput. `ListAudit` flushes the node's own queue first, so a caller reads its own calls
//! through the node that took them.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::control_client::ControlClient;
use tokio::sync::{mpsc, oneshot};

use super::entry::AuditEntry;
use crate::limits::MAX_AUDIT_ENTRIES_PER_WRITE;
use crate::node::forwarded;
use crate::state::command::Command;
use crate::store::{RouteStore, Routed};

/// Entries waiting for a write at most; calls past it wait for room.
const QUEUE: usize = 4_096;

enum Pending {
    Entry(AuditEntry),
    /// Answered once every entry queued before it was written (or its write failed).
    Flush(oneshot::Sender<()>),
}

/// Hands entries to the node's writer.
#[derive(Clone)]
pub struct Auditor {
    queue: mpsc::Sender<Pending>,
}

impl Auditor {
    /// Starts the writer of a node whose store is `store`, keeping `keep` entries.
    pub fn start(store: Arc<dyn RouteStore>, keep: u32) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, keep, pending));
        Self { queue }
    }

    /// Queues `entry` for the next write. Waits only while the queue is full: the log slows
    /// admin calls down rather than drop their entries.
    pub async fn record(&self, entry: AuditEntry) {
        let _ = self.queue.send(Pending::Entry(entry)).await;
    }

    /// Returns once every entry queued before the call is written, so a node's own calls are
    /// in the log it reads.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.queue.send(Pending::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn run(store: Arc<dyn RouteStore>, keep: u32, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::new();
    while pending
        .recv_many(&mut batch, MAX_AUDIT_ENTRIES_PER_WRITE)
        .await
        > 0
    {
        let mut entries = Vec::with_capacity(batch.len());
        let mut flushed = Vec::new();
        for item in batch.drain(..) {
            match item {
                Pending::Entry(entry) => entries.push(entry),
                Pending::Flush(done) => flushed.push(done),
            }
        }
        if !entries.is_empty() {
            let count = entries.len();
            if let Err(error) = write(store.as_ref(), entries, keep).await {
                tracing::warn!(entries = count, "audit entries lost: {error}");
                metrics::counter!("cellplane_audit_lost_total").increment(count as u64);
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// One write: here, or on the leader.
async fn write(store: &dyn RouteStore, entries: Vec<AuditEntry>, keep: u32) -> Result<(), String> {
    let protos: Vec<pb::AuditEntry> = entries.iter().map(|e| e.to_proto((0, 0))).collect();
    match store
        .execute(Command::Audit { entries, keep }, false)
        .await
        .map_err(|e| e.to_string())?
    {
        Routed::Here(_) => Ok(()),
        Routed::Forward(channel) => ControlClient::new(channel)
            .record_audit(forwarded(pb::RecordAuditRequest { entries: protos }))
            .await
            .map(|_| ())
            .map_err(|status| format!("on the leader: {}", status.message())),
    }
}
