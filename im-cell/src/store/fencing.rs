//! Fencing: a cell writes a route key only at the epoch the control plane granted it, and not
//! while the key is frozen or after it was revoked. What the cell holds of a key is one
//! [`Grant`]; every change the control plane asks for goes through one transition table,
//! [`transition`], which never moves a key's epoch back: a grant, revocation or delete that
//! arrives late (a retried call, an agent replaying its watch) changes nothing or is refused.
//! The check runs in the writer, in order with grant changes, so a freeze's LSN bounds every
//! write it let through.

use std::collections::HashMap;

use cellplane_api::proto::cell::WrongCell;

use super::records::GrantRecord;
use crate::error::CellError;

/// How long a writer refused for a frozen key should wait before retrying: a migration holds
/// a key frozen for a few tens of milliseconds (docs/benchmarks.md), so a writer retries a
/// couple of times rather than waiting out a long fixed pause.
pub const FROZEN_RETRY_AFTER_MS: u64 = 20;

/// What this cell holds of one route key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The cell owns the key at `epoch`: writes naming exactly that epoch pass.
    Owned { epoch: u64 },
    /// Owned, but frozen for a move: writes are refused, retryably, until it thaws or moves.
    Frozen { epoch: u64 },
    /// One conversation frozen on its tenant's cell while the rest of the tenant goes on: made
    /// from the tenant's grant at `epoch` when the conversation is about to move away. Thawing
    /// removes it, so the conversation follows the tenant's grant again, later epochs included.
    FrozenAlone { epoch: u64 },
    /// The key moved to `cell` at `to_epoch`; this cell held it at `epoch` (0 if it never held
    /// the key itself: a conversation that left its tenant's cell without being frozen here).
    Revoked {
        epoch: u64,
        cell: String,
        to_epoch: u64,
    },
    /// The key's tenant was deleted. `epoch` is the newest epoch the key had, here or when it
    /// was deleted: only a tenant created again under the same id, whose epochs start above
    /// every epoch the deleted one reached, is granted the key again.
    Deleted { epoch: u64 },
}

impl Grant {
    /// The epoch the cell held (or holds) the key at.
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Owned { epoch }
            | Self::Frozen { epoch }
            | Self::FrozenAlone { epoch }
            | Self::Revoked { epoch, .. }
            | Self::Deleted { epoch } => *epoch,
        }
    }

    /// The newest epoch the cell knows the key at: where it went, once revoked. Anything at or
    /// below it is old news.
    fn newest_epoch(&self) -> u64 {
        match self {
            Self::Revoked { to_epoch, .. } => *to_epoch,
            other => other.epoch(),
        }
    }

    /// Whether the cell owns the key (frozen or not).
    pub fn is_owned(&self) -> bool {
        matches!(
            self,
            Self::Owned { .. } | Self::Frozen { .. } | Self::FrozenAlone { .. }
        )
    }

    pub fn is_frozen(&self) -> bool {
        matches!(self, Self::Frozen { .. } | Self::FrozenAlone { .. })
    }
}

/// How a grant is kept on disk. The record's fields predate [`Grant`]; a deleted key is one
/// revoked towards no cell.
impl From<&Grant> for GrantRecord {
    fn from(grant: &Grant) -> Self {
        let owned = |epoch: u64, frozen: bool, inherited: bool| GrantRecord {
            epoch,
            frozen,
            moved_to: None,
            inherited,
        };
        match grant {
            Grant::Owned { epoch } => owned(*epoch, false, false),
            Grant::Frozen { epoch } => owned(*epoch, true, false),
            Grant::FrozenAlone { epoch } => owned(*epoch, true, true),
            Grant::Revoked {
                epoch,
                cell,
                to_epoch,
            } => GrantRecord {
                epoch: *epoch,
                frozen: false,
                moved_to: Some((cell.clone(), *to_epoch)),
                inherited: false,
            },
            Grant::Deleted { epoch } => GrantRecord {
                epoch: *epoch,
                frozen: false,
                moved_to: Some((String::new(), *epoch)),
                inherited: false,
            },
        }
    }
}

impl From<GrantRecord> for Grant {
    fn from(record: GrantRecord) -> Self {
        match record.moved_to {
            // Records written before deletes carried an epoch name epoch 0.
            Some((cell, to_epoch)) if cell.is_empty() => Grant::Deleted {
                epoch: record.epoch.max(to_epoch),
            },
            Some((cell, to_epoch)) => Grant::Revoked {
                epoch: record.epoch,
                cell,
                to_epoch,
            },
            None if record.inherited => Grant::FrozenAlone {
                epoch: record.epoch,
            },
            None if record.frozen => Grant::Frozen {
                epoch: record.epoch,
            },
            None => Grant::Owned {
                epoch: record.epoch,
            },
        }
    }
}

