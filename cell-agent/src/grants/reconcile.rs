//! What each cell must be told so that its grants equal the routes that point at it: pure
//! functions of the routes the agent knows and the grants its cells hold. The executor beside
//! them (`grants/mod.rs`) only reads routes and cell status and carries out the actions.

use std::collections::{BTreeMap, HashMap};

/// `(tenant_id, conversation_id)`.
pub type Key = (String, String);

/// The routes that point at one of this agent's cells: key → (cell, epoch).
pub type Routes = HashMap<Key, (String, u64)>;

/// What a cell should hold: one of this agent's cells, a key and the epoch it holds it at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub cell: String,
    pub key: Key,
    pub epoch: u64,
}

/// One instruction to one of this agent's cells.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// The route gives the cell this key at this epoch.
    Grant { cell: String, key: Key, epoch: u64 },
    /// The key went to `to_cell` at `to_epoch`: writers that still reach the cell are told.
    Revoke {
        cell: String,
        key: Key,
        to_cell: String,
        to_epoch: u64,
    },
    /// The key's tenant was deleted (the route had `epoch`): revoke it and drop its rows.
    Drop { cell: String, key: Key, epoch: u64 },
}

/// The plan after a full load.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Grants of routes the cells do not hold at their epoch yet.
    pub grants: Vec<Action>,
    /// Keys a cell holds that no route gives it: where each went needs a lookup first, and
    /// then [`resolved`] says what to do.
    pub to_resolve: Vec<Held>,
}

/// After a full load: grant every route the cells do not hold at its epoch yet, and resolve
/// every key a cell holds that no route gives it. A conversation frozen alone on its tenant's
/// cell resolves to that same cell and stays (see [`resolved`]). Both lists come out sorted, so
/// the same inputs give the same plan.
pub fn reconcile(routes: &Routes, held: &[Held]) -> Plan {
    let holding: BTreeMap<(&str, &Key), u64> = held
        .iter()
        .map(|h| ((h.cell.as_str(), &h.key), h.epoch))
        .collect();
    let mut grants: Vec<Action> = routes
        .iter()
        .filter(|(key, (cell, epoch))| holding.get(&(cell.as_str(), *key)) != Some(epoch))
        .map(|(key, (cell, epoch))| Action::Grant {
            cell: cell.clone(),
            key: key.clone(),
            epoch: *epoch,
        })
        .collect();
    grants.sort();
    let mut to_resolve: Vec<Held> = held
        .iter()
        .filter(|h| routes.get(&h.key).is_none_or(|(owner, _)| *owner != h.cell))
        .cloned()
        .collect();
    to_resolve.sort();
    Plan { grants, to_resolve }
}

/// What to do with a key a cell holds once its route is known: `None` when the key no longer
/// exists (its tenant was deleted).
pub fn resolved(
    cell: &str,
    key: &Key,
    held_epoch: u64,
    route: Option<(&str, u64)>,
) -> Option<Action> {
    match route {
        None => Some(Action::Drop {
            cell: cell.to_string(),
            key: key.clone(),
            epoch: held_epoch,
        }),
        Some((owner, _)) if owner == cell => None,
        Some((owner, epoch)) => Some(Action::Revoke {
            cell: cell.to_string(),
            key: key.clone(),
            to_cell: owner.to_string(),
            to_epoch: epoch,
        }),
    }
}

/// A route change from the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// The key is routed to `cell` at `epoch` now.
    Put { key: Key, cell: String, epoch: u64 },
    /// The key is gone (its tenant was deleted).
    Delete { key: Key },
}

