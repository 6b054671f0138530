//! Leases and failovers as the replicated state keeps them, and the table of a failover's
//! phases.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use serde::{Deserialize, Serialize};

/// A cell's lease as the replicated state knows it: how many renewals were committed, and
/// the length of the last. The control plane times a lease from when it saw a renewal commit,
/// which is after the cell took its ticket, so the cell's lease runs out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub renewals: u64,
    pub lease_ms: u64,
}

/// Automatic failover stopped by a storm: more primaries failed at once than the detector may
/// fail over. It stays stopped until ops resume it; their own failovers still run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltRecord {
    /// The leader's wall clock when it stopped.
    pub since_ms: u64,
    /// The primaries found failed at once.
    pub cells: Vec<Arc<str>>,
}

/// How a failover takes the cell's keys away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Wait until the lease surely ran out on the cell, then promote a standby.
    Forced,
    /// The cell freezes every key, the standby catches up to the frozen LSN, then the keys
    /// switch: nothing is lost, even to an asynchronous standby.
    Planned,
}

impl Mode {
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::FailoverMode::try_from(value).ok()? {
            pb::FailoverMode::Forced => Some(Self::Forced),
            pb::FailoverMode::Planned => Some(Self::Planned),
            pb::FailoverMode::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> pb::FailoverMode {
        match self {
            Self::Forced => pb::FailoverMode::Forced,
            Self::Planned => pb::FailoverMode::Planned,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Forced => "FORCED",
            Self::Planned => "PLANNED",
        }
    }
}

/// Where a failover is. FORCED: FENCING → PROMOTING → DONE (a LOW cell's fallback, a primary
/// already: FENCING → DONE). PLANNED: FREEZING → CATCHING_UP → PROMOTING → DONE, or given up
/// before the switch: → THAWING → ROLLED_BACK. Once the failed cell is back: DONE → MERGED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// The cell's lease is no longer renewed; the control plane waits it out.
    Fencing,
    /// The keys moved to the standby; its agent promotes it.
    Promoting,
    Done,
    /// PLANNED: the cell's agent freezes every key it owns.
    Freezing,
    /// PLANNED: the standby applies the cell's log up to the frozen LSN.
    CatchingUp,
    /// PLANNED, given up: the cell's agent thaws its keys.
    Thawing,
    /// PLANNED, given up: the cell kept its keys.
    RolledBack,
    /// The failed cell came back: what only it held was merged into the keys' owners and
    /// counted in the ledger. Only now may it rejoin.
    Merged,
}

impl Phase {
    /// Every allowed transition, in one place. After the switch a failover only goes forward;
    /// before it a PLANNED one may be given up (its cell never stopped holding a lease and
    /// never wrote while frozen), a FORCED one not: once the cell stopped being renewed,
    /// giving it its keys back would need its lease to be trusted again.
    pub fn can_advance(from: Self, to: Self) -> bool {
        use Phase::*;
        matches!(
            (from, to),
            (Fencing, Promoting)
                | (Promoting, Done)
                | (Freezing, CatchingUp)
                | (CatchingUp, Promoting)
                | (Freezing | CatchingUp, Thawing)
                | (Thawing, RolledBack)
                | (Done, Merged)
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::RolledBack | Self::Merged)
    }

    /// The keys went to the successor (and stay there).
    pub fn switched(self) -> bool {
        matches!(self, Self::Done | Self::Merged)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fencing => "FENCING",
            Self::Promoting => "PROMOTING",
            Self::Done => "DONE",
            Self::Freezing => "FREEZING",
            Self::CatchingUp => "CATCHING_UP",
            Self::Thawing => "THAWING",
            Self::RolledBack => "ROLLED_BACK",
            Self::Merged => "MERGED",
        }
    }

    pub fn to_proto(self) -> pb::FailoverPhase {
        match self {
            Self::Fencing => pb::FailoverPhase::Fencing,
            Self::Promoting => pb::FailoverPhase::Promoting,
            Self::Done => pb::FailoverPhase::Done,
            Self::Freezing => pb::FailoverPhase::Freezing,
            Self::CatchingUp => pb::FailoverPhase::CatchingUp,
            Self::Thawing => pb::FailoverPhase::Thawing,
            Self::RolledBack => pb::FailoverPhase::RolledBack,
            Self::Merged => pb::FailoverPhase::Merged,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        Some(match pb::FailoverPhase::try_from(value).ok()? {
            pb::FailoverPhase::Fencing => Self::Fencing,
            pb::FailoverPhase::Promoting => Self::Promoting,
            pb::FailoverPhase::Done => Self::Done,
            pb::FailoverPhase::Freezing => Self::Freezing,
            pb::FailoverPhase::CatchingUp => Self::CatchingUp,
            pb::FailoverPhase::Thawing => Self::Thawing,
            pb::FailoverPhase::RolledBack => Self::RolledBack,
            pb::FailoverPhase::Merged => Self::Merged,
            pb::FailoverPhase::Unspecified => return None,
        })
    }
}

/// What a failover may have lost, in the failed primary's LSNs, as the control plane knew
/// them when it moved the keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The failed primary's last LSN its agent reported.
    pub primary_lsn: u64,
    /// The newest primary LSN the standby had applied, as last reported.
    pub standby_lsn: u64,
    /// The standby was recorded IN_SYNC: it had every acknowledged message.
    pub in_sync: bool,
}

impl Ledger {
    /// Cell-log records of the primary the standby may lack; none for a standby in sync,
    /// which has every record the primary acknowledged (the reports can only lag that).
    pub fn lsns_behind(&self) -> u64 {
        if self.in_sync {
            0
        } else {
            self.primary_lsn.saturating_sub(self.standby_lsn)
        }
    }
}

