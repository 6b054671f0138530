//! A synchronous standby under an agent and a control plane: when it stops answering, sends
//! stall until the agent has recorded the primary DEGRADED in the control plane, then go on;
//! when it is back, the primary is IN_SYNC again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::proto::control::{Protection, Tier};
use cellplane_tests::traffic::{MEMBERS, create_groups, send_request};
use nix::sys::signal::Signal;

use super::System;

const SYNC_TIMEOUT_MS: u64 = 500;

async fn protection(system: &System, cell_id: &str) -> (Protection, u64) {
    let cell = system.cell(cell_id).await;
    (
        Protection::try_from(cell.protection).expect("protection"),
        cell.protection_revision,
    )
}

async fn wait_for_protection(system: &System, cell_id: &str, wanted: Protection) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (now, _) = protection(system, cell_id).await;
        if now == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{cell_id} stayed {now:?}, not {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_synchronous_standby_is_recorded_degraded_before_sends_go_on_without_it() {
    let timeout = SYNC_TIMEOUT_MS.to_string();
    let system = System::start_with_standbys(
        &[],
        &[(
            "hz",
            &[
                ("hz-a-normal-1", "a", "NORMAL"),
                ("hz-b-normal-s1", "b", "NORMAL"),
            ],
        )],
        &[("hz-b-normal-s1", "hz-a-normal-1")],
        &["--sync-timeout-ms", &timeout],
    )
    .await;
    wait_for_protection(&system, "hz-a-normal-1", Protection::InSync).await;
    assert_eq!(
        system.create_tenant("acme", Tier::Normal, "hz").await,
        "hz-a-normal-1",
        "the standby is never placed on"
    );
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, "acme", 1).await;

    // One writer, sends back to back: (started, answered) of each acknowledged send.
    let acked: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (messenger, acked, stop) = (messenger.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let started = Instant::now();
                let request =
                    send_request("acme", "c0", MEMBERS[0], &format!("m{n}"), b"hi".to_vec());
                messenger.send_message(request).await.expect("send");
                acked.lock().expect("acked").push((started, Instant::now()));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let leader = system.cluster.wait_for_leader().await;
    let before_stop = system
        .cluster
        .status(leader)
        .await
        .expect("status")
        .revision;
    let agent = system.agent("hz");
    agent.signal_cell("hz-b-normal-s1", Signal::SIGSTOP);
    let stopped = Instant::now();
    // A send answered well after the standby stopped (acknowledgements it sent before the
    // stop arrive within a millisecond) went on without it: by then the control plane must
    // have recorded the primary DEGRADED.
    let settled = stopped + Duration::from_millis(100);
    let first_alone = loop {
        let late = acked
            .lock()
            .expect("acked")
            .iter()
            .find(|(_, answered)| *answered > settled)
            .copied();
        if let Some(send) = late {
            break send;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "sends never went on without the standby"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (recorded, revision) = protection(&system, "hz-a-normal-1").await;
    assert_eq!(
        recorded,
        Protection::Degraded,
        "a send was acknowledged without the standby, and the control plane reads {recorded:?}"
    );
    assert!(
        revision > before_stop,
        "DEGRADED was recorded at revision {revision}, before the standby stopped at {before_stop}"
    );
    // It was answered only after the sync timeout: it waited for the standby, then for the
    // control plane.
    let waited = first_alone.1.duration_since(stopped);
    assert!(
        waited >= Duration::from_millis(SYNC_TIMEOUT_MS),
        "a send was answered {waited:?} after the standby stopped, within the sync timeout"
    );
    // Sends go on.
    let before = acked.lock().expect("acked").len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(acked.lock().expect("acked").len() > before + 10);

    agent.signal_cell("hz-b-normal-s1", Signal::SIGCONT);
    wait_for_protection(&system, "hz-a-normal-1", Protection::InSync).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    let stalled = acked
        .lock()
        .expect("acked")
        .iter()
        .map(|(started, answered)| *answered - *started)
        .max()
        .unwrap_or_default();
    eprintln!("longest send: {stalled:?} (sync timeout {SYNC_TIMEOUT_MS} ms)");
}
