//! Merges back what only a failed cell held, once it runs again: for every key its failover
//! moved, the cell's export of the key is streamed into the key's current owner
//! (`CellAdmin.Merge`), which appends what it lacks and counts it; then the counts are reported
//! (the failover goes DONE → MERGED) and the cell may rejoin. A LOW cell's keys are revoked
//! and purged here as they are merged, since it comes back as an empty primary.
//!
//! Every step may be repeated: the owner counts each merge id once per key, a revocation at an
//! epoch already held changes nothing, and a purged key exports nothing — so a crash anywhere
//! only makes the next round start over, with the same counts.

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::cell::{ExportRequest, KeyRequest, MergeChunk, RevokeRequest};
use cellplane_api::proto::control::{Failover, FailoverPhase, MergedKey, ReportFailoverRequest};
use cellplane_api::proto::routing::{Consistency, LookupRequest, Route};
use futures::StreamExt;
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
    let (merge_id, epoch) = (failover.failover_id.clone(), route.epoch);
    let (tenant, conversation) = (tenant.to_string(), conversation.to_string());
    // An empty export still sends one chunk: the owner answers the count of earlier runs.
    let first = futures::stream::once(async move {
        MergeChunk {
            merge_id: String::new(),
            epoch: 0,
            export: Some(cellplane_api::proto::cell::ExportChunk {
                tenant_id: tenant,
                conversation_id: conversation,
                ..Default::default()
            }),
        }
    });
    let (failed, errors) = tokio::sync::oneshot::channel();
    let mut failed = Some(failed);
    let chunks = export
        .take_while(move |chunk| {
            let ok = match chunk {
                Ok(_) => true,
                Err(status) => {
                    if let Some(failed) = failed.take() {
                        let _ = failed.send(status.clone());
                    }
                    false
                }
            };
            std::future::ready(ok)
        })
        .filter_map(|chunk| std::future::ready(chunk.ok()))
        .map(|chunk| MergeChunk {
            merge_id: String::new(),
            epoch: 0,
            export: Some(chunk),
        });
    let stream = first.chain(chunks).map(move |chunk| MergeChunk {
        merge_id: merge_id.clone(),
        epoch,
        ..chunk
    });
    let answer = owner.merge(stream).await;
    if let Ok(status) = errors.await {
        return Err(status);
    }
    Ok(answer?.into_inner().merged)
}