/// A route key the failed cell held, and the messages of it that only the failed cell had,
/// counted when they were merged into the key's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedKey {
    pub tenant_id: Arc<str>,
    /// Empty for the tenant's key.
    pub conversation_id: Arc<str>,
    pub messages: u64,
}

/// One failover. Its id is the revision that created it, shown as `fo-<revision>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub cell_id: Arc<str>,
    /// The standby promoted in its place, or (`fallback`) the LOW cell that took its keys.
    pub standby_cell: Arc<str>,
    /// A LOW cell has no standby: its keys went to another LOW primary of its region, for new
    /// messages; the history stays on the failed cell until it is merged back.
    pub fallback: bool,
    pub mode: Mode,
    pub phase: Phase,
    /// Started by the failure detector, not by ops.
    pub automatic: bool,
    pub reason: String,
    /// The failed cell's tenants, whose keys moved (filled at the switch).
    pub tenants: Vec<Arc<str>>,
    /// Conversations routed to the failed cell on their own, which moved too.
    pub conversations: Vec<(Arc<str>, Arc<str>)>,
    pub keys_moved: u64,
    /// Filled at the switch.
    pub ledger: Ledger,
    /// The leader's wall clock when it began, switched the keys and finished.
    pub created_ms: u64,
    pub switched_ms: u64,
    pub done_ms: u64,
    pub updated_revision: u64,
    /// PLANNED: the cell's last LSN once every key froze, and when.
    pub frozen_lsn: u64,
    pub frozen_ms: u64,
    /// Why a PLANNED failover was given up.
    pub error: Option<String>,
    /// MERGED: per key, what only the failed cell held; and when (the leader's clock).
    pub merged: Vec<MergedKey>,
    pub merged_ms: u64,
}

impl FailoverRecord {
    pub fn to_proto(&self, id: u64) -> pb::Failover {
        pb::Failover {
            failover_id: display_id(id),
            cell_id: self.cell_id.to_string(),
            standby_cell: self.standby_cell.to_string(),
            fallback: self.fallback,
            mode: self.mode.to_proto() as i32,
            phase: self.phase.to_proto() as i32,
            automatic: self.automatic,
            reason: self.reason.clone(),
            tenants: self.tenants.iter().map(|t| t.to_string()).collect(),
            keys_moved: self.keys_moved,
            ledger: Some(pb::RpoLedger {
                primary_lsn: self.ledger.primary_lsn,
                standby_lsn: self.ledger.standby_lsn,
                in_sync: self.ledger.in_sync,
                lsns_behind: self.ledger.lsns_behind(),
                merged: self.phase == Phase::Merged,
                missing_messages: self.merged.iter().map(|k| k.messages).sum(),
                missing: self
                    .merged
                    .iter()
                    .map(|k| pb::MergedKey {
                        tenant_id: k.tenant_id.to_string(),
                        conversation_id: k.conversation_id.to_string(),
                        messages: k.messages,
                    })
                    .collect(),
            }),
            conversations: self
                .conversations
                .iter()
                .map(|(tenant, conversation)| pb::MovedConversation {
                    tenant_id: tenant.to_string(),
                    conversation_id: conversation.to_string(),
                })
                .collect(),
            merged_ms: self.merged_ms,
            created_ms: self.created_ms,
            switched_ms: self.switched_ms,
            done_ms: self.done_ms,
            revision: self.updated_revision,
            frozen_lsn: self.frozen_lsn,
            frozen_ms: self.frozen_ms,
            error: self.error.clone().unwrap_or_default(),
        }
    }
}

/// The printed form of a failover id.
pub fn display_id(id: u64) -> String {
    format!("fo-{id}")
}

/// Parses `fo-<n>`; `None` for anything else.
pub fn parse_id(text: &str) -> Option<u64> {
    crate::migration::record::parse_prefixed(text, "fo-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_only_goes_forward_and_only_a_planned_one_is_given_up() {
        use Phase::*;
        for (from, to) in [
            (Fencing, Promoting),
            (Promoting, Done),
            (Freezing, CatchingUp),
            (CatchingUp, Promoting),
            (Freezing, Thawing),
            (CatchingUp, Thawing),
            (Thawing, RolledBack),
            (Done, Merged),
        ] {
            assert!(Phase::can_advance(from, to), "{from:?} -> {to:?}");
        }
        for (from, to) in [
            (Promoting, Fencing),
            (Done, Promoting),
            (Fencing, Done),
            (Done, Done),
            (Fencing, Fencing),
            (Fencing, Thawing),
            (Promoting, Thawing),
            (Freezing, Promoting),
            (RolledBack, Freezing),
            (RolledBack, Merged),
            (Merged, Done),
        ] {
            assert!(!Phase::can_advance(from, to), "{from:?} -> {to:?}");
        }
        assert!(RolledBack.is_terminal() && Done.is_terminal() && Merged.is_terminal());
    }

    #[test]
    fn an_in_sync_standby_lacks_nothing() {
        let ledger = Ledger {
            primary_lsn: 120,
            standby_lsn: 100,
            in_sync: true,
        };
        assert_eq!(ledger.lsns_behind(), 0);
        let ledger = Ledger {
            in_sync: false,
            ..ledger
        };
        assert_eq!(ledger.lsns_behind(), 20);
    }

    #[test]
    fn ids_round_trip_and_garbage_is_refused() {
        assert_eq!(parse_id(&display_id(7)), Some(7));
        assert_eq!(parse_id("fo-0"), None);
        assert_eq!(parse_id("mig-7"), None);
    }
}
