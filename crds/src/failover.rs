//! `CellFailover`: a failover of a primary cell to its standby (or, LOW, to a fallback), as
//! ops start it: PLANNED when the cell is reachable, FORCED when it is not. Started once and
//! never edited.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::{ID, ID_MESSAGE, IMMUTABLE, IMMUTABLE_MESSAGE, MAX_ID};

/// How the failover takes the cell's keys away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailoverMode {
    /// The cell freezes, the standby catches up, then the keys switch: nothing is lost.
    Planned,
    /// The cell's lease is waited out, then the standby takes over.
    Forced,
}

#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cellplane.io",
    version = "v1alpha1",
    kind = "CellFailover",
    plural = "cellfailovers",
    shortname = "cpfo",
    category = "cellplane",
    status = "CellFailoverStatus",
    printcolumn = r#"{"name":"Cell","type":"string","jsonPath":".spec.cell"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
pub struct CellFailoverSpec {
    /// The primary to fail over.
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    pub cell: String,
    #[x_kube(validation = Rule::new("self in ['Planned', 'Forced']").message("must be Planned or Forced"))]
    pub mode: FailoverMode,
    /// Why, for the record.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellFailoverStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_id: Option<String>,
    /// Recorded before the failover is started: the number of the newest failover then
    /// (`fo-<n>`). Only a later one can be this object's, should its id not be recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_after: Option<u64>,
    /// FENCING, FREEZING, CATCHING_UP, PROMOTING, DONE, THAWING, ROLLED_BACK, MERGED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The cell that took the failed cell's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_cell: Option<String>,
    /// Route keys moved to the standby.
    #[serde(default)]
    pub moved: u64,
    /// From the start to the standby taking writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_ms: Option<u64>,
    /// What the failover may have lost, and, once the failed cell came back, what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<RpoLedger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The failover's RPO ledger, in LSNs of the failed primary's cell log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RpoLedger {
    /// The failed primary's last LSN as last reported.
    pub primary_lsn: u64,
    /// The newest of those the promoted standby had applied.
    pub standby_lsn: u64,
    /// The standby had every acknowledged message.
    pub in_sync: bool,
    /// Cell-log records the standby may lack.
    pub lsns_behind: u64,
    /// The failed cell came back and what only it held was merged: the count is exact.
    pub merged: bool,
    pub missing_messages: u64,
}
