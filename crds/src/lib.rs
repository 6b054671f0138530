//! cellplane's Kubernetes custom resources (group `cellplane.io`, version `v1alpha1`), as Rust
//! types whose schemas, CEL rules, status subresources and printer columns make the CRDs:
//!
//! - [`Cell`]: a registered cell (its region, zone and tier never change);
//! - [`Tenant`]: a tenant and its tier (a tier change is a migration);
//! - [`Migration`]: one history-first move of a tenant or a conversation;
//! - [`CellFailover`]: a failover of a primary cell, PLANNED or FORCED.
//!
//! Every resource is cluster-scoped and named by its id. `crdgen` writes `crds/yaml/`, and a
//! test fails when that YAML differs from what these types generate.

mod cell;
mod failover;
mod migration;
mod rules;
mod tenant;

pub use cell::{Cell, CellSpec, CellStatus};
pub use failover::{CellFailover, CellFailoverSpec, CellFailoverStatus, FailoverMode, RpoLedger};
pub use migration::{Migration, MigrationSpec, MigrationStatus};
pub use tenant::{Tenant, TenantSpec, TenantStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every cellplane resource.
pub const GROUP: &str = "cellplane.io";

/// A tenant's or a cell's availability tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Tier {
    High,
    Normal,
    Low,
}

/// Every CRD, with the file `crdgen` writes it to.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("cells.yaml", Cell::crd()),
        ("tenants.yaml", Tenant::crd()),
        ("migrations.yaml", Migration::crd()),
        ("cellfailovers.yaml", CellFailover::crd()),
    ]
    .into_iter()
    .map(|(file, crd)| (file, with_kubernetes_formats(crd)))
    .collect()
}

/// The CRD with each unsigned integer's format as Kubernetes names it: the API server stores
/// every integer as an int64 and warns at each apply about formats it does not know, such as
/// the `uint64` schemars gives a `u64` (whose `minimum: 0` stays).
fn with_kubernetes_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn rename(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(format) = map.get_mut("format")
                    && matches!(format.as_str(), Some("uint64" | "uint32" | "uint"))
                {
                    *format = "int64".into();
                }
                map.values_mut().for_each(rename);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(rename),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD is JSON");
    rename(&mut value);
    serde_json::from_value(value).expect("the same CRD")
}

/// A CRD as YAML, as `crdgen` writes it.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_integer_format_is_one_kubernetes_knows() {
        for (file, crd) in crds() {
            let yaml = to_yaml(&crd).expect("yaml");
            assert!(!yaml.contains("format: uint"), "{file}");
            assert!(yaml.contains("format: int64"), "{file}");
        }
    }

    #[test]
    fn the_committed_yaml_is_what_the_types_generate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("yaml");
        for (file, crd) in crds() {
            let generated = to_yaml(&crd).expect("yaml");
            let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(
                committed == generated,
                "crds/yaml/{file} differs from the types: run `cargo run -p cellplane-crds --bin crdgen`"
            );
        }
    }
}
