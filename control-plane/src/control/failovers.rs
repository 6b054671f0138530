//! The failover half of the Control service: agents' lease renewals and promotion reports,
//! and ops' failovers, with their validation.

use std::collections::BTreeSet;
use std::sync::Arc;

use cellplane_api::ids::{InvalidField, validate_id, validate_optional_id};
use cellplane_api::proto::control as pb;
use tonic::Status;

use crate::failover::record::{MergedKey, Mode, Phase, display_id, parse_id};
use crate::limits::{MAX_CELLS_PER_RENEWAL, MAX_REASON_BYTES};
use crate::state::ControlState;
use crate::state::command::{Command, CommandOutput};
use crate::state::model::{CellState, Tier};
use cellplane_api::clock::now_ms;

pub fn renew_leases(
    request: pb::RenewLeasesRequest,
    lease_ms: u64,
) -> Result<Command, InvalidField> {
    if request.cell_ids.is_empty() {
        return Err(InvalidField::new("cell_ids", "must name at least one cell"));
    }
    if request.cell_ids.len() > MAX_CELLS_PER_RENEWAL {
        return Err(InvalidField::new(
            "cell_ids",
            format!("must name at most {MAX_CELLS_PER_RENEWAL} cells"),
        ));
    }
    let mut cells = BTreeSet::new();
    for (i, cell_id) in request.cell_ids.iter().enumerate() {
        validate_id(&format!("cell_ids[{i}]"), cell_id)?;
        if !cells.insert(Arc::<str>::from(cell_id.as_str())) {
            return Err(InvalidField::new(
                format!("cell_ids[{i}]"),
                format!("{cell_id:?} is named twice"),
            ));
        }
    }
    Ok(Command::RenewLeases {
        cells: cells.into_iter().collect(),
        lease_ms,
    })
}

