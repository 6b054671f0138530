//! The audit log across nodes: a call taken by a follower is recorded once, by that follower,
//! though the leader carried it out; every node reads the same log, and a new leader keeps it.
//! Every process here is a real `cellplane serve`.

use std::time::{Duration, Instant};

use cellplane_api::proto::control::{ListAuditRequest, Tier};
use cellplane_tests::cluster::Cluster;
use tonic::Code;

/// Each CreateTenant entry of the log as `(tenant asked for, code, node that took the
/// call)`, sorted; read through node `via`.
async fn entries_by_node(cluster: &Cluster, via: u64) -> Vec<(String, i32, u64)> {
    let log = cluster
        .control(via)
        .list_audit(ListAuditRequest {
            method: "CreateTenant".into(),
            ..Default::default()
        })
        .await
        .expect("list audit")
        .into_inner();
    let mut found: Vec<(String, i32, u64)> = log
        .entries
        .iter()
        .map(|entry| {
            let tenant = entry.request.split('"').nth(1).unwrap_or_default();
            (tenant.to_string(), entry.code, entry.node_id)
        })
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_records_its_calls_once_and_every_node_reads_them() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("hz-a", "a", Tier::Normal), ("hz-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    let mut followers = cluster.running_ids().into_iter().filter(|id| *id != leader);
    let (follower, other) = (
        followers.next().expect("a follower"),
        followers.next().expect("another"),
    );

    cluster
        .create_tenant(follower, "via-follower")
        .await
        .expect("forwarded to the leader");
    let bad = cluster
        .create_tenant(follower, "bad/id")
        .await
        .expect_err("refused by the follower itself");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let taken = cluster
        .create_tenant(leader, "via-follower")
        .await
        .expect_err("exists");
    assert_eq!(taken.code(), Code::AlreadyExists);

    // The nodes that took the calls write their entries moments after answering; a third
    // node reads them once written.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut read = entries_by_node(&cluster, other).await;
    while read.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        read = entries_by_node(&cluster, other).await;
    }
    assert_eq!(
        read,
        vec![
            ("bad/id".to_string(), Code::InvalidArgument as i32, follower),
            ("via-follower".to_string(), 0, follower),
            (
                "via-follower".to_string(),
                Code::AlreadyExists as i32,
                leader
            ),
        ],
        "each call once, by the node that took it"
    );

    // A new leader serves the same log.
    cluster.kill(leader).await;
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader);
    assert_eq!(entries_by_node(&cluster, new_leader).await, read);
}
