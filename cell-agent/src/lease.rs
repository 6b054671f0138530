//! Renews the leases of this agent's cells. Each round asks every cell for a ticket (its own
//! clock's now), renews all of them with one control-plane call, and extends each granted
//! cell's lease from its ticket. A cell the control plane refuses (failed, demoted) is not
//! extended, so it stops taking writes when its lease runs out; so does every cell of an agent
//! that dies.

use std::collections::BTreeSet;
use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::{AdminEmpty, ExtendLeaseRequest};
use cellplane_api::proto::control::RenewLeasesRequest;
use futures::future::join_all;
use tokio::sync::watch;

use crate::cells::LocalCells;

/// How long a cell may take to issue a ticket or take an extension: a cell busy enough to miss
/// it misses that round's renewal (a hung one holds up the round this long).
const CELL_TIMEOUT: Duration = Duration::from_millis(500);

/// The lease length assumed until the control plane first answers.
const FIRST_LEASE: Duration = Duration::from_secs(2);

/// Renewals per lease: a cell keeps its lease through this many rounds missed but one.
const ROUNDS_PER_LEASE: u32 = 6;

/// How long to wait before the next round, given the lease length last granted.
pub fn interval(lease: Duration) -> Duration {
    (lease / ROUNDS_PER_LEASE).max(Duration::from_millis(20))
}

/// Runs until shutdown.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    let mut lease = FIRST_LEASE;
    let mut refused: BTreeSet<String> = BTreeSet::new();
    loop {
        // A round waits on the control plane; shutdown must not wait for it, and a round
        // longer than a lease extends nothing useful.
        tokio::select! {
            granted = tokio::time::timeout(lease, round(&control, &cells, &mut refused)) => {
                if let Ok(Some(length)) = granted {
                    lease = length;
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(interval(lease)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One renewal of every cell; answers the lease length granted.
async fn round(
    control: &ControlPlane,
    cells: &LocalCells,
    refused_before: &mut BTreeSet<String>,
) -> Option<Duration> {
    let tickets = join_all(cells.iter().map(|(cell_id, cell)| {
        let mut admin = cell.admin.clone();
        async move {
            let ticket = tokio::time::timeout(CELL_TIMEOUT, admin.lease_ticket(AdminEmpty {}))
                .await
                .ok()?
                .ok()?
                .into_inner()
                .ticket;
            Some((cell_id.clone(), ticket))
        }
    }))
    .await;
    let tickets: Vec<(String, u64)> = tickets.into_iter().flatten().collect();
    if tickets.is_empty() {
        return None;
    }
    let request = RenewLeasesRequest {
        cell_ids: tickets.iter().map(|(id, _)| id.clone()).collect(),
    };
    let answer = match control
        .call(|mut c| {
            let request = request.clone();
            async move { c.renew_leases(request).await }
        })
        .await
    {
        Ok(answer) => answer,
        Err(status) => {
            tracing::warn!(%status, "lease renewal failed");
            return None;
        }
    };
    let refused: BTreeSet<String> = answer.refused.into_iter().collect();
    if refused != *refused_before && !refused.is_empty() {
        tracing::warn!(cells = ?refused, "the control plane refuses these cells' leases (failed, demoted, or a standby not yet ACTIVE): they take no writes");
    }
    *refused_before = refused;
    let granted: BTreeSet<String> = answer.granted.into_iter().collect();
    let lease_ms = answer.lease_ms;
    join_all(
        tickets
            .into_iter()
            .filter(|(cell_id, _)| granted.contains(cell_id))
            .filter_map(|(cell_id, ticket)| {
                let mut admin = cells.get(&cell_id)?.admin.clone();
                Some(async move {
                    let extended = tokio::time::timeout(
                        CELL_TIMEOUT,
                        admin.extend_lease(ExtendLeaseRequest { ticket, lease_ms }),
                    )
                    .await;
                    if !matches!(extended, Ok(Ok(_))) {
                        tracing::debug!(%cell_id, "lease extension not taken");
                    }
                })
            }),
    )
    .await;
    Some(Duration::from_millis(lease_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_a_sixth_of_the_lease_and_never_busy() {
        assert_eq!(
            interval(Duration::from_millis(1_800)),
            Duration::from_millis(300)
        );
        assert_eq!(
            interval(Duration::from_millis(60)),
            Duration::from_millis(20)
        );
    }
}
