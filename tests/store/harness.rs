//! The two stores behind one harness: each test opens a store in this process, serves it on a
//! loopback port with the node's own gRPC services, and can stop and reopen it (and restart what
//! it runs on) from the same data.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_control_plane::config::{EtcdConfig, NodeConfig, StoreConfig};
use cellplane_control_plane::node;
use cellplane_control_plane::store::RouteStore;
use cellplane_control_plane::store::etcd::EtcdStore;
use cellplane_control_plane::store::raft::RaftStore;
use cellplane_tests::etcd::EtcdCluster;
use cellplane_tests::free_port;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// What a store runs on.
#[tonic::async_trait]
pub trait Backend: Send + Sized + 'static {
    async fn start(dir: &Path) -> Self;
    fn store_config(&self) -> StoreConfig;
    /// Stops and starts what the store runs on, keeping its data.
    async fn restart(&mut self);
}

/// The embedded Raft store: nothing runs beneath it.
pub struct Raft;

#[tonic::async_trait]
impl Backend for Raft {
    async fn start(_dir: &Path) -> Self {
        Raft
    }

    fn store_config(&self) -> StoreConfig {
        StoreConfig::Raft
    }

    async fn restart(&mut self) {}
}

/// A real single-member etcd, under a prefix of the test's own.
pub struct Etcd {
    pub etcd: EtcdCluster,
}

#[tonic::async_trait]
impl Backend for Etcd {
    async fn start(_dir: &Path) -> Self {
        Etcd {
            etcd: EtcdCluster::start(1).await,
        }
    }

    fn store_config(&self) -> StoreConfig {
        StoreConfig::Etcd(EtcdConfig {
            endpoints: self.etcd.endpoints(),
            prefix: "/conformance/".into(),
            tls: None,
        })
    }

    async fn restart(&mut self) {
        self.etcd.kill(0).await;
        self.etcd.restart(0);
        self.etcd.wait_ready().await;
    }
}

/// A store served on loopback.
pub struct Served<B: Backend> {
    pub backend: B,
    pub addr: String,
    store: Option<Arc<dyn RouteStore>>,
    config: NodeConfig,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _dir: TempDir,
}

async fn open(config: &NodeConfig) -> Arc<dyn RouteStore> {
    match &config.store {
        StoreConfig::Raft => {
            // A store that just stopped lets go of its log file once its last task ends.
            let mut opened = RaftStore::open(config, cellplane_api::tls::Tls::plaintext()).await;
            for _ in 0..100 {
                if opened.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                opened = RaftStore::open(config, cellplane_api::tls::Tls::plaintext()).await;
            }
            let store = opened.expect("open the raft store");
            // One voter: wait for it to elect itself.
            for _ in 0..100 {
                if store.drives_migrations() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                store.drives_migrations(),
                "the single raft node did not lead"
            );
            Arc::new(store)
        }
        StoreConfig::Etcd(etcd) => Arc::new(
            EtcdStore::open(etcd, config.node_id)
                .await
                .expect("open the etcd store"),
        ),
    }
}

impl<B: Backend> Served<B> {
    pub async fn start() -> Self {
        Self::start_configured(|_| {}).await
    }

    /// Starts a node whose config `configure` changed first.
    pub async fn start_configured(configure: impl FnOnce(&mut NodeConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = B::start(dir.path()).await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut config = NodeConfig::new(
            1,
            addr.parse().expect("addr"),
            dir.path().join("node"),
            [(1, addr.clone())].into_iter().collect(),
            backend.store_config(),
        );
        configure(&mut config);
        let store = Some(open(&config).await);
        let mut served = Served {
            backend,
            addr,
            store,
            config,
            stop: None,
            server: None,
            _dir: dir,
        };
        served.serve().await;
        served
    }

    async fn serve(&mut self) {
        let listener = tokio::net::TcpListener::bind(&self.addr)
            .await
            .expect("bind the node's port");
        let (stop, stopped) = oneshot::channel();
        let config = self.config.clone();
        let store = self.store().clone();
        self.server = Some(tokio::spawn(async move {
            node::serve_store(
                &config,
                cellplane_api::tls::Tls::plaintext(),
                store,
                None,
                listener,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("serve");
        }));
        self.stop = Some(stop);
    }

    /// Stops the node and what the store runs on, starts both again from their data.
    pub async fn restart(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
        // The old store lets go of its files before the new one opens them.
        self.store = None;
        self.backend.restart().await;
        self.store = Some(open(&self.config).await);
        self.serve().await;
    }

    pub fn store(&self) -> &Arc<dyn RouteStore> {
        self.store.as_ref().expect("the store is open")
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect_lazy()
    }

    pub fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel())
    }

    pub fn routing(&self) -> RoutingClient<Channel> {
        RoutingClient::new(self.channel())
    }
}
