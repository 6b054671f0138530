//! A follower cut off from the other nodes for a moment must be back in step soon after the
//! cut heals. The simulated network loses what a cut link carried and never resends it, so
//! every connection that crossed the cut is dead afterwards without being closed, as one
//! through a middlebox that forgot the flow is: the follower catches up only once the nodes
//! find that out and connect anew. Until then it answers reads from an old state and does not
//! count towards the quorum, so the next crash of another node stops every write.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::{RegisterCellRequest, Tier};
use cellplane_api::proto::routing::ListRoutesRequest;
use cellplane_api::proto::routing::routing_client::RoutingClient;

use crate::world::{self, NODES, host};

/// How long the follower is cut off.
const CUT_FOR: Duration = Duration::from_secs(1);
/// How long after the heal it may take to have everything the others had at the heal: the
/// nodes' keepalive (1 s of silence, then 1 s for the ping) and a few heartbeats.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(3);

/// The revision node `id` has applied, as it answers reads from its own state.
pub async fn revision(id: u64) -> Option<u64> {
    let mut routing = RoutingClient::new(
        crate::net::tls()
            .lazy_channel(&world::endpoint(id), Duration::from_millis(500))
            .expect("a simulated endpoint"),
    );
    let listed = routing.list_routes(ListRoutesRequest {
        page_size: 1,
        page_token: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(1), listed).await {
        Ok(Ok(page)) => Some(page.into_inner().revision),
        _ => None,
    }
}

/// Registers cells one after another, through whichever node answers, until the run ends.
pub async fn write_on() {
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
}

/// The instants the driver cut the follower off and healed the cut.
#[derive(Default)]
struct Cut {
    started: bool,
    healed_at: Option<Duration>,
}

/// Cuts `follower` off from the other nodes once writes flow, heals the cut `CUT_FOR` later,
/// and answers how long after the heal the follower had every revision the others had
/// applied at the heal.
fn run(seed: u64, follower: u64) -> Duration {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build(seed, dir.path(), Duration::from_secs(60));
    let cut: Arc<Mutex<Cut>> = Arc::default();
    let caught_up: Arc<Mutex<Option<Duration>>> = Arc::default();
    {
        let (cut, caught_up) = (cut.clone(), caught_up.clone());
        sim.client("clients", async move {
            tokio::spawn(write_on());
            while revision(1).await.unwrap_or(0) < 20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cut.lock().expect("cut").started = true;
            let healed_at = loop {
                if let Some(at) = cut.lock().expect("cut").healed_at {
                    break at;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let mut target = 0;
            for other in (1..=NODES).filter(|id| *id != follower) {
                target = target.max(revision(other).await.unwrap_or(0));
            }
            while revision(follower).await.unwrap_or(0) < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            *caught_up.lock().expect("caught up") =
                Some(turmoil::sim_elapsed().unwrap_or_default() - healed_at);
            Ok(())
        });
    }
    let others: Vec<String> = (1..=NODES).filter(|id| *id != follower).map(host).collect();
    let mut cut_at = None;
    while !sim.step().unwrap_or_else(|e| panic!("seed {seed}: {e}")) {
        let now = sim.elapsed();
        let mut cut = cut.lock().expect("cut");
        match cut_at {
            None if cut.started => {
                for other in &others {
                    sim.partition(host(follower).as_str(), other.as_str());
                }
                cut_at = Some(now);
            }
            Some(at) if cut.healed_at.is_none() && now >= at + CUT_FOR => {
                for other in &others {
                    sim.repair(host(follower).as_str(), other.as_str());
                }
                cut.healed_at = Some(now);
            }
            _ => {}
        }
    }
    let caught_up = caught_up.lock().expect("caught up").take();
    caught_up.unwrap_or_else(|| panic!("seed {seed}: node {follower} never caught up"))
}

#[test]
fn a_follower_cut_off_for_a_moment_catches_up_soon_after_the_heal() {
    for (seed, follower) in [(1, 3), (2, 2)] {
        let took = run(seed, follower);
        eprintln!("seed {seed}: node {follower} caught up {took:?} after the heal");
        assert!(
            took <= CATCH_UP_WITHIN,
            "seed {seed}: node {follower} caught up only {took:?} after the heal"
        );
    }
}
