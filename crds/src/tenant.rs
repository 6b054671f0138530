//! `Tenant`: a tenant, placed in its home region at its tier. Changing the tier is a
//! migration to a cell of the new tier; the home region never changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::Tier;
use crate::rules::{ID, ID_MESSAGE, IMMUTABLE, IMMUTABLE_MESSAGE, MAX_ID};

#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cellplane.io",
    version = "v1alpha1",
    kind = "Tenant",
    plural = "tenants",
    shortname = "cptenant",
    category = "cellplane",
    status = "TenantStatus",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Cell","type":"string","jsonPath":".status.primaryCell"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    pub tier: Tier,
    /// Where the tenant's primary cell is placed.
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    #[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
    pub home_region: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_cell: Option<String>,
    #[serde(default)]
    pub standby_cells: Vec<String>,
    /// The route's epoch.
    #[serde(default)]
    pub epoch: u64,
    /// Placed, Migrating, Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
