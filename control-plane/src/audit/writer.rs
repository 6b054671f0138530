//! Writes audit entries: one write at a time per node, carrying every entry that arrived while
//! the previous one was in flight, so a burst of admin calls costs a few writes, not one each.
//! On a Raft follower the write goes to the leader through `Control.RecordAudit`.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::control_client::ControlClient;
use tokio::sync::{mpsc, oneshot};

use super::entry::AuditEntry;
use crate::node::forwarded;
use crate::state::command::Command;
use crate::store::{RouteStore, Routed};

/// Most entries one write carries.
pub const MAX_ENTRIES_PER_WRITE: usize = 512;

/// Entries waiting for a write at most; calls past it wait for room.
const QUEUE: usize = 4_096;

/// Default size of the log: entries kept before the oldest are dropped.
pub const DEFAULT_KEEP: u32 = 10_000;

type Pending = (AuditEntry, oneshot::Sender<()>);

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

    /// Records `entry`, returning once it is written or its write failed (which is logged).
    pub async fn record(&self, entry: AuditEntry) {
        let (done, written) = oneshot::channel();
        if self.queue.send((entry, done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn run(store: Arc<dyn RouteStore>, keep: u32, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::new();
    while pending.recv_many(&mut batch, MAX_ENTRIES_PER_WRITE).await > 0 {
        let entries: Vec<AuditEntry> = batch.iter().map(|(entry, _)| entry.clone()).collect();
        if let Err(error) = write(store.as_ref(), entries, keep).await {
            tracing::warn!(entries = batch.len(), "audit entries lost: {error}");
            metrics::counter!("cellplane_audit_lost_total").increment(batch.len() as u64);
        }
        for (_, done) in batch.drain(..) {
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
