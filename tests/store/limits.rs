//! A node's limits (`cellplane_control_plane::limits`), each at the limit and one past it:
//! watches per connection and per node, streams per connection, request size. Served by the
//! embedded Raft store; the limits are the node's, whichever store it has.

use std::time::Duration;

use cellplane_api::proto::control::{Tier, WatchMigrationRequest};
use cellplane_api::proto::routing::{LookupRequest, WatchRequest, WatchResponse};
use cellplane_control_plane::limits::Limits;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Raft, Served};

async fn served(limits: Limits) -> Served<Raft> {
    Served::<Raft>::start_configured(|config| config.limits = limits).await
}

async fn watch(channel: &Channel) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    cellplane_api::proto::routing::routing_client::RoutingClient::new(channel.clone())
        .watch(WatchRequest { from_revision: 0 })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stop_at_their_limits_per_connection_and_per_node() {
    let served = served(Limits {
        max_watches: 4,
        max_watches_per_connection: 2,
        ..Limits::default()
    })
    .await;
    let (a, b, c) = (served.channel(), served.channel(), served.channel());
    let first = watch(&a).await.expect("1 of 2 on a connection");
    // A migration watch counts like a route watch.
    let _second = cellplane_api::proto::control::control_client::ControlClient::new(a.clone())
        .watch_migration(WatchMigrationRequest::default())
        .await
        .expect("2 of 2 on a connection");
    let past = watch(&a).await.expect_err("3 on one connection");
    assert_eq!(past.code(), Code::ResourceExhausted, "{past:?}");
    assert!(
        past.message()
            .starts_with("limits.max_watches_per_connection:"),
        "{past:?}"
    );
    let _third = watch(&b).await.expect("3 of 4 on the node");
    let _fourth = watch(&b).await.expect("4 of 4 on the node");
    let full = watch(&c).await.expect_err("5 on the node");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().starts_with("limits.max_watches:"),
        "{full:?}"
    );
    // A watcher that goes away gives its place back.
    drop(first);
    cellplane_tests::until_ok(
        "the place was never given back",
        Duration::from_secs(5),
        || watch(&c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_its_streams_and_its_next_call_waits() {
    let served = served(Limits {
        max_streams_per_connection: 3,
        ..Limits::default()
    })
    .await;
    let channel = served.channel();
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(
            watch(&channel)
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e:?}")),
        );
    }
    let lookup = || {
        let mut routing =
            cellplane_api::proto::routing::routing_client::RoutingClient::new(channel.clone());
        async move {
            routing
                .lookup(LookupRequest {
                    tenant_id: "nobody".into(),
                    ..Default::default()
                })
                .await
        }
    };
    let waiting = tokio::spawn(lookup());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth stream on the connection waits for one of the three"
    );
    open.pop();
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered once a stream ended")
        .expect("task");
    assert_eq!(answered.expect_err("no such tenant").code(), Code::NotFound);
    // Another connection was never held up.
    let other = served.channel();
    watch(&other).await.expect("a stream on another connection");
}

/// A `CreateTenantRequest` or `LookupRequest` (tenant_id is field 1 of both) with unknown
/// field 99 making it exactly as long as wanted; servers skip unknown fields.
#[derive(Clone, PartialEq, prost::Message)]
struct Padded {
    #[prost(string, tag = "1")]
    tenant_id: String,
    #[prost(bytes = "vec", tag = "99")]
    padding: Vec<u8>,
}

impl Padded {
    fn of_length(bytes: usize) -> Self {
        let mut padded = Self {
            tenant_id: "padded".into(),
            padding: Vec::new(),
        };
        while prost::Message::encoded_len(&padded) < bytes {
            padded.padding.push(0);
        }
        assert_eq!(prost::Message::encoded_len(&padded), bytes, "exact length");
        padded
    }
}

