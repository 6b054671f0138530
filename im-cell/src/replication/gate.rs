//! The synchronous standby's gate: a primary with synchronous standbys answers a batch (and
//! pushes its events) only once every one of them has acknowledged the batch's last LSN as
//! durable.
//!
//! It starts out *catching up*: it waits, but the standbys may still lack what the cell
//! acknowledged before (in an earlier life, or while it went on alone), so it is not in sync
//! yet. Once every synchronous standby has acknowledged everything durable it is *in sync*:
//! every answer it gave is on every synchronous standby.
//!
//! When they stop acknowledging for `timeout` while answers wait, the gate is *stalled*: the
//! answers keep waiting, because the cell may go on alone only after the control plane has
//! recorded that it is no longer in sync (its agent does that, then calls [`SyncGate::release`]
//! naming the stall). Going on alone it answers at once. As soon as every synchronous standby
//! has acknowledged everything durable it is in sync again by itself — waiting more is always
//! safe — and its agent records that.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use cellplane_api::proto::cell as pb;
use tokio::sync::oneshot;

use crate::error::CellError;
use crate::store::writer::Outcome;
use crate::sync::hub::{Delivery, SyncHub};

pub type Reply = oneshot::Sender<Result<Outcome, CellError>>;

/// A committed batch's answers and events.
pub type Answers = Vec<(Reply, Result<Outcome, CellError>)>;

/// What the gate does with answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No synchronous standby: answers go at once.
    Unguarded,
    /// Answers wait for every synchronous standby, which may still lack earlier answers.
    CatchingUp,
    /// Answers wait for every synchronous standby, which has every earlier one: in sync.
    Waiting,
    /// They waited longer than the timeout: still waiting, until released.
    Stalled,
    /// Released after a stall: answers go at once until the standbys catch up.
    Alone,
}

impl Mode {
    fn proto(self) -> pb::SyncMode {
        match self {
            Self::Unguarded => pb::SyncMode::Unguarded,
            Self::CatchingUp => pb::SyncMode::CatchingUp,
            Self::Waiting => pb::SyncMode::Waiting,
            Self::Stalled => pb::SyncMode::Stalled,
            Self::Alone => pb::SyncMode::Alone,
        }
    }
}

struct Held {
    lsn: u64,
    since: Instant,
    answers: Answers,
    deliveries: Vec<Delivery>,
}

struct Inner {
    mode: Mode,
    /// Counts stalls, so a release meant for an earlier one is not taken for this one.
    episode: u64,
    /// The newest LSN each synchronous standby acknowledged.
    acked: BTreeMap<String, u64>,
    /// The newest LSN committed.
    durable: u64,
    held: VecDeque<Held>,
}

impl Inner {
    /// The LSN every synchronous standby has.
    fn all_acked(&self) -> u64 {
        self.acked.values().copied().min().unwrap_or(u64::MAX)
    }
}

/// Shared by the writer (which hands it committed batches), the replication service (acks),
/// a timer and the admin service (release); cheap to clone.
#[derive(Clone)]
pub struct SyncGate {
    inner: Arc<Mutex<Inner>>,
    hub: SyncHub,
    timeout: Duration,
}

/// Sends held answers and their events.
fn send(held: impl IntoIterator<Item = Held>, hub: &SyncHub) {
    for batch in held {
        for (reply, answer) in batch.answers {
            let _ = reply.send(answer);
        }
        hub.publish(batch.deliveries);
    }
}

