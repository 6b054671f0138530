//! Failover: how long writes stop when a primary's machine dies, and what leases cost.
//!
//! RTO: each round starts a primary and its synchronous standby (and, for a region loss, a
//! synchronous remote standby) under agents of their own, in a region of their own so the
//! round's tenant lands on that primary, runs one writer through a `Messenger`, SIGKILLs the
//! primary's cell and agent (and, for a region loss, the in-region standby's too) and times
//! the kill to the first send acknowledged by the promoted standby. The automatic detector
//! does the rest, with the default lease (2,000 ms) and clock-drift bound (200 ms).
//!
//! PLANNED: a primary with an asynchronous standby failed over by ops under four writers; the
//! longest any send waited across it.
//!
//! Renewals: 1,000 cells registered without processes, renewed as ten agents of 100 cells
//! would (one `RenewLeases` each, every sixth of a lease), against an idle run of the same
//! cluster: the control plane's CPU and Raft entries per second.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::cell::{CellStatusRequest, ConversationKind, CreateConversationRequest};
use cellplane_api::proto::control::{
    CellState, CreateTenantRequest, FailoverCellRequest, FailoverMode, FailoverPhase,
    GetCellRequest, GetFailoverRequest, Protection, RegisterCellRequest, RenewLeasesRequest, Tier,
};
use cellplane_tests::agent::AgentProcess;
use cellplane_tests::cluster::Cluster;
use cellplane_tests::measure::{Samples, cpu_time, ms};
use cellplane_tests::system::{CELL_ARGS, switched};
use cellplane_tests::traffic::{MEMBERS, Writers, create_groups, send_request};
use nix::sys::signal::Signal;

use crate::report::Report;

/// Where a round's primary dies, and which standby takes over.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// A NORMAL primary's zone: its in-region standby.
    NormalZone,
    /// A HIGH primary's zone: its in-region standby.
    HighZone,
    /// A HIGH primary's whole region: its remote standby.
    HighRegion,
    /// A LOW primary's zone: another LOW primary of its region, for new messages.
    LowZone,
}

impl Loss {
    fn name(self) -> &'static str {
        match self {
            Self::NormalZone => "NORMAL, primary's zone lost → in-region standby",
            Self::HighZone => "HIGH, primary's zone lost → in-region standby",
            Self::HighRegion => "HIGH, primary's region lost → remote standby",
            Self::LowZone => "LOW, primary's zone lost → fallback LOW cell",
        }
    }
}

