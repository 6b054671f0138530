//! The primary's side: the `Replication` service streams the cell log to the standbys that
//! pull it, each from its own position, so a slow standby slows nobody but itself.

use std::pin::Pin;
use tokio::time::Instant;

use cellplane_api::ids::validate_id;
use cellplane_api::proto::cell as pb;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::ReplicationState;
use crate::error::CellError;
use crate::store::Store;
use crate::store::export::{EXPORT_CHUNK_BYTES, EXPORT_CHUNK_ITEMS, ExportView};

pub type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicationBatch, Status>> + Send>>;

/// Records every durable commit of the cell log in `state` (for standbys' lag in time) until
/// the writer stops.
pub fn track_commits(mut commits: watch::Receiver<u64>, state: ReplicationState) {
    tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            let lsn = *commits.borrow_and_update();
            state.committed(lsn, Instant::now());
        }
    });
}

pub struct ReplicationService {
    store: Store,
    commits: watch::Receiver<u64>,
    state: ReplicationState,
    /// Turns true when the cell stops: streams end so the server can drain.
    closing: watch::Receiver<bool>,
}

impl ReplicationService {
    pub fn new(
        store: Store,
        commits: watch::Receiver<u64>,
        state: ReplicationState,
        closing: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            commits,
            state,
            closing,
        }
    }
}

type Out = mpsc::Sender<Result<pb::ReplicationBatch, Status>>;

/// Whether a standby at `applied` must bootstrap from a snapshot: it has nothing while the
/// primary has a log, or it is behind the oldest record the primary keeps.
fn needs_bootstrap(applied: u64, first_kept: u64, last: u64) -> bool {
    (applied == 0 && last > 0) || (first_kept > 0 && applied + 1 < first_kept)
}

/// Sends a consistent snapshot of every exported row; returns the LSN it covers, or `None`
/// when the standby went away.
fn send_snapshot(
    store: &Store,
    emit: &mut dyn FnMut(Result<pb::ReplicationBatch, Status>) -> bool,
) -> Result<Option<u64>, CellError> {
    let view = ExportView::open(store)?;
    let mut batch = pb::ReplicationBatch {
        snapshot_begin: true,
        ..Default::default()
    };
    let mut bytes = 0usize;
    let mut gone = false;
    view.all_rows(|space, key, value| {
        bytes += key.len() + value.len();
        batch.snapshot_rows.push(pb::ExportRow {
            space: space.to_string(),
            key,
            value,
        });
        if batch.snapshot_rows.len() >= EXPORT_CHUNK_ITEMS || bytes >= EXPORT_CHUNK_BYTES {
            bytes = 0;
            let full = std::mem::take(&mut batch);
            gone = !emit(Ok(full));
        }
        !gone
    })?;
    if gone {
        return Ok(None);
    }
    batch.snapshot_done = true;
    batch.through_lsn = view.through_lsn;
    batch.primary_lsn = view.through_lsn;
    if !emit(Ok(batch)) {
        return Ok(None);
    }
    Ok(Some(view.through_lsn))
}

/// Streams the log to one standby from `applied` on, as it becomes durable, until the
/// standby goes away.
async fn stream_log(
    store: Store,
    mut commits: watch::Receiver<u64>,
    state: ReplicationState,
    standby: String,
    applied: u64,
    out: Out,
) -> Result<(), CellError> {
    let mut from = applied;
    if !needs_bootstrap(applied, store.first_lsn()?, store.last_lsn()?) {
        // The standby learns it follows from the first batch it applies; with nothing to copy
        // and nothing new to stream, that is this one, naming where the primary stands.
        let opening = pb::ReplicationBatch {
            through_lsn: from,
            primary_lsn: *commits.borrow(),
            ..Default::default()
        };
        if out.send(Ok(opening)).await.is_err() {
            return Ok(());
        }
    } else {
        state.follower_bootstraps(&standby);
        tracing::info!(%standby, applied, "standby bootstraps from a snapshot");
        let snapshot_store = store.clone();
        let sent = cellplane_api::simulation::produce(out.clone(), move |emit| {
            send_snapshot(&snapshot_store, emit)
        })
        .await
        .map_err(|e| CellError::Storage(format!("snapshot task: {e}")))??;
        match sent {
            Some(lsn) => from = lsn,
            None => return Ok(()),
        }
    }
    loop {
        let durable = *commits.borrow_and_update();
        if durable > from {
            let records = store.log_after(from, durable, EXPORT_CHUNK_ITEMS, EXPORT_CHUNK_BYTES)?;
            let Some(&(last, _)) = records.last() else {
                return Err(CellError::Storage(format!(
                    "the cell log has no record after LSN {from} though {durable} is durable"
                )));
            };
            if records[0].0 != from + 1 {
                // The records the standby needs are gone: it starts over from a snapshot on
                // its next connection.
                return Err(CellError::FailedPrecondition(format!(
                    "the standby is at LSN {from} and the log now starts at {}",
                    records[0].0
                )));
            }
            let batch = pb::ReplicationBatch {
                log_records: records.into_iter().map(|(_, bytes)| bytes).collect(),
                through_lsn: last,
                primary_lsn: durable,
                ..Default::default()
            };
            if out.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
            from = last;
            continue;
        }
        tokio::select! {
            changed = commits.changed() => if changed.is_err() { return Ok(()) },
            () = out.closed() => return Ok(()),
        }
    }
}

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type FollowStream = BatchStream;

    async fn follow(
        &self,
        request: Request<Streaming<pb::StandbyMessage>>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(first) = inbound.message().await? else {
            return Err(Status::invalid_argument(
                "standby_cell_id: the stream must open with the standby's position",
            ));
        };
        validate_id("standby_cell_id", &first.standby_cell_id)?;
        let standby = first.standby_cell_id;
        self.state.follower_connected(&standby, first.applied_lsn);
        tracing::info!(%standby, applied = first.applied_lsn, "standby connected");
        let (out, batches) = mpsc::channel(4);
        let acks_state = self.state.clone();
        let acking = standby.clone();
        tokio::spawn(async move {
            while let Ok(Some(ack)) = inbound.message().await {
                acks_state.follower_acked(&acking, ack.applied_lsn);
            }
            acks_state.follower_gone(&acking);
            tracing::info!(standby = %acking, "standby disconnected");
        });
        let (store, commits, state) =
            (self.store.clone(), self.commits.clone(), self.state.clone());
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            let errors = out.clone();
            let streamed = tokio::select! {
                streamed = stream_log(store, commits, state, standby, first.applied_lsn, out) => streamed,
                _ = closing.wait_for(|closing| *closing) => {
                    Err(CellError::Storage("the primary is stopping".into()))
                }
            };
            if let Err(err) = streamed {
                let _ = errors.send(Err(err.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(batches))))
    }
}

#[cfg(test)]
mod tests {
    use super::needs_bootstrap;

    #[test]
    fn a_standby_bootstraps_when_empty_or_behind_what_is_kept() {
        assert!(!needs_bootstrap(0, 0, 0), "nothing to copy yet");
        assert!(
            needs_bootstrap(0, 1, 10),
            "empty standby, primary has a log"
        );
        assert!(!needs_bootstrap(4, 1, 10), "follows from 5");
        assert!(!needs_bootstrap(4, 5, 10), "5 is still kept");
        assert!(needs_bootstrap(3, 5, 10), "4 is gone");
        assert!(!needs_bootstrap(10, 1, 10), "up to date");
    }
}
