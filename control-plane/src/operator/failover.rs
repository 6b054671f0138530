//! The `CellFailover` controller: each object starts its failover once (PLANNED or FORCED)
//! and mirrors its progress: phase, keys moved, the time to recovery and the RPO ledger.
//! Starting is idempotent as for migrations (a [`Run`]): an object whose status lost the id
//! adopts the first ops failover of its cell after the newest recorded before it started.
//! Deleting the object rolls back a PLANNED failover not yet promoting its standby
//! (CancelFailover: the cell thaws and keeps its keys); any other runs to its end (a FORCED one
//! stopped renewing the cell's lease); the object goes when it has.

use std::sync::Arc;
use std::time::Duration;

use cellplane_api::proto::control as pb;
use cellplane_crds::{CellFailover, CellFailoverSpec, CellFailoverStatus, FailoverMode, RpoLedger};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};
use tonic::Code;

use super::conditions::Conditions;
use super::convert::{failover_phase, name, rfc3339};
use super::run::{self, Decision, Deletion, Found, Run};
use super::{Context, Error, writes};
use crate::failover::record::parse_id;
use crate::limits::OPERATOR_PROGRESS_POLL_MS;

/// Among the failovers the control plane keeps, the one this object started: of its cell,
/// not automatic, numbered after `after` (the newest when the object started its own); the
/// first.
pub fn adoptable<'a>(
    spec: &CellFailoverSpec,
    after: u64,
    failovers: &'a [pb::Failover],
) -> Option<&'a pb::Failover> {
    failovers
        .iter()
        .filter_map(|f| parse_id(&f.failover_id).map(|n| (n, f)))
        .filter(|(n, f)| f.cell_id == spec.cell && !f.automatic && *n > after)
        .min_by_key(|(n, _)| *n)
        .map(|(_, f)| f)
}

/// The number of the newest of `failovers` (0 for none).
pub fn newest(failovers: &[pb::Failover]) -> u64 {
    failovers
        .iter()
        .filter_map(|f| parse_id(&f.failover_id))
        .max()
        .unwrap_or(0)
}

pub fn mode_to_proto(mode: FailoverMode) -> pb::FailoverMode {
    match mode {
        FailoverMode::Planned => pb::FailoverMode::Planned,
        FailoverMode::Forced => pb::FailoverMode::Forced,
    }
}

pub fn finished(phase: pb::FailoverPhase) -> bool {
    use pb::FailoverPhase::*;
    matches!(phase, Done | RolledBack | Merged)
}

pub fn decide(f: &pb::Failover) -> Decision<CellFailoverStatus> {
    let phase = failover_phase(f.phase);
    let ledger = f.ledger.as_ref().map(|l| RpoLedger {
        primary_lsn: l.primary_lsn,
        standby_lsn: l.standby_lsn,
        in_sync: l.in_sync,
        lsns_behind: l.lsns_behind,
        merged: l.merged,
        missing_messages: l.missing_messages,
    });
    let status = CellFailoverStatus {
        failover_id: Some(f.failover_id.clone()),
        phase: Some(name(phase.as_str_name(), "FAILOVER_PHASE_")),
        standby_cell: (!f.standby_cell.is_empty()).then(|| f.standby_cell.clone()),
        moved: f.keys_moved,
        rto_ms: (f.done_ms >= f.created_ms && f.done_ms > 0).then(|| f.done_ms - f.created_ms),
        ledger: ledger.clone(),
        started_at: rfc3339(f.created_ms),
        finished_at: rfc3339(match phase {
            pb::FailoverPhase::Merged => f.merged_ms,
            _ => f.done_ms,
        }),
        ..CellFailoverStatus::default()
    };
    let took_over = format!(
        "{} took over {} keys of {}",
        f.standby_cell, f.keys_moved, f.cell_id
    );
    let (conditions, poll) = match phase {
        pb::FailoverPhase::Done | pb::FailoverPhase::Merged => {
            let conditions = Conditions::ready("Done", took_over);
            match ledger {
                Some(l) if !l.in_sync && !l.merged && l.lsns_behind > 0 => (
                    conditions.and_degraded(
                        "MayHaveLost",
                        format!(
                            "the standby may lack {} cell-log records until {} comes back and its history is merged",
                            l.lsns_behind, f.cell_id
                        ),
                    ),
                    false,
                ),
                _ => (conditions, false),
            }
        }
        pb::FailoverPhase::RolledBack => (
            Conditions::degraded(
                "RolledBack",
                format!("{} kept its keys: {}", f.cell_id, f.error),
            ),
            false,
        ),
        other => (
            Conditions::progressing("FailingOver", name(other.as_str_name(), "FAILOVER_PHASE_")),
            true,
        ),
    };
    Decision {
        status,
        conditions,
        poll,
    }
}

