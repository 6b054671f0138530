//! Clients IM services embed.
//!
//! [`RouteCache`] keeps every route of the control plane in memory, fed by `Watch`, so a lookup
//! on the send path is a hash-map read instead of a network round trip. [`Messenger`] writes
//! to the cell that owns a conversation and follows it through migrations.

mod control_plane;
mod messenger;
mod route_cache;

pub use control_plane::{ControlPlane, retryable};
pub use messenger::{Messenger, MessengerOptions};
pub use route_cache::{CachedRoute, RouteCache, RouteCacheOptions};

use std::time::Duration;

use tonic::Status;
use tonic::transport::Channel;

use crate::tls::Tls;

/// Why a client could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no control-plane endpoints were given")]
    NoEndpoints,
    #[error("endpoint {endpoint:?}: {message}")]
    BadEndpoint { endpoint: String, message: String },
    #[error("no control-plane node answered: {0}")]
    Unreachable(String),
    #[error("control plane answered {0}")]
    Status(#[from] tonic::Status),
}

/// Whether `status` is this side's transport failing rather than the server's answer. A
/// server draining for a restart ends its connections with GOAWAY, and one killed closes
/// them: the calls still on them fail as INTERNAL "h2 protocol error" or CANCELLED
/// "connection closed", codes a server's own answer uses for other things.
pub fn failed_in_transport(status: &Status) -> bool {
    std::error::Error::source(status)
        .is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some())
}

/// A lazily connected channel to `host:port`, over mTLS when `tls` holds an identity; the
/// connection is made on first use and remade after failures.
pub fn channel(
    endpoint: &str,
    connect_timeout: Duration,
    tls: &Tls,
) -> Result<Channel, ClientError> {
    tls.lazy_channel(endpoint, connect_timeout)
        .map_err(|e| ClientError::BadEndpoint {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })
}
