//! The writes the operator makes to its objects: its finalizer
//! (optimistic: guarded by the object's resourceVersion, so a concurrent edit is a 409 and the
//! reconcile runs again on the fresh object) and its status (server-side apply, by the
//! operator's field manager).

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::conditions::{Conditions, WithConditions};

use super::{Error, MANAGER};

/// Holds an object until the operator has undone what it stands for in the control plane.
pub const FINALIZER: &str = "cellplane.io/cleanup";

pub fn has_finalizer<K: Resource>(object: &K) -> bool {
    object.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer unless the object has it.
pub async fn add_finalizer<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if has_finalizer(object) {
        return Ok(());
    }
    let mut finalizers = object.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    set(api, object, finalizers).await
}

/// Lets the object go.
pub async fn remove_finalizer<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if !has_finalizer(object) {
        return Ok(());
    }
    let finalizers = object
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set(api, object, finalizers).await
}

async fn set<K>(api: &Api<K>, object: &K, finalizers: Vec<String>) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": object.resource_version(),
        }
    });
    api.patch(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Writes `status` with `conditions` by server-side apply (the operator owns every status
/// field), keeping the transition times of the conditions that did not change; nothing when
/// the object already has that status.
pub async fn write_status<K>(
    api: &Api<K>,
    object: &K,
    mut status: K::Status,
    conditions: &Conditions,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + std::fmt::Debug,
    K::Status: WithConditions,
{
    let generation = object.meta().generation;
    let existing = object.status().map(|s| s.conditions()).unwrap_or_default();
    status.set_conditions(
        generation,
        conditions.to_k8s(existing, generation, Timestamp::now()),
    );
    // Every resync and every poll of a run in progress comes here: most find nothing changed,
    // and need not ask the API server for a write.
    if object.status() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
