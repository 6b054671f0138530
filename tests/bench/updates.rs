//! Route updates through Raft: compare-and-set moves of tenant routes, 3 durable nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{GetTenantRequest, MoveRouteRequest, Tier};
use cellplane_tests::cluster::Cluster;
use cellplane_tests::measure::{Samples, ms};
use tonic::transport::Channel;

use crate::report::Report;

/// Concurrent clients measured.
pub const CONCURRENCY: [usize; 3] = [1, 16, 256];

/// gRPC connections the clients share: one HTTP/2 connection per 32 clients.
const CLIENTS_PER_CHANNEL: usize = 4;

/// A tenant a client moves: its id, and the epoch and cell it was last seen at.
pub type Moving = (String, u64, String);

/// Registers cells `cell-a` and `cell-b` and creates `count` tenants `bench-N` on them.
pub async fn tenants(cluster: &Cluster, count: usize) -> anyhow::Result<Vec<Moving>> {
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    let mut control = cluster.control(leader);
    let mut tenants = Vec::new();
    for i in 0..count {
        let tenant = format!("bench-{i}");
        cluster.create_tenant(leader, &tenant).await?;
        let record = control
            .get_tenant(GetTenantRequest {
                tenant_id: tenant.clone(),
            })
            .await?
            .into_inner();
        tenants.push((tenant, record.epoch, record.primary_cell));
    }
    Ok(tenants)
}

/// Moves a tenant between `cell-a` and `cell-b` with compare-and-set `MoveRoute` until
/// `deadline`: the latencies, and where the tenant ended.
pub async fn move_until(
    channel: Channel,
    (tenant, mut epoch, mut cell): Moving,
    deadline: Instant,
) -> (Samples, Moving) {
    let mut control = ControlClient::new(channel);
    let mut samples = Samples::default();
    while Instant::now() < deadline {
        let target = if cell == "cell-a" { "cell-b" } else { "cell-a" };
        let sent = Instant::now();
        let route = control
            .move_route(MoveRouteRequest {
                tenant_id: tenant.clone(),
                conversation_id: String::new(),
                expected_epoch: epoch,
                target_cell: target.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("update failed: {status}"))
            .into_inner()
            .route
            .unwrap_or_default();
        samples.record(sent.elapsed());
        epoch = route.epoch;
        cell = route.cell_id;
    }
    (samples, (tenant, epoch, cell))
}

pub async fn run(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await;
    let max = *CONCURRENCY.iter().max().unwrap_or(&1);
    let tenants = Arc::new(tokio::sync::Mutex::new(tenants(&cluster, max).await?));
    let leader = cluster.wait_for_leader().await;

    let mut table = String::from(
        "## Route updates through Raft\n\n\
         `MoveRoute` compare-and-set on the leader, each client moving its own tenant between two \
         cells; 3 nodes, each log append fsynced before it counts. Concurrent commands are packed \
         into one log entry while the previous one is in flight.\n\n\
         | clients | updates/s | p50 ms | p99 ms | commands per log entry | log entries per fsync (leader) |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for clients in CONCURRENCY {
        let channels: Vec<_> = (0..clients.div_ceil(CLIENTS_PER_CHANNEL))
            .map(|_| cluster.channel(leader))
            .collect();
        let syncs_before = cluster
            .metric(leader, "cellplane_raft_log_syncs_total")
            .await
            .unwrap_or(0.0);
        let batched_before = cluster
            .metric(leader, "cellplane_commands_per_entry_sum")
            .await
            .unwrap_or(0.0);
        let proposals_before = cluster
            .metric(leader, "cellplane_commands_per_entry_count")
            .await
            .unwrap_or(0.0);
        let entries_before = cluster
            .metric(leader, "cellplane_raft_log_entries_total")
            .await
            .unwrap_or(0.0);
        let started = Instant::now();
        let deadline = started + phase;
        let mut tasks = Vec::new();
        for c in 0..clients {
            let channel = channels[c / CLIENTS_PER_CHANNEL].clone();
            let tenants = tenants.clone();
            tasks.push(tokio::spawn(async move {
                let tenant = tenants.lock().await[c].clone();
                let (samples, ended) = move_until(channel, tenant, deadline).await;
                tenants.lock().await[c] = ended;
                samples
            }));
        }
        let mut samples = Samples::default();
        for task in tasks {
            samples.merge(task.await?);
        }
        let elapsed = started.elapsed();
        let syncs = cluster
            .metric(leader, "cellplane_raft_log_syncs_total")
            .await
            .unwrap_or(0.0)
            - syncs_before;
        let entries = cluster
            .metric(leader, "cellplane_raft_log_entries_total")
            .await
            .unwrap_or(0.0)
            - entries_before;
        let batched = cluster
            .metric(leader, "cellplane_commands_per_entry_sum")
            .await
            .unwrap_or(0.0)
            - batched_before;
        let proposals = cluster
            .metric(leader, "cellplane_commands_per_entry_count")
            .await
            .unwrap_or(0.0)
            - proposals_before;
        let rate = samples.len() as f64 / elapsed.as_secs_f64();
        table.push_str(&format!(
            "| {clients} | {rate:.0} | {} | {} | {:.1} | {:.1} |\n",
            ms(samples.percentile(50.0)),
            ms(samples.percentile(99.0)),
            if proposals > 0.0 {
                batched / proposals
            } else {
                0.0
            },
            if syncs > 0.0 { entries / syncs } else { 0.0 },
        ));
    }
    report.section(table);
    Ok(())
}
