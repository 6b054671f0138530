//! Applying `Audit`: entries appended under the revision that records them, the oldest
//! dropped beyond the size the command carries (every replica applies the same bound).

use super::ControlState;
use super::command::{CommandError, CommandOutput, CommandResult};
use crate::audit::entry::AuditEntry;

impl ControlState {
    pub(super) fn record_audit(
        &mut self,
        entries: &[AuditEntry],
        keep: u32,
        revision: u64,
    ) -> CommandResult {
        if keep == 0 {
            return Err(CommandError::Invalid {
                field: "keep".into(),
                rule: "must be at least 1".into(),
            });
        }
        if entries.is_empty() {
            return Err(CommandError::Invalid {
                field: "entries".into(),
                rule: "must hold at least one entry".into(),
            });
        }
        for (index, entry) in (0u32..).zip(entries) {
            self.audit.insert((revision, index), entry.clone());
        }
        while self.audit.len() > keep as usize {
            let (_, rest) = self.audit.without_min();
            self.audit = rest;
        }
        Ok(CommandOutput::Done { revision })
    }
}