/// A change of a key's grant, as the control plane asks for it through the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantChange {
    /// The key is this cell's at `epoch`.
    Grant { epoch: u64 },
    /// The key moved to `cell` at `epoch`.
    Revoke { cell: String, epoch: u64 },
    /// The key's tenant was deleted; its route had `epoch`.
    Delete { epoch: u64 },
    /// Stop writes for a move; answers the last LSN.
    Freeze,
    /// Let writes go on again after a move was rolled back.
    Unfreeze,
}

/// What a change does to the key's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Put(Grant),
    Remove,
    Unchanged,
}

/// The transition table of one key's grant. `held` is the key's entry; `tenant` is its
/// tenant's entry, from which a conversation without an entry of its own is frozen alone.
///
/// | held \ change | grant e | revoke to e | delete at e | freeze | unfreeze |
/// |---|---|---|---|---|---|
/// | none | owned e | revoked | deleted | frozen alone (tenant owned) / not found | not found |
/// | owned, frozen, frozen alone at h | e < h refused; e = h unchanged (never thaws); e > h owned e | e ≤ h unchanged; revoked | h > e unchanged; deleted | frozen | owned / removed |
/// | revoked to t | e ≤ t refused (but e = t towards this cell: owned e); owned e | e ≤ t unchanged; revoked | t > e unchanged; deleted | refused | refused |
/// | deleted at d | e ≤ d refused; owned e | e ≤ d unchanged; revoked | deleted at max | refused | refused |
///
/// `own_cell` is this cell's id. A key revoked towards this very cell at `t` is granted at `t`:
/// a promoted standby holds the revocations its old primary made while it still followed, and
/// the one that moved the key here names it.
pub fn transition(
    own_cell: &str,
    (tenant_id, conversation_id): (&str, &str),
    held: Option<&Grant>,
    tenant: Option<&Grant>,
    change: &GrantChange,
) -> Result<Transition, CellError> {
    let key = format!("{tenant_id}/{conversation_id}");
    let newest = held.map(Grant::newest_epoch).unwrap_or(0);
    let transition = match (change, held) {
        (GrantChange::Grant { epoch }, None) => Transition::Put(Grant::Owned { epoch: *epoch }),
        (GrantChange::Grant { epoch }, Some(Grant::Revoked { cell, to_epoch, .. }))
            if cell == own_cell && epoch == to_epoch =>
        {
            Transition::Put(Grant::Owned { epoch: *epoch })
        }
        (GrantChange::Grant { epoch }, Some(held)) if held.is_owned() && *epoch == newest => {
            Transition::Unchanged
        }
        (GrantChange::Grant { epoch }, Some(held)) if *epoch <= newest => {
            let was = match held {
                Grant::Revoked { cell, to_epoch, .. } => {
                    format!("{key} moved to cell {cell:?} at epoch {to_epoch}")
                }
                Grant::Deleted { epoch } => format!("{key} was deleted at epoch {epoch}"),
                owned => format!("the cell holds {key} at epoch {}", owned.epoch()),
            };
            return Err(CellError::invalid(
                "epoch",
                format!("{epoch} must not go back: {was}"),
            ));
        }
        (GrantChange::Grant { epoch }, Some(_)) => Transition::Put(Grant::Owned { epoch: *epoch }),
        (GrantChange::Revoke { epoch, .. }, Some(_)) if *epoch <= newest => Transition::Unchanged,
        (GrantChange::Revoke { cell, epoch }, held) => Transition::Put(Grant::Revoked {
            epoch: held.map(Grant::epoch).unwrap_or(0),
            cell: cell.clone(),
            to_epoch: *epoch,
        }),
        (GrantChange::Delete { epoch }, Some(held))
            if newest > *epoch || matches!(held, Grant::Deleted { .. }) && newest == *epoch =>
        {
            Transition::Unchanged
        }
        (GrantChange::Delete { epoch }, _) => Transition::Put(Grant::Deleted { epoch: *epoch }),
        (GrantChange::Freeze, Some(Grant::Owned { epoch })) => {
            Transition::Put(Grant::Frozen { epoch: *epoch })
        }
        (GrantChange::Unfreeze, Some(Grant::Owned { .. }))
        | (GrantChange::Freeze, Some(Grant::Frozen { .. } | Grant::FrozenAlone { .. })) => {
            Transition::Unchanged
        }
        (GrantChange::Unfreeze, Some(Grant::Frozen { epoch })) => {
            Transition::Put(Grant::Owned { epoch: *epoch })
        }
        (GrantChange::Unfreeze, Some(Grant::FrozenAlone { .. })) => Transition::Remove,
        (
            GrantChange::Freeze | GrantChange::Unfreeze,
            Some(Grant::Revoked { .. } | Grant::Deleted { .. }),
        ) => {
            return Err(CellError::invalid(
                "conversation_id",
                format!("{key} was revoked"),
            ));
        }
        (GrantChange::Freeze, None) => match tenant {
            Some(Grant::Owned { epoch } | Grant::Frozen { epoch })
                if !conversation_id.is_empty() =>
            {
                // The conversation is about to move away from its tenant's cell.
                Transition::Put(Grant::FrozenAlone { epoch: *epoch })
            }
            _ => return Err(not_held(&key)),
        },
        (GrantChange::Unfreeze, None) => return Err(not_held(&key)),
    };
    Ok(transition)
}