/// One round: the time from the SIGKILL to the first send the promoted standby acknowledged.
async fn round(cluster: &Cluster, routes: &Arc<RouteCache>, loss: Loss, n: usize) -> Duration {
    let endpoints = cluster.endpoints();
    let region = format!("r{n}");
    let remote_region = format!("x{n}");
    let tier = match loss {
        Loss::NormalZone => "NORMAL",
        Loss::HighZone | Loss::HighRegion => "HIGH",
        Loss::LowZone => "LOW",
    };
    let low = tier == "LOW";
    let (primary, near, far) = (
        format!("{region}-a-p"),
        format!("{region}-b-s"),
        format!("{remote_region}-a-s"),
    );
    let high = tier == "HIGH";
    let mut primary_args: Vec<&str> = CELL_ARGS.to_vec();
    if !low {
        primary_args.extend(["--sync-standby", &near]);
    }
    if high {
        primary_args.extend(["--sync-standby", &far]);
    }
    let mut primary_agent =
        AgentProcess::start(&region, &endpoints, &[(&primary, "a", tier)], &primary_args);
    let primary_addr = primary_agent.cell(&primary).addr.clone();
    // LOW: the cell in the other zone is a primary of its own, the fallback.
    let mut near_agent = if low {
        AgentProcess::start(&region, &endpoints, &[(&near, "b", tier)], CELL_ARGS)
    } else {
        AgentProcess::start_following(
            &region,
            &endpoints,
            &[(&near, "b", tier)],
            &[(&near, &primary, &primary_addr)],
            CELL_ARGS,
        )
    };
    let mut far_agent = high.then(|| {
        AgentProcess::start_following(
            &remote_region,
            &endpoints,
            &[(&far, "a", tier)],
            &[(&far, &primary, &primary_addr)],
            CELL_ARGS,
        )
    });
    let leader = cluster.wait_for_leader().await;
    let mut control = cluster.control(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = if low {
            let mut active = true;
            for cell_id in [&primary, &near] {
                active &= control
                    .get_cell(GetCellRequest {
                        cell_id: cell_id.clone(),
                    })
                    .await
                    .is_ok_and(|c| c.into_inner().state == CellState::Active as i32);
            }
            active
        } else {
            control
                .get_cell(GetCellRequest {
                    cell_id: primary.clone(),
                })
                .await
                .is_ok_and(|c| c.into_inner().protection == Protection::InSync as i32)
        };
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "{primary} never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tenant = format!("tenant-{n}");
    control
        .create_tenant(CreateTenantRequest {
            tenant_id: tenant.clone(),
            tier: match tier {
                "HIGH" => Tier::High,
                "LOW" => Tier::Low,
                _ => Tier::Normal,
            } as i32,
            home_region: region.clone(),
        })
        .await
        .expect("create tenant");
    let messenger = Arc::new(Messenger::new(
        routes.clone(),
        MessengerOptions {
            deadline: Duration::from_secs(30),
            ..MessengerOptions::default()
        },
    ));
    create_groups(&messenger, &tenant, 1).await;

    // One writer, back to back; it notes when the promoted standby (the fallback) first
    // acknowledges. A fallback does not know the conversation: the writer creates it again,
    // as a LOW tenant's front end would.
    let promoted = match loss {
        Loss::HighRegion => far.clone(),
        Loss::NormalZone | Loss::HighZone | Loss::LowZone => near.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (messenger, stop, tenant, promoted) = (
            messenger.clone(),
            stop.clone(),
            tenant.clone(),
            promoted.clone(),
        );
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let answer = messenger
                    .send_message(send_request(
                        &tenant,
                        "c0",
                        "u0",
                        &format!("m{sent}"),
                        b"rto".to_vec(),
                    ))
                    .await;
                let answer = match answer {
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        create_group(&messenger, &tenant).await;
                        continue;
                    }
                    answer => answer.expect("every send is acknowledged"),
                };
                sent += 1;
                if answer.message_id.starts_with(&format!("{promoted}/")) {
                    return Instant::now();
                }
            }
            Instant::now()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary_agent.signal_cell(&primary, Signal::SIGKILL);
    primary_agent.kill().await;
    if let Loss::HighRegion = loss {
        near_agent.signal_cell(&near, Signal::SIGKILL);
        near_agent.kill().await;
    }
    let killed = Instant::now();
    let resumed = writer.await.expect("writer");
    stop.store(true, Ordering::Relaxed);
    let rto = resumed.saturating_duration_since(killed);
    near_agent.kill().await;
    if let Some(far_agent) = far_agent.as_mut() {
        far_agent.kill().await;
    }
    rto
}

/// Group `c0` of the tenant again, on a fallback that does not know it.
async fn create_group(messenger: &Messenger, tenant: &str) {
    let created = messenger
        .create_conversation(CreateConversationRequest {
            tenant_id: tenant.into(),
            conversation_id: "c0".into(),
            kind: ConversationKind::Group as i32,
            member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
            route_epoch: 0,
        })
        .await;
    if let Err(status) = created {
        assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    }
}

