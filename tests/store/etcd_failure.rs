//! The etcd store through etcd failures: two `cellplane serve --store etcd` processes share a
//! real 3-member etcd cluster; writers move their tenants' routes through both while the etcd
//! leader is SIGKILLed. No acknowledged route may be lost, and every node agrees with what etcd
//! holds. And a node whose etcd lost its quorum stops serving watches from a state that no
//! longer moves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{CreateTenantRequest, MoveRouteRequest, Tier};
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::proto::routing::{
    Consistency, ListRoutesRequest, LookupRequest, Route, WatchRequest,
};
use cellplane_tests::cluster::add_active_cells;
use cellplane_tests::etcd::{EtcdCluster, NodeOnEtcd};
use tonic::transport::Channel;

use crate::suite::{CELL_ZONES, other_than};

fn control(node: &NodeOnEtcd) -> ControlClient<Channel> {
    ControlClient::new(node.channel())
}

fn routing(node: &NodeOnEtcd) -> RoutingClient<Channel> {
    RoutingClient::new(node.channel())
}

async fn lookup(node: &NodeOnEtcd, tenant_id: &str) -> Result<Route, tonic::Status> {
    routing(node)
        .lookup(LookupRequest {
            tenant_id: tenant_id.into(),
            conversation_id: String::new(),
            consistency: Consistency::Linearizable as i32,
        })
        .await
        .map(|r| r.into_inner().route.expect("route"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_etcd_leader_loses_no_acknowledged_route() {
    let mut etcd = EtcdCluster::start(3).await;
    let nodes = Arc::new([
        NodeOnEtcd::start(
            1,
            &etcd,
            "/failure/",
            &etcd.dir.path().join("cellplane-1.log"),
        )
        .await,
        NodeOnEtcd::start(
            2,
            &etcd,
            "/failure/",
            &etcd.dir.path().join("cellplane-2.log"),
        )
        .await,
    ]);
    let mut admin = control(&nodes[0]);
    add_active_cells(&mut admin, "r1", &CELL_ZONES, 1_000)
        .await
        .expect("register and activate cells");
    const WRITERS: usize = 8;
    for w in 0..WRITERS {
        admin
            .create_tenant(CreateTenantRequest {
                tenant_id: format!("w{w}"),
                tier: Tier::Normal as i32,
                home_region: "r1".into(),
            })
            .await
            .expect("create");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let nodes = nodes.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let tenant_id = format!("w{w}");
                let mut acked: Vec<Route> = Vec::new();
                let mut failures = 0u64;
                let mut round = w;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    // Alternate nodes, so both write the same keys' neighbours concurrently.
                    let node = &nodes[round % 2];
                    let Ok(current) = lookup(node, &tenant_id).await else {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let target = other_than(&current.cell_id);
                    match control(node)
                        .move_route(MoveRouteRequest {
                            tenant_id: tenant_id.clone(),
                            conversation_id: String::new(),
                            expected_epoch: current.epoch,
                            target_cell: target.to_string(),
                        })
                        .await
                    {
                        Ok(response) => acked.push(response.into_inner().route.expect("route")),
                        Err(_) => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (tenant_id, acked, failures)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = etcd.leader().await;
    etcd.kill(leader).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    etcd.restart(leader);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for writer in writers {
        let (tenant_id, acked, _failures) = writer.await.expect("writer");
        assert!(
            acked.len() >= 5,
            "{tenant_id}: writes went on around the failure, only {} acknowledged",
            acked.len()
        );
        total += acked.len();
        assert!(
            acked.windows(2).all(|w| w[0].epoch < w[1].epoch),
            "{tenant_id}: acknowledged epochs grow"
        );
        let last = acked.last().expect("acked");
        for node in nodes.iter() {
            let now = lookup(node, &tenant_id).await.expect("lookup");
            // Only a move whose answer was lost in the failure may have come after the last
            // acknowledged one.
            assert!(
                now.epoch > last.epoch || (now.epoch == last.epoch && now.cell_id == last.cell_id),
                "{tenant_id} on {}: acknowledged {last:?}, now {now:?}",
                node.addr
            );
        }
    }
    assert!(total > WRITERS * 5);

    // etcd itself holds what the nodes answered.
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("etcd client");
    for w in 0..WRITERS {
        let tenant_id = format!("w{w}");
        let stored = client
            .get(format!("/failure/tenants/{tenant_id}"), None)
            .await
            .expect("get");
        let value: serde_json::Value =
            serde_json::from_slice(stored.kvs()[0].value()).expect("tenant JSON");
        let route = lookup(&nodes[0], &tenant_id).await.expect("lookup");
        assert_eq!(value["epoch"].as_u64(), Some(route.epoch));
        assert_eq!(value["primary_cell"].as_str(), Some(route.cell_id.as_str()));
    }
}

/// Lists one page of routes through `node`.
async fn list(node: &NodeOnEtcd) -> Result<u64, tonic::Status> {
    routing(node)
        .list_routes(ListRoutesRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .map(|page| page.into_inner().revision)
}

/// Waits up to `limit` for `done`, polling every 100 ms; how long it took.
async fn within<F, Fut>(limit: Duration, mut done: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit {
        if done().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// An etcd member left without a leader answers from a state that no longer moves; the node's
/// client requires a leader, so the member ends the node's mirror watch and refuses to open
/// another. Once the mirror has followed no watch for 3 s, the node ends its own route watches
/// and refuses listings, so that watchers move to a node that is in touch, and serves them
/// again once etcd has a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_etcd_has_no_leader_ends_its_watches_until_etcd_has_one_again() {
    let mut etcd = EtcdCluster::start(3).await;
    let node = NodeOnEtcd::start(
        1,
        &etcd,
        "/leaderless/",
        &etcd.dir.path().join("cellplane-1.log"),
    )
    .await;
    list(&node)
        .await
        .expect("a listing while etcd has a leader");
    let mut watch = routing(&node)
        .watch(WatchRequest { from_revision: 0 })
        .await
        .expect("a watch while etcd has a leader")
        .into_inner();
    let survivor = etcd.leader().await;
    for member in (0..3).filter(|m| *m != survivor) {
        etcd.kill(member).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("the stream closed"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the watch ends within 20 s of etcd losing its quorum");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("followed no etcd watch"),
        "the status names the reason: {}",
        ended.message()
    );
    let refused = list(&node).await.expect_err("no listing without etcd");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    for member in (0..3).filter(|m| *m != survivor) {
        etcd.restart(member);
    }
    let served = within(Duration::from_secs(30), || async {
        list(&node).await.is_ok()
            && routing(&node)
                .watch(WatchRequest { from_revision: 0 })
                .await
                .is_ok()
    })
    .await;
    assert!(
        served.is_some(),
        "the node serves routes again once etcd has a leader"
    );
}