async fn fetch(ctx: &Context, object: &CellFailover) -> Result<Found<pb::Failover>, Error> {
    let status = object.status.as_ref();
    if let Some(id) = status.and_then(|s| s.failover_id.clone()) {
        let answer = ctx
            .call(|mut c| {
                let request = pb::GetFailoverRequest {
                    failover_id: id.clone(),
                };
                async move { c.get_failover(request).await }
            })
            .await?;
        let run = match answer {
            Ok(f) => Some(f),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(Error::Refused(status.message().into())),
        };
        return Ok(Found { run, newest: 0 });
    }
    let listed = ctx
        .call(|mut c| async move {
            c.list_failovers(pb::ListFailoversRequest { active_only: false })
                .await
        })
        .await?
        .map_err(|s| Error::Refused(s.message().into()))?;
    let run = status
        .and_then(|s| s.started_after)
        .and_then(|after| adoptable(&object.spec, after, &listed.failovers))
        .cloned();
    Ok(Found {
        run,
        newest: newest(&listed.failovers),
    })
}

impl Run for CellFailover {
    type Remote = pb::Failover;
    const START: &'static str = "FailoverCell";

    fn run_id(status: &CellFailoverStatus) -> Option<&String> {
        status.failover_id.as_ref()
    }

    fn phase(status: &CellFailoverStatus) -> Option<&String> {
        status.phase.as_ref()
    }

    fn started_after(status: &CellFailoverStatus) -> Option<u64> {
        status.started_after
    }

    fn set_started_after(status: &mut CellFailoverStatus, after: u64) {
        status.started_after = Some(after);
    }

    fn decide(run: &pb::Failover) -> Decision<CellFailoverStatus> {
        decide(run)
    }

    fn describe(run: &pb::Failover) -> String {
        format!(
            "failover {} of {} to {}",
            run.failover_id, run.cell_id, run.standby_cell
        )
    }

    /// The Control API has no watch of a failover: look again after a poll interval.
    async fn changed(_ctx: &Context, _run: &pb::Failover) {
        tokio::time::sleep(Duration::from_millis(OPERATOR_PROGRESS_POLL_MS)).await;
    }

    async fn start(&self, ctx: &Context) -> Result<Result<pb::Failover, tonic::Status>, Error> {
        ctx.call(|mut c| {
            let request = pb::FailoverCellRequest {
                cell_id: self.spec.cell.clone(),
                mode: mode_to_proto(self.spec.mode) as i32,
                reason: self.spec.reason.clone(),
            };
            async move { c.failover_cell(request).await }
        })
        .await
    }
}

pub async fn reconcile(object: Arc<CellFailover>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let api: Api<CellFailover> = Api::all(ctx.kube.clone());
    let failover = fetch(&ctx, &object).await?;
    if object.metadata.deletion_timestamp.is_some() {
        return delete(&api, &object, &ctx, failover.run).await;
    }
    if failover.run.is_none()
        && object
            .status
            .as_ref()
            .and_then(|s| s.failover_id.as_ref())
            .is_some()
    {
        // The control plane no longer keeps it; the status says how it ended.
        return Ok(Requeue::await_change());
    }
    run::reconcile(&api, &*object, &ctx, failover).await
}

/// What deleting the object needs: a PLANNED failover not yet promoting its standby is rolled
/// back; any other runs to its end (a FORCED one stopped renewing the cell's lease, so
/// finishing is the safe way out).
pub fn decide_deletion(failover: Option<&pb::Failover>) -> Deletion {
    let Some(f) = failover else {
        return Deletion::Release;
    };
    let phase = failover_phase(f.phase);
    if finished(phase) {
        return Deletion::Release;
    }
    let planned = f.mode == pb::FailoverMode::Planned as i32;
    match phase {
        pb::FailoverPhase::Freezing | pb::FailoverPhase::CatchingUp if planned => Deletion::Cancel,
        _ => Deletion::Wait,
    }
}

