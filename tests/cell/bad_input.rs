//! Bad requests to a cell: each gets its own code and a message naming the field and the rule,
//! and nothing is written.

use cellplane_api::detail::wrong_cell as wrong_cell_detail;
use cellplane_api::proto::cell::{
    ChangeMembersRequest, ConversationKind, CreateConversationRequest, GetHistoryRequest,
    MessageRefRequest,
};
use cellplane_tests::cell::CellProcess;
use tonic::Code;

use crate::send;

fn refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    needle: &str,
) -> tonic::Status {
    match result {
        Ok(value) => panic!("expected {code:?} mentioning {needle:?}, got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} should mention {needle:?}",
                status.message()
            );
            status
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_their_own_code() {
    let cell = CellProcess::start("hz-a-normal-1", &["--max-body-bytes", "1024"]).await;
    cell.grant("acme", "", 3).await;
    let mut m = cell.messaging();
    m.create_conversation(CreateConversationRequest {
        tenant_id: "acme".into(),
        conversation_id: "team".into(),
        kind: ConversationKind::Group as i32,
        member_ids: vec!["alice".into(), "bob".into()],
        route_epoch: 3,
    })
    .await
    .expect("create");
    let ok = |mut r: cellplane_api::proto::cell::SendMessageRequest| {
        r.route_epoch = 3;
        r
    };
    m.send_message(ok(send("acme", "team", "alice", "first", b"hello")))
        .await
        .expect("first send");

    refused(
        m.send_message(ok(send("", "team", "alice", "x", b"b")))
            .await,
        Code::InvalidArgument,
        "tenant_id: must not be empty",
    );
    refused(
        m.send_message(ok(send("acme", &"c".repeat(129), "alice", "x", b"b")))
            .await,
        Code::InvalidArgument,
        "conversation_id: must be at most 128 bytes, got 129",
    );
    refused(
        m.send_message(ok(send("acme", "team", "al ice", "x", b"b")))
            .await,
        Code::InvalidArgument,
        "sender_id: may only contain",
    );
    refused(
        m.send_message(ok(send("acme", "team", "mallory", "x", b"b")))
            .await,
        Code::PermissionDenied,
        "sender_id: \"mallory\" is not a member",
    );
    let mut private = ok(send("acme", "team", "alice", "p1", b"psst"));
    private.receiver_ids = vec!["carol".into()];
    refused(
        m.send_message(private).await,
        Code::PermissionDenied,
        "receiver_ids[0]: \"carol\" is not a member",
    );
    // The body limit, exactly and one past.
    m.send_message(ok(send("acme", "team", "alice", "at-limit", &[7u8; 1024])))
        .await
        .expect("a body at the limit");
    refused(
        m.send_message(ok(send("acme", "team", "alice", "too-big", &[7u8; 1025])))
            .await,
        Code::InvalidArgument,
        "body: must be at most 1024 bytes, got 1025",
    );
    refused(
        m.send_message(ok(send("acme", "nowhere", "alice", "x", b"b")))
            .await,
        Code::NotFound,
        "conversation_id",
    );
    // Epochs: stale, future, and a key the cell does not own.
    let mut stale = send("acme", "team", "alice", "x", b"b");
    stale.route_epoch = 2;
    let status = refused(
        m.send_message(stale).await,
        Code::FailedPrecondition,
        "route_epoch: 2 is stale",
    );
    assert_eq!(wrong_cell_detail(&status).map(|d| d.cell_epoch), Some(3));
    let mut future = send("acme", "team", "alice", "x", b"b");
    future.route_epoch = 4;
    refused(
        m.send_message(future).await,
        Code::FailedPrecondition,
        "newer than this cell's grant",
    );
    let mut foreign = send("globex", "team", "alice", "x", b"b");
    foreign.route_epoch = 1;
    let status = refused(
        m.send_message(foreign).await,
        Code::FailedPrecondition,
        "does not own globex/team",
    );
    assert_eq!(wrong_cell_detail(&status).map(|d| d.cell_epoch), Some(0));
    // Frozen: refused as retryable, with a retry-after; unfreezing restores writes.
    let frozen_at = cell
        .admin()
        .freeze(cellplane_api::proto::cell::KeyRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
        })
        .await
        .expect("freeze")
        .into_inner()
        .last_lsn;
    let status = refused(
        m.send_message(ok(send("acme", "team", "alice", "during-freeze", b"b")))
            .await,
        Code::FailedPrecondition,
        "frozen",
    );
    let detail = wrong_cell_detail(&status).expect("detail");
    assert!(detail.frozen && detail.retry_after_ms > 0);
    cell.admin()
        .unfreeze(cellplane_api::proto::cell::KeyRequest {
            tenant_id: "acme".into(),
            conversation_id: String::new(),
        })
        .await
        .expect("unfreeze");
    // Reused client_msg_id: the same message returns the first answer, another body is refused.
    let first = m
        .send_message(ok(send("acme", "team", "alice", "dup", b"one")))
        .await
        .expect("send")
        .into_inner();
    let again = m
        .send_message(ok(send("acme", "team", "alice", "dup", b"one")))
        .await
        .expect("resend")
        .into_inner();
    assert_eq!(
        (first.seq, &first.message_id),
        (again.seq, &again.message_id)
    );
    refused(
        m.send_message(ok(send("acme", "team", "alice", "dup", b"two")))
            .await,
        Code::AlreadyExists,
        "client_msg_id: \"dup\"",
    );
    // Recall by someone else than the sender.
    refused(
        m.recall_message(MessageRefRequest {
            tenant_id: "acme".into(),
            conversation_id: "team".into(),
            user_id: "bob".into(),
            seq: first.seq,
            route_epoch: 3,
        })
        .await,
        Code::PermissionDenied,
        "user_id: only the sender",
    );
    // History pages over the limit, and a member-only history.
    let history = |user: &str, limit: u32| GetHistoryRequest {
        tenant_id: "acme".into(),
        conversation_id: "team".into(),
        user_id: user.into(),
        before_seq: 0,
        limit,
    };
    m.get_history(history("bob", 200))
        .await
        .expect("a page at the limit");
    refused(
        m.get_history(history("bob", 201)).await,
        Code::InvalidArgument,
        "limit: must be 1..=200, got 201",
    );
    refused(
        m.get_history(history("mallory", 10)).await,
        Code::PermissionDenied,
        "user_id",
    );
    refused(
        m.create_conversation(CreateConversationRequest {
            tenant_id: "acme".into(),
            conversation_id: "dm".into(),
            kind: ConversationKind::Single as i32,
            member_ids: vec!["alice".into()],
            route_epoch: 3,
        })
        .await,
        Code::InvalidArgument,
        "member_ids: a single chat has exactly 2 members",
    );
    refused(
        m.add_members(ChangeMembersRequest {
            tenant_id: "acme".into(),
            conversation_id: "team".into(),
            member_ids: vec!["carol".into(), "carol".into()],
            route_epoch: 3,
        })
        .await,
        Code::InvalidArgument,
        "member_ids[1]: \"carol\" is listed twice",
    );

    // Nothing refused was written: the history holds exactly the accepted sends.
    let page = m
        .get_history(history("bob", 200))
        .await
        .expect("history")
        .into_inner();
    let ids: Vec<String> = page
        .messages
        .iter()
        .map(|m| m.client_msg_id.clone())
        .collect();
    assert_eq!(ids, vec!["dup", "at-limit", "first"]);
    let status = cell
        .admin()
        .cell_status(cellplane_api::proto::cell::CellStatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    assert!(status.last_lsn >= frozen_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_a_rate_limit_are_told_when_to_retry() {
    // One a second: the test stays right however slowly the machine runs it.
    let cell =
        CellProcess::start("hz-a-normal-1", &["--sends-per-conversation-per-sec", "1"]).await;
    cell.grant("acme", "", 1).await;
    crate::group(&cell, "acme", "team", &["alice", "bob"]).await;
    let mut m = cell.messaging();
    m.send_message(send("acme", "team", "alice", "burst", b"x"))
        .await
        .expect("within the burst");
    let status = refused(
        m.send_message(send("acme", "team", "bob", "over", b"x"))
            .await,
        Code::ResourceExhausted,
        "conversation rate limit of 1/s exceeded",
    );
    let wait = cellplane_im_cell::rate::retry_after_ms(status.message()).expect("a retry-after");
    assert!(wait > 0 && wait <= 1000, "retry after {wait} ms");
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    m.send_message(send("acme", "team", "bob", "over", b"x"))
        .await
        .expect("after the wait");
    // The refused send was not written: bob's message is seq 2, right after the burst.
    let page = m
        .get_history(GetHistoryRequest {
            tenant_id: "acme".into(),
            conversation_id: "team".into(),
            user_id: "bob".into(),
            before_seq: 0,
            limit: 10,
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(
        page.messages
            .first()
            .map(|m| (m.seq, m.client_msg_id.as_str())),
        Some((2, "over"))
    );
}

/// A writer whose route moved to a cell a moment before the cell's grant arrives retries
/// there until it does: those refusals wrote nothing and must not spend the sender's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_refused_as_not_owned_spend_no_rate() {
    let cell = CellProcess::start("hz-a-normal-1", &["--sends-per-sender-per-sec", "2"]).await;
    let mut m = cell.messaging();
    for i in 0..10 {
        refused(
            m.send_message(send("acme", "team", "alice", &format!("early-{i}"), b"x"))
                .await,
            Code::FailedPrecondition,
            "does not own acme/",
        );
    }
    cell.grant("acme", "", 1).await;
    crate::group(&cell, "acme", "team", &["alice", "bob"]).await;
    for i in 0..2 {
        m.send_message(send("acme", "team", "alice", &format!("granted-{i}"), b"x"))
            .await
            .expect("the sender's whole rate is left after its refusals");
    }
    refused(
        m.send_message(send("acme", "team", "alice", "over", b"x"))
            .await,
        Code::ResourceExhausted,
        "sender rate limit of 2/s exceeded",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_priority_burst_waits_its_turn_where_a_normal_one_is_refused() {
    use cellplane_api::proto::cell::Priority;
    let cell =
        CellProcess::start("hz-a-normal-1", &["--sends-per-conversation-per-sec", "10"]).await;
    cell.grant("acme", "", 1).await;
    crate::group(&cell, "acme", "reactions", &["alice", "bob"]).await;
    crate::group(&cell, "acme", "chat", &["alice", "bob"]).await;

    // Twenty sends at once into a conversation allowed ten a second: as NORMAL, the ones over
    // the burst are refused; as LOW, every one is written, the later ones after waiting.
    let burst = |conversation: &'static str, priority: Priority| {
        let cell_messaging = cell.messaging();
        async move {
            let sends = (0..20).map(|i| {
                let mut m = cell_messaging.clone();
                async move {
                    let mut request = send(
                        "acme",
                        conversation,
                        "alice",
                        &format!("{conversation}-{i}"),
                        b"+1",
                    );
                    request.priority = priority as i32;
                    let started = std::time::Instant::now();
                    let result = m.send_message(request).await;
                    (result.map(|_| ()), started.elapsed())
                }
            });
            futures::future::join_all(sends).await
        }
    };
    let normal = burst("chat", Priority::Normal).await;
    let refused_normal = normal
        .iter()
        .filter(|(r, _)| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    // Ten pass in the burst (one or two more if the burst outlasts a refill on a slow machine).
    assert!(
        (5..=10).contains(&refused_normal),
        "NORMAL sends over the burst are refused: {refused_normal} were"
    );

    let low = burst("reactions", Priority::Low).await;
    assert!(
        low.iter().all(|(r, _)| r.is_ok()),
        "every LOW send is written: {:?}",
        low.iter()
            .filter_map(|(r, _)| r.as_ref().err())
            .collect::<Vec<_>>()
    );
    let slowest = low.iter().map(|(_, took)| *took).max().expect("sends");
    assert!(
        slowest >= std::time::Duration::from_millis(800),
        "ten sends over a 10/s limit wait about a second, the slowest took {slowest:?}"
    );
    let mut bad = send("acme", "chat", "alice", "odd-priority", b"x");
    bad.priority = 7;
    refused(
        cell.messaging().send_message(bad).await,
        Code::InvalidArgument,
        "priority: must be NORMAL or LOW",
    );
}
