//! The coordinator's decisions: a pure function from a migration and what just happened to the
//! command that moves it on. No I/O and no clock: the leader's driver and the report handler
//! feed it events with the time, and propose what it returns. Every decision is a
//! compare-and-set on the phase, so a stale decision (another leader, a late report) is refused
//! by apply instead of undoing a newer one.

use super::record::{MigrationRecord, Phase, Progress};
use crate::state::command::Command;

/// Thresholds of the coordinator: the `[migration]` table of a node's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Freeze only once the target is at most this many source-log records behind, so the
    /// write pause covers a short tail, not a backlog.
    pub catch_up_lag: u64,
    /// Fail a migration before its switch when no report arrived for this long (the agent or
    /// a cell is gone).
    pub stall_timeout_ms: u64,
    /// Fail a migration that stays frozen this long without the target catching up: the bound
    /// on the write pause when something goes wrong.
    pub freeze_timeout_ms: u64,
    /// How long the source keeps a moved key's rows after the switch before dropping them (a
    /// tier change drops them at once).
    pub cleanup_grace_ms: u64,
    /// Keep moved keys' rows on the source as a backup instead of dropping them.
    pub keep_source_data: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            catch_up_lag: 1000,
            stall_timeout_ms: 30_000,
            freeze_timeout_ms: 3_000,
            cleanup_grace_ms: 0,
            keep_source_data: false,
        }
    }
}

/// What an agent says it did in a phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub phase: Option<Phase>,
    pub progress: Progress,
    /// The agent finished its part of the phase.
    pub phase_done: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// Time passed (the leader's driver, a few times a second).
    Tick,
    Report(&'a Report),
    /// An operator asked to stop.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    Propose(Command),
    /// The event asks for something the migration cannot do now; the text says why.
    Refuse(String),
}

