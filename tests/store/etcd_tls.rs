//! The etcd store over mutual TLS: a real etcd that requires client certificates, a node
//! that presents one and works, and nodes without one, or with another CA's, that cannot
//! open the store.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cellplane_api::tls::TlsPaths;
use cellplane_control_plane::config::EtcdConfig;
use cellplane_control_plane::dev::certs::Ca;
use cellplane_control_plane::state::command::{Command, CommandOutput};
use cellplane_control_plane::store::etcd::EtcdStore;
use cellplane_control_plane::store::{RouteStore, Routed};
use cellplane_tests::free_port;
use tokio::process::Command as Process;

fn identity(ca: &Ca, dir: &Path, name: &str) -> TlsPaths {
    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, &ca.pem).expect("ca");
    ca.issue(name, false)
        .expect("issue")
        .write(dir, name, &ca_path)
        .expect("write")
}

fn config(endpoint: &str, tls: Option<TlsPaths>) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        prefix: "/tls/".into(),
        tls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_etcd_over_mutual_tls_and_strangers_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("etcd CA").expect("ca");
    let server = identity(&ca, dir.path(), "etcd");
    let node = identity(&ca, dir.path(), "cellplane-node");
    let endpoint = format!("127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
    let binary = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let _etcd = Process::new(&binary)
        .args(["--name", "tls", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &format!("https://{endpoint}"),
            "--advertise-client-urls",
            &format!("https://{endpoint}"),
            "--listen-peer-urls",
            &format!("http://{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://{peer}"),
            "--initial-cluster",
            &format!("tls=http://{peer}"),
            "--client-cert-auth",
            "--log-level",
            "warn",
        ])
        .arg("--cert-file")
        .arg(&server.cert)
        .arg("--key-file")
        .arg(&server.key)
        .arg("--trusted-ca-file")
        .arg(&server.ca)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {binary} (install etcd-server): {e}"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let store = loop {
        match EtcdStore::open(&config(&endpoint, Some(node.clone())), 1).await {
            Ok(store) => break store,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the node never reached etcd over mTLS: {error}; log in {}",
                    dir.path().display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let registered = store
        .execute(
            Command::RegisterCell {
                cell_id: "c1".into(),
                region: "r1".into(),
                zone: "z0".into(),
                tier: cellplane_control_plane::state::model::Tier::Normal,
                endpoint: "127.0.0.1:1".into(),
                capacity: 10,
                standby_of: None,
            },
            false,
        )
        .await
        .expect("a write over mTLS");
    assert!(matches!(registered, Routed::Here(CommandOutput::Cell(_))));
    store.shutdown().await;

    // Reopened, it reads back what it wrote.
    let again = EtcdStore::open(&config(&endpoint, Some(node.clone())), 1)
        .await
        .expect("reopen over mTLS");
    assert!(again.view().read(|state| state.cells().contains_key("c1")));
    again.shutdown().await;

    // No certificate, and another CA's: etcd refuses them at the handshake.
    let plaintext = EtcdStore::open(&config(&endpoint, None), 2).await;
    assert!(plaintext.is_err(), "plaintext to a TLS-only etcd");
    let other_ca = Ca::new("another CA").expect("ca");
    let stranger = identity(&other_ca, dir.path(), "stranger");
    let refused = EtcdStore::open(&config(&endpoint, Some(stranger)), 3).await;
    assert!(refused.is_err(), "a certificate of another CA");
    // A file that is not there is named.
    let missing = EtcdStore::open(
        &config(
            &endpoint,
            Some(TlsPaths {
                cert: dir.path().join("nowhere.pem"),
                ..node
            }),
        ),
        4,
    )
    .await
    .err()
    .expect("a missing certificate");
    assert!(missing.to_string().contains("nowhere.pem"), "{missing}");
}
