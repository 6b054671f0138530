//! The operator's errors: what a reconcile could not do, and whether it is worth retrying.

use cellplane_api::client::ClientError;
use cellplane_api::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The control plane could not be reached, or had no leader, for a whole call's deadline.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
    /// The control plane refused a read the reconcile needs (a permission, a bad id).
    #[error("control plane refused: {0}")]
    Refused(String),
    #[error("control plane client: {0}")]
    Client(#[from] ClientError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Another replica holds the Lease, or this one could not renew it in time.
    #[error("lost the lease: {0}")]
    LeaseLost(String),
    #[error("health endpoint: {0}")]
    Health(String),
}

impl Error {
    /// Someone else changed the object since it was read (HTTP 409): retried at once with
    /// the fresh object rather than backed off.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(status)) if status.is_conflict())
    }
}
