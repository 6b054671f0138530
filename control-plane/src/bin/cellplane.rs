//! `cellplane`: the control-plane server.
//!
//! `cellplane serve` runs one node of a Raft cluster (or, with `--store etcd`, a node on etcd); `cellplane dev` runs a whole control plane
//! on this machine for development and demos.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cellplane_api::dir_lock::DirLock;
use cellplane_api::serve::shutdown_signal;
use cellplane_api::tls::TlsPaths;
use cellplane_control_plane::config::{EtcdConfig, NodeConfig, StoreConfig};
use cellplane_control_plane::{dev, node};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cellplane",
    version,
    about = "Control plane of a cell-based, multi-region IM service",
    long_about = "Control plane of a cell-based, multi-region IM service.\n\n\
        A RoutingService replicated by Raft (or kept in etcd) maps every conversation to the cell \
        that owns it, with epochs that fence stale writers. Every node serves the Routing and Control gRPC APIs, \
        gRPC health and reflection on one port.\n\n\
        Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change the level."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one control-plane node.
    Serve(Box<ServeArgs>),
    /// Run the whole system on this machine until Ctrl-C: a 3-node control plane and an agent
    /// per region running IM cells of every tier.
    Dev(DevArgs),
    /// Run the Kubernetes operator: reconcile Cell, Tenant, Migration and CellFailover
    /// objects against the control plane. Of several replicas, the holder of a Lease acts.
    Operator(OperatorArgs),
}

#[derive(Args)]
struct OperatorArgs {
    /// Control-plane nodes: host:port,host:port.
    #[arg(
        long,
        env = "CELLPLANE_CONTROL_PLANE",
        value_delimiter = ',',
        required = true
    )]
    control_plane: Vec<String>,
    /// mTLS to the control plane: its CA (PEM), and the operator's identity (an admin).
    /// Plaintext when absent.
    #[arg(long, env = "CELLPLANE_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    #[arg(long, env = "CELLPLANE_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CELLPLANE_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// The Kubernetes API server's kubeconfig; else $KUBECONFIG, ~/.kube/config, or the
    /// pod's service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This replica's name, in the Lease and in its Events (in a pod: its name).
    #[arg(long, env = "POD_NAME")]
    identity: String,
    /// The namespace of the Lease (in a pod: its own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "cellplane-operator")]
    lease_name: String,
    /// How long a Lease left unrenewed stays its holder's, in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_s: u64,
    /// How often the holder renews the Lease.
    #[arg(long, default_value_t = 2_000)]
    lease_renew_ms: u64,
    /// How often a settled object is looked at again, to mirror live state into its status.
    #[arg(long, default_value_t = 10_000)]
    resync_ms: u64,
    /// Serve gRPC health (grpc.health.v1) here, for Kubernetes' probes.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

impl OperatorArgs {
    fn config(&self) -> anyhow::Result<cellplane_control_plane::operator::OperatorConfig> {
        use std::time::Duration;
        let lease = cellplane_control_plane::operator::lease::Timing {
            duration: Duration::from_secs(self.lease_duration_s),
            renew_every: Duration::from_millis(self.lease_renew_ms),
        };
        if self.lease_duration_s == 0 || i32::try_from(self.lease_duration_s).is_err() {
            bail!("--lease-duration-s must be from 1 to {}", i32::MAX);
        }
        // The holder gives up after two thirds of the duration without a renewal: it must
        // have tried more than once by then.
        if self.lease_renew_ms == 0 || self.lease_renew_ms * 3 >= self.lease_duration_s * 1_000 {
            bail!("--lease-renew-ms must be above 0 and below a third of --lease-duration-s");
        }
        if self.resync_ms == 0 {
            bail!("--resync-ms must be above 0");
        }
        if self.identity.is_empty() {
            bail!("--identity must not be empty");
        }
        Ok(cellplane_control_plane::operator::OperatorConfig {
            control_plane: self.control_plane.clone(),
            tls: TlsPaths::from_parts(
                self.tls_ca.clone(),
                self.tls_cert.clone(),
                self.tls_key.clone(),
            )?,
            identity: self.identity.clone(),
            lease_namespace: self.namespace.clone(),
            lease_name: self.lease_name.clone(),
            lease,
            resync: Duration::from_millis(self.resync_ms),
            health_listen: self.health_listen,
        })
    }

