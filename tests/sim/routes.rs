//! The route store under the nemesis: writers move route keys between two cells by
//! compare-and-set (`MoveRoute` on the epoch they last saw), a creator makes new tenants, and
//! readers look keys and tenants up LINEARIZABLE, each call through any node; after the faults
//! heal, every key and tenant is read on every node. The whole history — every `Lookup`,
//! `MoveRoute` and `CreateTenant` with its invocation and answer in simulated time — must be
//! linearizable (`cellplane_tests::history`, the WGL checker). This is also how a stale read
//! after a leader change shows up: an acknowledged move followed by a lookup of the epoch
//! before it fits no order, as does a tenant not found after its create was acknowledged.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{
    CellState, CreateTenantRequest, MoveRouteRequest, RegisterCellRequest, SetCellStateRequest,
    Tier,
};
use cellplane_api::proto::routing::{Consistency, LookupRequest};
use cellplane_tests::history::{History, Op, Ret, Route};

use crate::nemesis::Nemesis;
use crate::world::{self, Progress, nodes, phase, routing, until_done};

const KEYS: usize = 3;
const READERS: usize = 3;
/// Tenants the creator makes during a run, one every half second.
const NEW_TENANTS: u64 = 40;
const TENANT: &str = "sim";
const CELLS: [&str; 2] = ["cell-a", "cell-b"];
/// Simulated time the workload runs under the nemesis.
const RUN_FOR: Duration = Duration::from_secs(30);
/// How long a client waits for one answer before it counts the call's outcome unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A call's answer, or `None` when none came in time: the outcome is then unknown.
async fn within<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Option<Result<T, tonic::Status>> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.ok()
}

/// Two ACTIVE cells and the tenant, once a leader answers.
async fn set_up() {
    for (i, cell) in CELLS.iter().enumerate() {
        until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .register_cell(RegisterCellRequest {
                    cell_id: cell.to_string(),
                    region: "hz".into(),
                    zone: format!("z{i}"),
                    tier: Tier::Normal as i32,
                    endpoint: format!("cell-{i}:7000"),
                    capacity: 1_000,
                    standby_of: String::new(),
                })
                .await
        })
        .await;
        until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .set_cell_state(SetCellStateRequest {
                    cell_id: cell.to_string(),
                    state: CellState::Active as i32,
                })
                .await
        })
        .await;
    }
    until_done(CALL_TIMEOUT, |via| async move {
        world::control(via)
            .create_tenant(CreateTenantRequest {
                tenant_id: TENANT.into(),
                tier: Tier::Normal as i32,
                home_region: "hz".into(),
            })
            .await
    })
    .await;
}

/// The history's key of tenant `tenant`'s own route, created during the run.
fn tenant_key(tenant: &str) -> String {
    format!("tenant {tenant}")
}

/// A LINEARIZABLE lookup of `key` through `via`, recorded in `history`; answers the epoch
/// and cell, or `None` when the outcome is unknown (the client then goes on as another).
async fn lookup(history: &History, client: &mut u64, via: u64, key: &str) -> Option<(u64, String)> {
    lookup_route(history, client, via, (TENANT, key), key).await?
}

/// A LINEARIZABLE lookup of `(tenant, conversation)`, recorded under `key`: `Some(None)` when
/// no route exists, `None` when the outcome is unknown (the client then goes on as another).
async fn lookup_route(
    history: &History,
    client: &mut u64,
    via: u64,
    (tenant, conversation): (&str, &str),
    key: &str,
) -> Option<Option<(u64, String)>> {
    history.invoke(*client, key, Op::Lookup);
    let answer = within(routing(via).lookup(LookupRequest {
        tenant_id: tenant.into(),
        conversation_id: conversation.into(),
        consistency: Consistency::Linearizable as i32,
    }))
    .await;
    match answer {
        Some(Ok(answer)) => {
            let route = answer
                .into_inner()
                .route
                .expect("a lookup answered OK carries its route");
            history.returned(*client, key, Ret::Route(route.epoch));
            Some(Some((route.epoch, route.cell_id)))
        }
        Some(Err(status)) if status.code() == tonic::Code::NotFound => {
            history.returned(*client, key, Ret::NotFound);
            Some(None)
        }
        _ => {
            *client = history.client();
            None
        }
    }
}

