//! Exit codes of `cellctl`, one per kind of outcome, so a script can tell "does not exist"
//! from "refused" from "the control plane is down" without parsing messages.

use tonic::Code;

/// Success.
pub const OK: u8 = 0;
/// Something unexpected (a bug, a broken answer).
pub const INTERNAL: u8 = 1;
/// Bad command-line usage (clap's own code).
pub const USAGE: u8 = 2;
/// The tenant, cell, route or migration named does not exist.
pub const NOT_FOUND: u8 = 3;
/// The control plane refused the request: bad input, a rule of the current state, a conflict.
pub const REFUSED: u8 = 4;
/// No control-plane node answered, or none had a leader in time.
pub const UNAVAILABLE: u8 = 5;
/// A migration waited for ended ROLLED_BACK or FAILED.
pub const MIGRATION_FAILED: u8 = 6;
/// A planned failover waited for was given up (ROLLED_BACK): the cell kept its keys, so
/// whatever the script meant to do to it next must not happen.
pub const FAILOVER_ROLLED_BACK: u8 = 7;

/// The exit code for a failed call.
pub fn for_status(code: Code) -> u8 {
    match code {
        Code::NotFound => NOT_FOUND,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Aborted
        | Code::PermissionDenied
        | Code::ResourceExhausted => REFUSED,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => UNAVAILABLE,
        _ => INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_own_code() {
        assert_eq!(for_status(Code::NotFound), NOT_FOUND);
        assert_eq!(for_status(Code::FailedPrecondition), REFUSED);
        assert_eq!(for_status(Code::AlreadyExists), REFUSED);
        assert_eq!(for_status(Code::Unavailable), UNAVAILABLE);
        assert_eq!(for_status(Code::Internal), INTERNAL);
        let codes = [
            OK,
            INTERNAL,
            USAGE,
            NOT_FOUND,
            REFUSED,
            UNAVAILABLE,
            MIGRATION_FAILED,
            FAILOVER_ROLLED_BACK,
        ];
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), codes.len());
    }
}
