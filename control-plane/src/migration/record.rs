//! A migration as the replicated state keeps it, and the table of its phases.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use serde::{Deserialize, Serialize};

use crate::state::model::{RouteKey, Tier};

/// Where a migration is (DESIGN §7). The write pause is `Freezing` → `Switching`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Planned,
    Copying,
    CatchingUp,
    Freezing,
    Switching,
    Cleanup,
    Done,
    /// Cancelled before the switch: the key stays on its source, unfrozen.
    RolledBack,
    /// Given up on an error before the switch: the key stays on its source, unfrozen.
    Failed,
}

impl Phase {
    /// Every allowed transition, in one place. Staying in a phase records progress. Before the
    /// switch a migration can always be rolled back or failed; after it, only forward.
    pub fn can_advance(from: Self, to: Self) -> bool {
        use Phase::*;
        (from == to && !from.is_terminal())
            || matches!(
                (from, to),
                (Planned, Copying)
                    | (Copying, CatchingUp)
                    | (CatchingUp, Freezing)
                    | (Freezing, Switching)
                    | (Switching, Cleanup)
                    | (Cleanup, Done)
                    | (
                        Planned | Copying | CatchingUp | Freezing,
                        RolledBack | Failed
                    )
            )
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::RolledBack | Self::Failed)
    }

    /// Whether the route has not switched yet, so the migration can still be rolled back.
    pub fn before_switch(self) -> bool {
        matches!(
            self,
            Self::Planned | Self::Copying | Self::CatchingUp | Self::Freezing
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Planned => "PLANNED",
            Self::Copying => "COPYING",
            Self::CatchingUp => "CATCHING_UP",
            Self::Freezing => "FREEZING",
            Self::Switching => "SWITCHING",
            Self::Cleanup => "CLEANUP",
            Self::Done => "DONE",
            Self::RolledBack => "ROLLED_BACK",
            Self::Failed => "FAILED",
        }
    }

    pub fn to_proto(self) -> pb::MigrationPhase {
        match self {
            Self::Planned => pb::MigrationPhase::Planned,
            Self::Copying => pb::MigrationPhase::Copying,
            Self::CatchingUp => pb::MigrationPhase::CatchingUp,
            Self::Freezing => pb::MigrationPhase::Freezing,
            Self::Switching => pb::MigrationPhase::Switching,
            Self::Cleanup => pb::MigrationPhase::Cleanup,
            Self::Done => pb::MigrationPhase::Done,
            Self::RolledBack => pb::MigrationPhase::RolledBack,
            Self::Failed => pb::MigrationPhase::Failed,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        Some(match pb::MigrationPhase::try_from(value).ok()? {
            pb::MigrationPhase::Planned => Self::Planned,
            pb::MigrationPhase::Copying => Self::Copying,
            pb::MigrationPhase::CatchingUp => Self::CatchingUp,
            pb::MigrationPhase::Freezing => Self::Freezing,
            pb::MigrationPhase::Switching => Self::Switching,
            pb::MigrationPhase::Cleanup => Self::Cleanup,
            pb::MigrationPhase::Done => Self::Done,
            pb::MigrationPhase::RolledBack => Self::RolledBack,
            pb::MigrationPhase::Failed => Self::Failed,
            pb::MigrationPhase::Unspecified => return None,
        })
    }
}

/// How far the copy got, as the agent carrying it out reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The source's cell-log LSN the target has applied for the key.
    pub copied_lsn: u64,
    /// The source's last LSN when last asked: `source_lsn - copied_lsn` is the lag.
    pub source_lsn: u64,
    /// The source's last LSN when the key froze (0 before).
    pub frozen_lsn: u64,
    pub rows_copied: u64,
    pub bytes_copied: u64,
}

impl Progress {
    pub fn lag(&self) -> u64 {
        self.source_lsn.saturating_sub(self.copied_lsn)
    }

