//! `cellctl`: ops on a running cellplane — see the cluster, cells, tenants and routes, create
//! tenants, change their tier, migrate tenants and conversations, follow and cancel migrations.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::control as pb;
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_api::tls::{Tls, TlsPaths};
use cellplane_control_plane::ctl::exit;
use cellplane_control_plane::ctl::table;
use cellplane_control_plane::ctl::views::{
    AuditView, CellView, DrainView, FailoverView, MemberView, MigrationView, NodeView, RouteView,
    Row, TenantView, phase,
};
use cellplane_control_plane::failover::record::Phase as FailoverPhase;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "cellctl",
    version,
    about = "Operate a cellplane control plane: cells, tenants, routes and migrations",
    long_about = "Operate a cellplane control plane: cells, tenants, routes and migrations.\n\n\
        Endpoints come from --endpoints, else $CELLCTL_ENDPOINTS, else the endpoints file that \
        `cellplane dev` keeps in .cellplane-dev/endpoints.json. Any node serves: writes sent to \
        a follower are forwarded to the leader, and an unreachable node is skipped.\n\n\
        Exit codes: 0 success; 1 unexpected error; 2 bad usage; 3 not found; 4 refused (bad \
        input, or a rule of the current state); 5 control plane unavailable; 6 a migration \
        waited for was rolled back or failed; 7 a failover waited for was rolled back (the cell \
        kept its keys).",
    after_help = "Examples:\n  cellctl status\n  cellctl tenant create acme --tier NORMAL --region cn-hangzhou\n  \
        cellctl migrate acme --wait\n  cellctl migrate acme --conversation hot-group --to hz-b-normal-2\n  \
        cellctl migrations --output json"
)]
struct Cli {
    /// Control-plane nodes, comma-separated host:port.
    #[arg(long, global = true, value_delimiter = ',', env = "CELLCTL_ENDPOINTS")]
    endpoints: Vec<String>,
    /// Read the endpoints from a file written by `cellplane dev --endpoints-file` (and, from a
    /// `cellplane dev --tls`, the operator's certificate).
    #[arg(long, global = true, conflicts_with = "endpoints")]
    endpoints_file: Option<PathBuf>,
    /// mTLS: the CA (PEM) the nodes' certificates come from; with --tls-cert and --tls-key,
    /// the operator's own identity. Plaintext when absent (and none is in the endpoints file).
    #[arg(long, global = true, env = "CELLCTL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[arg(long, global = true, env = "CELLCTL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "CELLCTL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Tables for people, or JSON for scripts.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "UPPER")]
enum TierArg {
    High,
    Normal,
    Low,
}

impl TierArg {
    fn proto(self) -> pb::Tier {
        match self {
            Self::High => pb::Tier::High,
            Self::Normal => pb::Tier::Normal,
            Self::Low => pb::Tier::Low,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Forced,
    Planned,
}

impl ModeArg {
    fn to_proto(self) -> pb::FailoverMode {
        match self {
            Self::Forced => pb::FailoverMode::Forced,
            Self::Planned => pb::FailoverMode::Planned,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Every control-plane node: its role, term and revision.
    Status,
    /// Control-plane membership (Raft store): list, add or remove a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cells with their state, load and health.
    Cells {
        /// Only this region's cells.
        #[arg(long)]
        region: Option<String>,
    },
    /// Tenants with their tier, cell and epoch.
    Tenants {
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Which cell owns a tenant or one of its conversations, at which epoch (linearizable).
    Route {
        tenant: String,
        conversation: Option<String>,
    },
    /// Create a tenant or change its tier.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Move a tenant, or one conversation, to another cell: history first, then the route.
    Migrate {
        tenant: String,
        /// Move only this conversation (a hot group); requires --to.
        #[arg(long, requires = "to")]
        conversation: Option<String>,
        /// The target cell; placement chooses one of the tenant's tier when absent.
        #[arg(long)]
        to: Option<String>,
        /// Follow the migration until it ends, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Migrations that have not finished (all of them with --all).
    Migrations {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Roll back a migration (mig-N) that has not switched its route yet, or a PLANNED
    /// failover (fo-N) whose standby is not yet being promoted.
    Cancel {
        id: String,
        /// Why, kept with a cancelled failover.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Fail a primary cell over to its standby (FORCED: its lease is no longer renewed, and
    /// once it has surely run out every key moves to the standby), or with --region every
    /// HIGH primary of a lost region to its standby in another region.
    Failover {
        #[arg(required_unless_present = "region")]
        cell: Option<String>,
        #[arg(long, conflicts_with = "cell")]
        region: Option<String>,
        /// PLANNED (the cell is reachable: freeze, let the standby catch up, switch; nothing is
        /// lost) or FORCED.
        #[arg(long, value_enum, default_value = "forced")]
        mode: ModeArg,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
        /// Follow the failover until the standby took over.
        #[arg(long)]
        wait: bool,
    },
    /// Evacuate a primary cell: no new placements, every key migrated away, history first.
    Drain {
        cell: String,
        /// Follow the drain until the cell is empty, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Forget a drained (or failed) cell that holds no key.
    Remove { cell: String },
    /// Failovers with their RPO ledger (only unfinished ones with --active); --resume lets
    /// automatic failover go on after a storm stopped it.
    Failovers {
        #[arg(long)]
        active: bool,
        #[arg(long)]
        resume: bool,
    },
    /// Admin calls, newest first, the refused ones included (admins only).
    Audit {
        /// Only this caller's (its certificate's common name).
        #[arg(long, default_value = "")]
        identity: String,
        /// Only this method's, as `CreateTenant`.
        #[arg(long, default_value = "")]
        method: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// The members, voters and learners, as the leader has them.
    List,
    /// Add a running node (started with this id and address): it joins as a learner and
    /// becomes a voter once it has caught up.
    Add { node_id: u64, addr: String },
    /// Take a node out of the cluster. To replace a node whose disk was lost: remove it, wipe
    /// its data directory, start it again and add it back.
    Remove { node_id: u64 },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// One tenant: its cell and epoch, its cell's standbys and protection, and whether its
    /// tier's promise holds now.
    Show { tenant: String },
    /// Create a tenant; placement puts it on a cell of its tier in its home region.
    Create {
        tenant: String,
        #[arg(long)]
        tier: TierArg,
        #[arg(long)]
        region: String,
    },
    /// Change a tenant's tier: a migration to a cell of the new tier.
    SetTier {
        tenant: String,
        tier: TierArg,
        /// Follow the migration until it ends.
        #[arg(long)]
        wait: bool,
    },
}

/// Why a command failed, and the exit code that says so.
struct Failure {
    code: u8,
    kind: String,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Self {
            code: exit::for_status(status.code()),
            kind: format!("{:?}", status.code()),
            message: status.message().to_string(),
        }
    }
}

fn failure(code: u8, kind: &str, message: impl Into<String>) -> Failure {
    Failure {
        code,
        kind: kind.into(),
        message: message.into(),
    }
}

/// Where the control plane is and how to reach it: the flags, else the endpoints file of a
/// `cellplane dev`.
fn connection(cli: &Cli) -> Result<(Vec<String>, Tls), Failure> {
    let usage = |message: String| failure(exit::USAGE, "Usage", message);
    let flags = TlsPaths::from_parts(
        cli.tls_ca.clone(),
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
    )
    .map_err(|e| usage(e.to_string()))?;
    let load =
        |paths: Option<&TlsPaths>| Tls::load_optional(paths).map_err(|e| usage(e.to_string()));
    if !cli.endpoints.is_empty() {
        return Ok((cli.endpoints.clone(), load(flags.as_ref())?));
    }
    let path = cli
        .endpoints_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(".cellplane-dev/endpoints.json"));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        usage(format!(
            "no --endpoints given and {} is unreadable ({e}); start `cellplane dev` or pass --endpoints",
            path.display()
        ))
    })?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    let list: Vec<String> = parsed["control_plane"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        return Err(usage(format!(
            "{} lists no control_plane endpoints",
            path.display()
        )));
    }
    let from_file: Option<TlsPaths> = match parsed.get("tls") {
        Some(tls) => Some(
            serde_json::from_value(tls.clone())
                .map_err(|e| usage(format!("{}: tls: {e}", path.display())))?,
        ),
        None => None,
    };
    Ok((list, load(flags.as_ref().or(from_file.as_ref()))?))
}

fn print_list<T: Row + Serialize>(output: Output, items: &[T]) -> Result<(), Failure> {
    match output {
        Output::Table => {
            let rows: Vec<Vec<String>> = items.iter().map(Row::cells).collect();
            print!("{}", table::render(T::HEADERS, &rows));
        }
        Output::Json => println!("{}", json(&items)?),
    }
    Ok(())
}

fn print_one<T: Row + Serialize>(output: Output, item: &T) -> Result<(), Failure> {
    match output {
        Output::Table => print!("{}", table::render(T::HEADERS, &[item.cells()])),
        Output::Json => println!("{}", json(item)?),
    }
    Ok(())
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, Failure> {
    serde_json::to_string_pretty(value)
        .map_err(|e| failure(exit::INTERNAL, "Internal", e.to_string()))
}

fn finished(m: &pb::Migration) -> bool {
    matches!(
        pb::MigrationPhase::try_from(m.phase),
        Ok(pb::MigrationPhase::Done | pb::MigrationPhase::RolledBack | pb::MigrationPhase::Failed)
    )
}

/// Follows a migration until it ends; a progress bar on a terminal unless JSON is asked for.
async fn wait(
    control: &ControlPlane,
    output: Output,
    start: pb::Migration,
) -> Result<pb::Migration, Failure> {
    let bar = if output == Output::Table {
        ProgressBar::new(6)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:24}] {msg}")
            .map_err(|e| failure(exit::INTERNAL, "Internal", e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(start.migration_id.clone());
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut last = start;
    while !finished(&last) {
        let id = last.migration_id.clone();
        let stream = control
            .call(|mut c| {
                let migration_id = id.clone();
                async move {
                    c.watch_migration(pb::WatchMigrationRequest { migration_id })
                        .await
                }
            })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(status) => {
                bar.abandon();
                return Err(status.into());
            }
        };
        // A stream cut by a node going away is watched again from another.
        while let Ok(Some(m)) = stream.message().await {
            let rank = match pb::MigrationPhase::try_from(m.phase) {
                Ok(pb::MigrationPhase::Planned) => 0,
                Ok(pb::MigrationPhase::Copying) => 1,
                Ok(pb::MigrationPhase::CatchingUp) => 2,
                Ok(pb::MigrationPhase::Freezing) => 3,
                Ok(pb::MigrationPhase::Switching) => 4,
                Ok(pb::MigrationPhase::Cleanup) => 5,
                _ => 6,
            };
            bar.set_position(rank);
            bar.set_message(format!(
                "{:<11} lag {:>6}  {} rows  {:.1} MB",
                phase(m.phase),
                m.source_lsn.saturating_sub(m.copied_lsn),
                m.rows_copied,
                m.bytes_copied as f64 / 1e6
            ));
            last = m;
        }
    }
    bar.finish();
    Ok(last)
}

/// Prints a migration, following it first with `--wait`; a failed wait exits with its own code.
async fn migration_outcome(
    control: &ControlPlane,
    output: Output,
    started: pb::Migration,
    follow: bool,
) -> Result<u8, Failure> {
    let shown = if follow {
        wait(control, output, started).await?
    } else {
        started
    };
    print_one(output, &MigrationView::from(&shown))?;
    let failed = follow
        && matches!(
            pb::MigrationPhase::try_from(shown.phase),
            Ok(pb::MigrationPhase::RolledBack | pb::MigrationPhase::Failed)
        );
    Ok(if failed {
        exit::MIGRATION_FAILED
    } else {
        exit::OK
    })
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let (endpoints, tls) = connection(&cli)?;
    let output = cli.output;
    let control = ControlPlane::with_tls(endpoints.clone(), &tls)
        .map_err(|e| failure(exit::USAGE, "Usage", e.to_string()))?;
    match cli.command {
        Command::Status => {
            let mut nodes = Vec::new();
            for endpoint in &endpoints {
                let status = match ControlPlane::with_tls(vec![endpoint.clone()], &tls) {
                    Ok(one) => tokio::time::timeout(
                        Duration::from_secs(2),
                        one.control().cluster_status(pb::ClusterStatusRequest {}),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok),
                    Err(_) => None,
                };
                nodes.push(match status {
                    Some(s) => NodeView::from_status(endpoint, s.get_ref()),
                    None => NodeView::unreachable(endpoint),
                });
            }
            print_list(output, &nodes)?;
            if !nodes.iter().any(|n| n.reachable && n.leader_id != 0) {
                return Err(failure(
                    exit::UNAVAILABLE,
                    "Unavailable",
                    "no node answered with a leader",
                ));
            }
        }
        Command::Node(NodeCommand::List) => {
            let status = control
                .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
                .await?;
            let members: Vec<MemberView> = status.members.iter().map(MemberView::from).collect();
            print_list(output, &members)?;
        }
        Command::Node(NodeCommand::Add { node_id, addr }) => {
            let request = pb::AddNodeRequest { node_id, addr };
            let changed = control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.add_node(request).await }
                })
                .await?;
            let members: Vec<MemberView> = changed.members.iter().map(MemberView::from).collect();
            print_list(output, &members)?;
        }
        Command::Node(NodeCommand::Remove { node_id }) => {
            let request = pb::RemoveNodeRequest { node_id };
            let changed = control
                .call(|mut c| async move { c.remove_node(request).await })
                .await?;
            let members: Vec<MemberView> = changed.members.iter().map(MemberView::from).collect();
            print_list(output, &members)?;
        }
        Command::Cells { region } => {
            let cells = control
                .call(|mut c| {
                    let region = region.clone().unwrap_or_default();
                    async move { c.list_cells(pb::ListCellsRequest { region }).await }
                })
                .await?;
            let views: Vec<CellView> = cells.cells.iter().map(CellView::from).collect();
            print_list(output, &views)?;
        }
        Command::Tenants { limit } => {
            let mut views: Vec<TenantView> = Vec::new();
            let mut token = String::new();
            loop {
                let page = control
                    .call(|mut c| {
                        let page_token = token.clone();
                        async move {
                            c.list_tenants(pb::ListTenantsRequest {
                                page_size: 1000,
                                page_token,
                            })
                            .await
                        }
                    })
                    .await?;
                views.extend(page.tenants.iter().map(TenantView::from));
                token = page.next_page_token;
                if token.is_empty() || views.len() >= limit {
                    break;
                }
            }
            views.truncate(limit);
            print_list(output, &views)?;
        }
        Command::Route {
            tenant,
            conversation,
        } => {
            let request = LookupRequest {
                tenant_id: tenant,
                conversation_id: conversation.unwrap_or_default(),
                consistency: Consistency::Linearizable as i32,
            };
            let found = control
                .call_routing(|mut c| {
                    let request = request.clone();
                    async move { c.lookup(request).await }
                })
                .await?;
            let route = found
                .route
                .ok_or_else(|| failure(exit::INTERNAL, "Internal", "lookup answered no route"))?;
            print_one(output, &RouteView::from(&route))?;
        }
        Command::Tenant(TenantCommand::Show { tenant }) => {
            let found = control
                .call(|mut c| {
                    let request = pb::GetTenantRequest {
                        tenant_id: tenant.clone(),
                    };
                    async move { c.get_tenant(request).await }
                })
                .await?;
            print_one(output, &TenantView::from(&found))?;
        }
        Command::Tenant(TenantCommand::Create {
            tenant,
            tier,
            region,
        }) => {
            let created = control
                .call(|mut c| {
                    let request = pb::CreateTenantRequest {
                        tenant_id: tenant.clone(),
                        tier: tier.proto() as i32,
                        home_region: region.clone(),
                    };
                    async move { c.create_tenant(request).await }
                })
                .await?;
            print_one(output, &TenantView::from(&created))?;
        }
        Command::Tenant(TenantCommand::SetTier { tenant, tier, wait }) => {
            let started = control
                .call(|mut c| {
                    let request = pb::SetTenantTierRequest {
                        tenant_id: tenant.clone(),
                        tier: tier.proto() as i32,
                    };
                    async move { c.set_tenant_tier(request).await }
                })
                .await?;
            return migration_outcome(&control, output, started, wait).await;
        }
        Command::Migrate {
            tenant,
            conversation,
            to,
            wait,
        } => {
            let started = match conversation {
                Some(conversation) => {
                    control
                        .call(|mut c| {
                            let request = pb::MigrateConversationRequest {
                                tenant_id: tenant.clone(),
                                conversation_id: conversation.clone(),
                                target_cell: to.clone().unwrap_or_default(),
                            };
                            async move { c.migrate_conversation(request).await }
                        })
                        .await?
                }
                None => {
                    control
                        .call(|mut c| {
                            let request = pb::MigrateTenantRequest {
                                tenant_id: tenant.clone(),
                                target_cell: to.clone().unwrap_or_default(),
                            };
                            async move { c.migrate_tenant(request).await }
                        })
                        .await?
                }
            };
            return migration_outcome(&control, output, started, wait).await;
        }
        Command::Migrations { all, tenant } => {
            let list = control
                .call(|mut c| {
                    let request = pb::ListMigrationsRequest {
                        active_only: !all,
                        tenant_id: tenant.clone().unwrap_or_default(),
                    };
                    async move { c.list_migrations(request).await }
                })
                .await?;
            let views: Vec<MigrationView> =
                list.migrations.iter().map(MigrationView::from).collect();
            print_list(output, &views)?;
        }
        Command::Cancel { id, reason } if id.starts_with("fo-") => {
            let request = pb::CancelFailoverRequest {
                failover_id: id,
                reason,
            };
            let cancelled = control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.cancel_failover(request).await }
                })
                .await?;
            print_one(output, &FailoverView::from(&cancelled))?;
        }
        Command::Cancel { id, .. } => {
            let cancelled = control
                .call(|mut c| {
                    let migration_id = id.clone();
                    async move {
                        c.cancel_migration(pb::CancelMigrationRequest { migration_id })
                            .await
                    }
                })
                .await?;
            print_one(output, &MigrationView::from(&cancelled))?;
        }
        Command::Failover {
            cell: Some(cell),
            reason,
            wait,
            mode,
            ..
        } => {
            let request = pb::FailoverCellRequest {
                cell_id: cell,
                mode: mode.to_proto() as i32,
                reason,
            };
            let failover = control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.failover_cell(request).await }
                })
                .await?;
            let failover = if wait {
                wait_for_failover(&control, failover).await?
            } else {
                failover
            };
            print_one(output, &FailoverView::from(&failover))?;
            if rolled_back(&failover) {
                return Ok(exit::FAILOVER_ROLLED_BACK);
            }
        }
        Command::Failover {
            region: Some(region),
            reason,
            wait,
            ..
        } => {
            let request = pb::FailoverRegionRequest { region, reason };
            let started = control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.failover_region(request).await }
                })
                .await?;
            let mut ended = Vec::new();
            for failover in started.failovers {
                ended.push(if wait {
                    wait_for_failover(&control, failover).await?
                } else {
                    failover
                });
            }
            let views: Vec<FailoverView> = ended.iter().map(FailoverView::from).collect();
            print_list(output, &views)?;
            for refused in &started.refused {
                eprintln!(
                    "cellctl: {} not failed over: {}",
                    refused.cell_id, refused.reason
                );
            }
            if ended.iter().any(rolled_back) {
                return Ok(exit::FAILOVER_ROLLED_BACK);
            }
            if !started.refused.is_empty() {
                return Ok(exit::REFUSED);
            }
        }
        Command::Failover { .. } => {
            return Err(failure(exit::USAGE, "Usage", "give a cell or --region"));
        }
        Command::Drain { cell, wait } => {
            let request = pb::DrainCellRequest { cell_id: cell };
            let progress = control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.drain_cell(request).await }
                })
                .await?;
            let progress = if wait {
                wait_for_drain(&control, output, progress).await?
            } else {
                progress
            };
            print_one(output, &DrainView::from(&progress))?;
        }
        Command::Remove { cell } => {
            let request = pb::RemoveCellRequest { cell_id: cell };
            control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.remove_cell(request).await }
                })
                .await?;
        }
        Command::Failovers { resume: true, .. } => {
            control
                .call(|mut c| async move {
                    c.resume_automatic_failover(pb::ResumeAutomaticFailoverRequest {})
                        .await
                })
                .await?;
            eprintln!("cellctl: automatic failover resumed");
        }
        Command::Audit {
            identity,
            method,
            limit,
        } => {
            let request = pb::ListAuditRequest {
                page_size: limit,
                page_token: String::new(),
                identity,
                method,
            };
            let page = control
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.list_audit(request).await }
                })
                .await?;
            let views: Vec<AuditView> = page.entries.iter().map(AuditView::from).collect();
            print_list(output, &views)?;
        }
        Command::Failovers { active, .. } => {
            let list = control
                .call(|mut c| async move {
                    c.list_failovers(pb::ListFailoversRequest {
                        active_only: active,
                    })
                    .await
                })
                .await?;
            let views: Vec<FailoverView> = list.failovers.iter().map(FailoverView::from).collect();
            print_list(output, &views)?;
            if list.halted_since_ms > 0 {
                eprintln!(
                    "cellctl: automatic failover is halted: {} primaries failed at once ({}); fail them over or not, then `cellctl failovers --resume`",
                    list.halted_for.len(),
                    list.halted_for.join(", ")
                );
            }
            if !list.held_back.is_empty() {
                eprintln!(
                    "cellctl: automatic failover is held back for failed cells {}: fail them over with `cellctl failover CELL`",
                    list.held_back.join(", ")
                );
            }
        }
    }
    Ok(exit::OK)
}

