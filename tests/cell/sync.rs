//! Two devices of one user, one online and one offline: independent cursors, every event once in
//! pts order for a device that follows its cursor, and one REBASE past the backlog threshold.

use std::time::Duration;

use cellplane_api::proto::cell::{AckRequest, SubscribeRequest, SyncEvent, SyncEventKind};
use cellplane_tests::cell::CellProcess;
use tonic::Streaming;

use crate::{group, send};

async fn next(stream: &mut Streaming<SyncEvent>) -> SyncEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10s")
        .expect("stream healthy")
        .expect("stream open")
}

fn subscribe(device: &str, cursor: u64) -> SubscribeRequest {
    SubscribeRequest {
        tenant_id: "acme".into(),
        user_id: "bob".into(),
        device_id: device.into(),
        cursor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follow_their_own_cursors_and_far_behind_ones_rebase() {
    let cell = CellProcess::start("hz-a-normal-1", &["--rebase-backlog-events", "20"]).await;
    cell.grant("acme", "", 1).await;
    group(&cell, "acme", "team", &["alice", "bob"]).await;
    group(&cell, "acme", "ops", &["alice", "bob"]).await;

    // The phone is online from the start (cursor 0: from its stored cursor, nothing yet).
    let mut phone = cell
        .sync()
        .subscribe(subscribe("phone", 0))
        .await
        .expect("subscribe")
        .into_inner();
    let created = [next(&mut phone).await, next(&mut phone).await];
    assert!(
        created
            .iter()
            .all(|e| e.kind == SyncEventKind::Membership as i32)
    );
    assert_eq!(
        created.iter().map(|e| e.pts).collect::<Vec<_>>(),
        vec![1, 2]
    );

    let mut messaging = cell.messaging();
    for i in 0..10 {
        messaging
            .send_message(send("acme", "team", "alice", &format!("a{i}"), b"hi"))
            .await
            .expect("send");
    }
    let mut last = 2;
    for i in 0..10 {
        let event = next(&mut phone).await;
        assert_eq!(event.pts, last + 1, "pts must grow by one per event");
        last = event.pts;
        assert_eq!(event.kind, SyncEventKind::NewMessage as i32);
        assert_eq!(
            event.message.as_ref().map(|m| m.client_msg_id.clone()),
            Some(format!("a{i}"))
        );
    }
    let acked = cell
        .sync()
        .ack(AckRequest {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            device_id: "phone".into(),
            pts: last,
        })
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(acked.cursor, last);

    // The laptop was offline: from its own cursor (0) it gets the whole backlog, in order.
    let mut laptop = cell
        .sync()
        .subscribe(subscribe("laptop", 0))
        .await
        .expect("subscribe")
        .into_inner();
    for pts in 1..=last {
        let event = next(&mut laptop).await;
        assert_eq!(event.pts, pts);
        // A queued new-message event names the message; the backlog reads it from where the
        // conversation keeps it.
        if event.kind == SyncEventKind::NewMessage as i32 {
            assert_eq!(
                event
                    .message
                    .as_ref()
                    .map(|m| (m.client_msg_id.clone(), m.body.clone())),
                Some((format!("a{}", pts - 3), b"hi".to_vec()))
            );
        }
    }
    drop(laptop);

    // Far behind: 25 more events while the laptop is away, over the threshold of 20.
    for i in 0..25 {
        let conversation = if i % 2 == 0 { "team" } else { "ops" };
        messaging
            .send_message(send(
                "acme",
                conversation,
                "alice",
                &format!("b{i}"),
                b"hey",
            ))
            .await
            .expect("send");
    }
    let head = last + 25;
    // The phone, online all along, sees each one.
    for pts in last + 1..=head {
        assert_eq!(next(&mut phone).await.pts, pts);
    }
    let mut laptop = cell
        .sync()
        .subscribe(subscribe("laptop", last))
        .await
        .expect("subscribe")
        .into_inner();
    let rebase = next(&mut laptop).await;
    assert_eq!(rebase.kind, SyncEventKind::Rebase as i32);
    assert_eq!(rebase.pts, head);
    let mut changed = rebase.changed_conversations.clone();
    changed.sort();
    assert_eq!(changed, vec!["ops".to_string(), "team".to_string()]);
    // And it goes on live from there.
    messaging
        .send_message(send("acme", "team", "alice", "c0", b"after"))
        .await
        .expect("send");
    assert_eq!(next(&mut laptop).await.pts, head + 1);
    assert_eq!(next(&mut phone).await.pts, head + 1);

    // Cursors are per device and only move forward: the phone's stored cursor is what it acked.
    cell.sync()
        .ack(AckRequest {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            device_id: "phone".into(),
            pts: head,
        })
        .await
        .expect("ack");
    let stale = cell
        .sync()
        .ack(AckRequest {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            device_id: "phone".into(),
            pts: 3,
        })
        .await
        .expect("an older ack is harmless")
        .into_inner();
    assert_eq!(stale.cursor, head);
    drop(phone);
    let mut phone_again = cell
        .sync()
        .subscribe(subscribe("phone", 0))
        .await
        .expect("subscribe")
        .into_inner();
    assert_eq!(next(&mut phone_again).await.pts, head + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_reach_the_other_members_merged() {
    let cell = CellProcess::start("hz-a-normal-1", &[]).await;
    cell.grant("acme", "", 1).await;
    group(&cell, "acme", "team", &["alice", "bob", "carol"]).await;
    let mut messaging = cell.messaging();
    for i in 0..5 {
        messaging
            .send_message(send("acme", "team", "alice", &format!("m{i}"), b"hello"))
            .await
            .expect("send");
    }
    let mut alice = cell
        .sync()
        .subscribe(SubscribeRequest {
            tenant_id: "acme".into(),
            user_id: "alice".into(),
            device_id: "laptop".into(),
            cursor: 0,
        })
        .await
        .expect("subscribe")
        .into_inner();
    // The backlog: the group's creation and her own five messages.
    for _ in 0..6 {
        next(&mut alice).await;
    }
    let read = |user: &str, seq: u64| cellplane_api::proto::cell::MessageRefRequest {
        tenant_id: "acme".into(),
        conversation_id: "team".into(),
        user_id: user.into(),
        seq,
        route_epoch: 1,
    };
    // Unread counts and the last message, computed on read.
    let summary = |user: &'static str| {
        let mut messaging = cell.messaging();
        async move {
            let list = messaging
                .get_conversations(cellplane_api::proto::cell::GetConversationsRequest {
                    tenant_id: "acme".into(),
                    user_id: user.into(),
                })
                .await
                .expect("conversations")
                .into_inner();
            let team = list.conversations.into_iter().next().expect("team");
            (team.unread, team.last_message.map(|m| m.client_msg_id))
        }
    };
    assert_eq!(summary("carol").await, (5, Some("m4".to_string())));
    for seq in 1..=5 {
        messaging
            .mark_read(read("bob", seq))
            .await
            .expect("bob reads");
    }
    messaging
        .mark_read(read("carol", 5))
        .await
        .expect("carol reads");

    let receipt = next(&mut alice).await;
    assert_eq!(receipt.kind, SyncEventKind::Read as i32);
    let mut readers = receipt.user_ids.clone();
    readers.sort();
    assert_eq!(
        readers,
        vec!["bob".to_string(), "carol".to_string()],
        "one event for the window"
    );
    assert_eq!(receipt.seq, 5);
    // Nothing else follows: six receipts became one event.
    let more = tokio::time::timeout(Duration::from_millis(600), alice.message()).await;
    assert!(more.is_err(), "unexpected extra event {more:?}");
    assert_eq!(summary("carol").await, (0, Some("m4".to_string())));
}

/// A device that stays subscribed does not hold a stopping cell: its stream ends with
/// UNAVAILABLE and the cell exits within a second of SIGTERM, well inside its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_cell_ends_open_streams_instead_of_waiting_for_them() {
    let mut cell = CellProcess::start("hz-a-normal-1", &[]).await;
    cell.grant("acme", "", 1).await;
    group(&cell, "acme", "team", &["alice", "bob"]).await;
    let mut phone = cell
        .sync()
        .subscribe(subscribe("phone", 0))
        .await
        .expect("subscribe")
        .into_inner();
    assert_eq!(
        next(&mut phone).await.kind,
        SyncEventKind::Membership as i32
    );
    let asked = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), cell.terminate())
        .await
        .expect("the cell stops");
    assert!(status.success(), "{status}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "stopped in {:?}, not at the end of its grace",
        asked.elapsed()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), phone.message())
        .await
        .expect("the stream ends");
    let status = ended.expect_err("ended with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}
