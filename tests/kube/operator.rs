//! The operator (`cellplane operator`, a real process) against a real API server and a real
//! control plane with real agents and cells: every reconcile path, checked in the objects'
//! status, conditions and Events and in the control plane's own state.

use std::time::Duration;

use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{
    CellState, CreateTenantRequest, FailoverPhase, GetCellRequest, GetFailoverRequest,
    GetMigrationRequest, GetTenantRequest, ListMigrationsRequest, MigrateTenantRequest,
    MigrationPhase, RemoveCellRequest, SetCellStateRequest, Tenant as PbTenant, Tier as PbTier,
};
use cellplane_control_plane::operator::writes;
use cellplane_crds::{
    Cell, CellFailover, CellFailoverSpec, CellSpec, FailoverMode, Migration, MigrationSpec, Tenant,
    TenantSpec, Tier,
};
use cellplane_tests::apiserver::KubeApiServer;
use cellplane_tests::cluster::{Cluster, add_active_cells};
use cellplane_tests::operator::OperatorProcess;
use cellplane_tests::system::System;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use nix::sys::signal::Signal;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

use super::scratch;

/// Waits until `name` satisfies `ready`, or fails naming what it last saw.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    limit: Duration,
    what: &str,
    ready: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    loop {
        if let Ok(object) = api.get(name).await {
            if ready(&object) {
                return object;
            }
            last = Some(object);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: {what} within {limit:?}; last seen {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `name` is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, limit: Duration)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(object)) = api.get_opt(name).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} was not deleted within {limit:?}: {object:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether condition `type_` is True with `reason`.
pub fn holds(conditions: &[Condition], type_: &str, reason: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True" && c.reason == reason)
}

fn tenant_conditions(t: &Tenant) -> &[Condition] {
    t.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// The Events recorded about the object `name`, as `(reason, reporting instance)`.
pub async fn events(client: &Client, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.reporting_instance.unwrap_or_default(),
            )
        })
        .collect()
}

fn tenant(name: &str, tier: Tier) -> Tenant {
    Tenant::new(
        name,
        TenantSpec {
            tier,
            home_region: "hz".into(),
        },
    )
}

