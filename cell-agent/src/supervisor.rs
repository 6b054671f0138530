//! Runs each IM cell — as a child process, or as a task in a simulation — and restarts it
//! when it dies, with back-off.
//!
//! A cell restarts from its own data directory: everything it acknowledged is on its disk, and
//! its grants are too, so a restart needs nothing from the control plane. On shutdown each
//! cell is asked to stop (SIGTERM) and killed if it has not within a grace period.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use cellplane_api::auth::AuthConfig;
use cellplane_api::dir_lock::EXIT_DIR_LOCKED;
use cellplane_api::tls::TlsPaths;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cells::LocalCells;
use crate::config::{CellSpec, RestartPolicy};

/// How long a cell may take to drain after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a cell may find its data directory held by another process before the agent
/// stops starting it: a cell of an earlier agent killed outright takes up to [`STOP_GRACE`] to
/// go; past that, another live process owns the directory, and restarting in a loop against
/// it would only hide that.
const LOCKED_GIVE_UP: Duration = Duration::from_secs(15);

pub struct Supervisor {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Where a cell keeps its data and its log.
pub fn cell_paths(data_dir: &Path, cell_id: &str) -> (PathBuf, PathBuf) {
    (
        data_dir.join(cell_id),
        data_dir.join(format!("{cell_id}.log")),
    )
}

/// What a cell runs as when the control plane changed it since the config was written: the
/// primary it follows after a failover left it behind (a change restarts it), or the standbys
/// it waits for once a failover promoted it (set on the running cell, used from its next
/// start). The default runs it as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    /// Follow this primary.
    pub following: Option<Following>,
    /// Wait for these standbys.
    pub sync_standbys: Option<Vec<String>>,
}

/// How the agent runs its cells.
#[derive(Clone)]
pub enum Launcher {
    /// `im-cell serve` child processes of this binary, with the arguments every cell gets (its
    /// TLS files, who may call it).
    Processes {
        binary: PathBuf,
        args: Vec<std::ffi::OsString>,
    },
    /// Cells as tasks of this process, started by the given function: the deterministic
    /// simulation runs an agent and its cells on one simulated host this way. The agent does
    /// not link the cell; its caller does.
    Tasks(Arc<dyn Fn(CellStart) -> BoxFuture<'static, Result<(), String>> + Send + Sync>),
}

/// What a cell run as a task starts with, as a process gets it in its arguments.
pub struct CellStart {
    pub spec: CellSpec,
    pub following: Option<Following>,
    pub sync_standbys: Vec<String>,
    pub data_dir: PathBuf,
    /// Resolves when the cell is to stop (drain, then end).
    pub stop: BoxFuture<'static, ()>,
}

/// The primary a cell is started as the standby of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Following {
    pub primary: String,
    pub endpoint: String,
    /// It rejoined as this primary's standby after a failover moved its keys there: a
    /// promotion the cell remembers, even from this primary, is over.
    pub rejoined: bool,
}

impl Following {
    /// Whether both follow one primary at one endpoint, however they came to.
    fn same_primary(&self, other: &Following) -> bool {
        (&self.primary, &self.endpoint) == (&other.primary, &other.endpoint)
    }
}

impl Launcher {
    /// `im-cell` processes of `binary`, each with the agent's identity and the policy of who
    /// may call it.
    pub fn processes(binary: &Path, (tls, auth): (Option<&TlsPaths>, Option<&AuthConfig>)) -> Self {
        let mut args: Vec<std::ffi::OsString> = tls
            .map(|tls| {
                vec![
                    "--tls-ca".into(),
                    tls.ca.clone().into(),
                    "--tls-cert".into(),
                    tls.cert.clone().into(),
                    "--tls-key".into(),
                    tls.key.clone().into(),
                ]
            })
            .unwrap_or_default();
        if let Some(auth) = auth {
            for (flag, names) in [
                ("--allow-admin", &auth.admin),
                ("--allow-agent", &auth.agent),
                ("--allow-reader", &auth.reader),
                ("--allow-node", &auth.node),
            ] {
                for name in names {
                    args.extend([flag.into(), name.into()]);
                }
            }
            args.push("--enforce-auth".into());
        }
        Self::Processes {
            binary: binary.to_path_buf(),
            args,
        }
    }

