//! Scale: the state machine at millions of tenants and overrides — memory, apply rate, snapshot
//! build and load — and, in a real cluster, snapshot transfer to a follower that missed the load,
//! and restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{CreateTenantRequest, MoveRouteRequest, Tier as ProtoTier};
use cellplane_control_plane::raft::snapshot;
use cellplane_control_plane::state::ControlState;
use cellplane_control_plane::state::command::Command;
use cellplane_control_plane::state::model::{CellState, RouteKey, Tier};
use cellplane_tests::cluster::Cluster;
use cellplane_tests::measure::rss_bytes;
use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership};

use crate::report::Report;

const CELLS: usize = 20;

/// How long a node of a large cluster may take to catch up before the benchmark gives up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(600);

/// How long a follower restarted with an empty data directory is given to rejoin.
const WIPED_LIMIT: Duration = Duration::from_secs(120);

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Errors a loader waits out: the leader busy (building a snapshot) or changing.
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

fn build_state(tenants: u64, overrides: u64) -> (ControlState, Duration, Duration) {
    let mut state = ControlState::default();
    for c in 0..CELLS {
        let cell_id: Arc<str> =
            Arc::from(format!("hz-{}-normal-{c}", (b'a' + (c % 3) as u8) as char));
        let commands = [
            Command::RegisterCell {
                cell_id: cell_id.clone(),
                region: Arc::from("cn-hangzhou"),
                zone: Arc::from(format!("zone-{}", c % 3)),
                tier: Tier::Normal,
                endpoint: Arc::from(format!("10.0.{c}.1:7000")),
                capacity: tenants,
                standby_of: None,
            },
            Command::SetCellState {
                cell_id,
                state: CellState::Active,
            },
        ];
        for command in &commands {
            state.apply(command).0.expect("cell");
        }
    }
    let started = Instant::now();
    let region: Arc<str> = Arc::from("cn-hangzhou");
    for i in 0..tenants {
        state
            .apply(&Command::CreateTenant {
                tenant_id: Arc::from(format!("tenant-{i:09}")),
                tier: Tier::Normal,
                home_region: region.clone(),
            })
            .0
            .expect("create");
    }
    let tenants_time = started.elapsed();
    let started = Instant::now();
    let cells: Vec<Arc<str>> = state.cells().keys().cloned().collect();
    for i in 0..overrides {
        let tenant = format!("tenant-{:09}", (i * 7) % tenants);
        let primary = state
            .tenants()
            .get(tenant.as_str())
            .map(|t| t.primary_cell.clone())
            .expect("tenant");
        let target = cells
            .iter()
            .find(|c| **c != primary)
            .cloned()
            .expect("other cell");
        let key = RouteKey::conversation(tenant.as_str(), format!("group-{i}").as_str());
        let epoch = state.resolve(&key).expect("route").epoch;
        state
            .apply(&Command::MoveRoute {
                key,
                expected_epoch: epoch,
                target_cell: target,
            })
            .0
            .expect("override");
    }
    (state, tenants_time, started.elapsed())
}

