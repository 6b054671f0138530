//! `Cell`: a cell registered with the control plane. Its region, zone and tier are what
//! placement and failover decide by, so they never change; a standby names its primary and the
//! primary's zone, which must differ from its own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::Tier;
use crate::rules::{ID, ID_MESSAGE, IMMUTABLE, IMMUTABLE_MESSAGE, MAX_ID};

#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cellplane.io",
    version = "v1alpha1",
    kind = "Cell",
    plural = "cells",
    shortname = "cpcell",
    category = "cellplane",
    status = "CellStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Region","type":"string","jsonPath":".spec.region"}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".spec.zone"}"#,
    printcolumn = r#"{"name":"Tenants","type":"integer","jsonPath":".status.tenants"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.standbyOf) == has(self.primaryZone)").message("standbyOf and primaryZone are given together"))]
#[x_kube(validation = Rule::new("!has(self.standbyOf) || !has(self.primaryZone) || self.primaryZone != self.zone").message("a standby is never in its primary's zone"))]
pub struct CellSpec {
    /// The region the cell serves.
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    #[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
    pub region: String,
    /// Its zone within the region.
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    #[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
    pub zone: String,
    /// The tier of the tenants it holds.
    #[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
    pub tier: Tier,
    /// Where the cell serves gRPC (`host:port`).
    #[schemars(length(min = 3, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[^:]+:[0-9]{1,5}$')").message("must be host:port"))]
    pub endpoint: String,
    /// Tenants it may hold.
    #[schemars(range(min = 1))]
    pub capacity: u64,
    /// The primary this cell is a standby of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    #[x_kube(validation = Rule::new(IMMUTABLE).message(IMMUTABLE_MESSAGE))]
    pub standby_of: Option<String>,
    /// The zone of that primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ID))]
    #[x_kube(validation = Rule::new(ID).message(ID_MESSAGE))]
    pub primary_zone: Option<String>,
}

/// What the control plane knows of the cell.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellStatus {
    /// JOINING, ACTIVE, DRAINING, FAILED, DEMOTED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Route keys on the cell.
    #[serde(default)]
    pub tenants: u64,
    /// A primary's protection: IN_SYNC, CATCHING_UP, DEGRADED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<String>,
    /// How many log records its slowest standby is behind.
    #[serde(default)]
    pub lag: u64,
    /// When its agent last reported it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
