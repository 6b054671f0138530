//! Machine-readable error details carried in gRPC statuses.
//!
//! A stale caller is answered with the fresh value (the current route, the current revision),
//! so it fixes itself in one round trip instead of asking again.

use prost::Message;

use crate::proto::routing::{ErrorDetail, Route};

/// Metadata key holding the current revision on OUT_OF_RANGE watch errors, for tools that do not
/// decode details.
pub const REVISION_METADATA: &str = "cellplane-revision";

/// `ABORTED`: the caller's `expected_epoch` is stale; the detail carries the current route.
pub fn stale_epoch(message: impl Into<String>, current: Route) -> tonic::Status {
    let detail = ErrorDetail {
        current_revision: current.revision,
        current_route: Some(current),
        compacted_revision: 0,
    };
    tonic::Status::with_details(tonic::Code::Aborted, message, detail.encode_to_vec().into())
}

/// `OUT_OF_RANGE`: a watch asked for a compacted revision; reload at `current_revision`.
pub fn compacted(
    from_revision: u64,
    compacted_revision: u64,
    current_revision: u64,
) -> tonic::Status {
    let detail = ErrorDetail {
        current_route: None,
        current_revision,
        compacted_revision,
    };
    let mut status = tonic::Status::with_details(
        tonic::Code::OutOfRange,
        format!(
            "from_revision: {from_revision} is compacted (history starts after revision {compacted_revision}); \
             reload at revision {current_revision} and watch from there"
        ),
        detail.encode_to_vec().into(),
    );
    if let Ok(value) = current_revision.to_string().parse() {
        status.metadata_mut().insert(REVISION_METADATA, value);
    }
    status
}

/// Decodes the detail of a status produced by this module, if it carries one.
pub fn decode(status: &tonic::Status) -> Option<ErrorDetail> {
    if status.details().is_empty() {
        return None;
    }
    ErrorDetail::decode(status.details()).ok()
}

/// Decodes the `WrongCell` detail of a write a cell refused (FAILED_PRECONDITION): who owns
/// the key now, or that it is frozen for a move and when to retry.
pub fn wrong_cell(status: &tonic::Status) -> Option<crate::proto::cell::WrongCell> {
    if status.code() != tonic::Code::FailedPrecondition || status.details().is_empty() {
        return None;
    }
    crate::proto::cell::WrongCell::decode(status.details()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_epoch_round_trips_the_current_route() {
        let route = Route {
            tenant_id: "t".into(),
            cell_id: "c".into(),
            epoch: 7,
            revision: 42,
            ..Default::default()
        };
        let status = stale_epoch("expected_epoch: stale", route.clone());
        assert_eq!(status.code(), tonic::Code::Aborted);
        let detail = decode(&status).expect("detail");
        assert_eq!(detail.current_route, Some(route));
        assert_eq!(detail.current_revision, 42);
    }

    #[test]
    fn compacted_carries_the_revision_in_detail_and_metadata() {
        let status = compacted(3, 10, 99);
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert_eq!(decode(&status).map(|d| d.current_revision), Some(99));
        assert_eq!(
            status
                .metadata()
                .get(REVISION_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("99")
        );
    }
}
