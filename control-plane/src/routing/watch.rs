//! `Watch`: the history from a revision, then every new route event, in revision order, each
//! revision's events in one message.
//!
//! The stream subscribes to new events and reads the history under the same lock, so nothing
//! falls between the two. A watcher that falls too far behind, or a node that installs a
//! snapshot, makes the stream re-read the history from where it was; if that part of history is
//! compacted the stream ends with OUT_OF_RANGE and the client reloads.
//!
//! A node cut off from whatever decides (the Raft leader, etcd) for longer than an election
//! takes refuses new watches and ends open ones with UNAVAILABLE (`RouteStore::out_of_touch`),
//! checked every [`TOUCH_CHECK`](crate::node::TOUCH_CHECK): its state no longer moves, and a watcher is better served by
//! another node than by silence.

use std::pin::Pin;
use std::sync::Arc;

use cellplane_api::detail;
use cellplane_api::proto::routing as pb;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::node::Node;
use crate::state::history::{EventKind, RouteEvent};
use crate::store::view::WatchSignal;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Messages buffered per watcher before the sender waits on it.
const WATCH_BUFFER: usize = 256;

fn to_proto(event: &RouteEvent) -> pb::RouteEvent {
    pb::RouteEvent {
        revision: event.revision,
        kind: match event.kind {
            EventKind::Put => pb::RouteEventKind::Put,
            EventKind::Delete => pb::RouteEventKind::Delete,
        } as i32,
        route: Some(event.route.to_proto()),
    }
}

/// Groups events (in revision order) into one message per revision.
fn group(events: &[RouteEvent]) -> Vec<pb::WatchResponse> {
    let mut out: Vec<pb::WatchResponse> = Vec::new();
    for event in events {
        match out.last_mut() {
            Some(last) if last.revision == event.revision => last.events.push(to_proto(event)),
            _ => out.push(pb::WatchResponse {
                revision: event.revision,
                events: vec![to_proto(event)],
            }),
        }
    }
    out
}

/// Starts a watch from `from_revision` (0 = from now on). A compacted start fails at once.
pub fn start(node: &Arc<Node>, from_revision: u64) -> Result<WatchStream, Status> {
    node.require_touch()?;
    let (signals, initial) = node.view().subscribe(|state| {
        let from = if from_revision == 0 {
            state.revision() + 1
        } else {
            from_revision
        };
        (from, state.events_since(from), state.revision())
    });
    let (from, history, current) = initial;
    let history = history
        .map_err(|compacted| detail::compacted(from, compacted.compacted_revision, current))?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let node = node.clone();
    tokio::spawn(async move {
        let mut last_sent = from - 1;
        if let Err(status) = follow(&node, signals, &tx, history, current, &mut last_sent).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Sends everything after `last_sent`; returns when the watcher leaves or the node stops, or with
/// the status that ends the stream.
async fn follow(
    node: &Arc<Node>,
    mut signals: broadcast::Receiver<WatchSignal>,
    tx: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
    history: Vec<RouteEvent>,
    current: u64,
    last_sent: &mut u64,
) -> Result<(), Status> {
    let mut shutdown = node.shutdown_signal();
    if !send_events(tx, &history, current, last_sent).await {
        return Ok(());
    }
    let mut touch = tokio::time::interval(crate::node::TOUCH_CHECK);
    loop {
        tokio::select! {
            _ = touch.tick() => node.require_touch()?,
            signal = signals.recv() => match signal {
                Ok(WatchSignal::Batch(batch)) => {
                    if !send_events(tx, &batch.events, batch.revision, last_sent).await {
                        return Ok(());
                    }
                }
                Ok(WatchSignal::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    let from = *last_sent + 1;
                    let (events, current) = node.view().read(|state| (state.events_since(from), state.revision()));
                    let events = events.map_err(|c| detail::compacted(from, c.compacted_revision, current))?;
                    if !send_events(tx, &events, current, last_sent).await {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Status::unavailable("node stopped; watch again from the next revision"));
                }
            },
            _ = shutdown.changed() => {
                return Err(Status::unavailable("node shutting down; watch another node from the next revision"));
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Sends the events newer than `last_sent`, then, when `through` is newer still, a message with no
/// events at `through`: revisions without route changes (a cell registered, a compaction) still
/// move a watcher forward, so a cache knows it is current. False when the watcher has gone.
async fn send_events(
    tx: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
    events: &[RouteEvent],
    through: u64,
    last_sent: &mut u64,
) -> bool {
    let fresh: Vec<RouteEvent> = events
        .iter()
        .filter(|e| e.revision > *last_sent)
        .cloned()
        .collect();
    for message in group(&fresh) {
        let revision = message.revision;
        if tx.send(Ok(message)).await.is_err() {
            return false;
        }
        *last_sent = revision;
    }
    if through > *last_sent {
        let progress = pb::WatchResponse {
            revision: through,
            events: Vec::new(),
        };
        if tx.send(Ok(progress)).await.is_err() {
            return false;
        }
        *last_sent = through;
    }
    true
}