    /// Merges a newer report: positions only move forward, so a late or repeated report never
    /// makes the copy look further behind than it was.
    pub fn merge(&mut self, report: &Progress) {
        self.copied_lsn = self.copied_lsn.max(report.copied_lsn);
        self.source_lsn = self.source_lsn.max(report.source_lsn);
        if self.frozen_lsn == 0 {
            self.frozen_lsn = report.frozen_lsn;
        }
        self.rows_copied = self.rows_copied.max(report.rows_copied);
        self.bytes_copied = self.bytes_copied.max(report.bytes_copied);
    }
}

/// One migration. Its id is the revision that created it, shown as `mig-<revision>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub key: RouteKey,
    pub source: Arc<str>,
    pub target: Arc<str>,
    pub phase: Phase,
    /// The key's epoch at the start; the switch is a compare-and-set from it.
    pub source_epoch: u64,
    /// The tenant's tier after the switch, for a tier change.
    pub new_tier: Option<Tier>,
    pub progress: Progress,
    pub error: Option<String>,
    /// Wall-clock times from the leader that proposed each change (milliseconds since the
    /// epoch): for timeouts and for reporting the write pause.
    pub created_ms: u64,
    pub updated_ms: u64,
    pub frozen_ms: u64,
    pub switched_ms: u64,
    /// Fixed at the switch: when the source may drop the key's rows; `None` keeps them as a
    /// backup.
    pub purge_after_ms: Option<u64>,
    pub updated_revision: u64,
}

/// The printed form of a migration id.
pub fn display_id(id: u64) -> String {
    format!("mig-{id}")
}

/// Parses `mig-<n>`; `None` for anything else.
pub fn parse_id(text: &str) -> Option<u64> {
    parse_prefixed(text, "mig-")
}

/// Parses `<prefix><n>` with `n` at least 1, as records keyed by a revision are shown.
pub fn parse_prefixed(text: &str, prefix: &str) -> Option<u64> {
    text.strip_prefix(prefix)?
        .parse()
        .ok()
        .filter(|id: &u64| *id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_move_forward_and_roll_back_only_before_the_switch() {
        use Phase::*;
        let order = [
            Planned, Copying, CatchingUp, Freezing, Switching, Cleanup, Done,
        ];
        for pair in order.windows(2) {
            assert!(Phase::can_advance(pair[0], pair[1]), "{pair:?}");
            assert!(!Phase::can_advance(pair[1], pair[0]), "{pair:?} backwards");
        }
        for phase in [Planned, Copying, CatchingUp, Freezing] {
            assert!(Phase::can_advance(phase, RolledBack));
            assert!(Phase::can_advance(phase, Failed));
        }
        for phase in [Switching, Cleanup, Done] {
            assert!(!Phase::can_advance(phase, RolledBack), "{phase:?}");
            assert!(!Phase::can_advance(phase, Failed), "{phase:?}");
        }
        assert!(
            !Phase::can_advance(CatchingUp, Switching),
            "no switch without a freeze"
        );
        assert!(
            !Phase::can_advance(Done, Done),
            "a finished migration records nothing more"
        );
        assert!(Phase::can_advance(Copying, Copying));
    }

    #[test]
    fn ids_round_trip_and_garbage_is_refused() {
        assert_eq!(parse_id(&display_id(42)), Some(42));
        assert_eq!(parse_id("mig-0"), None);
        assert_eq!(parse_id("42"), None);
        assert_eq!(parse_id("mig-x"), None);
    }

    #[test]
    fn progress_never_moves_back() {
        let mut progress = Progress {
            copied_lsn: 10,
            source_lsn: 20,
            ..Progress::default()
        };
        progress.merge(&Progress {
            copied_lsn: 5,
            source_lsn: 30,
            frozen_lsn: 25,
            ..Progress::default()
        });
        assert_eq!((progress.copied_lsn, progress.source_lsn), (10, 30));
        assert_eq!(progress.frozen_lsn, 25);
        progress.merge(&Progress {
            frozen_lsn: 40,
            ..Progress::default()
        });
        assert_eq!(progress.frozen_lsn, 25, "the freeze point is set once");
        assert_eq!(progress.lag(), 20);
    }
}
