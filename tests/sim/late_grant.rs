//! A node may lag its leader and still serve: it counts as in touch until it has heard from no
//! leader for three election timeouts (2.4 s), and until then it answers listings from the
//! state it has. An agent that must reload its routes in that time (the node it followed went
//! down) may read them there from before a route moved, and grant the key's old owner the key
//! again, at its old epoch, after the owner was revoked towards the new one. The cell must
//! refuse that grant: it holds the key revoked at a newer epoch. Were it to take it, writers
//! whose route caches still name the old owner would be accepted there while the new owner
//! takes the writers that follow the routes: two writers.
//!
//! The node must still reach the leader: the agent's calls that need the leader (lease
//! renewals above all) go where it is on its list of nodes, and move on from a node that cannot
//! forward them; and a cell whose agent reaches no quorum stops writing within its lease, which
//! would hide the grant. So the node lags by distance: node 5 of five is a region away, 180 ms
//! from its peers. The agent reaches node 4 alone, a follower, until the source cell of a
//! migration has been revoked; then node 4 crashes and the agent reaches every node again. The
//! next on its list is node 5, which hears of the switch some 200–500 ms after the others. A
//! writer on a host cut off from every node (its route cache names the source for good) sends
//! to the source throughout, each send given up after 100 ms.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::cell::CellStatusRequest;
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::control::{
    ClusterStatusRequest, GetMigrationRequest, MigrateTenantRequest, MigrationPhase, Tier,
};
use cellplane_api::proto::routing::{ListRoutesRequest, Route};
use tokio::time::Instant;

use crate::scenario::{self, Change, Changes, ask};
use crate::workload::{self, Acked, Behind};
use crate::world::{self, agent_host, host};

const TENANT: [&str; 1] = ["acme"];
/// Conversations of the tenant, each with a writer of each kind: the stale writers between
/// them reach the source every 30 ms or so.
const GROUPS: usize = 4;
const REGION: &str = "hz";
const NODES: u64 = 5;
/// The node that falls behind.
const BEHIND: u64 = 5;
/// The one node the agent reaches until it crashes: the one before [`BEHIND`] in its list.
const FOLLOWED: u64 = 4;
/// The host of the writer whose route cache never moves.
const STALE_WRITER: &str = "stale-writer";
/// How long both writers send.
const WRITE_FOR: Duration = Duration::from_secs(25);
/// How long a message takes between node 5 and its peers: it is a region away, and hears of
/// every change that long after the others. Its leader's heartbeats still reach it well within
/// an election timeout (400 ms) of each other.
const FAR: Duration = Duration::from_millis(180);
/// How long node 4 stays down.
const DOWN_FOR: Duration = Duration::from_secs(4);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What the clients saw.
struct Report {
    /// The route node 5 served when node 4 crashed: the source's, from before the switch.
    served_there: Option<(String, u64)>,
    /// The source cell and the epoch it held the tenant at.
    source: (String, u64),
    /// How many sends were acknowledged, by the writers that follow the routes and by the
    /// one whose cache stays behind.
    acknowledged: usize,
    from_the_stale_writer: usize,
}

/// The tenant's route as node `id` serves it from its own state.
async fn route_on(id: u64) -> Option<Route> {
    let mut client = world::routing(id);
    let listed = client.list_routes(ListRoutesRequest {
        page_size: 100,
        page_token: String::new(),
    });
    let page = tokio::time::timeout(Duration::from_secs(1), listed)
        .await
        .ok()?
        .ok()?;
    page.into_inner()
        .routes
        .into_iter()
        .find(|r| r.tenant_id == TENANT[0])
}

