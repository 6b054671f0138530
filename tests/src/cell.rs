//! A real `im-cell serve` process on a free loopback port with its own data directory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::cell::messaging_client::MessagingClient;
use cellplane_api::proto::cell::sync_client::SyncClient;
use cellplane_api::proto::cell::{CellStatusRequest, GrantRequest};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::{binary, free_port};

pub struct CellProcess {
    pub cell_id: String,
    pub addr: String,
    pub dir: TempDir,
    extra_args: Vec<String>,
    /// Crash points the next start arms (`cellplane_api::failpoint`).
    crash_at: Option<String>,
    child: Option<Child>,
}

impl CellProcess {
    /// Starts a cell and waits until it answers.
    pub async fn start(cell_id: &str, extra_args: &[&str]) -> CellProcess {
        let dir = tempfile::Builder::new()
            .prefix("cellplane-cell-")
            .tempdir()
            .expect("temp dir");
        let mut cell = CellProcess {
            cell_id: cell_id.to_string(),
            addr: format!("127.0.0.1:{}", free_port()),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            crash_at: None,
            child: None,
        };
        cell.spawn().await;
        cell
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("cell.log"))
            .expect("log file");
        let mut command = Command::new(binary("im-cell"));
        if let Some(points) = &self.crash_at {
            command.env(cellplane_api::failpoint::ENV, points);
        }
        let child = command
            .args([
                "serve",
                "--cell-id",
                &self.cell_id,
                "--listen",
                &self.addr,
                "--data-dir",
            ])
            .arg(self.data_dir())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn im-cell");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .admin()
                .cell_status(CellStatusRequest::default())
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cell did not answer within 30s; log in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill cell");
        }
    }

    /// SIGTERM: the cell drains its calls and stops; answers how it exited.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().expect("the cell is running");
        child.wait().await.expect("wait for the cell")
    }

    /// Freezes the cell with SIGSTOP: it keeps its sockets and answers nothing until
    /// [`CellProcess::resume`].
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused cell go on with SIGCONT.
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("the cell is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|e| panic!("{signal} to the cell: {e}"));
    }

    /// The crash points the next restart arms, or none.
    pub fn set_crash_at(&mut self, points: Option<&str>) {
        self.crash_at = points.map(str::to_string);
    }

    /// Waits up to `limit` for the cell to exit by itself; answers how it exited.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        crate::wait_exit(&mut self.child, limit).await
    }

    /// The flags the next restart starts the cell with (a standby restarted as a plain cell,
    /// say).
    pub fn set_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    }

    /// Deletes the data directory of a killed cell, as a lost disk.
    pub fn wipe(&self) {
        assert!(self.child.is_none(), "the cell is still running");
        std::fs::remove_dir_all(self.data_dir()).expect("wipe the data directory");
    }

    /// The cell's own status.
    pub async fn status(&self) -> cellplane_api::proto::cell::CellStatusResponse {
        self.admin()
            .cell_status(CellStatusRequest::default())
            .await
            .expect("cell status")
            .into_inner()
    }

    /// Starts the cell again from its data directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the cell is still running");
        self.spawn().await;
    }

    pub fn channel(&self) -> Channel {
        cellplane_api::client::channel(
            &self.addr,
            Duration::from_millis(500),
            &cellplane_api::tls::Tls::plaintext(),
        )
        .expect("channel")
    }

    pub fn messaging(&self) -> MessagingClient<Channel> {
        MessagingClient::new(self.channel())
    }

    pub fn sync(&self) -> SyncClient<Channel> {
        SyncClient::new(self.channel())
    }

    pub fn admin(&self) -> CellAdminClient<Channel> {
        CellAdminClient::new(self.channel())
    }

    /// Grants the cell a route key at an epoch.
    pub async fn grant(&self, tenant: &str, conversation: &str, epoch: u64) {
        self.admin()
            .grant(GrantRequest {
                tenant_id: tenant.into(),
                conversation_id: conversation.into(),
                epoch,
            })
            .await
            .expect("grant");
    }
}
