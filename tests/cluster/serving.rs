//! What every server offers besides its API: health, reflection, a clean exit on SIGTERM, and a
//! refusal to start on a bad config that names the field.

use std::time::Duration;

use cellplane_tests::cluster::Cluster;
use cellplane_tests::{binary, free_port};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_report_health_and_membership() {
    let cluster = Cluster::start(3, &[]).await;
    for id in cluster.running_ids() {
        let mut health = HealthClient::new(cluster.channel(id));
        for service in [
            "cellplane.routing.v1.Routing",
            "cellplane.control.v1.Control",
        ] {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health")
                .into_inner();
            assert_eq!(
                answer.status,
                ServingStatus::Serving as i32,
                "{service} on node {id}"
            );
        }
        let status = cluster.status(id).await.expect("status");
        assert_eq!(status.members.len(), 3);
        assert!(status.members.iter().all(|m| m.voter));
        assert_eq!(status.node_id, id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let output = tokio::process::Command::new(binary("cellplane"))
        .args(["serve", "--node-id", "4", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--peers", "1=127.0.0.1:1,2=127.0.0.1:2"])
        .output()
        .await
        .expect("run cellplane");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("peers") && stderr.contains("must include this node's id 4"),
        "{stderr}"
    );

    let config = dir.path().join("node.toml");
    std::fs::write(&config, "node_id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"x\"\n[peers]\n1 = \"127.0.0.1:1\"\n[raft]\nheartbeat_interval_ms = 0\n").expect("write config");
    let output = tokio::process::Command::new(binary("cellplane"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .await
        .expect("run cellplane");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("raft.heartbeat_interval_ms"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(binary("cellplane"))
        .args(["serve", "--node-id", "1", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .arg("--peers")
        .arg(format!("1={addr}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // A single-node cluster elects itself; wait until it answers.
    let channel =
        cellplane_api::client::channel(&addr, Duration::from_millis(200)).expect("channel");
    let mut control = cellplane_api::proto::control::control_client::ControlClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(status) = control
            .cluster_status(cellplane_api::proto::control::ClusterStatusRequest {})
            .await
            && status.get_ref().leader_id == 1
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "single node never led"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exit within 10s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
}
