//! The simulated world: three control-plane nodes, each a turmoil host running the
//! production node, with its data directory kept across crashes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_cell_agent::agent;
use cellplane_cell_agent::config::{AgentConfig, CellSpec};
use cellplane_cell_agent::supervisor::{CellStart, Launcher};
use cellplane_control_plane::config::{NodeConfig, StoreConfig};
use cellplane_control_plane::node;
use cellplane_im_cell::config::{CellConfig, StandbyConfig};
use tonic::transport::Channel;

use crate::nemesis::Nemesis;
use crate::net;

thread_local! {
    /// How many control-plane nodes the simulation on this thread runs ([`build_of`]).
    static NODES: std::cell::Cell<u64> = const { std::cell::Cell::new(3) };
}

/// How many control-plane nodes the simulation runs, `n1`…: three unless [`build_of`] said.
pub fn nodes() -> u64 {
    NODES.with(std::cell::Cell::get)
}
/// The wall clock when a simulation starts: 2026-01-01T00:00:00Z.
const SIM_EPOCH_MS: u64 = 1_767_225_600_000;
pub const PORT: u16 = 9000;

pub fn host(id: u64) -> String {
    format!("n{id}")
}

pub fn endpoint(id: u64) -> String {
    format!("{}:{PORT}", host(id))
}

fn config(id: u64, data_dir: PathBuf) -> NodeConfig {
    NodeConfig::new(
        id,
        ([0, 0, 0, 0], PORT).into(),
        data_dir,
        (1..=nodes()).map(|id| (id, endpoint(id))).collect(),
        StoreConfig::Raft,
    )
}

/// A simulation of `seed` on three nodes, with the nodes' data under `dir`, running at most
/// `limit` of simulated time.
pub fn build<'a>(seed: u64, dir: &Path, limit: Duration) -> turmoil::Sim<'a> {
    build_of(seed, dir, limit, 3)
}

/// A simulation of `seed` like [`build`], on `nodes` nodes.
pub fn build_of<'a>(seed: u64, dir: &Path, limit: Duration, nodes: u64) -> turmoil::Sim<'a> {
    build_with(seed, dir, limit, nodes, |_| {})
}

/// A simulation of `seed` like [`build_of`], each node's config changed by `tune`.
pub fn build_with<'a>(
    seed: u64,
    dir: &Path,
    limit: Duration,
    nodes: u64,
    tune: fn(&mut NodeConfig),
) -> turmoil::Sim<'a> {
    NODES.with(|n| n.set(nodes));
    if let Ok(filter) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(SimulatedTime)
            .with_writer(std::io::stderr)
            .try_init();
    }
    // Election timeouts drawn from the seed, and the Raft log written inline.
    cellplane_control_plane::raft::runtime::simulate_on_this_thread(seed);
    // Timestamps, and the waits computed from them, on the simulated clock.
    cellplane_api::simulation::set_wall_clock(|| {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default();
        SIM_EPOCH_MS + u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    });
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(limit)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        // Connections waiting to be accepted: turmoil panics past it where a kernel would
        // drop the SYN, and clients retrying against a node that stalls can queue many.
        .tcp_capacity(4096)
        .build();
    for id in 1..=nodes {
        let mut config = config(id, dir.join(host(id)));
        tune(&mut config);
        sim.host(host(id), move || {
            let config = config.clone();
            async move {
                let listener = net::listen(PORT).await?;
                node::serve_with(config, net::tls(), listener, std::future::pending()).await?;
                Ok(())
            }
        });
    }
    sim
}

/// Stamps `SIM_LOG`'s lines with the simulated instant, which is what a seed's story is told
/// in: the machine's clock says nothing about a replay.
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let at = turmoil::sim_elapsed().unwrap_or_default().as_secs_f64();
        write!(w, "{at:>8.3}s")
    }
}

/// The simulated host of the agent of `region`; its cells run on it as tasks.
pub fn agent_host(region: &str) -> String {
    format!("agent-{region}")
}