/// The tenant as the control plane holds it.
async fn tenant_in(control: &mut ControlClient<Channel>, tenant_id: &str) -> PbTenant {
    control
        .get_tenant(GetTenantRequest {
            tenant_id: tenant_id.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("tenant {tenant_id}: {e}"))
        .into_inner()
}

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_tenants_and_migrations_reconcile_against_the_control_plane() {
    let system = System::start(&[(
        "hz",
        &[
            ("hz-a-normal-1", "a", "NORMAL"),
            ("hz-b-normal-2", "b", "NORMAL"),
            ("hz-a-high-1", "a", "HIGH"),
            ("hz-b-high-2", "b", "HIGH"),
        ],
    )])
    .await;
    let server = KubeApiServer::start().await;
    server.install_crds().await;
    let dir = scratch();
    let _operator = OperatorProcess::start(
        &server,
        &system.cluster.endpoints(),
        "operator-0",
        dir.path().join("operator.log"),
        &["--namespace", crate::chart::NAMESPACE],
    );
    let client = server.client();
    let leader = system.cluster.wait_for_leader().await;
    let mut control = system.cluster.control(leader);
    let cells: Api<Cell> = Api::all(client.clone());
    let tenants: Api<Tenant> = Api::all(client.clone());
    let migrations: Api<Migration> = Api::all(client.clone());
    let pp = PostParams::default();

    // A Cell whose cell its agent registered is adopted, and mirrors the cell's state.
    let agent = &system.agents[0];
    let adopted = Cell::new(
        "hz-a-normal-1",
        CellSpec {
            region: "hz".into(),
            zone: "a".into(),
            tier: Tier::Normal,
            endpoint: agent.cell("hz-a-normal-1").addr.clone(),
            capacity: 1000,
            standby_of: None,
            primary_zone: None,
        },
    );
    cells.create(&pp, &adopted).await.expect("create cell");
    let cell = wait_for(&cells, "hz-a-normal-1", LIMIT, "Ready", |c: &Cell| {
        c.status
            .as_ref()
            .is_some_and(|s| holds(&s.conditions, "Ready", "Active"))
    })
    .await;
    let status = cell.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("ACTIVE"));
    assert!(status.last_heartbeat.is_some(), "{status:?}");
    assert_eq!(status.observed_generation, Some(1));
    assert!(
        events(&client, "hz-a-normal-1")
            .await
            .iter()
            .any(|(r, _)| r == "Adopted")
    );

    // A Cell no agent registered is registered as its spec says, and waits for its agent.
    let mut joining = adopted.clone();
    joining.metadata = kube::api::ObjectMeta {
        name: Some("hz-z-normal-9".into()),
        ..Default::default()
    };
    joining.spec.zone = "z".into();
    joining.spec.endpoint = "127.0.0.1:9".into();
    joining.spec.capacity = 5;
    cells.create(&pp, &joining).await.expect("create cell");
    wait_for(&cells, "hz-z-normal-9", LIMIT, "Joining", |c: &Cell| {
        c.status
            .as_ref()
            .is_some_and(|s| holds(&s.conditions, "Progressing", "Joining"))
    })
    .await;
    let registered = control
        .get_cell(GetCellRequest {
            cell_id: "hz-z-normal-9".into(),
        })
        .await
        .expect("registered")
        .into_inner();
    assert_eq!((registered.zone.as_str(), registered.capacity), ("z", 5));

    // A Tenant is created; a concurrent writer of its labels makes the operator's guarded
    // writes conflict, and it goes on with the fresh object.
    tenants
        .create(&pp, &tenant("t-1", Tier::Normal))
        .await
        .expect("create tenant");
    let labeller = {
        let tenants = tenants.clone();
        tokio::spawn(async move {
            for i in 0..30 {
                let patch = json!({"metadata": {"labels": {format!("l{i}"): "x"}}});
                let _ = tenants
                    .patch("t-1", &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
        })
    };
    let t1 = wait_for(&tenants, "t-1", LIMIT, "Ready", |t: &Tenant| {
        holds(tenant_conditions(t), "Ready", "Placed")
    })
    .await;
    labeller.await.expect("labeller");
    let t1 = wait_for(
        &tenants,
        "t-1",
        LIMIT,
        "its finalizer and labels",
        |t: &Tenant| {
            t.finalizers().iter().any(|f| f == writes::FINALIZER) && t.labels().len() == 30
        },
    )
    .await
    .status
    .or(t1.status)
    .expect("status");
    let placed = tenant_in(&mut control, "t-1").await;
    assert_eq!(
        t1.primary_cell.as_deref(),
        Some(placed.primary_cell.as_str())
    );
    assert_eq!(placed.tier, PbTier::Normal as i32);
    assert_eq!(t1.epoch, placed.epoch);
    assert!(
        events(&client, "t-1")
            .await
            .iter()
            .any(|(r, i)| r == "Created" && i == "operator-0")
    );

    // A tenant made through the API and then declared is adopted, not made again.
    let made = control
        .create_tenant(CreateTenantRequest {
            tenant_id: "t-adopt".into(),
            tier: PbTier::Normal as i32,
            home_region: "hz".into(),
        })
        .await
        .expect("create through the API")
        .into_inner();
    tenants
        .create(&pp, &tenant("t-adopt", Tier::Normal))
        .await
        .expect("create tenant");
    let adopted = wait_for(&tenants, "t-adopt", LIMIT, "Ready", |t: &Tenant| {
        holds(tenant_conditions(t), "Ready", "Placed")
    })
    .await;
    let adopted = adopted.status.expect("status");
    assert_eq!(
        adopted.primary_cell.as_deref(),
        Some(made.primary_cell.as_str())
    );
    assert_eq!(adopted.epoch, made.epoch, "adopting changes nothing");
    assert!(
        events(&client, "t-adopt")
            .await
            .iter()
            .any(|(r, _)| r == "Adopted")
    );

    // A tenant made only through the API is left alone.
    let api_made = control
        .create_tenant(CreateTenantRequest {
            tenant_id: "t-api".into(),
            tier: PbTier::Normal as i32,
            home_region: "hz".into(),
        })
        .await
        .expect("create through the API")
        .into_inner();

    // A tier change is a migration to a cell of the new tier.
    tenants
        .patch(
            "t-1",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"tier": "HIGH"}})),
        )
        .await
        .expect("change tier");
    let high = wait_for(
        &tenants,
        "t-1",
        Duration::from_secs(60),
        "Ready on a HIGH cell",
        |t: &Tenant| {
            holds(tenant_conditions(t), "Ready", "Placed")
                && t.status.as_ref().is_some_and(|s| {
                    s.observed_generation == Some(2)
                        && s.primary_cell
                            .as_deref()
                            .is_some_and(|c| c.contains("-high-"))
                })
        },
    )
    .await
    .status
    .expect("status");
    let moved = tenant_in(&mut control, "t-1").await;
    assert_eq!(moved.tier, PbTier::High as i32);
    assert_eq!(
        high.primary_cell.as_deref(),
        Some(moved.primary_cell.as_str())
    );

    // A Migration starts once and is mirrored to DONE.
    let target = if moved.primary_cell == "hz-a-high-1" {
        "hz-b-high-2"
    } else {
        "hz-a-high-1"
    };
    let migration = Migration::new(
        "m-1",
        MigrationSpec {
            tenant: "t-1".into(),
            conversation: None,
            target_cell: target.into(),
        },
    );
    migrations
        .create(&pp, &migration)
        .await
        .expect("create migration");
    let done = wait_for(
        &migrations,
        "m-1",
        Duration::from_secs(60),
        "DONE",
        |m: &Migration| {
            m.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("DONE") && holds(&s.conditions, "Ready", "Done")
            })
        },
    )
    .await
    .status
    .expect("status");
    assert_eq!(
        done.source_cell.as_deref(),
        Some(moved.primary_cell.as_str())
    );
    assert!(done.pause_ms.is_some(), "{done:?}");
    let id = done.migration_id.clone().expect("id");
    // Later reconciles (every resync) never start a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let to_target = control
        .list_migrations(ListMigrationsRequest {
            active_only: false,
            tenant_id: "t-1".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .migrations
        .into_iter()
        .filter(|m| m.target_cell == target)
        .count();
    assert_eq!(to_target, 1, "exactly one migration to {target}");
    let after = tenant_in(&mut control, "t-1").await;
    assert_eq!(after.primary_cell, target);
    assert_eq!(after.epoch, moved.epoch + 1);
    let m1_events = events(&client, "m-1").await;
    assert!(
        m1_events.iter().any(|(r, _)| r == "Started"),
        "{m1_events:?}"
    );
    assert!(!id.is_empty());

    // An object made just after someone else's migration of the key to the same target began
    // (in the same second, which is all a creationTimestamp tells) never takes that run for
    // its own: it starts its own, which the control plane refuses.
    let back = moved.primary_cell.clone();
    let theirs = control
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: "t-1".into(),
            target_cell: back.clone(),
        })
        .await
        .expect("migrate back through the API")
        .into_inner();
    let late = Migration::new(
        "m-late",
        MigrationSpec {
            tenant: "t-1".into(),
            conversation: None,
            target_cell: back.clone(),
        },
    );
    migrations.create(&pp, &late).await.expect("create");
    let refused = wait_for(&migrations, "m-late", LIMIT, "Refused", |m: &Migration| {
        m.status
            .as_ref()
            .is_some_and(|s| holds(&s.conditions, "Degraded", "Refused"))
    })
    .await
    .status
    .expect("status");
    assert_ne!(
        refused.migration_id.as_deref(),
        Some(theirs.migration_id.as_str()),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = migrations
        .get("m-late")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(late.migration_id, None, "{late:?}");
    assert_eq!(tenant_in(&mut control, "t-1").await.primary_cell, back);
    migrations
        .delete("m-late", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&migrations, "m-late", LIMIT).await;

    // A Migration deleted before its switch is cancelled: its target is a cell no agent runs,
    // so it never gets past its first phases.
    add_active_cells(
        &mut control,
        "hz",
        &[("hz-y-normal-8", "y", PbTier::Normal)],
        10,
    )
    .await
    .expect("register and activate");
    let stuck = Migration::new(
        "m-cancel",
        MigrationSpec {
            tenant: "t-adopt".into(),
            conversation: None,
            target_cell: "hz-y-normal-8".into(),
        },
    );
    migrations
        .create(&pp, &stuck)
        .await
        .expect("create migration");
    let started = wait_for(
        &migrations,
        "m-cancel",
        LIMIT,
        "started",
        |m: &Migration| {
            m.status.as_ref().is_some_and(|s| {
                s.migration_id.is_some() && holds(&s.conditions, "Progressing", "Migrating")
            })
        },
    )
    .await
    .status
    .expect("status");
    migrations
        .delete("m-cancel", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&migrations, "m-cancel", LIMIT).await;
    let cancelled = control
        .get_migration(GetMigrationRequest {
            migration_id: started.migration_id.expect("id"),
        })
        .await
        .expect("migration")
        .into_inner();
    assert_eq!(cancelled.phase, MigrationPhase::RolledBack as i32);
    let stayed = tenant_in(&mut control, "t-adopt").await;
    assert_eq!(stayed.primary_cell, made.primary_cell);
    // No migration can finish on that cell: it goes before the drain below picks it.
    control
        .set_cell_state(SetCellStateRequest {
            cell_id: "hz-y-normal-8".into(),
            state: CellState::Draining as i32,
        })
        .await
        .expect("take out");
    control
        .remove_cell(RemoveCellRequest {
            cell_id: "hz-y-normal-8".into(),
        })
        .await
        .expect("remove");

    // Deleting a Tenant deletes the tenant, and the object goes only once it is gone.
    tenants
        .delete("t-1", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&tenants, "t-1", LIMIT).await;
    let gone = control
        .get_tenant(GetTenantRequest {
            tenant_id: "t-1".into(),
        })
        .await;
    assert_eq!(gone.expect_err("deleted").code(), Code::NotFound);

    // Deleting a Cell that never joined takes it out and removes it.
    cells
        .delete("hz-z-normal-9", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&cells, "hz-z-normal-9", LIMIT).await;
    let gone = control
        .get_cell(GetCellRequest {
            cell_id: "hz-z-normal-9".into(),
        })
        .await;
    assert_eq!(gone.expect_err("removed").code(), Code::NotFound);

    // Deleting a Cell that holds a tenant drains it to its sibling first.
    let holder = made.primary_cell.clone();
    let sibling = if holder == "hz-a-normal-1" {
        "hz-b-normal-2"
    } else {
        "hz-a-normal-1"
    };
    if holder != "hz-a-normal-1" {
        let mut other = cells.get("hz-a-normal-1").await.expect("cell").spec;
        other.zone = "b".into();
        other.endpoint = agent.cell("hz-b-normal-2").addr.clone();
        cells
            .create(&pp, &Cell::new(&holder, other))
            .await
            .expect("create cell");
        wait_for(&cells, &holder, LIMIT, "Ready", |c: &Cell| {
            c.status
                .as_ref()
                .is_some_and(|s| holds(&s.conditions, "Ready", "Active"))
        })
        .await;
    }
    cells
        .delete(&holder, &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&cells, &holder, Duration::from_secs(60)).await;
    let drained = tenant_in(&mut control, "t-adopt").await;
    assert_eq!(
        drained.primary_cell, sibling,
        "the tenant moved off the deleted cell"
    );
    assert!(
        events(&client, &holder)
            .await
            .iter()
            .any(|(r, _)| r == "Draining")
    );

    // The API-made tenant was never touched, and no object stands for it.
    let untouched = tenant_in(&mut control, "t-api").await;
    assert_eq!(
        (untouched.epoch, untouched.primary_cell),
        (api_made.epoch, api_made.primary_cell)
    );
    assert!(tenants.get_opt("t-api").await.expect("get").is_none());

    // Everything it did, the chart's least-privilege RBAC allows.
    let made = crate::chart::assert_the_chart_allows_every_call(&server);
    for (verb, resource) in [
        ("watch", "tenants"),
        ("patch", "cells"),
        ("patch", "migrations/status"),
        ("create", "events"),
        ("update", "leases"),
    ] {
        assert!(
            made.iter()
                .any(|c| c.verb == verb && c.resource == resource),
            "no {verb} of {resource} among {made:#?}"
        );
    }
}

