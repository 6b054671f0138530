//! Real etcd servers for tests: a single member or a cluster, each member on free loopback
//! ports with its own data directory, killed when dropped.
//!
//! The binary is `$ETCD_BIN`, or `etcd` on the PATH (the test script installs Debian's
//! `etcd-server` when it is missing).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::{binary, free_port};

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub client_addr: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    pub dir: TempDir,
    pub members: Vec<EtcdMember>,
    initial_cluster: String,
    /// `--heartbeat-interval` and `--election-timeout`, in ms.
    timing: (u64, u64),
}

fn etcd_binary() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers. Heartbeats every 50 ms and
    /// an election timeout of 500 ms keep tests that kill the leader short.
    pub async fn start(size: usize) -> EtcdCluster {
        Self::start_with_timing(size, 50, 500).await
    }

    /// Like [`EtcdCluster::start`] with etcd's `--heartbeat-interval` and `--election-timeout`
    /// (ms); etcd waits a random time in `[election, 2 × election)` before it campaigns.
    pub async fn start_with_timing(
        size: usize,
        heartbeat_ms: u64,
        election_ms: u64,
    ) -> EtcdCluster {
        let dir = tempfile::Builder::new()
            .prefix("cellplane-etcd-")
            .tempdir()
            .expect("temp dir");
        let members: Vec<EtcdMember> = (1..=size)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_addr: format!("127.0.0.1:{}", free_port()),
                peer_addr: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer_addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            timing: (heartbeat_ms, election_ms),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster.wait_ready().await;
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let member = &mut self.members[index];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", member.name)))
            .expect("etcd log file");
        let child = Command::new(etcd_binary())
            .args([
                "--name",
                &member.name,
                "--data-dir",
                &member.data_dir.display().to_string(),
                "--listen-client-urls",
                &format!("http://{}", member.client_addr),
                "--advertise-client-urls",
                &format!("http://{}", member.client_addr),
                "--listen-peer-urls",
                &format!("http://{}", member.peer_addr),
                "--initial-advertise-peer-urls",
                &format!("http://{}", member.peer_addr),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "cellplane-test",
                "--heartbeat-interval",
                &self.timing.0.to_string(),
                "--election-timeout",
                &self.timing.1.to_string(),
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} (install etcd-server or set ETCD_BIN): {e}",
                    etcd_binary()
                )
            });
        member.child = Some(child);
    }

    /// Every member's client address.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_addr.clone()).collect()
    }

    async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(
            self.endpoints(),
            Some(
                etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500))
                    .with_timeout(Duration::from_secs(2)),
            ),
        )
        .await
        .expect("etcd client")
    }

    /// Waits until a put succeeds.
    pub async fn wait_ready(&self) {
        for _ in 0..300 {
            if let Ok(mut client) =
                tokio::time::timeout(Duration::from_secs(2), self.client()).await
                && client.put("/ready", "1", None).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd did not become ready; logs in {}",
            self.dir.path().display()
        );
    }

    /// The index of the member that leads now.
    pub async fn leader(&self) -> usize {
        for _ in 0..100 {
            for (index, member) in self.members.iter().enumerate() {
                if member.child.is_none() {
                    continue;
                }
                let Ok(Ok(mut client)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    etcd_client::Client::connect([member.client_addr.as_str()], None),
                )
                .await
                else {
                    continue;
                };
                if let Ok(status) = client.status().await
                    && status.header().map(|h| h.member_id()) == Some(status.leader())
                {
                    return index;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no etcd member leads");
    }

    /// SIGKILLs one member.
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts a killed member again from its data directory.
    pub fn restart(&mut self, index: usize) {
        assert!(self.members[index].child.is_none(), "member is running");
        self.spawn(index);
    }
}

/// A `cellplane serve --store etcd` process.
pub struct NodeOnEtcd {
    pub addr: String,
    _child: Child,
}

impl NodeOnEtcd {
    /// Starts node `id` on `etcd` under `prefix`, logging to `log`, and waits until it serves.
    pub async fn start(id: u64, etcd: &EtcdCluster, prefix: &str, log: &std::path::Path) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary("cellplane"))
            .args([
                "serve",
                "--store",
                "etcd",
                "--node-id",
                &id.to_string(),
                "--listen",
                &addr,
                "--etcd-endpoints",
                &etcd.endpoints().join(","),
                "--etcd-prefix",
                prefix,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).expect("log file")))
            .kill_on_drop(true)
            .spawn()
            .expect("start cellplane");
        let node = Self {
            addr,
            _child: child,
        };
        for _ in 0..100 {
            let status =
                cellplane_api::proto::control::control_client::ControlClient::new(node.channel())
                    .cluster_status(cellplane_api::proto::control::ClusterStatusRequest {})
                    .await;
            if status.is_ok() {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cellplane on etcd did not serve; see {}", log.display());
    }

    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .timeout(Duration::from_secs(15))
            .connect_lazy()
    }
}