async fn call_padded(channel: &Channel, path: &'static str, bytes: usize) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<Padded, Padded>::default();
    let answer: Result<tonic::Response<Padded>, _> = grpc
        .unary(
            tonic::Request::new(Padded::of_length(bytes)),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await;
    answer.expect_err("refused one way or another")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_decoded_up_to_their_limit_and_refused_one_byte_past() {
    const LIMIT: usize = 2_048;
    let served = served(Limits {
        max_request_bytes: LIMIT,
        ..Limits::default()
    })
    .await;
    let channel = served.channel();
    // A read: at the limit it is decoded and answered for what it asks (no such tenant).
    let lookup = "/cellplane.routing.v1.Routing/Lookup";
    let at = call_padded(&channel, lookup, LIMIT).await;
    assert_eq!(at.code(), Code::NotFound, "{at:?}");
    let past = call_padded(&channel, lookup, LIMIT + 1).await;
    assert_eq!(past.code(), Code::OutOfRange, "{past:?}");
    // An admin call, which the audit log reads first: the same bounds and the same code.
    let create = "/cellplane.control.v1.Control/CreateTenant";
    let at = call_padded(&channel, create, LIMIT).await;
    assert_eq!(
        at.code(),
        Code::InvalidArgument,
        "judged on its fields: {at:?}"
    );
    assert!(at.message().starts_with("tier"), "{at:?}");
    let past = call_padded(&channel, create, LIMIT + 1).await;
    assert_eq!(past.code(), Code::OutOfRange, "{past:?}");
    assert!(
        past.message().contains("limits.max_request_bytes"),
        "{past:?}"
    );
    // What was refused created nothing: the create at the limit was judged and refused too.
    let missing = served
        .control()
        .get_tenant(cellplane_api::proto::control::GetTenantRequest {
            tenant_id: "padded".into(),
        })
        .await
        .expect_err("no tenant");
    assert_eq!(missing.code(), Code::NotFound);
}

/// The limits on what one request may carry: batch keys, page size, endpoint length, cells
/// per renewal, a failover's reason, audit entries a peer hands over; each accepted at the
/// limit and refused one past it with `INVALID_ARGUMENT` naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_fields_stop_at_their_limits() {
    use cellplane_api::limits::{MAX_BATCH_KEYS, MAX_ENDPOINT_BYTES, MAX_PAGE_SIZE};
    use cellplane_api::proto::control::{
        AuditEntry, FailoverCellRequest, FailoverMode, ListTenantsRequest, RecordAuditRequest,
        RegisterCellRequest, RenewLeasesRequest,
    };
    use cellplane_api::proto::routing::{BatchLookupRequest, ListRoutesRequest, RouteKey};
    use cellplane_control_plane::limits::{
        MAX_AUDIT_ENTRIES_PER_WRITE, MAX_CELLS_PER_RENEWAL, MAX_REASON_BYTES,
    };

    let served = served(Limits::default()).await;
    let (mut routing, mut control) = (served.routing(), served.control());
    let invalid = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    };

    let keys = |n: usize| BatchLookupRequest {
        keys: (0..n)
            .map(|i| RouteKey {
                tenant_id: format!("t{i}"),
                conversation_id: String::new(),
            })
            .collect(),
        ..Default::default()
    };
    let answered = routing
        .batch_lookup(keys(MAX_BATCH_KEYS))
        .await
        .expect("a batch at the limit");
    assert_eq!(answered.into_inner().results.len(), MAX_BATCH_KEYS);
    invalid(
        routing
            .batch_lookup(keys(MAX_BATCH_KEYS + 1))
            .await
            .expect_err("one key past it"),
        "keys",
    );

    routing
        .list_routes(ListRoutesRequest {
            page_size: MAX_PAGE_SIZE,
            ..Default::default()
        })
        .await
        .expect("a page at the limit");
    invalid(
        routing
            .list_routes(ListRoutesRequest {
                page_size: MAX_PAGE_SIZE + 1,
                ..Default::default()
            })
            .await
            .expect_err("one past it"),
        "page_size",
    );
    invalid(
        control
            .list_tenants(ListTenantsRequest {
                page_size: MAX_PAGE_SIZE + 1,
                ..Default::default()
            })
            .await
            .expect_err("one past it"),
        "page_size",
    );

    let endpoint = |len: usize| format!("{}:1", "h".repeat(len - 2));
    let register = |id: &str, endpoint: String| RegisterCellRequest {
        cell_id: id.into(),
        region: "r1".into(),
        zone: "z0".into(),
        tier: Tier::Normal as i32,
        endpoint,
        capacity: 10,
        ..Default::default()
    };
    control
        .register_cell(register("long-endpoint", endpoint(MAX_ENDPOINT_BYTES)))
        .await
        .expect("an endpoint at the limit");
    invalid(
        control
            .register_cell(register(
                "longer-endpoint",
                endpoint(MAX_ENDPOINT_BYTES + 1),
            ))
            .await
            .expect_err("one byte past it"),
        "endpoint",
    );

    let renew = |n: usize| RenewLeasesRequest {
        cell_ids: (0..n).map(|i| format!("c{i}")).collect(),
    };
    control
        .renew_leases(renew(MAX_CELLS_PER_RENEWAL))
        .await
        .expect("a renewal at the limit (unknown cells are refused one by one)");
    invalid(
        control
            .renew_leases(renew(MAX_CELLS_PER_RENEWAL + 1))
            .await
            .expect_err("one cell past it"),
        "cell_ids",
    );

    let failover = |reason: usize| FailoverCellRequest {
        cell_id: "no-such-cell".into(),
        mode: FailoverMode::Forced as i32,
        reason: "r".repeat(reason),
    };
    let at = control
        .failover_cell(failover(MAX_REASON_BYTES))
        .await
        .expect_err("no such cell");
    assert_eq!(at.code(), Code::NotFound, "judged past its reason: {at:?}");
    invalid(
        control
            .failover_cell(failover(MAX_REASON_BYTES + 1))
            .await
            .expect_err("one byte past it"),
        "reason",
    );

    let entries = |n: usize| RecordAuditRequest {
        entries: vec![
            AuditEntry {
                method: "Control/Test".into(),
                ..Default::default()
            };
            n
        ],
    };
    control
        .record_audit(entries(MAX_AUDIT_ENTRIES_PER_WRITE))
        .await
        .expect("a peer's write at the limit");
    invalid(
        control
            .record_audit(entries(MAX_AUDIT_ENTRIES_PER_WRITE + 1))
            .await
            .expect_err("one entry past it"),
        "entries",
    );
}
