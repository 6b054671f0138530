//! Control-plane membership under writes: a fourth node joins (a learner until it caught up,
//! then a voter), a node leaves, and a node whose disk was lost is replaced the safe way —
//! removed, wiped, added back. No acknowledged write is lost, and bad calls change nothing.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{
    AddNodeRequest, ClusterStatusRequest, CreateTenantRequest, GetTenantRequest, Member,
    RemoveNodeRequest, Tier,
};
use cellplane_tests::cluster::Cluster;
use tonic::Code;

/// Creates tenants through node 1 until stopped; answers those acknowledged.
fn writer(
    cluster: &Cluster,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let control = cluster.control(1);
    tokio::spawn(async move {
        let acked = Mutex::new(Vec::new());
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let tenant = format!("m{i}");
            i += 1;
            let mut request = tonic::Request::new(CreateTenantRequest {
                tenant_id: tenant.clone(),
                tier: Tier::Normal as i32,
                home_region: "hz".into(),
            });
            request.set_timeout(Duration::from_secs(5));
            if control.clone().create_tenant(request).await.is_ok() {
                acked.lock().expect("acked").push(tenant);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked.into_inner().expect("acked")
    })
}

fn voters(members: &[Member]) -> BTreeSet<u64> {
    members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect()
}

/// Waits until node `id` reports every member voting as `expected` and applied as far as
/// node 1.
async fn wait_for_members(cluster: &Cluster, id: u64, expected: &BTreeSet<u64>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster.status(id).await;
        let reference = cluster.status(1).await;
        if let (Some(status), Some(reference)) = (status, reference)
            && voters(&status.members) == *expected
            && status.leader_id != 0
            && status.revision >= reference.revision.saturating_sub(50)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never saw voters {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_join_and_leave_and_a_lost_disk_is_replaced_without_losing_a_write() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[
            ("cell-a", "z0", Tier::Normal),
            ("cell-b", "z1", Tier::Normal),
        ])
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = writer(&cluster, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A fourth node joins, through a node that may not be the leader.
    let four = cluster.start_new_node();
    let addr = cluster.nodes[&four].addr.clone();
    let joined = cluster
        .control(2)
        .add_node(AddNodeRequest {
            node_id: four,
            addr: addr.clone(),
        })
        .await
        .expect("add node 4")
        .into_inner();
    assert_eq!(voters(&joined.members), BTreeSet::from([1, 2, 3, 4]));
    wait_for_members(&cluster, four, &BTreeSet::from([1, 2, 3, 4])).await;
    // Adding it again is answered as the first time.
    let again = cluster
        .control(1)
        .add_node(AddNodeRequest {
            node_id: four,
            addr,
        })
        .await
        .expect("add again")
        .into_inner();
    assert_eq!(voters(&again.members), BTreeSet::from([1, 2, 3, 4]));

    // Bad calls, each with its code, and nothing changes.
    let before = cluster.status(1).await.expect("status").members;
    for (request, code, says) in [
        (
            AddNodeRequest {
                node_id: 0,
                addr: "127.0.0.1:1".into(),
            },
            Code::InvalidArgument,
            "node_id",
        ),
        (
            AddNodeRequest {
                node_id: 9,
                addr: "nohost".into(),
            },
            Code::InvalidArgument,
            "addr",
        ),
        (
            AddNodeRequest {
                node_id: 1,
                addr: "127.0.0.1:1".into(),
            },
            Code::FailedPrecondition,
            "remove it first",
        ),
    ] {
        let err = cluster.control(1).add_node(request).await.expect_err(says);
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    let err = cluster
        .control(1)
        .remove_node(RemoveNodeRequest { node_id: 99 })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(cluster.status(1).await.expect("status").members, before);

    // Node 2 leaves.
    let left = cluster
        .control(1)
        .remove_node(RemoveNodeRequest { node_id: 2 })
        .await
        .expect("remove node 2")
        .into_inner();
    assert_eq!(voters(&left.members), BTreeSet::from([1, 3, 4]));
    cluster.kill(2).await;
    wait_for_members(&cluster, 1, &BTreeSet::from([1, 3, 4])).await;

    // Node 3's disk is lost: remove it, wipe it, start it empty, add it back.
    cluster
        .control(1)
        .remove_node(RemoveNodeRequest { node_id: 3 })
        .await
        .expect("remove node 3");
    cluster.wipe(3).await;
    cluster.restart(3);
    let addr = cluster.nodes[&3].addr.clone();
    let back = cluster
        .control(1)
        .add_node(AddNodeRequest { node_id: 3, addr })
        .await
        .expect("add node 3 back")
        .into_inner();
    assert_eq!(voters(&back.members), BTreeSet::from([1, 3, 4]));
    wait_for_members(&cluster, 3, &BTreeSet::from([1, 3, 4])).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writes.await.expect("writer");
    assert!(acked.len() > 20, "writes went on: {}", acked.len());
    // Every acknowledged write is on every member, the replaced node included.
    for id in [1, 3, 4] {
        let status = cluster
            .control(id)
            .cluster_status(ClusterStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(voters(&status.members), BTreeSet::from([1, 3, 4]));
        for tenant in &acked {
            cluster
                .control(id)
                .get_tenant(GetTenantRequest {
                    tenant_id: tenant.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("node {id} lost tenant {tenant}: {e}"));
        }
    }
}
