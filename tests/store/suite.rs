//! The conformance suite: what every route store must do, written once and run against each
//! (as openraft's storage `Suite` is). Each test drives a served store through the public gRPC
//! API, so both stores are held to the same codes, messages, revisions and watch behaviour.

use std::collections::BTreeSet;
use std::time::Duration;

use cellplane_api::proto::control::{
    self as cpb, CancelMigrationRequest, CellState, CompactRequest, CreateTenantRequest,
    DeleteTenantRequest, GetTenantRequest, ListTenantsRequest, MigrateTenantRequest,
    MoveRouteRequest, SetCellStateRequest, Tier,
};
use cellplane_api::proto::routing::{
    Consistency, ListRoutesRequest, LookupRequest, Route, RouteEventKind, WatchRequest,
    WatchResponse,
};
use futures::StreamExt;
use tonic::Code;

use cellplane_tests::cluster::add_active_cells;

use crate::harness::{Backend, Served};

/// The three NORMAL cells of region `r1`, in zones of their own.
pub const CELL_ZONES: [(&str, &str, Tier); 3] = [
    ("cell-a", "z0", Tier::Normal),
    ("cell-b", "z1", Tier::Normal),
    ("cell-c", "z2", Tier::Normal),
];

/// Registers and activates [`CELL_ZONES`].
pub async fn add_cells<B: Backend>(served: &Served<B>) {
    add_active_cells(&mut served.control(), "r1", &CELL_ZONES, 100_000)
        .await
        .expect("register and activate cells");
}

