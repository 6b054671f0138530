//! The embedded Raft store: commands go through the leader's proposer into the replicated log;
//! every node applies them to its own copy of the state. A follower cannot write: it answers
//! where the leader is, and the service forwards the request there once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control as pb;
use cellplane_api::tls::{KeepAlive, Tls};
use openraft::error::{
    ChangeMembershipError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::raft::ClientWriteResponse;
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use tonic::transport::Channel;

use super::view::SharedState;
use super::{RouteStore, Routed, StoreError};
use crate::config::NodeConfig;
use crate::raft::log_store::LogStore;
use crate::raft::membership::{self, Change, Members, Plan};
use crate::raft::network::NetworkFactory;
use crate::raft::proposer::{ProposeError, Proposer};
use crate::raft::read_index::{ReadIndex, ReadIndexError};
use crate::raft::snapshot::SnapshotError;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::touch::Touch;
use crate::raft::{NodeId, Raft, TypeConfig};
use crate::state::command::{Command, CommandError, CommandOutput};

/// How long a write may wait for Raft before the caller is told to retry.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the Raft store could not open.
#[derive(Debug, thiserror::Error)]
pub enum RaftOpenError {
    #[error("raft log store: {0}")]
    LogStore(#[from] redb::Error),
    #[error("state machine: {0}")]
    StateMachine(#[from] SnapshotError),
    #[error("raft config: {0}")]
    Config(#[from] Box<openraft::ConfigError>),
    #[error("raft: {0}")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
    #[error("initializing the cluster: {0}")]
    Initialize(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// One node of the embedded Raft cluster.
pub struct RaftStore {
    id: NodeId,
    raft: Raft,
    shared: Arc<SharedState>,
    proposer: Proposer,
    read_index: ReadIndex,
    touch: Touch,
    /// Channels to other nodes by address, reused for forwarded calls.
    channels: Mutex<HashMap<String, Channel>>,
    /// mTLS to the leader when a request is forwarded, or plaintext.
    tls: Tls,
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

/// How long a joining node may take to catch up (a snapshot and the log after it) before
/// `AddNode` gives up waiting; it stays a learner.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// openraft's answer to a membership change, in the store's terms.
fn membership_result(
    result: Result<
        ClientWriteResponse<TypeConfig>,
        RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    >,
) -> Result<ClientWriteResponse<TypeConfig>, StoreError> {
    result.map_err(|err| match err {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(progress),
        )) => StoreError::Unavailable(format!(
            "another membership change is in progress ({progress}); retry"
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(refused)) => {
            StoreError::Refused(CommandError::FailedPrecondition(refused.to_string()))
        }
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            StoreError::Unavailable("this node stopped leading during the change; retry".into())
        }
        RaftError::Fatal(fatal) => StoreError::Unavailable(format!("raft: {fatal}")),
    })
}

impl RaftStore {
    /// Opens the node's log and newest snapshot from its data directory and joins the cluster;
    /// the lowest peer id initializes a new cluster.
    pub async fn open(config: &NodeConfig, tls: Tls) -> Result<Self, RaftOpenError> {
        std::fs::create_dir_all(&config.data_dir)?;
        let log_store = LogStore::open(&config.data_dir.join("raft-log.redb"), config.node_id)?;
        let disk_wait = log_store.disk_wait();
        let (state_machine, shared) = StateMachineStore::open(&config.data_dir.join("snapshots"))?;
        let raft = Raft::new(
            config.node_id,
            raft_config(config)?,
            NetworkFactory { tls: tls.clone() },
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
                Err(err) => return Err(RaftOpenError::Initialize(err.to_string())),
            }
        }
        Ok(Self {
            id: config.node_id,
            raft: raft.clone(),
            shared,
            proposer: Proposer::start(raft.clone()),
            touch: Touch::follow(
                &raft,
                config.node_id,
                Duration::from_millis(config.raft.election_timeout_max_ms),
                disk_wait,
            ),
            read_index: ReadIndex::start(raft),
            channels: Mutex::new(HashMap::new()),
            tls,
        })
    }

    /// The Raft handle, for the transport service peers call.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    fn channel_to(
        &self,
        leader: &ForwardToLeader<NodeId, BasicNode>,
    ) -> Result<Channel, StoreError> {
        let Some(node) = &leader.leader_node else {
            return Err(StoreError::Unavailable(
                "no leader is known yet (election in progress); retry".into(),
            ));
        };
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(channel) = channels.get(&node.addr) {
            return Ok(channel.clone());
        }
        let channel = self
            .tls
            .lazy_channel_keeping(&node.addr, Duration::from_secs(1), KeepAlive::PEER)
            .map_err(|e| StoreError::Corrupt(format!("leader address {:?}: {e}", node.addr)))?;
        channels.insert(node.addr.clone(), channel.clone());
        Ok(channel)
    }
}

#[tonic::async_trait]
impl RouteStore for RaftStore {
    async fn execute(
        &self,
        command: Command,
        forwarded: bool,
    ) -> Result<Routed<CommandOutput>, StoreError> {
        let kind = command.kind();
        let proposed = tokio::time::timeout(WRITE_TIMEOUT, self.proposer.propose(command)).await;
        match proposed {
            Err(_) => Err(StoreError::Unavailable(format!(
                "{kind} was not committed within {WRITE_TIMEOUT:?} (no quorum?); it may still apply, retry with care"
            ))),
            Ok(Ok(result)) => Ok(Routed::Here(result?)),
            Ok(Err(ProposeError::ForwardToLeader(leader))) => {
                if forwarded {
                    return Err(StoreError::Unavailable(
                        "leadership changed while the request was forwarded; retry".into(),
                    ));
                }
                self.channel_to(&leader).map(Routed::Forward)
            }
            Ok(Err(ProposeError::Unavailable(message))) => {
                Err(StoreError::Unavailable(format!("raft: {message}")))
            }
        }
    }

    async fn linearize(&self, forwarded: bool) -> Result<Routed<()>, StoreError> {
        match self.read_index.ensure().await {
            Ok(()) => Ok(Routed::Here(())),
            Err(ReadIndexError::ForwardToLeader(leader)) => {
                if forwarded {
                    return Err(StoreError::Unavailable(
                        "leadership changed while the read was forwarded; retry".into(),
                    ));
                }
                self.channel_to(&leader).map(Routed::Forward)
            }
            Err(ReadIndexError::Unavailable(message)) => Err(StoreError::Unavailable(format!(
                "linearizable read failed: {message}; retry"
            ))),
        }
    }

    fn view(&self) -> &Arc<SharedState> {
        &self.shared
    }

    fn drives_migrations(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    fn out_of_touch(&self) -> Option<String> {
        self.touch.out_of_touch()
    }

    async fn status(&self) -> Result<pb::ClusterStatusResponse, StoreError> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| pb::Member {
                node_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let (revision, compacted_revision) = self
            .shared
            .read(|state| (state.revision(), state.compacted_revision()));
        let role = match metrics.state {
            ServerState::Leader => "Leader",
            ServerState::Follower => "Follower",
            ServerState::Candidate => "Candidate",
            ServerState::Learner => "Learner",
            ServerState::Shutdown => "Shutdown",
        };
        Ok(pb::ClusterStatusResponse {
            node_id: self.id,
            leader_id: metrics.current_leader.unwrap_or_default(),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or_default(),
            applied_index: metrics.last_applied.map(|id| id.index).unwrap_or_default(),
            snapshot_index: metrics.snapshot.map(|id| id.index).unwrap_or_default(),
            revision,
            compacted_revision,
            members,
            role: role.to_string(),
            purged_index: metrics.purged.map(|id| id.index).unwrap_or_default(),
            store: "raft".into(),
        })
    }

    async fn change_membership(
        &self,
        change: Change,
        forwarded: bool,
    ) -> Result<Routed<Vec<pb::Member>>, StoreError> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let members = Members {
            nodes: membership
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            voters: membership.voter_ids().collect(),
        };
        if metrics.current_leader != Some(self.id) {
            if forwarded {
                return Err(StoreError::Unavailable(
                    "leadership changed while the request was forwarded; retry".into(),
                ));
            }
            let leader = ForwardToLeader {
                leader_id: metrics.current_leader,
                leader_node: metrics
                    .current_leader
                    .and_then(|id| membership.get_node(&id).cloned()),
            };
            return self.channel_to(&leader).map(Routed::Forward);
        }
        let step = membership::plan(&change, &members)?;
        let changed = match (&change, step) {
            (_, Plan::Done) => None,
            (Change::Add { node_id, addr }, Plan::Join) => {
                let node = BasicNode { addr: addr.clone() };
                let caught_up =
                    tokio::time::timeout(CATCH_UP_TIMEOUT, self.raft.add_learner(*node_id, node, true))
                        .await
                        .map_err(|_| {
                            StoreError::Unavailable(format!(
                                "node {node_id} joined as a learner but did not catch up within {CATCH_UP_TIMEOUT:?}; is it running at {addr}? AddNode again to make it a voter once it has"
                            ))
                        })?;
                membership_result(caught_up)?;
                Some(ChangeMembers::AddVoterIds(BTreeSet::from([*node_id])))
            }
            (Change::Add { node_id, .. }, Plan::Promote) => {
                Some(ChangeMembers::AddVoterIds(BTreeSet::from([*node_id])))
            }
            (Change::Remove { node_id }, Plan::RemoveVoter) => {
                Some(ChangeMembers::RemoveVoters(BTreeSet::from([*node_id])))
            }
            (Change::Remove { node_id }, Plan::RemoveLearner) => {
                Some(ChangeMembers::RemoveNodes(BTreeSet::from([*node_id])))
            }
            (change, step) => unreachable!("plan answered {step:?} for {change:?}"),
        };
        let membership = match changed {
            None => membership.clone(),
            Some(changes) => {
                let written = tokio::time::timeout(
                    WRITE_TIMEOUT,
                    self.raft.change_membership(changes, false),
                )
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!(
                        "the membership change was not committed within {WRITE_TIMEOUT:?} (no quorum?); ClusterStatus tells whether it applied"
                    ))
                })?;
                membership_result(written)?
                    .membership
                    .unwrap_or_else(|| membership.clone())
            }
        };
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        Ok(Routed::Here(
            membership
                .nodes()
                .map(|(id, node)| pb::Member {
                    node_id: *id,
                    addr: node.addr.clone(),
                    voter: voters.contains(id),
                })
                .collect(),
        ))
    }

    async fn shutdown(&self) {
        if let Err(err) = self.raft.shutdown().await {
            tracing::warn!(error = %err, "raft did not stop cleanly");
        }
    }
}