    async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .context("finding the Kubernetes API server (--kubeconfig)")?,
        };
        Ok(kube::Client::try_from(config)?)
    }
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML config file with every setting (node_id, listen, data_dir, peers, metrics_listen,
    /// [store], [raft], [migration]); --node-id and the tuning flags below override it.
    #[arg(long, conflicts_with_all = ["listen", "data_dir", "peers", "store"])]
    config: Option<PathBuf>,
    /// Where the routing state is kept: the embedded Raft cluster of --peers, or etcd.
    #[arg(long, value_enum, default_value = "raft")]
    store: StoreKind,
    /// etcd members to use with --store etcd: host:port,host:port.
    #[arg(long, required_if_eq("store", "etcd"))]
    etcd_endpoints: Option<String>,
    /// The etcd key prefix of this control plane's state.
    #[arg(long, default_value = "/cellplane/")]
    etcd_prefix: String,
    /// mTLS to etcd: the CA etcd's certificate comes from; with --etcd-tls-cert and
    /// --etcd-tls-key, this node's client identity. Plaintext when absent.
    #[arg(long, requires_all = ["etcd_tls_cert", "etcd_tls_key"])]
    etcd_tls_ca: Option<PathBuf>,
    #[arg(long, requires_all = ["etcd_tls_ca", "etcd_tls_key"])]
    etcd_tls_cert: Option<PathBuf>,
    #[arg(long, requires_all = ["etcd_tls_ca", "etcd_tls_cert"])]
    etcd_tls_key: Option<PathBuf>,
    /// This node's id, one of the ids in --peers.
    #[arg(long)]
    node_id: Option<u64>,
    /// Address to serve gRPC on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the Raft log and snapshots; the node restarts from it.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Every voter, this node included: 1=host:port,2=host:port,3=host:port. The lowest id
    /// initializes a new cluster.
    #[arg(long)]
    peers: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Build a Raft snapshot after this many log entries.
    #[arg(long)]
    snapshot_after_logs: Option<u64>,
    /// Change one limit of `[limits]` (max_request_bytes, max_streams_per_connection,
    /// max_watches, max_watches_per_connection), as NAME=VALUE; repeatable.
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long)]
    logs_kept_after_snapshot: Option<u64>,
    /// How long a migration's source keeps the moved key's rows before dropping them.
    #[arg(long)]
    migration_cleanup_grace_ms: Option<u64>,
    /// Keep moved keys' rows on migration sources as a backup instead of dropping them.
    #[arg(long)]
    migration_keep_source_data: bool,
    /// How long a lease renewal lets a cell take writes.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// The most two machines' clocks may disagree about a lease's length.
    #[arg(long)]
    clock_drift_ms: Option<u64>,
    /// Do not fail cells over on their own when their lease runs out; ops do, with cellctl.
    #[arg(long)]
    no_automatic_failover: bool,
    /// Automatic failovers under way at once; past it the detector holds back until ops act.
    #[arg(long)]
    max_concurrent_failovers: Option<usize>,
    /// mTLS: the CA (PEM) every client's and peer's certificate must come from; with
    /// --tls-cert and --tls-key, this node's own. Plaintext when absent.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Raft,
    Etcd,
}

#[derive(Args)]
struct DevArgs {
    /// Where the nodes, agents and cells keep their data; a second run restarts the same
    /// system.
    #[arg(long, default_value = ".cellplane-dev")]
    data_dir: PathBuf,
    /// Write {"control_plane": [...], "cells": [{cell_id, region, zone, tier, endpoint}...]}
    /// here once every cell is ACTIVE.
    #[arg(long)]
    endpoints_file: Option<PathBuf>,
    /// Also create tenants, send traffic, migrate a tenant and a conversation mid-stream, and
    /// print what happened with the measured write pause.
    #[arg(long)]
    demo: bool,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// mTLS between every component: a throwaway CA and identities are made under the data
    /// directory (tls/), and cellctl finds the operator's in the endpoints file.
    #[arg(long)]
    tls: bool,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn install_metrics(addr: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    }
    Ok(())
}

