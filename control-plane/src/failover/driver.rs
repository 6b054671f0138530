//! The leader's side of failure detection and failover: a few times a second it notes when it
//! first saw each cell's newest renewal, asks the pure detector which primaries failed, starts
//! their failovers, and moves FENCING failovers on once the failed cell's lease has surely run
//! out. Every node observes, so a node that becomes leader has watched the renewals for as long
//! as it ran; only the node that drives coordination acts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::detect::{self, Candidate, Decisions, Lookups, Observation, Underway};
use super::record::{LeaseRecord, Phase};
use crate::node::{Node, Proposal};
use crate::state::ControlState;
use crate::state::command::Command;
use cellplane_api::clock::{Monotonic, now_ms};

/// How often the detector looks.
const TICK: Duration = Duration::from_millis(50);

/// What the detector found on its last tick, for `ListFailovers` and metrics.
#[derive(Debug, Default)]
pub struct Findings {
    last: Mutex<Decisions>,
}

impl Findings {
    /// Cells found failed but held back by the storm limit (or automatic failover off).
    pub fn held_back(&self) -> Vec<Arc<str>> {
        self.last
            .lock()
            .map(|last| last.held_back.clone())
            .unwrap_or_default()
    }

    /// Cells found failed with no standby alive to promote.
    pub fn stranded(&self) -> Vec<Arc<str>> {
        self.last
            .lock()
            .map(|last| last.stranded.clone())
            .unwrap_or_default()
    }

    fn record(&self, decisions: &Decisions, halted: bool) {
        metrics::gauge!("cellplane_failover_halted").set(if halted { 1.0 } else { 0.0 });
        if decisions.storm {
            tracing::error!(cells = ?decisions.held_back, "more primaries failed at once than max_concurrent_failovers allows: automatic failover stops until ops resume it (cellctl failovers --resume)");
        }
        if let Ok(mut last) = self.last.lock() {
            if last.held_back != decisions.held_back && !decisions.held_back.is_empty() {
                tracing::warn!(cells = ?decisions.held_back, "cells failed but automatic failover is held back (max_concurrent_failovers reached, or automatic failover off): fail them over with cellctl failover");
            }
            if last.stranded != decisions.stranded && !decisions.stranded.is_empty() {
                tracing::error!(cells = ?decisions.stranded, "cells failed with no standby alive to promote");
            }
            last.clone_from(decisions);
        }
        metrics::gauge!("cellplane_failover_held_back").set(decisions.held_back.len() as f64);
        metrics::gauge!("cellplane_failover_stranded").set(decisions.stranded.len() as f64);
        metrics::gauge!("cellplane_cells_suspected").set(decisions.suspected.len() as f64);
    }
}

/// Notes every lease's renewal count as seen now; forgets cells whose lease is gone.
fn observe_all(state: &ControlState, seen: &mut BTreeMap<Arc<str>, Observation>, now: Instant) {
    seen.retain(|cell_id, _| state.leases().contains_key(cell_id));
    for (cell_id, lease) in state.leases() {
        let observed = detect::observe(seen.get(cell_id).copied(), lease.renewals, now);
        seen.insert(cell_id.clone(), observed);
    }
}

