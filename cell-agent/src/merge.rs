//! Merges back what only a failed cell held, once it runs again: for every key its failover
//! moved, the cell's export of the key is streamed into the key's current owner
//! (`CellAdmin.Merge`), which appends what it lacks and counts it; then the counts are reported
//! (the failover goes DONE → MERGED) and the cell may rejoin. A LOW cell's keys are revoked
//! and purged here as they are merged, since it comes back as an empty primary.
//!
//! Every step may be repeated: the owner counts each merge id once per key, a revocation at an
//! epoch already held changes nothing, and a purged key exports nothing — so a crash anywhere
//! only makes the next round start over, with the same counts.

use std::sync::{Arc, Mutex};

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::cell::{
    ExportChunk, ExportRequest, KeyRequest, MergeChunk, RevokeRequest,
};
use cellplane_api::proto::control::{Failover, FailoverPhase, MergedKey, ReportFailoverRequest};
use cellplane_api::proto::routing::{Consistency, LookupRequest, Route};
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::Channel;

use crate::cells::{LocalCell, remote_admin};

/// Every route key `failover` moved: its tenants, then its conversations.
pub fn keys(failover: &Failover) -> Vec<(String, String)> {
    failover
        .tenants
        .iter()
        .map(|t| (t.clone(), String::new()))
        .chain(
            failover
                .conversations
                .iter()
                .map(|c| (c.tenant_id.clone(), c.conversation_id.clone())),
        )
        .collect()
}

/// Merges every key of `failover` from `cell` (the failed cell, running again) into its
/// owner, and reports the counts.
pub async fn merge_back(
    control: &ControlPlane,
    cell: &LocalCell,
    failover: &Failover,
) -> Result<Failover, Status> {
    let mut merged = Vec::new();
    for (tenant, conversation) in keys(failover) {
        let route = lookup(control, &tenant, &conversation).await?;
        let owner = remote_admin(&route.endpoint, control.tls())?;
        let messages = merge_key(cell, owner, failover, &route, (&tenant, &conversation)).await?;
        if failover.fallback {
            let mut admin = cell.admin.clone();
            admin
                .revoke(RevokeRequest {
                    tenant_id: tenant.clone(),
                    conversation_id: conversation.clone(),
                    new_cell_id: route.cell_id.clone(),
                    new_epoch: route.epoch,
                })
                .await?;
            admin
                .purge(KeyRequest {
                    tenant_id: tenant.clone(),
                    conversation_id: conversation.clone(),
                })
                .await?;
        }
        merged.push(MergedKey {
            tenant_id: tenant,
            conversation_id: conversation,
            messages,
        });
    }
    let request = ReportFailoverRequest {
        failover_id: failover.failover_id.clone(),
        phase: FailoverPhase::Done as i32,
        lsn: 0,
        merged,
    };
    control
        .call(|mut c| {
            let request = request.clone();
            async move { c.report_failover(request).await }
        })
        .await
}

async fn lookup(control: &ControlPlane, tenant: &str, conversation: &str) -> Result<Route, Status> {
    let request = LookupRequest {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        consistency: Consistency::Linearizable as i32,
    };
    control
        .call_routing(|mut r| {
            let request = request.clone();
            async move { r.lookup(request).await }
        })
        .await?
        .route
        .ok_or_else(|| {
            Status::internal(format!(
                "no route in the answer for {tenant}/{conversation}"
            ))
        })
}

/// Streams the cell's export of one key into the owner `route` names; answers what the merge
/// added to the key in all.
async fn merge_key(
    cell: &LocalCell,
    mut owner: CellAdminClient<Channel>,
    failover: &Failover,
    route: &Route,
    (tenant, conversation): (&str, &str),
) -> Result<u64, Status> {
    let export = cell
        .admin
        .clone()
        .export(ExportRequest {
            tenant_id: tenant.to_string(),
            conversation_id: conversation.to_string(),
            from_lsn: 0,
            log_only: false,
        })
        .await?
        .into_inner();
    // A chunk with no rows goes first, so an empty export still names the key and the owner
    // answers the count of earlier runs. The export's first error ends the stream and is
    // returned instead of the owner's count of a partial merge.
    let empty = ExportChunk {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        ..Default::default()
    };
    let failed = Arc::new(Mutex::new(None));
    let seen = failed.clone();
    let chunks = export.map_while(move |chunk| {
        chunk
            .map_err(|status| *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(status))
            .ok()
    });
    let (merge_id, epoch) = (failover.failover_id.clone(), route.epoch);
    let stream = tokio_stream::iter([empty])
        .chain(chunks)
        .map(move |export| MergeChunk {
            merge_id: merge_id.clone(),
            epoch,
            export: Some(export),
        });
    let answer = owner.merge(stream).await;
    if let Some(status) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(status);
    }
    Ok(answer?.into_inner().merged)
}
