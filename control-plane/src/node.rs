//! One control-plane node: opens its store (the embedded Raft cluster or etcd) and serves every
//! gRPC service on one listener until told to shut down.

use std::future::Future;
use std::sync::Arc;

use cellplane_api::auth::{AuthLayer, Policy};
use cellplane_api::net::Listener;
use cellplane_api::proto;
use cellplane_api::streams::StreamSlots;
use cellplane_api::tls::Tls;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::audit::layer::AuditLayer;
use crate::config::{NodeConfig, StoreConfig};
use crate::control::ControlService;
use crate::limits::MAX_RAFT_MESSAGE_BYTES;
use crate::raft::transport::TransportService;
use crate::routing::RoutingService;
use crate::state::command::{Command, CommandOutput};
use crate::store::etcd::{EtcdOpenError, EtcdStore};
use crate::store::raft::{RaftOpenError, RaftStore};
use crate::store::view::SharedState;
use crate::store::{RouteStore, Routed};

/// How often an open watch asks whether its node is still in touch
/// ([`Node::require_touch`]).
pub const TOUCH_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Metadata set on a request a follower forwards to the leader, so it is forwarded at most once
/// and a leadership change mid-flight becomes a retryable UNAVAILABLE instead of a loop.
pub const FORWARDED_METADATA: &str = "cellplane-forwarded";

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Raft(#[from] RaftOpenError),
    #[error(transparent)]
    Etcd(#[from] EtcdOpenError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] cellplane_api::tls::TlsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What the services share: the store, and the node's own settings.
pub struct Node {
    pub id: u64,
    pub store: Arc<dyn RouteStore>,
    /// Flips to true on shutdown, so long-lived watch streams end and the server can drain.
    shutdown: watch::Receiver<bool>,
    /// The coordinator's thresholds.
    pub migration: crate::migration::step::Settings,
    /// Leases and failure detection.
    pub failover: crate::failover::detect::Settings,
    /// What the failure detector found last.
    pub findings: crate::failover::driver::Findings,
    /// Entries the audit log keeps.
    pub audit_keep: u32,
    /// Writes the audit entries of the calls this node takes.
    pub auditor: crate::audit::writer::Auditor,
    /// The route and migration watches the node holds.
    pub watches: Arc<StreamSlots>,
}

/// The outcome of proposing a command on this node.
pub enum Proposal {
    /// The command was applied.
    Applied(CommandOutput),
    /// Another node leads: re-send the original request on this channel.
    Forward(Channel),
}

impl Node {
    /// A node serving `store`; long-lived streams end when `shutdown` flips.
    pub fn new(
        id: u64,
        store: Arc<dyn RouteStore>,
        shutdown: watch::Receiver<bool>,
        migration: crate::migration::step::Settings,
        failover: crate::failover::detect::Settings,
        audit_keep: u32,
        limits: &crate::limits::Limits,
    ) -> Self {
        Self {
            id,
            store: store.clone(),
            shutdown,
            migration,
            failover,
            findings: Default::default(),
            audit_keep,
            auditor: crate::audit::writer::Auditor::start(store.clone(), audit_keep),
            watches: StreamSlots::new(
                "watches",
                ("limits.max_watches", "limits.max_watches_per_connection"),
                limits.max_watches,
                limits.max_watches_per_connection,
            ),
        }
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// The state this node answers from.
    pub fn view(&self) -> &SharedState {
        self.store.view()
    }

    /// Proposes `command`; on a Raft follower, answers where to forward it unless it was
    /// forwarded already.
    pub async fn propose(
        &self,
        command: Command,
        forwarded: bool,
    ) -> Result<Proposal, tonic::Status> {
        Ok(match self.store.execute(command, forwarded).await? {
            Routed::Here(output) => Proposal::Applied(output),
            Routed::Forward(channel) => Proposal::Forward(channel),
        })
    }

    /// Refuses to serve what a watcher follows from a node out of touch (route and migration
    /// watches, and the route listings a watcher loads first): its state no longer moves, and
    /// the watcher is better served by another node than by silence. Lookups and reads that
    /// ask to be linearizable go on, and are fenced by the store itself.
    pub fn require_touch(&self) -> Result<(), tonic::Status> {
        match self.store.out_of_touch() {
            Some(reason) => Err(tonic::Status::unavailable(format!(
                "{reason}: watch and list through another node"
            ))),
            None => Ok(()),
        }
    }

    /// Makes a read linearizable: `Ok(None)` when this node's view is now fresh enough to
    /// answer, `Ok(Some(channel))` when the read must go to the leader.
    pub async fn linearize(&self, forwarded: bool) -> Result<Option<Channel>, tonic::Status> {
        Ok(match self.store.linearize(forwarded).await? {
            Routed::Here(()) => None,
            Routed::Forward(channel) => Some(channel),
        })
    }
}

/// Whether a request was already forwarded once.
pub fn is_forwarded(metadata: &MetadataMap) -> bool {
    metadata.contains_key(FORWARDED_METADATA)
}

/// Wraps a request to forward it to the leader.
pub fn forwarded<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        FORWARDED_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    request
}

/// Runs one node until `shutdown` resolves, then drains in-flight calls and stops the store.
pub async fn serve(
    config: NodeConfig,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let tls = Tls::load_optional(config.tls.as_ref())?;
    serve_with(config, tls, listener.into(), shutdown).await
}

/// [`serve`] with `tls` given rather than loaded from the config: the simulation passes
/// plaintext over its own network.
pub async fn serve_with(
    config: NodeConfig,
    tls: Tls,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    config.validate()?;
    match &config.store {
        StoreConfig::Raft => {
            let store = Arc::new(RaftStore::open(&config, tls.clone()).await?);
            let transport = proto::raft::raft_transport_server::RaftTransportServer::new(
                TransportService::new(store.raft().clone()),
            )
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
            serve_store(&config, tls, store, Some(transport), listener, shutdown).await
        }
        StoreConfig::Etcd(etcd) => {
            let store = Arc::new(EtcdStore::open(etcd, config.node_id).await?);
            serve_store(&config, tls, store, None, listener, shutdown).await
        }
    }
}

/// Serves the public services (and, for Raft, its transport) over an opened `store`, with
/// `tls` as loaded from `config`.
pub async fn serve_store(
    config: &NodeConfig,
    tls: Tls,
    store: Arc<dyn RouteStore>,
    transport: Option<proto::raft::raft_transport_server::RaftTransportServer<TransportService>>,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let listener = listener.into();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_rx_for_drain = shutdown_rx.clone();
    let node = Arc::new(Node::new(
        config.node_id,
        store.clone(),
        shutdown_rx,
        config.migration,
        config.failover,
        config.audit_entries,
        &config.limits,
    ));
    tokio::spawn(crate::migration::driver::run(node.clone()));
    tokio::spawn(crate::failover::driver::run(
        node.clone(),
        cellplane_api::clock::Monotonic::of(&config.data_dir),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::routing::routing_server::RoutingServer<RoutingService>>()
        .await;
    health_reporter
        .set_serving::<proto::control::control_server::ControlServer<ControlService>>()
        .await;
    let (reflection, reflection_v1alpha) = cellplane_api::serve::reflection()?;

    tracing::info!(node_id = config.node_id, store = config.store.name(), listen = %listener.local_addr()?, mtls = tls.is_enabled(), "control-plane node serving");
    let drained = async move {
        shutdown.await;
        // End watch streams first, so the server's graceful drain does not wait on them.
        let _ = shutdown_tx.send(true);
    };
    let limits = config.limits;
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(limits.max_streams_per_connection));
    let policy = Arc::new(Policy::for_server(
        tls.is_enabled(),
        config.auth.as_ref(),
        crate::control::access::rules,
    ));
    if tls.is_enabled() && !policy.is_enforced() {
        tracing::warn!(
            "mTLS without an [auth] table: every certificate of the CA may call everything"
        );
    }
    let stopping = shutdown_rx_for_drain;
    let served = server
        // Outside the role check, so the audit log sees the calls it refuses.
        .layer(AuditLayer::new(
            node.auditor.clone(),
            policy.clone(),
            crate::control::access::audited,
            config.node_id,
            limits.max_request_bytes,
        ))
        .layer(AuthLayer::shared(policy))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_optional_service(transport)
        .add_service(
            proto::routing::routing_server::RoutingServer::new(RoutingService::new(node.clone()))
                .max_decoding_message_size(limits.max_request_bytes),
        )
        .add_service(
            proto::control::control_server::ControlServer::new(ControlService::new(node.clone()))
                .max_decoding_message_size(limits.max_request_bytes),
        )
        .serve_with_incoming_shutdown(tls.incoming(listener), drained);
    let grace = std::time::Duration::from_millis(config.shutdown_grace_ms);
    if let Some(served) = cellplane_api::serve::drain_within(served, stopping, grace).await {
        served?;
    }

    tracing::info!(node_id = config.node_id, "gRPC drained; stopping the store");
    store.shutdown().await;
    Ok(())
}
