//! Keeps each cell running as what the control plane says it is, once failovers changed that:
//! a failed or demoted primary, once it runs again, merges what only it held back into its
//! keys' owners (`merge.rs`), asks to rejoin, and then runs as a standby of the cell that took
//! over (starting over from its snapshot) — or, a LOW cell, as an empty primary; a standby
//! whose primary was failed over follows the successor; a promoted standby waits for its new
//! in-region standby and the remote ones its config lists (set on the running cell); a
//! standby, configured or rejoined, is made ACTIVE once it follows. What to do is [`step`], a
//! pure function of the cell's record, what the cell says it runs as, and the other cells; the
//! supervisor restarts a cell told to follow another primary.

use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::{CellStatusRequest, CellStatusResponse, SetSyncStandbysRequest};
use cellplane_api::proto::control::{
    Cell, CellState, Failover, FailoverPhase, ListCellsRequest, ListFailoversRequest,
    RejoinCellRequest, SetCellStateRequest,
};
use tokio::sync::watch;
use tonic::Status;

use crate::cells::LocalCells;
use crate::supervisor::{Following, Role};

/// How often the agent compares its cells' roles with the control plane's records.
const INTERVAL: Duration = Duration::from_millis(500);

/// How long a cell may take to say what it runs as.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// What one cell needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A failover left it behind and it runs again: merge what only it held into the keys'
    /// owners and complete failover `failover_id`'s ledger.
    MergeBack { failover_id: String },
    /// A failover left it behind and its history is merged back: ask the control plane to
    /// make it a standby of its successor.
    Rejoin,
    /// Run it as the standby of a primary; rejoined when a failover moved its keys away and
    /// it rejoined (JOINING), so a promotion it remembers is over.
    Follow(Following),
    /// It follows its new primary: it may serve as a standby.
    Activate,
    /// A promoted standby: wait for these standbys.
    Sync(Vec<String>),
}

/// The step `record` (the control plane's view of the cell) asks for, given the primary the
/// agent starts the cell as a standby of (`configured`) and the standbys its config has it
/// wait for as a primary (`configured_sync`), what the cell says it runs as (`running`, when
/// it answers), every cell the control plane knows and the newest failover that moved the
/// cell's keys away (`failover`).
pub fn step(
    record: &Cell,
    (configured, configured_sync): (Option<&str>, &[String]),
    running: Option<&CellStatusResponse>,
    cells: &[Cell],
    failover: Option<&Failover>,
) -> Option<Step> {
    let state = CellState::try_from(record.state).ok()?;
    if record.standby_of.is_empty() {
        if matches!(state, CellState::Failed | CellState::Demoted) {
            return match failover.map(|f| (f, FailoverPhase::try_from(f.phase))) {
                // Its export is read from the running cell.
                Some((f, Ok(FailoverPhase::Done))) => running.map(|_| Step::MergeBack {
                    failover_id: f.failover_id.clone(),
                }),
                _ => Some(Step::Rejoin),
            };
        }
        let running = running?;
        // A promoted standby was started without synchronous standbys: its in-region ones, and
        // the remote ones its config lists (a HIGH pair kept synchronous both ways).
        if state == CellState::Active && !running.promoted_from.is_empty() {
            let mut wanted: Vec<String> = cells
                .iter()
                .filter(|c| {
                    c.standby_of == record.cell_id
                        && (c.region == record.region || configured_sync.contains(&c.cell_id))
                })
                .map(|c| c.cell_id.clone())
                .collect();
            wanted.sort();
            let mut now = running
                .sync
                .as_ref()
                .map(|s| s.standbys.clone())
                .unwrap_or_default();
            now.sort();
            if wanted != now {
                return Some(Step::Sync(wanted));
            }
        }
        return None;
    }
    // A cell running as a primary is told to follow only when the record is JOINING, that is
    // once it rejoined after a failover moved its keys away: it may run so because its config
    // started it as the primary it was promoted to. A JOINING cell is never a failover's
    // target, while an ACTIVE one may have been promoted since the records were read.
    let runs_as_primary = running.is_some_and(|r| r.standby_of.is_empty());
    let joining = state == CellState::Joining;
    let follow = if runs_as_primary {
        joining
    } else {
        configured != Some(record.standby_of.as_str())
    };
    if follow {
        let endpoint = cells
            .iter()
            .find(|c| c.cell_id == record.standby_of)?
            .endpoint
            .clone();
        return Some(Step::Follow(Following {
            primary: record.standby_of.clone(),
            endpoint,
            rejoined: joining,
        }));
    }
    // Connected means it applied a batch of its primary's current stream, which opens with the
    // snapshot's first batch when it must bootstrap: made ACTIVE before that, a standby
    // starting over would be a failover target holding nothing.
    let following = running
        .filter(|r| r.standby_of == record.standby_of)
        .and_then(|r| r.replica.as_ref())
        .is_some_and(|r| r.connected && !r.bootstrapping);
    (state == CellState::Joining && following).then_some(Step::Activate)
}

