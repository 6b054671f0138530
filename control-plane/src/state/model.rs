//! The records the control plane keeps: cells, tenants and conversation overrides.
//!
//! Strings are `Arc<str>` so a cell id is stored once and shared by the millions of tenants
//! placed on it, and so cloning a record into an event or an answer costs a reference count.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use serde::{Deserialize, Serialize};

/// How a cell protects its data, and what a tenant is entitled to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    High,
    Normal,
    Low,
}

impl Tier {
    /// The tier named by a proto enum value; `None` for UNSPECIFIED or a value this build does
    /// not know.
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::Tier::try_from(value).ok()? {
            pb::Tier::High => Some(Self::High),
            pb::Tier::Normal => Some(Self::Normal),
            pb::Tier::Low => Some(Self::Low),
            pb::Tier::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> pb::Tier {
        match self {
            Self::High => pb::Tier::High,
            Self::Normal => pb::Tier::Normal,
            Self::Low => pb::Tier::Low,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::High => "HIGH",
            Self::Normal => "NORMAL",
            Self::Low => "LOW",
        }
    }
}

/// The life of a cell. Only `Active` cells receive new placements and moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CellState {
    Joining,
    Active,
    Draining,
    Demoted,
    Failed,
}

impl CellState {
    /// The allowed transitions, in one place. A cell that failed or was demoted must rejoin
    /// (`Joining`) before it can serve again, so it never silently resumes ownership.
    pub fn can_move(from: Self, to: Self) -> bool {
        use CellState::*;
        from == to
            || matches!(
                (from, to),
                (Joining, Active)
                    | (Active, Draining)
                    | (Draining, Active)
                    | (Joining | Active | Draining, Demoted)
                    | (Joining | Active | Draining | Demoted, Failed)
                    | (Demoted | Failed, Joining)
            )
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::CellState::try_from(value).ok()? {
            pb::CellState::Joining => Some(Self::Joining),
            pb::CellState::Active => Some(Self::Active),
            pb::CellState::Draining => Some(Self::Draining),
            pb::CellState::Demoted => Some(Self::Demoted),
            pb::CellState::Failed => Some(Self::Failed),
            pb::CellState::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> pb::CellState {
        match self {
            Self::Joining => pb::CellState::Joining,
            Self::Active => pb::CellState::Active,
            Self::Draining => pb::CellState::Draining,
            Self::Demoted => pb::CellState::Demoted,
            Self::Failed => pb::CellState::Failed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Joining => "JOINING",
            Self::Active => "ACTIVE",
            Self::Draining => "DRAINING",
            Self::Demoted => "DEMOTED",
            Self::Failed => "FAILED",
        }
    }
}

/// How a primary's data is protected now, as its agent recorded it. A synchronous primary goes
/// on without its standby only after `Degraded` is recorded, so the control plane never
/// believes a standby is in sync when it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protection {
    /// No synchronous standby.
    None,
    /// The primary waits for its synchronous standby, which may still lack earlier messages.
    CatchingUp,
    /// The synchronous standby has every message the primary acknowledged.
    InSync,
    /// The primary goes on without its synchronous standby.
    Degraded,
}

impl Protection {
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::Protection::try_from(value).ok()? {
            pb::Protection::None => Some(Self::None),
            pb::Protection::CatchingUp => Some(Self::CatchingUp),
            pb::Protection::InSync => Some(Self::InSync),
            pb::Protection::Degraded => Some(Self::Degraded),
            pb::Protection::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> pb::Protection {
        match self {
            Self::None => pb::Protection::None,
            Self::CatchingUp => pb::Protection::CatchingUp,
            Self::InSync => pb::Protection::InSync,
            Self::Degraded => pb::Protection::Degraded,
        }
    }
}

/// A primary's protection and the revision it was recorded at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionRecord {
    pub protection: Protection,
    pub revision: u64,
}

/// One IM cell as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRecord {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub tier: Tier,
    /// Where the cell serves its Messaging API; part of every route answer.
    pub endpoint: Arc<str>,
    pub state: CellState,
    /// Tenants the cell is sized for; placement keeps `load` below it.
    pub capacity: u64,
    /// Tenants placed on the cell, kept by apply so placement never scans all tenants.
    pub load: u64,
    pub standby_of: Option<Arc<str>>,
    pub registered_revision: u64,
    /// What the cell's agent last reported; `None` until it first does.
    pub health: Option<CellHealth>,
}

