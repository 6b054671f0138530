//! Keeps each primary's protection, as the control plane records it, true to what the primary
//! does — and lets a stalled synchronous primary go on alone only after the control plane has
//! recorded it out of sync.
//!
//! The decision is [`protect`], a pure function of the primary's sync mode and what the
//! control plane has recorded; [`run`] polls the primaries and carries it out, in order: a
//! release follows the record it depends on, or does not happen.

use std::collections::HashMap;
use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell::{CellStatusRequest, ReleaseSyncRequest, SyncMode};
use cellplane_api::proto::control::{GetCellRequest, Protection, RecordProtectionRequest};
use tokio::sync::watch;

use crate::cells::LocalCells;

/// How often the agent looks at its primaries' sync modes: a stalled primary waits at most
/// about this long (and one Raft write) beyond its sync timeout.
const INTERVAL: Duration = Duration::from_millis(50);

/// What to do for one primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Record this protection in the control plane.
    Record(Protection),
    /// Let the primary go on alone after stall `episode`.
    Release { episode: u64 },
}

/// What a primary in `mode` (stall `episode`) needs, given the protection the control plane
/// has recorded for it. A stalled primary is released only after DEGRADED is recorded: the
/// control plane must never believe a standby in sync while the primary answers without it.
/// IN_SYNC is recorded only when the primary waits for standbys that have everything it
/// answered.
pub fn protect(mode: SyncMode, episode: u64, recorded: Option<Protection>) -> Vec<Action> {
    let wanted = match mode {
        SyncMode::Stalled => {
            let release = Action::Release { episode };
            return if recorded == Some(Protection::Degraded) {
                vec![release]
            } else {
                vec![Action::Record(Protection::Degraded), release]
            };
        }
        SyncMode::Unguarded => Protection::None,
        SyncMode::CatchingUp => Protection::CatchingUp,
        SyncMode::Waiting => Protection::InSync,
        SyncMode::Alone => Protection::Degraded,
        SyncMode::Unspecified => return Vec::new(),
    };
    if recorded == Some(wanted) {
        Vec::new()
    } else {
        vec![Action::Record(wanted)]
    }
}

/// Runs until shutdown.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    let mut recorded: HashMap<String, Protection> = HashMap::new();
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A round waits on the control plane (each call retries for a while when it is
        // unreachable); shutdown must not wait for it.
        tokio::select! {
            () = round(&control, &cells, &mut recorded) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Looks at every primary once and carries out what [`protect`] says.
async fn round(
    control: &ControlPlane,
    cells: &LocalCells,
    recorded: &mut HashMap<String, Protection>,
) {
    for (cell_id, cell) in cells.iter() {
        if cell.is_standby() {
            continue;
        }
        let mut admin = cell.admin.clone();
        let Ok(Ok(status)) = tokio::time::timeout(
            INTERVAL * 4,
            admin.cell_status(CellStatusRequest { without_keys: true }),
        )
        .await
        else {
            continue;
        };
        let Some(sync) = status.into_inner().sync else {
            continue;
        };
        let mode = SyncMode::try_from(sync.mode).unwrap_or(SyncMode::Unspecified);
        if !recorded.contains_key(cell_id) {
            let id = cell_id.clone();
            let found = control
                .call(|mut c| {
                    let cell_id = id.clone();
                    async move { c.get_cell(GetCellRequest { cell_id }).await }
                })
                .await;
            let Ok(found) = found else { continue };
            if let Ok(protection) = Protection::try_from(found.protection)
                && protection != Protection::Unspecified
            {
                recorded.insert(cell_id.clone(), protection);
            }
        }
        for action in protect(mode, sync.episode, recorded.get(cell_id).copied()) {
            let done = match action {
                Action::Record(protection) => {
                    let request = RecordProtectionRequest {
                        cell_id: cell_id.clone(),
                        protection: protection as i32,
                    };
                    let written = control
                        .call(|mut c| {
                            let request = request.clone();
                            async move { c.record_protection(request).await }
                        })
                        .await;
                    if written.is_ok() {
                        tracing::info!(%cell_id, protection = protection.as_str_name(), "recorded protection");
                        recorded.insert(cell_id.clone(), protection);
                    }
                    written.map(|_| ())
                }
                Action::Release { episode } => admin
                    .release_sync(ReleaseSyncRequest { episode })
                    .await
                    .map(|_| ()),
            };
            if let Err(status) = done {
                // A release never follows a record that did not happen.
                tracing::warn!(%cell_id, ?action, %status, "protection step failed; trying again");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_released_only_after_degraded_is_recorded() {
        assert_eq!(
            protect(SyncMode::Stalled, 3, Some(Protection::InSync)),
            vec![
                Action::Record(Protection::Degraded),
                Action::Release { episode: 3 }
            ]
        );
        assert_eq!(
            protect(SyncMode::Stalled, 3, None),
            vec![
                Action::Record(Protection::Degraded),
                Action::Release { episode: 3 }
            ]
        );
        assert_eq!(
            protect(SyncMode::Stalled, 4, Some(Protection::Degraded)),
            vec![Action::Release { episode: 4 }]
        );
    }

    #[test]
    fn the_record_follows_the_primary() {
        let cases = [
            (SyncMode::Waiting, Protection::InSync),
            (SyncMode::CatchingUp, Protection::CatchingUp),
            (SyncMode::Alone, Protection::Degraded),
            (SyncMode::Unguarded, Protection::None),
        ];
        for (mode, protection) in cases {
            assert_eq!(protect(mode, 0, None), vec![Action::Record(protection)]);
            assert_eq!(protect(mode, 0, Some(protection)), Vec::new(), "{mode:?}");
        }
        assert_eq!(
            protect(SyncMode::Waiting, 0, Some(Protection::Degraded)),
            vec![Action::Record(Protection::InSync)],
            "caught up again: in sync"
        );
    }
}
