//! `cellplane dev --demo`: what the system does, shown on the running system. It creates a
//! tenant of each tier, keeps writers sending to a NORMAL tenant's groups, moves that tenant
//! to its region's other NORMAL cell and then one of its groups back, and prints each phase as
//! it happens, the write pause the coordinator measured and the longest wait any writer saw.
//! Then the tenant's cell hangs (SIGSTOP: a machine its agent cannot restart): its lease runs
//! out, the control plane fails it over to its standby, and the demo prints the time until
//! the standby acknowledged the first send and the failover's RPO ledger.

use cellplane_api::tls::Tls;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::cell::messaging_client::MessagingClient;
use cellplane_api::proto::cell::{ConversationKind, CreateConversationRequest, SendMessageRequest};
use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{
    CreateTenantRequest, FailoverPhase, GetCellRequest, ListFailoversRequest,
    MigrateConversationRequest, MigrateTenantRequest, Migration, MigrationPhase, Tier,
    WatchMigrationRequest,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;
use tonic::transport::Channel;

const TENANTS: [(&str, Tier, &str); 3] = [
    ("demo-high", Tier::High, "cn-hangzhou"),
    ("demo-normal", Tier::Normal, "cn-hangzhou"),
    ("demo-low", Tier::Low, "cn-beijing"),
];
use super::CONNECT_TIMEOUT;

const MOVING: &str = "demo-normal";
const GROUPS: usize = 8;
const WRITERS: usize = 8;
/// Each writer sends as its own member, so no sender goes past the cell's per-sender rate limit.
const MEMBERS: [&str; WRITERS] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

/// Writers that keep sending until stopped, keeping count and the longest wait.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    /// When each cell (named by the message ids it assigns) first acknowledged a send.
    first_ack: Arc<Mutex<HashMap<String, Instant>>>,
    failed: Arc<AtomicU64>,
    /// The first failure, to say what went wrong.
    first_failure: Arc<Mutex<Option<String>>>,
    /// Microseconds.
    slowest: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(messenger: Arc<Messenger>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first_failure = Arc::new(Mutex::new(None));
        let slowest = Arc::new(AtomicU64::new(0));
        let first_ack: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let run = std::process::id();
        let tasks = (0..WRITERS)
            .map(|w| {
                let (messenger, stop, sent, failed, slowest) = (
                    messenger.clone(),
                    stop.clone(),
                    sent.clone(),
                    failed.clone(),
                    slowest.clone(),
                );
                let first_failure = first_failure.clone();
                let first_ack = first_ack.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = messenger
                            .send_message(SendMessageRequest {
                                tenant_id: MOVING.into(),
                                conversation_id: format!("group-{}", (w + n as usize) % GROUPS),
                                sender_id: MEMBERS[w].into(),
                                client_msg_id: format!("demo-{run}-{w}-{n}"),
                                body: format!("hello #{n} from writer {w}").into_bytes(),
                                receiver_ids: Vec::new(),
                                route_epoch: 0,
                                client_type: "demo".into(),
                                app_id: "cellplane-dev".into(),
                                ..Default::default()
                            })
                            .await;
                        let waited = started.elapsed().as_micros() as u64;
                        slowest.fetch_max(waited, Ordering::Relaxed);
                        match result {
                            Ok(answer) => {
                                sent.fetch_add(1, Ordering::Relaxed);
                                let cell = answer.message_id.split('/').next().unwrap_or_default();
                                first_ack
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .entry(cell.to_string())
                                    .or_insert_with(Instant::now);
                            }
                            Err(err) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut first =
                                    first_failure.lock().unwrap_or_else(|e| e.into_inner());
                                first.get_or_insert_with(|| err.to_string());
                            }
                        }
                        n += 1;
                        // A steady, moderate load: under 50 sends a second per writer, half the
                        // cell's default per-sender limit.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            first_ack,
            failed,
            first_failure,
            slowest,
            tasks,
        }
    }

    /// Resets the longest wait, to measure one migration.
    fn reset_slowest(&self) {
        self.slowest.store(0, Ordering::Relaxed);
    }

    fn slowest_ms(&self) -> f64 {
        self.slowest.load(Ordering::Relaxed) as f64 / 1e3
    }

    /// When `cell` first acknowledged a send.
    fn first_ack_on(&self, cell: &str) -> Option<Instant> {
        self.first_ack
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cell)
            .copied()
    }

    /// Stops the writers; answers the sends acknowledged, failed, and the first failure.
    async fn stop(self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let first = self
            .first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first,
        )
    }
}

fn phase_name(m: &Migration) -> &'static str {
    MigrationPhase::try_from(m.phase)
        .map(|p| p.as_str_name().trim_start_matches("MIGRATION_PHASE_"))
        .unwrap_or("?")
}

