//! A real Kubernetes API server for tests: the apiextensions API server that
//! `scripts/ensure-tools.sh kube-apiserver` builds (`$KUBE_APISERVER_BIN`, or
//! `target/tools/kube-apiserver`), over a real single-member etcd, on free loopback ports;
//! killed when dropped. It serves CRDs (no core or apps APIs) to anonymous callers; the two
//! built-in APIs the operator uses, `coordination.k8s.io/v1` Leases and `events.k8s.io/v1`
//! Events, are served here by stand-in CRDs of the same groups and names (this server cannot
//! serve the built-in ones), which keep every field as written.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::etcd::EtcdCluster;
use crate::free_port;

pub struct KubeApiServer {
    pub url: String,
    /// A plain-HTTP front of the server that records each request; processes given
    /// [`KubeApiServer::kubeconfig`] call through it.
    front: String,
    requests: Arc<Mutex<Vec<Call>>>,
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
        let requests = Arc::new(Mutex::new(Vec::new()));
        let url = format!("https://127.0.0.1:{port}");
        let front = recording_front(client_of(&url), requests.clone()).await;
        let server = Self {
            url,
            front,
            requests,
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

    /// Applies every cellplane CRD and the stand-ins for Leases and Events, and waits until
    /// each is Established.
    pub async fn install_crds(&self) {
        let client = self.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut all: Vec<CustomResourceDefinition> = cellplane_crds::crds()
            .into_iter()
            .map(|(_, crd)| crd)
            .collect();
        all.push(stand_in("coordination.k8s.io", "Lease", "leases"));
        all.push(stand_in("events.k8s.io", "Event", "events"));
        for crd in all {
            let name = crd.metadata.name.clone().expect("name");
            crds.patch(
                &name,
                &PatchParams::apply("cellplane-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {name}: {e}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let established = crds
                    .get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .is_some_and(|s| {
                        s.conditions
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name} never established"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Writes a kubeconfig for the server's recording front into its directory. Its user has a
    /// token the server does not know, so callers are anonymous: with no credentials at all
    /// kubectl would ask for a password.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\nusers:\n- name: anonymous\n  user: {{token: anonymous}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: anonymous\ncurrent-context: test\n",
            self.front
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A client of the server (its certificate is self-signed: not verified). Its calls are
    /// not recorded.
    pub fn client(&self) -> kube::Client {
        client_of(&self.url)
    }

    /// Every request made through [`KubeApiServer::kubeconfig`] so far.
    pub fn calls(&self) -> Vec<Call> {
        self.requests.lock().expect("calls").clone()
    }
}

fn client_of(url: &str) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.accept_invalid_certs = true;
    kube::Client::try_from(config).expect("kube client")
}

/// One request a process made of the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
}

/// Serves plain HTTP on a free loopback port, forwarding each request to the server through
/// `client` (responses streamed back, so watches work) and recording it in `calls`.
async fn recording_front(client: kube::Client, calls: Arc<Mutex<Vec<Call>>>) -> String {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the recording front");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (client, calls) = (client.clone(), calls.clone());
            let forward =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let (client, calls) = (client.clone(), calls.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        calls.lock().expect("calls").push(Call {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_string(),
                            query: parts.uri.query().unwrap_or_default().to_string(),
                        });
                        let body = body.collect().await?.to_bytes();
                        let mut forwarded = http::Request::builder()
                            .method(parts.method)
                            .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
                        for (name, value) in &parts.headers {
                            if name != http::header::HOST && name != http::header::AUTHORIZATION {
                                forwarded = forwarded.header(name, value);
                            }
                        }
                        let forwarded = forwarded
                            .body(kube::client::Body::from(body))
                            .expect("request");
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                            client.send(forwarded).await?,
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), forward),
            );
        }
    });
    format!("http://{addr}")
}

/// A namespaced CRD standing in for a built-in API: any object of the kind is kept as written.
fn stand_in(group: &str, kind: &str, plural: &str) -> CustomResourceDefinition {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{group}"),
            // Groups under k8s.io are Kubernetes' own; this marks the stand-in as approved.
            "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes/kubernetes/pull/1"},
        },
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    }))
    .expect("stand-in CRD")
}
