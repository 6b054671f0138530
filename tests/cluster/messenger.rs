//! The `Messenger` against a cell whose connection goes silent: its machine died under the
//! open connection, or a partition swallows every packet, and nothing closes it. A write must
//! give that connection up after one attempt and reach the cell afresh, not wait until
//! HTTP/2 keepalive gives up (15 s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::cell::{ConversationKind, CreateConversationRequest, SendMessageRequest};
use cellplane_api::proto::control::{
    CellState, CreateTenantRequest, RegisterCellRequest, SetCellStateRequest, Tier,
};
use cellplane_tests::cell::CellProcess;
use cellplane_tests::cluster::Cluster;
use cellplane_tests::proxy::Proxy;

const TENANT: &str = "acme";

fn message(n: u64) -> SendMessageRequest {
    SendMessageRequest {
        tenant_id: TENANT.into(),
        conversation_id: "g0".into(),
        sender_id: "alice".into(),
        client_msg_id: format!("m{n}"),
        body: format!("#{n}").into_bytes(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reconnects_after_its_connection_to_the_cell_goes_silent() {
    let cluster = Cluster::start(1, &[]).await;
    let cell = CellProcess::start("cell-a", &[]).await;
    // The cell is reached through the proxy only: its route names the proxy.
    let proxy = Proxy::start(&cell.addr).await;
    let mut control = cluster.control(cluster.wait_for_leader().await);
    control
        .register_cell(RegisterCellRequest {
            cell_id: "cell-a".into(),
            region: "hz".into(),
            zone: "z1".into(),
            tier: Tier::Normal as i32,
            endpoint: proxy.addr.clone(),
            capacity: 1_000,
            standby_of: String::new(),
        })
        .await
        .expect("register");
    control
        .set_cell_state(SetCellStateRequest {
            cell_id: "cell-a".into(),
            state: CellState::Active as i32,
        })
        .await
        .expect("active");
    let tenant = control
        .create_tenant(CreateTenantRequest {
            tenant_id: TENANT.into(),
            tier: Tier::Normal as i32,
            home_region: "hz".into(),
        })
        .await
        .expect("tenant")
        .into_inner();
    cell.grant(TENANT, "", tenant.epoch).await;
    let routes = Arc::new(
        RouteCache::start(cluster.endpoints(), RouteCacheOptions::default())
            .await
            .expect("route cache"),
    );
    // Retries for less time than keepalive takes to give a silent connection up.
    let messenger = Messenger::new(
        routes.clone(),
        MessengerOptions {
            deadline: Duration::from_secs(6),
            attempt_timeout: Duration::from_secs(1),
            ..MessengerOptions::default()
        },
    );
    cellplane_tests::system::wait_until("the route is cached", Duration::from_secs(10), || {
        let routes = routes.clone();
        async move { routes.lookup(TENANT, "g0").is_some() }
    })
    .await;
    messenger
        .create_conversation(CreateConversationRequest {
            tenant_id: TENANT.into(),
            conversation_id: "g0".into(),
            kind: ConversationKind::Group as i32,
            member_ids: vec!["alice".into(), "bob".into()],
            route_epoch: 0,
        })
        .await
        .expect("conversation");
    let first = messenger
        .send_message(message(1))
        .await
        .expect("first send");

    proxy.freeze();
    let started = Instant::now();
    let second = messenger
        .send_message(message(2))
        .await
        .expect("the send reaches the cell on a new connection");
    assert_eq!(second.seq, first.seq + 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "one attempt on the silent connection, then a new one: took {:?}",
        started.elapsed()
    );
}