const PRIMARY: &str = "hz-a-normal-1";
const STANDBY: &str = "hz-b-normal-s1";

/// A primary and its synchronous standby with the tenant `acme` on the primary, an API server
/// with the CRDs, and an operator keeping its Lease in the chart's namespace.
async fn pair_under_an_operator() -> (System, KubeApiServer, OperatorProcess, tempfile::TempDir) {
    let system =
        System::start_pair(Cluster::start(3, &[]).await, (PRIMARY, STANDBY), None, true).await;
    let on = system.create_tenant("acme", PbTier::Normal, "hz").await;
    assert_eq!(on, PRIMARY);
    let server = KubeApiServer::start().await;
    server.install_crds().await;
    let dir = scratch();
    let operator = OperatorProcess::start(
        &server,
        &system.cluster.endpoints(),
        "operator-0",
        dir.path().join("operator.log"),
        &["--namespace", crate::chart::NAMESPACE],
    );
    (system, server, operator, dir)
}

/// Creates the CellFailover `name`: a PLANNED failover of the primary.
async fn plan_failover(failovers: &Api<CellFailover>, name: &str) {
    let object = CellFailover::new(
        name,
        CellFailoverSpec {
            cell: PRIMARY.into(),
            mode: FailoverMode::Planned,
            reason: "kernel upgrade".into(),
        },
    );
    failovers
        .create(&PostParams::default(), &object)
        .await
        .expect("create failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_failover_object_fails_the_cell_over_once_and_mirrors_its_ledger() {
    let (system, server, _operator, _dir) = pair_under_an_operator().await;
    let client = server.client();
    let failovers: Api<CellFailover> = Api::all(client.clone());
    plan_failover(&failovers, "kernel-upgrade").await;
    let done = wait_for(
        &failovers,
        "kernel-upgrade",
        Duration::from_secs(60),
        "DONE (or MERGED)",
        |f: &CellFailover| {
            // The old primary stays up, so it may rejoin and merge back (MERGED) before a
            // look catches DONE; both are the failover done.
            f.status.as_ref().is_some_and(|s| {
                matches!(s.phase.as_deref(), Some("DONE" | "MERGED"))
                    && holds(&s.conditions, "Ready", "Done")
            })
        },
    )
    .await
    .status
    .expect("status");
    assert_eq!(done.standby_cell.as_deref(), Some(STANDBY));
    assert_eq!(done.moved, 1, "the tenant's key moved");
    assert!(
        done.rto_ms.is_some() && done.started_at.is_some() && done.finished_at.is_some(),
        "{done:?}"
    );
    let ledger = done.ledger.expect("ledger");
    assert!(ledger.in_sync && ledger.lsns_behind == 0, "{ledger:?}");
    let leader = system.cluster.wait_for_leader().await;
    let tenant = tenant_in(&mut system.cluster.control(leader), "acme").await;
    assert_eq!(tenant.primary_cell, STANDBY);
    // Later reconciles never start another.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let of_primary = system
        .list_failovers()
        .await
        .failovers
        .iter()
        .filter(|f| f.cell_id == PRIMARY)
        .count();
    assert_eq!(of_primary, 1);
    assert!(
        events(&client, "kernel-upgrade")
            .await
            .iter()
            .any(|(r, _)| r == "Started")
    );
    // A finished failover's object goes at once.
    failovers
        .delete("kernel-upgrade", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&failovers, "kernel-upgrade", LIMIT).await;
    let made = crate::chart::assert_the_chart_allows_every_call(&server);
    assert!(
        made.iter()
            .any(|c| c.verb == "patch" && c.resource == "cellfailovers/status")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_planned_failover_before_its_switch_rolls_it_back() {
    let (system, server, _operator, _dir) = pair_under_an_operator().await;
    let client = server.client();
    let failovers: Api<CellFailover> = Api::all(client.clone());
    // A standby that cannot catch up holds the failover before its switch.
    system.agents[1].signal_cell(STANDBY, Signal::SIGSTOP);
    plan_failover(&failovers, "held").await;
    let held = wait_for(
        &failovers,
        "held",
        LIMIT,
        "before the switch",
        |f: &CellFailover| {
            f.status
                .as_ref()
                .is_some_and(|s| matches!(s.phase.as_deref(), Some("FREEZING" | "CATCHING_UP")))
        },
    )
    .await
    .status
    .expect("status");
    let id = held.failover_id.expect("id");
    failovers
        .delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&failovers, "held", LIMIT).await;
    system.agents[1].signal_cell(STANDBY, Signal::SIGCONT);

    let leader = system.cluster.wait_for_leader().await;
    let failover = system
        .cluster
        .control(leader)
        .get_failover(GetFailoverRequest {
            failover_id: id.clone(),
        })
        .await
        .expect("get failover")
        .into_inner();
    assert_eq!(
        failover.phase,
        FailoverPhase::RolledBack as i32,
        "{failover:?}"
    );
    assert!(failover.error.starts_with("cancelled"), "{failover:?}");
    let tenant = tenant_in(&mut system.cluster.control(leader), "acme").await;
    assert_eq!(tenant.primary_cell, PRIMARY, "the cell kept its keys");
    assert!(
        events(&client, "held")
            .await
            .iter()
            .any(|(r, _)| r == "Cancelled")
    );
}

/// A control plane of one node with two NORMAL cells registered ACTIVE (no cell process: these
/// tests place tenants and never write to them), and an API server with the CRDs.
async fn control_plane_and_api_server() -> (Cluster, KubeApiServer) {
    // No agent renews these cells' leases: without automatic failover they stay ACTIVE.
    let cluster = Cluster::start(1, &["--no-automatic-failover"]).await;
    cluster
        .add_cells(&[
            ("hz-a-normal-1", "a", PbTier::Normal),
            ("hz-b-normal-2", "b", PbTier::Normal),
        ])
        .await;
    let server = KubeApiServer::start().await;
    server.install_crds().await;
    (cluster, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_backs_off_while_the_control_plane_is_down_and_recovers() {
    let (mut cluster, server) = control_plane_and_api_server().await;
    let dir = scratch();
    let _operator = OperatorProcess::start(
        &server,
        &cluster.endpoints(),
        "operator-0",
        dir.path().join("operator.log"),
        &[],
    );
    let tenants: Api<Tenant> = Api::all(server.client());
    cluster.kill(1).await;
    tenants
        .create(&PostParams::default(), &tenant("t-1", Tier::Normal))
        .await
        .expect("create tenant");
    wait_for(
        &tenants,
        "t-1",
        Duration::from_secs(40),
        "marked unavailable",
        |t: &Tenant| holds(tenant_conditions(t), "Degraded", "ControlPlaneUnavailable"),
    )
    .await;
    cluster.restart(1);
    let placed = wait_for(
        &tenants,
        "t-1",
        Duration::from_secs(60),
        "Ready",
        |t: &Tenant| holds(tenant_conditions(t), "Ready", "Placed"),
    )
    .await
    .status
    .expect("status");
    // Placed, with no standby reported: degraded for that reason, no longer for the outage.
    assert!(
        holds(&placed.conditions, "Degraded", "Unprotected"),
        "{placed:?}"
    );
    let made = tenant_in(&mut cluster.control(cluster.wait_for_leader().await), "t-1").await;
    assert_eq!(
        placed.primary_cell.as_deref(),
        Some(made.primary_cell.as_str())
    );
}

/// The Lease's holder, once there is one.
async fn holder(client: &Client) -> String {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    wait_for(&leases, "cellplane-operator", LIMIT, "held", |l: &Lease| {
        l.spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_ref())
            .is_some_and(|h| !h.is_empty())
    })
    .await
    .spec
    .and_then(|s| s.holder_identity)
    .expect("holder")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_acts_and_another_replica_takes_over_when_it_dies() {
    let (cluster, server) = control_plane_and_api_server().await;
    let dir = scratch();
    let mut replicas: Vec<OperatorProcess> = ["operator-a", "operator-b"]
        .iter()
        .map(|id| {
            OperatorProcess::start(
                &server,
                &cluster.endpoints(),
                id,
                dir.path().join(format!("{id}.log")),
                &[],
            )
        })
        .collect();
    let client = server.client();
    let tenants: Api<Tenant> = Api::all(client.clone());
    let first = holder(&client).await;
    for name in ["t-1", "t-2", "t-3"] {
        tenants
            .create(&PostParams::default(), &tenant(name, Tier::Normal))
            .await
            .expect("create tenant");
    }
    for name in ["t-1", "t-2", "t-3"] {
        wait_for(&tenants, name, LIMIT, "Ready", |t: &Tenant| {
            holds(tenant_conditions(t), "Ready", "Placed")
        })
        .await;
        let reporters: Vec<String> = events(&client, name)
            .await
            .into_iter()
            .map(|(_, i)| i)
            .collect();
        assert!(
            !reporters.is_empty() && reporters.iter().all(|i| *i == first),
            "{name}: {reporters:?}, holder {first}"
        );
    }

    let killed = replicas
        .iter()
        .position(|r| r.identity == first)
        .expect("holder");
    replicas[killed].kill().await;
    let second = replicas[1 - killed].identity.clone();
    tenants
        .create(&PostParams::default(), &tenant("t-4", Tier::Normal))
        .await
        .expect("create tenant");
    wait_for(
        &tenants,
        "t-4",
        LIMIT,
        "Ready after the takeover",
        |t: &Tenant| holds(tenant_conditions(t), "Ready", "Placed"),
    )
    .await;
    assert_eq!(holder(&client).await, second);
    let reporters: Vec<String> = events(&client, "t-4")
        .await
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    assert!(
        !reporters.is_empty() && reporters.iter().all(|i| *i == second),
        "{reporters:?}"
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let transitions = leases
        .get("cellplane-operator")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.lease_transitions);
    assert_eq!(transitions, Some(1), "one holder, then the other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalizer_written_over_a_concurrent_edit_conflicts_and_keeps_the_edit() {
    let server = KubeApiServer::start().await;
    server.install_crds().await;
    let tenants: Api<Tenant> = Api::all(server.client());
    let stale = tenants
        .create(&PostParams::default(), &tenant("t-1", Tier::Normal))
        .await
        .expect("create tenant");
    let label = json!({"metadata": {"labels": {"team": "chat"}}});
    tenants
        .patch("t-1", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label");

    let error = writes::add_finalizer(&tenants, &stale)
        .await
        .expect_err("a write over a stale object");
    assert!(error.is_conflict(), "{error}");
    assert!(
        tenants
            .get("t-1")
            .await
            .expect("get")
            .finalizers()
            .is_empty()
    );

    let fresh = tenants.get("t-1").await.expect("get");
    writes::add_finalizer(&tenants, &fresh)
        .await
        .expect("a write over the fresh object");
    let now = tenants.get("t-1").await.expect("get");
    assert_eq!(now.finalizers(), [writes::FINALIZER]);
    assert_eq!(now.labels().get("team").map(String::as_str), Some("chat"));
}
