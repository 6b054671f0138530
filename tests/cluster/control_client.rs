//! The `ControlPlane` client against a node that never answers: a peer whose machine died
//! under an open connection, or a partition that swallows every packet, looks the same to
//! it — a connection that takes calls and returns nothing.

use std::time::{Duration, Instant};

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::control::ClusterStatusRequest;
use cellplane_tests::cluster::Cluster;

/// Accepts connections and holds them open without a byte in reply, as long as the test runs.
async fn silent_node() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_moves_past_a_node_that_never_answers_within_its_attempt_timeout() {
    let cluster = Cluster::start(1, &[]).await;
    let endpoints = [vec![silent_node().await], cluster.endpoints()].concat();
    let status = |control: ControlPlane| async move {
        control
            .call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await })
            .await
    };

    // Without an attempt timeout the call waits on the silent node.
    let patient = ControlPlane::new(endpoints.clone()).expect("client");
    assert!(
        tokio::time::timeout(Duration::from_secs(3), status(patient))
            .await
            .is_err(),
        "a node that never answers answered"
    );

    // With one, the silent node gets its second and the next node answers.
    let bounded = ControlPlane::new(endpoints)
        .expect("client")
        .with_attempt_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let answer = status(bounded.clone())
        .await
        .expect("the second node answers");
    assert_eq!(answer.node_id, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // It stays with the node that answered: no second wait on the silent one.
    let started = Instant::now();
    status(bounded).await.expect("answers again");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}
