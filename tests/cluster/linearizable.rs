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

/// Route keys moved in every round of the leader-crash test.
const CRASH_KEYS: usize = 8;
const CRASH_ROUNDS: usize = 8;

/// Moves `key` to the other cell, by compare-and-set on the epoch last acknowledged, through
/// `via`; returns the acknowledged route (epoch, cell).
async fn move_once(
    cluster: &Cluster,
    via: u64,
    key: usize,
    (epoch, cell): (u64, &str),
) -> (u64, String) {
    let target = if cell == "cell-a" { "cell-b" } else { "cell-a" };
    let mut request = tonic::Request::new(MoveRouteRequest {
        tenant_id: "crash".into(),
        conversation_id: format!("c{key}"),
        expected_epoch: epoch,
        target_cell: target.into(),
    });
    request.set_timeout(Duration::from_secs(5));
    let route = cluster
        .control(via)
        .move_route(request)
        .await
        .unwrap_or_else(|status| panic!("move of c{key} through the leader {via}: {status:?}"))
        .into_inner()
        .route
        .expect("route");
    (route.epoch, route.cell_id)
}

/// Asks node `via` for `key` LINEARIZABLE until it answers (it may have no leader yet) and
/// returns the epoch it answered.
async fn read_when_it_answers(cluster: &Cluster, via: u64, key: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut request = tonic::Request::new(LookupRequest {
            tenant_id: "crash".into(),
            conversation_id: format!("c{key}"),
            consistency: Consistency::Linearizable as i32,
        });
        request.set_timeout(Duration::from_secs(2));
        match cluster.routing(via).lookup(request).await {
            Ok(answer) => return answer.into_inner().route.expect("route").epoch,
            Err(status) => assert!(
                Instant::now() < deadline,
                "node {via} answered no linearizable read of c{key} within 30 s: {status:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes acknowledged just before the leader is SIGKILLed are seen by the first linearizable
/// read every node answers afterwards. In every other round the crashed leader is restarted at
/// once, while the other two are paused (SIGSTOP) so that they cannot elect anyone nor tell it
/// what was committed: it comes back with the commit index it last wrote to disk, which lags
/// what it had acknowledged, and the followers, once resumed, still take it for their leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_reads_after_a_leader_crash_see_every_acknowledged_write() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    cluster
        .create_tenant(leader, "crash")
        .await
        .expect("create");
    let mut routes: Vec<(u64, String)> = vec![(1, "cell-a".to_string()); CRASH_KEYS];
    for round in 0..CRASH_ROUNDS {
        let leader = cluster.wait_for_leader().await;
        let followers: Vec<u64> = cluster
            .running_ids()
            .into_iter()
            .filter(|&id| id != leader)
            .collect();
        let moves = routes
            .iter()
            .enumerate()
            .map(|(key, (epoch, cell))| move_once(&cluster, leader, key, (*epoch, cell)));
        routes = futures::future::join_all(moves).await;
        let restarted_at_once = round % 2 == 0;
        if restarted_at_once {
            followers.iter().for_each(|&id| cluster.pause(id));
        }
        cluster.kill(leader).await;
        if restarted_at_once {
            cluster.restart(leader);
        }
        let reads = cluster.running_ids().into_iter().flat_map(|via| {
            let cluster = &cluster;
            (0..CRASH_KEYS).map(move |key| async move {
                (via, key, read_when_it_answers(cluster, via, key).await)
            })
        });
        let resume = async {
            if restarted_at_once {
                // Once the restarted node serves, and reads wait on it, and before the paused
                // followers' election timeout (1.2 s at least) runs out: resumed, they answer
                // its heartbeats as their leader's.
                while cluster.status(leader).await.is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                followers.iter().for_each(|&id| cluster.resume(id));
            }
        };
        let (answers, ()) = tokio::join!(futures::future::join_all(reads), resume);
        for (via, key, epoch) in answers {
            assert!(
                epoch >= routes[key].0,
                "round {round} (old leader {leader} restarted at once: {restarted_at_once}): \
                 node {via} read c{key} at epoch {epoch} after epoch {} was acknowledged",
                routes[key].0
            );
        }
        if !restarted_at_once {
            cluster.restart(leader);
        }
    }
}
