//! A standby cell follows its primary's cell log: after a mixed workload (single chats, a
//! 500-member group, receipts, recalls, deletes-for-me, a key migrating in and one migrating
//! out with a purge) its rows are byte-identical to the primary's, and so are those of a cell
//! fed only the primary's log from LSN 0. A standby refuses writes, naming its primary; killed,
//! it catches up from where it was; wiped, it bootstraps again from a snapshot.

use std::time::Duration;

use cellplane_api::detail::wrong_cell;
use cellplane_api::proto::cell::{
    ChangeMembersRequest, ExportRequest, KeyRequest, MessageRefRequest, RevokeRequest,
};
use cellplane_tests::cell::CellProcess;

use crate::{group, send};

/// Every row of a key, from a snapshot export: (keyspace, key, value).
async fn rows(cell: &CellProcess, tenant: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut stream = cell
        .admin()
        .export(ExportRequest {
            tenant_id: tenant.into(),
            conversation_id: String::new(),
            from_lsn: 0,
            log_only: false,
        })
        .await
        .expect("export")
        .into_inner();
    let mut rows = Vec::new();
    while let Some(chunk) = stream.message().await.expect("export stream") {
        rows.extend(chunk.rows.into_iter().map(|r| (r.space, r.key, r.value)));
    }
    rows
}

/// Moves a key's export from one cell into another: a snapshot from LSN 0, or the log alone.
async fn copy(from: &CellProcess, to: &CellProcess, tenant: &str, from_lsn: u64, log_only: bool) {
    let mut stream = from
        .admin()
        .export(ExportRequest {
            tenant_id: tenant.into(),
            conversation_id: String::new(),
            from_lsn,
            log_only,
        })
        .await
        .expect("export")
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.expect("export stream") {
        chunks.push(chunk);
    }
    to.admin()
        .import(futures::stream::iter(chunks))
        .await
        .expect("import");
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
    let mut standby = CellProcess::start(
        "hz-b-high-1",
        &[
            "--standby-of",
            "hz-a-high-1",
            "--primary-endpoint",
            &primary.addr,
        ],
    )
    .await;
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

    caught_up(&primary, &standby).await;
    assert!(!rows(&primary, "beta").await.is_empty());
    assert!(rows(&primary, "gamma").await.is_empty());
    same_rows(&primary, &standby, "after a mixed workload").await;

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
    assert_eq!(bootstraps(primary.status().await), 2);
}
