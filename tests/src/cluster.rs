//! A control-plane cluster of real `cellplane serve` processes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{
    ClusterStatusRequest, ClusterStatusResponse, CreateTenantRequest, ListAuditRequest,
    RegisterCellRequest, SetCellStateRequest, Tier,
};
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::tls::Tls;
use cellplane_control_plane::dev::certs::Ca;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::{binary, free_port};

/// One node process and where it keeps its data.
pub struct NodeProcess {
    pub id: u64,
    pub addr: String,
    /// Prometheus metrics over HTTP.
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    /// Crash points the next start arms (`cellplane_api::failpoint`).
    crash_at: Option<String>,
    child: Option<Child>,
}

/// A running cluster; every process is killed when it is dropped.
pub struct Cluster {
    pub dir: TempDir,
    pub nodes: BTreeMap<u64, NodeProcess>,
    peers: String,
    extra_args: Vec<String>,
    /// How the test connects to the nodes.
    tls: Tls,
}

impl Cluster {
    /// Starts `size` nodes and waits until they agree on a leader.
    pub async fn start(size: u64, extra_args: &[&str]) -> Cluster {
        Self::start_with_tls(size, extra_args, false).await
    }

    /// Like [`Cluster::start`]; with `tls`, every node serves and calls its peers over mTLS
    /// with one identity of a throwaway CA, which the test's clients present too.
    pub async fn start_with_tls(size: u64, extra_args: &[&str], tls: bool) -> Cluster {
        let mut dir = tempfile::Builder::new()
            .prefix("cellplane-cluster-")
            .tempdir()
            .expect("temp dir");
        // Keep the data and logs of a failed run for a look afterwards.
        if std::env::var_os("CELLPLANE_KEEP_CLUSTER").is_some() {
            dir.disable_cleanup(true);
        }
        let mut nodes = BTreeMap::new();
        for id in 1..=size {
            let addr = format!("127.0.0.1:{}", free_port());
            nodes.insert(
                id,
                NodeProcess {
                    id,
                    addr,
                    metrics_addr: format!("127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(format!("node-{id}")),
                    crash_at: None,
                    child: None,
                },
            );
        }
        let peers = nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let tls = if tls {
            let ca = Ca::new("cluster CA").expect("ca");
            let ca_path = dir.path().join("ca.pem");
            std::fs::write(&ca_path, &ca.pem).expect("write ca");
            let paths = ca
                .issue("cellplane-node", false)
                .expect("issue")
                .write(dir.path(), "node", &ca_path)
                .expect("write identity");
            for (flag, path) in [
                ("--tls-ca", &paths.ca),
                ("--tls-cert", &paths.cert),
                ("--tls-key", &paths.key),
            ] {
                extra_args.extend([flag.to_string(), path.display().to_string()]);
            }
            Tls::load(&paths).expect("load")
        } else {
            Tls::plaintext()
        };
        let mut cluster = Cluster {
            dir,
            nodes,
            peers,
            extra_args,
            tls,
        };
        for id in 1..=size {
            cluster.spawn(id);
        }
        cluster.wait_for_leader().await;
        cluster
    }

    fn spawn(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node id");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("log file");
        let mut command = Command::new(binary("cellplane"));
        if let Some(points) = &node.crash_at {
            command.env(cellplane_api::failpoint::ENV, points);
        }
        let child = command
            .arg("serve")
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&node.addr)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--peers")
            .arg(&self.peers)
            .arg("--metrics-listen")
            .arg(&node.metrics_addr)
            .args(&self.extra_args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cellplane serve");
        node.child = Some(child);
    }

    /// Starts a new node process, the next id, that is not a member yet: it waits to be added
    /// (`AddNode`). Every node started from now on knows its address among the peers.
    pub fn start_new_node(&mut self) -> u64 {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let addr = format!("127.0.0.1:{}", free_port());
        self.peers = format!("{},{id}={addr}", self.peers);
        self.nodes.insert(
            id,
            NodeProcess {
                id,
                addr,
                metrics_addr: format!("127.0.0.1:{}", free_port()),
                data_dir: self.dir.path().join(format!("node-{id}")),
                crash_at: None,
                child: None,
            },
        );
        self.spawn(id);
        id
    }

    /// SIGKILLs a node and deletes its data directory: a lost disk.
    pub async fn wipe(&mut self, id: u64) {
        self.kill(id).await;
        std::fs::remove_dir_all(&self.nodes[&id].data_dir).expect("wipe the data directory");
    }

    /// SIGKILLs a node: no shutdown, no flush, as a crash.
    pub async fn kill(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node id");
        if let Some(mut child) = node.child.take() {
            child.kill().await.expect("kill node");
        }
    }

    /// Starts a killed node again from its data directory.
    pub fn restart(&mut self, id: u64) {
        assert!(
            self.nodes[&id].child.is_none(),
            "node {id} is still running"
        );
        self.spawn(id);
    }

    /// The crash points node `id` arms when it starts next, or none.
    pub fn set_crash_at(&mut self, id: u64, points: Option<&str>) {
        self.nodes.get_mut(&id).expect("node id").crash_at = points.map(str::to_string);
    }

    /// How node `id` exited, once it has by itself.
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let node = self.nodes.get_mut(&id).expect("node id");
        let status = node.child.as_mut()?.try_wait().expect("node status")?;
        node.child = None;
        Some(status)
    }

