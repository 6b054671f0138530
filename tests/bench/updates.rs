//! Route updates through Raft: compare-and-set moves of tenant routes, 3 durable nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{GetTenantRequest, MoveRouteRequest, Tier};
use cellplane_tests::cluster::Cluster;
use cellplane_tests::measure::{Samples, ms};

use crate::report::Report;

/// Concurrent clients measured.
pub const CONCURRENCY: [usize; 3] = [1, 16, 256];

/// gRPC connections the clients share: one HTTP/2 connection per 32 clients.
const CLIENTS_PER_CHANNEL: usize = 4;

pub async fn run(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await;
    cluster
        .add_cells(&[("cell-a", "a", Tier::Normal), ("cell-b", "b", Tier::Normal)])
        .await;
    let leader = cluster.wait_for_leader().await;
    let max = *CONCURRENCY.iter().max().unwrap_or(&1);
    let mut tenants = Vec::new();
    let mut control = cluster.control(leader);
    for i in 0..max {
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
    let tenants = Arc::new(tokio::sync::Mutex::new(tenants));

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
                let (tenant, mut epoch, mut cell) = tenants.lock().await[c].clone();
                let mut control =
                    cellplane_api::proto::control::control_client::ControlClient::new(channel);
                let mut samples = Samples::default();
                while Instant::now() < deadline {
                    let target = if cell == "cell-a" { "cell-b" } else { "cell-a" };
                    let sent = Instant::now();
                    let moved = control
                        .move_route(MoveRouteRequest {
                            tenant_id: tenant.clone(),
                            conversation_id: String::new(),
                            expected_epoch: epoch,
                            target_cell: target.into(),
                        })
                        .await;
                    match moved {
                        Ok(answer) => {
                            samples.record(sent.elapsed());
                            let route = answer.into_inner().route.unwrap_or_default();
                            epoch = route.epoch;
                            cell = route.cell_id;
                        }
                        Err(status) => panic!("update failed: {status}"),
                    }
                }
                tenants.lock().await[c] = (tenant, epoch, cell);
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
