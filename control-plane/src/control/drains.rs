//! Drains and removals in the Control service: requests into commands, progress into answers.

use cellplane_api::ids::validate_id;
use cellplane_api::proto::control as pb;
use tonic::Status;

use crate::state::ControlState;
use crate::state::command::Command;

pub fn drain_cell(request: &pb::DrainCellRequest) -> Result<Command, Status> {
    validate_id("cell_id", &request.cell_id)?;
    Ok(Command::DrainCell {
        cell_id: request.cell_id.as_str().into(),
    })
}

pub fn remove_cell(request: &pb::RemoveCellRequest) -> Result<Command, Status> {
    validate_id("cell_id", &request.cell_id)?;
    Ok(Command::RemoveCell {
        cell_id: request.cell_id.as_str().into(),
    })
}

/// The evacuation of `cell_id` as it stands in `state`.
pub fn progress(state: &ControlState, cell_id: &str) -> Result<pb::DrainProgress, Status> {
    let progress = state
        .drain_progress(cell_id)
        .ok_or_else(|| Status::not_found(format!("cell_id: cell {cell_id:?} does not exist")))?;
    Ok(pb::DrainProgress {
        cell_id: cell_id.to_string(),
        state: progress.state.to_proto() as i32,
        keys_left: progress.keys_left,
        migrations_running: progress.migrations_running,
        last_error: progress.last_error.unwrap_or_default(),
    })
}
