//! `cell-agent`: the agent of one region.

use anyhow::Context;
use cellplane_api::dir_lock::DirLock;
use cellplane_api::serve::shutdown_signal_or_parent_exit;
use cellplane_cell_agent::agent;
use cellplane_cell_agent::config::AgentConfig;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cell-agent",
    version,
    about = "The agent of one region: runs its IM cells and carries out the control plane's decisions on them",
    long_about = "The agent of one region. It starts the region's IM cells as child processes and \
        restarts them when they crash, registers them with the control plane, reports their \
        health, grants each cell the keys routed to it, and carries out the migrations that \
        target its cells.\n\nLogs go to stderr; set RUST_LOG to change the level."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the region's cells until Ctrl-C or SIGTERM.
    Serve {
        /// The region this agent serves, e.g. cn-hangzhou.
        #[arg(long)]
        region: String,
        /// Control-plane nodes, comma-separated host:port.
        #[arg(long, value_delimiter = ',', required = true)]
        control_plane: Vec<String>,
        /// The agent's TOML config: its data directory and its cells.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Stop (gracefully, with its cells) when the process that started this one exits,
        /// so a supervisor killed outright leaves no agent behind.
        #[arg(long)]
        exit_with_parent: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    cellplane_api::failpoint::arm_from_env()?;
    match Cli::parse().command {
        Command::Serve {
            region,
            control_plane,
            config,
            exit_with_parent,
        } => {
            cellplane_api::ids::validate_id("region", &region)?;
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config = AgentConfig::from_toml(&text)?;
            // Held until the process ends: one agent per data directory (its cells' too).
            let _lock = DirLock::acquire_or_exit(&config.data_dir)?;
            agent::run(
                config,
                region,
                control_plane,
                shutdown_signal_or_parent_exit(exit_with_parent),
            )
            .await?;
        }
    }
    Ok(())
}
