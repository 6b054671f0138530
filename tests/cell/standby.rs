//! A standby cell follows its primary's cell log: after a mixed workload (single chats, a
//! 500-member group, receipts, recalls, deletes-for-me, a key migrating in and one migrating
//! out with a purge) its rows are byte-identical to the primary's, its grants and freezes are
//! the primary's, and the rows of a cell fed only the primary's log from LSN 0 are the same. A standby refuses writes, naming its primary; killed,
//! it catches up from where it was; wiped, it bootstraps again from a snapshot.

use std::time::Duration;

use cellplane_api::detail::wrong_cell;
use cellplane_api::proto::cell::{
    ChangeMembersRequest, ExportRequest, KeyRequest, MessageRefRequest, ReleaseSyncRequest,
    RevokeRequest, SyncMode,
};
use cellplane_tests::cell::CellProcess;

use crate::{export, group, import, send};

/// Every row of a key, from a snapshot export: (keyspace, key, value).
async fn rows(cell: &CellProcess, tenant: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    export(cell, tenant, 0, false)
        .await
        .into_iter()
        .flat_map(|chunk| chunk.rows)
        .map(|r| (r.space, r.key, r.value))
        .collect()
}

/// Moves a key's export from one cell into another: a snapshot from LSN 0, or the log alone.
async fn copy(from: &CellProcess, to: &CellProcess, tenant: &str, from_lsn: u64, log_only: bool) {
    import(to, export(from, tenant, from_lsn, log_only).await).await;
}

/// Starts `standby_id` as the standby of `primary`.
async fn standby_of(primary: &CellProcess, standby_id: &str) -> CellProcess {
    CellProcess::start(
        standby_id,
        &[
            "--standby-of",
            &primary.cell_id,
            "--primary-endpoint",
            &primary.addr,
        ],
    )
    .await
}

