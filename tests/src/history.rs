//! Histories of route operations as clients saw them (`Lookup`, `MoveRoute`, `CreateTenant`),
//! checked for linearizability by the Wing–Gong–Lowe checker of `todc-utils` (with its
//! memoization of partial linearizations) against a sequential model of one route key. Each
//! key is checked on its own: linearizability is local, so a history is linearizable when
//! every key's is. A key either exists before the history begins (its start route given) or
//! is created in it: a tenant's own route, absent until a `CreateTenant` takes effect.
//!
//! A client records an invocation before its call and the answer after it. A call whose
//! outcome is unknown (a timeout, an unavailable node mid-call) is never answered: it may have
//! taken effect at any point after it began, or not at all, and the client goes on under a new
//! id, as one client makes one call at a time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use todc_utils::linearizability::WGLChecker;
use todc_utils::linearizability::history::{Action, History as Actions};
use todc_utils::specifications::Specification;

/// One route key's state: its epoch and cell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub epoch: u64,
    pub cell: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    Lookup,
    Move {
        expected: u64,
        target: String,
    },
    /// `CreateTenant` of the tenant whose route the key is.
    Create,
}

/// What the route store answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ret {
    /// The epoch a lookup saw.
    Route(u64),
    /// The epoch a move made.
    Moved(u64),
    /// A move refused (ABORTED): the key is at this other epoch.
    Stale(u64),
    /// A move refused: the key is already on its target.
    AlreadyThere,
    /// A lookup found no route: the tenant does not exist (yet).
    NotFound,
    /// A create made the tenant, its route at this epoch.
    Created(u64),
    /// A create refused: the tenant exists.
    Exists,
}

/// An operation as the checker sees it, at its call and at its answer alike.
#[derive(Debug, Clone)]
enum Step {
    /// The key's route before any client's operation.
    Start(Route),
    /// After every answered operation: what follows is a move of unknown outcome that never
    /// took effect.
    End,
    /// The epoch found, or `None` when there was no route.
    Lookup(Option<u64>),
    Move {
        expected: u64,
        target: String,
        answer: Option<Ret>,
    },
    Create {
        answer: Option<Ret>,
    },
}

/// A route key as a sequential object: absent until its `Start` or a create, ended at its
/// `End`.
struct RouteKey;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyState {
    Absent,
    At(Route),
    Ended,
}

/// The epoch of a tenant's route when it is created.
const CREATED_EPOCH: u64 = 1;

impl Specification for RouteKey {
    type State = KeyState;
    type Operation = Step;

    fn init() -> KeyState {
        KeyState::Absent
    }

