//! LINEARIZABLE lookups and compare-and-set moves, on any node, form a linearizable history —
//! also while the leader is killed and replaced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{MoveRouteRequest, Tier};
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_tests::cluster::Cluster;
use cellplane_tests::history::{History, Op, Ret, Route};

const KEYS: usize = 4;

/// Writers walk keys between two cells by compare-and-set and readers look them up on every
/// node, while the leader is SIGKILLed; stateright's linearizability tester then checks every
/// key's history (`cellplane_tests::history`): each lookup must fit one order of all
/// operations that agrees with real time, acknowledged moves included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_history_is_linearizable_across_a_leader_kill() {
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    cluster.create_tenant(leader, "lin").await.expect("create");
    let home = cluster
        .routing(leader)
        .lookup(LookupRequest {
            tenant_id: "lin".into(),
            conversation_id: String::new(),
            consistency: Consistency::Linearizable as i32,
        })
        .await
        .expect("lookup")
        .into_inner()
        .route
        .expect("route");
    let ids = cluster.running_ids();
    let cluster = Arc::new(tokio::sync::RwLock::new(cluster));
    let history = Arc::new(History::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    // One writer per key walks it between the two cells by compare-and-set.
    for key in 0..KEYS {
        let cluster = cluster.clone();
        let history = history.clone();
        let stop = stop_rx.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("c{key}");
            let mut client = history.client();
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
                history.invoke(
                    client,
                    &name,
                    Op::Move {
                        expected: epoch,
                        target: target.into(),
                    },
                );
                let mut request = tonic::Request::new(MoveRouteRequest {
                    tenant_id: "lin".into(),
                    conversation_id: name.clone(),
                    expected_epoch: epoch,
                    target_cell: target.into(),
                });
                request.set_timeout(Duration::from_secs(3));
                match control.move_route(request).await {
                    Ok(moved) => {
                        epoch = moved.into_inner().route.expect("route").epoch;
                        history.returned(client, &name, Ret::Moved(epoch));
                    }
                    Err(status) => {
                        let current =
                            cellplane_api::detail::decode(&status).and_then(|d| d.current_route);
                        if let Some(current) = current {
                            // Refused: a stale epoch, the current route in the detail.
                            epoch = current.epoch;
                            history.returned(client, &name, Ret::Stale(epoch));
                        } else if status.message().contains("already routed") {
                            history.returned(client, &name, Ret::AlreadyThere);
                        } else {
                            // Unknown: it may still apply. Go on as another client.
                            client = history.client();
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
        let history = history.clone();
        let stop = stop_rx.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = history.client();
            let mut n = reader;
            while !*stop.borrow() {
                n += 1;
                let name = format!("c{}", n % KEYS);
                let via = ids[n % ids.len()];
                let mut routing = cluster.read().await.routing(via);
                let mut request = tonic::Request::new(LookupRequest {
                    tenant_id: "lin".into(),
                    conversation_id: name.clone(),
                    consistency: Consistency::Linearizable as i32,
                });
                request.set_timeout(Duration::from_secs(3));
                history.invoke(client, &name, Op::Lookup);
                match routing.lookup(request).await {
                    Ok(answer) => {
                        let epoch = answer.into_inner().route.expect("route").epoch;
                        history.returned(client, &name, Ret::Route(epoch));
                    }
                    Err(_) => client = history.client(),
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

    assert!(history.len() > 200, "too few operations: {}", history.len());
    let initial = Route {
        epoch: home.epoch,
        cell: home.cell_id.clone(),
    };
    let operations = history.len();
    let started = std::time::Instant::now();
    let checked = history.check(|_| Some(initial.clone()));
    eprintln!("checked {operations} operations in {:?}", started.elapsed());
    if let Err(violation) = checked {
        panic!("{violation}");
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
