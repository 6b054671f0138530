//! A LINEARIZABLE lookup, on any node, never returns a route older than a write acknowledged
//! before the lookup began — also while the leader is killed and replaced.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{MoveRouteRequest, Tier};
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_tests::cluster::Cluster;

const KEYS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Acked {
    key: usize,
    epoch: u64,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Read {
    key: usize,
    epoch: u64,
    started: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_never_go_back_past_an_acknowledged_write() {
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    cluster.create_tenant(leader, "lin").await.expect("create");
    let ids = cluster.running_ids();
    let cluster = Arc::new(tokio::sync::RwLock::new(cluster));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let reads: Arc<Mutex<Vec<Read>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    // One writer per key walks it between the two cells by compare-and-set.
    for key in 0..KEYS {
        let cluster = cluster.clone();
        let acked = acked.clone();
        let stop = stop_rx.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut epoch = 1u64;
            let mut n = 0usize;
            while !*stop.borrow() {
                n += 1;
                let via = ids[n % ids.len()];
                let mut control = cluster.read().await.control(via);
                let target = if n.is_multiple_of(2) {
                    "cell-a"
                } else {
                    "cell-b"
                };
                let mut request = tonic::Request::new(MoveRouteRequest {
                    tenant_id: "lin".into(),
                    conversation_id: format!("c{key}"),
                    expected_epoch: epoch,
                    target_cell: target.into(),
                });
                request.set_timeout(Duration::from_secs(3));
                match control.move_route(request).await {
                    Ok(moved) => {
                        let route = moved.into_inner().route.expect("route");
                        epoch = route.epoch;
                        acked.lock().expect("acked").push(Acked {
                            key,
                            epoch,
                            at: Instant::now(),
                        });
                    }
                    Err(status) => {
                        // A stale epoch (an earlier attempt applied unacknowledged) carries the
                        // current route; anything else is retried as is.
                        if let Some(current) =
                            cellplane_api::detail::decode(&status).and_then(|d| d.current_route)
                        {
                            epoch = current.epoch;
                        } else if status.message().contains("already routed") {
                            // The previous unacknowledged attempt moved it there; try the other way.
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    // Readers on every node.
    for reader in 0..4usize {
        let cluster = cluster.clone();
        let reads = reads.clone();
        let stop = stop_rx.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = reader;
            while !*stop.borrow() {
                n += 1;
                let key = n % KEYS;
                let via = ids[n % ids.len()];
                let mut routing = cluster.read().await.routing(via);
                let started = Instant::now();
                let mut request = tonic::Request::new(LookupRequest {
                    tenant_id: "lin".into(),
                    conversation_id: format!("c{key}"),
                    consistency: Consistency::Linearizable as i32,
                });
                request.set_timeout(Duration::from_secs(3));
                if let Ok(answer) = routing.lookup(request).await {
                    let route = answer.into_inner().route.expect("route");
                    reads.lock().expect("reads").push(Read {
                        key,
                        epoch: route.epoch,
                        started,
                    });
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_leader = cluster.read().await.wait_for_leader().await;
    cluster.write().await.kill(old_leader).await;
    cluster.read().await.wait_for_leader().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).expect("stop");
    for task in tasks {
        task.await.expect("task");
    }

    let acked = acked.lock().expect("acked").clone();
    let reads = reads.lock().expect("reads").clone();
    assert!(
        acked.len() > 20,
        "too few acknowledged writes: {}",
        acked.len()
    );
    assert!(reads.len() > 100, "too few reads: {}", reads.len());
    for read in &reads {
        let newest_before = acked
            .iter()
            .filter(|a| a.key == read.key && a.at < read.started)
            .map(|a| a.epoch)
            .max()
            .unwrap_or(0);
        assert!(
            read.epoch >= newest_before,
            "a linearizable read of c{} saw epoch {} after epoch {newest_before} was acknowledged",
            read.key,
            read.epoch
        );
    }
}
