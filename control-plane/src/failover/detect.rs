//! The failure detector: pure functions of what this node saw of each cell's renewals.
//!
//! A node notes, on its own monotonic clock, the moment it first saw each cell's newest
//! renewal in its state (an [`Observation`]). The renewal committed before that moment, and
//! the cell took its ticket before the renewal was even asked for, so the cell's lease ends
//! before `observed + lease_ms` by the cell's clock. Clocks of two machines advance at
//! slightly different rates: `clock_drift_ms` covers that, so once `observed + lease_ms +
//! clock_drift_ms` has passed here the lease has surely run out on the cell, and its keys can
//! move without two writers. A node that starts, or becomes leader, sees every renewal anew:
//! it waits a whole lease before it fails anyone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::failover::record::LeaseRecord;
use crate::state::model::{CellRecord, CellState};

/// Leases and detection: the `[failover]` table of a node's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How long a renewal lets a cell take writes.
    pub lease_ms: u64,
    /// The most two machines' clocks may disagree about a lease's length.
    pub clock_drift_ms: u64,
    /// Fail cells over automatically once their lease surely ran out.
    pub automatic: bool,
    /// Automatic failovers under way at once; past it the detector holds back (a storm is
    /// more likely the control plane's own network than many cells failing) until ops act.
    pub max_concurrent_failovers: usize,
    /// A PLANNED failover whose standby has not caught up with the frozen cell this long
    /// after it began is given up, and the cell thaws.
    pub planned_timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease_ms: 2_000,
            clock_drift_ms: 200,
            automatic: true,
            max_concurrent_failovers: 2,
            planned_timeout_ms: 10_000,
        }
    }
}

impl Settings {
    /// How long after a renewal was seen the cell's lease has surely run out.
    pub fn expiry(&self, lease_ms: u64) -> Duration {
        Duration::from_millis(lease_ms + self.clock_drift_ms)
    }
}

/// When this node first saw a cell's renewal count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub renewals: u64,
    pub since: Instant,
}

/// What the detector thinks of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Renewed within the last two renewal intervals (a fifth of the lease each).
    Healthy,
    /// Renewals missed, but its lease may still run on the cell: it keeps its keys.
    Suspected,
    /// Its lease has surely run out on the cell.
    Failed,
}

/// Notes a cell's renewal count as seen `now`: a count seen before keeps its moment.
pub fn observe(previous: Option<Observation>, renewals: u64, now: Instant) -> Observation {
    match previous {
        Some(seen) if seen.renewals == renewals => seen,
        _ => Observation {
            renewals,
            since: now,
        },
    }
}

/// A cell's health from its newest renewal's observation.
pub fn health(seen: Observation, lease: LeaseRecord, now: Instant, settings: &Settings) -> Health {
    let quiet = now.saturating_duration_since(seen.since);
    if quiet >= settings.expiry(lease.lease_ms) {
        Health::Failed
    } else if quiet >= Duration::from_millis(lease.lease_ms * 2 / 5) {
        Health::Suspected
    } else {
        Health::Healthy
    }
}

/// A cell the detector would fail over, with the renewal count it decided on (the failover
/// is refused if another renewal commits first) and the standby to promote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub cell_id: Arc<str>,
    pub renewals: u64,
    pub standby: Arc<str>,
}

/// A cell as the detector sees it: its record and its lease.
pub struct Candidate<'a> {
    pub cell_id: &'a Arc<str>,
    pub cell: &'a CellRecord,
    pub lease: LeaseRecord,
}

/// What the detector reads of the state besides the cells: any cell's lease, and the
/// standbys a failover of a cell may promote, in the order the tiers prefer them (asked only
/// for cells found failed).
pub struct Lookups<L, S> {
    pub lease_of: L,
    pub standbys_of: S,
}

/// The failovers already under way, as the detector weighs new ones.
pub struct Underway<'a> {
    /// Cells with a failover under way.
    pub busy: &'a BTreeSet<Arc<str>>,
    /// Automatic failovers unfinished.
    pub running: usize,
    /// A storm stopped automatic failover until ops resume it.
    pub halted: bool,
}

/// What the detector decides on one tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Failovers to start.
    pub fail: Vec<Verdict>,
    /// Cells found failed that are held back by the storm limit.
    pub held_back: Vec<Arc<str>>,
    /// Cells found failed with no standby alive to promote.
    pub stranded: Vec<Arc<str>>,
    /// Cells whose renewals stopped but whose lease may still run.
    pub suspected: Vec<Arc<str>>,
    /// More primaries failed at once than may fail over: stop automatic failover (a storm
    /// is more likely the control plane's own network than that many cells failing).
    pub storm: bool,
}