/// A standby as its primary last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyHealth {
    pub cell_id: Arc<str>,
    pub acked_lsn: u64,
    pub lag_lsns: u64,
    pub lag_ms: u64,
    pub connected: bool,
    pub bootstraps: u64,
}

/// A standby's position in its primary's cell log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHealth {
    pub applied_lsn: u64,
    pub primary_lsn: u64,
    pub bootstrapping: bool,
    pub bootstrap_rows: u64,
    pub connected: bool,
}

/// Replication as a cell's agent last reported it: a primary's standbys, or a standby's
/// position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationHealth {
    pub standbys: Vec<StandbyHealth>,
    pub replica: Option<ReplicaHealth>,
}

/// A cell's health and size as its agent last saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellHealth {
    /// The agent's clock when it looked, in milliseconds since the Unix epoch.
    pub last_heartbeat_ms: u64,
    pub healthy: bool,
    pub last_lsn: u64,
    pub conversations: u64,
    pub messages: u64,
    pub disk_bytes: u64,
}

impl CellRecord {
    pub fn spare(&self) -> u64 {
        self.capacity.saturating_sub(self.load)
    }
}

/// Whether a tenant is settled or on the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TenantState {
    Active,
    Migrating,
}

/// One tenant: its entitlement and where its conversations live unless overridden.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub tier: Tier,
    pub home_region: Arc<str>,
    pub primary_cell: Arc<str>,
    /// Fencing token of the tenant's placement; grows with every move.
    pub epoch: u64,
    pub state: TenantState,
    /// Overrides of this tenant, kept by apply so answers need no range scan.
    pub override_count: u64,
}

/// A conversation routed away from its tenant's placement (a hot group, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideRecord {
    pub cell_id: Arc<str>,
    /// Starts above the tenant's epoch at the time of the move and only grows, so the epoch a
    /// conversation resolves to never goes backwards.
    pub epoch: u64,
}

/// The key of a route: a tenant, or one of its conversations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey {
    pub tenant_id: Arc<str>,
    /// `None` for the tenant's placement.
    pub conversation_id: Option<Arc<str>>,
}

impl RouteKey {
    pub fn tenant(tenant_id: impl Into<Arc<str>>) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            conversation_id: None,
        }
    }

    pub fn conversation(
        tenant_id: impl Into<Arc<str>>,
        conversation_id: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            conversation_id: Some(conversation_id.into()),
        }
    }
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.conversation_id {
            Some(conversation) => write!(f, "{}/{}", self.tenant_id, conversation),
            None => write!(f, "{}", self.tenant_id),
        }
    }
}

/// A resolved route: the answer to "who owns this key".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    pub key: RouteKey,
    pub cell_id: Arc<str>,
    pub endpoint: Arc<str>,
    pub epoch: u64,
    /// The revision at which the answer was read.
    pub revision: u64,
    pub is_override: bool,
}

impl RouteView {
    pub fn to_proto(&self) -> cellplane_api::proto::routing::Route {
        cellplane_api::proto::routing::Route {
            tenant_id: self.key.tenant_id.to_string(),
            conversation_id: self
                .key
                .conversation_id
                .as_deref()
                .unwrap_or_default()
                .to_string(),
            cell_id: self.cell_id.to_string(),
            endpoint: self.endpoint.to_string(),
            epoch: self.epoch,
            revision: self.revision,
            is_override: self.is_override,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_transitions_follow_the_table() {
        use CellState::*;
        assert!(CellState::can_move(Joining, Active));
        assert!(CellState::can_move(Active, Demoted));
        assert!(CellState::can_move(Failed, Joining));
        assert!(
            !CellState::can_move(Failed, Active),
            "a failed cell must rejoin first"
        );
        assert!(
            !CellState::can_move(Demoted, Active),
            "a demoted cell must rejoin first"
        );
        assert!(!CellState::can_move(Joining, Draining));
        assert!(CellState::can_move(Active, Active));
    }

    #[test]
    fn proto_enums_round_trip_and_unknown_values_are_refused() {
        for tier in [Tier::High, Tier::Normal, Tier::Low] {
            assert_eq!(Tier::from_proto(tier.to_proto() as i32), Some(tier));
        }
        assert_eq!(Tier::from_proto(0), None);
        assert_eq!(Tier::from_proto(42), None);
        assert_eq!(CellState::from_proto(99), None);
    }
}