/// Where a standby that failover `promoting` is promoting must run: as the failed cell's
/// standby, when it does not answer (`running` is `None`) and the agent would start it as
/// anything else. A failover clears the standby's `standby_of` as it moves the keys, before
/// the standby is promoted; an agent that restarts in between starts the cell as its config
/// says — a primary, for a cell its config made one before failovers made it a standby — and
/// the cell, whose data is still an unpromoted standby's, refuses to start so. It cannot be
/// promoted until it runs, and the failover would wait for ever. Started as the standby it
/// is, it is promoted in place; a cell promoted already stays a primary when started as a
/// standby of the cell it was promoted from, so this is safe whatever happened meanwhile.
pub fn start_to_promote(
    record: &Cell,
    configured: Option<&str>,
    running: Option<&CellStatusResponse>,
    cells: &[Cell],
    promoting: Option<&Failover>,
) -> Option<Step> {
    let failover = promoting?;
    let waits = running.is_none()
        && record.standby_of.is_empty()
        && failover.standby_cell == record.cell_id
        && failover.phase == FailoverPhase::Promoting as i32
        && configured != Some(failover.cell_id.as_str());
    if !waits {
        return None;
    }
    let endpoint = cells
        .iter()
        .find(|c| c.cell_id == failover.cell_id)?
        .endpoint
        .clone();
    Some(Step::Follow(Following {
        primary: failover.cell_id.clone(),
        endpoint,
        rejoined: false,
    }))
}

