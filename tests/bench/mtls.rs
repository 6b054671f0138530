//! What mutual TLS costs the control plane: route updates and lookups at 256 clients (as the
//! updates and lookups benchmarks run them) on a plaintext cluster and on an mTLS one (nodes to
//! each other and clients to nodes), in one run.
//! Connections are long-lived, as IM services' are, so the handshake is paid once; what is
//! measured is the encryption of every call.

use std::time::{Duration, Instant};

use cellplane_api::proto::routing::Consistency;
use cellplane_tests::cluster::Cluster;
use cellplane_tests::measure::{Samples, ms};

use crate::report::Report;
use crate::{lookups, updates};

const CLIENTS: usize = 256;
/// Clients per HTTP/2 connection.
const CLIENTS_PER_CHANNEL: usize = 4;

/// Updates (each client moving its own tenant between two cells) and lookups (spread over
/// the nodes, STALE) for `phase` each: (updates/s, update latencies, lookups/s, lookup
/// latencies).
async fn measure(tls: bool, phase: Duration) -> anyhow::Result<(f64, Samples, f64, Samples)> {
    let cluster = Cluster::start_with_tls(3, &[], tls).await;
    let tenants = updates::tenants(&cluster, CLIENTS).await?;
    let leader = cluster.wait_for_leader().await;
    let channels: Vec<_> = (0..CLIENTS.div_ceil(CLIENTS_PER_CHANNEL))
        .map(|_| cluster.channel(leader))
        .collect();
    let started = Instant::now();
    let deadline = started + phase;
    let tasks: Vec<_> = tenants
        .into_iter()
        .enumerate()
        .map(|(c, tenant)| {
            let channel = channels[c / CLIENTS_PER_CHANNEL].clone();
            tokio::spawn(async move { updates::move_until(channel, tenant, deadline).await.0 })
        })
        .collect();
    let mut moves = Samples::default();
    for task in tasks {
        moves.merge(task.await?);
    }
    let update_rate = moves.len() as f64 / started.elapsed().as_secs_f64();
    let nodes = cluster.running_ids();
    let (lookup_rate, lookups) = lookups::grpc_lookups(
        &cluster,
        (Consistency::Stale, "bench-", CLIENTS),
        (CLIENTS, &nodes),
        phase,
    )
    .await;
    Ok((update_rate, moves, lookup_rate, lookups))
}

/// Plaintext and mTLS clusters, in turn, this many times: one machine runs the nodes and the
/// load, so single runs differ by more than what is measured.
const ROUNDS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let mut table = format!(
        "## What mTLS costs\n\n\
         Route updates (`MoveRoute` on the leader, each client moving its own tenant, {} clients \
         per HTTP/2 connection) and STALE lookups (spread over the 3 nodes, a connection per \
         client), {CLIENTS} clients on long-lived connections, {} s each, on a plaintext \
         cluster and then on one where nodes, peers and clients all speak mutual TLS (rustls, \
         ECDSA P-256 identities); {ROUNDS} rounds of both, alternating, since the nodes and the \
         load share the machine.\n\n\
         | round | transport | updates/s | p50 ms | p99 ms | lookups/s | p50 ms | p99 ms |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
        CLIENTS_PER_CHANNEL,
        phase.as_secs()
    );
    // (plaintext, mTLS) rates per round: updates, lookups.
    let mut updates_by = [Vec::new(), Vec::new()];
    let mut lookups_by = [Vec::new(), Vec::new()];
    for round in 1..=ROUNDS {
        for (i, (name, tls)) in [("plaintext", false), ("mTLS", true)]
            .into_iter()
            .enumerate()
        {
            let (update_rate, mut updates, lookup_rate, mut lookups) = measure(tls, phase).await?;
            eprintln!(
                "round {round} {name}: {update_rate:.0} updates/s, {lookup_rate:.0} lookups/s"
            );
            table.push_str(&format!(
                "| {round} | {name} | {update_rate:.0} | {} | {} | {lookup_rate:.0} | {} | {} |\n",
                ms(updates.percentile(50.0)),
                ms(updates.percentile(99.0)),
                ms(lookups.percentile(50.0)),
                ms(lookups.percentile(99.0)),
            ));
            updates_by[i].push(update_rate);
            lookups_by[i].push(lookup_rate);
        }
    }
    let [plain_updates, tls_updates] = updates_by.map(median);
    let [plain_lookups, tls_lookups] = lookups_by.map(median);
    let cost = |plain: f64, tls: f64| (1.0 - tls / plain) * 100.0;
    table.push_str(&format!(
        "\nMedians: plaintext {plain_updates:.0} updates/s and {plain_lookups:.0} lookups/s, mTLS \
         {tls_updates:.0} and {tls_lookups:.0}: mTLS costs {:.1}% of the updates and {:.1}% of \
         the lookups (aim: under 10%).\n",
        cost(plain_updates, tls_updates),
        cost(plain_lookups, tls_lookups),
    ));
    report.section(table);
    Ok(())
}
