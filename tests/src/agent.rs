//! A real `cell-agent serve` process running its region's cells, on free loopback ports.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::cell::messaging_client::MessagingClient;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::{binary, free_port};

/// One cell an agent runs.
#[derive(Debug, Clone)]
pub struct AgentCell {
    pub cell_id: String,
    pub zone: String,
    pub tier: String,
    pub addr: String,
}

impl AgentCell {
    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("cell address")
            .connect_lazy()
    }

    pub fn messaging(&self) -> MessagingClient<Channel> {
        MessagingClient::new(self.channel())
    }

    pub fn admin(&self) -> CellAdminClient<Channel> {
        CellAdminClient::new(self.channel())
    }
}

/// A standby an agent runs: `(standby, primary, the primary's address when another agent
/// runs it)`.
type Standby<'a> = (&'a str, &'a str, Option<&'a str>);

pub struct AgentProcess {
    pub region: String,
    pub cells: Vec<AgentCell>,
    pub dir: TempDir,
    control_plane: Vec<String>,
    /// Crash points the next start arms (`cellplane_api::failpoint`); its cells inherit them.
    crash_at: Option<String>,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts the agent of `region` with `cells` as `(cell_id, zone, tier)`, each started with
    /// `cell_args` too; returns at once: the agent registers its cells in the background.
    pub fn start(
        region: &str,
        control_plane: &[String],
        cells: &[(&str, &str, &str)],
        cell_args: &[&str],
    ) -> Self {
        Self::start_with_standbys(region, control_plane, cells, &[], cell_args)
    }

    /// Like [`AgentProcess::start`], with some cells the standbys of others: `(standby,
    /// primary)` pairs, both among `cells`.
    pub fn start_with_standbys(
        region: &str,
        control_plane: &[String],
        cells: &[(&str, &str, &str)],
        standbys: &[(&str, &str)],
        cell_args: &[&str],
    ) -> Self {
        let standbys: Vec<Standby> = standbys
            .iter()
            .map(|(standby, primary)| (*standby, *primary, None))
            .collect();
        Self::start_full(region, control_plane, cells, &standbys, cell_args)
    }

    /// Like [`AgentProcess::start_with_standbys`], for standbys whose primaries another agent
    /// runs: `(standby, primary, primary's address)`.
    pub fn start_following(
        region: &str,
        control_plane: &[String],
        cells: &[(&str, &str, &str)],
        remote: &[(&str, &str, &str)],
        cell_args: &[&str],
    ) -> Self {
        let standbys: Vec<Standby> = remote
            .iter()
            .map(|(standby, primary, addr)| (*standby, *primary, Some(*addr)))
            .collect();
        Self::start_full(region, control_plane, cells, &standbys, cell_args)
    }

    fn start_full(
        region: &str,
        control_plane: &[String],
        cells: &[(&str, &str, &str)],
        standbys: &[Standby],
        cell_args: &[&str],
    ) -> Self {
        let mut dir = tempfile::Builder::new()
            .prefix("cellplane-agent-")
            .tempdir()
            .expect("temp dir");
        if std::env::var_os("CELLPLANE_KEEP_CLUSTER").is_some() {
            dir.disable_cleanup(true);
        }
        let cells: Vec<AgentCell> = cells
            .iter()
            .map(|(cell_id, zone, tier)| AgentCell {
                cell_id: cell_id.to_string(),
                zone: zone.to_string(),
                tier: tier.to_string(),
                addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let mut config = format!(
            "data_dir = {:?}\nheartbeat_interval_ms = 500\n[restart]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n",
            dir.path().join("data")
        );
        // Each cell listens on every interface and advertises its loopback address, as cells
        // in a pod listen on 0.0.0.0 and are reached through their Service's name.
        for cell in &cells {
            let port = cell.addr.rsplit_once(':').map_or("", |(_, port)| port);
            config.push_str(&format!(
                "[[cells]]\ncell_id = {:?}\nzone = {:?}\ntier = {:?}\nlisten = \"0.0.0.0:{port}\"\nadvertise = {:?}\ncapacity = 1000\nargs = {:?}\n",
                cell.cell_id, cell.zone, cell.tier, cell.addr, cell_args
            ));
            if let Some((_, primary, addr)) = standbys.iter().find(|(s, ..)| *s == cell.cell_id) {
                config.push_str(&format!("standby_of = {primary:?}\n"));
                if let Some(addr) = addr {
                    config.push_str(&format!("primary_endpoint = {addr:?}\n"));
                }
            }
        }
        std::fs::write(dir.path().join("agent.toml"), config).expect("write agent config");
        let mut agent = AgentProcess {
            region: region.to_string(),
            cells,
            dir,
            control_plane: control_plane.to_vec(),
            crash_at: None,
            child: None,
        };
        agent.spawn();
        agent
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("log file");
        let mut command = Command::new(binary("cell-agent"));
        if let Some(points) = &self.crash_at {
            command.env(cellplane_api::failpoint::ENV, points);
        }
        let child = command
            .arg("serve")
            .arg("--region")
            .arg(&self.region)
            .arg("--control-plane")
            .arg(self.control_plane.join(","))
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cell-agent");
        self.child = Some(child);
    }

    pub fn cell(&self, cell_id: &str) -> &AgentCell {
        self.cells
            .iter()
            .find(|c| c.cell_id == cell_id)
            .expect("a cell of this agent")
    }

    /// SIGKILLs the agent; its cells notice and stop shortly after.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill agent");
        }
    }

    /// SIGTERMs the agent and waits up to `limit` for it to exit; answers its exit status, or
    /// `None` if it is still running (it is then killed).
    pub async fn terminate(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id().and_then(|pid| i32::try_from(pid).ok())?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => Some(status.expect("wait for the agent")),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the agent is still running");
        self.spawn();
    }

    /// The crash points the next restart arms, or none.
    pub fn set_crash_at(&mut self, points: Option<&str>) {
        self.crash_at = points.map(str::to_string);
    }

    /// Waits up to `limit` for the agent to exit by itself; answers how it exited.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        crate::wait_exit(&mut self.child, limit).await
    }

    /// SIGKILLs one of the agent's cells, as a crash; the agent restarts it.
    pub fn kill_cell(&self, cell_id: &str) {
        self.signal_cell(cell_id, nix::sys::signal::Signal::SIGKILL);
    }

    /// Sends `signal` to the process of one of the agent's cells (SIGSTOP: a stalled cell).
    pub fn signal_cell(&self, cell_id: &str, signal: nix::sys::signal::Signal) {
        crate::signal_cell(&self.dir.path().join("data"), cell_id, signal);
    }

    /// Waits until every cell of this agent answers.
    pub async fn wait_for_cells(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for cell in &self.cells {
            loop {
                let answered = cell
                    .admin()
                    .cell_status(cellplane_api::proto::cell::CellStatusRequest::default())
                    .await
                    .is_ok();
                if answered {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cell {} did not come up within {limit:?}",
                    cell.cell_id
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
