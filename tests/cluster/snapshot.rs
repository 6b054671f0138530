//! A node that falls behind the purged log catches up from a snapshot the leader sends.

use cellplane_api::proto::control::Tier;
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_tests::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_installs_a_snapshot() {
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-after-logs",
            "40",
            "--logs-kept-after-snapshot",
            "0",
        ],
    )
    .await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    let lagging = cluster
        .running_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    let behind_at = cluster
        .status(lagging)
        .await
        .expect("status")
        .last_log_index;
    cluster.kill(lagging).await;

    for i in 0..300 {
        cluster
            .create_tenant(leader, &format!("tenant-{i:03}"))
            .await
            .expect("create tenant");
    }
    let leader_status = cluster.status(leader).await.expect("leader status");
    assert!(
        leader_status.purged_index > behind_at,
        "the leader kept its log (purged up to {}, follower needs {})",
        leader_status.purged_index,
        behind_at + 1
    );

    cluster.restart(lagging);
    cluster
        .wait_for_revision(lagging, leader_status.revision)
        .await;
    let caught_up = cluster.status(lagging).await.expect("status");
    assert!(
        caught_up.snapshot_index >= leader_status.purged_index,
        "the follower caught up without a snapshot covering the purged log: {caught_up:?}"
    );
    let mut routing = cluster.routing(lagging);
    for i in 0..300 {
        let route = routing
            .lookup(LookupRequest {
                tenant_id: format!("tenant-{i:03}"),
                conversation_id: String::new(),
                consistency: Consistency::Stale as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("tenant-{i:03} missing on the caught-up node: {e}"))
            .into_inner();
        assert_eq!(route.route.map(|r| r.epoch), Some(1));
    }

    // It restarts again from its own disk (snapshot + log), with nothing to fetch.
    cluster.kill(lagging).await;
    cluster.restart(lagging);
    cluster
        .wait_for_revision(lagging, leader_status.revision)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wiped_disk_rejoins_by_snapshot() {
    wiped_node_rejoins(false).await;
}

/// A restarted leader knows its log was purged only from its log store: the wiped node must get
/// a snapshot from it too, not probes for entries that are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wiped_disk_rejoins_a_restarted_cluster_by_snapshot() {
    wiped_node_rejoins(true).await;
}

/// Loads a cluster past a few snapshots (and purges), optionally restarts every node, then wipes
/// a follower's disk and restarts it under its id: it must catch up with the leader, and the
/// leader, which had seen the follower's log far ahead of what it now reports, must keep
/// replicating (a later write reaches every node).
async fn wiped_node_rejoins(restart_cluster_first: bool) {
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-after-logs",
            "40",
            "--logs-kept-after-snapshot",
            "0",
        ],
    )
    .await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    for i in 0..200 {
        cluster
            .create_tenant(leader, &format!("tenant-{i:03}"))
            .await
            .expect("create tenant");
    }
    let revision = cluster.status(leader).await.expect("status").revision;
    for id in cluster.running_ids() {
        cluster.wait_for_revision(id, revision).await;
    }
    if restart_cluster_first {
        let ids = cluster.running_ids();
        for &id in &ids {
            cluster.kill(id).await;
        }
        for id in ids {
            cluster.restart(id);
        }
    }
    let leader = cluster.wait_for_leader().await;
    let replaced = cluster
        .running_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    cluster.kill(replaced).await;
    std::fs::remove_dir_all(&cluster.nodes[&replaced].data_dir).expect("wipe");
    cluster.restart(replaced);
    cluster.wait_for_revision(replaced, revision).await;

    let leader = cluster.wait_for_leader().await;
    cluster
        .create_tenant(leader, "after-the-wipe")
        .await
        .expect("create tenant");
    let revision = cluster.status(leader).await.expect("status").revision;
    for id in cluster.running_ids() {
        cluster.wait_for_revision(id, revision).await;
    }
}
