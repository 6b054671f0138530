//! Standby cells: what a standby costs the primary's durable sends (none, asynchronous,
//! synchronous), how fast a standby catches up after an outage while the primary keeps
//! writing, and how far an asynchronous standby lags under steady load.

use std::time::{Duration, Instant};

use cellplane_api::proto::cell::ConversationKind;
use cellplane_tests::cell::CellProcess;
use cellplane_tests::measure::{Samples, ms};

use crate::cell::{conversation, load};
use crate::drive::Measured;
use crate::report::Report;

const CONCURRENCY: [usize; 3] = [1, 64, 512];
const PRIMARY: &str = "bench-primary";
const STANDBY: &str = "bench-standby";
const UNLIMITED: [&str; 4] = [
    "--sends-per-conversation-per-sec",
    "100000000",
    "--sends-per-sender-per-sec",
    "100000000",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Alone,
    Async,
    Sync,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Alone => "no standby",
            Self::Async => "asynchronous standby",
            Self::Sync => "synchronous standby",
        }
    }
}

/// A primary with 512 single chats granted, and its standby as `mode` says.
async fn pair(mode: Mode) -> (CellProcess, Option<CellProcess>) {
    let mut args: Vec<&str> = UNLIMITED.to_vec();
    if mode == Mode::Sync {
        args.extend(["--sync-standby", STANDBY, "--sync-timeout-ms", "60000"]);
    }
    let primary = CellProcess::start(PRIMARY, &args).await;
    let standby = match mode {
        Mode::Alone => None,
        Mode::Async | Mode::Sync => Some(
            CellProcess::start(
                STANDBY,
                &["--standby-of", PRIMARY, "--primary-endpoint", &primary.addr],
            )
            .await,
        ),
    };
    primary.grant("bench", "", 1).await;
    let max = *CONCURRENCY.iter().max().unwrap_or(&1);
    for s in 0..max {
        conversation(
            &primary,
            &format!("dm-{s}"),
            ConversationKind::Single,
            vec![format!("u{s}"), format!("peer{s}")],
        )
        .await;
    }
    (primary, standby)
}

async fn single_chats(primary: &CellProcess, senders: usize, phase: Duration) -> Measured {
    load(primary, senders, phase, |s| {
        (format!("dm-{s}"), format!("u{s}"))
    })
    .await
    .expect("load")
}

/// The standby's applied LSN and the primary's newest.
async fn positions(primary: &CellProcess, standby: &CellProcess) -> (u64, u64) {
    let applied = standby.status().await.replica.map_or(0, |r| r.applied_lsn);
    (applied, primary.status().await.last_lsn)
}

pub async fn run(report: &mut Report, phase: Duration, outage: Duration) -> anyhow::Result<()> {
    let mut table = String::from(
        "## Standby cells\n\n\
         Durable single-chat sends through one primary `im-cell` (release build), closed-loop \
         senders over gRPC, with no standby, with an asynchronous standby, and with a \
         synchronous one (a send is answered once the standby has it durably too); primary and \
         standby on the same machine over loopback.\n\n\
         | senders | standby | sends/s | p50 ms | p99 ms | ÷ no standby |\n\
         |---:|---|---:|---:|---:|---:|\n",
    );
    let mut alone: Vec<f64> = Vec::new();
    for mode in [Mode::Alone, Mode::Async, Mode::Sync] {
        let (primary, standby) = pair(mode).await;
        for (i, senders) in CONCURRENCY.into_iter().enumerate() {
            let measured = single_chats(&primary, senders, phase).await;
            if mode == Mode::Alone {
                alone.push(measured.rate);
            }
            table.push_str(&format!(
                "| {senders} | {} | {:.0} | {} | {} | {:.2}× |\n",
                mode.name(),
                measured.rate,
                ms(measured.p50),
                ms(measured.p99),
                measured.rate / alone[i],
            ));
        }
        drop(standby);
        drop(primary);
    }

    // An asynchronous standby's lag under steady load (64 senders), sampled every 100 ms.
    let (primary, standby) = pair(Mode::Async).await;
    let mut standby = standby.expect("a standby");
    let mut lag_ms = Samples::default();
    let mut lag_lsns = Samples::default();
    let sampling = async {
        let until = Instant::now() + phase;
        while Instant::now() < until {
            if let Some(s) = primary.status().await.standbys.first() {
                lag_ms.record(Duration::from_millis(s.lag_ms));
                lag_lsns.record(Duration::from_millis(s.lag_lsns));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (steady, ()) = tokio::join!(single_chats(&primary, 64, phase), sampling);
    table.push_str(&format!(
        "\n### Asynchronous standby lag under steady load\n\n64 senders, {:.0} sends/s; the \
         primary's view of its standby every 100 ms ({} samples): lag p50 {} LSNs / {} ms, p99 \
         {} LSNs / {} ms (a remote standby in another region adds its round trip).\n",
        steady.rate,
        lag_ms.len(),
        lag_lsns.percentile(50.0).as_millis(),
        lag_ms.percentile(50.0).as_millis(),
        lag_lsns.percentile(99.0).as_millis(),
        lag_ms.percentile(99.0).as_millis(),
    ));

    // Catch-up: the standby is down for `outage` while 64 senders write, then comes back
    // while they go on writing for as long again.
    standby.kill().await;
    let outage_load = single_chats(&primary, 64, outage).await;
    let behind_at = primary.status().await.last_lsn;
    standby.restart().await;
    let restarted = Instant::now();
    let start_applied = standby.status().await.replica.map_or(0, |r| r.applied_lsn);
    let watching = async {
        loop {
            let (applied, newest) = positions(&primary, &standby).await;
            // Caught up: past where the primary stood when it came back, and within what one
            // batch of the ongoing load adds.
            if applied >= behind_at && applied + 1_000 >= newest {
                return Some((restarted.elapsed(), applied));
            }
            if restarted.elapsed() > outage {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (after_load, caught_up) = tokio::join!(single_chats(&primary, 64, outage), watching);
    let primary_rate = outage_load.rate.max(after_load.rate);
    match caught_up {
        Some((took, applied)) => {
            let catch_up_rate = (applied - start_applied) as f64 / took.as_secs_f64();
            table.push_str(&format!(
                "\n### Catch-up after an outage\n\nThe standby killed for {} s while 64 senders \
                 write ({:.0} sends/s, one LSN each), then restarted while they go on \
                 ({:.0} sends/s): it applied {} LSNs in {:.1} s to reach the primary, \
                 **{catch_up_rate:.0} LSNs/s, {:.1}× the primary's write rate**.\n",
                outage.as_secs(),
                outage_load.rate,
                after_load.rate,
                applied - start_applied,
                took.as_secs_f64(),
                catch_up_rate / primary_rate,
            ));
        }
        None => {
            let (applied, newest) = positions(&primary, &standby).await;
            table.push_str(&format!(
                "\n### Catch-up after an outage\n\nThe standby killed for {} s while 64 senders \
                 write ({primary_rate:.0} sends/s) did not catch up within as long again: it is at \
                 LSN {applied}, the primary at {newest}.\n",
                outage.as_secs(),
            ));
        }
    }
    report.section(table);
    Ok(())
}