/// A primary cell of `tier` served on `port` of the agent host of `region`.
pub fn cell(region: &str, cell_id: &str, tier: &str, port: u16) -> CellSpec {
    CellSpec {
        cell_id: cell_id.into(),
        zone: format!("z{port}"),
        tier: tier.into(),
        listen: ([0, 0, 0, 0], port).into(),
        advertise: Some(format!("{}:{port}", agent_host(region))),
        capacity: 1_000,
        standby_of: None,
        primary_endpoint: None,
        sync_standbys: None,
        sync_timeout_ms: None,
        args: Vec::new(),
    }
}

/// Runs the agent of `region` with `cells` on its own host, with its data under `dir`: the
/// production agent, its cells the production cells, started as tasks.
pub fn add_agent(sim: &mut turmoil::Sim<'_>, dir: &Path, region: &str, cells: Vec<CellSpec>) {
    let host = agent_host(region);
    let config = AgentConfig {
        data_dir: dir.join(&host),
        im_cell_binary: None,
        heartbeat_interval_ms: 200,
        restart: Default::default(),
        cells,
        tls: None,
        cell_auth: None,
    };
    let endpoints: Vec<String> = (1..=nodes()).map(endpoint).collect();
    let region = region.to_string();
    sim.host(host, move || {
        let (config, endpoints, region) = (config.clone(), endpoints.clone(), region.clone());
        async move {
            let launcher = Launcher::Tasks(Arc::new(|start| Box::pin(run_cell(start))));
            agent::run_with(
                config,
                region,
                endpoints,
                (net::tls(), launcher),
                std::future::pending(),
            )
            .await?;
            Ok(())
        }
    });
}

/// One cell, as `im-cell serve` would run it for the agent.
async fn run_cell(start: CellStart) -> Result<(), String> {
    let config = CellConfig {
        cell_id: start.spec.cell_id.clone(),
        listen: start.spec.listen,
        data_dir: start.data_dir,
        metrics_listen: None,
        limits: Default::default(),
        pns: None,
        standby: start.following.map(|following| StandbyConfig {
            primary_cell_id: following.primary,
            primary_endpoint: following.endpoint,
            rejoined: following.rejoined,
        }),
        replication: cellplane_im_cell::config::ReplicationConfig {
            sync_standbys: start.sync_standbys,
            ..Default::default()
        },
        lease_required: true,
        tls: None,
        shutdown_grace_ms: CellConfig::DEFAULT_SHUTDOWN_GRACE_MS,
        auth: None,
    };
    let listener = net::listen(start.spec.listen.port())
        .await
        .map_err(|e| e.to_string())?;
    cellplane_im_cell::server::serve_with(config, net::tls(), listener, start.stop)
        .await
        .map_err(|e| e.to_string())
}

/// What the clients tell the driver of a run.
#[derive(Default)]
pub struct Progress {
    /// The workload began: faults start now.
    pub started: bool,
    /// The node the clients last saw lead.
    pub leader: Option<u64>,
    /// What the clients do now, to say where a run that never ends is stuck.
    pub phase: String,
}

/// Notes what the clients do now.
pub fn phase(progress: &Mutex<Progress>, phase: impl Into<String>) {
    progress.lock().expect("progress").phase = phase.into();
}

