//! The bounded history of route events that watches resume from.
//!
//! Events are kept in revision order in a persistent vector, so a snapshot clones the history in
//! O(1). The oldest events are dropped past [`MAX_ROUTE_HISTORY`] or on an explicit compaction;
//! a watch that asks for a dropped revision is told to reload.

use imbl::Vector;
use serde::{Deserialize, Serialize};

use super::model::RouteView;
use crate::limits::MAX_ROUTE_HISTORY;

/// Whether a key now routes somewhere or is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One route change at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEvent {
    pub revision: u64,
    pub kind: EventKind,
    /// For a delete, the route as it was just before.
    pub route: RouteView,
}

/// A watch asked for a revision the history no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub compacted_revision: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    events: Vector<RouteEvent>,
    /// Every event at or below this revision is gone.
    compacted_revision: u64,
}

impl History {
    pub fn from_parts(events: Vector<RouteEvent>, compacted_revision: u64) -> Self {
        Self {
            events,
            compacted_revision,
        }
    }

    pub fn compacted_revision(&self) -> u64 {
        self.compacted_revision
    }

    pub fn events(&self) -> &Vector<RouteEvent> {
        &self.events
    }

    pub fn push(&mut self, event: RouteEvent) {
        if let Some(last) = self.events.back() {
            assert!(
                last.revision <= event.revision,
                "route events must be appended in revision order"
            );
        }
        self.events.push_back(event);
        if self.events.len() > MAX_ROUTE_HISTORY {
            // Drop whole revisions only, so a watcher never resumes in the middle of one.
            let oldest = self.events.front().map(|e| e.revision).unwrap_or_default();
            self.compact(oldest);
        }
    }

    /// Drops every event at or below `revision`.
    pub fn compact(&mut self, revision: u64) {
        while self.events.front().is_some_and(|e| e.revision <= revision) {
            self.events.pop_front();
        }
        self.compacted_revision = self.compacted_revision.max(revision);
    }

    /// Events with `revision >= from_revision`, in order.
    pub fn since(&self, from_revision: u64) -> Result<Vec<RouteEvent>, Compacted> {
        if from_revision <= self.compacted_revision {
            return Err(Compacted {
                compacted_revision: self.compacted_revision,
            });
        }
        // The comparator never answers Equal, so the search lands on the first event at or past
        // `from_revision`.
        let start = self
            .events
            .binary_search_by(|e| {
                if e.revision < from_revision {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            })
            .unwrap_or_else(|index| index);
        Ok(self.events.skip(start).iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::model::RouteKey;

    fn event(revision: u64) -> RouteEvent {
        RouteEvent {
            revision,
            kind: EventKind::Put,
            route: RouteView {
                key: RouteKey::tenant("t"),
                cell_id: Arc::from("c"),
                endpoint: Arc::from("127.0.0.1:1"),
                epoch: revision,
                revision,
                is_override: false,
            },
        }
    }

    #[test]
    fn since_returns_events_from_the_revision_on() {
        let mut history = History::default();
        for revision in [2, 3, 3, 5] {
            history.push(event(revision));
        }
        let revisions = |from| {
            history
                .since(from)
                .map(|events| events.iter().map(|e| e.revision).collect::<Vec<_>>())
        };
        assert_eq!(revisions(1), Ok(vec![2, 3, 3, 5]));
        assert_eq!(revisions(3), Ok(vec![3, 3, 5]));
        assert_eq!(revisions(6), Ok(vec![]));
    }

    #[test]
    fn compaction_refuses_older_revisions() {
        let mut history = History::default();
        for revision in 1..=5 {
            history.push(event(revision));
        }
        history.compact(3);
        assert_eq!(
            history.since(3),
            Err(Compacted {
                compacted_revision: 3
            })
        );
        assert_eq!(history.since(4).map(|e| e.len()), Ok(2));
    }

    #[test]
    fn the_bound_drops_whole_revisions() {
        let mut history = History::default();
        for revision in 1..=(MAX_ROUTE_HISTORY as u64 + 1) {
            history.push(event(revision));
        }
        assert_eq!(history.events().len(), MAX_ROUTE_HISTORY);
        assert_eq!(history.compacted_revision(), 1);
    }
}
