//! Carries out the agent's part of failovers: promoting its standby cells that the control
//! plane chose, then reporting it. What to do is decided by [`next_action`], a pure function of
//! the failover and this agent's cells; promotion is idempotent on the cell, so a restarted
//! agent simply does it again.

use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::PromoteRequest;
use cellplane_api::proto::control::{
    Failover, FailoverPhase, ListFailoversRequest, ReportFailoverRequest,
};
use tokio::sync::watch;
use tonic::Status;

use crate::cells::LocalCells;

/// How often the agent looks for failovers to carry out.
const POLL: Duration = Duration::from_millis(100);

/// How long a promotion (one durable write on the cell) may take before the next round tries
/// again.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent does for one failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Promote `cell_id` (a standby of `primary`), then report the failover.
    Promote {
        failover_id: String,
        cell_id: String,
        primary: String,
    },
}

/// The action a failover asks of this agent: a PROMOTING failover whose standby is one of
/// `own` cells. Everything else is another agent's, or finished.
pub fn next_action(failover: &Failover, own: impl Fn(&str) -> bool) -> Option<Action> {
    let promoting = failover.phase == FailoverPhase::Promoting as i32;
    (promoting && own(&failover.standby_cell)).then(|| Action::Promote {
        failover_id: failover.failover_id.clone(),
        cell_id: failover.standby_cell.clone(),
        primary: failover.cell_id.clone(),
    })
}

/// Runs until shutdown.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            result = round(&control, &cells) => {
                if let Err(status) = result {
                    tracing::warn!(%status, "carrying out failovers failed; retrying");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn round(control: &ControlPlane, cells: &LocalCells) -> Result<(), Status> {
    let failovers = control
        .call(|mut c| async move {
            c.list_failovers(ListFailoversRequest { active_only: true })
                .await
        })
        .await?
        .failovers;
    for failover in &failovers {
        let Some(action) = next_action(failover, |id| cells.contains_key(id)) else {
            continue;
        };
        execute(control, cells, action).await?;
    }
    Ok(())
}

async fn execute(control: &ControlPlane, cells: &LocalCells, action: Action) -> Result<(), Status> {
    let Action::Promote {
        failover_id,
        cell_id,
        primary,
    } = action;
    let Some(cell) = cells.get(&cell_id) else {
        return Ok(());
    };
    let promoted = tokio::time::timeout(
        PROMOTE_TIMEOUT,
        cell.admin.clone().promote(PromoteRequest {
            primary_cell_id: primary.clone(),
        }),
    )
    .await
    .map_err(|_| Status::deadline_exceeded(format!("{cell_id} did not answer the promotion")))??
    .into_inner();
    cell.mark_promoted();
    tracing::warn!(%cell_id, %primary, %failover_id, applied_lsn = promoted.applied_lsn, "promoted the standby to primary");
    control
        .call(|mut c| {
            let request = ReportFailoverRequest {
                failover_id: failover_id.clone(),
                phase: FailoverPhase::Promoting as i32,
            };
            async move { c.report_failover(request).await }
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failover(phase: FailoverPhase, standby: &str) -> Failover {
        Failover {
            failover_id: "fo-7".into(),
            cell_id: "p".into(),
            standby_cell: standby.into(),
            phase: phase as i32,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_promoting_failover_of_an_own_standby_asks_for_a_promotion() {
        let own = |id: &str| id == "s";
        assert_eq!(
            next_action(&failover(FailoverPhase::Promoting, "s"), own),
            Some(Action::Promote {
                failover_id: "fo-7".into(),
                cell_id: "s".into(),
                primary: "p".into()
            })
        );
        assert_eq!(
            next_action(&failover(FailoverPhase::Promoting, "other"), own),
            None
        );
        assert_eq!(
            next_action(&failover(FailoverPhase::Fencing, "s"), own),
            None
        );
        assert_eq!(next_action(&failover(FailoverPhase::Done, "s"), own), None);
    }
}