/// The commands this tick calls for: failovers to start, FENCING failovers whose cell's lease
/// surely ran out.
fn decide(
    state: &ControlState,
    seen: &BTreeMap<Arc<str>, Observation>,
    now: Instant,
    settings: &detect::Settings,
) -> (Decisions, Vec<Command>) {
    let unfinished: Vec<_> = state
        .failovers()
        .iter()
        .filter(|(_, f)| !f.phase.is_terminal())
        .collect();
    let busy: BTreeSet<Arc<str>> = unfinished.iter().map(|(_, f)| f.cell_id.clone()).collect();
    let running = unfinished.iter().filter(|(_, f)| f.automatic).count();
    let cells = state.cells().iter().filter_map(|(cell_id, cell)| {
        let lease: LeaseRecord = *state.leases().get(cell_id)?;
        Some(Candidate {
            cell_id,
            cell,
            lease,
        })
    });
    let lookups = Lookups {
        lease_of: |cell_id: &str| state.leases().get(cell_id).copied(),
        standbys_of: |cell_id: &Arc<str>| state.failover_targets(cell_id),
    };
    let underway = Underway {
        busy: &busy,
        running,
        halted: state.failover_halt().is_some(),
    };
    let decisions = detect::decide(cells, lookups, seen, underway, now, settings);
    let now_ms = now_ms();
    let mut commands: Vec<Command> = decisions
        .fail
        .iter()
        .map(|verdict| Command::StartFailover {
            cell_id: verdict.cell_id.clone(),
            standby: Some(verdict.standby.clone()),
            mode: super::record::Mode::Forced,
            reason: format!(
                "lease expired: no renewal for over {} ms",
                settings.expiry(settings.lease_ms).as_millis()
            ),
            automatic: true,
            expected_renewals: Some(verdict.renewals),
            now_ms,
        })
        .collect();
    if decisions.storm {
        commands.push(Command::HaltAutomaticFailover {
            cells: decisions.held_back.clone(),
            now_ms,
        });
    }
    for (id, failover) in &unfinished {
        let planned = matches!(failover.phase, Phase::Freezing | Phase::CatchingUp);
        if planned && now_ms.saturating_sub(failover.created_ms) >= settings.planned_timeout_ms {
            commands.push(Command::AdvanceFailover {
                id: **id,
                from: failover.phase,
                to: Phase::Thawing,
                lsn: 0,
                error: Some(format!(
                    "given up in {} after {} ms: the standby did not catch up with the frozen cell",
                    failover.phase.name(),
                    settings.planned_timeout_ms
                )),
                merged: Vec::new(),
                now_ms,
            });
        }
        if failover.phase != Phase::Fencing {
            continue;
        }
        // Renewals stopped when the failover began; the newest one seen must have run out.
        let expired = match (
            state.leases().get(&failover.cell_id),
            seen.get(&failover.cell_id),
        ) {
            (None, _) => true,
            (Some(lease), Some(observed)) if observed.renewals == lease.renewals => {
                now.saturating_duration_since(observed.since) >= settings.expiry(lease.lease_ms)
            }
            (Some(_), _) => false,
        };
        if expired {
            commands.push(Command::AdvanceFailover {
                id: **id,
                from: Phase::Fencing,
                to: Phase::Promoting,
                lsn: 0,
                error: None,
                merged: Vec::new(),
                now_ms,
            });
        }
    }
    (decisions, commands)
}

