//! Failover with real processes: a NORMAL primary and its agent SIGKILLed under sixteen
//! writers (the standby, run by another agent of the region, is promoted; every acknowledged
//! message is there once; the RPO ledger reads 0; the old primary, restarted, takes no
//! writes and rejoins as a standby), a primary cut off from the control plane while its writers still reach it (it
//! accepts nothing after its standby's first write), and a primary stopped for less than its
//! lease, which keeps its keys; an ops failover whose control-plane leader is SIGKILLed while
//! it waits the lease out, which still happens exactly once; a PLANNED failover to an
//! asynchronous standby under writers, which loses nothing; a storm that halts automatic
//! failover; and the failed primary coming back as the standby of the cell that took over.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cellplane_api::proto::cell::CellStatusRequest;
use cellplane_api::proto::control::{
    CellState, Failover, FailoverMode, FailoverPhase, GetFailoverRequest, Protection, Tier,
};
use cellplane_tests::agent::AgentProcess;
use cellplane_tests::cluster::Cluster;
use cellplane_tests::proxy::Proxy;
use cellplane_tests::system::{CELL_ARGS, switched, wait_until};
use cellplane_tests::traffic::{Writers, create_groups, history, send_request, verify};
use nix::sys::signal::Signal;

use super::System;

const PRIMARY: &str = "hz-a-normal-1";
const STANDBY: &str = "hz-b-normal-s1";
const TENANT: &str = "acme";
const CONVERSATIONS: usize = 8;
const WRITERS: usize = 16;

/// A control plane, the primary under one agent and its synchronous standby under another
/// (two machines of one region): `agents[0]` runs the primary, `agents[1]` the standby.
async fn start() -> System {
    start_with(Cluster::start(3, &[]).await, None, true).await
}

/// Like [`start`], the primary's agent reaching the control plane at `primary_reaches` (TCP
/// proxies, say) when given, and the standby synchronous or not.
async fn start_with(
    cluster: Cluster,
    primary_reaches: Option<Vec<String>>,
    synchronous: bool,
) -> System {
    System::start_pair(cluster, (PRIMARY, STANDBY), primary_reaches, synchronous).await
}

async fn failovers(system: &System) -> Vec<Failover> {
    system.list_failovers().await.failovers
}

