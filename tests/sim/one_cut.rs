//! What the tests without a nemesis share: writes that flow all along, one node cut off from
//! the other nodes once the clients are ready and healed a fixed time later, and the revision
//! a node has applied.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{RegisterCellRequest, Tier};
use cellplane_api::proto::routing::ListRoutesRequest;

use crate::world::{self, host, nodes};

/// The revision node `id` has applied, as it answers reads from its own state; `None` when it
/// does not answer.
pub async fn revision(id: u64) -> Option<u64> {
    let mut routing = world::routing(id);
    let listed = routing.list_routes(ListRoutesRequest {
        page_size: 1,
        page_token: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(1), listed).await {
        Ok(Ok(page)) => Some(page.into_inner().revision),
        _ => None,
    }
}

/// Starts registering cells one after another, through whichever node answers, until the run
/// ends, and returns once the first twenty revisions are applied.
pub async fn start_writes() {
    tokio::spawn(async {
        for n in 0u64.. {
            world::until_done(Duration::from_secs(1), |via| async move {
                world::control(via)
                    .register_cell(RegisterCellRequest {
                        cell_id: format!("cell-{n}"),
                        region: "hz".into(),
                        zone: "z1".into(),
                        tier: Tier::Normal as i32,
                        endpoint: format!("cell-{n}:7000"),
                        capacity: 1_000,
                        standby_of: String::new(),
                    })
                    .await
            })
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    while revision(1).await.unwrap_or(0) < 20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cut, as the clients and the driver share it.
#[derive(Default)]
pub struct Cut {
    /// The clients are ready: cut now.
    pub ready: bool,
    pub at: Option<Duration>,
    pub healed_at: Option<Duration>,
}

/// Waits until the cut healed; its instant.
pub async fn healed(cut: &Mutex<Cut>) -> Duration {
    loop {
        if let Some(at) = cut.lock().expect("cut").healed_at {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `clients` on three nodes, cutting `node` off from the other nodes once the clients
/// say they are ready and healing the cut `lasts` later; the clients' outcome, or a panic
/// naming the seed.
pub fn run<T, F, Fut>(seed: u64, node: u64, lasts: Duration, clients: F) -> T
where
    T: 'static,
    F: FnOnce(Arc<Mutex<Cut>>) -> Fut,
    Fut: Future<Output = Result<T, String>> + 'static,
{
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build(seed, dir.path(), Duration::from_secs(60));
    let cut: Arc<Mutex<Cut>> = Arc::default();
    let outcome: Arc<Mutex<Option<Result<T, String>>>> = Arc::default();
    {
        let (running, outcome) = (clients(cut.clone()), outcome.clone());
        sim.client("clients", async move {
            let done = running.await;
            *outcome.lock().expect("outcome") = Some(done);
            Ok(())
        });
    }
    drive(seed, &mut sim, node, lasts, &cut);
    let outcome = outcome.lock().expect("outcome").take();
    outcome
        .unwrap_or_else(|| panic!("seed {seed}: the clients never finished"))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

fn drive(seed: u64, sim: &mut turmoil::Sim<'_>, node: u64, lasts: Duration, cut: &Mutex<Cut>) {
    let others: Vec<String> = (1..=nodes()).filter(|id| *id != node).map(host).collect();
    while !sim.step().unwrap_or_else(|e| panic!("seed {seed}: {e}")) {
        let now = sim.elapsed();
        let mut cut = cut.lock().expect("cut");
        match cut.at {
            None if cut.ready => {
                for other in &others {
                    sim.partition(host(node).as_str(), other.as_str());
                }
                cut.at = Some(now);
            }
            Some(at) if cut.healed_at.is_none() && now >= at + lasts => {
                for other in &others {
                    sim.repair(host(node).as_str(), other.as_str());
                }
                cut.healed_at = Some(now);
            }
            _ => {}
        }
    }
}