/// One PLANNED failover of a primary with an asynchronous standby under four writers: (the
/// longest a send waited across it, FREEZING → switch by the leader's clock).
async fn planned_round(
    cluster: &Cluster,
    routes: &Arc<RouteCache>,
    n: usize,
) -> (Duration, Duration) {
    let endpoints = cluster.endpoints();
    let region = format!("p{n}");
    let (primary, standby) = (format!("{region}-a-p"), format!("{region}-b-s"));
    let mut primary_agent =
        AgentProcess::start(&region, &endpoints, &[(&primary, "a", "NORMAL")], CELL_ARGS);
    let primary_addr = primary_agent.cell(&primary).addr.clone();
    let mut standby_agent = AgentProcess::start_following(
        &region,
        &endpoints,
        &[(&standby, "b", "NORMAL")],
        &[(&standby, &primary, &primary_addr)],
        CELL_ARGS,
    );
    let mut admin = standby_agent.cell(&standby).admin();
    let leader = cluster.wait_for_leader().await;
    let mut control = cluster.control(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let following = admin
            .cell_status(CellStatusRequest { without_keys: true })
            .await
            .ok()
            .and_then(|s| s.into_inner().replica)
            .is_some_and(|r| r.connected && !r.bootstrapping);
        let active = control
            .get_cell(GetCellRequest {
                cell_id: standby.clone(),
            })
            .await
            .is_ok_and(|c| c.into_inner().state == CellState::Active as i32);
        if following && active {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{standby} never followed {primary}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tenant = format!("planned-{n}");
    control
        .create_tenant(CreateTenantRequest {
            tenant_id: tenant.clone(),
            tier: Tier::Normal as i32,
            home_region: region.clone(),
        })
        .await
        .expect("create tenant");
    let messenger = Arc::new(Messenger::new(routes.clone(), MessengerOptions::default()));
    create_groups(&messenger, &tenant, 2).await;
    let writers = Writers::start(messenger, &tenant, "planned", 4, 2);
    writers.let_write(200).await;
    writers.take_latencies();
    let started = control
        .failover_cell(FailoverCellRequest {
            cell_id: primary.clone(),
            mode: FailoverMode::Planned as i32,
            reason: "bench".into(),
        })
        .await
        .expect("planned failover")
        .into_inner();
    let failover = loop {
        let now = control
            .get_failover(GetFailoverRequest {
                failover_id: started.failover_id.clone(),
            })
            .await
            .expect("get failover")
            .into_inner();
        if switched(&now) {
            break now;
        }
        assert_ne!(now.phase, FailoverPhase::RolledBack as i32, "{now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    writers.let_write(100).await;
    let mut latencies = writers.take_latencies();
    writers.stop().await;
    primary_agent.kill().await;
    standby_agent.kill().await;
    (
        latencies.percentile(100.0),
        Duration::from_millis(failover.switched_ms.saturating_sub(failover.frozen_ms)),
    )
}

/// The control plane's CPU over `window`, summed over its nodes.
async fn cpu_over(
    cluster: &Cluster,
    window: Duration,
    during: impl Future<Output = ()>,
) -> Duration {
    let pids: Vec<u32> = cluster
        .running_ids()
        .into_iter()
        .filter_map(|id| cluster.pid(id))
        .collect();
    let spent = |pids: &[u32]| pids.iter().filter_map(|&p| cpu_time(p)).sum::<Duration>();
    let before = spent(&pids);
    tokio::select! {
        () = during => {}
        () = tokio::time::sleep(window) => {}
    }
    spent(&pids).saturating_sub(before)
}

async fn log_index(cluster: &Cluster) -> u64 {
    let leader = cluster.wait_for_leader().await;
    cluster
        .status(leader)
        .await
        .map(|s| s.last_log_index)
        .unwrap_or(0)
}

/// Renewals of `cells` cells by agents of `per_agent` each, for `window`: (CPU spent by the
/// control plane, Raft entries appended, renewals granted); with no cells, the idle baseline.
async fn renewals(
    cluster: &Cluster,
    cells: usize,
    per_agent: usize,
    window: Duration,
) -> (Duration, u64, u64) {
    let ids: Vec<String> = (0..cells).map(|i| format!("lease-{i:04}")).collect();
    let granted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let lease = Duration::from_millis(2_000);
    let leader = cluster.wait_for_leader().await;
    let agents: Vec<_> = ids
        .chunks(per_agent.max(1))
        .map(|chunk| {
            let (mut control, chunk, granted, stop) = (
                cluster.control(leader),
                chunk.to_vec(),
                granted.clone(),
                stop.clone(),
            );
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(answer) = control
                        .renew_leases(RenewLeasesRequest {
                            cell_ids: chunk.clone(),
                        })
                        .await
                    {
                        granted
                            .fetch_add(answer.into_inner().granted.len() as u64, Ordering::Relaxed);
                    }
                    tokio::time::sleep(lease / 6).await;
                }
            }
        })
        .collect();
    let first = log_index(cluster).await;
    let running = async {
        futures::future::join_all(agents).await;
    };
    let stopper = {
        let stop = stop.clone();
        async move {
            tokio::time::sleep(window).await;
            stop.store(true, Ordering::Relaxed);
        }
    };
    let cpu = cpu_over(cluster, window + Duration::from_secs(1), async {
        tokio::join!(running, stopper);
    })
    .await;
    let entries = log_index(cluster).await.saturating_sub(first);
    (cpu, entries, granted.load(Ordering::Relaxed))
}

pub async fn run(
    report: &mut Report,
    rounds: usize,
    planned: usize,
    window: Duration,
) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await;
    let routes =
        Arc::new(RouteCache::start(cluster.endpoints(), RouteCacheOptions::default()).await?);
    let mut text = format!(
        "## Failover\n\n\
         RTO: {rounds} FORCED failovers per row, each started by the failure detector (lease \
         2,000 ms, clock-drift bound 200 ms, renewals every 333 ms). A round runs a primary \
         and its synchronous standby (for HIGH also a synchronous remote standby) under agents \
         of their own, one writer sending back to back through a `Messenger`, and SIGKILLs the \
         primary's cell and agent (for a region loss, the in-region standby's too); the RTO is \
         the time from the kill to the first send the promoted standby acknowledged. A LOW \
         primary has no standby: its round runs another LOW primary in another zone of the \
         region, and the RTO is the time to the first send that fallback acknowledged (the \
         writer creates the conversation again there, since the fallback has none of its \
         history).\n\n\
         | loss | failovers | p50 ms | p90 ms | p99 ms | max ms |\n\
         |---|---:|---:|---:|---:|---:|\n"
    );
    let mut n = 0;
    for loss in [
        Loss::NormalZone,
        Loss::HighZone,
        Loss::HighRegion,
        Loss::LowZone,
    ] {
        let mut samples = Samples::default();
        for _ in 0..rounds {
            let rto = round(&cluster, &routes, loss, n).await;
            eprintln!("{} round {n}: {}", loss.name(), ms(rto));
            samples.record(rto);
            n += 1;
        }
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            loss.name(),
            samples.len(),
            ms(samples.percentile(50.0)),
            ms(samples.percentile(90.0)),
            ms(samples.percentile(99.0)),
            ms(samples.percentile(100.0)),
        ));
    }
    let mut waited = Samples::default();
    let mut frozen = Samples::default();
    for n in 0..planned {
        let (longest, pause) = planned_round(&cluster, &routes, n).await;
        eprintln!(
            "planned round {n}: slowest send {}, frozen → switch {}",
            ms(longest),
            ms(pause)
        );
        waited.record(longest);
        frozen.record(pause);
    }
    text.push_str(&format!(
        "\nPLANNED: {planned} failovers of a NORMAL primary with an asynchronous standby under \
         four writers (back to back, two groups): the primary freezes every key, the standby \
         catches up to the frozen LSN, the keys switch and the standby is promoted. The pause \
         is the longest any send waited across the failover, and FREEZING → switch by the \
         leader's clock.\n\n\
         | pause | p50 ms | p90 ms | p99 ms | max ms |\n\
         |---|---:|---:|---:|---:|\n\
         | slowest send | {} | {} | {} | {} |\n\
         | frozen → switched | {} | {} | {} | {} |\n",
        ms(waited.percentile(50.0)),
        ms(waited.percentile(90.0)),
        ms(waited.percentile(99.0)),
        ms(waited.percentile(100.0)),
        ms(frozen.percentile(50.0)),
        ms(frozen.percentile(90.0)),
        ms(frozen.percentile(99.0)),
        ms(frozen.percentile(100.0)),
    ));
    drop(routes);
    drop(cluster);

    let cluster = Cluster::start(3, &[]).await;
    let leader = cluster.wait_for_leader().await;
    let mut control = cluster.control(leader);
    for i in 0..1_000 {
        control
            .register_cell(RegisterCellRequest {
                cell_id: format!("lease-{i:04}"),
                region: format!("r{}", i / 100),
                zone: "a".into(),
                tier: Tier::Low as i32,
                endpoint: format!("127.0.0.1:{}", 30_000 + i),
                capacity: 10,
                standby_of: String::new(),
            })
            .await?;
    }
    let (idle_cpu, idle_entries, _) = renewals(&cluster, 0, 100, window).await;
    let (cpu, entries, granted) = renewals(&cluster, 1_000, 100, window).await;
    let seconds = window.as_secs_f64();
    let core = |spent: Duration| spent.as_secs_f64() / (seconds + 1.0) * 100.0;
    text.push_str(&format!(
        "\nRenewals: 1,000 cells registered without processes, renewed as ten agents of 100 \
         cells each would (one `RenewLeases` per agent every 333 ms) for {seconds:.0} s, \
         beside the same cluster idle for as long.\n\n\
         | load | renewals/s | Raft entries/s | control-plane CPU, % of one core (3 nodes) |\n\
         |---|---:|---:|---:|\n\
         | idle | 0 | {:.1} | {:.1} |\n\
         | 1,000 cells | {:.0} | {:.1} | {:.1} |\n\n\
         The renewals' own cost: {:.1}% of one core for 1,000 cells.\n",
        idle_entries as f64 / seconds,
        core(idle_cpu),
        granted as f64 / seconds,
        entries as f64 / seconds,
        core(cpu),
        core(cpu) - core(idle_cpu),
    ));
    report.section(text);
    Ok(())
}
