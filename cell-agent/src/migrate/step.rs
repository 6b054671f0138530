//! What the agent does next for a migration: pure functions of the migration as the control
//! plane last answered it and of the time. The executor beside them (`migrate/mod.rs`) carries
//! the step out against the cells and reports.

use std::time::Duration;

use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::MigrationPhase as Phase;

/// Consecutive failed attempts at a step before the agent reports the migration failed (only
/// before the switch; after it, the agent keeps trying).
pub const MAX_STEP_FAILURES: u32 = 25;

pub fn phase(m: &pb::Migration) -> Phase {
    Phase::try_from(m.phase).unwrap_or(Phase::Unspecified)
}

/// The next thing the target's agent does for a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The migration ended. If it was rolled back or failed, this agent may have frozen the
    /// source key: thaw it rather than wait for the source's agent.
    Finish { thaw_source: bool },
    /// Not started yet: ask for it again after a pause.
    Poll,
    /// Work on the cells, then report.
    Do(Work),
}

/// The agent's part of a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Stream a snapshot of the key from the source into the target.
    Copy,
    /// Stream the source's log after what was copied, and report the source's last LSN.
    CatchUp,
    /// Freeze the key on the source and pull its log up to the frozen LSN.
    Freeze,
    /// Grant the target the key at `epoch`, and revoke the source towards it.
    Switch { epoch: u64 },
    /// Revoke the source towards the target again (to be sure), then drop its rows or not.
    Cleanup { epoch: u64, purge: Purge },
}

impl Work {
    /// A name for logs and crash points.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::CatchUp => "catch-up",
            Self::Freeze => "freeze",
            Self::Switch { .. } => "switch",
            Self::Cleanup { .. } => "cleanup",
        }
    }
}

/// When the source drops a moved key's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    Now,
    /// The grace period is still running: do the step again after this long.
    After(Duration),
    /// The rows stay as a backup (`keep_source_data`).
    Never,
}

/// The step for `m` at wall-clock `now_ms`.
pub fn next_step(m: &pb::Migration, now_ms: u64) -> Step {
    let epoch = m.source_epoch + 1;
    match phase(m) {
        Phase::Done => Step::Finish { thaw_source: false },
        Phase::RolledBack | Phase::Failed => Step::Finish { thaw_source: true },
        Phase::Planned | Phase::Unspecified => Step::Poll,
        Phase::Copying => Step::Do(Work::Copy),
        Phase::CatchingUp => Step::Do(Work::CatchUp),
        Phase::Freezing => Step::Do(Work::Freeze),
        Phase::Switching => Step::Do(Work::Switch { epoch }),
        Phase::Cleanup => Step::Do(Work::Cleanup {
            epoch,
            purge: if m.keep_source_data {
                Purge::Never
            } else if m.purge_after_ms > now_ms {
                Purge::After(Duration::from_millis(m.purge_after_ms - now_ms))
            } else {
                Purge::Now
            },
        }),
    }
}

/// What to do after the `failures`-th failed attempt in a row at the step of `phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Try again after this back-off.
    Retry(Duration),
    /// Report the migration failed: it is rolled back.
    Report,
}

/// Before the switch a step that keeps failing fails the migration (the source thaws and
/// nothing is lost); after it the route has moved and only going forward is safe, so the agent
/// keeps trying. The back-off grows by 100 ms per failure up to a second.
pub fn on_failure(phase: Phase, failures: u32) -> OnFailure {
    let before_switch = matches!(phase, Phase::Copying | Phase::CatchingUp | Phase::Freezing);
    if before_switch && failures >= MAX_STEP_FAILURES {
        OnFailure::Report
    } else {
        OnFailure::Retry(Duration::from_millis(100 * u64::from(failures.min(10))))
    }
}

/// What a key frozen on one of this agent's cells needs, given the newest migration that
/// froze it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The migration was rolled back or failed: let writes go on.
    Thaw,
    /// The migration switched: the key belongs to the target now.
    Revoke { to_cell: String, to_epoch: u64 },
}

