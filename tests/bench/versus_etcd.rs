//! cellplane beside etcd, in one run, on the same machine and load generator, durable on both
//! sides: route updates (cellplane's Raft store vs raw etcd puts, and cellplane's Control API on
//! its Raft store vs on etcd), lookups (STALE / LINEARIZABLE vs serializable / linearizable gets)
//! and watch fan-out to 1,000 watchers. Every figure is also given as a ratio to etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{GetTenantRequest, MoveRouteRequest, Tier};
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::proto::routing::{Consistency, LookupRequest, WatchRequest};
use cellplane_tests::cluster::{Cluster, add_active_cells};
use cellplane_tests::etcd::{EtcdCluster, NodeOnEtcd};
use cellplane_tests::measure::{Samples, ms};
use etcd_client::{GetOptions, KvClient};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::drive::{Client, drive};
use crate::report::Report;
use crate::updates::CONCURRENCY;

/// Clients sharing one connection, on both sides.
const CLIENTS_PER_CONNECTION: usize = 4;

/// Clients of the lookup comparison.
const LOOKUP_CLIENTS: usize = 64;

/// Watchers of the fan-out comparison, and updates timed.
const WATCHERS: usize = 1_000;
const FANOUT_ROUNDS: usize = 5;

/// A JSON value the size of a stored tenant record.
const VALUE: &[u8] = br#"{"tier":"Normal","home_region":"r1","primary_cell":"cell-a","epoch":12345,"state":"Active","override_count":0}"#;

/// Moves its own tenant between two cells, compare-and-set on the epoch.
struct Mover {
    control: ControlClient<Channel>,
    tenant_id: String,
    epoch: u64,
    cell: String,
}

#[tonic::async_trait]
impl Client for Mover {
    async fn call(&mut self) -> anyhow::Result<()> {
        let target = if self.cell == "cell-a" {
            "cell-b"
        } else {
            "cell-a"
        };
        let route = self
            .control
            .move_route(MoveRouteRequest {
                tenant_id: self.tenant_id.clone(),
                conversation_id: String::new(),
                expected_epoch: self.epoch,
                target_cell: target.into(),
            })
            .await?
            .into_inner()
            .route
            .unwrap_or_default();
        self.epoch = route.epoch;
        self.cell = route.cell_id;
        Ok(())
    }
}

struct Putter {
    kv: KvClient,
    key: String,
}

#[tonic::async_trait]
impl Client for Putter {
    async fn call(&mut self) -> anyhow::Result<()> {
        self.kv.put(self.key.clone(), VALUE, None).await?;
        Ok(())
    }
}

struct Looker {
    routing: RoutingClient<Channel>,
    tenant_id: String,
    consistency: Consistency,
}

#[tonic::async_trait]
impl Client for Looker {
    async fn call(&mut self) -> anyhow::Result<()> {
        self.routing
            .lookup(LookupRequest {
                tenant_id: self.tenant_id.clone(),
                conversation_id: String::new(),
                consistency: self.consistency as i32,
            })
            .await?;
        Ok(())
    }
}

struct Getter {
    kv: KvClient,
    key: String,
    serializable: bool,
}

#[tonic::async_trait]
impl Client for Getter {
    async fn call(&mut self) -> anyhow::Result<()> {
        let options = if self.serializable {
            Some(GetOptions::new().with_serializable())
        } else {
            None
        };
        let found = self.kv.get(self.key.clone(), options).await?;
        anyhow::ensure!(!found.kvs().is_empty(), "key {} missing", self.key);
        Ok(())
    }
}

async fn etcd_kv(endpoint: &str) -> anyhow::Result<KvClient> {
    Ok(etcd_client::Client::connect([endpoint], None)
        .await?
        .kv_client())
}

async fn movers(
    channel: impl Fn() -> Channel,
    prefix: &str,
    clients: usize,
) -> anyhow::Result<Vec<Box<dyn Client>>> {
    let mut out: Vec<Box<dyn Client>> = Vec::new();
    let mut shared = channel();
    for c in 0..clients {
        if c % CLIENTS_PER_CONNECTION == 0 {
            shared = channel();
        }
        let mut control = ControlClient::new(shared.clone());
        let tenant_id = format!("{prefix}-{c}");
        let tenant = control
            .get_tenant(GetTenantRequest {
                tenant_id: tenant_id.clone(),
            })
            .await?
            .into_inner();
        out.push(Box::new(Mover {
            control,
            tenant_id,
            epoch: tenant.epoch,
            cell: tenant.primary_cell,
        }));
    }
    Ok(out)
}

