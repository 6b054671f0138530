//! Carries out the agent's part of failovers: for a PLANNED one, freezing its primary's keys,
//! waiting until its standby caught up with the frozen LSN, and thawing when it is given up;
//! for every one, promoting its standby that the control plane chose. Each step is reported.
//! What to do is decided by [`next_action`], a pure function of the failover and this agent's
//! cells; every step is idempotent on the cell, so a restarted agent simply does it again.

use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::cell::{AdminEmpty, CellStatusRequest, PromoteRequest};
use cellplane_api::proto::control::{
    Failover, FailoverPhase, ListFailoversRequest, ReportFailoverRequest,
};
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::Channel;

use crate::cells::LocalCells;

/// How often the agent looks for failovers to carry out.
const POLL: Duration = Duration::from_millis(100);

/// How often it looks while a failover concerns one of its cells.
const BUSY_POLL: Duration = Duration::from_millis(10);

/// How long a freeze, thaw or promotion (one durable write on the cell) may take before the
/// next round tries again.
const CELL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a catching-up standby is asked where it stands, and for how long at most (the
/// control plane gives the failover up after its own timeout).
const CATCH_UP_POLL: Duration = Duration::from_millis(5);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

/// What the agent does for one failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// PLANNED: freeze every key of `cell_id` (one of this agent's primaries), then report the
    /// LSN it froze at.
    Freeze {
        failover_id: String,
        cell_id: String,
    },
    /// PLANNED: wait until `cell_id` (one of this agent's standbys) has applied its primary's
    /// log up to `frozen_lsn`, report it, and promote it once the keys switched.
    CatchUp {
        failover_id: String,
        cell_id: String,
        primary: String,
        frozen_lsn: u64,
    },
    /// Promote `cell_id` (a standby of `primary`), then report the failover.
    Promote {
        failover_id: String,
        cell_id: String,
        primary: String,
    },
    /// PLANNED, given up: thaw every key of `cell_id`, then report.
    Thaw {
        failover_id: String,
        cell_id: String,
    },
}

/// The action a failover asks of this agent, whose cells `own` names: its primary's part
/// (freeze, thaw) or its standby's (catch up, promote). Everything else is another agent's,
/// or finished.
pub fn next_action(failover: &Failover, own: impl Fn(&str) -> bool) -> Option<Action> {
    let phase = FailoverPhase::try_from(failover.phase).ok()?;
    let failover_id = failover.failover_id.clone();
    let (primary, standby) = (&failover.cell_id, &failover.standby_cell);
    match phase {
        FailoverPhase::Freezing if own(primary) => Some(Action::Freeze {
            failover_id,
            cell_id: primary.clone(),
        }),
        FailoverPhase::CatchingUp if own(standby) => Some(Action::CatchUp {
            failover_id,
            cell_id: standby.clone(),
            primary: primary.clone(),
            frozen_lsn: failover.frozen_lsn,
        }),
        FailoverPhase::Promoting if own(standby) => Some(Action::Promote {
            failover_id,
            cell_id: standby.clone(),
            primary: primary.clone(),
        }),
        FailoverPhase::Thawing if own(primary) => Some(Action::Thaw {
            failover_id,
            cell_id: primary.clone(),
        }),
        _ => None,
    }
}

