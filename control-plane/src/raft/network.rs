//! The client side of the Raft transport: one lazily connected gRPC channel per peer.
//!
//! openraft's messages travel as postcard bytes inside a `RaftPayload`; the answer carries the
//! peer's `Result`, so a remote Raft error reaches openraft as the error it is, and a transport
//! failure as `Unreachable` (back off) or `Network` (retry).

use std::time::Duration;

use cellplane_api::proto::raft::RaftPayload;
use cellplane_api::proto::raft::raft_transport_client::RaftTransportClient;
use cellplane_api::tls::{KeepAlive, Tls};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::codec::{self, FORMAT};
use super::{NodeId, TypeConfig};
use crate::limits::MAX_RAFT_MESSAGE_BYTES;

/// How long to wait for a TCP connection to a peer before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds a client per peer; openraft asks for one per replication stream.
#[derive(Debug, Clone, Default)]
pub struct NetworkFactory {
    /// mTLS to peers, or plaintext.
    pub tls: Tls,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient::new(target, node.clone(), &self.tls)
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    node: BasicNode,
    client: Result<RaftTransportClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerClient {
    fn new(target: NodeId, node: BasicNode, tls: &Tls) -> Self {
        let client = tls
            .lazy_channel_keeping(&node.addr, CONNECT_TIMEOUT, KeepAlive::PEER)
            .map(|channel| {
                RaftTransportClient::new(channel)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            })
            .map_err(|e| format!("bad peer address {:?}: {e}", node.addr));
        Self {
            target,
            node,
            client,
        }
    }

    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(client) => client,
            Err(message) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    message.clone(),
                ))));
            }
        };
        let data = codec::encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let payload = RaftPayload {
            format: FORMAT,
            data,
        };
        if let Some(after) = cellplane_api::simulation::duplicate_after(&self.node.addr) {
            // The copy's answer goes nowhere, as a duplicate's would.
            let (mut client, payload, ttl) = (client.clone(), payload.clone(), option.hard_ttl());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = send(&mut client, method, payload, ttl).await;
            });
        }
        let response = send(client, method, payload, option.hard_ttl()).await;
        let payload = match response {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let answer: Result<Resp, RaftError<NodeId, E>> =
            codec::decode_versioned(payload.format, &payload.data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

/// Sends one Raft message to a peer, waiting at most `ttl` for its answer.
async fn send(
    client: &mut RaftTransportClient<Channel>,
    method: Method,
    payload: RaftPayload,
    ttl: Duration,
) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
    let mut request = tonic::Request::new(payload);
    request.set_timeout(ttl);
    match method {
        Method::AppendEntries => client.append_entries(request).await,
        Method::Vote => client.vote(request).await,
        Method::InstallSnapshot => client.install_snapshot(request).await,
    }
}

#[derive(Debug, Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Method::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Method::Vote, &rpc, &option).await
    }
}
