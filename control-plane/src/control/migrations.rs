//! The migration half of the Control service: starting, reading, watching and cancelling
//! migrations, and the reports of the agents that carry them out.
//!
//! Cancels and reports are decided on the leader by the coordinator's step function against
//! the leader's state, then proposed as a compare-and-set on the phase.

use std::pin::Pin;
use std::sync::Arc;

use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::control_client::ControlClient;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::convert;
use crate::migration::record::display_id;
use crate::migration::step::{Decision, Event, Report, step};
use crate::node::{Node, Proposal, forwarded, is_forwarded};
use crate::state::ControlState;
use crate::state::command::{CommandOutput, MigrationView};
use crate::store::view::WatchSignal;
use cellplane_api::clock::now_ms;

pub type MigrationStream = Pin<Box<dyn Stream<Item = Result<pb::Migration, Status>> + Send>>;

/// Migrations buffered per watcher before the sender waits on it.
const WATCH_BUFFER: usize = 64;

/// How often a cancel or report re-decides after losing a race with another change.
const DECIDE_ATTEMPTS: usize = 3;

fn view(state: &ControlState, id: u64) -> Option<MigrationView> {
    state.migrations().get(&id).map(|record| MigrationView {
        id,
        record: record.clone(),
    })
}

fn not_found(id: u64) -> Status {
    Status::not_found(format!(
        "migration_id: migration {} does not exist",
        display_id(id)
    ))
}

pub fn migration_output(output: CommandOutput) -> Result<pb::Migration, Status> {
    match output {
        CommandOutput::Migration(view) => Ok(convert::migration_to_proto(&view)),
        other => Err(Status::internal(format!(
            "unexpected command output {other:?}"
        ))),
    }
}

/// What the leader does with a cancel or a report: decide with the step function, propose,
/// and answer the migration as it then is; `Ok(Err(channel))` means "forward it there".
pub async fn decide(
    node: &Node,
    was_forwarded: bool,
    id: u64,
    event: Event<'_>,
) -> Result<Result<pb::Migration, Channel>, Status> {
    if let Some(channel) = node.linearize(was_forwarded).await? {
        return Ok(Err(channel));
    }
    for _ in 0..DECIDE_ATTEMPTS {
        let now = now_ms();
        let decided = node.view().read(|state| {
            view(state, id).map(|current| {
                let decision = step(id, &current.record, event.clone(), now, &node.migration);
                (current, decision)
            })
        });
        let Some((current, decision)) = decided else {
            return Err(not_found(id));
        };
        match decision {
            Decision::Nothing => return Ok(Ok(convert::migration_to_proto(&current))),
            Decision::Refuse(message) => return Err(Status::failed_precondition(message)),
            Decision::Propose(command) => match node.propose(command, true).await {
                Ok(Proposal::Applied(output)) => return migration_output(output).map(Ok),
                Ok(Proposal::Forward(channel)) => return Ok(Err(channel)),
                // Lost a race with another change of the phase: decide again from the newer
                // state.
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    let moved = node
                        .view()
                        .read(|state| view(state, id))
                        .is_some_and(|now| now.record.phase != current.record.phase);
                    if !moved {
                        return Err(status);
                    }
                }
                Err(status) => return Err(status),
            },
        }
    }
    Err(Status::aborted(format!(
        "migration_id: {} kept changing while deciding; retry",
        display_id(id)
    )))
}

pub async fn cancel(
    node: &Node,
    request: Request<pb::CancelMigrationRequest>,
) -> Result<Response<pb::Migration>, Status> {
    let was_forwarded = is_forwarded(request.metadata());
    let message = request.into_inner();
    let id = convert::migration_id(&message.migration_id)?;
    match decide(node, was_forwarded, id, Event::Cancel).await? {
        Ok(migration) => Ok(Response::new(migration)),
        Err(channel) => {
            ControlClient::new(channel)
                .cancel_migration(forwarded(message))
                .await
        }
    }
}

pub async fn report(
    node: &Node,
    request: Request<pb::ReportMigrationRequest>,
) -> Result<Response<pb::Migration>, Status> {
    let was_forwarded = is_forwarded(request.metadata());
    let confined = super::scope::confined(&request);
    let message = request.into_inner();
    let id = convert::migration_id(&message.migration_id)?;
    let report: Report = convert::report(&message)?;
    if let Some(region) = &confined {
        node.view()
            .read(|state| super::scope::check_migration(region, id, state))?;
    }
    match decide(node, was_forwarded, id, Event::Report(&report)).await? {
        Ok(migration) => Ok(Response::new(migration)),
        Err(channel) => {
            ControlClient::new(channel)
                .report_migration(forwarded(message))
                .await
        }
    }
}

