//! How refusals become gRPC statuses: the right code, a message naming the field and rule, and a
//! machine-readable detail where the caller can recover with it.

use cellplane_api::detail;

use crate::state::command::CommandError;

/// The status for a refused command.
pub fn command_error(err: CommandError) -> tonic::Status {
    match err {
        CommandError::NotFound { what, id } => {
            tonic::Status::not_found(format!("{}: {what} {id:?} does not exist", what.field()))
        }
        err @ CommandError::Dangling { .. } => tonic::Status::not_found(err.to_string()),
        CommandError::AlreadyExists { what, id } => {
            tonic::Status::already_exists(format!("{}: {what} {id:?} already exists", what.field()))
        }
        CommandError::FailedPrecondition(message) => tonic::Status::failed_precondition(message),
        CommandError::Busy(message) => tonic::Status::already_exists(message),
        CommandError::StaleEpoch {
            key,
            expected,
            current,
        } => detail::stale_epoch(
            format!(
                "expected_epoch: key {key} is at epoch {} on cell {:?}, not at {expected}; retry with the current route",
                current.epoch, current.cell_id
            ),
            current.to_proto(),
        ),
        CommandError::Invalid { field, rule } => {
            tonic::Status::invalid_argument(format!("{field}: {rule}"))
        }
        CommandError::Exhausted(message) => tonic::Status::resource_exhausted(message),
    }
}