async fn create_tenants(channel: Channel, prefix: &str, count: usize) -> anyhow::Result<()> {
    let mut control = ControlClient::new(channel);
    add_active_cells(
        &mut control,
        "hz",
        &[
            ("cell-a", "z0", Tier::Normal),
            ("cell-b", "z1", Tier::Normal),
        ],
        1_000_000,
    )
    .await?;
    for i in 0..count {
        control
            .create_tenant(cellplane_api::proto::control::CreateTenantRequest {
                tenant_id: format!("{prefix}-{i}"),
                tier: Tier::Normal as i32,
                home_region: "hz".into(),
            })
            .await?;
    }
    Ok(())
}

fn ratio(ours: f64, etcd: f64) -> String {
    if etcd > 0.0 {
        format!("{:.2}×", ours / etcd)
    } else {
        "–".into()
    }
}

/// Time until every one of `watchers` has seen the change `update` makes, `FANOUT_ROUNDS` times.
async fn fanout<F, Fut>(
    mut seen: mpsc::UnboundedReceiver<()>,
    watchers: usize,
    mut update: F,
) -> anyhow::Result<Samples>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut samples = Samples::default();
    for round in 0..FANOUT_ROUNDS {
        while seen.try_recv().is_ok() {}
        let started = Instant::now();
        update(round).await?;
        for _ in 0..watchers {
            tokio::time::timeout(Duration::from_secs(30), seen.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("watchers stopped"))?;
        }
        samples.record(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(samples)
}

pub async fn run(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await;
    let etcd_leader = etcd.members[etcd.leader().await].client_addr.clone();
    let etcd_version =
        std::process::Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_default();
    let on_etcd =
        NodeOnEtcd::start(1, &etcd, "/bench/", &etcd.dir.path().join("cellplane.log")).await;
    let cluster = Cluster::start(3, &[]).await;
    let leader = cluster.wait_for_leader().await;
    let max = *CONCURRENCY.iter().max().unwrap_or(&1);
    create_tenants(cluster.channel(leader), "raft", max).await?;
    create_tenants(on_etcd.channel(), "etcd", max).await?;

    let mut updates = format!(
        "## cellplane beside etcd\n\n\
         Same machine, same run, same load generator; a 3-member etcd cluster ({etcd_version}, \
         default durability: every write fsynced by a quorum) and cellplane's own 3 Raft \
         nodes (every append fsynced). Clients share one connection per \
         {CLIENTS_PER_CONNECTION}; raw etcd clients talk to the etcd leader.\n\n\
         ### Route updates\n\n\
         `MoveRoute` compare-and-set of a tenant's route (its own tenant per client) on cellplane's \
         Raft store, raw etcd `Put`s of a {}-byte value (a stored tenant record), and the same \
         `MoveRoute` through a cellplane node whose store is that etcd cluster (one transaction \
         comparing `mod_revision`s per update).\n\n\
         | clients | cellplane Raft updates/s | p50 / p99 ms | raw etcd puts/s | p50 / p99 ms | Raft ÷ etcd | cellplane on etcd updates/s | p50 / p99 ms | on etcd ÷ raw etcd |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        VALUE.len()
    );
    for clients in CONCURRENCY {
        let raft = drive(
            movers(|| cluster.channel(leader), "raft", clients).await?,
            phase,
        )
        .await?;
        let mut putters: Vec<Box<dyn Client>> = Vec::new();
        let mut kv = etcd_kv(&etcd_leader).await?;
        for c in 0..clients {
            if c % CLIENTS_PER_CONNECTION == 0 {
                kv = etcd_kv(&etcd_leader).await?;
            }
            putters.push(Box::new(Putter {
                kv: kv.clone(),
                key: format!("/raw/tenants/bench-{c}"),
            }));
        }
        let raw = drive(putters, phase).await?;
        let through = drive(movers(|| on_etcd.channel(), "etcd", clients).await?, phase).await?;
        updates.push_str(&format!(
            "| {clients} | {:.0} | {} / {} | {:.0} | {} / {} | {} | {:.0} | {} / {} | {} |\n",
            raft.rate,
            ms(raft.p50),
            ms(raft.p99),
            raw.rate,
            ms(raw.p50),
            ms(raw.p99),
            ratio(raft.rate, raw.rate),
            through.rate,
            ms(through.p50),
            ms(through.p99),
            ratio(through.rate, raw.rate),
        ));
    }

    // Lookups: the keys exist on both sides.
    let mut kv = etcd_kv(&etcd_leader).await?;
    for c in 0..LOOKUP_CLIENTS {
        kv.put(format!("/raw/tenants/bench-{c}"), VALUE, None)
            .await?;
    }
    let mut lookups = format!(
        "\n### Lookups\n\n{LOOKUP_CLIENTS} clients, each reading its own key: cellplane \
         `Lookup` on the Raft leader (STALE from its replica, LINEARIZABLE through the read \
         index) and etcd `Range` on the etcd leader (serializable from its store, linearizable \
         through its read index).\n\n\
         | consistency | cellplane lookups/s | p50 / p99 ms | etcd gets/s | p50 / p99 ms | cellplane ÷ etcd |\n\
         |---|---:|---:|---:|---:|---:|\n"
    );
    for (name, consistency, serializable) in [
        ("stale / serializable", Consistency::Stale, true),
        ("linearizable", Consistency::Linearizable, false),
    ] {
        let mut lookers: Vec<Box<dyn Client>> = Vec::new();
        let mut channel = cluster.channel(leader);
        for c in 0..LOOKUP_CLIENTS {
            if c % CLIENTS_PER_CONNECTION == 0 {
                channel = cluster.channel(leader);
            }
            lookers.push(Box::new(Looker {
                routing: RoutingClient::new(channel.clone()),
                tenant_id: format!("raft-{c}"),
                consistency,
            }));
        }
        let ours = drive(lookers, phase).await?;
        let mut getters: Vec<Box<dyn Client>> = Vec::new();
        let mut kv = etcd_kv(&etcd_leader).await?;
        for c in 0..LOOKUP_CLIENTS {
            if c % CLIENTS_PER_CONNECTION == 0 {
                kv = etcd_kv(&etcd_leader).await?;
            }
            getters.push(Box::new(Getter {
                kv: kv.clone(),
                key: format!("/raw/tenants/bench-{c}"),
                serializable,
            }));
        }
        let theirs = drive(getters, phase).await?;
        lookups.push_str(&format!(
            "| {name} | {:.0} | {} / {} | {:.0} | {} / {} | {} |\n",
            ours.rate,
            ms(ours.p50),
            ms(ours.p99),
            theirs.rate,
            ms(theirs.p50),
            ms(theirs.p99),
            ratio(ours.rate, theirs.rate),
        ));
    }

    // Watch fan-out: watchers spread over every node / member.
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let nodes: Vec<u64> = cluster.nodes.keys().copied().collect();
    let mut channel = cluster.channel(nodes[0]);
    for w in 0..WATCHERS {
        if w % 32 == 0 {
            channel = cluster.channel(nodes[(w / 32) % nodes.len()]);
        }
        let mut stream = RoutingClient::new(channel.clone())
            .watch(WatchRequest { from_revision: 0 })
            .await?
            .into_inner();
        let seen_tx = seen_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if !message.events.is_empty() && seen_tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    drop(seen_tx);
    let mover = Arc::new(tokio::sync::Mutex::new(
        movers(|| cluster.channel(leader), "raft", 1).await?,
    ));
    let ours = fanout(seen, WATCHERS, |_| {
        let mover = mover.clone();
        async move {
            let mut movers = mover.lock().await;
            movers[0].call().await
        }
    })
    .await?;

    let (seen_tx, seen) = mpsc::unbounded_channel();
    let mut watch_client =
        etcd_client::Client::connect([etcd.endpoints()[0].as_str()], None).await?;
    for w in 0..WATCHERS {
        if w % 32 == 0 {
            let endpoint = &etcd.endpoints()[(w / 32) % etcd.members.len()];
            watch_client = etcd_client::Client::connect([endpoint.as_str()], None).await?;
        }
        let mut stream = watch_client.watch("/raw/watched", None).await?;
        let seen_tx = seen_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if !message.events().is_empty() && seen_tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    drop(seen_tx);
    let mut kv = etcd_kv(&etcd_leader).await?;
    let theirs = fanout(seen, WATCHERS, |round| {
        let mut kv = kv.clone();
        async move {
            kv.put("/raw/watched", format!("{round}"), None).await?;
            Ok(())
        }
    })
    .await?;
    kv.put("/raw/done", "1", None).await?;
    let (mut ours, mut theirs) = (ours, theirs);
    let watch = format!(
        "\n### Watch fan-out\n\n{WATCHERS} watchers spread over the 3 nodes (cellplane `Watch`) \
         and the 3 members (etcd `Watch` of one key); one update, then the time until every \
         watcher has it, {FANOUT_ROUNDS} times.\n\n\
         | system | median ms | max ms |\n|---|---:|---:|\n\
         | cellplane | {} | {} |\n| etcd | {} | {} |\n\
         | cellplane ÷ etcd (time, lower is better) | {} | |\n",
        ms(ours.percentile(50.0)),
        ms(ours.percentile(100.0)),
        ms(theirs.percentile(50.0)),
        ms(theirs.percentile(100.0)),
        ratio(
            ours.percentile(50.0).as_secs_f64(),
            theirs.percentile(50.0).as_secs_f64()
        ),
    );
    report.section(format!("{updates}{lookups}{watch}"));
    Ok(())
}