/// Runs until shutdown: looks every `POLL`, and every `BUSY_POLL` while a failover concerns
/// one of its cells, so a planned failover's steps follow each other quickly.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    let mut pause = POLL;
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            result = round(&control, &cells) => match result {
                Ok(busy) => pause = if busy { BUSY_POLL } else { POLL },
                Err(status) => {
                    tracing::warn!(%status, "carrying out failovers failed; retrying");
                    pause = POLL;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// One look at the unfinished failovers; answers whether one concerns this agent's cells.
async fn round(control: &ControlPlane, cells: &LocalCells) -> Result<bool, Status> {
    let failovers = control
        .call(|mut c| async move {
            c.list_failovers(ListFailoversRequest { active_only: true })
                .await
        })
        .await?
        .failovers;
    let own = |id: &str| cells.contains_key(id);
    let busy = failovers
        .iter()
        .any(|f| own(&f.cell_id) || own(&f.standby_cell));
    for failover in &failovers {
        if let Some(action) = next_action(failover, own) {
            execute(control, cells, action).await?;
        }
    }
    Ok(busy)
}

async fn report(
    control: &ControlPlane,
    failover_id: &str,
    phase: FailoverPhase,
    lsn: u64,
) -> Result<Failover, Status> {
    control
        .call(|mut c| {
            let request = ReportFailoverRequest {
                failover_id: failover_id.to_string(),
                phase: phase as i32,
                lsn,
                merged: Vec::new(),
            };
            async move { c.report_failover(request).await }
        })
        .await
}

fn admin(cells: &LocalCells, cell_id: &str) -> Result<CellAdminClient<Channel>, Status> {
    cells
        .get(cell_id)
        .map(|cell| cell.admin.clone())
        .ok_or_else(|| Status::not_found(format!("cell {cell_id} is not this agent's")))
}

async fn execute(control: &ControlPlane, cells: &LocalCells, action: Action) -> Result<(), Status> {
    match action {
        Action::Freeze {
            failover_id,
            cell_id,
        } => {
            let frozen = tokio::time::timeout(
                CELL_TIMEOUT,
                admin(cells, &cell_id)?.freeze_all(AdminEmpty {}),
            )
            .await
            .map_err(|_| Status::deadline_exceeded(format!("{cell_id} did not freeze")))??
            .into_inner();
            tracing::warn!(%cell_id, %failover_id, last_lsn = frozen.last_lsn, "froze every key for a planned failover");
            report(
                control,
                &failover_id,
                FailoverPhase::Freezing,
                frozen.last_lsn,
            )
            .await?;
        }
        Action::CatchUp {
            failover_id,
            cell_id,
            primary,
            frozen_lsn,
        } => {
            let mut standby = admin(cells, &cell_id)?;
            let deadline = tokio::time::Instant::now() + CATCH_UP_LIMIT;
            let applied = loop {
                let status = tokio::time::timeout(
                    CELL_TIMEOUT,
                    standby.cell_status(CellStatusRequest { without_keys: true }),
                )
                .await
                .map_err(|_| Status::deadline_exceeded(format!("{cell_id} did not answer")))??
                .into_inner();
                let applied = status.replica.map_or(0, |r| r.applied_lsn);
                if applied >= frozen_lsn {
                    break applied;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Status::deadline_exceeded(format!(
                        "{cell_id} applied LSN {applied} of the {frozen_lsn} frozen on {primary}"
                    )));
                }
                tokio::time::sleep(CATCH_UP_POLL).await;
            };
            let now = report(control, &failover_id, FailoverPhase::CatchingUp, applied).await?;
            // The answer is the failover after the switch: promote at once, the writers wait.
            if now.phase == FailoverPhase::Promoting as i32 {
                promote(control, cells, &failover_id, &cell_id, &primary).await?;
            }
        }
        Action::Promote {
            failover_id,
            cell_id,
            primary,
        } => promote(control, cells, &failover_id, &cell_id, &primary).await?,
        Action::Thaw {
            failover_id,
            cell_id,
        } => {
            tokio::time::timeout(
                CELL_TIMEOUT,
                admin(cells, &cell_id)?.thaw_all(AdminEmpty {}),
            )
            .await
            .map_err(|_| Status::deadline_exceeded(format!("{cell_id} did not thaw")))??;
            tracing::warn!(%cell_id, %failover_id, "planned failover given up: thawed every key");
            report(control, &failover_id, FailoverPhase::Thawing, 0).await?;
        }
    }
    Ok(())
}

async fn promote(
    control: &ControlPlane,
    cells: &LocalCells,
    failover_id: &str,
    cell_id: &str,
    primary: &str,
) -> Result<(), Status> {
    let Some(cell) = cells.get(cell_id) else {
        return Ok(());
    };
    let promoted = tokio::time::timeout(
        CELL_TIMEOUT,
        cell.admin.clone().promote(PromoteRequest {
            primary_cell_id: primary.to_string(),
        }),
    )
    .await
    .map_err(|_| Status::deadline_exceeded(format!("{cell_id} did not answer the promotion")))??
    .into_inner();
    cell.mark_promoted();
    tracing::warn!(%cell_id, %primary, %failover_id, applied_lsn = promoted.applied_lsn, "promoted the standby to primary");
    report(
        control,
        failover_id,
        FailoverPhase::Promoting,
        promoted.applied_lsn,
    )
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
    fn a_planned_failover_asks_the_primarys_agent_and_then_the_standbys() {
        let primary_side = |id: &str| id == "p";
        let standby_side = |id: &str| id == "s";
        let mut f = failover(FailoverPhase::Freezing, "s");
        f.frozen_lsn = 40;
        assert_eq!(
            next_action(&f, primary_side),
            Some(Action::Freeze {
                failover_id: "fo-7".into(),
                cell_id: "p".into()
            })
        );
        assert_eq!(next_action(&f, standby_side), None);
        f.phase = FailoverPhase::CatchingUp as i32;
        assert_eq!(next_action(&f, primary_side), None);
        assert_eq!(
            next_action(&f, standby_side),
            Some(Action::CatchUp {
                failover_id: "fo-7".into(),
                cell_id: "s".into(),
                primary: "p".into(),
                frozen_lsn: 40
            })
        );
        f.phase = FailoverPhase::Thawing as i32;
        assert_eq!(
            next_action(&f, primary_side),
            Some(Action::Thaw {
                failover_id: "fo-7".into(),
                cell_id: "p".into()
            })
        );
        f.phase = FailoverPhase::RolledBack as i32;
        assert_eq!(next_action(&f, primary_side), None);
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