/// Follows a drain until the cell holds no key; a progress bar on a terminal.
async fn wait_for_drain(
    control: &ControlPlane,
    output: Output,
    mut progress: pb::DrainProgress,
) -> Result<pb::DrainProgress, Failure> {
    let total = progress.keys_left;
    let bar = if output == Output::Table {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:24}] {pos}/{len} keys moved  {msg}")
            .map_err(|e| failure(exit::INTERNAL, "Internal", e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(progress.cell_id.clone());
    bar.enable_steady_tick(Duration::from_millis(120));
    while progress.keys_left > 0 || progress.migrations_running > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cell_id = progress.cell_id.clone();
        progress = control
            .call(|mut c| {
                let request = pb::GetDrainRequest {
                    cell_id: cell_id.clone(),
                };
                async move { c.get_drain(request).await }
            })
            .await?;
        bar.set_position(total.saturating_sub(progress.keys_left));
        bar.set_message(format!(
            "{} migrating {}",
            progress.migrations_running, progress.last_error
        ));
    }
    bar.finish();
    Ok(progress)
}

/// A planned failover given up: its cell kept its keys.
fn rolled_back(failover: &pb::Failover) -> bool {
    failover.phase == pb::FailoverPhase::RolledBack as i32
}

/// Follows a failover until it ends. A switched failover's old primary, once it answers again,
/// moves it on from DONE to MERGED, often within one poll: MERGED ends the wait too.
async fn wait_for_failover(
    control: &ControlPlane,
    mut failover: pb::Failover,
) -> Result<pb::Failover, Failure> {
    while !FailoverPhase::from_proto(failover.phase).is_some_and(FailoverPhase::is_terminal) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let failover_id = failover.failover_id.clone();
        failover = control
            .call(|mut c| {
                let request = pb::GetFailoverRequest {
                    failover_id: failover_id.clone(),
                };
                async move { c.get_failover(request).await }
            })
            .await?;
    }
    Ok(failover)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = cli.output;
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({ "error": { "code": failure.kind, "message": failure.message } })
                );
            }
            eprintln!("cellctl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