/// Runs until the node shuts down, timing leases on `clock` (the node's host's).
pub async fn run(node: Arc<Node>, clock: Monotonic) {
    let mut shutdown = node.shutdown_signal();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: BTreeMap<Arc<str>, Observation> = BTreeMap::new();
    let mut observed_revision = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = clock.now();
        let acting = node.store.drives_migrations();
        let decided = node.view().read(|state| {
            // Renewal counts change only with the revision.
            if observed_revision != Some(state.revision()) {
                observe_all(state, &mut seen, now);
                observed_revision = Some(state.revision());
            }
            acting.then(|| {
                let (decisions, commands) = decide(state, &seen, now, &node.failover);
                (decisions, commands, state.failover_halt().is_some())
            })
        });
        let Some((decisions, commands, halted)) = decided else {
            continue;
        };
        node.findings.record(&decisions, halted || decisions.storm);
        for command in commands {
            let kind = command.kind();
            // A refusal is a lost race (a renewal came in, another leader acted): the next tick
            // decides again from the newer state.
            match node.propose(command, true).await {
                Ok(Proposal::Applied(output)) => {
                    tracing::warn!(kind, ?output, "failover step");
                }
                Ok(Proposal::Forward(_)) => {}
                Err(status) => tracing::debug!(kind, %status, "failover step refused"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::record::Mode;
    use crate::state::model::Tier;

    fn register(state: &mut ControlState, id: &str, zone: &str, standby_of: Option<&str>) {
        let (result, _) = state.apply(&Command::RegisterCell {
            cell_id: id.into(),
            region: "r".into(),
            zone: zone.into(),
            tier: Tier::Normal,
            endpoint: format!("127.0.0.1:{}", 1000 + zone.len()).into(),
            capacity: 10,
            standby_of: standby_of.map(Arc::from),
        });
        result.expect("register");
        let (result, _) = state.apply(&Command::SetCellState {
            cell_id: id.into(),
            state: crate::state::model::CellState::Active,
        });
        result.expect("activate");
    }

    fn renew(state: &mut ControlState, cells: &[&str]) {
        let (result, _) = state.apply(&Command::RenewLeases {
            cells: cells.iter().map(|c| Arc::from(*c)).collect(),
            lease_ms: 1_000,
        });
        result.expect("renew");
    }

    #[test]
    fn a_silent_primary_is_failed_over_once_its_lease_surely_ran_out_and_only_then() {
        let settings = detect::Settings {
            lease_ms: 1_000,
            clock_drift_ms: 200,
            automatic: true,
            max_concurrent_failovers: 2,
            planned_timeout_ms: 10_000,
        };
        let mut state = ControlState::default();
        register(&mut state, "p", "a", None);
        register(&mut state, "s", "bb", Some("p"));
        renew(&mut state, &["p", "s"]);
        let t0 = Instant::now();
        let mut seen = BTreeMap::new();
        observe_all(&state, &mut seen, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (_, commands) = decide(&state, &seen, at(1_100), &settings);
        assert!(commands.is_empty(), "within lease + drift: {commands:?}");

        // The standby keeps renewing; the primary does not.
        renew(&mut state, &["s"]);
        observe_all(&state, &mut seen, at(600));
        renew(&mut state, &["s"]);
        observe_all(&state, &mut seen, at(1_000));
        let (_, commands) = decide(&state, &seen, at(1_250), &settings);
        let [
            Command::StartFailover {
                cell_id,
                expected_renewals,
                automatic,
                ..
            },
        ] = commands.as_slice()
        else {
            panic!("expected one failover, got {commands:?}");
        };
        assert_eq!(
            (&**cell_id, *expected_renewals, *automatic),
            ("p", Some(1), true)
        );

        // Applied, it moves the keys at once: nothing left for the driver.
        let (result, _) = state.apply(&commands[0]);
        result.expect("failover");
        let (_, commands) = decide(&state, &seen, at(1_300), &settings);
        assert!(commands.is_empty(), "{commands:?}");
    }

    #[test]
    fn an_ops_failover_waits_out_the_lease_from_the_newest_renewal_seen() {
        let settings = detect::Settings::default();
        let mut state = ControlState::default();
        register(&mut state, "p", "a", None);
        register(&mut state, "s", "bb", Some("p"));
        renew(&mut state, &["p"]);
        let t0 = Instant::now();
        let mut seen = BTreeMap::new();
        observe_all(&state, &mut seen, t0);
        let (result, _) = state.apply(&Command::StartFailover {
            cell_id: "p".into(),
            standby: None,
            mode: Mode::Forced,
            reason: "ops".into(),
            automatic: false,
            expected_renewals: None,
            now_ms: 1,
        });
        result.expect("start");
        // A renewal after the failover began is refused: the lease cannot be stretched.
        let (result, _) = state.apply(&Command::RenewLeases {
            cells: vec!["p".into()],
            lease_ms: 1_000,
        });
        assert!(matches!(
            result,
            Ok(crate::state::command::CommandOutput::Leases { ref refused, .. }) if refused.len() == 1
        ));
        let expiry = settings.expiry(1_000);
        observe_all(&state, &mut seen, t0 + expiry / 2);
        let (_, commands) = decide(
            &state,
            &seen,
            t0 + expiry - Duration::from_millis(1),
            &settings,
        );
        assert!(commands.is_empty(), "{commands:?}");
        let (_, commands) = decide(&state, &seen, t0 + expiry, &settings);
        assert!(
            matches!(
                commands.as_slice(),
                [Command::AdvanceFailover {
                    from: Phase::Fencing,
                    to: Phase::Promoting,
                    ..
                }]
            ),
            "{commands:?}"
        );
    }
}
