//! A cell's limits (`cellplane_im_cell::limits`), set small with `--limit` and each tried at
//! the limit and one past it: devices' subscriptions per connection and per cell, streams per
//! connection, group size, members per call, receivers per message, request size.

use std::time::Duration;

use cellplane_api::proto::cell::sync_client::SyncClient;
use cellplane_api::proto::cell::{
    ChangeMembersRequest, ConversationKind, CreateConversationRequest, SubscribeRequest, SyncEvent,
};
use cellplane_tests::cell::CellProcess;
use tonic::Code;
use tonic::transport::Channel;

use crate::send;

async fn subscribe(
    channel: &Channel,
    device: &str,
) -> Result<tonic::Streaming<SyncEvent>, tonic::Status> {
    SyncClient::new(channel.clone())
        .subscribe(SubscribeRequest {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            device_id: device.into(),
            cursor: 0,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_stop_at_their_limits_per_connection_and_per_cell() {
    let cell = CellProcess::start(
        "hz-a-normal-1",
        &[
            "--limit",
            "max_subscriptions=3",
            "--limit",
            "max_subscriptions_per_connection=2",
        ],
    )
    .await;
    let (a, b, c) = (cell.channel(), cell.channel(), cell.channel());
    let first = subscribe(&a, "a1").await.expect("1 of 2 on a connection");
    let _second = subscribe(&a, "a2").await.expect("2 of 2 on a connection");
    let past = subscribe(&a, "a3").await.expect_err("3 on a connection");
    assert_eq!(past.code(), Code::ResourceExhausted, "{past:?}");
    assert!(
        past.message()
            .starts_with("limits.max_subscriptions_per_connection:"),
        "{past:?}"
    );
    let _third = subscribe(&b, "b1").await.expect("3 of 3 on the cell");
    let full = subscribe(&c, "c1").await.expect_err("4 on the cell");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().starts_with("limits.max_subscriptions:"),
        "{full:?}"
    );
    // A device that goes away gives its place back.
    drop(first);
    cellplane_tests::until_ok(
        "the place was never given back",
        Duration::from_secs(5),
        || subscribe(&c, "c1"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_its_streams_and_its_next_call_waits() {
    let cell = CellProcess::start(
        "hz-a-normal-1",
        &["--limit", "max_streams_per_connection=2"],
    )
    .await;
    let channel = cell.channel();
    let mut open = vec![
        subscribe(&channel, "d1").await.expect("stream 1 of 2"),
        subscribe(&channel, "d2").await.expect("stream 2 of 2"),
    ];
    let waiting = tokio::spawn({
        let channel = channel.clone();
        async move { subscribe(&channel, "d3").await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third stream on the connection waits for one of the two"
    );
    open.pop();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("started once a stream ended")
        .expect("task")
        .expect("subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_members_per_call_receivers_and_request_size_stop_at_their_limits() {
    let cell = CellProcess::start(
        "hz-a-normal-1",
        &[
            "--limit",
            "max_group_members=4",
            "--limit",
            "max_members_per_call=3",
            "--limit",
            "max_receivers=2",
            "--limit",
            "max_request_bytes=4096",
        ],
    )
    .await;
    cell.grant("acme", "", 1).await;
    let mut m = cell.messaging();
    let members = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let create = |id: &str, names: &[&str]| CreateConversationRequest {
        tenant_id: "acme".into(),
        conversation_id: id.into(),
        kind: ConversationKind::Group as i32,
        member_ids: members(names),
        route_epoch: 1,
    };
    m.create_conversation(create("four", &["a", "b", "c", "d"]))
        .await
        .expect("a group at the limit");
    let past = m
        .create_conversation(create("five", &["a", "b", "c", "d", "e"]))
        .await
        .expect_err("a group one past it");
    assert_eq!(past.code(), Code::InvalidArgument);
    assert!(
        past.message().starts_with("member_ids: at most 4"),
        "{past:?}"
    );
    m.create_conversation(create("two", &["a", "b"]))
        .await
        .expect("a small group");
    let add = |names: &[&str]| ChangeMembersRequest {
        tenant_id: "acme".into(),
        conversation_id: "two".into(),
        member_ids: members(names),
        route_epoch: 1,
    };
    let past = m
        .add_members(add(&["c", "d", "e", "f"]))
        .await
        .expect_err("4 in one call");
    assert!(
        past.message().starts_with("member_ids: at most 3 per call"),
        "{past:?}"
    );
    let past = m
        .add_members(add(&["c", "d", "e"]))
        .await
        .expect_err("3 in one call, but the group would have 5");
    assert!(
        past.message()
            .starts_with("member_ids: a group has at most 4 members"),
        "{past:?}"
    );
    m.add_members(add(&["c", "d"]))
        .await
        .expect("the group at its limit");

    let mut private = send("acme", "four", "a", "p1", b"psst");
    private.route_epoch = 1;
    private.receiver_ids = members(&["b", "c"]);
    m.send_message(private.clone())
        .await
        .expect("two receivers, the limit");
    private.client_msg_id = "p2".into();
    private.receiver_ids = members(&["b", "c", "d"]);
    let past = m.send_message(private).await.expect_err("three receivers");
    assert!(
        past.message().starts_with("receiver_ids: at most 2"),
        "{past:?}"
    );

    // A request over max_request_bytes is not decoded at all.
    let mut huge = send("acme", "four", "a", "huge", &[7u8; 8 * 1024]);
    huge.route_epoch = 1;
    let past = m
        .send_message(huge)
        .await
        .expect_err("8 KiB over a 4 KiB limit");
    assert_eq!(past.code(), Code::OutOfRange, "{past:?}");
}
