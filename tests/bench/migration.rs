//! Migration: how fast a tenant's history copies (messages/s and MB/s, for a tenant of a
//! million messages), how long the target takes to catch up with writers still sending, and
//! the write pause (FREEZING → SWITCHING) over many migrations under load — by the
//! coordinator's clock and as the slowest writer saw it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellplane_api::client::Messenger;
use cellplane_api::proto::control::{
    MigrateTenantRequest, Migration, MigrationPhase, Tier, WatchMigrationRequest,
};
use cellplane_tests::measure::{Samples, ms};
use cellplane_tests::system::System;
use cellplane_tests::traffic::{MEMBERS, Writers, conversation, create_groups, send_request};

use crate::report::Report;

const CELLS: [&str; 2] = ["hz-a-normal-1", "hz-b-normal-2"];
const BULK: &str = "bulk";
const BULK_GROUPS: usize = 1_000;
const FILL_SENDERS: usize = 64;
const BODY_BYTES: usize = 200;
const PAUSE_GROUPS: usize = 2;
const PAUSE_WRITERS: usize = 2;
const PAUSE_PACE: Duration = Duration::from_millis(50);

/// When each phase was first seen, by the bench's clock.
async fn follow(
    system: &System,
    start: &Migration,
) -> anyhow::Result<(Migration, BTreeMap<i32, Instant>)> {
    let leader = system.cluster.wait_for_leader().await;
    let mut stream = system
        .cluster
        .control(leader)
        .watch_migration(WatchMigrationRequest {
            migration_id: start.migration_id.clone(),
        })
        .await?
        .into_inner();
    let mut seen = BTreeMap::new();
    let mut last = start.clone();
    while let Some(m) = stream.message().await? {
        seen.entry(m.phase).or_insert_with(Instant::now);
        last = m;
    }
    Ok((last, seen))
}

async fn migrate(system: &System, tenant: &str, to: &str) -> anyhow::Result<Migration> {
    let leader = system.cluster.wait_for_leader().await;
    Ok(system
        .cluster
        .control(leader)
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: tenant.into(),
            target_cell: to.into(),
        })
        .await?
        .into_inner())
}