/// Prints each phase of a migration as it happens; answers its last state.
async fn follow(
    control: &mut ControlClient<Channel>,
    migration: Migration,
) -> Result<Migration, String> {
    let started = Instant::now();
    let mut stream = control
        .watch_migration(WatchMigrationRequest {
            migration_id: migration.migration_id.clone(),
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    let mut last = migration;
    let mut shown = String::new();
    while let Some(m) = stream.message().await.map_err(|s| s.to_string())? {
        let phase = phase_name(&m);
        if phase != shown {
            println!(
                "    {:>7.1} ms  {:<12} copied LSN {:>8}, source LSN {:>8}",
                started.elapsed().as_secs_f64() * 1e3,
                phase,
                m.copied_lsn,
                m.source_lsn
            );
            shown = phase.to_string();
        }
        last = m;
    }
    Ok(last)
}

fn report(m: &Migration, traffic: &Traffic) -> Result<(), String> {
    if phase_name(m) != "DONE" {
        return Err(format!(
            "migration {} ended {}: {}",
            m.migration_id,
            phase_name(m),
            m.error
        ));
    }
    println!(
        "    write pause (FREEZING → SWITCHING): {} ms by the coordinator's clock; the slowest send waited {:.1} ms",
        m.switched_ms.saturating_sub(m.frozen_ms),
        traffic.slowest_ms()
    );
    Ok(())
}

/// The process of the cell serving on `endpoint`: the dev system's, found by its command line.
fn cell_process(cell_id: &str, endpoint: &str) -> Result<Pid, String> {
    let needle = format!("--cell-id\0{cell_id}\0--listen\0{endpoint}\0");
    let entries = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            return Ok(Pid::from_raw(pid));
        }
    }
    Err(format!(
        "no process of cell {cell_id} serving on {endpoint}"
    ))
}