/// Asks the nodes in turn who leads, every 100 ms, so the nemesis can aim at the leader.
pub async fn watch_leader(progress: Arc<Mutex<Progress>>) {
    use cellplane_api::proto::control::ClusterStatusRequest;
    use cellplane_api::proto::control::control_client::ControlClient;
    for n in 0u64.. {
        let channel = net::tls()
            .lazy_channel(&endpoint(n % nodes() + 1), Duration::from_millis(500))
            .expect("a simulated endpoint");
        let mut control = ControlClient::new(channel);
        let asked = control.cluster_status(ClusterStatusRequest {});
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(1), asked).await {
            let leader = status.into_inner().leader_id;
            progress.lock().expect("progress").leader = (leader != 0).then_some(leader);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Steps `sim` until its clients finish: once they started the workload, `nemesis` injects
/// faults for `run_for`, and then heals everything.
pub fn drive(
    seed: u64,
    sim: &mut turmoil::Sim<'_>,
    nemesis: &mut Nemesis,
    progress: &Mutex<Progress>,
    run_for: Duration,
) {
    let mut faults_end = None;
    loop {
        let finished = sim.step().unwrap_or_else(|e| {
            panic!(
                "seed {seed}: the simulation stopped during {}: {e}\nfaults:\n{}",
                progress.lock().expect("progress").phase,
                nemesis.report().join("\n")
            )
        });
        if finished {
            return;
        }
        let now = sim.elapsed();
        let (started, leader) = {
            let progress = progress.lock().expect("progress");
            (progress.started, progress.leader)
        };
        let ended = faults_end.is_some_and(|end| now >= end);
        if started && faults_end.is_none() {
            faults_end = Some(now + run_for);
        }
        if ended {
            nemesis.heal_all(sim);
        } else if started {
            nemesis.step(sim, now, leader);
        }
    }
}

/// A channel to node `id` over the simulated network, connected on its first call.
fn channel(id: u64) -> Channel {
    net::tls()
        .lazy_channel(&endpoint(id), Duration::from_millis(500))
        .expect("a simulated endpoint")
}

/// A Routing client of node `id`, over the simulated network.
pub fn routing(id: u64) -> RoutingClient<Channel> {
    RoutingClient::new(channel(id))
}

/// A Control client of node `id`, over the simulated network.
pub fn control(id: u64) -> ControlClient<Channel> {
    ControlClient::new(channel(id))
}

/// Retries `call` through each node in turn, each try given `timeout`, until one answers:
/// its answer, or `None` for `ALREADY_EXISTS` (a retry of a call that took effect).
pub async fn until_done<T, F, Fut>(timeout: Duration, mut call: F) -> Option<T>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    for attempt in 0u64.. {
        match tokio::time::timeout(timeout, call(attempt % nodes() + 1)).await {
            Ok(Ok(answer)) => return Some(answer.into_inner()),
            Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => return None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

/// Runs `clients` on a host of its own in `sim`, under `nemesis` for `run_for` once they
/// start their workload (`progress`), and reports the run: the clients' own report and the
/// faults, or a panic naming the seed with the violation they found. Returns what a replay
/// must repeat of it: the report, every fault with its instant, and when the run ended.
pub fn run_clients<F, Fut>(
    seed: u64,
    mut sim: turmoil::Sim<'_>,
    mut nemesis: Nemesis,
    progress: Arc<Mutex<Progress>>,
    run_for: Duration,
    clients: F,
) -> Vec<String>
where
    F: FnOnce(Arc<Mutex<Progress>>) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>> + 'static,
{
    let started = std::time::Instant::now();
    let outcome: Arc<Mutex<Option<Result<String, String>>>> = Arc::default();
    {
        let (running, outcome) = (clients(progress.clone()), outcome.clone());
        sim.client("clients", async move {
            *outcome.lock().expect("outcome") = Some(running.await);
            Ok(())
        });
    }
    drive(seed, &mut sim, &mut nemesis, &progress, run_for);
    let outcome = outcome.lock().expect("outcome").take();
    match outcome {
        Some(Ok(report)) => {
            eprintln!(
                "seed {seed}: {report}, {} faults, {:.1} s simulated in {:.2} s",
                nemesis.injected.len(),
                sim.elapsed().as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
            let ended = format!("ended at {:?}", sim.elapsed());
            [report, ended]
                .into_iter()
                .chain(nemesis.report())
                .collect()
        }
        Some(Err(violation)) => panic!(
            "seed {seed}: {violation}\nfaults:\n{}",
            nemesis.report().join("\n")
        ),
        None => panic!("seed {seed}: the clients never finished"),
    }
}