    /// Freezes a running node with SIGSTOP: it keeps its sockets but answers nothing, as a
    /// stalled machine does, until [`Cluster::resume`].
    pub fn pause(&self, id: u64) {
        self.signal(id, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused node go on with SIGCONT.
    pub fn resume(&self, id: u64) {
        self.signal(id, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, id: u64, signal: nix::sys::signal::Signal) {
        let pid = self
            .pid(id)
            .unwrap_or_else(|| panic!("node {id} is not running"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|e| panic!("{signal} to node {id}: {e}"));
    }

    /// The process id of a running node.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes[&id].child.as_ref().and_then(|c| c.id())
    }

    /// One counter or gauge from a node's Prometheus endpoint (summed over labels).
    pub async fn metric(&self, id: u64, name: &str) -> Option<f64> {
        let mut stream = tokio::net::TcpStream::connect(&self.nodes[&id].metrics_addr)
            .await
            .ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        let mut total = None;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            *total.get_or_insert(0.0) += value;
        }
        total
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes[&id].child.is_some()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    pub fn channel(&self, id: u64) -> Channel {
        cellplane_api::client::channel(&self.nodes[&id].addr, Duration::from_millis(500), &self.tls)
            .expect("channel")
    }

    pub fn control(&self, id: u64) -> ControlClient<Channel> {
        ControlClient::new(self.channel(id))
    }

    pub fn routing(&self, id: u64) -> RoutingClient<Channel> {
        RoutingClient::new(self.channel(id))
    }

    pub async fn status(&self, id: u64) -> Option<ClusterStatusResponse> {
        let mut client = self.control(id);
        let request = tonic::Request::new(ClusterStatusRequest {});
        tokio::time::timeout(Duration::from_secs(1), client.cluster_status(request))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    /// Node `via`'s revision less the writes of the audit log up to it: what tells whether
    /// refused calls changed the state, since their audit entries are writes too.
    pub async fn revision_without_audit(&self, via: u64) -> u64 {
        // Reading the log flushes the reading node's queued entries: read it on every node.
        for id in self.running_ids() {
            self.control(id)
                .list_audit(ListAuditRequest {
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .expect("flush the node's audit entries");
        }
        let revision = self.status(via).await.expect("status").revision;
        let mut writes = std::collections::BTreeSet::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .control(via)
                .list_audit(ListAuditRequest {
                    page_size: 10_000,
                    page_token,
                    ..Default::default()
                })
                .await
                .expect("list audit")
                .into_inner();
            for entry in &page.entries {
                let (written, _) = entry.id.split_once('.').expect("an audit id");
                let written: u64 = written.parse().expect("a revision");
                if written <= revision {
                    writes.insert(written);
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        revision - writes.len() as u64
    }

    /// The last lines of every node's log, for a failure message: the directory is gone once
    /// the failed test unwinds, and a CI run keeps only what the test printed.
    fn log_tails(&self) -> String {
        let mut tails = String::new();
        for id in self.nodes.keys() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log")))
                .unwrap_or_else(|e| format!("(no log: {e})"));
            let lines: Vec<&str> = log.lines().collect();
            tails.push_str(&format!("\n--- node {id}, last lines of its log:\n"));
            if lines.is_empty() {
                tails.push_str("(empty)");
            }
            tails.push_str(&lines[lines.len().saturating_sub(20)..].join("\n"));
        }
        tails
    }

    /// Waits until every running node names the same leader, and returns it.
    pub async fn wait_for_leader(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut leaders = Vec::new();
            for id in self.running_ids() {
                leaders.push(self.status(id).await.map(|s| s.leader_id).unwrap_or(0));
            }
            if let Some(&first) = leaders.first()
                && first != 0
                && leaders.iter().all(|&l| l == first)
                && self.is_running(first)
            {
                return first;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader within 30s (saw {leaders:?}); logs in {}{}",
                self.dir.path().display(),
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` has applied the control state up to `revision`.
    pub async fn wait_for_revision(&self, id: u64, revision: u64) {
        self.wait_for_revision_within(id, revision, Duration::from_secs(30))
            .await;
    }

    /// Like [`Cluster::wait_for_revision`] with its own time limit, for large states.
    pub async fn wait_for_revision_within(&self, id: u64, revision: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self
                .status(id)
                .await
                .is_some_and(|s| s.revision >= revision)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} did not reach revision {revision} within {limit:?}; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registers and activates cells (`cell_id`, `zone`, tier) in region `hz`, capacity 1M each.
    pub async fn add_cells(&self, cells: &[(&str, &str, Tier)]) {
        self.add_cells_with_capacity(cells, 1_000_000).await;
    }

    /// Like [`Cluster::add_cells`], each cell sized for `capacity` tenants.
    pub async fn add_cells_with_capacity(&self, cells: &[(&str, &str, Tier)], capacity: u64) {
        let mut control = self.control(self.wait_for_leader().await);
        add_active_cells(&mut control, "hz", cells, capacity)
            .await
            .expect("register and activate cells");
    }

    /// Creates a tenant of tier NORMAL in `hz`.
    pub async fn create_tenant(&self, via: u64, tenant_id: &str) -> Result<u64, tonic::Status> {
        self.control(via)
            .create_tenant(CreateTenantRequest {
                tenant_id: tenant_id.into(),
                tier: Tier::Normal as i32,
                home_region: "hz".into(),
            })
            .await
            .map(|r| r.into_inner().epoch)
    }
}

/// Registers cells (`cell_id`, `zone`, tier) in `region`, each sized for `capacity` tenants, and
/// makes them ACTIVE, through any control plane (Raft or etcd). The tests using it exercise the
/// control plane alone, so no cell process listens at the registered endpoints.
pub async fn add_active_cells(
    control: &mut ControlClient<Channel>,
    region: &str,
    cells: &[(&str, &str, Tier)],
    capacity: u64,
) -> Result<(), tonic::Status> {
    for (i, (cell_id, zone, tier)) in cells.iter().enumerate() {
        control
            .register_cell(RegisterCellRequest {
                cell_id: cell_id.to_string(),
                region: region.into(),
                zone: zone.to_string(),
                tier: *tier as i32,
                endpoint: format!("127.0.0.1:{}", 20_000 + i),
                capacity,
                standby_of: String::new(),
            })
            .await?;
        control
            .set_cell_state(SetCellStateRequest {
                cell_id: cell_id.to_string(),
                state: cellplane_api::proto::control::CellState::Active as i32,
            })
            .await?;
    }
    Ok(())
}