/// Which primaries to fail over now, and to which standby. Only ACTIVE or DRAINING primaries
/// with a lease count and no failover `underway` are considered. More failed primaries than
/// `max_concurrent_failovers` leaves room for beside the running ones are a storm: none is
/// failed over, and the storm is reported. `lease_of` gives any cell's lease. Only a standby renewing as it
/// should is promoted: one silent for two rounds (its zone or region is failing too) is passed
/// over for the next, since promoting a dead standby would leave the keys nowhere.
pub fn decide<'a, L, S>(
    cells: impl IntoIterator<Item = Candidate<'a>>,
    lookups: Lookups<L, S>,
    seen: &BTreeMap<Arc<str>, Observation>,
    underway: Underway<'_>,
    now: Instant,
    settings: &Settings,
) -> Decisions
where
    L: Fn(&str) -> Option<LeaseRecord>,
    S: Fn(&Arc<str>) -> Vec<Arc<str>>,
{
    let mut decisions = Decisions::default();
    let Underway {
        busy,
        running,
        halted,
    } = underway;
    let room = settings.max_concurrent_failovers.saturating_sub(running);
    let mut found = Vec::new();
    let alive = |cell_id: &Arc<str>| match ((lookups.lease_of)(cell_id), seen.get(cell_id)) {
        (Some(lease), Some(observed)) if observed.renewals == lease.renewals => {
            health(*observed, lease, now, settings) == Health::Healthy
        }
        _ => false,
    };
    for Candidate {
        cell_id,
        cell,
        lease,
    } in cells
    {
        let primary = cell.standby_of.is_none()
            && matches!(cell.state, CellState::Active | CellState::Draining);
        let Some(seen) = seen.get(cell_id) else {
            continue;
        };
        if !primary || busy.contains(cell_id) || seen.renewals != lease.renewals {
            continue;
        }
        match health(*seen, lease, now, settings) {
            Health::Healthy => {}
            Health::Suspected => decisions.suspected.push(cell_id.clone()),
            Health::Failed => match (lookups.standbys_of)(cell_id).into_iter().find(alive) {
                None => decisions.stranded.push(cell_id.clone()),
                Some(standby) => found.push(Verdict {
                    cell_id: cell_id.clone(),
                    renewals: lease.renewals,
                    standby,
                }),
            },
        }
    }
    decisions.storm = !halted && settings.automatic && found.len() > room;
    if halted || !settings.automatic || decisions.storm {
        decisions.held_back = found.into_iter().map(|v| v.cell_id).collect();
    } else {
        decisions.fail = found;
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::Tier;

    const LEASE: LeaseRecord = LeaseRecord {
        renewals: 7,
        lease_ms: 1_000,
    };

    fn settings() -> Settings {
        Settings {
            lease_ms: 1_000,
            clock_drift_ms: 200,
            automatic: true,
            max_concurrent_failovers: 3,
            planned_timeout_ms: 10_000,
        }
    }

    fn cell(standby_of: Option<&str>, state: CellState) -> CellRecord {
        CellRecord {
            region: "r".into(),
            zone: "z".into(),
            tier: Tier::Normal,
            endpoint: "127.0.0.1:1".into(),
            state,
            capacity: 10,
            load: 1,
            standby_of: standby_of.map(Arc::from),
            registered_revision: 1,
            health: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_cell_is_suspected_after_missed_renewals_and_failed_only_after_lease_and_drift() {
        let t0 = Instant::now();
        let seen = observe(None, 7, t0);
        let s = settings();
        assert_eq!(health(seen, LEASE, t0 + ms(300), &s), Health::Healthy);
        assert_eq!(health(seen, LEASE, t0 + ms(400), &s), Health::Suspected);
        assert_eq!(health(seen, LEASE, t0 + ms(1_199), &s), Health::Suspected);
        assert_eq!(health(seen, LEASE, t0 + ms(1_200), &s), Health::Failed);
    }

    #[test]
    fn a_renewal_seen_again_keeps_its_moment_and_a_new_one_starts_over() {
        let t0 = Instant::now();
        let seen = observe(None, 7, t0);
        assert_eq!(observe(Some(seen), 7, t0 + ms(500)).since, t0);
        let renewed = observe(Some(seen), 8, t0 + ms(900));
        assert_eq!(renewed.since, t0 + ms(900));
        // A slow cell that renews before its lease ran out is healthy again.
        assert_eq!(
            health(
                renewed,
                LeaseRecord {
                    renewals: 8,
                    ..LEASE
                },
                t0 + ms(1_250),
                &settings()
            ),
            Health::Healthy
        );
    }

    /// Cells `a`..`e` silent since `t0`; standbys `near` (renewing) and `far`.
    struct Fixture {
        ids: Vec<Arc<str>>,
        records: Vec<CellRecord>,
        seen: BTreeMap<Arc<str>, Observation>,
    }

    impl Fixture {
        fn new(t0: Instant, late: Instant) -> Self {
            let ids: Vec<Arc<str>> = ["a", "b", "c", "d", "e"].map(Arc::from).to_vec();
            let records = vec![
                cell(None, CellState::Active),
                cell(None, CellState::Active),
                cell(Some("a"), CellState::Active),
                cell(None, CellState::Failed),
                cell(None, CellState::Draining),
            ];
            let mut seen: BTreeMap<Arc<str>, Observation> = ids
                .iter()
                .map(|id| (id.clone(), observe(None, 7, t0)))
                .collect();
            seen.insert("near".into(), observe(None, 7, late - ms(10)));
            seen.insert("far".into(), observe(None, 7, late - ms(10)));
            Fixture { ids, records, seen }
        }

        fn cells(&self) -> Vec<Candidate<'_>> {
            self.ids
                .iter()
                .zip(&self.records)
                .map(|(cell_id, cell)| Candidate {
                    cell_id,
                    cell,
                    lease: LEASE,
                })
                .collect()
        }
    }

    /// Decides over the fixture, every cell's lease [`LEASE`] and every primary's standbys
    /// `standbys`.
    fn run(
        f: &Fixture,
        standbys: &[&str],
        busy: &BTreeSet<Arc<str>>,
        running: usize,
        now: Instant,
        settings: &Settings,
    ) -> Decisions {
        let lookups = Lookups {
            lease_of: |_: &str| Some(LEASE),
            standbys_of: |_: &Arc<str>| standbys.iter().map(|s| Arc::from(*s)).collect(),
        };
        let underway = Underway {
            busy,
            running,
            halted: false,
        };
        decide(f.cells(), lookups, &f.seen, underway, now, settings)
    }

    #[test]
    fn only_active_primaries_not_already_failing_over_are_failed() {
        let t0 = Instant::now();
        let late = t0 + ms(5_000);
        let f = Fixture::new(t0, late);
        let busy = BTreeSet::from([Arc::from("b")]);
        let decisions = run(&f, &["near"], &busy, 0, late, &settings());
        let failed: Vec<&str> = decisions.fail.iter().map(|v| &*v.cell_id).collect();
        assert_eq!(failed, ["a", "e"]);
        assert_eq!(decisions.fail[0].standby, Arc::from("near"));
        assert!(!decisions.storm);

        let manual = Settings {
            automatic: false,
            ..settings()
        };
        let decisions = run(&f, &["near"], &BTreeSet::new(), 0, late, &manual);
        assert!(decisions.fail.is_empty(), "automatic failover is off");
        assert_eq!(decisions.held_back.len(), 3);
        assert!(!decisions.storm);
    }

    #[test]
    fn more_failed_primaries_than_room_is_a_storm_that_fails_none_over() {
        let t0 = Instant::now();
        let late = t0 + ms(5_000);
        let f = Fixture::new(t0, late);
        let busy = BTreeSet::from([Arc::from("b")]);
        let tight = Settings {
            max_concurrent_failovers: 2,
            ..settings()
        };
        // "a" and "e" failed while one automatic failover runs: room for one.
        let decisions = run(&f, &["near"], &busy, 1, late, &tight);
        assert!(decisions.storm);
        assert!(decisions.fail.is_empty());
        assert_eq!(decisions.held_back, vec![Arc::from("a"), Arc::from("e")]);
        // Room for both: no storm.
        let decisions = run(&f, &["near"], &busy, 0, late, &tight);
        assert_eq!(decisions.fail.len(), 2);
        // Once halted nothing fails over, even with room, until ops resume.
        let lookups = Lookups {
            lease_of: |_: &str| Some(LEASE),
            standbys_of: |_: &Arc<str>| vec![Arc::from("near")],
        };
        let underway = Underway {
            busy: &busy,
            running: 0,
            halted: true,
        };
        let decisions = decide(f.cells(), lookups, &f.seen, underway, late, &tight);
        assert!(decisions.fail.is_empty() && !decisions.storm);
        assert_eq!(decisions.held_back.len(), 2);
    }

    #[test]
    fn a_standby_whose_own_renewals_stopped_is_passed_over_for_the_next() {
        let t0 = Instant::now();
        let late = t0 + ms(5_000);
        let mut f = Fixture::new(t0, late);
        // The in-region standby went silent with its zone's primary; the remote one renews.
        f.seen.insert("near".into(), observe(None, 7, t0));
        let decisions = run(&f, &["near", "far"], &BTreeSet::new(), 0, late, &settings());
        assert_eq!(decisions.fail[0].standby, Arc::from("far"));
        // With no standby alive, the cell is stranded rather than failed over to a dead one.
        let decisions = run(&f, &["near"], &BTreeSet::new(), 0, late, &settings());
        assert!(decisions.fail.is_empty());
        assert_eq!(
            decisions.stranded,
            vec![Arc::from("a"), Arc::from("b"), Arc::from("e")]
        );
    }

    #[test]
    fn a_renewal_the_node_has_not_observed_yet_defers_the_verdict() {
        let t0 = Instant::now();
        let id: Arc<str> = "a".into();
        let record = cell(None, CellState::Active);
        let seen = BTreeMap::from([(id.clone(), observe(None, 6, t0))]);
        let decisions = decide(
            [Candidate {
                cell_id: &id,
                cell: &record,
                lease: LEASE,
            }],
            Lookups {
                lease_of: |_: &str| Some(LEASE),
                standbys_of: |_: &Arc<str>| vec![Arc::from("near")],
            },
            &seen,
            Underway {
                busy: &BTreeSet::new(),
                running: 0,
                halted: false,
            },
            t0 + ms(5_000),
            &settings(),
        );
        assert_eq!(decisions, Decisions::default());
    }
}