/// Creates `tenant` through `via`, recorded in `history`: `Some(created)` once the answer is
/// known, `None` when the outcome is unknown (the client then goes on as another).
async fn create_tenant(
    history: &History,
    client: &mut u64,
    via: u64,
    tenant: &str,
) -> Option<bool> {
    let key = tenant_key(tenant);
    history.invoke(*client, &key, Op::Create);
    let answer = within(world::control(via).create_tenant(CreateTenantRequest {
        tenant_id: tenant.into(),
        tier: Tier::Normal as i32,
        home_region: "hz".into(),
    }))
    .await;
    match answer {
        Some(Ok(created)) => {
            history.returned(*client, &key, Ret::Created(created.into_inner().epoch));
            Some(true)
        }
        Some(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
            history.returned(*client, &key, Ret::Exists);
            Some(false)
        }
        _ => {
            *client = history.client();
            None
        }
    }
}

/// Moves `key` from the epoch `epoch` to `target` through `via`, recorded in `history`;
/// answers the epoch the key is known to be at afterwards.
async fn move_route(
    history: &History,
    client: &mut u64,
    via: u64,
    key: &str,
    (epoch, target): (u64, &str),
) -> Option<u64> {
    history.invoke(
        *client,
        key,
        Op::Move {
            expected: epoch,
            target: target.into(),
        },
    );
    let answer = within(world::control(via).move_route(MoveRouteRequest {
        tenant_id: TENANT.into(),
        conversation_id: key.into(),
        expected_epoch: epoch,
        target_cell: target.into(),
    }))
    .await;
    let refused = match answer {
        Some(Ok(moved)) => {
            let epoch = moved
                .into_inner()
                .route
                .expect("a move answered OK carries its route")
                .epoch;
            history.returned(*client, key, Ret::Moved(epoch));
            return Some(epoch);
        }
        Some(Err(status)) => status,
        None => {
            *client = history.client();
            return None;
        }
    };
    let current = cellplane_api::detail::decode(&refused).and_then(|d| d.current_route);
    if let Some(current) = current {
        history.returned(*client, key, Ret::Stale(current.epoch));
        Some(current.epoch)
    } else if refused.message().contains("already routed") {
        history.returned(*client, key, Ret::AlreadyThere);
        None
    } else {
        // UNAVAILABLE mid-change, a leader lost: it may still apply.
        *client = history.client();
        None
    }
}