/// The node that leads, once it is neither node 4 nor node 5: while either leads it is crashed
/// and restarted.
async fn leader_elsewhere(changes: &Changes) -> u64 {
    loop {
        let status = world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .cluster_status(ClusterStatusRequest {})
                .await
        })
        .await;
        match status.map(|s| s.leader_id) {
            Some(0) | None => {}
            Some(leader) if leader == BEHIND || leader == FOLLOWED => {
                ask(changes, Change::Crash(host(leader)));
                tokio::time::sleep(Duration::from_secs(1)).await;
                ask(changes, Change::Bounce(host(leader)));
            }
            Some(leader) => return leader,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether the cell serving at `endpoint` holds any key of the tenant.
async fn holds(endpoint: &str) -> Result<bool, tonic::Status> {
    let channel = crate::net::tls()
        .lazy_channel(endpoint, Duration::from_millis(500))
        .expect("a simulated endpoint");
    let status = CellAdminClient::new(channel)
        .cell_status(CellStatusRequest::default())
        .await?
        .into_inner();
    Ok(status.keys.iter().any(|k| k.tenant_id == TENANT[0]))
}

async fn clients(changes: Changes, acked: Arc<Mutex<Acked>>) -> Result<Report, String> {
    let leader = leader_elsewhere(&changes).await;
    ask(&changes, Change::Run(start_agent));
    ask(&changes, Change::Run(far));
    workload::create_tenants(&TENANT, Tier::Normal, REGION).await;
    let messenger = workload::messenger().await?;
    workload::create_groups(&messenger, &TENANT, GROUPS).await;
    let source = loop {
        if let Some(route) = route_on(leader).await {
            break route;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    scenario::cut_off_stale_writers(STALE_WRITER, &acked, &changes).await;
    let mut writers = tokio::task::JoinSet::new();
    let until = Instant::now() + WRITE_FOR;
    workload::spawn_writers(
        &mut writers,
        &messenger,
        (&TENANT, GROUPS),
        "w",
        until,
        &acked,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let migration = world::until_done(CALL_TIMEOUT, |via| async move {
        world::control(via)
            .migrate_tenant(MigrateTenantRequest {
                tenant_id: TENANT[0].into(),
                target_cell: String::new(),
            })
            .await
    })
    .await
    .ok_or("the migration was not started")?;
    let id = migration.migration_id;
    let deadline = Instant::now() + Duration::from_secs(10);
    while holds(&source.endpoint).await.unwrap_or(true) {
        if Instant::now() > deadline {
            return Err(format!("{} was not revoked within 10 s", source.cell_id));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let served_there = route_on(BEHIND).await.map(|r| (r.cell_id, r.epoch));
    ask(&changes, Change::Crash(host(FOLLOWED)));
    for id in (1..=NODES).filter(|id| *id != FOLLOWED) {
        ask(&changes, Change::Repair(agent_host(REGION), host(id)));
    }
    tokio::time::sleep(DOWN_FOR).await;
    ask(&changes, Change::Bounce(host(FOLLOWED)));

    loop {
        let phase = world::until_done(CALL_TIMEOUT, |via| {
            let id = id.clone();
            async move {
                world::control(via)
                    .get_migration(GetMigrationRequest { migration_id: id })
                    .await
            }
        })
        .await
        .map(|m| m.phase);
        if phase == Some(MigrationPhase::Done as i32) {
            break;
        }
        if phase.is_some_and(|p| p > MigrationPhase::Done as i32) {
            return Err(format!("the migration ended in {phase:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while writers.join_next().await.is_some() {}
    // The stale writer began first and stops first; its last send ends within its deadline.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let acked = acked.lock().expect("acked").clone();
    workload::one_writer(&acked, &Behind::new())?;
    workload::check_histories(&messenger, &acked, &Behind::new()).await?;
    let all = || acked.values().flatten();
    Ok(Report {
        served_there,
        source: (source.cell_id, source.epoch),
        acknowledged: all().count(),
        from_the_stale_writer: all().filter(|a| a.id.contains("stale")).count(),
    })
}

/// Starts the agent, reaching [`FOLLOWED`] alone.
fn start_agent(sim: &mut turmoil::Sim<'_>, dir: &std::path::Path) {
    let cells = (1..=2)
        .map(|n| world::cell(REGION, &format!("cell-{n}"), "NORMAL", 7000 + n as u16))
        .collect();
    world::add_agent(sim, dir, REGION, cells);
    for id in (1..=NODES).filter(|id| *id != FOLLOWED) {
        sim.partition(agent_host(REGION).as_str(), host(id).as_str());
    }
}

/// Every message between [`BEHIND`] and its peers takes [`FAR`] from now on.
fn far(sim: &mut turmoil::Sim<'_>, _: &std::path::Path) {
    for peer in 1..NODES {
        sim.set_link_latency(host(BEHIND).as_str(), host(peer).as_str(), FAR);
    }
}

fn run(seed: u64) -> Report {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build_of(seed, dir.path(), Duration::from_secs(120), NODES);
    let changes: Changes = Arc::default();
    let acked: Arc<Mutex<Acked>> = Arc::default();
    // A write given up after 100 ms goes to the owner the cache names again soon, where one
    // that waits for the cache to move would wait for good.
    scenario::add_stale_writers(
        &mut sim,
        STALE_WRITER,
        (&TENANT, GROUPS),
        (Duration::from_millis(100), WRITE_FOR),
        &acked,
    );
    let clients = clients(changes.clone(), acked);
    scenario::run(seed, sim, dir.path(), &changes, clients)
}

#[test]
fn a_node_behind_its_leader_cannot_give_the_old_owner_its_key_back() {
    crate::seeds::for_each(
        "late_grant::a_node_behind_its_leader_cannot_give_the_old_owner_its_key_back",
        // Seeds whose stale writers reach the source inside the late grant's window: with
        // the cell's epoch check taken out, both fail (docs/simulation.md).
        &[1, 4],
        |seed| {
            let report = run(seed);
            eprintln!(
                "seed {seed}: node 5 served {:?} when node 4 crashed; {} sends acknowledged, {} of \
                 them from the stale writer",
                report.served_there, report.acknowledged, report.from_the_stale_writer
            );
            // The reload this scenario is about can happen only if node 3 still served the
            // source's route when it became the agent's one node.
            assert_eq!(
                report.served_there.as_ref(),
                Some(&report.source),
                "seed {seed}: node 5 was not behind the switch when node 4 crashed"
            );
        },
    );
}
