//! Export and import: a cell rebuilt from another cell's export of a key — a snapshot, then the
//! log tail — holds byte-identical history; and a cell fed only the key's cell log from LSN 0
//! (the source's, or the target's after the move) reaches the same state, because every
//! mutation, imported snapshot rows included, is in that log.

use cellplane_api::proto::cell::{
    ChangeMembersRequest, ExportChunk, GetConversationsRequest, GetHistoryRequest, KeyRequest,
    MessageRefRequest, RevokeRequest,
};
use cellplane_tests::cell::CellProcess;

use crate::{group, import, send};

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

/// The whole of tenant acme, the key every test here moves.
fn acme() -> KeyRequest {
    KeyRequest {
        tenant_id: "acme".into(),
        conversation_id: String::new(),
    }
}

/// Revokes acme on `source` towards the target cell at epoch 2, as a migration's switch does.
async fn revoke_towards_target(source: &CellProcess) {
    source
        .admin()
        .revoke(RevokeRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
            new_cell_id: "sh-b-normal-1".into(),
            new_epoch: 2,
        })
        .await
        .expect("revoke");
}

async fn export(cell: &CellProcess, from_lsn: u64, log_only: bool) -> Vec<ExportChunk> {
    crate::export(cell, "acme", from_lsn, log_only).await
}

/// Everything each user can read: every conversation's full history and the conversation list.
async fn view(cell: &CellProcess) -> Vec<String> {
    let mut out = Vec::new();
    let mut messaging = cell.messaging();
    for user in USERS {
        let conversations = messaging
            .get_conversations(GetConversationsRequest {
                tenant_id: "acme".into(),
                user_id: user.into(),
            })
            .await
            .expect("conversations")
            .into_inner();
        out.push(format!("{user}: {conversations:?}"));
        for summary in conversations.conversations {
            let history = messaging
                .get_history(GetHistoryRequest {
                    tenant_id: "acme".into(),
                    conversation_id: summary.conversation_id.clone(),
                    user_id: user.into(),
                    before_seq: 0,
                    limit: 200,
                })
                .await
                .expect("history")
                .into_inner();
            out.push(format!("{user}/{}: {history:?}", summary.conversation_id));
        }
    }
    out
}

