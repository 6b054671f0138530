//! `Migration`: one history-first move of a tenant, or of one of its conversations, to a
//! target cell. It is started once and never edited; the cell it moves from is in its status,
//! and the target must differ from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::rules::{ID, ID_MESSAGE, IMMUTABLE, IMMUTABLE_MESSAGE, MAX_ID};

#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cellplane.io",
    version = "v1alpha1",
    kind = "Migration",
    plural = "migrations",
    shortname = "cpmig",
    category = "cellplane",
    status = "MigrationStatus",
    validation = Rule::new("!has(self.status) || !has(self.status.sourceCell) || self.status.sourceCell != self.spec.targetCell").message("targetCell must differ from the cell the key is on"),
    printcolumn = r#"{"name":"Tenant","type":"string","jsonPath":".spec.tenant"}"#,
    printcolumn = r#"{"name":"Cell","type":"string","jsonPath":".spec.targetCell"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
pub struct MigrationSpec {
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    pub tenant: String,
    /// Only this conversation, not the whole tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    pub conversation: Option<String>,
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    pub target_cell: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The control plane's id of the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Recorded before the migration is started: the number of the tenant's newest migration
    /// then (`mig-<n>`). Only a later one can be this object's, should its id not be recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_after: Option<u64>,
    /// The cell the key moves from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_ID))]
    pub source_cell: Option<String>,
    /// PLANNED, COPYING, CATCHING_UP, FREEZING, SWITCHING, CLEANUP, DONE, ROLLED_BACK, FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Records copied so far.
    #[serde(default)]
    pub copied: u64,
    /// Source-log records the target is behind.
    #[serde(default)]
    pub lag: u64,
    /// How long writes to the key were paused at the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
