//! `cellplane dev`: the whole system on one machine, serving until stopped — three Raft nodes
//! on loopback, each with its own data directory, and one cell agent per region running IM
//! cells of every tier ([`regions`]). With `--demo` it also drives traffic through a migration
//! of a tenant and of one conversation and reports the write pause ([`demo`]).
//!
//! Addresses are remembered in the data directory, so a second run restarts the same system
//! from disk instead of creating a new one.

pub mod certs;
pub mod demo;
pub mod regions;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellplane_api::dir_lock::DirLockError;
use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{CellState, ClusterStatusRequest, ListCellsRequest};
use cellplane_api::tls::{Tls, TlsPaths};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{NodeConfig, StoreConfig};
use crate::node::{self, NodeError};

/// Nodes in the dev control plane: the smallest cluster that survives losing one.
pub const DEV_NODES: u64 = 3;

/// How long `dev` waits for the first leader before giving up.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection to a node or cell of the dev system may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    Node { id: u64, source: Box<NodeError> },
    #[error("{0} is missing: build every binary first (cargo build --release --workspace --bins)")]
    MissingBinary(PathBuf),
    #[error("the cell agent of region {0} exited; see its log in the data directory")]
    AgentExited(String),
    #[error(
        "cells did not all become ACTIVE within {0:?}; see the agent logs in the data directory"
    )]
    CellsNotActive(Duration),
    #[error(transparent)]
    Lock(#[from] DirLockError),
    #[error(transparent)]
    Tls(cellplane_api::tls::TlsError),
    #[error("demo: {0}")]
    Demo(String),
    #[error("writing the endpoints file {path}: {source}")]
    EndpointsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What scripts and tools read to find the running system.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Endpoints {
    pub control_plane: Vec<String>,
    pub cells: Vec<regions::DevCell>,
    /// With `--tls`: the operator's identity, which `cellctl` uses to connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPaths>,
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
    /// Drive traffic through migrations once everything is up, and report what happened.
    pub demo: bool,
    /// mTLS between every component, with certificates made under the data directory.
    pub tls: bool,
}

/// The endpoints file `cellplane dev` keeps in its data directory.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// Writes the endpoints file atomically, so a script polling for it never reads half of it.
fn write_endpoints(path: &Path, endpoints: &Endpoints) -> Result<(), DevError> {
    let text = serde_json::to_string_pretty(endpoints).map_err(|e| DevError::EndpointsFile {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| DevError::EndpointsFile {
            path: path.to_path_buf(),
            source,
        })
}

/// How long the cells may take to register and become ACTIVE.
const CELLS_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until every cell of the layout is ACTIVE, watching that no agent died meanwhile.
async fn wait_for_cells(
    endpoints: &[String],
    tls: &Tls,
    agents: &mut regions::Agents,
) -> Result<(), DevError> {
    let deadline = tokio::time::Instant::now() + CELLS_TIMEOUT;
    let wanted = agents.cells.len();
    while tokio::time::Instant::now() < deadline {
        if let Some(region) = agents.exited() {
            return Err(DevError::AgentExited(region));
        }
        for endpoint in endpoints {
            let Ok(mut client) = control_client(tls, endpoint).await else {
                continue;
            };
            let Ok(cells) = client.list_cells(ListCellsRequest::default()).await else {
                continue;
            };
            let active = cells
                .into_inner()
                .cells
                .iter()
                .filter(|c| c.state == CellState::Active as i32)
                .count();
            if active >= wanted {
                return Ok(());
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(DevError::CellsNotActive(CELLS_TIMEOUT))
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

/// A connected Control client, over mTLS when `tls` holds an identity.
async fn control_client(
    tls: &Tls,
    endpoint: &str,
) -> Result<ControlClient<tonic::transport::Channel>, String> {
    Ok(ControlClient::new(
        tls.connect(endpoint, CONNECT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?,
    ))
}

/// Waits until some node reports a leader.
async fn wait_for_leader(endpoints: &[String], tls: &Tls) -> Result<u64, DevError> {
    let deadline = tokio::time::Instant::now() + LEADER_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        for endpoint in endpoints {
            let Ok(mut client) = control_client(tls, endpoint).await else {
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
    let mut shutdown = Box::pin(shutdown);
    std::fs::create_dir_all(&options.data_dir).map_err(|source| DevError::DataDir {
        path: options.data_dir.clone(),
        source,
    })?;
    let identities = if options.tls {
        let dir = options.data_dir.join("tls");
        Some(
            certs::dev_identities(&dir)
                .map_err(|source| DevError::DataDir { path: dir, source })?,
        )
    } else {
        None
    };
    let node_tls = identities.as_ref().map(|i| i["node"].clone());
    let admin_tls = identities.as_ref().map(|i| i["admin"].clone());
    let tls = Tls::load_optional(admin_tls.as_ref()).map_err(DevError::Tls)?;
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
            tls: node_tls.clone(),
            auth: identities.as_ref().map(|_| certs::dev_auth()),
            ..NodeConfig::new(
                id,
                listener.local_addr().map_err(|source| DevError::DataDir {
                    path: options.data_dir.clone(),
                    source,
                })?,
                options.data_dir.join(format!("node-{id}")),
                peers.clone(),
                StoreConfig::Raft,
            )
        };
        let mut stop = stop_rx.clone();
        nodes.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            node::serve(config, listener, stopped)
                .await
                .map_err(|source| DevError::Node {
                    id,
                    source: Box::new(source),
                })
        });
    }

    let leader = tokio::select! {
        leader = wait_for_leader(&endpoints, &tls) => leader?,
        Some(Ok(Err(err))) = nodes.join_next() => return Err(err),
    };
    println!("cellplane dev: control plane of {DEV_NODES} nodes is up (leader: node {leader})");
    let mut agents =
        match regions::Agents::start(&options.data_dir, &endpoints, identities.as_ref()).await {
            Ok(agents) => agents,
            Err(err) => {
                let _ = stop_tx.send(true);
                return Err(err);
            }
        };
    if let Err(err) = wait_for_cells(&endpoints, &tls, &mut agents).await {
        agents.stop().await;
        let _ = stop_tx.send(true);
        return Err(err);
    }
    println!("  data:          {}", options.data_dir.display());
    for (id, addr) in &peers {
        println!("  node {id}:        {addr}  (Routing, Control, health, reflection)");
    }
    for region in regions::LAYOUT.iter().map(|(region, _)| *region) {
        println!("  region {region}:");
        for cell in agents.cells.iter().filter(|c| c.region == region) {
            let role = match &cell.standby_of {
                Some(primary) => format!("  standby of {primary}"),
                None => String::new(),
            };
            println!(
                "    {:<15} {:<7} zone {:<5} {}{role}",
                cell.cell_id, cell.tier, cell.zone, cell.endpoint
            );
        }
    }
    match &admin_tls {
        Some(admin) => println!(
            "  transport:     mTLS between every component; CA and identities in {}",
            admin
                .ca
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
        None => println!(
            "  transport:     plaintext on loopback (dev mode; --tls for mTLS, configure [tls] in production)"
        ),
    }
    println!(
        "  ops:           cellctl --endpoints {} status",
        endpoints.join(",")
    );
    println!("  stop with Ctrl-C");
    let written = Endpoints {
        control_plane: endpoints.clone(),
        cells: agents.cells.clone(),
        tls: admin_tls.clone(),
    };
    // Always beside the data, where `cellctl` looks by default; also where asked.
    let default_file = options.data_dir.join(ENDPOINTS_FILE);
    for path in std::iter::once(&default_file).chain(options.endpoints_file.as_ref()) {
        write_endpoints(path, &written)?;
    }
    if options.demo {
        let report = tokio::select! {
            report = demo::run(&endpoints, &tls) => report,
            () = &mut shutdown => Ok(()),
        };
        if let Err(err) = report {
            agents.stop().await;
            let _ = stop_tx.send(true);
            return Err(DevError::Demo(err));
        }
    }

    let mut watch_agents = tokio::time::interval(Duration::from_secs(1));
    let failed = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            Some(Ok(Err(err))) = nodes.join_next() => break Some(err),
            _ = watch_agents.tick() => {
                if let Some(region) = agents.exited() {
                    break Some(DevError::AgentExited(region));
                }
            }
        }
    };
    println!("cellplane dev: stopping");
    agents.stop().await;
    let _ = stop_tx.send(true);
    if let Some(err) = failed {
        return Err(err);
    }
    while let Some(joined) = nodes.join_next().await {
        if let Ok(Err(err)) = joined {
            return Err(err);
        }
    }
    Ok(())
}
