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
    let channel = cellplane_api::client::channel(
        &addr,
        Duration::from_millis(200),
        &cellplane_api::tls::Tls::plaintext(),
    )
    .expect("channel");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_reflection_and_prometheus_metrics() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start(3, &[]).await;
    let leader = cluster.wait_for_leader().await;
    cluster
        .create_tenant(leader, "metrics-probe")
        .await
        .expect_err("no cells yet");

    let mut reflection = ServerReflectionClient::new(cluster.channel(leader));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = stream
        .message()
        .await
        .expect("answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "cellplane.routing.v1.Routing",
        "cellplane.control.v1.Control",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let applied = cluster
        .metric(leader, "cellplane_raft_applied_index")
        .await
        .expect("applied index gauge");
    assert!(applied >= 1.0, "applied index {applied}");
    let refused = cluster
        .metric(leader, "cellplane_commands_applied_total")
        .await
        .expect("command counter");
    assert!(
        refused >= 1.0,
        "the refused create was applied (and refused) through Raft"
    );
}

/// The README's first command: `cellplane dev` serves a 3-node control plane, writes the
/// endpoints file, stops cleanly on SIGTERM and restarts the same cluster from its directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_and_restarts_from_its_data_dir() {
    use cellplane_api::proto::control::control_client::ControlClient;
    use cellplane_api::proto::control::{
        CellState, GetCellRequest, RegisterCellRequest, SetCellStateRequest, Tier,
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dev");
    let endpoints_file = dir.path().join("endpoints.json");
    let start_dev = || {
        tokio::process::Command::new(binary("cellplane"))
            .arg("dev")
            .arg("--data-dir")
            .arg(&data)
            .arg("--endpoints-file")
            .arg(&endpoints_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cellplane dev")
    };
    let read_endpoints = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints_file) {
                let json: serde_json::Value = serde_json::from_str(&text).expect("endpoints JSON");
                let nodes: Vec<String> = json["control_plane"]
                    .as_array()
                    .expect("control_plane array")
                    .iter()
                    .map(|v| v.as_str().expect("address").to_string())
                    .collect();
                assert!(json["cells"].is_array());
                return nodes;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no endpoints file within 30s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stop = |child: &tokio::process::Child| {
        let pid = child.id().expect("pid");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(killed.success());
    };

    let mut dev = start_dev();
    let nodes = read_endpoints().await;
    assert_eq!(nodes.len(), 3);
    // Writes go to any node and are forwarded to the leader.
    let channel = cellplane_api::client::channel(
        &nodes[2],
        Duration::from_millis(500),
        &cellplane_api::tls::Tls::plaintext(),
    )
    .expect("channel");
    let mut control = ControlClient::new(channel);
    control
        .register_cell(RegisterCellRequest {
            cell_id: "hz-a-low-1".into(),
            region: "hz".into(),
            zone: "a".into(),
            tier: Tier::Low as i32,
            endpoint: "127.0.0.1:9000".into(),
            capacity: 10,
            standby_of: String::new(),
        })
        .await
        .expect("register");
    control
        .set_cell_state(SetCellStateRequest {
            cell_id: "hz-a-low-1".into(),
            state: CellState::Active as i32,
        })
        .await
        .expect("activate");
    stop(&dev);
    let status = tokio::time::timeout(Duration::from_secs(15), dev.wait())
        .await
        .expect("dev exits within 15s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");

    std::fs::remove_file(&endpoints_file).expect("remove endpoints file");
    let mut dev = start_dev();
    let again = read_endpoints().await;
    assert_eq!(again, nodes, "a restarted dev cluster keeps its addresses");
    let channel = cellplane_api::client::channel(
        &again[0],
        Duration::from_millis(500),
        &cellplane_api::tls::Tls::plaintext(),
    )
    .expect("channel");
    let cell = ControlClient::new(channel)
        .get_cell(GetCellRequest {
            cell_id: "hz-a-low-1".into(),
        })
        .await
        .expect("the cell survived the restart")
        .into_inner();
    assert_eq!(cell.state, CellState::Active as i32);
    stop(&dev);
    dev.wait().await.expect("wait");
}
