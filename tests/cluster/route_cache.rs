//! The route cache loads every route, follows the watch, moves to another node when its node
//! dies, and reloads when it fell behind compaction.

use std::time::Duration;

use cellplane_api::client::{RouteCache, RouteCacheOptions};
use cellplane_api::proto::control::{CompactRequest, MoveRouteRequest, Tier};
use cellplane_api::proto::routing::{Consistency, ListRoutesRequest};
use cellplane_tests::cluster::Cluster;

/// Every route the leader has, as (key, cell, epoch), sorted.
async fn leader_routes(cluster: &Cluster) -> Vec<(String, String, u64)> {
    let leader = cluster.wait_for_leader().await;
    let mut routing = cluster.routing(leader);
    let mut token = String::new();
    let mut routes = Vec::new();
    loop {
        let page = routing
            .list_routes(ListRoutesRequest {
                page_size: 7,
                page_token: token.clone(),
            })
            .await
            .expect("list routes")
            .into_inner();
        routes.extend(page.routes.into_iter().map(|r| {
            (
                format!("{}/{}", r.tenant_id, r.conversation_id),
                r.cell_id,
                r.epoch,
            )
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    routes
}

async fn assert_cache_matches(cache: &RouteCache, cluster: &Cluster) {
    let leader = cluster.wait_for_leader().await;
    let revision = cluster.status(leader).await.expect("status").revision;
    assert!(
        cache
            .wait_for_revision(revision, Duration::from_secs(20))
            .await,
        "cache stuck at revision {} below {revision}",
        cache.revision()
    );
    let routes = leader_routes(cluster).await;
    for (key, cell, epoch) in &routes {
        let (tenant, conversation) = key.split_once('/').expect("key");
        let cached = cache
            .lookup(tenant, conversation)
            .unwrap_or_else(|| panic!("{key} not cached"));
        assert_eq!((&cached.cell_id, cached.epoch), (cell, *epoch), "{key}");
    }
    let (tenants, overrides) = cache.len();
    assert_eq!(
        tenants + overrides,
        routes.len(),
        "cache holds routes the leader does not"
    );
}

async fn churn(cluster: &Cluster, prefix: &str, count: usize) {
    let leader = cluster.wait_for_leader().await;
    let mut control = cluster.control(leader);
    for i in 0..count {
        let tenant = format!("{prefix}-{i}");
        let epoch = cluster
            .create_tenant(leader, &tenant)
            .await
            .expect("create");
        if i % 3 == 0 {
            let routing_answer = cluster
                .routing(leader)
                .lookup(cellplane_api::proto::routing::LookupRequest {
                    tenant_id: tenant.clone(),
                    conversation_id: String::new(),
                    consistency: Consistency::Linearizable as i32,
                })
                .await
                .expect("lookup")
                .into_inner()
                .route
                .expect("route");
            let target = if routing_answer.cell_id == "cell-a" {
                "cell-b"
            } else {
                "cell-a"
            };
            control
                .move_route(MoveRouteRequest {
                    tenant_id: tenant,
                    conversation_id: "hot-group".into(),
                    expected_epoch: epoch,
                    target_cell: target.into(),
                })
                .await
                .expect("override");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_follows_moves_node_death_and_compaction() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    churn(&cluster, "before", 30).await;

    let cache = RouteCache::start(cluster.endpoints(), RouteCacheOptions::default())
        .await
        .expect("start cache");
    assert_cache_matches(&cache, &cluster).await;
    assert!(cache.lookup("ghost", "c").is_none());
    let first = cache.lookup("before-0", "any").expect("route");
    assert!(!first.is_override);
    assert!(
        cache
            .lookup("before-0", "hot-group")
            .expect("route")
            .is_override
    );

    // The cache follows node 1 first; kill it and keep writing.
    cluster.kill(1).await;
    churn(&cluster, "after-kill", 20).await;
    assert_cache_matches(&cache, &cluster).await;
    cluster.restart(1);

    // A cache that only knows node 3 misses history that is then compacted: it reloads.
    let lonely = RouteCache::start(
        vec![cluster.nodes[&3].addr.clone()],
        RouteCacheOptions::default(),
    )
    .await
    .expect("start second cache");
    cluster.kill(3).await;
    churn(&cluster, "while-away", 10).await;
    let leader = cluster.wait_for_leader().await;
    let revision = cluster.status(leader).await.expect("status").revision;
    cluster
        .control(leader)
        .compact(CompactRequest { revision })
        .await
        .expect("compact");
    cluster.restart(3);
    assert_cache_matches(&lonely, &cluster).await;
    assert!(lonely.lookup("while-away-0", "").is_some());
}
