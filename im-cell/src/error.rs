//! Why a cell refused a request, and the gRPC status each refusal becomes.

use cellplane_api::proto::cell::WrongCell;
use prost::Message;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CellError {
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The key is not this cell's to write at that epoch, or it is frozen.
    #[error("{message}")]
    WrongCell {
        message: String,
        detail: Box<WrongCell>,
    },
    #[error("{0}")]
    ResourceExhausted(String),
    /// An admin request the key's state does not allow (dropping a key the cell still owns).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("storage: {0}")]
    Storage(String),
    /// The cell cannot take the request now (its lease ran out); retrying later can succeed.
    #[error("{0}")]
    Unavailable(String),
}

impl CellError {
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// Whether retrying the same request later can succeed (a frozen key, a full queue, a
    /// storage hiccup).
    pub fn retryable(&self) -> bool {
        match self {
            Self::WrongCell { detail, .. } => detail.frozen,
            Self::ResourceExhausted(_) | Self::Storage(_) | Self::Unavailable(_) => true,
            _ => false,
        }
    }
}

impl From<cellplane_api::ids::InvalidField> for CellError {
    fn from(err: cellplane_api::ids::InvalidField) -> Self {
        Self::Invalid {
            field: err.field,
            rule: err.rule,
        }
    }
}

impl From<fjall::Error> for CellError {
    fn from(err: fjall::Error) -> Self {
        Self::Storage(err.to_string())
    }
}

impl From<postcard::Error> for CellError {
    fn from(err: postcard::Error) -> Self {
        Self::Storage(format!("corrupt record: {err}"))
    }
}

impl From<CellError> for tonic::Status {
    fn from(err: CellError) -> Self {
        match err {
            CellError::Invalid { field, rule } => {
                tonic::Status::invalid_argument(format!("{field}: {rule}"))
            }
            CellError::NotFound(message) => tonic::Status::not_found(message),
            CellError::AlreadyExists(message) => tonic::Status::already_exists(message),
            CellError::PermissionDenied(message) => tonic::Status::permission_denied(message),
            CellError::WrongCell { message, detail } => tonic::Status::with_details(
                tonic::Code::FailedPrecondition,
                message,
                detail.as_ref().encode_to_vec().into(),
            ),
            CellError::ResourceExhausted(message) => tonic::Status::resource_exhausted(message),
            CellError::FailedPrecondition(message) => tonic::Status::failed_precondition(message),
            CellError::Storage(message) => {
                tonic::Status::unavailable(format!("storage: {message}"))
            }
            CellError::Unavailable(message) => tonic::Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::detail::wrong_cell as wrong_cell_detail;

    #[test]
    fn frozen_and_transient_refusals_are_retryable_the_rest_are_not() {
        let frozen = CellError::WrongCell {
            message: "frozen".into(),
            detail: Box::new(WrongCell {
                frozen: true,
                retry_after_ms: 50,
                ..Default::default()
            }),
        };
        let moved = CellError::WrongCell {
            message: "moved".into(),
            detail: Box::default(),
        };
        assert!(frozen.retryable());
        assert!(!moved.retryable());
        assert!(CellError::ResourceExhausted("full".into()).retryable());
        assert!(!CellError::invalid("body", "too big").retryable());
        let status = tonic::Status::from(frozen);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            wrong_cell_detail(&status).map(|d| d.retry_after_ms),
            Some(50)
        );
    }
}