pub async fn create_tenant<B: Backend>(
    served: &Served<B>,
    tenant_id: &str,
) -> Result<cpb::Tenant, tonic::Status> {
    served
        .control()
        .create_tenant(CreateTenantRequest {
            tenant_id: tenant_id.into(),
            tier: Tier::Normal as i32,
            home_region: "r1".into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn lookup<B: Backend>(
    served: &Served<B>,
    tenant_id: &str,
    conversation_id: &str,
) -> Result<Route, tonic::Status> {
    served
        .routing()
        .lookup(LookupRequest {
            tenant_id: tenant_id.into(),
            conversation_id: conversation_id.into(),
            consistency: Consistency::Linearizable as i32,
        })
        .await
        .map(|r| r.into_inner().route.expect("route"))
}

pub async fn move_route<B: Backend>(
    served: &Served<B>,
    tenant_id: &str,
    conversation_id: &str,
    expected_epoch: u64,
    target_cell: &str,
) -> Result<Route, tonic::Status> {
    served
        .control()
        .move_route(MoveRouteRequest {
            tenant_id: tenant_id.into(),
            conversation_id: conversation_id.into(),
            expected_epoch,
            target_cell: target_cell.into(),
        })
        .await
        .map(|r| r.into_inner().route.expect("route"))
}

/// A cell of [`CELL_ZONES`] other than `cell`.
pub fn other_than(cell: &str) -> &'static str {
    CELL_ZONES
        .iter()
        .map(|(id, _, _)| *id)
        .find(|id| *id != cell)
        .expect("another cell")
}

/// Create, read, move, delete, recreate: the records and their routes.
pub async fn crud<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    let status = served
        .control()
        .cluster_status(cpb::ClusterStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        status.store,
        served.backend.store_config().name(),
        "status names its store"
    );

    let tenant = create_tenant(&served, "acme").await.expect("create");
    assert_eq!(tenant.epoch, 1);
    assert!(
        CELL_ZONES
            .iter()
            .any(|(id, _, _)| *id == tenant.primary_cell)
    );
    let err = create_tenant(&served, "acme").await.expect_err("twice");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let route = lookup(&served, "acme", "").await.expect("lookup");
    assert_eq!(route.cell_id, tenant.primary_cell);
    assert_eq!(route.epoch, 1);
    assert!(route.endpoint.starts_with("127.0.0.1:"));
    // A conversation without its own route follows the tenant.
    let conversation = lookup(&served, "acme", "g1").await.expect("lookup");
    assert_eq!(
        (conversation.cell_id.as_str(), conversation.is_override),
        (route.cell_id.as_str(), false)
    );

    let target = other_than(&route.cell_id);
    let moved = move_route(&served, "acme", "", 1, target)
        .await
        .expect("move");
    assert_eq!((moved.cell_id.as_str(), moved.epoch), (target, 2));
    assert!(
        moved.revision > route.revision,
        "a write moves the revision"
    );
    let own = move_route(&served, "acme", "g1", 2, other_than(target))
        .await
        .expect("override");
    assert!(own.is_override);
    assert_eq!(own.epoch, 3);
    let got = served
        .control()
        .get_tenant(GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!((got.primary_cell.as_str(), got.epoch), (target, 2));

    served
        .control()
        .delete_tenant(DeleteTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("delete");
    let err = lookup(&served, "acme", "g1").await.expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("tenant_id"), "{}", err.message());
    // Created again, the tenant starts above every epoch the deleted one reached.
    let again = create_tenant(&served, "acme").await.expect("recreate");
    assert_eq!(again.epoch, 4);
    let conversation = lookup(&served, "acme", "g1").await.expect("lookup");
    assert!(
        !conversation.is_override,
        "the override went with the tenant"
    );
}

/// Many writers race for one compare-and-set: exactly one wins, the rest are told why.
pub async fn cas_races<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    let tenant = create_tenant(&served, "race").await.expect("create");
    let target = other_than(&tenant.primary_cell);

    let attempts: Vec<_> = (0..32)
        .map(|_| {
            let control = served.control();
            tokio::spawn(async move {
                let mut control = control;
                control
                    .move_route(MoveRouteRequest {
                        tenant_id: "race".into(),
                        conversation_id: String::new(),
                        expected_epoch: 1,
                        target_cell: target.into(),
                    })
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(_) => won += 1,
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(
        won, 1,
        "exactly one move at epoch 1 wins; the rest learn the new epoch"
    );
    assert_eq!(lookup(&served, "race", "").await.expect("lookup").epoch, 2);

    // Creating one tenant from many tasks: one creates it.
    let creates: Vec<_> = (0..16)
        .map(|_| {
            let control = served.control();
            tokio::spawn(async move {
                let mut control = control;
                control
                    .create_tenant(CreateTenantRequest {
                        tenant_id: "contested".into(),
                        tier: Tier::Normal as i32,
                        home_region: "r1".into(),
                    })
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for create in creates {
        match create.await.expect("task") {
            Ok(_) => created += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(created, 1);

    // Disjoint keys do not block each other: every conversation move wins.
    let moves: Vec<_> = (0..24)
        .map(|i| {
            let control = served.control();
            tokio::spawn(async move {
                let mut control = control;
                control
                    .move_route(MoveRouteRequest {
                        tenant_id: "race".into(),
                        conversation_id: format!("c{i}"),
                        expected_epoch: 2,
                        target_cell: other_than(target).into(),
                    })
                    .await
            })
        })
        .collect();
    for m in moves {
        m.await.expect("task").expect("a move of its own key");
    }

    // Standbys of one primary registered at once, each in its own zone: one in-region standby
    // wins, the others are refused for it.
    let standbys: Vec<_> = (0..8)
        .map(|i| {
            let control = served.control();
            tokio::spawn(async move {
                let mut control = control;
                control
                    .register_cell(cpb::RegisterCellRequest {
                        cell_id: format!("standby-{i}"),
                        region: "r1".into(),
                        zone: format!("standby-zone-{i}"),
                        tier: Tier::Normal as i32,
                        endpoint: format!("127.0.0.1:{}", 30_000 + i),
                        capacity: 10,
                        standby_of: "cell-a".into(),
                    })
                    .await
            })
        })
        .collect();
    let mut registered = 0;
    for standby in standbys {
        match standby.await.expect("task") {
            Ok(_) => registered += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("already has its in-region standby"),
                    "{status:?}"
                );
            }
        }
    }
    assert_eq!(registered, 1, "one in-region standby per primary");
}

/// Reads one watch message, failing the test if none comes within a few seconds.
async fn next(
    stream: &mut tonic::Streaming<WatchResponse>,
) -> Result<WatchResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch message within 10 s")
        .expect("the stream stays open")
}

/// Collects watch messages until one at `revision` or later arrives.
async fn until(stream: &mut tonic::Streaming<WatchResponse>, revision: u64) -> Vec<WatchResponse> {
    let mut seen = Vec::new();
    loop {
        let message = next(stream).await.expect("watch message");
        let at = message.revision;
        seen.push(message);
        if at >= revision {
            return seen;
        }
    }
}

/// Route events of messages, as (revision, tenant/conversation, cell, epoch, put?).
fn events(messages: &[WatchResponse]) -> Vec<(u64, String, String, u64, bool)> {
    messages
        .iter()
        .flat_map(|m| {
            m.events.iter().map(|e| {
                let route = e.route.as_ref().expect("route");
                (
                    e.revision,
                    format!("{}/{}", route.tenant_id, route.conversation_id),
                    route.cell_id.clone(),
                    route.epoch,
                    e.kind == RouteEventKind::Put as i32,
                )
            })
        })
        .collect()
}

/// A watch sees every route change once, in revision order, and resumes where it left off,
/// across a restart of the store.
pub async fn watch_order_and_resume<B: Backend>() {
    let mut served = Served::<B>::start().await;
    add_cells(&served).await;
    let mut watch = served
        .routing()
        .watch(WatchRequest { from_revision: 0 })
        .await
        .expect("watch")
        .into_inner();
    let tenant = create_tenant(&served, "w").await.expect("create");
    let mut cell = tenant.primary_cell.clone();
    let mut last = lookup(&served, "w", "").await.expect("lookup");
    for epoch in 1..=5 {
        let target = other_than(&cell);
        last = move_route(&served, "w", "", epoch, target)
            .await
            .expect("move");
        cell = target.to_string();
    }
    let seen = events(&until(&mut watch, last.revision).await);
    let epochs: Vec<u64> = seen.iter().map(|e| e.3).collect();
    assert_eq!(
        epochs,
        vec![1, 2, 3, 4, 5, 6],
        "every change once, in order: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "revisions grow");
    assert_eq!(seen.last().map(|e| e.0), Some(last.revision));
    let resume_from = seen[2].0 + 1;

    // Resuming from a revision replays exactly what came after it.
    let mut resumed = served
        .routing()
        .watch(WatchRequest {
            from_revision: resume_from,
        })
        .await
        .expect("resume")
        .into_inner();
    let replay = events(&until(&mut resumed, last.revision).await);
    assert_eq!(replay, seen[3..].to_vec());

    // The same after the store restarts.
    served.restart().await;
    let mut after = served
        .routing()
        .watch(WatchRequest {
            from_revision: resume_from,
        })
        .await
        .expect("resume after restart")
        .into_inner();
    let replay = events(&until(&mut after, last.revision).await);
    assert_eq!(replay, seen[3..].to_vec(), "history survives a restart");
    let moved = move_route(&served, "w", "", 6, other_than(&cell))
        .await
        .expect("move after restart");
    let more = events(&until(&mut after, moved.revision).await);
    assert_eq!(more.last().map(|e| e.3), Some(7));
    assert!(moved.revision > last.revision, "revisions never go back");
}

/// Compaction drops history: a watch from before it is told OUT_OF_RANGE with where to resume;
/// one from after it works; compacting the future is refused.
pub async fn compaction<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    let tenant = create_tenant(&served, "k").await.expect("create");
    let first = lookup(&served, "k", "").await.expect("lookup");
    let moved = move_route(&served, "k", "", 1, other_than(&tenant.primary_cell))
        .await
        .expect("move");
    served
        .control()
        .compact(CompactRequest {
            revision: moved.revision,
        })
        .await
        .expect("compact");
    let err = served
        .routing()
        .watch(WatchRequest {
            from_revision: first.revision,
        })
        .await
        .map(|_| ())
        .err();
    let err = match err {
        Some(err) => err,
        None => {
            let mut stream = served
                .routing()
                .watch(WatchRequest {
                    from_revision: first.revision,
                })
                .await
                .expect("watch")
                .into_inner();
            next(&mut stream).await.expect_err("compacted")
        }
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let mut stream = served
        .routing()
        .watch(WatchRequest {
            from_revision: moved.revision + 1,
        })
        .await
        .expect("watch after the compaction point")
        .into_inner();
    let again = move_route(&served, "k", "", 2, &tenant.primary_cell)
        .await
        .expect("move");
    let seen = events(&until(&mut stream, again.revision).await);
    assert_eq!(seen.last().map(|e| e.3), Some(3));

    let err = served
        .control()
        .compact(CompactRequest {
            revision: again.revision + 1_000_000,
        })
        .await
        .expect_err("the future");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("revision:"), "{}", err.message());
}

/// Pages cover everything once, in order; bad page sizes and tokens are refused.
pub async fn pagination<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    for i in 0..120 {
        create_tenant(&served, &format!("t{i:03}"))
            .await
            .expect("create");
    }
    for i in 0..30 {
        let route = lookup(&served, "t007", "").await.expect("lookup");
        move_route(
            &served,
            "t007",
            &format!("c{i:02}"),
            route.epoch,
            other_than(&route.cell_id),
        )
        .await
        .expect("override");
    }
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let page = served
            .routing()
            .list_routes(ListRoutesRequest {
                page_size: 40,
                page_token: token.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.routes.len() <= 40);
        keys.extend(
            page.routes
                .iter()
                .map(|r| format!("{}/{}", r.tenant_id, r.conversation_id)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(keys.len(), 150);
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "routes come in key order");
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 150, "each once");

    let mut tenants = 0;
    let mut token = String::new();
    loop {
        let page = served
            .control()
            .list_tenants(ListTenantsRequest {
                page_size: 50,
                page_token: token.clone(),
            })
            .await
            .expect("tenants")
            .into_inner();
        tenants += page.tenants.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(tenants, 120);
    let err = served
        .routing()
        .list_routes(ListRoutesRequest {
            page_size: 1_000_000,
            page_token: String::new(),
        })
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_size"), "{}", err.message());
    let err = served
        .routing()
        .list_routes(ListRoutesRequest {
            page_size: 10,
            page_token: "not a token!".into(),
        })
        .await
        .expect_err("garbage token");
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Bad input gets its code and a message naming the field; nothing is half applied.
pub async fn bad_input<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    let tenant = create_tenant(&served, "b").await.expect("create");
    let before = lookup(&served, "b", "").await.expect("lookup");

    let err = create_tenant(&served, "no spaces")
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("tenant_id"), "{}", err.message());
    let err = move_route(&served, "b", "", 1, "nowhere")
        .await
        .expect_err("unknown cell");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("target_cell"), "{}", err.message());
    let err = move_route(&served, "b", "", 7, other_than(&tenant.primary_cell))
        .await
        .expect_err("stale epoch");
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message().starts_with("expected_epoch"),
        "{}",
        err.message()
    );
    let err = move_route(&served, "ghost", "", 1, "cell-a")
        .await
        .expect_err("unknown tenant");
    assert_eq!(err.code(), Code::NotFound);
    let err = served
        .control()
        .set_cell_state(SetCellStateRequest {
            cell_id: "cell-a".into(),
            state: 42,
        })
        .await
        .expect_err("bad enum");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = served
        .control()
        .set_cell_state(SetCellStateRequest {
            cell_id: "cell-a".into(),
            state: CellState::Joining as i32,
        })
        .await
        .expect_err("a forbidden transition");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let after = lookup(&served, "b", "").await.expect("lookup");
    assert_eq!(
        (after.cell_id, after.epoch),
        (before.cell_id, before.epoch),
        "nothing changed"
    );
}

/// One migration per tenant: a second is refused, direct moves are refused meanwhile, and a
/// cancel before the switch leaves the route where it was.
pub async fn migration_records<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    let tenant = create_tenant(&served, "m").await.expect("create");
    let target = other_than(&tenant.primary_cell);
    let migration = served
        .control()
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: "m".into(),
            target_cell: target.into(),
        })
        .await
        .expect("migrate")
        .into_inner();
    let err = served
        .control()
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: "m".into(),
            target_cell: other_than(target).into(),
        })
        .await
        .expect_err("a second migration");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = move_route(&served, "m", "", 1, target)
        .await
        .expect_err("a direct move meanwhile");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let cancelled = served
        .control()
        .cancel_migration(CancelMigrationRequest {
            migration_id: migration.migration_id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        cancelled.phase,
        cpb::MigrationPhase::RolledBack as i32,
        "{cancelled:?}"
    );
    let route = lookup(&served, "m", "").await.expect("lookup");
    assert_eq!(
        (route.cell_id.as_str(), route.epoch),
        (tenant.primary_cell.as_str(), 1)
    );
    move_route(&served, "m", "", 1, target)
        .await
        .expect("moves are allowed again");
}

/// Everything written is there after the store restarts, and writes go on.
pub async fn restart<B: Backend>() {
    let mut served = Served::<B>::start().await;
    add_cells(&served).await;
    let mut routes = Vec::new();
    for i in 0..20 {
        let tenant_id = format!("r{i}");
        let tenant = create_tenant(&served, &tenant_id).await.expect("create");
        let route = if i % 2 == 0 {
            move_route(&served, &tenant_id, "", 1, other_than(&tenant.primary_cell))
                .await
                .expect("move")
        } else {
            lookup(&served, &tenant_id, "").await.expect("lookup")
        };
        routes.push(route);
    }
    let revision = routes.iter().map(|r| r.revision).max().unwrap_or(0);
    served.restart().await;
    for route in &routes {
        let now = lookup(&served, &route.tenant_id, "").await.expect("lookup");
        assert_eq!((&now.cell_id, now.epoch), (&route.cell_id, route.epoch));
        assert!(now.revision >= revision, "the revision never goes back");
    }
    let tenant = create_tenant(&served, "after")
        .await
        .expect("create after restart");
    assert_eq!(tenant.epoch, 1);
}

/// Leases and a failover from ops: bad calls refused with nothing changed, renewals refused
/// once the cell is failing over, the lease waited out, then every key of the cell (tenants
/// and a conversation moved onto it) moved to its standby at the next epoch in one step, and
/// the agent's report finishing it once.
pub async fn failover<B: Backend>() {
    let served = Served::<B>::start().await;
    add_cells(&served).await;
    served
        .control()
        .register_cell(cpb::RegisterCellRequest {
            cell_id: "cell-a-s".into(),
            region: "r1".into(),
            zone: "z1".into(),
            tier: Tier::Normal as i32,
            endpoint: "127.0.0.1:20100".into(),
            capacity: 100_000,
            standby_of: "cell-a".into(),
        })
        .await
        .expect("register the standby");
    served
        .control()
        .set_cell_state(SetCellStateRequest {
            cell_id: "cell-a-s".into(),
            state: CellState::Active as i32,
        })
        .await
        .expect("activate the standby");
    // A LOW cell alone in its region: no standby, and no other LOW primary to fall back to.
    add_active_cells(
        &mut served.control(),
        "r9",
        &[("low-alone", "z0", Tier::Low)],
        10,
    )
    .await
    .expect("register a LOW cell");
    let mut on_a = Vec::new();
    for i in 0..6 {
        let tenant = create_tenant(&served, &format!("f{i}"))
            .await
            .expect("create");
        if tenant.primary_cell == "cell-a" {
            on_a.push(tenant.tenant_id);
        } else if tenant.tenant_id == "f1" || tenant.tenant_id == "f2" {
            move_route(&served, &tenant.tenant_id, "hot", 1, "cell-a")
                .await
                .expect("move a conversation onto cell-a");
        }
    }
    assert!(!on_a.is_empty(), "placement spreads tenants over the cells");
    let renew = |cells: &[&str]| {
        let request = cpb::RenewLeasesRequest {
            cell_ids: cells.iter().map(|c| c.to_string()).collect(),
        };
        let mut control = served.control();
        async move { control.renew_leases(request).await.map(|r| r.into_inner()) }
    };
    let renewed = renew(&["cell-a", "cell-a-s"]).await.expect("renew");
    assert_eq!(renewed.granted, ["cell-a", "cell-a-s"]);
    assert!(renewed.lease_ms > 0);

    let failover = |cell_id: &str, mode: cpb::FailoverMode, reason: String| {
        let request = cpb::FailoverCellRequest {
            cell_id: cell_id.into(),
            mode: mode as i32,
            reason,
        };
        let mut control = served.control();
        async move { control.failover_cell(request).await.map(|r| r.into_inner()) }
    };
    let forced = cpb::FailoverMode::Forced;
    let before = served
        .control()
        .list_cells(cpb::ListCellsRequest::default())
        .await
        .expect("cells")
        .into_inner();
    for (cell_id, mode, reason, code, field) in [
        ("nope", forced, String::new(), Code::NotFound, "nope"),
        (
            "cell-a-s",
            forced,
            String::new(),
            Code::FailedPrecondition,
            "standby",
        ),
        (
            "cell-b",
            forced,
            String::new(),
            Code::FailedPrecondition,
            "no ACTIVE standby",
        ),
        (
            "low-alone",
            forced,
            String::new(),
            Code::FailedPrecondition,
            "no other ACTIVE LOW primary",
        ),
        (
            "low-alone",
            cpb::FailoverMode::Planned,
            String::new(),
            Code::FailedPrecondition,
            "LOW and has no standby",
        ),
        (
            "cell-a",
            cpb::FailoverMode::Unspecified,
            String::new(),
            Code::InvalidArgument,
            "mode",
        ),
        (
            "cell-a",
            forced,
            "x".repeat(300),
            Code::InvalidArgument,
            "reason",
        ),
        (
            "bad id",
            forced,
            String::new(),
            Code::InvalidArgument,
            "cell_id",
        ),
    ] {
        let err = failover(cell_id, mode, reason).await.expect_err(field);
        assert_eq!(err.code(), code, "{cell_id}: {err:?}");
        assert!(err.message().contains(field), "{cell_id}: {err:?}");
    }
    let after = served
        .control()
        .list_cells(cpb::ListCellsRequest::default())
        .await
        .expect("cells")
        .into_inner();
    assert_eq!(
        before.cells, after.cells,
        "refused failovers changed nothing"
    );

    let err = served
        .control()
        .resume_automatic_failover(cpb::ResumeAutomaticFailoverRequest {})
        .await
        .expect_err("automatic failover is not halted");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let started = failover("cell-a", forced, "disk alarm".into())
        .await
        .expect("failover");
    assert_eq!(started.phase, cpb::FailoverPhase::Fencing as i32);
    assert_eq!(started.reason, "disk alarm");
    assert!(!started.automatic);
    let err = failover("cell-a", forced, String::new())
        .await
        .expect_err("a second failover");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let renewed = renew(&["cell-a", "cell-a-s"]).await.expect("renew");
    assert_eq!(renewed.refused, ["cell-a"], "a failing cell is not renewed");

    let id = started.failover_id.clone();
    let get = || {
        let mut control = served.control();
        let failover_id = id.clone();
        async move {
            control
                .get_failover(cpb::GetFailoverRequest { failover_id })
                .await
                .expect("get failover")
                .into_inner()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let switched = loop {
        let now = get().await;
        if now.phase != cpb::FailoverPhase::Fencing as i32 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease was never waited out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(switched.phase, cpb::FailoverPhase::Promoting as i32);
    assert!(
        switched.switched_ms >= switched.created_ms + renewed.lease_ms,
        "the keys moved only after a whole lease: {switched:?}"
    );
    assert_eq!(switched.tenants, on_a);
    for tenant in &on_a {
        let route = lookup(&served, tenant, "").await.expect("lookup");
        assert_eq!(
            (route.cell_id.as_str(), route.epoch),
            ("cell-a-s", 2),
            "{tenant}"
        );
    }
    for tenant in ["f1", "f2"] {
        if on_a.iter().any(|t| t == tenant) {
            continue;
        }
        let route = lookup(&served, tenant, "hot").await.expect("lookup");
        assert_eq!(
            (route.cell_id.as_str(), route.epoch),
            ("cell-a-s", 3),
            "{tenant}/hot"
        );
    }

    let report = |phase: cpb::FailoverPhase| {
        let request = cpb::ReportFailoverRequest {
            failover_id: id.clone(),
            phase: phase as i32,
            lsn: 0,
            merged: Vec::new(),
        };
        let mut control = served.control();
        async move {
            control
                .report_failover(request)
                .await
                .map(|r| r.into_inner())
        }
    };
    let err = report(cpb::FailoverPhase::Fencing)
        .await
        .expect_err("agents report the phases they work in, never FENCING");
    assert_eq!(err.code(), Code::InvalidArgument);
    for _ in 0..2 {
        let done = report(cpb::FailoverPhase::Promoting).await.expect("report");
        assert_eq!(done.phase, cpb::FailoverPhase::Done as i32);
    }
    let listed = served
        .control()
        .list_failovers(cpb::ListFailoversRequest { active_only: true })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.failovers.is_empty(), "{listed:?}");
    let cell = served
        .control()
        .get_cell(cpb::GetCellRequest {
            cell_id: "cell-a-s".into(),
        })
        .await
        .expect("cell")
        .into_inner();
    assert!(cell.standby_of.is_empty(), "the standby is a primary now");

    // The failed cell came back and its agent merged what only it held: the report names
    // every key the failover moved, once, with its count; then the cell may rejoin.
    let rejoin = || {
        let mut control = served.control();
        async move {
            control
                .rejoin_cell(cpb::RejoinCellRequest {
                    cell_id: "cell-a".into(),
                })
                .await
        }
    };
    let err = rejoin().await.expect_err("not merged back yet");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut keys: Vec<cpb::MergedKey> = switched
        .tenants
        .iter()
        .map(|t| cpb::MergedKey {
            tenant_id: t.clone(),
            conversation_id: String::new(),
            messages: 1,
        })
        .chain(switched.conversations.iter().map(|c| cpb::MergedKey {
            tenant_id: c.tenant_id.clone(),
            conversation_id: c.conversation_id.clone(),
            messages: 2,
        }))
        .collect();
    assert_eq!(keys.len() as u64, switched.keys_moved);
    let merge_report = |merged: Vec<cpb::MergedKey>| {
        let request = cpb::ReportFailoverRequest {
            failover_id: id.clone(),
            phase: cpb::FailoverPhase::Done as i32,
            lsn: 0,
            merged,
        };
        let mut control = served.control();
        async move {
            control
                .report_failover(request)
                .await
                .map(|r| r.into_inner())
        }
    };
    let last = keys.pop().expect("a key");
    let err = merge_report(keys.clone())
        .await
        .expect_err("a count for part of the keys");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("merged"), "{err:?}");
    keys.push(last);
    let expected: u64 = keys.iter().map(|k| k.messages).sum();
    for _ in 0..2 {
        let merged = merge_report(keys.clone()).await.expect("merged");
        assert_eq!(merged.phase, cpb::FailoverPhase::Merged as i32);
        let ledger = merged.ledger.expect("ledger");
        assert!(ledger.merged);
        assert_eq!(ledger.missing_messages, expected);
        assert_eq!(ledger.missing.len(), keys.len());
    }
    let rejoined = rejoin().await.expect("rejoins once merged").into_inner();
    assert_eq!(rejoined.standby_of, "cell-a-s");
}

/// `FailoverRegion` starts one FORCED failover per HIGH primary of the region, each to its
/// standby in another region; a region with no cell or no HIGH primary is refused.
pub async fn region_failover<B: Backend>() {
    let served = Served::<B>::start().await;
    let cells = [
        ("r1-high", "r1", "z0", Tier::High, ""),
        ("r1-high-near", "r1", "z1", Tier::High, "r1-high"),
        ("r2-high-far", "r2", "z0", Tier::High, "r1-high"),
        ("r1-normal", "r1", "z2", Tier::Normal, ""),
    ];
    for (cell_id, region, zone, tier, standby_of) in cells {
        served
            .control()
            .register_cell(cpb::RegisterCellRequest {
                cell_id: cell_id.into(),
                region: region.into(),
                zone: zone.into(),
                tier: tier as i32,
                endpoint: format!("{cell_id}:1"),
                capacity: 10,
                standby_of: standby_of.into(),
            })
            .await
            .expect("register");
        served
            .control()
            .set_cell_state(SetCellStateRequest {
                cell_id: cell_id.into(),
                state: CellState::Active as i32,
            })
            .await
            .expect("activate");
    }
    let region = |region: &str| {
        let request = cpb::FailoverRegionRequest {
            region: region.into(),
            reason: String::new(),
        };
        let mut control = served.control();
        async move {
            control
                .failover_region(request)
                .await
                .map(|r| r.into_inner())
        }
    };
    let err = region("nowhere").await.expect_err("unknown region");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = region("r2").await.expect_err("no HIGH primary in r2");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = region("bad region").await.expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let started = region("r1").await.expect("fail r1 over");
    assert!(started.refused.is_empty(), "{started:?}");
    let [failover] = started.failovers.try_into().expect("one HIGH primary");
    assert_eq!(
        (failover.cell_id.as_str(), failover.standby_cell.as_str()),
        ("r1-high", "r2-high-far")
    );
    assert_eq!(failover.phase, cpb::FailoverPhase::Fencing as i32);
    assert_eq!(failover.reason, "region r1 lost");
    let again = region("r1").await.expect_err("nothing left to fail over");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

async fn audit_page<B: Backend>(
    served: &Served<B>,
    page_size: u32,
    page_token: String,
) -> cpb::ListAuditResponse {
    served
        .control()
        .list_audit(cpb::ListAuditRequest {
            page_size,
            page_token,
            ..Default::default()
        })
        .await
        .expect("list audit")
        .into_inner()
}

/// The audit log: every admin call with its outcome, refusals included, reads and agents'
/// reports (registering and activating the cells) not; the oldest
/// dropped beyond the configured size; pages newest first; kept across a restart.
pub async fn audit<B: Backend>() {
    let mut served = Served::<B>::start_configured(|config| config.audit_entries = 8).await;
    add_cells(&served).await;
    let mut control = served.control();
    create_tenant(&served, "a1").await.expect("create");
    let bad = create_tenant(&served, "bad id").await.expect_err("bad id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let missing = control
        .delete_tenant(DeleteTenantRequest {
            tenant_id: "nope".into(),
        })
        .await
        .expect_err("no such tenant");
    assert_eq!(missing.code(), Code::NotFound);
    control
        .get_tenant(GetTenantRequest {
            tenant_id: "a1".into(),
        })
        .await
        .expect("a read");
    let newest = audit_page(&served, 0, String::new()).await;
    let shape: Vec<(&str, i32)> = newest
        .entries
        .iter()
        .map(|e| (e.method.as_str(), e.code))
        .collect();
    assert_eq!(
        shape,
        [
            ("Control/DeleteTenant", Code::NotFound as i32),
            ("Control/CreateTenant", Code::InvalidArgument as i32),
            ("Control/CreateTenant", 0),
        ],
        "{newest:#?}"
    );
    assert!(
        newest.entries[0].message.contains("\"nope\""),
        "{newest:#?}"
    );
    assert!(
        newest.entries[1].message.contains("tenant_id"),
        "{newest:#?}"
    );
    assert!(newest.entries[2].request.contains("\"a1\""), "{newest:#?}");
    assert!(newest.entries.iter().all(|e| e.node_id == 1 && e.at_ms > 0));
    assert_eq!(newest.capacity, 8);

    for i in 0..5 {
        create_tenant(&served, &format!("more{i}"))
            .await
            .expect("create");
    }
    let full = audit_page(&served, 0, String::new()).await;
    assert_eq!(full.entries.len(), 8, "the oldest are dropped: {full:#?}");
    assert!(full.entries[0].request.contains("\"more4\""), "{full:#?}");
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit_page(&served, 3, token).await;
        assert!(page.entries.len() <= 3);
        paged.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let ids: Vec<String> = full.entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(paged, ids, "pages cover the log once, newest first");

    let bad_token = control
        .list_audit(cpb::ListAuditRequest {
            page_token: "yesterday".into(),
            ..Default::default()
        })
        .await
        .expect_err("a token ListAudit never gave");
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    assert!(bad_token.message().contains("page_token"), "{bad_token:?}");

    served.restart().await;
    let after = audit_page(&served, 0, String::new()).await;
    let after_ids: Vec<String> = after.entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(after_ids, ids, "the log survives a restart");
}
