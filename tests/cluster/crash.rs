//! SIGKILL the leader under concurrent writes: a new leader takes over, no acknowledged write is
//! lost, and the killed node restarts from its own disk and catches up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{MoveRouteRequest, Tier};
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_tests::cluster::Cluster;

/// What a writer was told: the key, the epoch and the cell it was acknowledged at.
#[derive(Debug, Clone)]
struct Ack {
    epoch: u64,
    cell: String,
}

async fn writer(
    cluster_endpoints: Vec<u64>,
    cluster: Arc<tokio::sync::RwLock<Cluster>>,
    worker: usize,
    acks: Arc<Mutex<HashMap<String, Ack>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut i = 0usize;
    while !*stop.borrow() {
        let via = cluster_endpoints[(worker + i) % cluster_endpoints.len()];
        let tenant = format!("w{worker}-t{i}");
        let (mut control, running) = {
            let cluster = cluster.read().await;
            (cluster.control(via), cluster.is_running(via))
        };
        i += 1;
        if !running {
            continue;
        }
        let mut request = tonic::Request::new(cellplane_api::proto::control::CreateTenantRequest {
            tenant_id: tenant.clone(),
            tier: Tier::Normal as i32,
            home_region: "hz".into(),
        });
        request.set_timeout(Duration::from_secs(5));
        let Ok(created) = control.create_tenant(request).await else {
            continue;
        };
        let created = created.into_inner();
        acks.lock().expect("acks").insert(
            tenant.clone(),
            Ack {
                epoch: created.epoch,
                cell: created.primary_cell.clone(),
            },
        );
        // Every other tenant also moves once, a compare-and-set on the acknowledged epoch.
        if i.is_multiple_of(2) {
            let target = if created.primary_cell == "cell-a" {
                "cell-b"
            } else {
                "cell-a"
            };
            let mut request = tonic::Request::new(MoveRouteRequest {
                tenant_id: tenant.clone(),
                conversation_id: String::new(),
                expected_epoch: created.epoch,
                target_cell: target.into(),
            });
            request.set_timeout(Duration::from_secs(5));
            if let Ok(moved) = control.move_route(request).await {
                let route = moved.into_inner().route.expect("route");
                acks.lock().expect("acks").insert(
                    tenant,
                    Ack {
                        epoch: route.epoch,
                        cell: route.cell_id,
                    },
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let ids = cluster.running_ids();
    let cluster = Arc::new(tokio::sync::RwLock::new(cluster));
    let acks = Arc::new(Mutex::new(HashMap::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for worker in 0..8 {
        writers.push(tokio::spawn(writer(
            ids.clone(),
            cluster.clone(),
            worker,
            acks.clone(),
            stop_rx.clone(),
        )));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old_leader = cluster.read().await.wait_for_leader().await;
    let acked_before_kill = acks.lock().expect("acks").len();
    assert!(
        acked_before_kill > 20,
        "writers made too little progress: {acked_before_kill}"
    );
    cluster.write().await.kill(old_leader).await;

    let new_leader = cluster.read().await.wait_for_leader().await;
    assert_ne!(new_leader, old_leader, "a killed node cannot lead");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_tx.send(true).expect("stop writers");
    for writer in writers {
        writer.await.expect("writer");
    }
    let acks = acks.lock().expect("acks").clone();
    assert!(
        acks.len() > acked_before_kill,
        "no write was acknowledged after the leader died"
    );

    // Every acknowledged write is in the new leader's state.
    let mut cluster = cluster.write().await;
    let leader_routes =
        collect_routes(&cluster, new_leader, Consistency::Linearizable, &acks).await;
    assert_acknowledged(&leader_routes, &acks);

    // The killed node restarts from its own disk and catches up to the same state.
    let revision = cluster
        .status(new_leader)
        .await
        .expect("leader status")
        .revision;
    cluster.restart(old_leader);
    cluster.wait_for_revision(old_leader, revision).await;
    let restarted_routes = collect_routes(&cluster, old_leader, Consistency::Stale, &acks).await;
    for tenant in acks.keys() {
        assert_eq!(
            restarted_routes[tenant].as_ref().ok(),
            leader_routes[tenant].as_ref().ok(),
            "{tenant}: the restarted node disagrees with the leader"
        );
    }
}

/// Every node dies at a crash point before one of its Raft log batches is durable (each after
/// a different number of batches), under writers; restarted without it, the cluster holds
/// every write it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_crashed_before_their_log_writes_lose_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let ids = cluster.running_ids();
    for (n, id) in ids.iter().enumerate() {
        cluster.kill(*id).await;
        let skip = 20 + 20 * n;
        cluster.set_crash_at(*id, Some(&format!("raft-log-write={skip}*off->return")));
    }
    for id in &ids {
        cluster.restart(*id);
    }
    let cluster = Arc::new(tokio::sync::RwLock::new(cluster));
    let acks = Arc::new(Mutex::new(HashMap::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = (0..8)
        .map(|worker| {
            tokio::spawn(writer(
                ids.clone(),
                cluster.clone(),
                worker,
                acks.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    // Two nodes down leave no quorum, and so nothing for the third to write.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut crashed: Vec<(u64, std::process::ExitStatus)> = Vec::new();
    while crashed.len() < 2 && tokio::time::Instant::now() < deadline {
        {
            let mut cluster = cluster.write().await;
            crashed.extend(
                ids.iter()
                    .filter_map(|id| cluster.exited(*id).map(|status| (*id, status))),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acknowledged = acks.lock().expect("acks").len();
    assert!(
        crashed.len() >= 2
            && crashed
                .iter()
                .all(|(_, status)| cellplane_api::failpoint::killed(status)),
        "nodes ended at their crash points: {crashed:?} ({acknowledged} writes acknowledged)"
    );
    stop_tx.send(true).expect("stop writers");
    for writer in writers {
        writer.await.expect("writer");
    }
    let acks = acks.lock().expect("acks").clone();
    assert!(
        acks.len() > 20,
        "too few writes acknowledged: {}",
        acks.len()
    );

    let mut cluster = cluster.write().await;
    for id in &ids {
        cluster.kill(*id).await;
        cluster.set_crash_at(*id, None);
        cluster.restart(*id);
    }
    let leader = cluster.wait_for_leader().await;
    let routes = collect_routes(&cluster, leader, Consistency::Linearizable, &acks).await;
    assert_acknowledged(&routes, &acks);
}

/// Every acknowledged write is in `routes`. A later attempt may have applied without being
/// acknowledged, so an epoch may be higher; it may never be lower, and at the same epoch the
/// cell must match.
fn assert_acknowledged(routes: &Routes, acks: &HashMap<String, Ack>) {
    for (tenant, ack) in acks {
        let route = routes[tenant]
            .as_ref()
            .unwrap_or_else(|e| panic!("acknowledged tenant {tenant} is lost: {e}"));
        assert!(
            route.0 >= ack.epoch,
            "{tenant}: epoch went back from {} to {}",
            ack.epoch,
            route.0
        );
        if route.0 == ack.epoch {
            assert_eq!(route.1, ack.cell, "{tenant}: acknowledged cell lost");
        }
    }
}

type Routes = HashMap<String, Result<(u64, String), String>>;

async fn collect_routes(
    cluster: &Cluster,
    via: u64,
    consistency: Consistency,
    acks: &HashMap<String, Ack>,
) -> Routes {
    let mut routing = cluster.routing(via);
    let mut routes = HashMap::new();
    for tenant in acks.keys() {
        let answer = routing
            .lookup(LookupRequest {
                tenant_id: tenant.clone(),
                conversation_id: String::new(),
                consistency: consistency as i32,
            })
            .await
            .map(|r| {
                let route = r.into_inner().route.unwrap_or_default();
                (route.epoch, route.cell_id)
            })
            .map_err(|e| e.to_string());
        routes.insert(tenant.clone(), answer);
    }
    routes
}
