//! Keeps each cell's grants equal to the routes that point at it.
//!
//! The agent loads every route, keeps those of its own cells, grants them, and then follows the
//! route watch: a key that arrives on one of its cells is granted at its new epoch; a key that
//! leaves is revoked with its new owner, so writers that still reach the old cell are told
//! where to go. Any failure (a cell down, the watch cut) starts over with a full load, which
//! also repairs whatever a crash left half done. Granting the epoch a cell already holds
//! changes nothing there, so starting over is harmless. A key whose tenant was deleted is
//! revoked with no new owner and its rows are dropped.

use std::collections::HashMap;
use std::time::Duration;

use cellplane_api::proto::cell::{CellStatusRequest, GrantRequest, KeyRequest, RevokeRequest};
use cellplane_api::proto::routing::{
    Consistency, ListRoutesRequest, LookupRequest, Route, RouteEventKind, WatchRequest,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::cells::LocalCells;
use cellplane_api::client::ControlPlane;

const PAGE_SIZE: u32 = 5_000;
/// Grants sent at once while reloading.
const GRANTS_IN_FLIGHT: usize = 128;
const RETRY: Duration = Duration::from_millis(200);

/// `(tenant_id, conversation_id)`.
type Key = (String, String);

/// Runs until shutdown.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            result = follow(&control, &cells) => {
                if let Err(status) = result {
                    tracing::warn!(%status, "grant reconciliation interrupted; reloading routes");
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn key_of(route: &Route) -> Key {
    (route.tenant_id.clone(), route.conversation_id.clone())
}

async fn grant(cells: &LocalCells, cell_id: &str, key: &Key, epoch: u64) -> Result<(), Status> {
    let Some(cell) = cells.get(cell_id) else {
        return Ok(());
    };
    let result = cell
        .admin
        .clone()
        .grant(GrantRequest {
            tenant_id: key.0.clone(),
            conversation_id: key.1.clone(),
            epoch,
        })
        .await;
    match result {
        Ok(_) => Ok(()),
        // The cell already holds a newer epoch: the route event was older news.
        Err(status) if status.code() == Code::InvalidArgument => {
            tracing::debug!(cell_id, ?key, epoch, %status, "grant skipped");
            Ok(())
        }
        Err(status) => Err(status),
    }
}

/// Revokes a key whose tenant was deleted and drops its rows: no writer reaches it again.
/// `epoch` is the key's epoch when it was deleted: a cell that holds it at a newer one (the
/// tenant was created again and placed here since) keeps it.
async fn drop_deleted(
    cells: &LocalCells,
    cell_id: &str,
    key: &Key,
    epoch: u64,
) -> Result<(), Status> {
    let Some(cell) = cells.get(cell_id) else {
        return Ok(());
    };
    let mut admin = cell.admin.clone();
    admin
        .revoke(RevokeRequest {
            tenant_id: key.0.clone(),
            conversation_id: key.1.clone(),
            new_cell_id: String::new(),
            new_epoch: epoch,
        })
        .await?;
    admin
        .purge(KeyRequest {
            tenant_id: key.0.clone(),
            conversation_id: key.1.clone(),
        })
        .await?;
    tracing::info!(cell_id, tenant = %key.0, conversation = %key.1, "dropped a deleted key");
    Ok(())
}

async fn revoke(cells: &LocalCells, cell_id: &str, key: &Key, to: &Route) -> Result<(), Status> {
    let Some(cell) = cells.get(cell_id) else {
        return Ok(());
    };
    cell.admin
        .clone()
        .revoke(RevokeRequest {
            tenant_id: key.0.clone(),
            conversation_id: key.1.clone(),
            new_cell_id: to.cell_id.clone(),
            new_epoch: to.epoch,
        })
        .await
        .map(|_| ())
}

/// One pass: load, reconcile, then follow the watch until something fails.
async fn follow(control: &ControlPlane, cells: &LocalCells) -> Result<(), Status> {
    let mut routing = control.routing();
    let mut mine: HashMap<Key, (String, u64)> = HashMap::new();
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
            break;
        }
    }
    // What each cell holds already, so a reload grants only what changed, many at a time
    // (the cell commits concurrent grants together).
    let mut statuses = Vec::new();
    for (cell_id, cell) in cells.iter() {
        let status = cell
            .admin
            .clone()
            .cell_status(CellStatusRequest {})
            .await?
            .into_inner();
        statuses.push((cell_id.clone(), status));
    }
    let held: HashMap<(&str, Key), u64> = statuses
        .iter()
        .flat_map(|(cell_id, status)| {
            status.keys.iter().map(move |k| {
                (
                    (
                        cell_id.as_str(),
                        (k.tenant_id.clone(), k.conversation_id.clone()),
                    ),
                    k.epoch,
                )
            })
        })
        .collect();
    let missing: Vec<(Key, String, u64)> = mine
        .iter()
        .filter(|(key, (cell_id, epoch))| {
            held.get(&(cell_id.as_str(), (*key).clone())) != Some(epoch)
        })
        .map(|(key, (cell_id, epoch))| (key.clone(), cell_id.clone(), *epoch))
        .collect();
    futures::stream::iter(missing)
        .map(|(key, cell_id, epoch)| {
            let cells = cells.clone();
            async move { grant(&cells, &cell_id, &key, epoch).await }
        })
        .buffer_unordered(GRANTS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    // Keys a cell holds that no route gives it: revoke them towards their owner. A
    // conversation frozen alone on its tenant's cell resolves to that same cell and stays.
    for (cell_id, status) in &statuses {
        for held in &status.keys {
            let key = (held.tenant_id.clone(), held.conversation_id.clone());
            if mine.get(&key).is_some_and(|(owner, _)| owner == cell_id) {
                continue;
            }
            let lookup = routing
                .lookup(LookupRequest {
                    tenant_id: key.0.clone(),
                    conversation_id: key.1.clone(),
                    consistency: Consistency::Linearizable as i32,
                })
                .await;
            match lookup {
                Ok(answer) => {
                    if let Some(route) = answer.into_inner().route
                        && route.cell_id != *cell_id
                    {
                        revoke(cells, cell_id, &key, &route).await?;
                    }
                }
                Err(status) if status.code() == Code::NotFound => {
                    drop_deleted(cells, cell_id, &key, held.epoch).await?;
                }
                Err(status) => return Err(status),
            }
        }
    }
    let from_revision = start_revision.unwrap_or(0) + 1;
    let mut stream = routing
        .watch(WatchRequest { from_revision })
        .await?
        .into_inner();
    while let Some(message) = stream.message().await? {
        for event in message.events {
            let Some(route) = event.route else { continue };
            let key = key_of(&route);
            if event.kind != RouteEventKind::Put as i32 {
                if let Some((cell_id, epoch)) = mine.remove(&key) {
                    drop_deleted(cells, &cell_id, &key, epoch).await?;
                }
                continue;
            }
            let previous = mine.remove(&key);
            if cells.contains_key(&route.cell_id) {
                grant(cells, &route.cell_id, &key, route.epoch).await?;
                mine.insert(key.clone(), (route.cell_id.clone(), route.epoch));
            }
            if let Some((old_cell, _)) = previous
                && old_cell != route.cell_id
            {
                revoke(cells, &old_cell, &key, &route).await?;
            }
        }
    }
    Err(Status::unavailable("the route watch ended"))
}