impl SyncGate {
    /// A gate over `standbys` (none: answers go at once), starting out catching up with them.
    pub fn new(standbys: &[String], timeout: Duration, durable: u64, hub: SyncHub) -> Self {
        let mode = if standbys.is_empty() {
            Mode::Unguarded
        } else {
            Mode::CatchingUp
        };
        Self {
            inner: Arc::new(Mutex::new(Inner {
                mode,
                episode: 0,
                acked: standbys.iter().map(|s| (s.clone(), 0)).collect(),
                durable,
                held: VecDeque::new(),
            })),
            hub,
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch is durable at `lsn`: answer it, or hold it for the standbys.
    pub fn committed(&self, lsn: u64, answers: Answers, deliveries: Vec<Delivery>) {
        let batch = Held {
            lsn,
            since: Instant::now(),
            answers,
            deliveries,
        };
        let go = {
            let mut inner = self.lock();
            inner.durable = inner.durable.max(lsn);
            let waits = matches!(inner.mode, Mode::CatchingUp | Mode::Waiting | Mode::Stalled)
                && inner.all_acked() < lsn;
            if waits {
                inner.held.push_back(batch);
                None
            } else {
                Some(batch)
            }
        };
        send(go, &self.hub);
    }

    /// The cell stops: every answer still held is refused UNAVAILABLE, none acknowledged. Its
    /// batch is durable here but not on every synchronous standby, so the send is not
    /// acknowledged and its retry goes to whichever cell owns the key then; the calls end
    /// and their connections with them, rather than wait for standbys that may never answer.
    pub fn refuse_held(&self) {
        let held = std::mem::take(&mut self.lock().held);
        let stopping = CellError::Unavailable(
            "the cell stopped before its synchronous standbys had this write: it is not acknowledged; retry".into(),
        );
        for batch in held {
            for (reply, _) in batch.answers {
                let _ = reply.send(Err(stopping.clone()));
            }
        }
    }

    /// A standby acknowledged `lsn` as durable.
    pub fn acked(&self, standby: &str, lsn: u64) {
        let released = {
            let mut inner = self.lock();
            let Some(acked) = inner.acked.get_mut(standby) else {
                return;
            };
            *acked = (*acked).max(lsn);
            let all = inner.all_acked();
            let mut released = Vec::new();
            while inner.held.front().is_some_and(|held| held.lsn <= all) {
                released.extend(inner.held.pop_front());
            }
            let caught_up = all >= inner.durable;
            match inner.mode {
                Mode::CatchingUp | Mode::Alone if caught_up => {
                    tracing::info!(lsn = all, "synchronous standbys have everything; in sync");
                    inner.mode = Mode::Waiting;
                }
                Mode::Stalled if inner.held.is_empty() => {
                    inner.mode = if caught_up {
                        Mode::Waiting
                    } else {
                        Mode::CatchingUp
                    };
                }
                _ => {}
            }
            released
        };
        send(released, &self.hub);
    }

    /// Marks the gate stalled when answers have waited longer than the timeout; called by a
    /// timer.
    pub fn tick(&self, now: Instant) {
        let mut inner = self.lock();
        let late = inner
            .held
            .front()
            .is_some_and(|held| now.saturating_duration_since(held.since) >= self.timeout);
        if matches!(inner.mode, Mode::CatchingUp | Mode::Waiting) && late {
            inner.mode = Mode::Stalled;
            inner.episode += 1;
            tracing::warn!(
                episode = inner.episode,
                held = inner.held.len(),
                "synchronous standbys silent; sends wait until the control plane records the cell out of sync"
            );
            metrics::counter!("cellplane_cell_sync_stalls_total").increment(1);
        }
    }

    /// Goes on alone after stall `episode`, answering everything held: the control plane has
    /// recorded the cell as not in sync. A release for another stall is refused.
    pub fn release(&self, episode: u64) -> Result<(), CellError> {
        let released = {
            let mut inner = self.lock();
            match inner.mode {
                Mode::Alone => return Ok(()),
                Mode::Stalled if inner.episode == episode => {
                    inner.mode = Mode::Alone;
                    tracing::warn!(
                        episode,
                        held = inner.held.len(),
                        "going on without the synchronous standbys"
                    );
                    std::mem::take(&mut inner.held)
                }
                mode => {
                    return Err(CellError::FailedPrecondition(format!(
                        "episode: the cell is {} at stall {}, not stalled at {episode}",
                        mode.proto().as_str_name(),
                        inner.episode
                    )));
                }
            }
        };
        send(released, &self.hub);
        Ok(())
    }

    /// Waits for `standbys` from now on (a promoted cell given its new in-region standby). A
    /// standby not waited for before may lack earlier answers, so the gate catches up with it
    /// (and stalls as usual if it does not answer); with none, everything held goes at once.
    pub fn set_standbys(&self, standbys: &[String]) {
        let released = {
            let mut inner = self.lock();
            if inner.acked.keys().eq(standbys.iter()) {
                return;
            }
            let added = standbys.iter().any(|s| !inner.acked.contains_key(s));
            let acked: BTreeMap<String, u64> = standbys
                .iter()
                .map(|s| (s.clone(), inner.acked.get(s).copied().unwrap_or(0)))
                .collect();
            inner.acked = acked;
            if standbys.is_empty() {
                inner.mode = Mode::Unguarded;
                std::mem::take(&mut inner.held)
                    .into_iter()
                    .collect::<Vec<_>>()
            } else {
                inner.mode = match inner.mode {
                    Mode::Unguarded => Mode::CatchingUp,
                    Mode::Waiting if added => Mode::CatchingUp,
                    mode => mode,
                };
                let all = inner.all_acked();
                let mut released = Vec::new();
                while inner.held.front().is_some_and(|held| held.lsn <= all) {
                    released.extend(inner.held.pop_front());
                }
                released
            }
        };
        tracing::info!(?standbys, "synchronous standbys changed");
        send(released, &self.hub);
    }

    pub fn status(&self) -> pb::SyncStatus {
        let inner = self.lock();
        pb::SyncStatus {
            standbys: inner.acked.keys().cloned().collect(),
            mode: inner.mode.proto() as i32,
            episode: inner.episode,
            held_batches: inner.held.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(n: usize) -> (Answers, Vec<oneshot::Receiver<Result<Outcome, CellError>>>) {
        (0..n)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                ((tx, Ok(Outcome::Done)), rx)
            })
            .unzip()
    }

    fn answered(rx: &mut oneshot::Receiver<Result<Outcome, CellError>>) -> bool {
        rx.try_recv().is_ok()
    }

    fn mode(gate: &SyncGate) -> pb::SyncMode {
        pb::SyncMode::try_from(gate.status().mode).expect("mode")
    }

    #[test]
    fn a_stopping_cell_refuses_what_it_holds_and_acknowledges_none() {
        let gate = SyncGate::new(
            &["s1".into()],
            Duration::from_secs(5),
            0,
            SyncHub::with_notifier(None),
        );
        let (held, mut held_rx) = answers(2);
        gate.committed(1, held, Vec::new());
        assert!(!answered(&mut held_rx[0]), "held for the standby");
        gate.refuse_held();
        for rx in &mut held_rx {
            assert!(
                matches!(rx.try_recv(), Ok(Err(CellError::Unavailable(_)))),
                "refused"
            );
        }
        assert_eq!(gate.status().held_batches, 0);
    }

    #[test]
    fn answers_wait_for_every_synchronous_standby() {
        let gate = SyncGate::new(
            &["s1".into(), "s2".into()],
            Duration::from_secs(5),
            0,
            SyncHub::with_notifier(None),
        );
        assert_eq!(mode(&gate), pb::SyncMode::CatchingUp);
        let (first, mut first_rx) = answers(2);
        gate.committed(3, first, Vec::new());
        let (second, mut second_rx) = answers(1);
        gate.committed(5, second, Vec::new());
        gate.acked("s1", 5);
        assert!(!answered(&mut first_rx[0]), "s2 has not acknowledged");
        gate.acked("s2", 4);
        assert!(answered(&mut first_rx[0]) && answered(&mut first_rx[1]));
        assert!(!answered(&mut second_rx[0]));
        gate.acked("unknown", 9);
        gate.acked("s2", 5);
        assert!(answered(&mut second_rx[0]));
        assert_eq!(mode(&gate), pb::SyncMode::Waiting);
    }

    #[test]
    fn a_stall_goes_on_alone_only_when_released_and_waits_again_once_caught_up() {
        let gate = SyncGate::new(
            &["s1".into()],
            Duration::from_millis(100),
            0,
            SyncHub::with_notifier(None),
        );
        gate.acked("s1", 0);
        assert_eq!(
            mode(&gate),
            pb::SyncMode::Waiting,
            "nothing durable yet: in sync"
        );
        let (held, mut rx) = answers(1);
        gate.committed(1, held, Vec::new());
        let start = Instant::now();
        gate.tick(start);
        assert_eq!(mode(&gate), pb::SyncMode::Waiting, "not late yet");
        gate.tick(start + Duration::from_millis(150));
        assert_eq!(mode(&gate), pb::SyncMode::Stalled);
        assert_eq!(gate.status().episode, 1);
        assert!(!answered(&mut rx[0]), "a stall does not answer by itself");
        assert!(gate.release(0).is_err(), "a release for another stall");
        gate.release(1).expect("release");
        assert!(answered(&mut rx[0]));
        assert_eq!(mode(&gate), pb::SyncMode::Alone);
        let (alone, mut alone_rx) = answers(1);
        gate.committed(2, alone, Vec::new());
        assert!(answered(&mut alone_rx[0]), "alone, answers go at once");
        gate.acked("s1", 1);
        assert_eq!(mode(&gate), pb::SyncMode::Alone, "still behind LSN 2");
        gate.acked("s1", 2);
        assert_eq!(mode(&gate), pb::SyncMode::Waiting, "caught up: waits again");
        let (again, mut again_rx) = answers(1);
        gate.committed(3, again, Vec::new());
        assert!(!answered(&mut again_rx[0]));
    }

    #[test]
    fn a_stall_ends_by_itself_when_the_standby_answers_in_the_end() {
        let gate = SyncGate::new(
            &["s1".into()],
            Duration::from_millis(10),
            0,
            SyncHub::with_notifier(None),
        );
        let (held, mut rx) = answers(1);
        gate.committed(1, held, Vec::new());
        gate.tick(Instant::now() + Duration::from_secs(1));
        assert_eq!(mode(&gate), pb::SyncMode::Stalled);
        gate.acked("s1", 1);
        assert!(answered(&mut rx[0]));
        assert_eq!(mode(&gate), pb::SyncMode::Waiting);
    }

    #[test]
    fn a_restarted_primary_is_in_sync_only_once_its_standby_has_all_it_holds() {
        let gate = SyncGate::new(
            &["s1".into()],
            Duration::from_secs(1),
            40,
            SyncHub::with_notifier(None),
        );
        gate.acked("s1", 30);
        assert_eq!(
            mode(&gate),
            pb::SyncMode::CatchingUp,
            "LSNs 31..40 may be missing"
        );
        let (held, mut rx) = answers(1);
        gate.committed(41, held, Vec::new());
        assert!(!answered(&mut rx[0]), "catching up, answers still wait");
        gate.acked("s1", 41);
        assert!(answered(&mut rx[0]));
        assert_eq!(mode(&gate), pb::SyncMode::Waiting);
    }

    #[test]
    fn without_synchronous_standbys_answers_go_at_once() {
        let gate = SyncGate::new(&[], Duration::from_secs(1), 0, SyncHub::with_notifier(None));
        let (answers, mut rx) = answers(1);
        gate.committed(1, answers, Vec::new());
        assert!(answered(&mut rx[0]));
        assert_eq!(mode(&gate), pb::SyncMode::Unguarded);
    }

    #[test]
    fn a_standby_added_at_runtime_is_caught_up_with_before_the_gate_is_in_sync_again() {
        let gate = SyncGate::new(&[], Duration::from_secs(1), 5, SyncHub::with_notifier(None));
        gate.set_standbys(&["b".to_string()]);
        assert_eq!(mode(&gate), pb::SyncMode::CatchingUp);
        let (first, mut rx) = answers(1);
        gate.committed(6, first, Vec::new());
        assert!(!answered(&mut rx[0]), "it waits for the new standby");
        gate.acked("b", 6);
        assert!(answered(&mut rx[0]));
        assert_eq!(
            mode(&gate),
            pb::SyncMode::Waiting,
            "the standby has everything"
        );
        // Going back to none lets everything held go at once.
        let (second, mut rx) = answers(1);
        gate.committed(7, second, Vec::new());
        assert!(!answered(&mut rx[0]));
        gate.set_standbys(&[]);
        assert!(answered(&mut rx[0]));
        assert_eq!(mode(&gate), pb::SyncMode::Unguarded);
    }
}
