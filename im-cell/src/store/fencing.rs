//! Fencing: a cell writes a route key only at the epoch the control plane granted it, and not
//! while the key is frozen or after it was revoked. The check runs in the writer, in order with
//! grant changes, so a freeze's LSN bounds every write it let through.

use std::collections::HashMap;

use cellplane_api::proto::cell::WrongCell;

use super::records::GrantRecord;
use crate::error::CellError;

/// How long a writer refused for a frozen key should wait before retrying: a migration holds
/// a key frozen for a few tens of milliseconds (docs/benchmarks.md), so a writer retries a
/// couple of times rather than waiting out a long fixed pause.
pub const FROZEN_RETRY_AFTER_MS: u64 = 20;

/// Grants by `(tenant, conversation)`; an empty conversation is the whole tenant.
pub type Grants = HashMap<(String, String), GrantRecord>;

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

/// Checks that this cell may write `(tenant, conversation)` at `epoch` now.
pub fn check_owner(
    grants: &Grants,
    tenant: &str,
    conversation: &str,
    epoch: u64,
) -> Result<(), CellError> {
    let conversation_grant = grants.get(&(tenant.to_string(), conversation.to_string()));
    let grant = conversation_grant.or_else(|| grants.get(&(tenant.to_string(), String::new())));
    let detail = |grant: Option<&GrantRecord>| WrongCell {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        cell_epoch: grant.map(|g| g.epoch).unwrap_or(0),
        current_cell_id: grant
            .and_then(|g| g.moved_to.as_ref().map(|(c, _)| c.clone()))
            .unwrap_or_default(),
        current_epoch: grant
            .and_then(|g| g.moved_to.as_ref().map(|(_, e)| *e))
            .unwrap_or(0),
        frozen: false,
        retry_after_ms: 0,
    };
    let Some(record) = grant else {
        return Err(wrong_cell(
            format!("route_epoch: this cell does not own {tenant}/{conversation}"),
            detail(None),
        ));
    };
    if let Some((cell, _)) = &record.moved_to
        && cell.is_empty()
    {
        return Err(wrong_cell(
            format!(
                "route_epoch: {tenant}/{conversation} no longer exists (its tenant was deleted)"
            ),
            detail(Some(record)),
        ));
    }
    if let Some((cell, new_epoch)) = &record.moved_to {
        return Err(wrong_cell(
            format!(
                "route_epoch: {tenant}/{conversation} moved to cell {cell:?} at epoch {new_epoch}"
            ),
            detail(Some(record)),
        ));
    }
    if epoch != record.epoch {
        let rule = if epoch < record.epoch {
            "is stale"
        } else {
            "is newer than this cell's grant"
        };
        return Err(wrong_cell(
            format!(
                "route_epoch: {epoch} {rule} (the cell holds {tenant}/{conversation} at epoch {}); refresh the route",
                record.epoch
            ),
            detail(Some(record)),
        ));
    }
    if record.frozen {
        let mut frozen = detail(Some(record));
        frozen.frozen = true;
        frozen.retry_after_ms = FROZEN_RETRY_AFTER_MS;
        return Err(wrong_cell(
            format!(
                "{tenant}/{conversation} is frozen for a move; retry after {FROZEN_RETRY_AFTER_MS} ms"
            ),
            frozen,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(entries: &[(&str, &str, GrantRecord)]) -> Grants {
        entries
            .iter()
            .map(|(t, c, g)| ((t.to_string(), c.to_string()), g.clone()))
            .collect()
    }

    fn grant(epoch: u64) -> GrantRecord {
        GrantRecord {
            epoch,
            frozen: false,
            moved_to: None,
            inherited: false,
        }
    }

    #[test]
    fn writes_need_the_granted_epoch_exactly() {
        let g = grants(&[("t", "", grant(3))]);
        assert!(check_owner(&g, "t", "c", 3).is_ok());
        assert!(check_owner(&g, "t", "c", 2).is_err());
        assert!(check_owner(&g, "t", "c", 4).is_err());
        assert!(check_owner(&g, "other", "c", 3).is_err());
    }

    #[test]
    fn a_conversation_grant_or_revocation_overrides_the_tenant_grant() {
        let moved = GrantRecord {
            epoch: 5,
            frozen: false,
            moved_to: Some(("cell-b".into(), 6)),
            inherited: false,
        };
        let g = grants(&[
            ("t", "", grant(3)),
            ("t", "hot", moved),
            ("t", "own", grant(9)),
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
        let g = grants(&[(
            "t",
            "",
            GrantRecord {
                epoch: 1,
                frozen: true,
                moved_to: None,
                inherited: false,
            },
        )]);
        let err = check_owner(&g, "t", "c", 1).unwrap_err();
        assert!(err.retryable());
    }
}