pub async fn run(
    report: &mut Report,
    tenants: u64,
    overrides: u64,
    cluster_tenants: u64,
    cluster_overrides: u64,
) -> anyhow::Result<()> {
    let pid = std::process::id();
    let rss_before = rss_bytes(pid).unwrap_or(0);
    let (state, tenants_time, overrides_time) =
        tokio::task::spawn_blocking(move || build_state(tenants, overrides)).await?;
    let rss_after = rss_bytes(pid).unwrap_or(0);

    let started = Instant::now();
    let cloned = state.clone();
    let clone_time = started.elapsed();
    drop(cloned);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("snapshot.snap");
    let meta = SnapshotMeta {
        last_log_id: Some(LogId::new(
            CommittedLeaderId::new(1, 1),
            tenants + overrides,
        )),
        last_membership: StoredMembership::default(),
        snapshot_id: "bench".into(),
    };
    let started = Instant::now();
    snapshot::write(&path, &meta, &state)?;
    let write_time = started.elapsed();
    let size = std::fs::metadata(&path)?.len();
    drop(state);
    let started = Instant::now();
    let (_, loaded) = snapshot::read(std::fs::File::open(&path)?)?;
    let read_time = started.elapsed();
    assert_eq!(loaded.tenants().len() as u64, tenants);
    assert_eq!(loaded.overrides().len() as u64, overrides);
    drop(loaded);

    let table = format!(
        "## Scale: state machine at {tenants} tenants and {overrides} overrides\n\n\
         Built in process by applying real commands ({CELLS} cells).\n\n\
         | measure | value |\n|---|---:|\n\
         | apply CreateTenant | {:.0} commands/s |\n\
         | apply MoveRoute (new override) | {:.0} commands/s |\n\
         | resident memory of the state | {} |\n\
         | clone for a snapshot (O(1)) | {:.3} ms |\n\
         | snapshot file | {} |\n\
         | snapshot build (write + fsync) | {} |\n\
         | snapshot load (read + index, as install and restart do) | {} |\n",
        tenants as f64 / tenants_time.as_secs_f64(),
        overrides as f64 / overrides_time.as_secs_f64().max(1e-9),
        mib(rss_after.saturating_sub(rss_before)),
        clone_time.as_secs_f64() * 1e3,
        mib(size),
        secs(write_time),
        secs(read_time),
    );

    // A real cluster: load tenants through Raft, then time snapshot transfer and restart.
    report.section(table);

    // Snapshots every 20k entries (each entry packs many commands) keep the log short, so a
    // follower that misses the load must take a snapshot.
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-after-logs",
            "20000",
            "--logs-kept-after-snapshot",
            "1000",
        ],
    )
    .await;
    cluster
        .add_cells_with_capacity(
            &[
                ("cell-a", "a", ProtoTier::Normal),
                ("cell-b", "b", ProtoTier::Normal),
            ],
            cluster_tenants,
        )
        .await;
    let leader = cluster.wait_for_leader().await;
    let followers: Vec<u64> = cluster
        .running_ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    // This follower is down for the whole load: the leader purges the log behind its
    // snapshots, so the follower can only come back by installing a snapshot.
    let lagging = followers[0];
    cluster.kill(lagging).await;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let channel = cluster.channel(leader);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut control =
                cellplane_api::proto::control::control_client::ControlClient::new(channel);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cluster_tenants {
                    return;
                }
                loop {
                    let created = control
                        .create_tenant(CreateTenantRequest {
                            tenant_id: format!("tenant-{i:09}"),
                            tier: ProtoTier::Normal as i32,
                            home_region: "hz".into(),
                        })
                        .await;
                    match created {
                        // A retry of a create that did apply the first time.
                        Ok(_) => break,
                        Err(status) if status.code() == tonic::Code::AlreadyExists => break,
                        Err(status) if retryable(&status) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(status) => panic!("create tenant failed: {status}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let load_time = started.elapsed();

    // Overrides: one hot group per tenant moved to the other cell.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let channel = cluster.channel(leader);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut control =
                cellplane_api::proto::control::control_client::ControlClient::new(channel);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cluster_overrides {
                    return;
                }
                let tenant = format!("tenant-{:09}", (i * 7) % cluster_tenants);
                // Each target is tried in turn: the one the tenant already lives on refuses.
                let mut targets = ["cell-a", "cell-b"].iter().cycle();
                loop {
                    let target = targets.next().copied().unwrap_or("cell-a");
                    let moved = control
                        .move_route(MoveRouteRequest {
                            tenant_id: tenant.clone(),
                            conversation_id: format!("group-{i}"),
                            expected_epoch: 1,
                            target_cell: target.into(),
                        })
                        .await;
                    match moved {
                        Ok(_) => break,
                        // A retry of a move that did apply the first time.
                        Err(status) if status.code() == tonic::Code::Aborted => break,
                        Err(status) if retryable(&status) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
                        Err(status) => panic!("override failed: {status}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let overrides_load_time = started.elapsed();
    let revision = cluster
        .status(leader)
        .await
        .map(|s| s.revision)
        .unwrap_or(0);
    for id in cluster.running_ids() {
        cluster
            .wait_for_revision_within(id, revision, CATCH_UP_LIMIT)
            .await;
    }
    let leader_rss = cluster.pid(leader).and_then(rss_bytes).unwrap_or(0);

    // The follower that missed the load catches up by snapshot.
    let purged = cluster
        .status(leader)
        .await
        .map(|s| s.purged_index)
        .unwrap_or(0);
    assert!(
        purged > 0,
        "the leader kept its whole log; no snapshot transfer to measure"
    );
    let started = Instant::now();
    cluster.restart(lagging);
    cluster
        .wait_for_revision_within(lagging, revision, CATCH_UP_LIMIT)
        .await;
    let transfer_time = started.elapsed();

    // A follower restarts from its own disk: snapshot load plus log replay.
    let restarted = followers[1];
    cluster.kill(restarted).await;
    let started = Instant::now();
    cluster.restart(restarted);
    cluster
        .wait_for_revision_within(restarted, revision, CATCH_UP_LIMIT)
        .await;
    let restart_time = started.elapsed();

    // A follower whose disk was lost comes back empty under its old id, behind the leader's
    // purged log. Raft assumes a voter keeps its log, so this may not work (ARCHITECTURE.md,
    // known gaps): report what happened rather than stop the run.
    let wiped = followers[0];
    cluster.kill(wiped).await;
    let data_dir = cluster.nodes[&wiped].data_dir.clone();
    std::fs::remove_dir_all(&data_dir)?;
    let started = Instant::now();
    cluster.restart(wiped);
    let mut wiped_outcome = format!("did not rejoin within {}", secs(WIPED_LIMIT));
    while started.elapsed() < WIPED_LIMIT {
        if cluster
            .status(wiped)
            .await
            .is_some_and(|s| s.revision >= revision)
        {
            wiped_outcome = secs(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    report.section(format!(
        "### In a 3-node cluster with {cluster_tenants} tenants and {cluster_overrides} overrides loaded through Raft\n\n\
         | measure | value |\n|---|---:|\n\
         | load through Control.CreateTenant, 256 clients | {:.0} tenants/s |\n\
         | load through Control.MoveRoute (new overrides), 256 clients | {:.0} overrides/s |\n\
         | leader resident memory | {} |\n\
         | follower down during the load: snapshot transfer + install + catch-up | {} |\n\
         | follower restart from its disk until caught up | {} |\n\
         | follower with a wiped data directory, restarted under its id | {} |\n",
        cluster_tenants as f64 / load_time.as_secs_f64(),
        cluster_overrides as f64 / overrides_load_time.as_secs_f64().max(1e-9),
        mib(leader_rss),
        secs(transfer_time),
        secs(restart_time),
        wiped_outcome,
    ));
    Ok(())
}
