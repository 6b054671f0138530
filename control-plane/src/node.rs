//! One control-plane node: opens its storage, joins the Raft cluster and serves every gRPC
//! service on one listener until told to shut down.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto;
use openraft::error::{ForwardToLeader, InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::config::NodeConfig;
use crate::control::ControlService;
use crate::raft::log_store::LogStore;
use crate::raft::network::{MAX_RAFT_MESSAGE_BYTES, NetworkFactory};
use crate::raft::proposer::{ProposeError, Proposer};
use crate::raft::read_index::{ReadIndex, ReadIndexError};
use crate::raft::snapshot::SnapshotError;
use crate::raft::state_machine::{SharedState, StateMachineStore};
use crate::raft::transport::TransportService;
use crate::raft::{NodeId, Raft};
use crate::routing::RoutingService;
use crate::state::command::{Command, CommandOutput};

/// Metadata set on a request a follower forwards to the leader, so it is forwarded at most once
/// and a leadership change mid-flight becomes a retryable UNAVAILABLE instead of a loop.
pub const FORWARDED_METADATA: &str = "cellplane-forwarded";

/// How long a write may wait for Raft before the caller is told to retry.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("raft log store: {0}")]
    LogStore(#[from] redb::Error),
    #[error("state machine: {0}")]
    StateMachine(#[from] SnapshotError),
    #[error("raft config: {0}")]
    RaftConfig(#[from] Box<openraft::ConfigError>),
    #[error("raft: {0}")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
    #[error("initializing the cluster: {0}")]
    Initialize(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What the services share: the Raft handle, the readable state and connections to the leader.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub shared: Arc<SharedState>,
    proposer: Proposer,
    read_index: ReadIndex,
    /// Channels to other nodes by address, reused for forwarded calls.
    channels: Mutex<HashMap<String, Channel>>,
    /// Flips to true on shutdown, so long-lived watch streams end and the server can drain.
    shutdown: watch::Receiver<bool>,
    /// The coordinator's thresholds.
    pub migration: crate::migration::step::Settings,
}

/// The outcome of proposing a command on this node.
pub enum Proposal {
    /// This node is the leader and the command was applied.
    Applied(CommandOutput),
    /// Another node leads: re-send the original request on this channel.
    Forward(Channel),
}

impl Node {
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    fn channel_to(
        &self,
        leader: &ForwardToLeader<NodeId, BasicNode>,
    ) -> Result<Channel, tonic::Status> {
        let Some(node) = &leader.leader_node else {
            return Err(tonic::Status::unavailable(
                "no leader is known yet (election in progress); retry",
            ));
        };
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(channel) = channels.get(&node.addr) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{}", node.addr))
            .map_err(|e| tonic::Status::internal(format!("leader address {:?}: {e}", node.addr)))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(node.addr.clone(), channel.clone());
        Ok(channel)
    }

    /// Proposes `command`; on a follower, answers where to forward it unless it was forwarded
    /// already.
    pub async fn propose(
        &self,
        command: Command,
        forwarded: bool,
    ) -> Result<Proposal, tonic::Status> {
        let kind = command.kind();
        let proposed = tokio::time::timeout(WRITE_TIMEOUT, self.proposer.propose(command)).await;
        match proposed {
            Err(_) => Err(tonic::Status::unavailable(format!(
                "{kind} was not committed within {WRITE_TIMEOUT:?} (no quorum?); it may still apply, retry with care"
            ))),
            Ok(Ok(result)) => result
                .map(Proposal::Applied)
                .map_err(crate::control::status::command_error),
            Ok(Err(ProposeError::ForwardToLeader(leader))) => {
                if forwarded {
                    return Err(tonic::Status::unavailable(
                        "leadership changed while the request was forwarded; retry",
                    ));
                }
                self.channel_to(&leader).map(Proposal::Forward)
            }
            Ok(Err(ProposeError::Unavailable(message))) => {
                Err(tonic::Status::unavailable(format!("raft: {message}")))
            }
        }
    }

    /// Makes a read linearizable: `Ok(None)` when this leader's state is now fresh enough to
    /// answer, `Ok(Some(channel))` when the read must go to the leader.
    pub async fn linearize(&self, forwarded: bool) -> Result<Option<Channel>, tonic::Status> {
        match self.read_index.ensure().await {
            Ok(()) => Ok(None),
            Err(ReadIndexError::ForwardToLeader(leader)) => {
                if forwarded {
                    return Err(tonic::Status::unavailable(
                        "leadership changed while the read was forwarded; retry",
                    ));
                }
                self.channel_to(&leader).map(Some)
            }
            Err(ReadIndexError::Unavailable(message)) => Err(tonic::Status::unavailable(format!(
                "linearizable read failed: {message}; retry"
            ))),
        }
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

fn raft_config(config: &NodeConfig) -> Result<Arc<openraft::Config>, Box<openraft::ConfigError>> {
    let tuning = &config.raft;
    let raft = openraft::Config {
        cluster_name: "cellplane".into(),
        heartbeat_interval: tuning.heartbeat_interval_ms,
        election_timeout_min: tuning.election_timeout_min_ms,
        election_timeout_max: tuning.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_after_logs),
        max_in_snapshot_log_to_keep: tuning.logs_kept_after_snapshot,
        // Each entry packs up to 1024 commands, so a few dozen entries already make a large
        // append; it must reach the follower and be fsynced within the AppendEntries timeout
        // (openraft uses the heartbeat interval).
        max_payload_entries: 32,
        install_snapshot_timeout: tuning.snapshot_install_timeout_ms,
        ..Default::default()
    };
    Ok(Arc::new(raft.validate().map_err(Box::new)?))
}

/// Runs one node until `shutdown` resolves, then drains in-flight calls and stops Raft.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)?;
    let log_store = LogStore::open(&config.data_dir.join("raft-log.redb"))?;
    let (state_machine, shared) = StateMachineStore::open(&config.data_dir.join("snapshots"))?;
    let raft = Raft::new(
        config.node_id,
        raft_config(&config)?,
        NetworkFactory,
        log_store,
        state_machine,
    )
    .await?;

    if config.bootstrapper() == Some(config.node_id) && !raft.is_initialized().await? {
        let members: BTreeMap<NodeId, BasicNode> = config
            .peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(node_id = config.node_id, "initialized a new cluster"),
            // Another start already initialized it: nothing to do.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(err) => return Err(NodeError::Initialize(err.to_string())),
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let node = Arc::new(Node {
        id: config.node_id,
        raft: raft.clone(),
        shared,
        proposer: Proposer::start(raft.clone()),
        read_index: ReadIndex::start(raft.clone()),
        channels: Mutex::new(HashMap::new()),
        shutdown: shutdown_rx,
        migration: config.migration,
    });
    tokio::spawn(crate::migration::driver::run(node.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::routing::routing_server::RoutingServer<RoutingService>>()
        .await;
    health_reporter
        .set_serving::<proto::control::control_server::ControlServer<ControlService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tracing::info!(node_id = config.node_id, listen = %listener.local_addr()?, "control-plane node serving");
    let drained = async move {
        shutdown.await;
        // End watch streams first, so the server's graceful drain does not wait on them.
        let _ = shutdown_tx.send(true);
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            proto::raft::raft_transport_server::RaftTransportServer::new(TransportService::new(
                raft.clone(),
            ))
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES),
        )
        .add_service(proto::routing::routing_server::RoutingServer::new(
            RoutingService::new(node.clone()),
        ))
        .add_service(proto::control::control_server::ControlServer::new(
            ControlService::new(node.clone()),
        ))
        .serve_with_incoming_shutdown(cellplane_api::serve::nodelay_incoming(listener), drained)
        .await?;

    tracing::info!(node_id = config.node_id, "gRPC drained; stopping raft");
    if let Err(err) = raft.shutdown().await {
        tracing::warn!(error = %err, "raft did not stop cleanly");
    }
    Ok(())
}
