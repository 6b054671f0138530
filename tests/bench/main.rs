//! `cellplane-bench`: the control plane's benchmarks, run against real `cellplane serve`
//! processes (release build) on loopback, with the load generator on the same machine.
//!
//!   ./scripts/ensure-tools.sh protoc etcd kube-apiserver
//!   cargo build --release --workspace --bins && target/release/cellplane-bench all
//!
//! Figures go to stdout and, with `--out`, to a Markdown file (docs/benchmarks.md).

mod cell;
mod drive;
mod failover;
mod leader_kill;
mod lookups;
mod migration;
mod mtls;
mod operator;
mod report;
mod scale;
mod standby;
mod updates;
mod versus_etcd;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(about = "Benchmarks of the cellplane control plane")]
struct Cli {
    /// Which benchmarks to run.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Seconds each measured phase runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Tenants in the scale benchmark.
    #[arg(long, default_value_t = 10_000_000)]
    tenants: u64,
    /// Conversation overrides in the scale benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    overrides: u64,
    /// Tenants loaded through Raft into a real cluster to time snapshot transfer and restart.
    #[arg(long, default_value_t = 10_000_000)]
    cluster_tenants: u64,
    /// Overrides loaded through Raft into that cluster.
    #[arg(long, default_value_t = 1_000_000)]
    cluster_overrides: u64,
    /// Messages in the tenant whose copy the migration benchmark times.
    #[arg(long, default_value_t = 1_000_000)]
    migration_messages: u64,
    /// Migrations under load whose write pause is measured.
    #[arg(long, default_value_t = 50)]
    migrations: usize,
    /// Seconds a standby is down in the standby benchmark's catch-up phase.
    #[arg(long, default_value_t = 60)]
    outage: u64,
    /// Leader SIGKILLs timed on each side in the leader-kill benchmark.
    #[arg(long, default_value_t = 30)]
    kills: usize,
    /// Primaries SIGKILLed per kind of loss in the failover benchmark.
    #[arg(long, default_value_t = 30)]
    failovers: usize,
    /// PLANNED failovers timed in the failover benchmark.
    #[arg(long, default_value_t = 30)]
    planned: usize,
    /// Tenants applied in each of the operator benchmark's two phases.
    #[arg(long, default_value_t = 100)]
    operator_tenants: usize,
    /// Migrations each way (a Migration object, cellctl) in the operator benchmark.
    #[arg(long, default_value_t = 20)]
    operator_migrations: usize,
    /// Write the report here (Markdown).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    Updates,
    Lookups,
    Scale,
    Cell,
    Migration,
    /// cellplane beside etcd: updates, lookups and watch fan-out in one run.
    Etcd,
    /// The write pause after a leader's SIGKILL, cellplane beside etcd.
    LeaderKill,
    /// What standbys cost a cell's sends, their catch-up and their lag.
    Standby,
    /// Failover RTO per tier and loss, and what lease renewals cost at 1,000 cells.
    Failover,
    /// Route updates and lookups at 256 clients, plaintext beside mutual TLS.
    Mtls,
    /// The Kubernetes operator: Tenant apply → Ready, Migration apply → DONE beside cellctl.
    Operator,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let phase = Duration::from_secs(cli.seconds);
    let mut report = report::Report::new();
    if matches!(cli.which, Which::All | Which::Updates) {
        updates::run(&mut report, phase).await?;
    }
    if matches!(cli.which, Which::All | Which::Etcd) {
        versus_etcd::run(&mut report, phase).await?;
    }
    if matches!(cli.which, Which::All | Which::LeaderKill) {
        leader_kill::run(&mut report, cli.kills).await?;
    }
    if matches!(cli.which, Which::All | Which::Lookups) {
        lookups::run(&mut report, phase).await?;
    }
    if matches!(cli.which, Which::All | Which::Mtls) {
        mtls::run(&mut report, phase).await?;
    }
    if matches!(cli.which, Which::All | Which::Scale) {
        scale::run(
            &mut report,
            cli.tenants,
            cli.overrides,
            cli.cluster_tenants,
            cli.cluster_overrides,
        )
        .await?;
    }
    if matches!(cli.which, Which::All | Which::Cell) {
        cell::run(&mut report, phase).await?;
    }
    if matches!(cli.which, Which::All | Which::Standby) {
        standby::run(&mut report, phase, Duration::from_secs(cli.outage)).await?;
    }
    if matches!(cli.which, Which::All | Which::Failover) {
        failover::run(&mut report, cli.failovers, cli.planned, phase).await?;
    }
    if matches!(cli.which, Which::All | Which::Migration) {
        migration::run(&mut report, cli.migration_messages, cli.migrations).await?;
    }
    if matches!(cli.which, Which::All | Which::Operator) {
        operator::run(&mut report, cli.operator_tenants, cli.operator_migrations).await?;
    }
    let text = report.render();
    println!("{text}");
    if let Some(path) = cli.out {
        std::fs::write(&path, text)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