    fn start(&self, spec: &CellSpec, role: &Role, data_dir: &Path) -> std::io::Result<Running> {
        match self {
            Self::Processes { binary, args } => {
                spawn(spec, role, (binary, args), data_dir).map(Running::Process)
            }
            Self::Tasks(start) => {
                let (following, sync_standbys) = resolve(spec, role);
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(start(CellStart {
                    spec: spec.clone(),
                    following,
                    sync_standbys,
                    data_dir: cell_paths(data_dir, &spec.cell_id).0,
                    stop: Box::pin(async move {
                        let _ = stopped.await;
                    }),
                }));
                Ok(Running::Task {
                    task,
                    stop: Some(stop),
                })
            }
        }
    }
}

/// A started cell.
enum Running {
    Process(Child),
    Task {
        task: JoinHandle<Result<(), String>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

/// How a cell ended.
struct Exited {
    /// Another process holds its data directory.
    locked: bool,
    description: String,
}

impl Running {
    fn describe(&self) -> String {
        match self {
            Self::Process(child) => format!("pid {}", child.id().unwrap_or_default()),
            Self::Task { .. } => "a task of the agent".into(),
        }
    }

    async fn wait(&mut self) -> Exited {
        match self {
            Self::Process(child) => {
                let status = child.wait().await;
                Exited {
                    locked: status
                        .as_ref()
                        .is_ok_and(|s| s.code() == Some(EXIT_DIR_LOCKED)),
                    description: format!("{status:?}"),
                }
            }
            Self::Task { task, .. } => Exited {
                locked: false,
                description: match task.await {
                    Ok(Ok(())) => "stopped".into(),
                    Ok(Err(error)) => error,
                    Err(error) => error.to_string(),
                },
            },
        }
    }

    /// Asks the cell to stop, and ends it if it has not within [`STOP_GRACE`].
    async fn terminate(&mut self, cell_id: &str) {
        match self {
            Self::Process(child) => terminate(cell_id, child).await,
            Self::Task { task, stop } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if tokio::time::timeout(STOP_GRACE, &mut *task).await.is_err() {
                    tracing::warn!(
                        cell_id,
                        "cell did not stop within {STOP_GRACE:?}; ending it"
                    );
                    task.abort();
                }
            }
        }
    }
}

impl Supervisor {
    /// Starts every cell and keeps it running until [`Supervisor::stop`]; a cell whose role
    /// changes is restarted in its new role.
    pub fn start(
        cells: &LocalCells,
        launcher: Launcher,
        data_dir: &Path,
        policy: RestartPolicy,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let tasks = cells
            .values()
            .map(|cell| {
                tokio::spawn(supervise(
                    cell.spec.clone(),
                    cell.role(),
                    launcher.clone(),
                    data_dir.to_path_buf(),
                    policy,
                    stopped.clone(),
                ))
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops every cell and waits until they are gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The primary a cell follows and the standbys it waits for: the control plane's word when it
/// changed them since the config was written, else the config's.
fn resolve(spec: &CellSpec, role: &Role) -> (Option<Following>, Vec<String>) {
    let following = match (&role.following, &spec.standby_of, &spec.primary_endpoint) {
        (Some(following), _, _) => Some(following.clone()),
        (None, Some(primary), Some(endpoint)) => Some(Following {
            primary: primary.clone(),
            endpoint: endpoint.clone(),
            rejoined: false,
        }),
        _ => None,
    };
    let sync = role
        .sync_standbys
        .as_ref()
        .or(spec.sync_standbys.as_ref())
        .cloned()
        .unwrap_or_default();
    (following, sync)
}

fn spawn(
    spec: &CellSpec,
    role: &Role,
    (binary, common): (&Path, &[std::ffi::OsString]),
    data_dir: &Path,
) -> std::io::Result<Child> {
    let (dir, log) = cell_paths(data_dir, &spec.cell_id);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let (following, sync) = resolve(spec, role);
    let mut standby = match following {
        Some(Following {
            primary,
            endpoint,
            rejoined,
        }) => {
            let mut args = vec![
                "--standby-of".to_string(),
                primary,
                "--primary-endpoint".to_string(),
                endpoint,
            ];
            if rejoined {
                args.push("--rejoined".to_string());
            }
            args
        }
        None => Vec::new(),
    };
    for sync in sync {
        standby.extend(["--sync-standby".to_string(), sync]);
    }
    if let Some(ms) = spec.sync_timeout_ms {
        standby.extend(["--sync-timeout-ms".to_string(), ms.to_string()]);
    }
    let mut command = Command::new(binary);
    command.arg("serve");
    cellplane_api::serve::exit_with_this_process(&mut command);
    command
        .arg("--cell-id")
        .arg(&spec.cell_id)
        .arg("--listen")
        .arg(spec.listen.to_string())
        .arg("--data-dir")
        .arg(&dir)
        .arg("--lease-required")
        .args(standby)
        .args(common)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
}

async fn supervise(
    spec: CellSpec,
    mut role: watch::Receiver<Role>,
    launcher: Launcher,
    data_dir: PathBuf,
    policy: RestartPolicy,
    mut stopped: watch::Receiver<bool>,
) {
    let initial = Duration::from_millis(policy.initial_backoff_ms);
    let mut backoff = initial;
    // Since when the cell keeps finding its data directory held.
    let mut locked_since: Option<Instant> = None;
    loop {
        if *stopped.borrow() {
            return;
        }
        let started = Instant::now();
        let current = role.borrow_and_update().clone();
        let mut following = current.following.clone();
        match launcher.start(&spec, &current, &data_dir) {
            Ok(mut cell) => {
                tracing::info!(cell_id = %spec.cell_id, running = cell.describe(), ?current, "cell started");
                tokio::select! {
                    exited = cell.wait() => {
                        if !exited.locked {
                            locked_since = None;
                            tracing::warn!(cell_id = %spec.cell_id, status = exited.description, "cell exited; restarting");
                        } else if locked_since.get_or_insert(started).elapsed() < LOCKED_GIVE_UP {
                            tracing::warn!(cell_id = %spec.cell_id, "another process holds the cell's data directory; trying again");
                        } else {
                            let (dir, log) = cell_paths(&data_dir, &spec.cell_id);
                            tracing::error!(
                                cell_id = %spec.cell_id,
                                dir = %dir.display(),
                                log = %log.display(),
                                "another process has held the cell's data directory for {LOCKED_GIVE_UP:?}; not starting the cell again until the agent restarts"
                            );
                            metrics::gauge!("cellplane_agent_cells_locked_out").increment(1.0);
                            let _ = stopped.changed().await;
                            return;
                        }
                    }
                    () = following_changes(&mut role, &mut following) => {
                        tracing::warn!(cell_id = %spec.cell_id, role = ?*role.borrow(), "the cell follows another primary now; restarting it");
                        cell.terminate(&spec.cell_id).await;
                        continue;
                    }
                    _ = stopped.changed() => {
                        cell.terminate(&spec.cell_id).await;
                        return;
                    }
                }
            }
            Err(err) => {
                tracing::error!(cell_id = %spec.cell_id, error = %err, "cannot start cell");
            }
        }
        if started.elapsed() >= Duration::from_millis(policy.stable_after_ms) {
            backoff = initial;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_millis(policy.max_backoff_ms));
    }
}

/// Resolves once the role names a primary to follow other than the one the running cell
/// follows (`following`). A role that names none means the running cell was promoted where it
/// runs, which is noted with no restart; so are changed synchronous standbys, which are set on
/// the running cell and used from its next start.
async fn following_changes(role: &mut watch::Receiver<Role>, following: &mut Option<Following>) {
    while role.changed().await.is_ok() {
        match (&role.borrow().following, &*following) {
            (None, _) => *following = None,
            (Some(wanted), Some(running)) if wanted.same_primary(running) => {}
            (Some(_), _) => return,
        }
    }
    std::future::pending::<()>().await;
}

async fn terminate(cell_id: &str, child: &mut Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            tracing::info!(cell_id, "cell stopped");
            return;
        }
        tracing::warn!(
            cell_id,
            "cell did not stop within {STOP_GRACE:?}; killing it"
        );
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn following(primary: &str) -> Option<Following> {
        Some(Following {
            primary: primary.into(),
            endpoint: format!("{primary}:1"),
            rejoined: true,
        })
    }

    #[tokio::test]
    async fn a_promotion_in_place_is_noted_and_a_later_rejoin_of_that_primary_restarts() {
        let (desired, mut role) = watch::channel(Role {
            following: following("p"),
            sync_standbys: None,
        });
        role.borrow_and_update();
        let mut running = following("p");
        // Promoted where it runs: no restart, and it follows nobody now.
        desired.send_modify(|r| r.following = None);
        let waited = tokio::time::timeout(
            Duration::from_millis(50),
            following_changes(&mut role, &mut running),
        )
        .await;
        assert!(waited.is_err(), "a promotion restarted the cell");
        assert_eq!(running, None);
        // Failed over back to p, it rejoins p: a restart to follow it.
        desired.send_modify(|r| r.following = following("p"));
        tokio::time::timeout(
            Duration::from_secs(5),
            following_changes(&mut role, &mut running),
        )
        .await
        .expect("following p again restarts the running primary");
    }
}