fn not_held(key: &str) -> CellError {
    CellError::NotFound(format!("tenant_id: the cell holds no grant for {key}"))
}

/// Grants by `(tenant, conversation)`; an empty conversation is the whole tenant.
pub type Grants = HashMap<(String, String), Grant>;

fn wrong_cell(message: String, detail: WrongCell) -> CellError {
    CellError::WrongCell {
        message,
        detail: Box::new(detail),
    }
}

/// The conversations of `tenant` with route keys of their own on this cell (granted here,
/// moved away, or frozen alone): a tenant's export and purge leave them out.
pub fn own_conversations(grants: &Grants, tenant: &str) -> impl Iterator<Item = String> {
    grants
        .keys()
        .filter(move |(t, c)| t == tenant && !c.is_empty())
        .map(|(_, c)| c.clone())
}

/// The grant a write to `(tenant, conversation)` is checked against: the conversation's own,
/// else its tenant's.
pub fn governing<'a>(grants: &'a Grants, tenant: &str, conversation: &str) -> Option<&'a Grant> {
    grants
        .get(&(tenant.to_string(), conversation.to_string()))
        .or_else(|| grants.get(&(tenant.to_string(), String::new())))
}

/// Checks that this cell may write `(tenant, conversation)` at `epoch` now.
pub fn check_owner(
    grants: &Grants,
    tenant: &str,
    conversation: &str,
    epoch: u64,
) -> Result<(), CellError> {
    let grant = governing(grants, tenant, conversation);
    let mut detail = WrongCell {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        cell_epoch: grant.map(Grant::epoch).unwrap_or(0),
        ..Default::default()
    };
    match grant {
        None => Err(wrong_cell(
            format!("route_epoch: this cell does not own {tenant}/{conversation}"),
            detail,
        )),
        Some(Grant::Deleted { .. }) => Err(wrong_cell(
            format!(
                "route_epoch: {tenant}/{conversation} no longer exists (its tenant was deleted)"
            ),
            detail,
        )),
        Some(Grant::Revoked { cell, to_epoch, .. }) => {
            detail.current_cell_id = cell.clone();
            detail.current_epoch = *to_epoch;
            Err(wrong_cell(
                format!(
                    "route_epoch: {tenant}/{conversation} moved to cell {cell:?} at epoch {to_epoch}"
                ),
                detail,
            ))
        }
        Some(held) if held.epoch() != epoch => {
            let rule = if epoch < held.epoch() {
                "is stale"
            } else {
                "is newer than this cell's grant"
            };
            Err(wrong_cell(
                format!(
                    "route_epoch: {epoch} {rule} (the cell holds {tenant}/{conversation} at epoch {}); refresh the route",
                    held.epoch()
                ),
                detail,
            ))
        }
        Some(held) if held.is_frozen() => {
            detail.frozen = true;
            detail.retry_after_ms = FROZEN_RETRY_AFTER_MS;
            Err(wrong_cell(
                format!(
                    "{tenant}/{conversation} is frozen for a move; retry after {FROZEN_RETRY_AFTER_MS} ms"
                ),
                detail,
            ))
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(entries: &[(&str, &str, Grant)]) -> Grants {
        entries
            .iter()
            .map(|(t, c, g)| ((t.to_string(), c.to_string()), g.clone()))
            .collect()
    }

    fn owned(epoch: u64) -> Grant {
        Grant::Owned { epoch }
    }

    fn revoked(epoch: u64, cell: &str, to_epoch: u64) -> Grant {
        Grant::Revoked {
            epoch,
            cell: cell.into(),
            to_epoch,
        }
    }

    fn change(held: Option<&Grant>, change: GrantChange) -> Result<Transition, CellError> {
        transition("self", ("t", ""), held, None, &change)
    }

    fn grant(epoch: u64) -> GrantChange {
        GrantChange::Grant { epoch }
    }

    fn revoke(cell: &str, epoch: u64) -> GrantChange {
        GrantChange::Revoke {
            cell: cell.into(),
            epoch,
        }
    }

    /// Applies changes in order, as the writer does, and returns the entry left.
    fn replay(changes: &[GrantChange]) -> Option<Grant> {
        let mut held: Option<Grant> = None;
        for c in changes {
            match change(held.as_ref(), c.clone()) {
                Ok(Transition::Put(grant)) => held = Some(grant),
                Ok(Transition::Remove) => held = None,
                Ok(Transition::Unchanged) | Err(_) => {}
            }
        }
        held
    }

    #[test]
    fn a_late_revoke_never_fences_the_owner_it_predates() {
        // Moved away at 6, back here at 7, then the revocation towards 6 arrives again.
        let held = replay(&[grant(5), revoke("b", 6), grant(7), revoke("b", 6)]);
        assert_eq!(held, Some(owned(7)));
        assert_eq!(change(held.as_ref(), grant(7)), Ok(Transition::Unchanged));
        // A late delete of the key as it was at 6 changes nothing either.
        assert_eq!(
            change(held.as_ref(), GrantChange::Delete { epoch: 6 }),
            Ok(Transition::Unchanged)
        );
    }

    #[test]
    fn no_transition_moves_an_epoch_back() {
        let states = [
            None,
            Some(owned(5)),
            Some(Grant::Frozen { epoch: 5 }),
            Some(Grant::FrozenAlone { epoch: 5 }),
            Some(revoked(5, "b", 6)),
            Some(revoked(0, "b", 6)),
            Some(Grant::Deleted { epoch: 5 }),
        ];
        let changes = [
            grant(4),
            grant(5),
            grant(6),
            grant(7),
            revoke("c", 4),
            revoke("c", 5),
            revoke("c", 6),
            revoke("c", 8),
            GrantChange::Delete { epoch: 4 },
            GrantChange::Delete { epoch: 5 },
            GrantChange::Delete { epoch: 9 },
            GrantChange::Freeze,
            GrantChange::Unfreeze,
        ];
        for held in &states {
            for c in &changes {
                let before = held.as_ref().map(Grant::newest_epoch).unwrap_or(0);
                if let Ok(Transition::Put(after)) =
                    transition("self", ("t", "c"), held.as_ref(), Some(&owned(5)), c)
                {
                    let held_before = held.as_ref().map(Grant::epoch).unwrap_or(0);
                    assert!(
                        after.newest_epoch() >= before && after.epoch() >= held_before,
                        "{c:?} on {held:?} gave {after:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn grants_at_or_below_what_the_key_reached_are_refused() {
        for held in [owned(5), revoked(5, "b", 6), Grant::Deleted { epoch: 6 }] {
            let err = change(Some(&held), grant(4)).expect_err("older");
            assert!(matches!(err, CellError::Invalid { .. }), "{err:?}");
        }
        assert!(change(Some(&revoked(5, "b", 6)), grant(6)).is_err());
        assert!(change(Some(&Grant::Deleted { epoch: 6 }), grant(6)).is_err());
        assert_eq!(
            change(Some(&revoked(5, "b", 6)), grant(7)),
            Ok(Transition::Put(owned(7)))
        );
        assert_eq!(
            change(Some(&Grant::Deleted { epoch: 6 }), grant(7)),
            Ok(Transition::Put(owned(7)))
        );
    }

    #[test]
    fn a_freeze_holds_until_a_thaw_or_new_ownership() {
        let frozen = Grant::Frozen { epoch: 5 };
        assert_eq!(
            change(Some(&owned(5)), GrantChange::Freeze),
            Ok(Transition::Put(frozen.clone()))
        );
        assert_eq!(
            change(Some(&frozen), GrantChange::Freeze),
            Ok(Transition::Unchanged)
        );
        assert_eq!(change(Some(&frozen), grant(5)), Ok(Transition::Unchanged));
        assert_eq!(
            change(Some(&frozen), GrantChange::Unfreeze),
            Ok(Transition::Put(owned(5)))
        );
        assert_eq!(
            change(Some(&frozen), grant(6)),
            Ok(Transition::Put(owned(6)))
        );
        assert!(change(Some(&revoked(5, "b", 6)), GrantChange::Freeze).is_err());
        assert!(matches!(
            change(None, GrantChange::Unfreeze),
            Err(CellError::NotFound(_))
        ));
    }

    #[test]
    fn a_key_revoked_towards_this_cell_is_granted_at_that_epoch_only() {
        let to_self = revoked(3, "self", 4);
        let grant = |epoch| {
            transition(
                "self",
                ("t", ""),
                Some(&to_self),
                None,
                &GrantChange::Grant { epoch },
            )
        };
        assert_eq!(grant(4), Ok(Transition::Put(owned(4))));
        assert!(grant(3).is_err(), "never back");
        assert_eq!(grant(5), Ok(Transition::Put(owned(5))));
        let to_other = revoked(3, "b", 4);
        assert!(
            transition(
                "self",
                ("t", ""),
                Some(&to_other),
                None,
                &GrantChange::Grant { epoch: 4 }
            )
            .is_err(),
            "the key is another cell's at 4"
        );
    }

    #[test]
    fn a_conversation_freezes_alone_from_its_tenants_grant() {
        let tenant = owned(5);
        let alone = transition(
            "self",
            ("t", "hot"),
            None,
            Some(&tenant),
            &GrantChange::Freeze,
        );
        assert_eq!(alone, Ok(Transition::Put(Grant::FrozenAlone { epoch: 5 })));
        let thaw = transition(
            "self",
            ("t", "hot"),
            Some(&Grant::FrozenAlone { epoch: 5 }),
            Some(&tenant),
            &GrantChange::Unfreeze,
        );
        assert_eq!(thaw, Ok(Transition::Remove));
        let moved_tenant = revoked(5, "b", 6);
        assert!(
            transition(
                "self",
                ("t", "hot"),
                None,
                Some(&moved_tenant),
                &GrantChange::Freeze
            )
            .is_err()
        );
        assert!(transition("self", ("t", ""), None, None, &GrantChange::Freeze).is_err());
    }

    #[test]
    fn records_on_disk_read_back_as_the_same_grant() {
        for grant in [
            owned(3),
            Grant::Frozen { epoch: 3 },
            Grant::FrozenAlone { epoch: 3 },
            revoked(3, "b", 4),
            revoked(0, "b", 4),
            Grant::Deleted { epoch: 3 },
        ] {
            assert_eq!(Grant::from(GrantRecord::from(&grant)), grant);
        }
        // A delete recorded before deletes carried an epoch.
        let old = GrantRecord {
            epoch: 3,
            frozen: false,
            moved_to: Some((String::new(), 0)),
            inherited: false,
        };
        assert_eq!(Grant::from(old), Grant::Deleted { epoch: 3 });
    }

    #[test]
    fn writes_need_the_granted_epoch_exactly() {
        let g = grants(&[("t", "", owned(3))]);
        assert!(check_owner(&g, "t", "c", 3).is_ok());
        assert!(check_owner(&g, "t", "c", 2).is_err());
        assert!(check_owner(&g, "t", "c", 4).is_err());
        assert!(check_owner(&g, "other", "c", 3).is_err());
    }

    #[test]
    fn a_conversation_grant_or_revocation_overrides_the_tenant_grant() {
        let g = grants(&[
            ("t", "", owned(3)),
            ("t", "hot", revoked(5, "cell-b", 6)),
            ("t", "own", owned(9)),
        ]);
        let err = check_owner(&g, "t", "hot", 3).unwrap_err();
        let CellError::WrongCell { detail, .. } = err else {
            panic!("expected WrongCell")
        };
        assert_eq!(
            (detail.current_cell_id.as_str(), detail.current_epoch),
            ("cell-b", 6)
        );
        assert!(check_owner(&g, "t", "own", 9).is_ok());
        assert!(check_owner(&g, "t", "other", 3).is_ok());
    }

    #[test]
    fn frozen_keys_refuse_writes_as_retryable() {
        for frozen in [Grant::Frozen { epoch: 1 }, Grant::FrozenAlone { epoch: 1 }] {
            let g = grants(&[("t", "", frozen)]);
            let err = check_owner(&g, "t", "c", 1).unwrap_err();
            assert!(err.retryable());
        }
    }
}