/// Decides what `event` does to migration `id`, which is `record`, at `now_ms`.
pub fn step(
    id: u64,
    record: &MigrationRecord,
    event: Event<'_>,
    now_ms: u64,
    settings: &Settings,
) -> Decision {
    use Phase::*;
    let phase = record.phase;
    // Fixed at the switch: when the source may drop the key's rows (None: never).
    let purge_after_ms = if settings.keep_source_data {
        None
    } else if record.new_tier.is_some() {
        Some(now_ms)
    } else {
        Some(now_ms.saturating_add(settings.cleanup_grace_ms))
    };
    let advance = |to: Phase, progress: Progress, error: Option<String>| {
        Decision::Propose(Command::AdvanceMigration {
            id,
            from: phase,
            to,
            progress,
            error,
            now_ms,
            purge_after_ms,
        })
    };
    match event {
        Event::Tick => {
            if phase == Planned {
                return advance(Copying, record.progress, None);
            }
            if !phase.before_switch() {
                return Decision::Nothing;
            }
            if phase == Freezing
                && record.frozen_ms > 0
                && now_ms.saturating_sub(record.frozen_ms) > settings.freeze_timeout_ms
            {
                return advance(
                    Failed,
                    record.progress,
                    Some(format!(
                        "the target did not catch up within {} ms of the freeze (copied LSN {}, frozen at {})",
                        settings.freeze_timeout_ms,
                        record.progress.copied_lsn,
                        record.progress.frozen_lsn
                    )),
                );
            }
            if now_ms.saturating_sub(record.updated_ms) > settings.stall_timeout_ms {
                return advance(
                    Failed,
                    record.progress,
                    Some(format!(
                        "no progress in {} for {} ms: the target's agent or a cell is unreachable",
                        phase.name(),
                        settings.stall_timeout_ms
                    )),
                );
            }
            Decision::Nothing
        }
        Event::Cancel => {
            if phase.before_switch() {
                advance(RolledBack, record.progress, Some("cancelled".into()))
            } else if phase.is_terminal() {
                Decision::Refuse(format!(
                    "migration_id: {} already finished as {}",
                    super::record::display_id(id),
                    phase.name()
                ))
            } else {
                Decision::Refuse(format!(
                    "migration_id: {} is {}: the route has switched, it can no longer be rolled back",
                    super::record::display_id(id),
                    phase.name()
                ))
            }
        }
        Event::Report(report) => {
            if report.phase != Some(phase) {
                // About a phase the migration has left (or not reached): nothing to do; the
                // answer tells the agent where the migration is.
                return Decision::Nothing;
            }
            let mut progress = record.progress;
            progress.merge(&report.progress);
            if let Some(error) = &report.error {
                return if phase.before_switch() {
                    advance(Failed, progress, Some(error.clone()))
                } else {
                    // Past the switch the only way is forward: keep the error for people and
                    // let the agent retry.
                    advance(phase, progress, Some(error.clone()))
                };
            }
            match phase {
                Copying if report.phase_done => advance(CatchingUp, progress, None),
                CatchingUp if progress.lag() <= settings.catch_up_lag => {
                    advance(Freezing, progress, None)
                }
                // Done means frozen and pulled up to the frozen LSN (0 on a cell never written).
                Freezing if report.phase_done && progress.copied_lsn >= progress.frozen_lsn => {
                    advance(Switching, progress, None)
                }
                Switching if report.phase_done => advance(Cleanup, progress, None),
                Cleanup if report.phase_done => advance(Done, progress, None),
                Planned | Done | RolledBack | Failed => Decision::Nothing,
                _ if progress == record.progress => Decision::Nothing,
                _ => advance(phase, progress, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::model::RouteKey;

    fn record(phase: Phase) -> MigrationRecord {
        MigrationRecord {
            key: RouteKey::tenant("t"),
            source: Arc::from("a"),
            target: Arc::from("b"),
            phase,
            source_epoch: 1,
            new_tier: None,
            progress: Progress::default(),
            error: None,
            created_ms: 1_000,
            updated_ms: 1_000,
            frozen_ms: 0,
            switched_ms: 0,
            purge_after_ms: None,
            updated_revision: 1,
        }
    }

    fn target(decision: Decision) -> Option<Phase> {
        match decision {
            Decision::Propose(Command::AdvanceMigration { to, .. }) => Some(to),
            _ => None,
        }
    }

    fn report(phase: Phase, copied: u64, source: u64, frozen: u64, done: bool) -> Report {
        Report {
            phase: Some(phase),
            progress: Progress {
                copied_lsn: copied,
                source_lsn: source,
                frozen_lsn: frozen,
                ..Progress::default()
            },
            phase_done: done,
            error: None,
        }
    }

    const S: Settings = Settings {
        catch_up_lag: 10,
        stall_timeout_ms: 1_000,
        freeze_timeout_ms: 500,
        cleanup_grace_ms: 60_000,
        keep_source_data: false,
    };

    #[test]
    fn the_switch_fixes_when_the_source_drops_the_rows() {
        let purge = |record: &MigrationRecord, settings: &Settings| {
            let r = report(Phase::Freezing, 5, 5, 5, true);
            match step(1, record, Event::Report(&r), 2_000, settings) {
                Decision::Propose(Command::AdvanceMigration {
                    to: Phase::Switching,
                    purge_after_ms,
                    ..
                }) => purge_after_ms,
                other => panic!("expected the switch, got {other:?}"),
            }
        };
        let mut record = record(Phase::Freezing);
        assert_eq!(purge(&record, &S), Some(62_000), "after the grace period");
        let keep = Settings {
            keep_source_data: true,
            ..S
        };
        assert_eq!(purge(&record, &keep), None, "kept as a backup");
        record.new_tier = Some(crate::state::model::Tier::High);
        assert_eq!(
            purge(&record, &S),
            Some(2_000),
            "a tier change drops them at once"
        );
    }

    #[test]
    fn a_migration_walks_every_phase_on_reports() {
        use Phase::*;
        assert_eq!(
            target(step(1, &record(Planned), Event::Tick, 1_001, &S)),
            Some(Copying)
        );
        let copying = record(Copying);
        let r = report(Copying, 100, 150, 0, false);
        assert_eq!(
            target(step(1, &copying, Event::Report(&r), 1_001, &S)),
            Some(Copying),
            "progress without the snapshot done stays in COPYING"
        );
        let r = report(Copying, 100, 150, 0, true);
        assert_eq!(
            target(step(1, &copying, Event::Report(&r), 1_001, &S)),
            Some(CatchingUp)
        );
        let catching = record(CatchingUp);
        let far = report(CatchingUp, 100, 150, 0, false);
        assert_eq!(
            target(step(1, &catching, Event::Report(&far), 1_001, &S)),
            Some(CatchingUp)
        );
        let near = report(CatchingUp, 145, 150, 0, false);
        assert_eq!(
            target(step(1, &catching, Event::Report(&near), 1_001, &S)),
            Some(Freezing)
        );
        let freezing = record(Freezing);
        let behind = report(Freezing, 149, 150, 150, true);
        assert_eq!(
            target(step(1, &freezing, Event::Report(&behind), 1_001, &S)),
            Some(Freezing),
            "no switch before the target holds everything up to the freeze"
        );
        let unfrozen = report(Freezing, 150, 150, 0, false);
        assert_eq!(
            target(step(1, &freezing, Event::Report(&unfrozen), 1_001, &S)),
            Some(Freezing),
            "no switch before the agent froze the source"
        );
        let caught = report(Freezing, 150, 150, 150, true);
        assert_eq!(
            target(step(1, &freezing, Event::Report(&caught), 1_001, &S)),
            Some(Switching)
        );
        let r = report(Switching, 150, 150, 150, true);
        assert_eq!(
            target(step(1, &record(Switching), Event::Report(&r), 1_001, &S)),
            Some(Cleanup)
        );
        let r = report(Cleanup, 150, 150, 150, true);
        assert_eq!(
            target(step(1, &record(Cleanup), Event::Report(&r), 1_001, &S)),
            Some(Done)
        );
    }

    #[test]
    fn reports_about_another_phase_change_nothing() {
        let r = report(Phase::Copying, 100, 100, 0, true);
        assert_eq!(
            step(1, &record(Phase::CatchingUp), Event::Report(&r), 1_001, &S),
            Decision::Nothing
        );
    }

    #[test]
    fn errors_fail_before_the_switch_and_are_only_recorded_after_it() {
        let mut r = report(Phase::Freezing, 1, 1, 1, true);
        r.error = Some("target cell unreachable".into());
        assert_eq!(
            target(step(
                1,
                &record(Phase::Freezing),
                Event::Report(&r),
                1_001,
                &S
            )),
            Some(Phase::Failed)
        );
        r.phase = Some(Phase::Switching);
        assert_eq!(
            target(step(
                1,
                &record(Phase::Switching),
                Event::Report(&r),
                1_001,
                &S
            )),
            Some(Phase::Switching)
        );
    }

    #[test]
    fn stalls_and_long_freezes_fail_and_cancel_stops_only_before_the_switch() {
        assert_eq!(
            step(1, &record(Phase::Copying), Event::Tick, 1_500, &S),
            Decision::Nothing
        );
        assert_eq!(
            target(step(1, &record(Phase::Copying), Event::Tick, 2_001, &S)),
            Some(Phase::Failed)
        );
        let mut frozen = record(Phase::Freezing);
        frozen.frozen_ms = 1_000;
        assert_eq!(
            target(step(1, &frozen, Event::Tick, 1_501, &S)),
            Some(Phase::Failed)
        );
        assert_eq!(
            step(1, &record(Phase::Switching), Event::Tick, 99_000, &S),
            Decision::Nothing,
            "after the switch a stall is never a failure"
        );
        assert_eq!(
            target(step(1, &frozen, Event::Cancel, 1_001, &S)),
            Some(Phase::RolledBack)
        );
        assert!(matches!(
            step(1, &record(Phase::Cleanup), Event::Cancel, 1_001, &S),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            step(1, &record(Phase::Done), Event::Cancel, 1_001, &S),
            Decision::Refuse(_)
        ));
    }
}
