//! The CRDs on a real API server: each is established, valid objects are accepted, and every
//! CEL rule and schema bound rejects an object that breaks it with a 422, on create or, for
//! the immutability rules, on update.

use cellplane_crds::{
    Cell, CellFailover, CellFailoverSpec, CellSpec, FailoverMode, Migration, MigrationSpec, Tenant,
    TenantSpec, Tier,
};
use cellplane_tests::apiserver::KubeApiServer;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, Resource};
use serde_json::{Value, json};

/// Creates `object` (JSON) as a `K`, answering the server's status code on refusal.
async fn create<K: Resource<DynamicType = ()>>(client: &Client, object: Value) -> Result<(), u16> {
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let object: DynamicObject = serde_json::from_value(object).expect("object");
    api.create(&PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            kube::Error::Api(status) => status.code,
            other => panic!("not an API refusal: {other}"),
        })
}

/// Asserts that creating `object` is refused with a 422 that says `why`.
async fn refused<K: Resource<DynamicType = ()>>(client: &Client, object: Value, why: &str) {
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let object: DynamicObject = serde_json::from_value(object.clone()).expect("object");
    match api.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{why}: {status:?}");
            assert!(status.message.contains(why), "{why}: {}", status.message);
        }
        other => panic!("{object:?} should be refused ({why}): {other:?}"),
    }
}

/// Asserts that applying `patch` (a merge patch) to an existing object is refused with a 422
/// that says `why`.
async fn update_refused<K: Resource<DynamicType = ()>>(
    client: &Client,
    name: &str,
    patch: Value,
    why: &str,
) {
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{why}: {status:?}");
            assert!(status.message.contains(why), "{why}: {}", status.message);
        }
        other => panic!("{patch} on {name} should be refused ({why}): {other:?}"),
    }
}

fn cell(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "cellplane.io/v1alpha1", "kind": "Cell", "metadata": {"name": name}, "spec": spec})
}

fn primary() -> Value {
    json!({"region": "cn-hangzhou", "zone": "hz-a", "tier": "HIGH", "endpoint": "10.0.0.1:7100", "capacity": 100})
}

