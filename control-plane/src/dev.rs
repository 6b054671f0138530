//! `cellplane dev`: a whole control plane on one machine — three Raft nodes on loopback, each
//! with its own data directory — serving until stopped.
//!
//! The node addresses are remembered in the data directory, so a second run restarts the same
//! cluster from disk instead of creating a new one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellplane_api::proto::control::ClusterStatusRequest;
use cellplane_api::proto::control::control_client::ControlClient;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{NodeConfig, RaftTuning};
use crate::node::{self, NodeError};

/// Nodes in the dev control plane: the smallest cluster that survives losing one.
pub const DEV_NODES: u64 = 3;

/// How long `dev` waits for the first leader before giving up.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding {addr}: {source} (is another `cellplane dev` using this data directory?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cluster file {path}: {message}")]
    ClusterFile { path: PathBuf, message: String },
    #[error("no leader was elected within {0:?}")]
    NoLeader(Duration),
    #[error("node {id}: {source}")]
    Node { id: u64, source: NodeError },
    #[error("writing the endpoints file {path}: {source}")]
    EndpointsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What scripts and tools read to find the running system.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub control_plane: Vec<String>,
    pub cells: Vec<serde_json::Value>,
}

/// The addresses of a dev cluster, kept in its data directory.
#[derive(Debug, Serialize, Deserialize)]
struct ClusterFile {
    nodes: BTreeMap<u64, SocketAddr>,
}

/// Options of `cellplane dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    pub endpoints_file: Option<PathBuf>,
}

async fn bind_nodes(data_dir: &Path) -> Result<Vec<(u64, TcpListener)>, DevError> {
    let cluster_path = data_dir.join("cluster.json");
    let remembered: Option<ClusterFile> = match std::fs::read_to_string(&cluster_path) {
        Ok(text) => Some(
            serde_json::from_str(&text).map_err(|e| DevError::ClusterFile {
                path: cluster_path.clone(),
                message: e.to_string(),
            })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(DevError::DataDir {
                path: cluster_path,
                source,
            });
        }
    };
    let mut listeners = Vec::new();
    for id in 1..=DEV_NODES {
        let addr = remembered
            .as_ref()
            .and_then(|file| file.nodes.get(&id).copied())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DevError::Bind { addr, source })?;
        listeners.push((id, listener));
    }
    if remembered.is_none() {
        let mut nodes = BTreeMap::new();
        for (id, listener) in &listeners {
            let addr = listener.local_addr().map_err(|source| DevError::DataDir {
                path: data_dir.to_path_buf(),
                source,
            })?;
            nodes.insert(*id, addr);
        }
        let text = serde_json::to_string_pretty(&ClusterFile { nodes }).map_err(|e| {
            DevError::ClusterFile {
                path: cluster_path.clone(),
                message: e.to_string(),
            }
        })?;
        std::fs::write(&cluster_path, text).map_err(|source| DevError::DataDir {
            path: cluster_path,
            source,
        })?;
    }
    Ok(listeners)
}

/// Waits until some node reports a leader.
async fn wait_for_leader(endpoints: &[String]) -> Result<u64, DevError> {
    let deadline = tokio::time::Instant::now() + LEADER_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        for endpoint in endpoints {
            let Ok(mut client) = ControlClient::connect(format!("http://{endpoint}")).await else {
                continue;
            };
            if let Ok(status) = client.cluster_status(ClusterStatusRequest {}).await
                && status.get_ref().leader_id != 0
            {
                return Ok(status.into_inner().leader_id);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DevError::NoLeader(LEADER_TIMEOUT))
}

/// Runs the dev control plane until `shutdown` resolves.
pub async fn run(
    options: DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DevError> {
    std::fs::create_dir_all(&options.data_dir).map_err(|source| DevError::DataDir {
        path: options.data_dir.clone(),
        source,
    })?;
    let listeners = bind_nodes(&options.data_dir).await?;
    let mut peers = BTreeMap::new();
    for (id, listener) in &listeners {
        let addr = listener.local_addr().map_err(|source| DevError::DataDir {
            path: options.data_dir.clone(),
            source,
        })?;
        peers.insert(*id, addr.to_string());
    }
    let endpoints: Vec<String> = peers.values().cloned().collect();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nodes = tokio::task::JoinSet::new();
    for (id, listener) in listeners {
        let config = NodeConfig {
            node_id: id,
            listen: listener.local_addr().map_err(|source| DevError::DataDir {
                path: options.data_dir.clone(),
                source,
            })?,
            data_dir: options.data_dir.join(format!("node-{id}")),
            peers: peers.clone(),
            metrics_listen: None,
            raft: RaftTuning::default(),
            migration: Default::default(),
        };
        let mut stop = stop_rx.clone();
        nodes.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            node::serve(config, listener, stopped)
                .await
                .map_err(|source| DevError::Node { id, source })
        });
    }

    let leader = tokio::select! {
        leader = wait_for_leader(&endpoints) => leader?,
        Some(Ok(Err(err))) = nodes.join_next() => return Err(err),
    };
    println!("cellplane dev: control plane of {DEV_NODES} nodes is up (leader: node {leader})");
    println!("  data:          {}", options.data_dir.display());
    for (id, addr) in &peers {
        println!("  node {id}:        {addr}  (Routing, Control, health, reflection)");
    }
    println!("  transport:     plaintext on loopback (dev mode; configure TLS for production)");
    println!("  stop with Ctrl-C");
    if let Some(path) = &options.endpoints_file {
        let endpoints = Endpoints {
            control_plane: endpoints.clone(),
            cells: Vec::new(),
        };
        let text =
            serde_json::to_string_pretty(&endpoints).map_err(|e| DevError::EndpointsFile {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        // Write then rename, so a script polling for the file never reads half of it.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| DevError::EndpointsFile {
                path: path.clone(),
                source,
            })?;
    }

    tokio::select! {
        () = shutdown => {}
        Some(Ok(Err(err))) = nodes.join_next() => {
            let _ = stop_tx.send(true);
            return Err(err);
        }
    }
    println!("cellplane dev: stopping");
    let _ = stop_tx.send(true);
    while let Some(joined) = nodes.join_next().await {
        if let Ok(Err(err)) = joined {
            return Err(err);
        }
    }
    Ok(())
}
