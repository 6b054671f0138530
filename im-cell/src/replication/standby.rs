//! The standby's side: follows its primary's cell log, applying each batch through the writer
//! durably before it acknowledges the LSN. It reconnects after any failure, from the position
//! it made durable; a bootstrap cut short starts over from nothing.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use cellplane_api::proto::cell as pb;
use cellplane_api::proto::cell::replication_client::ReplicationClient;
use cellplane_api::tls::Tls;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::ReplicationState;
use super::role::Role;
use crate::config::StandbyConfig;
use crate::error::CellError;
use crate::store::Store;
use crate::store::export::replicated_space_named;
use crate::store::records::{LogRecord, decode};
use crate::store::writer::{Op, Outcome, Replicated, Writer};

/// Batches applied at once: queued in the writer while earlier ones commit.
const IN_FLIGHT: usize = 32;

/// A batch queued in the writer.
struct Applying {
    outcome: Pin<Box<dyn Future<Output = Result<Outcome, CellError>> + Send>>,
    primary_lsn: u64,
    rows: u64,
    begin: bool,
}

/// Pause before reconnecting after a failure; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The primary a standby follows, and how it reaches it.
#[derive(Debug, Clone)]
pub struct Primary {
    pub config: StandbyConfig,
    /// mTLS to the primary, or plaintext.
    pub tls: Tls,
}

/// Follows the primary until `shutdown` turns true or the cell is promoted.
pub async fn run(
    cell_id: String,
    primary: Primary,
    role: Role,
    store: Store,
    writer: Writer,
    state: ReplicationState,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let followed = tokio::select! {
            result = follow(&cell_id, &primary, &store, &writer, &state) => result,
            _ = shutdown.changed() => return,
            () = role.promoted() => {
                state.update_replica(|r| r.connected = false);
                tracing::info!(primary = %primary.config.primary_cell_id, "promoted: no longer following");
                return;
            }
        };
        state.update_replica(|r| r.connected = false);
        match followed {
            // It streamed for a while: the next failure starts the back-off over.
            Ok(()) => backoff = FIRST_BACKOFF,
            Err(status) => {
                tracing::warn!(primary = %primary.config.primary_cell_id, %status, "following the primary failed; retrying");
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Decodes a batch into what the writer applies.
fn decode_batch(batch: pb::ReplicationBatch) -> Result<Replicated, CellError> {
    let rows = batch
        .snapshot_rows
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let space = replicated_space_named(&row.space).ok_or_else(|| {
                CellError::invalid(
                    format!("snapshot_rows[{i}].space"),
                    format!("{:?} is not a replicated keyspace", row.space),
                )
            })?;
            Ok((space, row.key, row.value))
        })
        .collect::<Result<Vec<_>, CellError>>()?;
    let records = batch
        .log_records
        .iter()
        .map(|bytes| decode::<LogRecord>(bytes).map_err(CellError::from))
        .collect::<Result<Vec<_>, CellError>>()?;
    Ok(Replicated {
        begin: batch.snapshot_begin,
        rows,
        records,
        done: batch.snapshot_done,
        through_lsn: batch.through_lsn,
    })
}

/// One connection: returns `Ok` when the primary ended the stream after it had streamed.
async fn follow(
    cell_id: &str,
    primary: &Primary,
    store: &Store,
    writer: &Writer,
    state: &ReplicationState,
) -> Result<(), Status> {
    let channel = cellplane_api::client::channel(
        &primary.config.primary_endpoint,
        Duration::from_secs(1),
        &primary.tls,
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let position = store.replica()?;
    let applied = if position.bootstrapping {
        0
    } else {
        position.applied_lsn
    };
    state.update_replica(|r| {
        r.applied_lsn = applied;
        r.bootstrapping = position.bootstrapping;
    });
    let (acks, outgoing) = mpsc::channel(64);
    acks.send(pb::StandbyMessage {
        standby_cell_id: cell_id.to_string(),
        applied_lsn: applied,
    })
    .await
    .map_err(|_| Status::internal("ack channel closed"))?;
    let mut stream = ReplicationClient::new(channel)
        .follow(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let mut streamed = false;
    // Batches queued in the writer and not yet durable, oldest first: the next is queued while
    // earlier ones commit, so several share one fsync; each is acknowledged in order once
    // durable.
    let mut in_flight: VecDeque<Applying> = VecDeque::new();
    loop {
        let receive = in_flight.len() < IN_FLIGHT;
        tokio::select! {
            biased;
            applied = async { in_flight.front_mut().expect("in flight").outcome.as_mut().await },
                if !in_flight.is_empty() =>
            {
                let done = in_flight.pop_front().expect("in flight");
                let Outcome::Replica(position) = applied? else {
                    return Err(Status::internal("the writer answered a replication batch oddly"));
                };
                // Connected once a batch of this stream is applied: the primary opens every
                // stream with one, so a standby starting over is seen bootstrapping before it
                // is seen following.
                state.update_replica(|r| {
                    r.connected = true;
                    r.applied_lsn = position.applied_lsn;
                    r.primary_lsn = r.primary_lsn.max(done.primary_lsn);
                    r.bootstrapping = position.bootstrapping;
                    r.bootstrap_rows = if done.begin { done.rows } else { r.bootstrap_rows + done.rows };
                });
                if !position.bootstrapping {
                    // Durable: the writer answers only after its batch is fsynced.
                    let ack = pb::StandbyMessage {
                        standby_cell_id: String::new(),
                        applied_lsn: position.applied_lsn,
                    };
                    if acks.send(ack).await.is_err() {
                        break;
                    }
                }
            }
            batch = stream.message(), if receive => {
                let Some(batch) = batch? else { break };
                streamed = true;
                let primary_lsn = batch.primary_lsn;
                let rows = batch.snapshot_rows.len() as u64;
                let begin = batch.snapshot_begin;
                let replicated = decode_batch(batch)?;
                in_flight.push_back(Applying {
                    outcome: Box::pin(writer.enqueue(Op::Replicate(replicated))?),
                    primary_lsn,
                    rows,
                    begin,
                });
            }
        }
    }
    // What was queued still lands; the next connection starts from what is durable.
    if streamed {
        Ok(())
    } else {
        Err(Status::unavailable("the primary ended the stream at once"))
    }
}