async fn delete(
    api: &Api<CellFailover>,
    object: &CellFailover,
    ctx: &Context,
    failover: Option<pb::Failover>,
) -> Result<Requeue, Error> {
    if !writes::has_finalizer(object) {
        return Ok(Requeue::await_change());
    }
    match decide_deletion(failover.as_ref()) {
        Deletion::Cancel => {
            let id = failover.map(|f| f.failover_id).unwrap_or_default();
            let answer = ctx
                .call(|mut c| {
                    let request = pb::CancelFailoverRequest {
                        failover_id: id.clone(),
                        reason: format!("CellFailover {} deleted", object.name_any()),
                    };
                    async move { c.cancel_failover(request).await }
                })
                .await?;
            let (warning, reason, note) = match answer {
                Ok(_) => (
                    false,
                    "Cancelled",
                    format!("failover {id} rolled back: the object was deleted before the switch"),
                ),
                // It reached the switch meanwhile: it runs to its end.
                Err(status) => (true, "NotCancelled", status.message().to_string()),
            };
            ctx.event(object, warning, reason, "CancelFailover", note)
                .await;
            Ok(super::requeue(ctx, true))
        }
        Deletion::Wait => Ok(super::requeue(ctx, true)),
        Deletion::Release => {
            writes::remove_finalizer(api, object).await?;
            Ok(Requeue::await_change())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failover(id: &str, cell: &str, created_ms: u64, automatic: bool) -> pb::Failover {
        pb::Failover {
            failover_id: id.into(),
            cell_id: cell.into(),
            created_ms,
            automatic,
            phase: pb::FailoverPhase::Fencing as i32,
            ..pb::Failover::default()
        }
    }

    #[test]
    fn an_object_adopts_only_a_later_ops_failover_of_its_cell() {
        let spec = CellFailoverSpec {
            cell: "c1".into(),
            mode: FailoverMode::Forced,
            reason: String::new(),
        };
        // fo-5 began in the same second as the object but before it recorded fo-5 as newest.
        let runs = [
            failover("fo-5", "c1", 1_000, false),
            failover("fo-6", "c1", 1_000, true),
            failover("fo-7", "c2", 1_000, false),
            failover("fo-9", "c1", 1_000, false),
            failover("fo-8", "c1", 1_000, false),
        ];
        let found = adoptable(&spec, 5, &runs).map(|f| f.failover_id.as_str());
        assert_eq!(found, Some("fo-8"));
        assert_eq!(newest(&runs), 9);
        assert!(adoptable(&spec, 9, &runs).is_none());
    }

    #[test]
    fn deleting_rolls_back_only_a_planned_failover_before_its_promotion() {
        use pb::FailoverPhase::*;
        let run = |mode: pb::FailoverMode, phase: pb::FailoverPhase| pb::Failover {
            mode: mode as i32,
            phase: phase as i32,
            ..failover("fo-1", "c1", 0, false)
        };
        let planned = pb::FailoverMode::Planned;
        for phase in [Freezing, CatchingUp] {
            let f = run(planned, phase);
            assert_eq!(decide_deletion(Some(&f)), Deletion::Cancel, "{phase:?}");
        }
        for phase in [Promoting, Thawing] {
            let f = run(planned, phase);
            assert_eq!(decide_deletion(Some(&f)), Deletion::Wait, "{phase:?}");
        }
        let forced = run(pb::FailoverMode::Forced, Fencing);
        assert_eq!(decide_deletion(Some(&forced)), Deletion::Wait);
        for phase in [Done, RolledBack, Merged] {
            let f = run(planned, phase);
            assert_eq!(decide_deletion(Some(&f)), Deletion::Release, "{phase:?}");
        }
        assert_eq!(decide_deletion(None), Deletion::Release);
    }

    #[test]
    fn a_failover_behind_its_standby_is_done_but_degraded_until_merged() {
        let behind = pb::Failover {
            phase: pb::FailoverPhase::Done as i32,
            standby_cell: "s1".into(),
            created_ms: 1_000,
            done_ms: 1_800,
            keys_moved: 4,
            ledger: Some(pb::RpoLedger {
                lsns_behind: 3,
                ..pb::RpoLedger::default()
            }),
            ..failover("f", "c1", 1_000, false)
        };
        let d = decide(&behind);
        assert!(d.conditions.ready.status && d.conditions.degraded.status && !d.poll);
        assert_eq!(d.status.rto_ms, Some(800));
        assert_eq!(d.status.moved, 4);
        let merged = pb::Failover {
            phase: pb::FailoverPhase::Merged as i32,
            ledger: Some(pb::RpoLedger {
                lsns_behind: 3,
                merged: true,
                ..pb::RpoLedger::default()
            }),
            ..behind
        };
        assert!(!decide(&merged).conditions.degraded.status);
        let fencing = failover("f", "c1", 0, false);
        assert!(decide(&fencing).poll);
    }
}
