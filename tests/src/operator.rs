//! A real `cellplane operator` process against a [`KubeApiServer`] and a control plane,
//! killed when dropped.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::apiserver::KubeApiServer;
use crate::{binary, free_port};

pub struct OperatorProcess {
    pub identity: String,
    pub metrics_addr: String,
    pub log: PathBuf,
    child: Option<Child>,
}

/// The Lease timing the tests run with: a dead holder is replaced within about 3 s.
pub const LEASE_DURATION_S: u64 = 3;

impl OperatorProcess {
    /// Starts replica `identity` of the operator, reaching the control plane at
    /// `control_plane`, with `extra_args` too; its log goes to `log`.
    pub fn start(
        server: &KubeApiServer,
        control_plane: &[String],
        identity: &str,
        log: PathBuf,
        extra_args: &[&str],
    ) -> Self {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(binary("cellplane"))
            .arg("operator")
            .arg("--control-plane")
            .arg(control_plane.join(","))
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .arg("--identity")
            .arg(identity)
            .arg("--lease-duration-s")
            .arg(LEASE_DURATION_S.to_string())
            .arg("--lease-renew-ms")
            .arg("500")
            .arg("--resync-ms")
            .arg("1000")
            .arg("--metrics-listen")
            .arg(&metrics_addr)
            .args(extra_args)
            .env("RUST_LOG", "info,cellplane_control_plane::operator=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cellplane operator");
        Self {
            identity: identity.into(),
            metrics_addr,
            log,
            child: Some(child),
        }
    }

    /// SIGKILLs the operator.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}