async fn traffic(cell: &CellProcess, round: &str) {
    let mut m = cell.messaging();
    for i in 0..20 {
        let sender = USERS[i % 3];
        let mut request = send(
            "acme",
            "team",
            sender,
            &format!("{round}-{i}"),
            format!("{round} {i}").as_bytes(),
        );
        if i % 5 == 0 {
            request.receiver_ids = vec![USERS[(i + 1) % 3].into()];
        }
        m.send_message(request).await.expect("send");
    }
    m.send_message(send(
        "acme",
        "ops",
        "alice",
        &format!("{round}-ops"),
        b"ops",
    ))
    .await
    .expect("send");
    let reference = |user: &str, seq| MessageRefRequest {
        tenant_id: "acme".into(),
        conversation_id: "team".into(),
        user_id: user.into(),
        seq,
        route_epoch: 1,
    };
    m.mark_read(reference("bob", 3)).await.expect("read");
    m.delete_for_me(reference("carol", 2))
        .await
        .expect("delete for me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moves_by_snapshot_and_tail_and_replays_from_its_log() {
    let source = CellProcess::start("hz-a-normal-1", &[]).await;
    source.grant("acme", "", 1).await;
    group(&source, "acme", "team", &["alice", "bob", "carol"]).await;
    group(&source, "acme", "ops", &["alice", "dave"]).await;
    traffic(&source, "r1").await;
    source
        .messaging()
        .recall_message(MessageRefRequest {
            tenant_id: "acme".into(),
            conversation_id: "team".into(),
            user_id: "alice".into(),
            seq: 4,
            route_epoch: 1,
        })
        .await
        .expect("recall");

    // Snapshot into the target, then more traffic on the source, then the tail.
    let target = CellProcess::start("sh-b-normal-1", &[]).await;
    let snapshot = export(&source, 0, false).await;
    let snapshot_lsn = snapshot.last().map(|c| c.through_lsn).expect("chunks");
    assert!(snapshot_lsn > 0);
    assert_eq!(import(&target, snapshot).await, snapshot_lsn);

    source
        .messaging()
        .add_members(ChangeMembersRequest {
            tenant_id: "acme".into(),
            conversation_id: "ops".into(),
            member_ids: vec!["carol".into()],
            route_epoch: 1,
        })
        .await
        .expect("add member");
    traffic(&source, "r2").await;
    let tail = export(&source, snapshot_lsn, false).await;
    let through = tail.last().map(|c| c.through_lsn).expect("chunks");
    assert!(through > snapshot_lsn);
    assert_eq!(import(&target, tail.clone()).await, through);
    // Importing the same tail again changes nothing: applied records are skipped.
    assert_eq!(import(&target, tail).await, through);

    let expected = view(&source).await;
    assert_eq!(
        view(&target).await,
        expected,
        "the target's history differs from the source's"
    );

    // The cell log alone rebuilds the same state.
    let replayed = CellProcess::start("bj-c-normal-1", &[]).await;
    let log = export(&source, 0, true).await;
    assert!(log.iter().all(|c| c.rows.is_empty()));
    assert_eq!(import(&replayed, log).await, through);
    assert_eq!(
        view(&replayed).await,
        expected,
        "replaying the cell log gave another state"
    );
    // So does the target's own log: it holds the snapshot rows the import took in, then the
    // tail, so the key's history does not depend on the cell it came from.
    let from_target = CellProcess::start("bj-d-normal-1", &[]).await;
    import(&from_target, export(&target, 0, true).await).await;
    assert_eq!(
        view(&from_target).await,
        expected,
        "replaying the target's cell log gave another state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_key_is_purged_only_once_revoked_and_the_purge_replays_from_the_log() {
    let source = CellProcess::start("hz-a-normal-1", &[]).await;
    source.grant("acme", "", 1).await;
    group(&source, "acme", "team", &["alice", "bob", "carol"]).await;
    group(&source, "acme", "ops", &["alice", "dave"]).await;
    traffic(&source, "r1").await;
    let key = acme();
    let refused = source
        .admin()
        .purge(key.clone())
        .await
        .expect_err("an owned key is not purged");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("has not moved away"),
        "{refused:?}"
    );
    assert!(
        !view(&source)
            .await
            .iter()
            .all(|line| line.ends_with("[] }"))
    );

    revoke_towards_target(&source).await;
    source.admin().purge(key.clone()).await.expect("purge");
    let history = source
        .messaging()
        .get_history(GetHistoryRequest {
            tenant_id: "acme".into(),
            conversation_id: "team".into(),
            user_id: "alice".into(),
            before_seq: 0,
            limit: 10,
        })
        .await
        .expect_err("purged");
    assert_eq!(history.code(), tonic::Code::NotFound);
    let emptied = view(&source).await;
    assert!(
        emptied
            .iter()
            .all(|line| line.contains("conversations: []")),
        "nothing of the tenant is left: {emptied:?}"
    );
    // Purging again changes nothing; the purge is in the cell log, so replaying the log gives
    // the same empty state rather than bringing the rows back.
    source.admin().purge(key).await.expect("purge again");
    let replayed = CellProcess::start("bj-c-normal-1", &[]).await;
    import(&replayed, export(&source, 0, true).await).await;
    assert_eq!(view(&replayed).await, emptied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_granted_here_takes_no_copy_not_even_the_sources_purge() {
    let source = CellProcess::start("hz-a-normal-1", &[]).await;
    source.grant("acme", "", 1).await;
    group(&source, "acme", "team", &["alice", "bob", "carol"]).await;
    group(&source, "acme", "ops", &["alice", "dave"]).await;
    traffic(&source, "r1").await;
    // The move: snapshot, switch (the target is granted the key), cleanup (the source purges).
    let target = CellProcess::start("sh-b-normal-1", &[]).await;
    let snapshot = export(&source, 0, false).await;
    let through = snapshot.last().map(|c| c.through_lsn).expect("chunks");
    import(&target, snapshot).await;
    target.grant("acme", "", 2).await;
    revoke_towards_target(&source).await;
    source.admin().purge(acme()).await.expect("purge");
    let before = view(&target).await;
    assert!(before.iter().any(|line| line.contains("r1-")), "{before:?}");

    // A copy that outlived the move brings the source's tail, its purge included.
    let stale = export(&source, through, true).await;
    let refused = target
        .admin()
        .import(futures::stream::iter(stale))
        .await
        .expect_err("a copy into a key the cell owns");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("owns acme/"), "{refused:?}");
    assert_eq!(view(&target).await, before, "the owner's history changed");
}
