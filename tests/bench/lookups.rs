//! Lookups: STALE and LINEARIZABLE over gRPC, and from the in-process route cache.

use std::time::{Duration, Instant};

use cellplane_api::client::{RouteCache, RouteCacheOptions};
use cellplane_api::proto::control::Tier;
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_tests::cluster::Cluster;
use cellplane_tests::measure::{Samples, ms};

use crate::report::Report;

const TENANTS: usize = 1_000;
const CLIENTS: usize = 16;

/// `clients` clients looking up the `tenants` tenants `<prefix>N` (with a new conversation each
/// time) on `nodes` in turn for `phase`: lookups per second and their latencies.
pub async fn grpc_lookups(
    cluster: &Cluster,
    (consistency, prefix, tenants): (Consistency, &str, usize),
    (clients, nodes): (usize, &[u64]),
    phase: Duration,
) -> (f64, Samples) {
    let started = Instant::now();
    let deadline = started + phase;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let channel = cluster.channel(nodes[c % nodes.len()]);
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut routing = RoutingClient::new(channel);
            let mut samples = Samples::default();
            let mut i = c;
            while Instant::now() < deadline {
                i += clients;
                let sent = Instant::now();
                routing
                    .lookup(LookupRequest {
                        tenant_id: format!("{prefix}{}", i % tenants),
                        conversation_id: format!("conv-{i}"),
                        consistency: consistency as i32,
                    })
                    .await
                    .expect("lookup");
                samples.record(sent.elapsed());
            }
            samples
        }));
    }
    let mut samples = Samples::default();
    for task in tasks {
        samples.merge(task.await.expect("lookup task"));
    }
    (
        samples.len() as f64 / started.elapsed().as_secs_f64(),
        samples,
    )
}

pub async fn run(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    for i in 0..TENANTS {
        cluster
            .create_tenant(leader, &format!("lookup-{i}"))
            .await?;
    }
    let followers: Vec<u64> = cluster
        .running_ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let all = cluster.running_ids();

    let mut table = format!(
        "## Lookups\n\n\
         {CLIENTS} concurrent gRPC clients spread over the nodes named; {TENANTS} tenants. The route \
         cache answers in-process on one thread.\n\n\
         | lookup | served by | lookups/s | p50 ms | p99 ms |\n|---|---|---:|---:|---:|\n"
    );
    for (name, consistency, nodes, served) in [
        ("STALE", Consistency::Stale, all.clone(), "all 3 nodes"),
        (
            "LINEARIZABLE",
            Consistency::Linearizable,
            vec![leader],
            "leader",
        ),
        (
            "LINEARIZABLE",
            Consistency::Linearizable,
            followers.clone(),
            "followers (forwarded)",
        ),
    ] {
        let (rate, mut samples) = grpc_lookups(
            &cluster,
            (consistency, "lookup-", TENANTS),
            (CLIENTS, &nodes),
            phase,
        )
        .await;
        table.push_str(&format!(
            "| {name} | {served} | {rate:.0} | {} | {} |\n",
            ms(samples.percentile(50.0)),
            ms(samples.percentile(99.0))
        ));
    }

    let cache = RouteCache::start(cluster.endpoints(), RouteCacheOptions::default()).await?;
    let started = Instant::now();
    let deadline = started + phase;
    let mut samples = Samples::default();
    let mut i = 0usize;
    let mut count = 0u64;
    while Instant::now() < deadline {
        // Time batches of 1000 so the clock does not dominate; record the per-lookup mean.
        let batch_start = Instant::now();
        for _ in 0..1000 {
            i += 1;
            let tenant = format!("lookup-{}", i % TENANTS);
            std::hint::black_box(cache.lookup(&tenant, "conv"));
        }
        samples.record(batch_start.elapsed() / 1000);
        count += 1000;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    table.push_str(&format!(
        "| route cache | in process, 1 thread | {rate:.0} | {:.5} | {:.5} (means of 1000-lookup batches) |\n",
        samples.percentile(50.0).as_secs_f64() * 1e3,
        samples.percentile(99.0).as_secs_f64() * 1e3
    ));
    report.section(table);
    Ok(())
}
