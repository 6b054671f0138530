//! A watcher sees every route event exactly once, in revision order, across a restart of the
//! node it watches; a compacted start is answered OUT_OF_RANGE with the current revision.

use std::collections::HashMap;
use std::time::Duration;

use cellplane_api::detail;
use cellplane_api::proto::control::{CompactRequest, MoveRouteRequest, Tier};
use cellplane_api::proto::routing::{RouteEventKind, WatchRequest, WatchResponse};
use cellplane_tests::cluster::Cluster;
use tokio::sync::mpsc;

/// Follows `Watch` on the given nodes in turn, resuming from the last revision it saw.
async fn watcher(endpoints: Vec<String>, from: u64, tx: mpsc::UnboundedSender<WatchResponse>) {
    let mut next = from;
    let mut i = 0;
    loop {
        let endpoint = &endpoints[i % endpoints.len()];
        i += 1;
        let channel = cellplane_api::client::channel(
            endpoint,
            Duration::from_millis(300),
            &cellplane_api::tls::Tls::plaintext(),
        )
        .expect("channel");
        let mut client = cellplane_api::proto::routing::routing_client::RoutingClient::new(channel);
        if let Ok(stream) = client
            .watch(WatchRequest {
                from_revision: next,
            })
            .await
        {
            let mut stream = stream.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                next = message.revision + 1;
                if tx.send(message).is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_every_event_once_in_order_across_a_restart() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    let watched = cluster
        .running_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    let other = cluster
        .running_ids()
        .into_iter()
        .find(|&id| id != leader && id != watched)
        .expect("second follower");
    let start = cluster.status(leader).await.expect("status").revision + 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let endpoints = vec![
        cluster.nodes[&watched].addr.clone(),
        cluster.nodes[&other].addr.clone(),
    ];
    let watch_task = tokio::spawn(watcher(endpoints, start, tx));

    // What was acknowledged: (key, epoch) of every create and move.
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut control = cluster.control(leader);
    for round in 0..3 {
        for i in 0..20 {
            let tenant = format!("r{round}-t{i}");
            let epoch = cluster
                .create_tenant(leader, &tenant)
                .await
                .expect("create");
            acked.push((tenant.clone(), epoch));
            let primary = control
                .get_tenant(cellplane_api::proto::control::GetTenantRequest {
                    tenant_id: tenant.clone(),
                })
                .await
                .expect("get")
                .into_inner()
                .primary_cell;
            let target = if primary == "cell-a" {
                "cell-b"
            } else {
                "cell-a"
            };
            let moved = control
                .move_route(MoveRouteRequest {
                    tenant_id: tenant.clone(),
                    conversation_id: "group".into(),
                    expected_epoch: epoch,
                    target_cell: target.into(),
                })
                .await
                .expect("move")
                .into_inner()
                .route
                .expect("route");
            acked.push((format!("{tenant}/group"), moved.epoch));
        }
        if round == 0 {
            cluster.kill(watched).await;
        }
        if round == 1 {
            cluster.restart(watched);
        }
    }

    let final_revision = cluster.status(leader).await.expect("status").revision;
    let mut seen: Vec<WatchResponse> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.last().map(|m| m.revision) < Some(final_revision) {
        let message = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("watcher did not reach the final revision in 30s")
            .expect("watcher ended");
        seen.push(message);
    }
    watch_task.abort();

    let revisions: Vec<u64> = seen.iter().map(|m| m.revision).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions not strictly increasing: {revisions:?}"
    );
    let mut events: HashMap<(String, u64), usize> = HashMap::new();
    for message in &seen {
        for event in &message.events {
            assert_eq!(event.revision, message.revision);
            assert_eq!(event.kind, RouteEventKind::Put as i32);
            let route = event.route.as_ref().expect("route");
            let key = if route.conversation_id.is_empty() {
                route.tenant_id.clone()
            } else {
                format!("{}/{}", route.tenant_id, route.conversation_id)
            };
            *events.entry((key, route.epoch)).or_default() += 1;
        }
    }
    for key in &acked {
        assert_eq!(events.get(key), Some(&1), "{key:?} not seen exactly once");
    }
    assert_eq!(events.len(), acked.len(), "events that no write caused");

    // Compaction: a watch from before it is told to reload, with the current revision.
    control
        .compact(CompactRequest {
            revision: final_revision,
        })
        .await
        .expect("compact");
    let mut routing = cluster.routing(watched);
    // Wait for the compaction itself: the node's revision alone may have moved on through an
    // audit write that applied first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cluster
        .status(watched)
        .await
        .is_none_or(|s| s.compacted_revision < final_revision)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {watched} never applied the compaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = match routing
        .watch(WatchRequest {
            from_revision: start,
        })
        .await
    {
        Err(status) => status,
        Ok(stream) => stream
            .into_inner()
            .message()
            .await
            .expect_err("a compacted watch must fail"),
    };
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("from_revision"), "{status:?}");
    let detail = detail::decode(&status).expect("detail");
    assert!(detail.current_revision > final_revision);
    assert_eq!(detail.compacted_revision, final_revision);
    assert!(
        routing
            .watch(WatchRequest {
                from_revision: final_revision + 1
            })
            .await
            .is_ok()
    );
}