/// Waits until the standby has applied everything the (idle) primary has.
async fn caught_up(primary: &CellProcess, standby: &CellProcess) {
    let target = primary.status().await.last_lsn;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let replica = standby
            .status()
            .await
            .replica
            .expect("a standby reports its replica");
        if !replica.bootstrapping && replica.applied_lsn == target {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby is at {replica:?}, the primary at LSN {target}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn same_rows(primary: &CellProcess, other: &CellProcess, what: &str) {
    for tenant in ["acme", "beta", "gamma"] {
        assert!(
            rows(other, tenant).await == rows(primary, tenant).await,
            "{what}: the rows of {tenant} differ from the primary's"
        );
    }
}

/// The standby holds its primary's grants: the keys, their epochs and freezes.
async fn same_grants(primary: &CellProcess, standby: &CellProcess, what: &str) {
    let (mine, theirs) = (primary.status().await.keys, standby.status().await.keys);
    assert!(!mine.is_empty());
    assert_eq!(
        theirs, mine,
        "{what}: the standby's grants differ from the primary's"
    );
}

/// Sends, receipts, a recall, a delete-for-me and a member change in `acme`; `round` keeps
/// client message ids apart.
async fn traffic(primary: &CellProcess, round: &str) {
    let mut m = primary.messaging();
    let mut to_recall = 0;
    for i in 0..30 {
        let sender = ["alice", "bob", "carol"][i % 3];
        let mut request = send(
            "acme",
            "team",
            sender,
            &format!("{round}-{i}"),
            format!("{round} {i}").as_bytes(),
        );
        if i % 7 == 0 {
            request.receiver_ids = vec!["bob".into()];
        }
        let seq = m
            .send_message(request)
            .await
            .expect("send")
            .into_inner()
            .seq;
        if i == 3 {
            to_recall = seq;
        }
    }
    for i in 0..5 {
        m.send_message(send(
            "acme",
            "all-hands",
            "user-0",
            &format!("{round}-big-{i}"),
            b"to everyone",
        ))
        .await
        .expect("send to the big group");
    }
    let reference = |user: &str, seq| MessageRefRequest {
        tenant_id: "acme".into(),
        conversation_id: "team".into(),
        user_id: user.into(),
        seq,
        route_epoch: 1,
    };
    m.mark_read(reference("carol", 5)).await.expect("read");
    m.recall_message(reference("alice", to_recall))
        .await
        .expect("recall");
    m.delete_for_me(reference("bob", 2))
        .await
        .expect("delete for me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_holds_its_primarys_rows_byte_for_byte() {
    let primary = CellProcess::start("hz-a-high-1", &[]).await;
    primary.grant("acme", "", 1).await;
    primary.grant("gamma", "", 1).await;
    group(&primary, "acme", "team", &["alice", "bob", "carol"]).await;
    let everyone: Vec<String> = (0..500).map(|i| format!("user-{i}")).collect();
    let everyone: Vec<&str> = everyone.iter().map(String::as_str).collect();
    group(&primary, "acme", "all-hands", &everyone).await;
    group(&primary, "gamma", "g", &["alice", "dave"]).await;
    traffic(&primary, "r1").await;

    // The standby starts empty: it bootstraps from a snapshot, then follows the log.
    let mut standby = standby_of(&primary, "hz-b-high-1").await;
    traffic(&primary, "r2").await;
    primary
        .messaging()
        .add_members(ChangeMembersRequest {
            tenant_id: "acme".into(),
            conversation_id: "team".into(),
            member_ids: vec!["dave".into()],
            route_epoch: 1,
        })
        .await
        .expect("add a member");

    // beta migrates in from another cell: snapshot, more writes there, tail, switch.
    let other = CellProcess::start("hz-c-high-1", &[]).await;
    other.grant("beta", "", 1).await;
    group(&other, "beta", "x", &["erin", "frank"]).await;
    for i in 0..10 {
        let message = send("beta", "x", "erin", &format!("b{i}"), b"beta");
        other.messaging().send_message(message).await.expect("send");
    }
    copy(&other, &primary, "beta", 0, false).await;
    let snapshot_lsn = other.status().await.last_lsn;
    let late = send("beta", "x", "frank", "late", b"before the freeze");
    other.messaging().send_message(late).await.expect("send");
    copy(&other, &primary, "beta", snapshot_lsn, false).await;
    primary.grant("beta", "", 2).await;
    let mut after = send("beta", "x", "erin", "after", b"moved");
    after.route_epoch = 2;
    primary
        .messaging()
        .send_message(after)
        .await
        .expect("send at epoch 2");

    // gamma migrates out: revoked, and its rows dropped.
    primary
        .admin()
        .revoke(RevokeRequest {
            tenant_id: "gamma".into(),
            conversation_id: String::new(),
            new_cell_id: "hz-c-high-1".into(),
            new_epoch: 2,
        })
        .await
        .expect("revoke");
    primary
        .admin()
        .purge(KeyRequest {
            tenant_id: "gamma".into(),
            conversation_id: String::new(),
        })
        .await
        .expect("purge");

    // A freeze reaches the standby like any grant change.
    let frozen = KeyRequest {
        tenant_id: "acme".into(),
        conversation_id: "all-hands".into(),
    };
    primary
        .admin()
        .freeze(frozen.clone())
        .await
        .expect("freeze");

    caught_up(&primary, &standby).await;
    assert!(!rows(&primary, "beta").await.is_empty());
    assert!(rows(&primary, "gamma").await.is_empty());
    same_rows(&primary, &standby, "after a mixed workload").await;
    same_grants(&primary, &standby, "after a mixed workload").await;
    primary.admin().unfreeze(frozen).await.expect("unfreeze");

    // The primary's log alone rebuilds the same rows.
    let replayed = CellProcess::start("hz-d-high-1", &[]).await;
    for tenant in ["acme", "beta", "gamma"] {
        copy(&primary, &replayed, tenant, 0, true).await;
    }
    same_rows(&primary, &replayed, "replayed from LSN 0").await;

    // A standby takes no writes and names its primary.
    let refused = standby
        .messaging()
        .send_message(send("acme", "team", "alice", "on-standby", b"no"))
        .await
        .expect_err("a standby refuses writes");
    let detail = wrong_cell(&refused).expect("WrongCell");
    assert_eq!(detail.current_cell_id, "hz-a-high-1", "{refused:?}");
    let grant = standby
        .admin()
        .grant(cellplane_api::proto::cell::GrantRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
            epoch: 1,
        })
        .await
        .expect_err("a standby takes no grants");
    assert_eq!(grant.code(), tonic::Code::FailedPrecondition, "{grant:?}");

    let bootstraps = |status: cellplane_api::proto::cell::CellStatusResponse| {
        let standbys = status.standbys;
        assert_eq!(standbys.len(), 1, "{standbys:?}");
        assert_eq!(standbys[0].cell_id, "hz-b-high-1");
        standbys[0].bootstraps
    };
    assert_eq!(bootstraps(primary.status().await), 1);

    // Killed, it catches up from its own position: no second bootstrap.
    standby.kill().await;
    traffic(&primary, "r3").await;
    standby.restart().await;
    caught_up(&primary, &standby).await;
    same_rows(&primary, &standby, "after a restart").await;
    same_grants(&primary, &standby, "after a restart").await;
    assert_eq!(bootstraps(primary.status().await), 1);
    let status = primary.status().await;
    assert_eq!(status.standbys[0].lag_lsns, 0);
    assert!(status.standbys[0].connected);

    // Its disk lost, it bootstraps again.
    standby.kill().await;
    standby.wipe();
    traffic(&primary, "r4").await;
    standby.restart().await;
    caught_up(&primary, &standby).await;
    same_rows(&primary, &standby, "after a wiped disk").await;
    same_grants(&primary, &standby, "after a wiped disk").await;
    assert_eq!(bootstraps(primary.status().await), 2);
}

/// Waits until the primary's sync gate is in `mode`.
async fn sync_mode(primary: &CellProcess, mode: SyncMode) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sync = primary.status().await.sync.expect("sync status");
        if sync.mode == mode as i32 {
            return sync.episode;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the primary's gate is {sync:?}, not {mode:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// RPO 0 measured directly: sixteen writers send through a primary whose standby is
/// synchronous; the standby stalls and the primary is SIGKILLed mid-stream; the standby's own
/// store, read after it stopped, holds every acknowledged message exactly once, at the seq it
/// was acknowledged with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_has_every_acknowledged_message_when_its_primary_dies() {
    const WRITERS: usize = 16;
    let standby_id = "hz-b-normal-s1";
    let primary_id = "hz-a-normal-1";
    let unlimited = [
        "--sends-per-sender-per-sec",
        "1000000",
        "--sends-per-conversation-per-sec",
        "1000000",
    ];
    let mut primary = CellProcess::start(
        primary_id,
        &[
            &["--sync-standby", standby_id, "--sync-timeout-ms", "60000"][..],
            &unlimited,
        ]
        .concat(),
    )
    .await;
    let mut standby = standby_of(&primary, standby_id).await;
    primary.grant("acme", "", 1).await;
    for w in 0..WRITERS {
        group(
            &primary,
            "acme",
            &format!("g{w}"),
            &[&format!("u{w}"), "bob"],
        )
        .await;
    }
    sync_mode(&primary, SyncMode::Waiting).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut messaging = primary.messaging();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = format!("w{w}-{n}");
                let request = send(
                    "acme",
                    &format!("g{w}"),
                    &format!("u{w}"),
                    &id,
                    id.as_bytes(),
                );
                match messaging.send_message(request).await {
                    Ok(answer) => acked.push((id, answer.into_inner().seq)),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The standby stalls (a long GC, a slow disk) and dies with the primary: with it
    // synchronous, the writers wait; an asynchronous one would fall behind what the primary
    // acknowledges.
    standby.pause();
    tokio::time::sleep(Duration::from_millis(500)).await;
    primary.kill().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        acked.push((w, writer.await.expect("writer")));
    }
    let total: usize = acked.iter().map(|(_, a)| a.len()).sum();
    assert!(total > 100, "too few acknowledged sends: {total}");

    // Read the standby's store on its own: killed (what it had not applied dies with it),
    // then started again, still a standby (a cell that follows a primary refuses to run as
    // one unpromoted), of a primary that is gone.
    standby.kill().await;
    standby.restart().await;
    let mut history = standby.messaging();
    for (w, acked) in acked {
        let mut held = Vec::new();
        let mut before_seq = 0;
        loop {
            let page = history
                .get_history(cellplane_api::proto::cell::GetHistoryRequest {
                    tenant_id: "acme".into(),
                    conversation_id: format!("g{w}"),
                    user_id: "bob".into(),
                    before_seq,
                    limit: 200,
                })
                .await
                .expect("history")
                .into_inner();
            held.extend(
                page.messages
                    .iter()
                    .map(|m| (m.client_msg_id.clone(), m.seq)),
            );
            match page.messages.last() {
                Some(oldest) if page.has_more => before_seq = oldest.seq,
                _ => break,
            }
        }
        for (id, seq) in &acked {
            let copies: Vec<u64> = held
                .iter()
                .filter(|(held_id, _)| held_id == id)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                copies,
                vec![*seq],
                "g{w}: acknowledged {id} at seq {seq}; the standby holds it at {copies:?}"
            );
        }
    }
}

/// A synchronous standby that stops answering stalls sends; they go on only once the cell is
/// released (after the control plane recorded it out of sync), and the cell waits for the
/// standby again by itself once it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_synchronous_standby_stalls_sends_until_released() {
    let primary = CellProcess::start(
        "hz-a-normal-1",
        &[
            "--sync-standby",
            "hz-b-normal-s1",
            "--sync-timeout-ms",
            "300",
        ],
    )
    .await;
    let mut standby = standby_of(&primary, "hz-b-normal-s1").await;
    primary.grant("acme", "", 1).await;
    group(&primary, "acme", "g", &["alice", "bob"]).await;
    sync_mode(&primary, SyncMode::Waiting).await;

    standby.kill().await;
    let mut messaging = primary.messaging();
    let pending = tokio::spawn(async move {
        messaging
            .send_message(send("acme", "g", "alice", "stalled", b"waits"))
            .await
    });
    let episode = sync_mode(&primary, SyncMode::Stalled).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "a stalled send is not answered by itself"
    );
    let stale = primary
        .admin()
        .release_sync(ReleaseSyncRequest {
            episode: episode + 1,
        })
        .await
        .expect_err("a release names the stall");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    primary
        .admin()
        .release_sync(ReleaseSyncRequest { episode })
        .await
        .expect("release");
    pending
        .await
        .expect("task")
        .expect("answered once released");
    sync_mode(&primary, SyncMode::Alone).await;
    primary
        .messaging()
        .send_message(send("acme", "g", "alice", "alone", b"at once"))
        .await
        .expect("alone, sends are answered at once");

    standby.restart().await;
    sync_mode(&primary, SyncMode::Waiting).await;
    caught_up(&primary, &standby).await;
    same_rows(&primary, &standby, "after the standby came back").await;
}

