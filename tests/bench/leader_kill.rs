//! How long writes stop when the leader dies: the time from a leader's SIGKILL to the first
//! acknowledged write after it, on cellplane's Raft store and on etcd, same machine, same run.
//!
//! Both campaign after a random 400–800 ms without a leader: cellplane's defaults (heartbeats
//! every 100 ms), and etcd with `--election-timeout 400`, which it randomizes over `[400, 800)`,
//! and heartbeats every 80 ms (etcd wants the election timeout at least 5 heartbeats). Each write is a new record (`CreateTenant` on
//! cellplane, a `Put` of a new key on etcd) sent to a surviving member, which forwards it to
//! its leader; an attempt that fails or gets no answer within `ATTEMPT_TIMEOUT` is sent again
//! to the next survivor. After each kill the member is restarted and the cluster settles
//! before the next one.

use std::time::{Duration, Instant};

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{CreateTenantRequest, Tier};
use cellplane_tests::cluster::Cluster;
use cellplane_tests::etcd::EtcdCluster;
use cellplane_tests::measure::{Samples, ms};
use tonic::transport::Channel;

use crate::report::Report;

/// How long one write attempt may take before it is sent again elsewhere.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// Quiet time after a restarted member has caught up, before the next kill.
const SETTLE: Duration = Duration::from_millis(700);

/// Sends `write(member)` to the members in turn until one is acknowledged; returns when.
async fn first_acknowledged<C, F, Fut>(members: &mut [C], mut write: F) -> Instant
where
    F: FnMut(&mut C, u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut attempt = 0u64;
    loop {
        let index = (attempt as usize) % members.len();
        attempt += 1;
        if tokio::time::timeout(ATTEMPT_TIMEOUT, write(&mut members[index], attempt))
            .await
            .unwrap_or(false)
        {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn create_tenant(control: &mut ControlClient<Channel>, tenant_id: String) -> bool {
    control
        .create_tenant(CreateTenantRequest {
            tenant_id,
            tier: Tier::Normal as i32,
            home_region: "hz".into(),
        })
        .await
        .is_ok()
}

async fn kill_cellplane_leader(cluster: &mut Cluster, round: usize) -> Duration {
    let leader = cluster.wait_for_leader().await;
    let mut survivors: Vec<ControlClient<Channel>> = cluster
        .running_ids()
        .into_iter()
        .filter(|&id| id != leader)
        .map(|id| cluster.control(id))
        .collect();
    // Connections are up before the kill, as a running client's are.
    for control in &mut survivors {
        assert!(
            create_tenant(control, format!("warm-{round}-{}", rand::random::<u64>())).await,
            "cellplane did not take a write before the kill"
        );
    }
    cluster.kill(leader).await;
    let killed = Instant::now();
    let acked = first_acknowledged(&mut survivors, |control, attempt| {
        let mut control = control.clone();
        async move { create_tenant(&mut control, format!("after-{round}-{attempt}")).await }
    })
    .await;
    cluster.restart(leader);
    cluster.wait_for_leader().await;
    tokio::time::sleep(SETTLE).await;
    acked - killed
}

async fn etcd_client(endpoint: &str) -> etcd_client::KvClient {
    etcd_client::Client::connect([endpoint], None)
        .await
        .expect("etcd client")
        .kv_client()
}

async fn kill_etcd_leader(etcd: &mut EtcdCluster, round: usize) -> Duration {
    let leader = etcd.leader().await;
    let mut survivors = Vec::new();
    for (index, member) in etcd.members.iter().enumerate() {
        if index != leader {
            let mut kv = etcd_client(&member.client_addr).await;
            kv.put(format!("/warm/{round}/{index}"), "1", None)
                .await
                .expect("etcd did not take a write before the kill");
            survivors.push(kv);
        }
    }
    etcd.kill(leader).await;
    let killed = Instant::now();
    let acked = first_acknowledged(&mut survivors, |kv, attempt| {
        let mut kv = kv.clone();
        async move {
            kv.put(format!("/after/{round}/{attempt}"), "1", None)
                .await
                .is_ok()
        }
    })
    .await;
    etcd.restart(leader);
    etcd.wait_ready().await;
    etcd.leader().await;
    tokio::time::sleep(SETTLE).await;
    acked - killed
}

fn row(system: &str, samples: &mut Samples) -> String {
    format!(
        "| {system} | {} | {} | {} | {} | {} |\n",
        samples.len(),
        ms(samples.percentile(50.0)),
        ms(samples.percentile(90.0)),
        ms(samples.percentile(99.0)),
        ms(samples.percentile(100.0)),
    )
}

pub async fn run(report: &mut Report, kills: usize) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster.add_cells(&[("cell-a", "a", Tier::Normal)]).await;
    let mut raft = Samples::default();
    for round in 0..kills {
        let pause = kill_cellplane_leader(&mut cluster, round).await;
        eprintln!("cellplane kill {round}: {}", ms(pause));
        raft.record(pause);
    }
    drop(cluster);

    let mut etcd = EtcdCluster::start_with_timing(3, 80, 400).await;
    let mut raw = Samples::default();
    for round in 0..kills {
        let pause = kill_etcd_leader(&mut etcd, round).await;
        eprintln!("etcd kill {round}: {}", ms(pause));
        raw.record(pause);
    }

    let ratio = raft.percentile(50.0).as_secs_f64() / raw.percentile(50.0).as_secs_f64();
    let mut text = format!(
        "## Leader SIGKILL → first acknowledged write\n\n\
         A 3-node cluster's leader is SIGKILLed {kills} times (restarted and settled in between); \
         a client writes a new record through the survivors, moving to the next one after a \
         failure or {} ms without an answer, and the time from the kill to the first \
         acknowledged write is measured. Both sides campaign after a random 400–800 ms without a \
         leader (cellplane's defaults, heartbeats every 100 ms; etcd `--election-timeout 400 \
         --heartbeat-interval 80`, its pre-vote off as by default); cellplane writes \
         `CreateTenant`, etcd a `Put`.\n\n\
         | store | kills | p50 ms | p90 ms | p99 ms | max ms |\n\
         |---|---:|---:|---:|---:|---:|\n",
        ATTEMPT_TIMEOUT.as_millis()
    );
    text.push_str(&row("cellplane (Raft)", &mut raft));
    text.push_str(&row("etcd", &mut raw));
    text.push_str(&format!("\ncellplane ÷ etcd at p50: {ratio:.2}×.\n"));
    report.section(text);
    Ok(())
}