fn serve_config(args: ServeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            NodeConfig::from_toml(&text)?
        }
        None if args.store == StoreKind::Etcd => {
            let (Some(node_id), Some(listen), Some(endpoints)) =
                (args.node_id, args.listen, &args.etcd_endpoints)
            else {
                bail!("--store etcd needs --node-id, --listen and --etcd-endpoints");
            };
            NodeConfig::new(
                node_id,
                listen,
                PathBuf::new(),
                Default::default(),
                StoreConfig::Etcd(EtcdConfig {
                    endpoints: EtcdConfig::parse_endpoints(endpoints),
                    prefix: args.etcd_prefix.clone(),
                    tls: cellplane_api::tls::TlsPaths::from_parts(
                        args.etcd_tls_ca.clone(),
                        args.etcd_tls_cert.clone(),
                        args.etcd_tls_key.clone(),
                    )?,
                }),
            )
        }
        None => {
            let (Some(node_id), Some(listen), Some(data_dir), Some(peers)) =
                (args.node_id, args.listen, args.data_dir, args.peers)
            else {
                bail!("give --config FILE, or all of --node-id, --listen, --data-dir and --peers");
            };
            NodeConfig::new(
                node_id,
                listen,
                data_dir,
                NodeConfig::parse_peers(&peers)?,
                StoreConfig::Raft,
            )
        }
    };
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    config.limits = cellplane_api::limits::with_overrides(&config.limits, &args.limits)?;
    if let Some(n) = args.snapshot_after_logs {
        config.raft.snapshot_after_logs = n;
    }
    if let Some(n) = args.logs_kept_after_snapshot {
        config.raft.logs_kept_after_snapshot = n;
    }
    if let Some(ms) = args.migration_cleanup_grace_ms {
        config.migration.cleanup_grace_ms = ms;
    }
    if let Some(ms) = args.lease_ms {
        config.failover.lease_ms = ms;
    }
    if let Some(ms) = args.clock_drift_ms {
        config.failover.clock_drift_ms = ms;
    }
    if args.no_automatic_failover {
        config.failover.automatic = false;
    }
    if let Some(n) = args.max_concurrent_failovers {
        config.failover.max_concurrent_failovers = n;
    }
    if args.migration_keep_source_data {
        config.migration.keep_source_data = true;
    }
    if let Some(tls) = TlsPaths::from_parts(args.tls_ca, args.tls_cert, args.tls_key)? {
        config.tls = Some(tls);
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    cellplane_api::failpoint::arm_from_env()?;
    match cli.command {
        Command::Serve(args) => {
            let config = serve_config(*args)?;
            // Held until the process ends: one node per data directory (the Raft store's).
            let _lock = match config.store {
                StoreConfig::Raft => Some(DirLock::acquire_or_exit(&config.data_dir)?),
                StoreConfig::Etcd(_) => None,
            };
            install_metrics(config.metrics_listen)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            // Run on the worker threads, not on the thread that blocks on main.
            tokio::spawn(node::serve(config, listener, shutdown_signal())).await??;
        }
        Command::Dev(args) => {
            // Held until the process ends: one `cellplane dev` per data directory. Its agents
            // lock their own directories and exit with it.
            let _lock = DirLock::acquire_or_exit(&args.data_dir)?;
            install_metrics(args.metrics_listen)?;
            tokio::spawn(dev::run(
                dev::DevOptions {
                    data_dir: args.data_dir,
                    endpoints_file: args.endpoints_file,
                    demo: args.demo,
                    tls: args.tls,
                },
                shutdown_signal(),
            ))
            .await??;
        }
        Command::Operator(args) => {
            let config = args.config()?;
            let client = args.kube_client().await?;
            install_metrics(args.metrics_listen)?;
            tokio::spawn(cellplane_control_plane::operator::run(
                config,
                client,
                shutdown_signal(),
            ))
            .await??;
        }
    }
    Ok(())
}
