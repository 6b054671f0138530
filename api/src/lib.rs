//! The one place for cellplane's wire format.
//!
//! Every other crate imports its protobuf types, id rules and error details from here, so an
//! API change is one diff. The [`client`] module is what IM services embed: a route cache fed by
//! the control plane's `Watch`.

pub mod auth;
pub mod client;
pub mod clock;
pub mod detail;
pub mod dir_lock;
pub mod failpoint;
pub mod ids;
pub mod limits;
pub mod net;
pub mod serve;
pub mod simulation;
pub mod streams;
pub mod tls;

/// Generated protobuf and tonic code, nested as the proto packages are so cross-package
/// references resolve, with short aliases.
pub mod proto {
    #[allow(clippy::all, missing_docs)]
    pub mod cellplane {
        pub mod routing {
            pub mod v1 {
                tonic::include_proto!("cellplane.routing.v1");
            }
        }
        pub mod control {
            pub mod v1 {
                tonic::include_proto!("cellplane.control.v1");
            }
        }
        pub mod raft {
            pub mod v1 {
                tonic::include_proto!("cellplane.raft.v1");
            }
        }
        pub mod cell {
            pub mod v1 {
                tonic::include_proto!("cellplane.cell.v1");
            }
        }
    }

    /// `cellplane.cell.v1`: an IM cell's Messaging, Sync and CellAdmin services.
    pub use cellplane::cell::v1 as cell;
    /// `cellplane.control.v1`: cells, tenants and route moves.
    pub use cellplane::control::v1 as control;
    /// `cellplane.raft.v1`: the transport between control-plane nodes.
    pub use cellplane::raft::v1 as raft;
    /// `cellplane.routing.v1`: lookups and the route watch.
    pub use cellplane::routing::v1 as routing;

    /// Encoded descriptors of every cellplane service, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cellplane_descriptor");
}
