//! Starting and stopping everything an agent does.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::cells::{self, LocalCells};
use crate::config::AgentConfig;
use crate::supervisor::{Launcher, Supervisor};
use cellplane_api::client::ControlPlane;
use cellplane_api::tls::Tls;

/// How long one control-plane node may take to answer the agent before it asks the next.
/// Well inside a lease (2 s by default, renewed every sixth of it), so a node whose machine
/// died under a live connection costs the cells one renewal, not their lease. Every call the
/// agent makes is safe to repeat.
const CONTROL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] cellplane_api::client::ClientError),
    #[error(transparent)]
    Tls(#[from] cellplane_api::tls::TlsError),
    #[error("cannot find the im-cell binary: {0}")]
    Binary(String),
    #[error("control plane refused cell {cell_id}: {status}")]
    Join {
        cell_id: String,
        status: tonic::Status,
    },
}

/// The `im-cell` binary: as configured, else the one beside this executable.
pub fn im_cell_binary(config: &AgentConfig) -> Result<PathBuf, AgentError> {
    if let Some(path) = &config.im_cell_binary {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().map_err(|e| AgentError::Binary(e.to_string()))?;
    let path = exe.with_file_name("im-cell");
    if path.exists() {
        Ok(path)
    } else {
        Err(AgentError::Binary(format!(
            "{} does not exist; set im_cell_binary in the config",
            path.display()
        )))
    }
}

/// Runs the agent of `region` until `shutdown` resolves, then stops its cells.
pub async fn run(
    config: AgentConfig,
    region: String,
    control_plane: Vec<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let binary = im_cell_binary(&config)?;
    let tls = Tls::load_optional(config.tls.as_ref())?;
    let launcher = Launcher::processes(&binary, (config.tls.as_ref(), config.cell_auth.as_ref()));
    run_with(config, region, control_plane, (tls, launcher), shutdown).await
}

/// [`run`] with the agent's `tls` (and so its network) and the way it runs its cells given:
/// the simulation runs the cells as tasks over its own network.
pub async fn run_with(
    config: AgentConfig,
    region: String,
    control_plane: Vec<String>,
    (tls, launcher): (Tls, Launcher),
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let control =
        ControlPlane::with_tls(control_plane, &tls)?.with_attempt_timeout(CONTROL_ATTEMPT_TIMEOUT);
    let cells: LocalCells = cells::local_cells(&config.cells, &tls)?;
    let (stop_tx, stop) = watch::channel(false);
    let supervisor = Supervisor::start(&cells, launcher, &config.data_dir, config.restart);
    tracing::info!(%region, cells = cells.len(), "agent started its cells");

    let joined = async {
        // Primaries first: a standby joins once its primary is registered, and a remote
        // standby's primary is another agent's, which may still be joining its own.
        let (standbys, primaries): (Vec<_>, Vec<_>) = cells
            .values()
            .partition(|cell| cell.spec.standby_of.is_some());
        for cell in primaries.into_iter().chain(standbys) {
            cells::join(&control, &region, cell, &stop)
                .await
                .map_err(|status| AgentError::Join {
                    cell_id: cell.spec.cell_id.clone(),
                    status,
                })?;
        }
        Ok::<(), AgentError>(())
    };
    tokio::pin!(shutdown);
    let joined = tokio::select! {
        joined = joined => joined,
        () = &mut shutdown => {
            // Asked to stop while still registering (the control plane unreachable, say): the
            // shutdown is spent, so stop here rather than wait for another.
            tracing::info!(%region, "agent stopping before its cells joined");
            supervisor.stop().await;
            return Ok(());
        }
    };
    if let Err(err) = joined {
        supervisor.stop().await;
        return Err(err);
    }
    let tasks = [
        tokio::spawn(cells::heartbeats(
            control.clone(),
            cells.clone(),
            Duration::from_millis(config.heartbeat_interval_ms),
            stop.clone(),
        )),
        tokio::spawn(crate::grants::run(
            control.clone(),
            cells.clone(),
            stop.clone(),
        )),
        tokio::spawn(crate::migrate::run(
            control.clone(),
            cells.clone(),
            stop.clone(),
        )),
        tokio::spawn(crate::protection::run(
            control.clone(),
            cells.clone(),
            stop.clone(),
        )),
        tokio::spawn(crate::lease::run(
            control.clone(),
            cells.clone(),
            stop.clone(),
        )),
        tokio::spawn(crate::failover::run(
            control.clone(),
            cells.clone(),
            stop.clone(),
        )),
        tokio::spawn(crate::roles::run(
            control.clone(),
            cells.clone(),
            stop.clone(),
        )),
    ];
    tracing::info!(%region, "agent serving");
    shutdown.await;
    tracing::info!(%region, "agent stopping");
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    supervisor.stop().await;
    Ok(())
}