fn with(mut base: Value, field: &str, value: Value) -> Value {
    base[field] = value;
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_of_every_crd_holds_on_a_real_api_server() {
    let server = KubeApiServer::start().await;
    let client = server.client();
    server.install_crds().await;

    // Valid objects, through the typed API.
    let cells: Api<Cell> = Api::all(client.clone());
    cells
        .create(
            &PostParams::default(),
            &Cell::new(
                "hz-a-high-1",
                CellSpec {
                    region: "cn-hangzhou".into(),
                    zone: "hz-a".into(),
                    tier: Tier::High,
                    endpoint: "10.0.0.1:7100".into(),
                    capacity: 100,
                    standby_of: None,
                    primary_zone: None,
                },
            ),
        )
        .await
        .expect("a primary");
    create::<Cell>(
        &client,
        cell(
            "hz-b-high-s1",
            json!({"region": "cn-hangzhou", "zone": "hz-b", "tier": "HIGH", "endpoint": "10.0.0.2:7100",
                   "capacity": 100, "standbyOf": "hz-a-high-1", "primaryZone": "hz-a"}),
        ),
    )
    .await
    .expect("a standby in another zone");
    let tenants: Api<Tenant> = Api::all(client.clone());
    tenants
        .create(
            &PostParams::default(),
            &Tenant::new(
                "acme",
                TenantSpec {
                    tier: Tier::Normal,
                    home_region: "cn-hangzhou".into(),
                },
            ),
        )
        .await
        .expect("a tenant");
    let migrations: Api<Migration> = Api::all(client.clone());
    migrations
        .create(
            &PostParams::default(),
            &Migration::new(
                "acme-to-b",
                MigrationSpec {
                    tenant: "acme".into(),
                    conversation: None,
                    target_cell: "hz-b-normal-1".into(),
                },
            ),
        )
        .await
        .expect("a migration");
    let failovers: Api<CellFailover> = Api::all(client.clone());
    failovers
        .create(
            &PostParams::default(),
            &CellFailover::new(
                "hz-a-high-1-drill",
                CellFailoverSpec {
                    cell: "hz-a-high-1".into(),
                    mode: FailoverMode::Planned,
                    reason: "drill".into(),
                },
            ),
        )
        .await
        .expect("a failover");

    // Every rule, broken on create.
    refused::<Cell>(
        &client,
        cell(
            "bad-region",
            with(primary(), "region", json!("cn hangzhou")),
        ),
        "must be 1 to 128 characters",
    )
    .await;
    refused::<Cell>(
        &client,
        cell("bad-tier", with(primary(), "tier", json!("MEDIUM"))),
        "Unsupported value",
    )
    .await;
    refused::<Cell>(
        &client,
        cell("bad-endpoint", with(primary(), "endpoint", json!("nohost"))),
        "must be host:port",
    )
    .await;
    refused::<Cell>(
        &client,
        cell("no-capacity", with(primary(), "capacity", json!(0))),
        "capacity",
    )
    .await;
    refused::<Cell>(
        &client,
        cell("long-zone", with(primary(), "zone", json!("z".repeat(129)))),
        "Too long",
    )
    .await;
    refused::<Cell>(
        &client,
        cell(
            "lonely-standby",
            with(primary(), "standbyOf", json!("hz-a-high-1")),
        ),
        "standbyOf and primaryZone are given together",
    )
    .await;
    refused::<Cell>(
        &client,
        cell(
            "same-zone-standby",
            with(
                with(primary(), "standbyOf", json!("hz-a-high-1")),
                "primaryZone",
                json!("hz-a"),
            ),
        ),
        "a standby is never in its primary's zone",
    )
    .await;
    let tenant = |spec: Value| json!({"apiVersion": "cellplane.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "t2"}, "spec": spec});
    refused::<Tenant>(
        &client,
        tenant(json!({"tier": "GOLD", "homeRegion": "cn-hangzhou"})),
        "Unsupported value",
    )
    .await;
    refused::<Tenant>(
        &client,
        tenant(json!({"tier": "LOW", "homeRegion": "cn/hangzhou"})),
        "must be 1 to 128 characters",
    )
    .await;
    let migration = |spec: Value| json!({"apiVersion": "cellplane.io/v1alpha1", "kind": "Migration", "metadata": {"name": "m2"}, "spec": spec});
    refused::<Migration>(
        &client,
        migration(json!({"tenant": "acme", "targetCell": "no such cell!"})),
        "must be 1 to 128 characters",
    )
    .await;
    let failover = |spec: Value| json!({"apiVersion": "cellplane.io/v1alpha1", "kind": "CellFailover", "metadata": {"name": "f2"}, "spec": spec});
    refused::<CellFailover>(
        &client,
        failover(json!({"cell": "hz-a-high-1", "mode": "Sometimes"})),
        "Unsupported value",
    )
    .await;
    refused::<CellFailover>(
        &client,
        failover(json!({"cell": "hz-a-high-1", "mode": "Forced", "reason": "r".repeat(257)})),
        "Too long",
    )
    .await;

    // Immutability, on update.
    update_refused::<Cell>(
        &client,
        "hz-a-high-1",
        json!({"spec": {"region": "cn-beijing"}}),
        "is immutable",
    )
    .await;
    update_refused::<Cell>(
        &client,
        "hz-a-high-1",
        json!({"spec": {"zone": "hz-c"}}),
        "is immutable",
    )
    .await;
    update_refused::<Cell>(
        &client,
        "hz-a-high-1",
        json!({"spec": {"tier": "LOW"}}),
        "is immutable",
    )
    .await;
    update_refused::<Cell>(
        &client,
        "hz-b-high-s1",
        json!({"spec": {"standbyOf": "hz-c-high-1"}}),
        "is immutable",
    )
    .await;
    update_refused::<Tenant>(
        &client,
        "acme",
        json!({"spec": {"homeRegion": "cn-beijing"}}),
        "is immutable",
    )
    .await;
    update_refused::<Migration>(
        &client,
        "acme-to-b",
        json!({"spec": {"targetCell": "hz-c-normal-1"}}),
        "is immutable",
    )
    .await;
    update_refused::<CellFailover>(
        &client,
        "hz-a-high-1-drill",
        json!({"spec": {"mode": "Forced"}}),
        "is immutable",
    )
    .await;
    // A tenant's tier may change: that is a migration.
    tenants
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tier": "HIGH"}})),
        )
        .await
        .expect("a tier change");

    // The status subresource: a migration whose source is its target is refused.
    migrations
        .patch_status(
            "acme-to-b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"sourceCell": "hz-a-normal-1", "phase": "COPYING"}})),
        )
        .await
        .expect("status of a migration");
    match migrations
        .patch_status(
            "acme-to-b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"sourceCell": "hz-b-normal-1"}})),
        )
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("targetCell must differ"),
                "{}",
                status.message
            );
        }
        other => panic!("a migration to its own cell: {other:?}"),
    }
}