/// Runs until shutdown.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            result = round(&control, &cells) => {
                if let Err(status) = result {
                    tracing::debug!(%status, "checking the cells' roles failed; trying again");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn round(control: &ControlPlane, cells: &LocalCells) -> Result<(), Status> {
    let all = control
        .call(|mut c| async move { c.list_cells(ListCellsRequest::default()).await })
        .await?
        .cells;
    let left_behind = |c: &Cell| {
        c.standby_of.is_empty()
            && [CellState::Failed as i32, CellState::Demoted as i32].contains(&c.state)
    };
    // Failovers are read only when one of its cells was left behind by one.
    let failovers = if cells
        .iter()
        .any(|(id, _)| all.iter().any(|c| c.cell_id == *id && left_behind(c)))
    {
        control
            .call(|mut c| async move {
                c.list_failovers(ListFailoversRequest { active_only: false })
                    .await
            })
            .await?
            .failovers
    } else {
        Vec::new()
    };
    // Failovers under way, read once a cell that may be waiting for its promotion does not
    // answer.
    let mut active: Option<Vec<Failover>> = None;
    for (cell_id, cell) in cells.iter() {
        let Some(record) = all.iter().find(|c| c.cell_id == *cell_id) else {
            continue;
        };
        let failover = failovers.iter().rev().find(|f| {
            f.cell_id == *cell_id
                && [FailoverPhase::Done as i32, FailoverPhase::Merged as i32].contains(&f.phase)
        });
        // A cell that does not answer (it refuses to start in a role its disk contradicts,
        // say) can still be told whom to follow.
        let running = tokio::time::timeout(
            STATUS_TIMEOUT,
            cell.admin
                .clone()
                .cell_status(CellStatusRequest { without_keys: true }),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(tonic::Response::into_inner);
        let configured = cell.configured_primary();
        let configured_sync = cell.spec.sync_standbys.clone().unwrap_or_default();
        if running.is_none() && record.standby_of.is_empty() && active.is_none() {
            let listed = control
                .call(|mut c| async move {
                    c.list_failovers(ListFailoversRequest { active_only: true })
                        .await
                })
                .await?;
            active = Some(listed.failovers);
        }
        let promoting = active.iter().flatten().find(|f| f.standby_cell == *cell_id);
        let next = start_to_promote(
            record,
            configured.as_deref(),
            running.as_ref(),
            &all,
            promoting,
        )
        .or_else(|| {
            step(
                record,
                (configured.as_deref(), &configured_sync),
                running.as_ref(),
                &all,
                failover,
            )
        });
        let Some(step) = next else {
            continue;
        };
        match step {
            Step::MergeBack { failover_id } => {
                let Some(failover) = failover else {
                    continue;
                };
                let merged = crate::merge::merge_back(control, cell, failover).await?;
                let ledger = merged.ledger.unwrap_or_default();
                tracing::warn!(
                    %cell_id,
                    %failover_id,
                    missing_messages = ledger.missing_messages,
                    "merged what only the failed cell held back into its keys' owners"
                );
            }
            Step::Rejoin => {
                let request = RejoinCellRequest {
                    cell_id: cell_id.clone(),
                };
                match control
                    .call(|mut c| {
                        let request = request.clone();
                        async move { c.rejoin_cell(request).await }
                    })
                    .await
                {
                    Ok(joined) => {
                        tracing::warn!(%cell_id, standby_of = %joined.standby_of, "rejoins as a standby of the cell that took over")
                    }
                    Err(status) => tracing::debug!(%cell_id, %status, "cannot rejoin yet"),
                }
            }
            Step::Follow(following) => {
                tracing::warn!(%cell_id, primary = %following.primary, "restarting the cell as a standby of its new primary");
                cell.set_role(Role {
                    following: Some(following),
                    sync_standbys: Some(Vec::new()),
                });
            }
            Step::Activate => {
                let request = SetCellStateRequest {
                    cell_id: cell_id.clone(),
                    state: CellState::Active as i32,
                };
                control
                    .call(|mut c| {
                        let request = request.clone();
                        async move { c.set_cell_state(request).await }
                    })
                    .await?;
                tracing::info!(%cell_id, "the standby follows its primary: ACTIVE");
            }
            Step::Sync(standbys) => {
                cell.admin
                    .clone()
                    .set_sync_standbys(SetSyncStandbysRequest {
                        standbys: standbys.clone(),
                    })
                    .await?;
                tracing::warn!(%cell_id, ?standbys, "the promoted cell waits for its new standbys");
                // Kept for its next start; the running cell has them already.
                cell.set_role(Role {
                    following: None,
                    sync_standbys: Some(standbys),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::proto::cell::{ReplicaStatus, SyncStatus};

    fn cell(id: &str, region: &str, state: CellState, standby_of: &str) -> Cell {
        Cell {
            cell_id: id.into(),
            region: region.into(),
            state: state as i32,
            standby_of: standby_of.into(),
            endpoint: format!("{id}:1"),
            ..Default::default()
        }
    }

    fn running(standby_of: &str) -> CellStatusResponse {
        CellStatusResponse {
            standby_of: standby_of.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_rejoined_cell_its_config_started_as_a_primary_is_told_to_follow() {
        // Promoted from s, then failed over back to s: configured as s's standby, restarted
        // by its agent as the config says, it kept its promotion and runs as a primary.
        let successor = cell("s", "hz", CellState::Active, "");
        let rejoined = cell("p", "hz", CellState::Joining, "s");
        let all = [successor, rejoined.clone()];
        assert_eq!(
            step(&rejoined, (Some("s"), &[]), Some(&running("")), &all, None),
            Some(Step::Follow(Following {
                primary: "s".into(),
                endpoint: "s:1".into(),
                rejoined: true,
            }))
        );
        // An ACTIVE one running as a primary may have been promoted a moment ago, after the
        // records were read: it is not restarted, whatever its config says.
        let active = cell("p", "hz", CellState::Active, "s");
        for configured in [Some("s"), None] {
            assert_eq!(
                step(&active, (configured, &[]), Some(&running("")), &all, None),
                None
            );
        }
    }

    #[test]
    fn a_standby_being_promoted_that_does_not_run_is_started_as_the_failed_cells_standby() {
        // The failover moved the keys and cleared s's standby_of; its agent restarted and
        // started s as its config says, a primary, which its data refuses.
        let failed = cell("p", "fs", CellState::Failed, "");
        let promoted = cell("s", "hz", CellState::Active, "");
        let all = [failed, promoted.clone()];
        let failover = |phase: FailoverPhase, standby: &str| Failover {
            failover_id: "fo-1".into(),
            cell_id: "p".into(),
            standby_cell: standby.into(),
            phase: phase as i32,
            ..Default::default()
        };
        let promoting = failover(FailoverPhase::Promoting, "s");
        assert_eq!(
            start_to_promote(&promoted, None, None, &all, Some(&promoting)),
            Some(Step::Follow(Following {
                primary: "p".into(),
                endpoint: "p:1".into(),
                rejoined: false,
            }))
        );
        // Running, it is promoted where it is; started as p's standby already, it is left to
        // start; another cell's failover, or one past promoting, is none of its business.
        assert_eq!(
            start_to_promote(&promoted, None, Some(&running("p")), &all, Some(&promoting)),
            None
        );
        assert_eq!(
            start_to_promote(&promoted, Some("p"), None, &all, Some(&promoting)),
            None
        );
        for other in [
            failover(FailoverPhase::Promoting, "x"),
            failover(FailoverPhase::Done, "s"),
        ] {
            assert_eq!(
                start_to_promote(&promoted, None, None, &all, Some(&other)),
                None
            );
        }
        // A standby still recorded as one is not this case: the roles step follows its record.
        let standby = cell("s", "hz", CellState::Active, "p");
        assert_eq!(
            start_to_promote(&standby, None, None, &all, Some(&promoting)),
            None
        );
    }

    #[test]
    fn a_cell_left_behind_rejoins_then_follows_then_serves() {
        let successor = cell("s", "hz", CellState::Active, "");
        let failed = cell("p", "hz", CellState::Failed, "");
        let all = [successor.clone(), failed.clone()];
        assert_eq!(
            step(&failed, (None, &[]), None, &all, None),
            Some(Step::Rejoin)
        );
        let rejoined = cell("p", "hz", CellState::Joining, "s");
        assert_eq!(
            step(&rejoined, (None, &[]), None, &all, None),
            Some(Step::Follow(Following {
                primary: "s".into(),
                endpoint: "s:1".into(),
                rejoined: true,
            }))
        );
        let mut bootstrapping = running("s");
        bootstrapping.replica = Some(ReplicaStatus {
            connected: true,
            bootstrapping: true,
            ..Default::default()
        });
        assert_eq!(
            step(
                &rejoined,
                (Some("s"), &[]),
                Some(&bootstrapping),
                &all,
                None
            ),
            None
        );
        let mut following = running("s");
        following.replica = Some(ReplicaStatus {
            connected: true,
            ..Default::default()
        });
        assert_eq!(
            step(&rejoined, (Some("s"), &[]), Some(&following), &all, None),
            Some(Step::Activate)
        );
        let active = cell("p", "hz", CellState::Active, "s");
        assert_eq!(
            step(&active, (Some("s"), &[]), Some(&following), &all, None),
            None
        );
    }

    #[test]
    fn a_failed_cell_merges_back_once_it_answers_then_rejoins() {
        let failed = cell("p", "hz", CellState::Failed, "");
        let all = [cell("s", "hz", CellState::Active, ""), failed.clone()];
        let mut failover = Failover {
            failover_id: "fo-7".into(),
            cell_id: "p".into(),
            phase: FailoverPhase::Done as i32,
            ..Default::default()
        };
        assert_eq!(
            step(&failed, (None, &[]), None, &all, Some(&failover)),
            None,
            "its export is read from the running cell"
        );
        assert_eq!(
            step(
                &failed,
                (None, &[]),
                Some(&running("")),
                &all,
                Some(&failover)
            ),
            Some(Step::MergeBack {
                failover_id: "fo-7".into()
            })
        );
        failover.phase = FailoverPhase::Merged as i32;
        assert_eq!(
            step(
                &failed,
                (None, &[]),
                Some(&running("")),
                &all,
                Some(&failover)
            ),
            Some(Step::Rejoin)
        );
    }

    #[test]
    fn a_promoted_cell_waits_for_its_in_region_and_configured_standbys_and_others_are_left_alone() {
        let promoted = cell("s", "hz", CellState::Active, "");
        let all = [
            promoted.clone(),
            cell("p", "hz", CellState::Joining, "s"),
            cell("r", "bj", CellState::Active, "s"),
        ];
        let mut as_promoted = running("");
        as_promoted.promoted_from = "p".into();
        assert_eq!(
            step(&promoted, (Some("p"), &[]), Some(&as_promoted), &all, None),
            Some(Step::Sync(vec!["p".into()]))
        );
        as_promoted.sync = Some(SyncStatus {
            standbys: vec!["p".into()],
            ..Default::default()
        });
        assert_eq!(
            step(&promoted, (Some("p"), &[]), Some(&as_promoted), &all, None),
            None
        );
        // The remote standby too, when the cell's config lists it: a HIGH pair that was
        // synchronous across regions stays so after a failover.
        as_promoted.sync = None;
        assert_eq!(
            step(
                &promoted,
                (Some("p"), &["r".to_string()]),
                Some(&as_promoted),
                &all,
                None
            ),
            Some(Step::Sync(vec!["p".into(), "r".into()]))
        );
        // A primary that was never promoted keeps its configured synchronous standbys.
        assert_eq!(
            step(&promoted, (None, &[]), Some(&running("")), &all, None),
            None
        );
        // A configured standby that runs as configured needs nothing.
        let standby = cell("r", "bj", CellState::Active, "s");
        assert_eq!(
            step(&standby, (Some("s"), &[]), Some(&running("s")), &all, None),
            None
        );
        // Its primary failed over: it follows the successor, answering or not.
        let moved = cell("r", "bj", CellState::Active, "t");
        let all = [cell("t", "hz", CellState::Active, ""), moved.clone()];
        assert_eq!(
            step(&moved, (Some("s"), &[]), None, &all, None),
            Some(Step::Follow(Following {
                primary: "t".into(),
                endpoint: "t:1".into(),
                rejoined: false,
            }))
        );
    }
}