/// A write to the old primary at the epoch it owned the tenant at, once it runs as the
/// standby of the cell that took over (a failover's loser rejoins as one), is refused.
async fn old_primary_refuses_writes(system: &System, client_msg_id: &str) {
    let admin = system.agents[0].cell(PRIMARY).admin();
    wait_until(
        "the old primary runs as a standby",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .cell_status(CellStatusRequest { without_keys: true })
                    .await
                    .is_ok_and(|s| s.into_inner().standby_of == STANDBY)
            }
        },
    )
    .await;
    let mut request = send_request(TENANT, "c0", "u0", client_msg_id, b"late".to_vec());
    request.route_epoch = 1;
    let refused = system.agents[0]
        .cell(PRIMARY)
        .messaging()
        .send_message(request)
        .await
        .expect_err("the old primary refuses writes");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "a standby takes no write: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_fails_over_to_its_standby_and_loses_nothing_acknowledged() {
    let mut system = start().await;
    wait_until(
        "the primary is IN_SYNC",
        Duration::from_secs(30),
        || async { system.cell(PRIMARY).await.protection == Protection::InSync as i32 },
    )
    .await;
    assert_eq!(
        system.create_tenant(TENANT, Tier::Normal, "hz").await,
        PRIMARY
    );
    let (routes, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;
    let writers = Writers::start(messenger.clone(), TENANT, "run", WRITERS, CONVERSATIONS);
    writers.let_write(300).await;

    // The primary's machine dies: its cell, and the agent that would restart it.
    let before = writers.count();
    system.agents[0].signal_cell(PRIMARY, Signal::SIGKILL);
    system.agents[0].kill().await;
    let killed = Instant::now();
    let killed_ms = cellplane_api::clock::now_ms();
    // Acknowledgements of sends already answered before the kill may still be counted: the
    // first WRITERS past the kill stand for those.
    wait_until(
        "writes go on on the standby",
        Duration::from_secs(20),
        || async { writers.count() > before + WRITERS },
    )
    .await;
    let resumed = killed.elapsed();
    writers.let_write(300).await;
    let (acks, _) = writers.stop().await;

    wait_until("the failover finishes", Duration::from_secs(10), || async {
        failovers(&system).await.iter().any(switched)
    })
    .await;
    let [failover] = failovers(&system).await.try_into().expect("one failover");
    assert_eq!(failover.cell_id, PRIMARY);
    assert_eq!(failover.standby_cell, STANDBY);
    assert!(failover.automatic, "the detector started it: {failover:?}");
    assert_eq!(failover.tenants, vec![TENANT.to_string()]);
    let ledger = failover.ledger.expect("ledger");
    assert!(ledger.in_sync, "the standby was synchronous: {ledger:?}");
    assert_eq!(ledger.lsns_behind, 0, "{ledger:?}");
    println!(
        "writes resumed {resumed:?} after the kill; keys switched {} ms after it; standby promoted {} ms after that",
        failover.switched_ms.saturating_sub(killed_ms),
        failover.done_ms.saturating_sub(failover.switched_ms),
    );

    assert_eq!(system.cell(PRIMARY).await.state, CellState::Failed as i32);
    let promoted = system.cell(STANDBY).await;
    assert!(promoted.standby_of.is_empty(), "{promoted:?}");
    let route = routes.lookup(TENANT, "").expect("route");
    assert_eq!((route.cell_id.as_str(), route.epoch), (STANDBY, 2));
    let (old, new): (Vec<_>, Vec<_>) = acks.iter().partition(|a| a.cell() == PRIMARY);
    assert!(!old.is_empty() && !new.is_empty(), "writes on both cells");
    assert!(new.iter().all(|a| a.cell() == STANDBY), "one new owner");
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;

    // The old primary's machine comes back: its cell never owns a key again. It refuses
    // writes, and rejoins as the standby of the cell that took over (the re-protection test
    // follows that through).
    system.agents[0].restart();
    old_primary_refuses_writes(&system, "after-failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_stalled_for_less_than_its_lease_keeps_its_keys() {
    let system = start().await;
    system.create_tenant(TENANT, Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, 2).await;
    let writers = Writers::start(messenger.clone(), TENANT, "slow", 2, 2);
    writers.let_write(50).await;

    system.agents[0].signal_cell(PRIMARY, Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    system.agents[0].signal_cell(PRIMARY, Signal::SIGCONT);
    writers.let_write(100).await;
    // Longer than lease and drift from the stall: a failover would have started by now.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (acks, _) = writers.stop().await;

    assert!(
        failovers(&system).await.is_empty(),
        "a slow cell is not failed over"
    );
    assert_eq!(system.cell(PRIMARY).await.state, CellState::Active as i32);
    assert!(acks.iter().all(|a| a.cell() == PRIMARY));
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_cut_off_from_the_control_plane_stops_writing_before_its_standby_starts() {
    let cluster = Cluster::start(3, &[]).await;
    let mut proxies = Vec::new();
    for endpoint in cluster.endpoints() {
        proxies.push(Proxy::start(&endpoint).await);
    }
    let reaches = proxies.iter().map(|p| p.addr.clone()).collect();
    let system = start_with(cluster, Some(reaches), true).await;
    system.create_tenant(TENANT, Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;
    let writers = Writers::start(messenger.clone(), TENANT, "cut", WRITERS, CONVERSATIONS);
    writers.let_write(300).await;

    // The primary's machine loses the control plane; its writers still reach it.
    for proxy in &proxies {
        proxy.cut();
    }
    wait_until(
        "the standby takes writes",
        Duration::from_secs(20),
        || async { writers.count() > 0 && failovers(&system).await.len() == 1 },
    )
    .await;
    writers.let_write(300).await;
    let (acks, _) = writers.stop().await;
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;
    assert!(acks.iter().any(|a| a.cell() == STANDBY), "writes moved on");

    // What each cell accepted, by the time it assigned: everything the old primary holds
    // (acknowledged or not), and everything the new owner holds.
    let mut old_primary = system.agents[0].cell(PRIMARY).messaging();
    let (_, mut new_owner) = messenger.owner(TENANT, "c0").expect("owner");
    let mut last_old = 0;
    let mut first_new = u64::MAX;
    for i in 0..CONVERSATIONS {
        let conversation = cellplane_tests::traffic::conversation(i);
        for message in history(&mut old_primary, TENANT, &conversation).await {
            assert!(message.message_id.starts_with(PRIMARY), "{message:?}");
            last_old = last_old.max(message.server_time_ms);
        }
        for message in history(&mut new_owner, TENANT, &conversation).await {
            if message.message_id.starts_with(STANDBY) {
                first_new = first_new.min(message.server_time_ms);
            }
        }
    }
    assert!(
        last_old < first_new,
        "the old primary accepted a write at {last_old} ms, after the new owner's first at {first_new} ms"
    );
    println!(
        "the old primary's last write {} ms before the new owner's first",
        first_new - last_old
    );

    // Back in touch, the old primary stays fenced: it rejoins as a standby of the cell that
    // took over, and every write is refused.
    for proxy in &proxies {
        proxy.restore();
    }
    old_primary_refuses_writes(&system, "after-the-cut").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_survives_the_control_plane_leader_killed_in_the_middle_and_happens_once() {
    let mut system = start().await;
    system.create_tenant(TENANT, Tier::Normal, "hz").await;
    let (routes, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, 4).await;
    let writers = Writers::start(messenger.clone(), TENANT, "ops", 4, 4);
    writers.let_write(100).await;

    let leader = system.cluster.wait_for_leader().await;
    let started = system
        .fail_over(PRIMARY, FailoverMode::Forced, "maintenance gone wrong")
        .await;
    assert_eq!(started.phase, FailoverPhase::Fencing as i32);
    // The leader dies while it waits the primary's lease out.
    system.cluster.kill(leader).await;
    wait_until("the failover finishes", Duration::from_secs(30), || async {
        failovers(&system).await.iter().any(switched)
    })
    .await;
    writers.let_write(100).await;
    let (acks, _) = writers.stop().await;

    let all = failovers(&system).await;
    assert_eq!(all.len(), 1, "one failover: {all:?}");
    assert_eq!(all[0].failover_id, started.failover_id);
    assert_eq!(all[0].keys_moved, 1);
    let route = routes.lookup(TENANT, "").expect("route");
    assert_eq!(
        (route.cell_id.as_str(), route.epoch),
        (STANDBY, 2),
        "the key moved once"
    );
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;

    // The old leader, restarted, agrees.
    system.cluster.restart(leader);
    system
        .cluster
        .wait_for_revision(leader, route.revision)
        .await;
    let seen = system
        .cluster
        .control(leader)
        .get_failover(GetFailoverRequest {
            failover_id: started.failover_id.clone(),
        })
        .await
        .expect("get failover")
        .into_inner();
    assert!(switched(&seen), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_region_fails_its_high_primary_over_to_the_standby_in_another_region() {
    const HIGH: &str = "hz-a-high-1";
    const NEAR: &str = "hz-b-high-s1";
    const FAR: &str = "bj-a-high-s2";
    let cluster = Cluster::start(3, &[]).await;
    let endpoints = cluster.endpoints();
    // Both standbys synchronous: a region loss then loses nothing either.
    let mut primary_args: Vec<&str> = CELL_ARGS.to_vec();
    primary_args.extend(["--sync-standby", NEAR, "--sync-standby", FAR]);
    let primary = AgentProcess::start("hz", &endpoints, &[(HIGH, "a", "HIGH")], &primary_args);
    let primary_addr = primary.cell(HIGH).addr.clone();
    let near = AgentProcess::start_following(
        "hz",
        &endpoints,
        &[(NEAR, "b", "HIGH")],
        &[(NEAR, HIGH, &primary_addr)],
        CELL_ARGS,
    );
    let far = AgentProcess::start_following(
        "bj",
        &endpoints,
        &[(FAR, "a", "HIGH")],
        &[(FAR, HIGH, &primary_addr)],
        CELL_ARGS,
    );
    let mut system = System {
        cluster,
        agents: vec![primary, near, far],
    };
    system.wait_for_active(3).await;
    wait_until(
        "the primary is IN_SYNC",
        Duration::from_secs(30),
        || async { system.cell(HIGH).await.protection == Protection::InSync as i32 },
    )
    .await;
    assert_eq!(system.create_tenant(TENANT, Tier::High, "hz").await, HIGH);
    let (routes, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;
    let writers = Writers::start(messenger.clone(), TENANT, "region", WRITERS, CONVERSATIONS);
    writers.let_write(300).await;

    // Region hz goes dark: both of its machines, cells and agents.
    for (agent, cell_id) in [(0, HIGH), (1, NEAR)] {
        system.agents[agent].signal_cell(cell_id, Signal::SIGKILL);
        system.agents[agent].kill().await;
    }
    writers.let_write(300).await;
    let (acks, _) = writers.stop().await;
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;

    let [failover] = failovers(&system).await.try_into().expect("one failover");
    assert_eq!(failover.cell_id, HIGH);
    assert_eq!(
        failover.standby_cell, FAR,
        "the in-region standby is gone too"
    );
    assert!(failover.automatic);
    let ledger = failover.ledger.expect("ledger");
    assert!(ledger.in_sync && ledger.lsns_behind == 0, "{ledger:?}");
    let route = routes.lookup(TENANT, "").expect("route");
    assert_eq!((route.cell_id.as_str(), route.epoch), (FAR, 2));
    assert!(acks.iter().any(|a| a.cell() == FAR));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_to_an_asynchronous_standby_loses_nothing() {
    let system = start_with(Cluster::start(3, &[]).await, None, false).await;
    system.create_tenant(TENANT, Tier::Normal, "hz").await;
    let (routes, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;
    let writers = Writers::start(messenger.clone(), TENANT, "planned", WRITERS, CONVERSATIONS);
    writers.let_write(300).await;

    let started = system
        .fail_over(PRIMARY, FailoverMode::Planned, "kernel upgrade")
        .await;
    assert_eq!(started.phase, FailoverPhase::Freezing as i32);
    let failover = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = failovers(&system).await.pop().expect("the failover");
            if switched(&now) {
                break now;
            }
            assert_ne!(now.phase, FailoverPhase::RolledBack as i32, "{now:?}");
            assert!(Instant::now() < deadline, "stuck: {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    writers.let_write(300).await;
    let (acks, latencies) = writers.stop().await;
    let mut latencies = latencies;
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;
    assert!(acks.iter().any(|a| a.cell() == STANDBY));

    let ledger = failover.ledger.expect("ledger");
    assert_eq!(ledger.primary_lsn, failover.frozen_lsn);
    assert!(ledger.standby_lsn >= failover.frozen_lsn, "{ledger:?}");
    assert!(ledger.in_sync && ledger.lsns_behind == 0, "{ledger:?}");
    println!(
        "planned failover: frozen at LSN {}, write pause {} ms by the leader's clock, slowest send {:?}",
        failover.frozen_lsn,
        failover.switched_ms.saturating_sub(failover.frozen_ms),
        latencies.percentile(100.0)
    );
    let demoted = system.cell(PRIMARY).await;
    assert!(
        demoted.state == CellState::Demoted as i32 || demoted.standby_of == STANDBY,
        "demoted, or already rejoined as the standby of the cell that took over: {demoted:?}"
    );
    let route = routes.lookup(TENANT, "").expect("route");
    assert_eq!((route.cell_id.as_str(), route.epoch), (STANDBY, 2));
    old_primary_refuses_writes(&system, "after-planned").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_failed_primaries_halts_automatic_failover_until_ops_resume_it() {
    const P1: &str = "hz-a-normal-1";
    const P2: &str = "hz-a-normal-2";
    const S1: &str = "hz-b-normal-s1";
    const S2: &str = "hz-b-normal-s2";
    let cluster = Cluster::start(3, &["--max-concurrent-failovers", "1"]).await;
    let endpoints = cluster.endpoints();
    let primaries = AgentProcess::start(
        "hz",
        &endpoints,
        &[(P1, "a", "NORMAL"), (P2, "a", "NORMAL")],
        CELL_ARGS,
    );
    let (a1, a2) = (
        primaries.cell(P1).addr.clone(),
        primaries.cell(P2).addr.clone(),
    );
    let standbys = AgentProcess::start_following(
        "hz",
        &endpoints,
        &[(S1, "b", "NORMAL"), (S2, "b", "NORMAL")],
        &[(S1, P1, &a1), (S2, P2, &a2)],
        CELL_ARGS,
    );
    let mut system = System {
        cluster,
        agents: vec![primaries, standbys],
    };
    system.wait_for_active(4).await;
    system.create_tenant("t1", Tier::Normal, "hz").await;
    system.create_tenant("t2", Tier::Normal, "hz").await;

    // Both primaries' machine dies: two failures at once, room for one. The agent goes
    // first, so no renewal of either comes after the other's last one (killing the cells
    // first, the agent could restart and renew one of them in between); its cells stop
    // with it.
    system.agents[0].kill().await;
    let list = || system.list_failovers();
    wait_until(
        "automatic failover halts",
        Duration::from_secs(20),
        || async { list().await.halted_since_ms > 0 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let halted = list().await;
    assert!(halted.failovers.is_empty(), "{halted:?}");
    assert_eq!(halted.halted_for, [P1, P2]);

    // Ops fail them over by hand (FORCED works while halted), then resume.
    for cell_id in [P1, P2] {
        system
            .fail_over(cell_id, FailoverMode::Forced, "after the storm")
            .await;
    }
    wait_until("both failovers finish", Duration::from_secs(20), || async {
        let now = list().await;
        now.failovers.len() == 2 && now.failovers.iter().all(switched)
    })
    .await;
    let leader = system.cluster.wait_for_leader().await;
    system
        .cluster
        .control(leader)
        .resume_automatic_failover(cellplane_api::proto::control::ResumeAutomaticFailoverRequest {})
        .await
        .expect("resume");
    let resumed = list().await;
    assert_eq!(resumed.halted_since_ms, 0);
    assert!(resumed.failovers.iter().all(|f| !f.automatic));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_failed_primary_comes_back_as_the_standby_of_the_cell_that_took_over() {
    let mut system = start().await;
    system.create_tenant(TENANT, Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, 4).await;
    let writers = Writers::start(messenger.clone(), TENANT, "back", 4, 4);
    writers.let_write(100).await;
    system.agents[0].signal_cell(PRIMARY, Signal::SIGKILL);
    system.agents[0].kill().await;
    wait_until("the failover finishes", Duration::from_secs(20), || async {
        failovers(&system).await.iter().any(switched)
    })
    .await;
    writers.let_write(100).await;

    // Its machine comes back: the agent starts the old primary as configured; it rejoins as
    // the standby of the cell that took over, starts over from its snapshot, and that cell
    // waits for it again.
    system.agents[0].restart();
    wait_until(
        "the old primary follows the new one, in sync",
        Duration::from_secs(60),
        || async {
            let old = system.cell(PRIMARY).await;
            let new = system.cell(STANDBY).await;
            old.standby_of == STANDBY
                && old.state == CellState::Active as i32
                && new.standbys == [PRIMARY]
                && new.protection == Protection::InSync as i32
        },
    )
    .await;
    writers.let_write(100).await;

    // Its machine restarts again: the agent starts the cell as configured, a primary, which
    // its disk refuses (it follows the new primary now); the agent must still run it as that
    // standby.
    system.agents[0].signal_cell(PRIMARY, Signal::SIGKILL);
    system.agents[0].kill().await;
    system.agents[0].restart();
    let agent = &system.agents[0];
    wait_until(
        "the restarted agent runs the old primary as the standby again",
        Duration::from_secs(60),
        || async {
            let status = agent
                .cell(PRIMARY)
                .admin()
                .cell_status(CellStatusRequest { without_keys: true })
                .await;
            let new = system.cell(STANDBY).await;
            status.is_ok_and(|s| {
                let s = s.into_inner();
                s.standby_of == STANDBY && s.replica.is_some_and(|r| r.connected)
            }) && new.protection == Protection::InSync as i32
        },
    )
    .await;
    writers.let_write(100).await;
    let (acks, _) = writers.stop().await;
    verify(&messenger, TENANT, &acks, &BTreeMap::new()).await;

    let status = system.agents[0]
        .cell(PRIMARY)
        .admin()
        .cell_status(CellStatusRequest { without_keys: true })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.standby_of, STANDBY);
    let replica = status.replica.expect("a standby's position");
    assert!(replica.connected && !replica.bootstrapping, "{replica:?}");
    old_primary_refuses_writes(&system, "as-a-standby").await;
    // Before it rejoined, what it held was merged back and counted: an in-sync standby
    // lacked nothing.
    let [failover] = failovers(&system).await.try_into().expect("one failover");
    assert_eq!(failover.phase, FailoverPhase::Merged as i32, "{failover:?}");
    let ledger = failover.ledger.expect("ledger");
    assert!(ledger.in_sync && ledger.merged, "{ledger:?}");
    assert_eq!(ledger.missing_messages, 0, "{ledger:?}");
}