/// When each phase began, relative to the request: where a slow migration spent its time.
fn phase_times(begun: Instant, seen: &BTreeMap<i32, Instant>) -> String {
    seen.iter()
        .map(|(phase, at)| {
            let name = MigrationPhase::try_from(*phase)
                .map(|p| p.as_str_name().trim_start_matches("MIGRATION_PHASE_"))
                .unwrap_or("?");
            format!("{name} at {} ms", ms(at.duration_since(begun)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends `total` messages into the bulk tenant's groups from [`FILL_SENDERS`] senders.
async fn fill(messenger: &Arc<Messenger>, total: u64) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..FILL_SENDERS)
        .map(|s| {
            let (messenger, next) = (messenger.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return;
                    }
                    let group = conversation(n as usize % BULK_GROUPS);
                    messenger
                        .send_message(send_request(
                            BULK,
                            &group,
                            MEMBERS[s % MEMBERS.len()],
                            &format!("fill-{n}"),
                            vec![b'x'; BODY_BYTES],
                        ))
                        .await
                        .expect("fill send");
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

pub async fn run(report: &mut Report, messages: u64, migrations: usize) -> anyhow::Result<()> {
    let system = System::start(&[(
        "hz",
        &[(CELLS[0], "a", "NORMAL"), (CELLS[1], "b", "NORMAL")],
    )])
    .await;
    let (_, messenger) = system.messenger().await;

    // Copy and catch-up of a large tenant, with writers still sending.
    let home = system.create_tenant(BULK, Tier::Normal, "hz").await;
    create_groups(&messenger, BULK, BULK_GROUPS).await;
    eprintln!("migration: filling {BULK} with {messages} messages");
    let fill_rate = fill(&messenger, messages).await;
    let writers = Writers::start(messenger.clone(), BULK, "copy", 8, BULK_GROUPS);
    writers.let_write(200).await;
    let other = if home == CELLS[0] { CELLS[1] } else { CELLS[0] };
    let started = migrate(&system, BULK, other).await?;
    let (done, seen) = follow(&system, &started).await?;
    writers.let_write(100).await;
    let (acks, _) = writers.stop().await;
    anyhow::ensure!(
        done.phase == MigrationPhase::Done as i32,
        "the bulk migration ended {:?}: {}",
        done.phase,
        done.error
    );
    let at = |phase: MigrationPhase| seen.get(&(phase as i32)).copied();
    let (Some(copying), Some(catching_up), Some(freezing), Some(cleanup), Some(finished)) = (
        at(MigrationPhase::Copying),
        at(MigrationPhase::CatchingUp),
        at(MigrationPhase::Freezing),
        at(MigrationPhase::Cleanup),
        at(MigrationPhase::Done),
    ) else {
        anyhow::bail!("a phase of the bulk migration was not seen: {seen:?}");
    };
    let copy = catching_up.duration_since(copying);
    let catch_up = freezing.duration_since(catching_up);
    let purge = finished.duration_since(cleanup);
    let copied_messages = messages as f64;
    let text = format!(
        "## Migration\n\n\
         A 3-node control plane and one agent running two NORMAL cells (release build, loopback). \
         The tenant holds {messages} messages of {BODY_BYTES} bytes in {BULK_GROUPS} groups, \
         written at {fill_rate:.0} sends/s by {FILL_SENDERS} senders; 8 writers keep sending to \
         it while it moves ({} sends during the move, all acknowledged).\n\n\
         | tenant size | snapshot copy | messages/s | MB/s | rows copied | catch-up (CATCHING_UP → FREEZING) | pause | source purge (CLEANUP) |\n\
         |---|---|---|---|---|---|---|---|\n\
         | {messages} messages, {:.1} MB | {:.2} s | {:.0} | {:.1} | {} | {} ms | {} ms | {:.2} s |\n",
        acks.len(),
        done.bytes_copied as f64 / 1e6,
        copy.as_secs_f64(),
        copied_messages / copy.as_secs_f64(),
        done.bytes_copied as f64 / 1e6 / copy.as_secs_f64(),
        done.rows_copied,
        ms(catch_up),
        done.switched_ms.saturating_sub(done.frozen_ms),
        purge.as_secs_f64(),
    );

    report.section(text);

    // The write pause over many migrations, each of another small tenant, under steady load on
    // all of them.
    let tenants: Vec<String> = (0..migrations).map(|i| format!("pause-{i}")).collect();
    let mut writers = Vec::new();
    for tenant in &tenants {
        system.create_tenant(tenant, Tier::Normal, "hz").await;
        create_groups(&messenger, tenant, PAUSE_GROUPS).await;
        writers.push(Writers::start_paced(
            messenger.clone(),
            tenant,
            "pause",
            PAUSE_WRITERS,
            PAUSE_GROUPS,
            PAUSE_PACE,
        ));
    }
    for w in &writers {
        w.let_write(20).await;
    }
    let mut coordinator = Samples::default();
    let mut slowest_send = Samples::default();
    let mut whole = Samples::default();
    let mut outside = Samples::default();
    let mut slowest_migration: Option<(Duration, String)> = None;
    for (i, tenant) in tenants.iter().enumerate() {
        let on = messenger
            .owner(tenant, "")
            .map_err(|s| anyhow::anyhow!("{s}"))?
            .0
            .cell_id;
        let to = if on == CELLS[0] { CELLS[1] } else { CELLS[0] };
        for w in &writers {
            outside.merge(w.take_latencies());
        }
        let begun = Instant::now();
        let started = migrate(&system, tenant, to).await?;
        let (done, seen) = follow(&system, &started).await?;
        let took = begun.elapsed();
        whole.record(took);
        if slowest_migration.as_ref().is_none_or(|(t, _)| took > *t) {
            slowest_migration = Some((took, phase_times(begun, &seen)));
        }
        anyhow::ensure!(
            done.phase == MigrationPhase::Done as i32,
            "migration {i} ended {:?}: {}",
            done.phase,
            done.error
        );
        coordinator.record(Duration::from_millis(
            done.switched_ms.saturating_sub(done.frozen_ms),
        ));
        let mut window = writers[i].take_latencies();
        slowest_send.record(window.percentile(100.0));
    }
    let mut sends = 0;
    for w in writers {
        let (acks, rest) = w.stop().await;
        sends += acks.len();
        outside.merge(rest);
    }
    let (_, breakdown) = slowest_migration.unwrap_or_default();
    report.section(format!(
        "{migrations} migrations, each of another tenant of {PAUSE_GROUPS} groups to the other \
         cell, while {PAUSE_WRITERS} writers per tenant send to each ({} writers, one send every \
         {} ms each; {} sends, every one acknowledged; send latency outside the migrations p50 \
         {} ms, p99 {} ms, max {} ms). The slowest migration: {breakdown}. The pause by the \
         coordinator's clock is FREEZING entered → route switched; the slowest send is the \
         longest any writer of the moving tenant waited for one send during its migration (it \
         includes the retry after a frozen answer and the route cache catching up).\n\n\
         | measure | p50 | p99 | max |\n|---|---|---|---|\n\
         | write pause, coordinator (ms) | {} | {} | {} |\n\
         | slowest send per migration (ms) | {} | {} | {} |\n\
         | whole migration, request → DONE (ms) | {} | {} | {} |\n",
        migrations * PAUSE_WRITERS,
        PAUSE_PACE.as_millis(),
        sends,
        ms(outside.percentile(50.0)),
        ms(outside.percentile(99.0)),
        ms(outside.percentile(100.0)),
        ms(coordinator.percentile(50.0)),
        ms(coordinator.percentile(99.0)),
        ms(coordinator.percentile(100.0)),
        ms(slowest_send.percentile(50.0)),
        ms(slowest_send.percentile(99.0)),
        ms(slowest_send.percentile(100.0)),
        ms(whole.percentile(50.0)),
        ms(whole.percentile(99.0)),
        ms(whole.percentile(100.0)),
    ));
    Ok(())
}
