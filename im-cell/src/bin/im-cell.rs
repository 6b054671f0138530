//! `im-cell`: one IM cell.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cellplane_api::auth::AuthConfig;
use cellplane_api::dir_lock::DirLock;
use cellplane_api::tls::TlsPaths;
use cellplane_im_cell::config::{CellConfig, StandbyConfig};
use cellplane_im_cell::limits::Limits;
use cellplane_im_cell::pns::PnsConfig;
use cellplane_im_cell::server;
use clap::{Parser, Subcommand};

/// The writer allocates a few small buffers per sync event (keys, encoded rows, deliveries);
/// mimalloc's thread-local free lists serve them far cheaper than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "im-cell",
    version,
    about = "A self-contained IM cell: durable, fenced messaging and sync for the conversations it owns",
    long_about = "A self-contained IM cell. It stores, fans out and syncs the messages of the \
        conversations the control plane granted it, and refuses writes for any other key or epoch.\n\n\
        Logs go to stderr; set RUST_LOG to change the level."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Messaging, Sync and CellAdmin on one port.
    Serve {
        /// A TOML file with every setting (cell_id, listen, data_dir, metrics_listen,
        /// [limits]); flags given as well override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The cell's id, as registered with the control plane.
        #[arg(long)]
        cell_id: Option<String>,
        /// Address to serve gRPC on.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory of the cell's store; the cell restarts from it.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve Prometheus metrics over HTTP on this address.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Largest message body in bytes.
        #[arg(long)]
        max_body_bytes: Option<usize>,
        /// A device further behind than this many events gets one REBASE; events twice this
        /// far behind are dropped.
        #[arg(long)]
        rebase_backlog_events: Option<u64>,
        /// Sends per second into one conversation.
        #[arg(long)]
        sends_per_conversation_per_sec: Option<u32>,
        /// Sends per second by one sender.
        #[arg(long)]
        sends_per_sender_per_sec: Option<u32>,
        /// POST notifications for members with no device online to this webhook
        /// (http://host:port/path), in batches.
        #[arg(long)]
        pns_webhook: Option<String>,
        /// Run as the standby of this primary cell: follow its cell log, take no writes
        /// (needs --primary-endpoint).
        #[arg(long, requires = "primary_endpoint")]
        standby_of: Option<String>,
        /// Where the primary of --standby-of serves gRPC (host:port).
        #[arg(long, requires = "standby_of")]
        primary_endpoint: Option<String>,
        /// This cell was failed over and rejoins as the standby of --standby-of: whatever
        /// promotion it remembers is over, and it starts over from that primary's snapshot.
        #[arg(long, requires = "standby_of")]
        rejoined: bool,
        /// A standby every send waits for (repeat for several): a send is answered once each
        /// has it durably.
        #[arg(long = "sync-standby")]
        sync_standbys: Vec<String>,
        /// How long sends may wait for the synchronous standbys before the cell stalls and
        /// asks to be recorded as not in sync.
        #[arg(long)]
        sync_timeout_ms: Option<u64>,
        /// Bytes of cell log kept; a standby or migration behind it starts over from a
        /// snapshot.
        #[arg(long)]
        log_retention_bytes: Option<u64>,
        /// Milliseconds of cell log kept.
        #[arg(long)]
        log_retention_ms: Option<u64>,
        /// Take end users' writes only while holding a lease from the control plane (renewed
        /// by the cell's agent through the admin API).
        #[arg(long)]
        lease_required: bool,
        /// Stop (gracefully) when the process that started this one exits, so a supervisor
        /// killed outright leaves no cell behind holding the port.
        #[arg(long)]
        exit_with_parent: bool,
        /// mTLS: the CA (PEM) every peer's certificate must come from; with --tls-cert and
        /// --tls-key, this cell's own. Plaintext when absent.
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_ca: Option<PathBuf>,
        #[arg(long, requires_all = ["tls_ca", "tls_key"])]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
        tls_key: Option<PathBuf>,
        /// How long calls may take to finish once the cell is asked to stop.
        #[arg(long)]
        shutdown_grace_ms: Option<u64>,
        /// Under mTLS, check every call against these identities' roles (certificate common
        /// names; each flag repeats): without it any certificate of the CA may call anything.
        #[arg(long)]
        enforce_auth: bool,
        #[arg(long, requires = "enforce_auth")]
        allow_admin: Vec<String>,
        #[arg(long, requires = "enforce_auth")]
        allow_agent: Vec<String>,
        #[arg(long, requires = "enforce_auth")]
        allow_reader: Vec<String>,
        #[arg(long, requires = "enforce_auth")]
        allow_node: Vec<String>,
        /// Change any limit of `[limits]` (see `limits.rs`), as NAME=VALUE; repeatable. The
        /// flags for single limits above win over it.
        #[arg(long = "limit", value_name = "NAME=VALUE")]
        limit: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    cellplane_api::failpoint::arm_from_env()?;
    let Command::Serve {
        config,
        cell_id,
        listen,
        data_dir,
        metrics_listen,
        max_body_bytes,
        rebase_backlog_events,
        sends_per_conversation_per_sec,
        sends_per_sender_per_sec,
        pns_webhook,
        standby_of,
        primary_endpoint,
        rejoined,
        sync_standbys,
        sync_timeout_ms,
        log_retention_bytes,
        log_retention_ms,
        lease_required,
        exit_with_parent,
        tls_ca,
        tls_cert,
        tls_key,
        shutdown_grace_ms,
        enforce_auth,
        limit,
        allow_admin,
        allow_agent,
        allow_reader,
        allow_node,
    } = Cli::parse().command;
    let mut config = match config {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let mut config = CellConfig::from_toml(&text)?;
            config.cell_id = cell_id.unwrap_or(config.cell_id);
            config.listen = listen.unwrap_or(config.listen);
            config.data_dir = data_dir.unwrap_or(config.data_dir);
            config
        }
        None => {
            let (Some(cell_id), Some(listen), Some(data_dir)) = (cell_id, listen, data_dir) else {
                bail!("give --config FILE, or all of --cell-id, --listen and --data-dir");
            };
            CellConfig {
                cell_id,
                listen,
                data_dir,
                metrics_listen: None,
                limits: Limits::default(),
                pns: None,
                standby: None,
                replication: Default::default(),
                lease_required: false,
                tls: None,
                shutdown_grace_ms: CellConfig::DEFAULT_SHUTDOWN_GRACE_MS,
                auth: None,
            }
        }
    };
    if let Some(tls) = TlsPaths::from_parts(tls_ca, tls_cert, tls_key)? {
        config.tls = Some(tls);
    }
    if let Some(ms) = shutdown_grace_ms {
        config.shutdown_grace_ms = ms;
    }
    if enforce_auth {
        config.auth = Some(AuthConfig {
            admin: allow_admin,
            agent: allow_agent,
            reader: allow_reader,
            node: allow_node,
            regions: Default::default(),
        });
    }
    if metrics_listen.is_some() {
        config.metrics_listen = metrics_listen;
    }
    if let (Some(primary_cell_id), Some(primary_endpoint)) = (standby_of, primary_endpoint) {
        config.standby = Some(StandbyConfig {
            primary_cell_id,
            primary_endpoint,
            rejoined,
        });
    }
    config.lease_required |= lease_required;
    if !sync_standbys.is_empty() {
        config.replication.sync_standbys = sync_standbys;
    }
    if let Some(ms) = sync_timeout_ms {
        config.replication.sync_timeout_ms = ms;
    }
    if let Some(bytes) = log_retention_bytes {
        config.replication.log_retention_bytes = bytes;
    }
    if let Some(ms) = log_retention_ms {
        config.replication.log_retention_ms = ms;
    }
    if let Some(webhook) = pns_webhook {
        config.pns = Some(PnsConfig::webhook(webhook));
    }
    config.limits = cellplane_api::limits::with_overrides(&config.limits, &limit)?;
    let limits = &mut config.limits;
    if let Some(n) = max_body_bytes {
        limits.max_body_bytes = n;
    }
    if let Some(n) = rebase_backlog_events {
        limits.rebase_backlog_events = n;
    }
    if let Some(n) = sends_per_conversation_per_sec {
        limits.sends_per_conversation_per_sec = n;
    }
    if let Some(n) = sends_per_sender_per_sec {
        limits.sends_per_sender_per_sec = n;
    }
    config.validate()?;
    // Held until the process ends: no second cell on this directory, nor this one's port.
    let _lock = DirLock::acquire_or_exit(&config.data_dir)?;
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tokio::spawn(server::serve(
        config,
        listener,
        cellplane_api::serve::shutdown_signal_or_parent_exit(exit_with_parent),
    ))
    .await??;
    Ok(())
}