pub async fn get(
    node: &Node,
    request: Request<pb::GetMigrationRequest>,
) -> Result<Response<pb::Migration>, Status> {
    let was_forwarded = is_forwarded(request.metadata());
    let message = request.into_inner();
    let id = convert::migration_id(&message.migration_id)?;
    if let Some(channel) = node.linearize(was_forwarded).await? {
        return ControlClient::new(channel)
            .get_migration(forwarded(message))
            .await;
    }
    match node.view().read(|state| view(state, id)) {
        Some(view) => Ok(Response::new(convert::migration_to_proto(&view))),
        None => Err(not_found(id)),
    }
}

pub async fn list(
    node: &Node,
    request: Request<pb::ListMigrationsRequest>,
) -> Result<Response<pb::ListMigrationsResponse>, Status> {
    let was_forwarded = is_forwarded(request.metadata());
    let message = request.into_inner();
    cellplane_api::ids::validate_optional_id("tenant_id", &message.tenant_id)?;
    if let Some(channel) = node.linearize(was_forwarded).await? {
        return ControlClient::new(channel)
            .list_migrations(forwarded(message))
            .await;
    }
    let migrations = node.view().read(|state| {
        state
            .migrations()
            .iter()
            .filter(|(_, m)| !message.active_only || !m.phase.is_terminal())
            .filter(|(_, m)| message.tenant_id.is_empty() || *m.key.tenant_id == *message.tenant_id)
            .map(|(id, m)| {
                convert::migration_to_proto(&MigrationView {
                    id: *id,
                    record: m.clone(),
                })
            })
            .collect()
    });
    Ok(Response::new(pb::ListMigrationsResponse { migrations }))
}

/// Starts a watch of one migration (`Some(id)`: its current state, then each change, ending
/// when it finishes) or of all (`None`: the unfinished ones, then every change).
pub fn watch(node: &Arc<Node>, only: Option<u64>) -> Result<MigrationStream, Status> {
    node.require_touch()?;
    let (signals, (initial, revision)) = node.view().subscribe(|state| {
        let initial: Vec<MigrationView> = match only {
            Some(id) => view(state, id).into_iter().collect(),
            None => state
                .migrations()
                .iter()
                .filter(|(_, m)| !m.phase.is_terminal())
                .map(|(id, m)| MigrationView {
                    id: *id,
                    record: m.clone(),
                })
                .collect(),
        };
        (initial, state.revision())
    });
    if let Some(id) = only
        && initial.is_empty()
    {
        return Err(not_found(id));
    }
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let node = node.clone();
    tokio::spawn(async move {
        let _ = follow(&node, only, signals, initial, revision, &tx).await;
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Sends `initial`, then every migration changed after `seen`; `Err` when the watcher left.
/// Ends the watch with UNAVAILABLE once the node is out of touch: an agent waiting on a
/// migration the node no longer sees move would otherwise wait in silence.
async fn follow(
    node: &Arc<Node>,
    only: Option<u64>,
    mut signals: broadcast::Receiver<WatchSignal>,
    initial: Vec<MigrationView>,
    mut seen: u64,
    tx: &mpsc::Sender<Result<pb::Migration, Status>>,
) -> Result<(), ()> {
    let mut shutdown = node.shutdown_signal();
    let mut finished = send(tx, only, initial).await?;
    let mut touch = tokio::time::interval(crate::node::TOUCH_CHECK);
    while !finished {
        tokio::select! {
            _ = touch.tick() => {
                if let Err(status) = node.require_touch() {
                    let _ = tx.send(Err(status)).await;
                    return Ok(());
                }
                continue;
            }
            signal = signals.recv() => match signal {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx.send(Err(Status::unavailable("node stopped; watch again"))).await;
                    return Ok(());
                }
            },
            _ = shutdown.changed() => {
                let _ = tx.send(Err(Status::unavailable("node shutting down; watch another node"))).await;
                return Ok(());
            }
            _ = tx.closed() => return Err(()),
        }
        let (changed, revision) = node.view().read(|state| {
            // Most commands are route changes: look at the migrations only when one changed.
            if state.migrations_revision() <= seen {
                return (Vec::new(), state.revision());
            }
            let mut changed: Vec<MigrationView> = state
                .migrations()
                .iter()
                .filter(|(id, m)| m.updated_revision > seen && only.is_none_or(|o| o == **id))
                .map(|(id, m)| MigrationView {
                    id: *id,
                    record: m.clone(),
                })
                .collect();
            changed.sort_by_key(|v| v.record.updated_revision);
            (changed, state.revision())
        });
        seen = revision;
        finished = send(tx, only, changed).await?;
    }
    Ok(())
}

/// Sends `views`; answers whether the one watched migration finished.
async fn send(
    tx: &mpsc::Sender<Result<pb::Migration, Status>>,
    only: Option<u64>,
    views: Vec<MigrationView>,
) -> Result<bool, ()> {
    let mut finished = false;
    for view in views {
        finished |= only.is_some() && view.record.phase.is_terminal();
        tx.send(Ok(convert::migration_to_proto(&view)))
            .await
            .map_err(|_| ())?;
    }
    Ok(finished)
}
