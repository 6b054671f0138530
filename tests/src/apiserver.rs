//! A real Kubernetes API server for tests: the apiextensions API server that
//! `scripts/ensure-tools.sh kube-apiserver` builds (`$KUBE_APISERVER_BIN`, or
//! `target/tools/kube-apiserver`), over a real single-member etcd, on free loopback ports;
//! killed when dropped. It serves CRDs (no core or apps APIs) to anonymous callers.

use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::etcd::EtcdCluster;
use crate::free_port;

pub struct KubeApiServer {
    pub url: String,
    _etcd: EtcdCluster,
    dir: TempDir,
    _child: Child,
}

fn apiserver_binary() -> String {
    std::env::var("KUBE_APISERVER_BIN").unwrap_or_else(|_| {
        let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools");
        tools.join("kube-apiserver").display().to_string()
    })
}

impl KubeApiServer {
    /// Starts etcd and the API server, and waits until the server is ready.
    pub async fn start() -> Self {
        let etcd = EtcdCluster::start(1).await;
        let dir = tempfile::Builder::new()
            .prefix("cellplane-kube-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("apiserver.log")).expect("log");
        let binary = apiserver_binary();
        let child = Command::new(&binary)
            .arg("--etcd-servers")
            .arg(format!("http://{}", etcd.endpoints()[0]))
            .arg("--secure-port")
            .arg(port.to_string())
            .arg("--cert-dir")
            .arg(dir.path().join("certs"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {binary} (./scripts/ensure-tools.sh kube-apiserver): {e}")
            });
        let server = Self {
            url: format!("https://127.0.0.1:{port}"),
            _etcd: etcd,
            dir,
            _child: child,
        };
        let client = server.client();
        for _ in 0..300 {
            let ready = client
                .request_text(
                    http::Request::get("/readyz")
                        .body(Vec::new())
                        .expect("request"),
                )
                .await;
            if ready.is_ok_and(|text| text == "ok") {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the API server did not become ready; log in {}",
            server.dir.path().display()
        );
    }

    /// A client of the server (its certificate is self-signed: not verified).
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().expect("url"));
        config.accept_invalid_certs = true;
        kube::Client::try_from(config).expect("kube client")
    }
}
