//! Keeps each cell's grants equal to the routes that point at it. What to tell the cells is
//! decided by the pure functions of `reconcile.rs`; this module reads and carries out.
//!
//! The agent loads every route, keeps those of its own cells, grants them, and then follows the
//! route watch: a key that arrives on one of its cells is granted at its new epoch; a key that
//! leaves is revoked with its new owner, so writers that still reach the old cell are told
//! where to go. Any failure (a cell down, the watch cut) starts over with a full load, which
//! also repairs whatever a crash left half done. Granting the epoch a cell already holds
//! changes nothing there, so starting over is harmless. A key whose tenant was deleted is
//! revoked with no new owner and its rows are dropped.

mod reconcile;
#[cfg(test)]
mod scenario;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use cellplane_api::proto::cell::{CellStatusRequest, GrantRequest, KeyRequest, RevokeRequest};
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::proto::routing::{
    Consistency, ListRoutesRequest, LookupRequest, Route, RouteEventKind, WatchRequest,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::cells::LocalCells;
use cellplane_api::client::ControlPlane;
use reconcile::{Action, Held, Key, RouteChange, Routes, reconcile, resolved};

const PAGE_SIZE: u32 = 5_000;
/// Grants sent at once while reloading.
const GRANTS_IN_FLIGHT: usize = 128;
const RETRY: Duration = Duration::from_millis(200);
/// How long a grant to a configured standby waits for the failover that routed the key to it
/// to promote it.
const PROMOTION_WAIT: Duration = Duration::from_secs(2);

/// Runs until shutdown: one executor per cell, so a cell that hangs (a stopped process, a
/// stalled disk) holds up only its own grants, never those of the standby a failover promotes
/// beside it.
pub async fn run(control: ControlPlane, cells: LocalCells, shutdown: watch::Receiver<bool>) {
    let tasks: Vec<_> = cells
        .iter()
        .map(|(cell_id, cell)| {
            let one: LocalCells = Arc::new(BTreeMap::from([(cell_id.clone(), cell.clone())]));
            tokio::spawn(run_for(control.clone(), one, shutdown.clone()))
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Keeps the grants of `cells` equal to their routes until shutdown.
async fn run_for(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (node, routing) = control.routing_at();
        tokio::select! {
            result = follow(routing, &cells) => {
                let status = match result {
                    Err(Interrupted::Routes(status)) => {
                        // Whatever failed there (the node down, or out of touch and ending its
                        // watches), reloading from it would meet it again.
                        control.moved_on_from(node);
                        status
                    }
                    Err(Interrupted::Cell(status)) => status,
                };
                tracing::warn!(cells = ?cells.keys().collect::<Vec<_>>(), %status, "grant reconciliation interrupted; reloading routes");
            }
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Why one pass of [`follow`] ended.
enum Interrupted {
    /// Reading or watching the routes failed.
    Routes(Status),
    /// A cell failed to answer or to do what it was told.
    Cell(Status),
}

fn key_of(route: &Route) -> Key {
    (route.tenant_id.clone(), route.conversation_id.clone())
}

/// Carries out one action on one of this agent's cells (a cell no longer configured here is
/// skipped).
async fn execute(cells: &LocalCells, action: Action) -> Result<(), Status> {
    let cell_id = match &action {
        Action::Grant { cell, .. } | Action::Revoke { cell, .. } | Action::Drop { cell, .. } => {
            cell.clone()
        }
    };
    let Some(cell) = cells.get(&cell_id) else {
        return Ok(());
    };
    let mut admin = cell.admin.clone();
    match action {
        Action::Grant { key, epoch, .. } => {
            let request = GrantRequest {
                tenant_id: key.0.clone(),
                conversation_id: key.1.clone(),
                epoch,
            };
            let mut granted = admin.grant(request.clone()).await;
            // A failover moves the keys to a standby a moment before its agent promotes it;
            // until then the standby refuses grants. Wait for the promotion rather than reload.
            let deadline = tokio::time::Instant::now() + PROMOTION_WAIT;
            while matches!(&granted, Err(s) if s.code() == Code::FailedPrecondition)
                && cell.spec.standby_of.is_some()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                granted = admin.grant(request.clone()).await;
            }
            match granted {
                Ok(_) => Ok(()),
                // The cell already holds a newer epoch: the route event was older news.
                Err(status) if status.code() == Code::InvalidArgument => {
                    tracing::debug!(cell_id, ?key, epoch, %status, "grant skipped");
                    Ok(())
                }
                Err(status) => Err(status),
            }
        }
        Action::Revoke {
            key,
            to_cell,
            to_epoch,
            ..
        } => admin
            .revoke(RevokeRequest {
                tenant_id: key.0,
                conversation_id: key.1,
                new_cell_id: to_cell,
                new_epoch: to_epoch,
            })
            .await
            .map(|_| ()),
        // A cell that holds the key at a newer epoch than the deleted one (the tenant was
        // created again and placed here since) keeps it; the purge then finds it owned and
        // refuses, which is the same answer.
        Action::Drop { key, epoch, .. } => {
            admin
                .revoke(RevokeRequest {
                    tenant_id: key.0.clone(),
                    conversation_id: key.1.clone(),
                    new_cell_id: String::new(),
                    new_epoch: epoch,
                })
                .await?;
            match admin
                .purge(KeyRequest {
                    tenant_id: key.0.clone(),
                    conversation_id: key.1.clone(),
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(cell_id, tenant = %key.0, conversation = %key.1, "dropped a deleted key");
                    Ok(())
                }
                Err(status) if status.code() == Code::FailedPrecondition => Ok(()),
                Err(status) => Err(status),
            }
        }
    }
}

/// Every route that points at one of this agent's cells, and the revision the load began at.
async fn load_routes(
    routing: &mut RoutingClient<Channel>,
    cells: &LocalCells,
) -> Result<(Routes, u64), Status> {
    let mut mine = Routes::new();
    let mut token = String::new();
    let mut start_revision = None;
    loop {
        let page = routing
            .list_routes(ListRoutesRequest {
                page_size: PAGE_SIZE,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        start_revision.get_or_insert(page.revision);
        for route in page.routes {
            if cells.contains_key(&route.cell_id) {
                mine.insert(key_of(&route), (route.cell_id.clone(), route.epoch));
            }
        }
        token = page.next_page_token;
        if token.is_empty() {
            return Ok((mine, start_revision.unwrap_or(0)));
        }
    }
}

/// What every primary cell of this agent holds now. A standby holds its primary's grants,
/// which no route gives it and nothing here may change.
async fn held_grants(cells: &LocalCells) -> Result<Vec<Held>, Status> {
    let mut held = Vec::new();
    for (cell_id, cell) in cells.iter() {
        if cell.is_standby() {
            continue;
        }
        let status = cell
            .admin
            .clone()
            .cell_status(CellStatusRequest::default())
            .await?
            .into_inner();
        held.extend(status.keys.into_iter().map(|k| Held {
            cell: cell_id.clone(),
            key: (k.tenant_id, k.conversation_id),
            epoch: k.epoch,
        }));
    }
    Ok(held)
}

/// The route of `key` now, or `None` when it no longer exists.
async fn lookup(routing: &mut RoutingClient<Channel>, key: &Key) -> Result<Option<Route>, Status> {
    let answer = routing
        .lookup(LookupRequest {
            tenant_id: key.0.clone(),
            conversation_id: key.1.clone(),
            consistency: Consistency::Linearizable as i32,
        })
        .await;
    match answer {
        Ok(answer) => Ok(answer.into_inner().route),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status),
    }
}

/// One pass: load, reconcile, then follow the watch until something fails.
async fn follow(
    mut routing: RoutingClient<Channel>,
    cells: &LocalCells,
) -> Result<Infallible, Interrupted> {
    let (mut mine, start_revision) = load_routes(&mut routing, cells)
        .await
        .map_err(Interrupted::Routes)?;
    tracing::debug!(cells = ?cells.keys().collect::<Vec<_>>(), revision = start_revision, routes = mine.len(), "routes loaded");
    let plan = reconcile(&mine, &held_grants(cells).await.map_err(Interrupted::Cell)?);
    // The cell commits concurrent grants together, so a reload grants many at a time.
    futures::stream::iter(plan.grants)
        .map(|action| execute(cells, action))
        .buffer_unordered(GRANTS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await
        .map_err(Interrupted::Cell)?;
    for held in plan.to_resolve {
        let route = lookup(&mut routing, &held.key)
            .await
            .map_err(Interrupted::Routes)?;
        let owner = route.as_ref().map(|r| (r.cell_id.as_str(), r.epoch));
        if let Some(action) = resolved(&held.cell, &held.key, held.epoch, owner) {
            execute(cells, action).await.map_err(Interrupted::Cell)?;
        }
    }
    let mut stream = routing
        .watch(WatchRequest {
            from_revision: start_revision + 1,
        })
        .await
        .map_err(Interrupted::Routes)?
        .into_inner();
    let is_local = |cell: &str| cells.contains_key(cell);
    while let Some(message) = stream.message().await.map_err(Interrupted::Routes)? {
        for event in message.events {
            let Some(route) = event.route else { continue };
            let change = if event.kind == RouteEventKind::Put as i32 {
                RouteChange::Put {
                    key: key_of(&route),
                    cell: route.cell_id,
                    epoch: route.epoch,
                }
            } else {
                RouteChange::Delete {
                    key: key_of(&route),
                }
            };
            for action in reconcile::follow(&mut mine, is_local, change) {
                execute(cells, action).await.map_err(Interrupted::Cell)?;
            }
        }
    }
    Err(Interrupted::Routes(Status::unavailable(
        "the route watch ended",
    )))
}