/// Hangs the moving tenant's cell until the control plane has failed it over; prints how long
/// writes waited and the RPO ledger, then wakes the old primary to show it takes no writes.
async fn fail_over(
    control: &mut ControlClient<Channel>,
    (routes, tls): (&RouteCache, &Tls),
    traffic: &Traffic,
) -> Result<(), String> {
    let route = routes
        .lookup(MOVING, "group-1")
        .ok_or("the moving tenant has no route")?;
    let cell = control
        .get_cell(GetCellRequest {
            cell_id: route.cell_id.clone(),
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    if cell.standbys.is_empty() {
        println!(
            "demo: {} has no standby (a previous demo failed it over): no failover this time",
            route.cell_id
        );
        return Ok(());
    }
    let pid = cell_process(&route.cell_id, &route.endpoint)?;
    println!(
        "demo: {} hangs (SIGSTOP): its agent can no longer renew its lease",
        route.cell_id
    );
    kill(pid, Signal::SIGSTOP).map_err(|e| format!("SIGSTOP {pid}: {e}"))?;
    let hung = Instant::now();
    let deadline = hung + Duration::from_secs(30);
    let failover = loop {
        let failovers = control
            .list_failovers(ListFailoversRequest { active_only: false })
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .failovers;
        let done = failovers.into_iter().rev().find(|f| {
            f.cell_id == route.cell_id
                && [FailoverPhase::Done as i32, FailoverPhase::Merged as i32].contains(&f.phase)
        });
        if let Some(done) = done
            && traffic.first_ack_on(&done.standby_cell).is_some()
        {
            break done;
        }
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGCONT);
            return Err(format!("{} was not failed over within 30 s", route.cell_id));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let resumed = traffic
        .first_ack_on(&failover.standby_cell)
        .map_or(Duration::ZERO, |at| at.saturating_duration_since(hung));
    let ledger = failover.ledger.unwrap_or_default();
    println!(
        "    {} : {} → {} ({}), {} keys moved at epoch + 1",
        failover.failover_id,
        failover.cell_id,
        failover.standby_cell,
        failover.reason,
        failover.keys_moved
    );
    println!(
        "    writes resumed on {} {:.0} ms after the hang; the slowest send waited {:.1} ms",
        failover.standby_cell,
        resumed.as_secs_f64() * 1e3,
        traffic.slowest_ms()
    );
    println!(
        "    RPO ledger: primary LSN {}, standby had {}, {} → {} LSNs possibly lost",
        ledger.primary_lsn,
        ledger.standby_lsn,
        if ledger.in_sync {
            "IN_SYNC"
        } else {
            "not in sync"
        },
        ledger.lsns_behind
    );
    kill(pid, Signal::SIGCONT).map_err(|e| format!("SIGCONT {pid}: {e}"))?;
    let mut old = MessagingClient::new(
        tls.connect(&route.endpoint, CONNECT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?,
    );
    let refused = old
        .send_message(SendMessageRequest {
            tenant_id: MOVING.into(),
            conversation_id: "group-1".into(),
            sender_id: MEMBERS[0].into(),
            client_msg_id: format!("demo-late-{}", std::process::id()),
            body: b"a write to the old primary".to_vec(),
            route_epoch: route.epoch,
            client_type: "demo".into(),
            app_id: "cellplane-dev".into(),
            ..Default::default()
        })
        .await;
    match refused {
        Err(status) => println!(
            "    {} woke up and refuses writes: {:?} {}",
            failover.cell_id,
            status.code(),
            status.message()
        ),
        Ok(_) => {
            return Err(format!(
                "{} took a write after it was failed over",
                failover.cell_id
            ));
        }
    }
    Ok(())
}

/// Runs the demo against the dev system at `control_plane`.
pub async fn run(control_plane: &[String], tls: &Tls) -> Result<(), String> {
    let endpoint = control_plane.first().ok_or("no control-plane endpoint")?;
    let mut control = ControlClient::new(
        tls.connect(endpoint, CONNECT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?,
    );
    println!("demo: tenants");
    for (tenant_id, tier, region) in TENANTS {
        let placed = control
            .create_tenant(CreateTenantRequest {
                tenant_id: tenant_id.into(),
                tier: tier as i32,
                home_region: region.into(),
            })
            .await;
        match placed {
            Ok(t) => println!(
                "    {tenant_id:<12} {:<7} placed on {}",
                tier.as_str_name(),
                t.into_inner().primary_cell
            ),
            Err(s) if s.code() == Code::AlreadyExists => {
                println!("    {tenant_id:<12} exists already (a second demo run)")
            }
            Err(s) => return Err(format!("create {tenant_id}: {s}")),
        }
    }
    let routes = Arc::new(
        RouteCache::start(
            control_plane.to_vec(),
            RouteCacheOptions {
                tls: tls.clone(),
                ..RouteCacheOptions::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    let messenger = Arc::new(Messenger::new(
        routes.clone(),
        MessengerOptions {
            tls: tls.clone(),
            ..MessengerOptions::default()
        },
    ));
    for g in 0..GROUPS {
        let created = messenger
            .create_conversation(CreateConversationRequest {
                tenant_id: MOVING.into(),
                conversation_id: format!("group-{g}"),
                kind: ConversationKind::Group as i32,
                member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
                route_epoch: 0,
            })
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(format!("create group-{g}: {s}")),
        }
    }
    let source = routes
        .lookup(MOVING, "")
        .ok_or("the moving tenant has no route")?
        .cell_id;
    println!("demo: {WRITERS} writers send to {GROUPS} groups of {MOVING} (on {source})");
    let traffic = Traffic::start(messenger.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!("demo: moving tenant {MOVING} to another NORMAL cell of its region, history first");
    traffic.reset_slowest();
    let migration = control
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: MOVING.into(),
            target_cell: String::new(),
        })
        .await
        .map_err(|s| format!("migrate {MOVING}: {s}"))?
        .into_inner();
    println!(
        "    {} : {} → {} (epoch {} → {})",
        migration.migration_id,
        migration.source_cell,
        migration.target_cell,
        migration.source_epoch,
        migration.source_epoch + 1
    );
    let done = follow(&mut control, migration).await?;
    report(&done, &traffic)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("demo: moving group-0 alone back to {source} (a hot group gets its own route)");
    traffic.reset_slowest();
    let migration = control
        .migrate_conversation(MigrateConversationRequest {
            tenant_id: MOVING.into(),
            conversation_id: "group-0".into(),
            target_cell: source.clone(),
        })
        .await
        .map_err(|s| format!("migrate group-0: {s}"))?
        .into_inner();
    println!(
        "    {} : {} → {}",
        migration.migration_id, migration.source_cell, migration.target_cell
    );
    let done = follow(&mut control, migration).await?;
    report(&done, &traffic)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    fail_over(&mut control, (&routes, tls), &traffic).await?;

    let (sent, failed, first_failure) = traffic.stop().await;
    println!(
        "demo: {sent} messages acknowledged, {failed} failed; {MOVING} is on {}, group-0 on {}",
        routes
            .lookup(MOVING, "group-1")
            .map(|r| r.cell_id)
            .unwrap_or_default(),
        routes
            .lookup(MOVING, "group-0")
            .map(|r| r.cell_id)
            .unwrap_or_default()
    );
    if failed > 0 {
        return Err(format!(
            "{failed} sends failed during the migrations; the first: {}",
            first_failure.unwrap_or_default()
        ));
    }
    Ok(())
}