/// The clients: set-up, writers and readers until the run ends, then the final reads.
async fn clients(
    history: Arc<History>,
    progress: Arc<Mutex<Progress>>,
    learned: Arc<Mutex<Option<Route>>>,
) {
    phase(&progress, "set-up");
    set_up().await;
    let mut client = history.client();
    let initial = loop {
        if let Some((epoch, cell)) = lookup(&history, &mut client, 1, "").await {
            break Route { epoch, cell };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    *learned.lock().expect("learned") = Some(initial.clone());
    progress.lock().expect("progress").started = true;
    phase(&progress, "writers and readers");
    let until = tokio::time::Instant::now() + RUN_FOR;
    let mut tasks = tokio::task::JoinSet::new();
    for key in 0..KEYS {
        let (history, initial) = (history.clone(), initial.clone());
        tasks.spawn(async move {
            let name = format!("c{key}");
            let mut client = history.client();
            let (mut epoch, mut cell) = (initial.epoch, initial.cell);
            let mut n = key as u64;
            while tokio::time::Instant::now() < until {
                n += 1;
                let target = if cell == CELLS[0] { CELLS[1] } else { CELLS[0] };
                let via = n % nodes() + 1;
                match move_route(&history, &mut client, via, &name, (epoch, target)).await {
                    Some(now) if now > epoch => {
                        epoch = now;
                        cell = target.to_string();
                    }
                    _ => {
                        // Unknown or stale: learn where the key is before the next move.
                        if let Some((now, at)) = lookup(&history, &mut client, via, &name).await {
                            (epoch, cell) = (now, at);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
    }
    for reader in 0..READERS {
        let history = history.clone();
        tasks.spawn(async move {
            let mut client = history.client();
            let mut n = reader as u64;
            while tokio::time::Instant::now() < until {
                n += 1;
                let key = format!("c{}", n % KEYS as u64);
                lookup(&history, &mut client, n % nodes() + 1, &key).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    // New tenants, one every half second, each until its outcome is known; and a reader that
    // looks up the newest ones and the next, before it exists.
    let created = Arc::new(AtomicU64::new(0));
    {
        let (history, created) = (history.clone(), created.clone());
        tasks.spawn(async move {
            let mut client = history.client();
            for n in 0..NEW_TENANTS {
                if tokio::time::Instant::now() >= until {
                    break;
                }
                let tenant = format!("t{n}");
                let mut via = n;
                while create_tenant(&history, &mut client, via % nodes() + 1, &tenant)
                    .await
                    .is_none()
                {
                    via += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                created.store(n + 1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    {
        let (history, created) = (history.clone(), created.clone());
        tasks.spawn(async move {
            let mut client = history.client();
            let mut n = 0u64;
            while tokio::time::Instant::now() < until {
                n += 1;
                let newest = created.load(Ordering::Relaxed);
                let tenant = format!("t{}", (newest + 1).saturating_sub(n % 3));
                let key = tenant_key(&tenant);
                lookup_route(&history, &mut client, n % nodes() + 1, (&tenant, ""), &key).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    let watcher = tokio::spawn(world::watch_leader(progress.clone()));
    while tasks.join_next().await.is_some() {}
    watcher.abort();
    // The nemesis healed everything at the end of the run: every node must now answer, and
    // with every acknowledged move.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for key in 0..KEYS {
        for via in 1..=nodes() {
            phase(&progress, format!("the final read of c{key} on n{via}"));
            let mut client = history.client();
            while lookup(&history, &mut client, via, &format!("c{key}"))
                .await
                .is_none()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for n in 0..created.load(Ordering::Relaxed) {
        let tenant = format!("t{n}");
        let key = tenant_key(&tenant);
        for via in 1..=nodes() {
            phase(&progress, format!("the final read of {tenant} on n{via}"));
            let mut client = history.client();
            while lookup_route(&history, &mut client, via, (&tenant, ""), &key)
                .await
                .is_none()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One run of `seed`: what it did, for the report.
struct Run {
    operations: usize,
    faults: usize,
    simulated: Duration,
    real: Duration,
}

fn run(seed: u64, nodes: u64) -> Run {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build_of(seed, dir.path(), RUN_FOR + Duration::from_secs(120), nodes);
    let history = Arc::new(History::default());
    let progress = Arc::new(Mutex::new(Progress::default()));
    let learned = Arc::new(Mutex::new(None));
    {
        let (history, progress, learned) = (history.clone(), progress.clone(), learned.clone());
        sim.client("clients", async move {
            clients(history, progress, learned).await;
            Ok(())
        });
    }
    let hosts: Vec<String> = (1..=nodes).map(world::host).collect();
    let mut nemesis = Nemesis::new(seed, dir.path(), hosts);
    world::drive(seed, &mut sim, &mut nemesis, &progress, RUN_FOR);
    let initial = learned
        .lock()
        .expect("learned")
        .clone()
        .expect("the clients learned the tenant's route");
    let checked = history.check(|key| (!key.starts_with("tenant ")).then(|| initial.clone()));
    let injected = nemesis.report();
    if let Err(violation) = checked {
        panic!(
            "seed {seed}: the route history is not linearizable.\nfaults:\n{}\n{violation}",
            injected.join("\n")
        );
    }
    // What a replay must repeat: every call and answer, and every fault with its instant.
    let mut events = history.trace();
    events.extend(injected);
    crate::seeds::trace(&events);
    Run {
        operations: history.len(),
        faults: nemesis.injected.len(),
        simulated: sim.elapsed(),
        real: started.elapsed(),
    }
}

/// The seeds CI runs.
const FIXED: [u64; 4] = [1, 2, 3, 4];

#[test]
fn route_moves_and_linearizable_lookups_stay_linearizable_under_the_nemesis() {
    crate::seeds::for_each(
        "routes::route_moves_and_linearizable_lookups_stay_linearizable_under_the_nemesis",
        &FIXED,
        |seed| report(seed, run(seed, 3)),
    );
}

/// The same on five nodes, where the nemesis also cuts two nodes off together (the leader
/// among them half the time): a follower then still hears from a leader without a quorum.
#[test]
fn the_route_history_stays_linearizable_on_five_nodes() {
    crate::seeds::for_each(
        "routes::the_route_history_stays_linearizable_on_five_nodes",
        // Cuts two nodes off together, the leader among them, at 17.3 s.
        &[2],
        |seed| report(seed, run(seed, 5)),
    );
}

/// Asserts that the run did enough to mean something, and prints what it did.
fn report(seed: u64, run: Run) {
    assert!(run.faults >= 5, "seed {seed}: only {} faults", run.faults);
    assert!(
        run.operations > 500,
        "seed {seed}: only {} operations",
        run.operations
    );
    eprintln!(
        "seed {seed}: {} operations, {} faults, {:.1} s simulated in {:.2} s ({:.1}x)",
        run.operations,
        run.faults,
        run.simulated.as_secs_f64(),
        run.real.as_secs_f64(),
        run.simulated.as_secs_f64() / run.real.as_secs_f64()
    );
}

/// Replaying a seed gives the same run: the same operations with the same answers in the same
/// order, and the same faults at the same instants.
#[test]
fn a_seed_replays_exactly() {
    crate::seeds::replays_exactly(
        "routes::route_moves_and_linearizable_lookups_stay_linearizable_under_the_nemesis",
        11,
        500,
    );
}