pub fn check_reason(reason: &str) -> Result<(), InvalidField> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(InvalidField::new(
            "reason",
            format!("must be at most {MAX_REASON_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// One failover step of a region's: the command for a HIGH primary, or why it has none.
pub type RegionStep = Result<(Arc<str>, Command), pb::RegionFailoverRefusal>;

/// What failing `region` over takes: for every ACTIVE or DRAINING HIGH primary of the region, a
/// FORCED failover to its standby in another region. `NOT_FOUND` for a region with no cell,
/// `FAILED_PRECONDITION` for one with no HIGH primary.
pub fn region_plan(
    state: &ControlState,
    request: &pb::FailoverRegionRequest,
) -> Result<Vec<RegionStep>, Status> {
    let region = request.region.as_str();
    let in_region: Vec<_> = state
        .cells()
        .iter()
        .filter(|(_, c)| &*c.region == region)
        .collect();
    if in_region.is_empty() {
        return Err(Status::not_found(format!(
            "region: no cell is registered in region {region:?}"
        )));
    }
    let primaries: Vec<_> = in_region
        .into_iter()
        .filter(|(_, c)| {
            c.tier == Tier::High
                && c.standby_of.is_none()
                && matches!(c.state, CellState::Active | CellState::Draining)
        })
        .collect();
    if primaries.is_empty() {
        return Err(Status::failed_precondition(format!(
            "region: region {region:?} has no ACTIVE HIGH primary to fail over"
        )));
    }
    let reason = if request.reason.is_empty() {
        format!("region {region} lost")
    } else {
        request.reason.clone()
    };
    Ok(primaries
        .into_iter()
        .map(|(cell_id, _)| {
            let remote = state.failover_targets(cell_id).into_iter().find(|standby| {
                state
                    .cells()
                    .get(standby)
                    .is_some_and(|s| &*s.region != region)
            });
            match remote {
                Some(standby) => Ok((
                    cell_id.clone(),
                    Command::StartFailover {
                        cell_id: cell_id.clone(),
                        standby: Some(standby),
                        mode: Mode::Forced,
                        reason: reason.clone(),
                        automatic: false,
                        expected_renewals: None,
                        now_ms: now_ms(),
                    },
                )),
                None => Err(pb::RegionFailoverRefusal {
                    cell_id: cell_id.to_string(),
                    reason: "no ACTIVE standby in another region".into(),
                }),
            }
        })
        .collect())
}

pub fn failover_cell(request: pb::FailoverCellRequest) -> Result<Command, InvalidField> {
    validate_id("cell_id", &request.cell_id)?;
    let mode = Mode::from_proto(request.mode)
        .ok_or_else(|| InvalidField::new("mode", "must be FORCED or PLANNED"))?;
    check_reason(&request.reason)?;
    Ok(Command::StartFailover {
        cell_id: request.cell_id.into(),
        standby: None,
        mode,
        reason: if request.reason.is_empty() {
            "ops".into()
        } else {
            request.reason
        },
        automatic: false,
        expected_renewals: None,
        now_ms: now_ms(),
    })
}

pub fn failover_id(value: &str) -> Result<u64, InvalidField> {
    parse_id(value).ok_or_else(|| {
        InvalidField::new("failover_id", format!("must be fo-<number>, got {value:?}"))
    })
}

/// The phase an agent's report of its work in `phase` moves a failover to.
fn after(phase: Phase) -> Option<Phase> {
    match phase {
        Phase::Freezing => Some(Phase::CatchingUp),
        Phase::CatchingUp => Some(Phase::Promoting),
        Phase::Promoting => Some(Phase::Done),
        Phase::Thawing => Some(Phase::RolledBack),
        Phase::Done => Some(Phase::Merged),
        Phase::Fencing | Phase::RolledBack | Phase::Merged => None,
    }
}

/// The command an agent's report calls for: none when the failover is past the phase it
/// names (a repeated report changes nothing).
pub fn report(
    state: &ControlState,
    request: &pb::ReportFailoverRequest,
) -> Result<(u64, Option<Command>), Status> {
    let id = failover_id(&request.failover_id)?;
    let (phase, to) = Phase::from_proto(request.phase)
        .and_then(|phase| Some((phase, after(phase)?)))
        .ok_or_else(|| {
            Status::invalid_argument(
                "phase: an agent reports FREEZING, CATCHING_UP, PROMOTING, THAWING or DONE (merged back)",
            )
        })?;
    let Some(record) = state.failovers().get(&id) else {
        return Err(not_found(id));
    };
    if record.phase != phase {
        return Ok((id, None));
    }
    let mut merged = Vec::with_capacity(request.merged.len());
    for (i, key) in request.merged.iter().enumerate() {
        validate_id(&format!("merged[{i}].tenant_id"), &key.tenant_id)?;
        validate_optional_id(
            &format!("merged[{i}].conversation_id"),
            &key.conversation_id,
        )?;
        merged.push(MergedKey {
            tenant_id: Arc::from(key.tenant_id.as_str()),
            conversation_id: Arc::from(key.conversation_id.as_str()),
            messages: key.messages,
        });
    }
    Ok((
        id,
        Some(Command::AdvanceFailover {
            id,
            from: phase,
            to,
            lsn: request.lsn,
            error: None,
            merged,
            now_ms: now_ms(),
        }),
    ))
}

/// The command that rolls back failover `request` names: a PLANNED one not yet past its
/// catch-up goes to THAWING (the agent thaws the cell, which keeps its keys), compared on its
/// phase so that it cannot race the switch. Anything else is refused with why.
pub fn cancel(
    state: &ControlState,
    request: &pb::CancelFailoverRequest,
) -> Result<(u64, Command), Status> {
    let id = failover_id(&request.failover_id)?;
    check_reason(&request.reason)?;
    let Some(record) = state.failovers().get(&id) else {
        return Err(not_found(id));
    };
    let shown = display_id(id);
    if record.mode != Mode::Planned {
        return Err(Status::failed_precondition(format!(
            "failover_id: {shown} is FORCED: the cell's lease is no longer renewed, so it runs to its end"
        )));
    }
    if !matches!(record.phase, Phase::Freezing | Phase::CatchingUp) {
        return Err(Status::failed_precondition(format!(
            "failover_id: {shown} is {}: only a failover still FREEZING or CATCHING_UP can be cancelled",
            record.phase.name()
        )));
    }
    let why = if request.reason.is_empty() {
        "cancelled".to_string()
    } else {
        format!("cancelled: {}", request.reason)
    };
    Ok((
        id,
        Command::AdvanceFailover {
            id,
            from: record.phase,
            to: Phase::Thawing,
            lsn: 0,
            error: Some(why),
            merged: Vec::new(),
            now_ms: now_ms(),
        },
    ))
}

pub fn not_found(id: u64) -> Status {
    Status::not_found(format!(
        "failover_id: failover {} does not exist",
        display_id(id)
    ))
}

pub fn failover_output(output: CommandOutput) -> Result<pb::Failover, Status> {
    match output {
        CommandOutput::Failover(view) => Ok(view.record.to_proto(view.id)),
        other => Err(Status::internal(format!(
            "unexpected command output {other:?}"
        ))),
    }
}

pub fn leases_output(
    output: CommandOutput,
    lease_ms: u64,
) -> Result<pb::RenewLeasesResponse, Status> {
    match output {
        CommandOutput::Leases { granted, refused } => Ok(pb::RenewLeasesResponse {
            lease_ms,
            granted: granted.iter().map(|c| c.to_string()).collect(),
            refused: refused.iter().map(|c| c.to_string()).collect(),
        }),
        other => Err(Status::internal(format!(
            "unexpected command output {other:?}"
        ))),
    }
}

/// Every failover, or the unfinished ones, oldest first.
pub fn list(state: &ControlState, active_only: bool) -> Vec<pb::Failover> {
    state
        .failovers()
        .iter()
        .filter(|(_, f)| !active_only || !f.phase.is_terminal())
        .map(|(id, f)| f.to_proto(*id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_name_each_cell_once_with_valid_ids() {
        let request = |ids: &[&str]| pb::RenewLeasesRequest {
            cell_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            renew_leases(request(&[]), 1000).unwrap_err().field,
            "cell_ids"
        );
        assert_eq!(
            renew_leases(request(&["a", "a"]), 1000).unwrap_err().field,
            "cell_ids[1]"
        );
        assert_eq!(
            renew_leases(request(&["a", "bad id"]), 1000)
                .unwrap_err()
                .field,
            "cell_ids[1]"
        );
        assert!(matches!(
            renew_leases(request(&["b", "a"]), 1000),
            Ok(Command::RenewLeases { cells, lease_ms: 1000 }) if cells.len() == 2
        ));
    }

    #[test]
    fn a_failover_needs_a_mode_and_a_short_reason() {
        let request = |mode: i32, reason: &str| pb::FailoverCellRequest {
            cell_id: "c1".into(),
            mode,
            reason: reason.into(),
        };
        assert_eq!(failover_cell(request(0, "")).unwrap_err().field, "mode");
        assert_eq!(
            failover_cell(request(pb::FailoverMode::Forced as i32, &"x".repeat(300)))
                .unwrap_err()
                .field,
            "reason"
        );
        assert!(failover_cell(request(pb::FailoverMode::Forced as i32, "")).is_ok());
        assert_eq!(failover_id("fo-x").unwrap_err().field, "failover_id");
    }
}