/// Follows one route change: updates `routes` (the keys routed to this agent's cells, which
/// `is_local` names) and says what the cells must be told. A key that arrives is granted at its
/// new epoch; one that leaves is revoked towards its new owner; one that is deleted is dropped
/// where it was.
pub fn follow(
    routes: &mut Routes,
    is_local: impl Fn(&str) -> bool,
    change: RouteChange,
) -> Vec<Action> {
    match change {
        RouteChange::Delete { key } => routes
            .remove(&key)
            .map(|(cell, epoch)| Action::Drop { cell, key, epoch })
            .into_iter()
            .collect(),
        RouteChange::Put { key, cell, epoch } => {
            let previous = routes.remove(&key);
            let mut actions = Vec::new();
            if is_local(&cell) {
                actions.push(Action::Grant {
                    cell: cell.clone(),
                    key: key.clone(),
                    epoch,
                });
                routes.insert(key.clone(), (cell.clone(), epoch));
            }
            if let Some((old_cell, _)) = previous
                && old_cell != cell
            {
                actions.push(Action::Revoke {
                    cell: old_cell,
                    key,
                    to_cell: cell,
                    to_epoch: epoch,
                });
            }
            actions
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, c: &str) -> Key {
        (t.to_string(), c.to_string())
    }

    fn held(cell: &str, k: Key, epoch: u64) -> Held {
        Held {
            cell: cell.into(),
            key: k,
            epoch,
        }
    }

    fn routes(entries: &[(Key, &str, u64)]) -> Routes {
        entries
            .iter()
            .map(|(k, c, e)| (k.clone(), (c.to_string(), *e)))
            .collect()
    }

    #[test]
    fn a_load_grants_what_is_missing_or_older_and_resolves_what_is_not_routed_here() {
        let routes = routes(&[
            (key("t1", ""), "a", 3),
            (key("t2", ""), "a", 5),
            (key("t3", ""), "b", 1),
        ]);
        let holding = [
            held("a", key("t1", ""), 3),
            held("a", key("t2", ""), 4),
            held("b", key("t4", ""), 2),
            held("a", key("t3", ""), 7),
        ];
        assert_eq!(
            reconcile(&routes, &holding),
            Plan {
                grants: vec![
                    Action::Grant {
                        cell: "a".into(),
                        key: key("t2", ""),
                        epoch: 5
                    },
                    Action::Grant {
                        cell: "b".into(),
                        key: key("t3", ""),
                        epoch: 1
                    },
                ],
                to_resolve: vec![held("a", key("t3", ""), 7), held("b", key("t4", ""), 2)],
            }
        );
    }

    #[test]
    fn a_reconciled_agent_has_nothing_to_do() {
        let routes = routes(&[(key("t1", ""), "a", 3), (key("t1", "hot"), "b", 4)]);
        let holding = [held("a", key("t1", ""), 3), held("b", key("t1", "hot"), 4)];
        assert_eq!(reconcile(&routes, &holding), Plan::default());
    }

    #[test]
    fn a_resolved_key_is_revoked_towards_its_owner_dropped_or_kept() {
        let k = key("t", "c");
        assert_eq!(
            resolved("a", &k, 3, Some(("b", 4))),
            Some(Action::Revoke {
                cell: "a".into(),
                key: k.clone(),
                to_cell: "b".into(),
                to_epoch: 4
            })
        );
        assert_eq!(
            resolved("a", &k, 3, None),
            Some(Action::Drop {
                cell: "a".into(),
                key: k.clone(),
                epoch: 3
            })
        );
        // A conversation frozen alone on its tenant's cell: the route is the tenant's, here.
        assert_eq!(resolved("a", &k, 3, Some(("a", 3))), None);
    }

    #[test]
    fn the_watch_grants_arrivals_revokes_departures_and_drops_deletes() {
        let local = |cell: &str| cell == "a" || cell == "b";
        let mut mine = Routes::new();
        let k = key("t", "");
        let put = |cell: &str, epoch| RouteChange::Put {
            key: k.clone(),
            cell: cell.into(),
            epoch,
        };
        assert_eq!(
            follow(&mut mine, local, put("a", 1)),
            vec![Action::Grant {
                cell: "a".into(),
                key: k.clone(),
                epoch: 1
            }]
        );
        // Moved between two local cells: the new owner is granted first.
        assert_eq!(
            follow(&mut mine, local, put("b", 2)),
            vec![
                Action::Grant {
                    cell: "b".into(),
                    key: k.clone(),
                    epoch: 2
                },
                Action::Revoke {
                    cell: "a".into(),
                    key: k.clone(),
                    to_cell: "b".into(),
                    to_epoch: 2
                }
            ]
        );
        // Moved to another region's cell: only the revocation here.
        assert_eq!(
            follow(&mut mine, local, put("x", 3)),
            vec![Action::Revoke {
                cell: "b".into(),
                key: k.clone(),
                to_cell: "x".into(),
                to_epoch: 3
            }]
        );
        assert!(mine.is_empty());
        // A delete of a key none of this agent's cells has: nothing to do.
        assert!(follow(&mut mine, local, RouteChange::Delete { key: k.clone() }).is_empty());
        follow(&mut mine, local, put("a", 4));
        assert_eq!(
            follow(&mut mine, local, RouteChange::Delete { key: k.clone() }),
            vec![Action::Drop {
                cell: "a".into(),
                key: k,
                epoch: 4
            }]
        );
    }
}