    fn apply(step: &Step, state: &KeyState) -> (bool, KeyState) {
        let unchanged = (false, state.clone());
        let route = match (step, state) {
            (Step::Start(route), KeyState::Absent) => return (true, KeyState::At(route.clone())),
            (Step::End, KeyState::At(_) | KeyState::Absent) => return (true, KeyState::Ended),
            // A move or create of unknown outcome placed after the end never took effect.
            (Step::Move { answer: None, .. } | Step::Create { answer: None }, KeyState::Ended) => {
                return (true, KeyState::Ended);
            }
            (Step::Lookup(None), KeyState::Absent) => return (true, KeyState::Absent),
            (Step::Create { answer }, KeyState::Absent) => {
                let created = KeyState::At(Route {
                    epoch: CREATED_EPOCH,
                    cell: String::new(),
                });
                return match answer {
                    None | Some(Ret::Created(CREATED_EPOCH)) => (true, created),
                    _ => unchanged,
                };
            }
            (_, KeyState::At(route)) => route,
            _ => return unchanged,
        };
        match step {
            Step::Start(_) | Step::End => unchanged,
            Step::Lookup(epoch) => (*epoch == Some(route.epoch), state.clone()),
            // A create of unknown outcome that found the tenant changed nothing: it is placed
            // after the end, as a refusal.
            Step::Create { answer } => (*answer == Some(Ret::Exists), state.clone()),
            Step::Move {
                expected,
                target,
                answer,
            } => {
                let (would, next) = if *expected != route.epoch {
                    (Ret::Stale(route.epoch), route.clone())
                } else if *target == route.cell {
                    (Ret::AlreadyThere, route.clone())
                } else {
                    let moved = Route {
                        epoch: route.epoch + 1,
                        cell: target.clone(),
                    };
                    (Ret::Moved(moved.epoch), moved)
                };
                match answer {
                    // Before the end, a move of unknown outcome is placed only where it
                    // took effect: a refusal changes nothing, as if it came after the end.
                    None if matches!(would, Ret::Moved(_)) => (true, KeyState::At(next)),
                    Some(answer) if *answer == would => (true, KeyState::At(next)),
                    _ => unchanged,
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Invoke { client: u64, key: String, op: Op },
    Return { client: u64, key: String, ret: Ret },
}

/// Every client's operations, in the order they began and ended.
#[derive(Debug, Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
    clients: AtomicU64,
}

impl History {
    /// An id for a new client, or for a client whose last call's outcome is unknown.
    pub fn client(&self) -> u64 {
        // 0 is the key's start.
        self.clients.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn invoke(&self, client: u64, key: &str, op: Op) {
        self.events.lock().expect("history").push(Event::Invoke {
            client,
            key: key.into(),
            op,
        });
    }

    pub fn returned(&self, client: u64, key: &str, ret: Ret) {
        self.events.lock().expect("history").push(Event::Return {
            client,
            key: key.into(),
            ret,
        });
    }

    /// Operations recorded, answered or not.
    pub fn len(&self) -> usize {
        self.events
            .lock()
            .expect("history")
            .iter()
            .filter(|e| matches!(e, Event::Invoke { .. }))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every call and answer in the order recorded, one line each: two runs that should be
    /// the same are compared by it.
    pub fn trace(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("history")
            .iter()
            .map(|e| format!("{e:?}"))
            .collect()
    }

    /// Checks every key's history against its model starting at `initial(key)` (`None` for a
    /// key created in the history); on a violation, says which key and shows its history.
    pub fn check(&self, initial: impl Fn(&str) -> Option<Route>) -> Result<(), String> {
        let events = self.events.lock().expect("history").clone();
        let mut by_key: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for event in events {
            let key = match &event {
                Event::Invoke { key, .. } | Event::Return { key, .. } => key.clone(),
            };
            by_key.entry(key).or_default().push(event);
        }
        for (key, events) in by_key {
            let actions = actions(initial(&key), &events)?;
            if !WGLChecker::<RouteKey>::is_linearizable(Actions::from_actions(actions)) {
                let shown: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
                return Err(format!(
                    "key {key}: no order of its operations agrees with a single copy:\n{}",
                    shown.join("\n")
                ));
            }
        }
        Ok(())
    }
}

/// One key's events as the checker's actions: its start first (for a key that exists before
/// the history), then each call and answer in order, then the end, then the answers of moves
/// and creates never answered (unknown). A lookup never answered is left out, as it changes
/// nothing; of unanswered moves alike in expected epoch and target, or of unanswered creates,
/// only the first is kept, as at most one of them can take effect (epochs only grow, a tenant
/// is created once) and the first can do so wherever a later one could.
fn actions(start: Option<Route>, events: &[Event]) -> Result<Vec<(usize, Action<Step>)>, String> {
    let process = |client: u64| usize::try_from(client).map_err(|e| e.to_string());
    let mut actions = Vec::new();
    if let Some(start) = start {
        let start = Step::Start(start);
        actions.push((0, Action::Call(start.clone())));
        actions.push((0, Action::Response(start)));
    }
    // Each call's answer: a client's call is answered by its next return.
    let mut answers: Vec<Option<Ret>> = vec![None; events.len()];
    let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, event) in events.iter().enumerate() {
        match event {
            Event::Invoke { client, .. } => {
                if pending.insert(*client, i).is_some() {
                    return Err(format!("client {client} made two calls at once"));
                }
            }
            Event::Return { client, ret, .. } => {
                let call = pending
                    .remove(client)
                    .ok_or_else(|| format!("client {client} answered without a call"))?;
                answers[call] = Some(ret.clone());
            }
        }
    }
    let mut open: BTreeMap<u64, Step> = BTreeMap::new();
    let mut unanswered = Vec::new();
    let mut kept: Vec<Op> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        match event {
            Event::Invoke { client, op, .. } => {
                let answer = answers[i].as_ref();
                if answer.is_none() && (*op == Op::Lookup || kept.contains(op)) {
                    continue;
                }
                let step = step(op, answer)?;
                if answer.is_some() {
                    open.insert(*client, step.clone());
                } else {
                    kept.push(op.clone());
                    unanswered.push((process(*client)?, step.clone()));
                }
                actions.push((process(*client)?, Action::Call(step)));
            }
            Event::Return { client, .. } => {
                let step = open
                    .remove(client)
                    .ok_or_else(|| format!("client {client} answered without a call"))?;
                actions.push((process(*client)?, Action::Response(step)));
            }
        }
    }
    actions.push((0, Action::Call(Step::End)));
    actions.push((0, Action::Response(Step::End)));
    actions.extend(
        unanswered
            .into_iter()
            .map(|(process, step)| (process, Action::Response(step))),
    );
    Ok(actions)
}

/// A call as the checker sees it, with its answer (`None` for a move of unknown outcome).
fn step(op: &Op, answer: Option<&Ret>) -> Result<Step, String> {
    Ok(match (op, answer) {
        (Op::Lookup, Some(Ret::Route(epoch))) => Step::Lookup(Some(*epoch)),
        (Op::Lookup, Some(Ret::NotFound)) => Step::Lookup(None),
        (Op::Lookup, other) => return Err(format!("a lookup answered {other:?}")),
        (Op::Create, answer) => Step::Create {
            answer: answer.cloned(),
        },
        (Op::Move { expected, target }, answer) => Step::Move {
            expected: *expected,
            target: target.clone(),
            answer: answer.cloned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Option<Route> {
        Some(Route {
            epoch: 1,
            cell: "a".into(),
        })
    }

    fn move_to(expected: u64, target: &str) -> Op {
        Op::Move {
            expected,
            target: target.into(),
        }
    }

    #[test]
    fn a_lookup_behind_an_acknowledged_move_is_not_linearizable() {
        // Issue 17's history: a move to epoch 2 acknowledged, then a lookup that answers 1.
        let history = History::default();
        let (writer, reader) = (history.client(), history.client());
        history.invoke(writer, "k", move_to(1, "b"));
        history.returned(writer, "k", Ret::Moved(2));
        history.invoke(reader, "k", Op::Lookup);
        history.returned(reader, "k", Ret::Route(1));
        let error = history.check(|_| start()).expect_err("stale lookup");
        assert!(error.starts_with("key k:"), "{error}");
    }

    #[test]
    fn a_move_of_unknown_outcome_may_or_may_not_have_happened() {
        let history = History::default();
        let (writer, reader) = (history.client(), history.client());
        history.invoke(writer, "k", move_to(1, "b"));
        // Timed out: the writer goes on as a new client, re-reading the key.
        let writer = history.client();
        history.invoke(reader, "k", Op::Lookup);
        history.returned(reader, "k", Ret::Route(2));
        history.invoke(writer, "k", move_to(1, "b"));
        history.returned(writer, "k", Ret::Stale(2));
        assert_eq!(history.check(|_| start()), Ok(()));

        // Never taking effect is as good, but then nobody may see epoch 2 from it.
        let never = History::default();
        let (writer, reader) = (never.client(), never.client());
        never.invoke(writer, "k", move_to(1, "b"));
        never.invoke(reader, "k", Op::Lookup);
        never.returned(reader, "k", Ret::Route(1));
        assert_eq!(never.check(|_| start()), Ok(()));
    }

    #[test]
    fn keys_are_checked_apart_and_concurrent_operations_in_any_order() {
        let history = History::default();
        let (a, b) = (history.client(), history.client());
        // Overlapping: the lookup may come before or after the move.
        history.invoke(a, "x", move_to(1, "b"));
        history.invoke(b, "x", Op::Lookup);
        history.returned(b, "x", Ret::Route(1));
        history.returned(a, "x", Ret::Moved(2));
        history.invoke(b, "y", move_to(1, "a"));
        history.returned(b, "y", Ret::AlreadyThere);
        assert_eq!(history.check(|_| start()), Ok(()));
        assert_eq!(history.len(), 3);
    }

    #[test]
    fn a_tenant_is_not_found_before_its_create_and_found_after() {
        let history = History::default();
        let (creator, reader) = (history.client(), history.client());
        history.invoke(reader, "t", Op::Lookup);
        history.returned(reader, "t", Ret::NotFound);
        history.invoke(creator, "t", Op::Create);
        history.returned(creator, "t", Ret::Created(1));
        history.invoke(reader, "t", Op::Lookup);
        history.returned(reader, "t", Ret::Route(1));
        history.invoke(creator, "t", Op::Create);
        history.returned(creator, "t", Ret::Exists);
        assert_eq!(history.check(|_| None), Ok(()));

        // Not found after an acknowledged create: no order explains it.
        let lost = History::default();
        let (creator, reader) = (lost.client(), lost.client());
        lost.invoke(creator, "t", Op::Create);
        lost.returned(creator, "t", Ret::Created(1));
        lost.invoke(reader, "t", Op::Lookup);
        lost.returned(reader, "t", Ret::NotFound);
        assert!(lost.check(|_| None).is_err());

        // Created twice: no order explains it either.
        let twice = History::default();
        let (a, b) = (twice.client(), twice.client());
        twice.invoke(a, "t", Op::Create);
        twice.returned(a, "t", Ret::Created(1));
        twice.invoke(b, "t", Op::Create);
        twice.returned(b, "t", Ret::Created(1));
        assert!(twice.check(|_| None).is_err());
    }

    #[test]
    fn a_create_of_unknown_outcome_may_or_may_not_have_made_the_tenant() {
        let made = History::default();
        let (creator, reader) = (made.client(), made.client());
        made.invoke(creator, "t", Op::Create);
        made.invoke(reader, "t", Op::Lookup);
        made.returned(reader, "t", Ret::Route(1));
        assert_eq!(made.check(|_| None), Ok(()));

        let not = History::default();
        let (creator, reader) = (not.client(), not.client());
        not.invoke(creator, "t", Op::Create);
        not.invoke(reader, "t", Op::Lookup);
        not.returned(reader, "t", Ret::NotFound);
        assert_eq!(not.check(|_| None), Ok(()));
    }
}