/// A frozen key whose migration is still under way is left as it is.
pub fn repair_frozen(m: &pb::Migration) -> Option<Repair> {
    match phase(m) {
        Phase::RolledBack | Phase::Failed => Some(Repair::Thaw),
        Phase::Switching | Phase::Cleanup | Phase::Done => Some(Repair::Revoke {
            to_cell: m.target_cell.clone(),
            to_epoch: m.source_epoch + 1,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(phase: Phase) -> pb::Migration {
        pb::Migration {
            migration_id: "mig-1".into(),
            tenant_id: "t".into(),
            source_cell: "a".into(),
            target_cell: "b".into(),
            source_epoch: 4,
            phase: phase as i32,
            ..Default::default()
        }
    }

    #[test]
    fn each_phase_has_its_step() {
        let steps: Vec<(Phase, Step)> = vec![
            (Phase::Planned, Step::Poll),
            (Phase::Copying, Step::Do(Work::Copy)),
            (Phase::CatchingUp, Step::Do(Work::CatchUp)),
            (Phase::Freezing, Step::Do(Work::Freeze)),
            (Phase::Switching, Step::Do(Work::Switch { epoch: 5 })),
            (
                Phase::Cleanup,
                Step::Do(Work::Cleanup {
                    epoch: 5,
                    purge: Purge::Now,
                }),
            ),
            (Phase::Done, Step::Finish { thaw_source: false }),
            (Phase::RolledBack, Step::Finish { thaw_source: true }),
            (Phase::Failed, Step::Finish { thaw_source: true }),
        ];
        for (phase, step) in steps {
            assert_eq!(next_step(&migration(phase), 1_000), step, "{phase:?}");
        }
    }

    #[test]
    fn cleanup_waits_out_the_grace_period_or_keeps_the_rows() {
        let mut m = migration(Phase::Cleanup);
        m.purge_after_ms = 5_000;
        let step = |m: &pb::Migration, now| match next_step(m, now) {
            Step::Do(Work::Cleanup { purge, .. }) => purge,
            other => panic!("{other:?}"),
        };
        assert_eq!(step(&m, 4_000), Purge::After(Duration::from_secs(1)));
        assert_eq!(step(&m, 5_000), Purge::Now);
        m.keep_source_data = true;
        assert_eq!(step(&m, 9_000), Purge::Never);
    }

    #[test]
    fn failures_fail_a_migration_only_before_its_switch() {
        assert_eq!(
            on_failure(Phase::Copying, 1),
            OnFailure::Retry(Duration::from_millis(100))
        );
        assert_eq!(
            on_failure(Phase::Freezing, 12),
            OnFailure::Retry(Duration::from_secs(1))
        );
        for phase in [Phase::Copying, Phase::CatchingUp, Phase::Freezing] {
            assert_eq!(on_failure(phase, MAX_STEP_FAILURES), OnFailure::Report);
        }
        for phase in [Phase::Switching, Phase::Cleanup] {
            assert!(matches!(
                on_failure(phase, 10 * MAX_STEP_FAILURES),
                OnFailure::Retry(_)
            ));
        }
    }

    #[test]
    fn a_frozen_key_is_thawed_after_a_rollback_and_revoked_after_a_switch() {
        assert_eq!(
            repair_frozen(&migration(Phase::RolledBack)),
            Some(Repair::Thaw)
        );
        assert_eq!(repair_frozen(&migration(Phase::Failed)), Some(Repair::Thaw));
        for phase in [Phase::Switching, Phase::Cleanup, Phase::Done] {
            assert_eq!(
                repair_frozen(&migration(phase)),
                Some(Repair::Revoke {
                    to_cell: "b".into(),
                    to_epoch: 5
                })
            );
        }
        for phase in [Phase::Copying, Phase::CatchingUp, Phase::Freezing] {
            assert_eq!(repair_frozen(&migration(phase)), None);
        }
    }
}