/// A primary keeps a bounded cell log: a standby that fell behind it bootstraps again, and
/// says so; an export of a log tail from before it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_behind_the_kept_log_bootstraps_again() {
    let primary = CellProcess::start(
        "hz-a-high-1",
        &[
            "--log-retention-bytes",
            "4000",
            "--sends-per-sender-per-sec",
            "1000000",
            "--sends-per-conversation-per-sec",
            "1000000",
        ],
    )
    .await;
    let mut standby = standby_of(&primary, "hz-b-high-1").await;
    primary.grant("acme", "", 1).await;
    primary.grant("beta", "", 1).await;
    primary.grant("gamma", "", 1).await;
    group(&primary, "acme", "team", &["alice", "bob", "carol"]).await;
    caught_up(&primary, &standby).await;
    let applied = standby.status().await.replica.expect("replica").applied_lsn;
    let bootstraps = |status: &cellplane_api::proto::cell::CellStatusResponse| {
        status.standbys.first().map_or(0, |s| s.bootstraps)
    };
    let before = bootstraps(&primary.status().await);

    standby.kill().await;
    let mut m = primary.messaging();
    for i in 0..300 {
        m.send_message(send(
            "acme",
            "team",
            "alice",
            &format!("gone-{i}"),
            b"while it was down",
        ))
        .await
        .expect("send");
    }
    let status = primary.status().await;
    assert!(
        status.first_lsn > applied + 1,
        "the primary keeps its log from {} on; the standby needs {}",
        status.first_lsn,
        applied + 1
    );
    let refused = primary
        .admin()
        .export(ExportRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
            from_lsn: applied,
            log_only: true,
        })
        .await
        .expect_err("that tail is gone");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(refused.message().starts_with("from_lsn:"), "{refused:?}");

    standby.restart().await;
    caught_up(&primary, &standby).await;
    same_rows(&primary, &standby, "after a bootstrap past the kept log").await;
    let status = primary.status().await;
    assert_eq!(
        bootstraps(&status),
        before + 1,
        "one bootstrap more: {:?}",
        status.standbys
    );
}
