//! An agent acts only for its own region's cells. The authorization layer lets an agent's
//! calls through by role; these pure checks then compare the cells a call names with the
//! region the agent's identity acts for (`[auth] regions`), before anything is proposed.

use std::sync::Arc;

use cellplane_api::auth::Caller;
use tonic::{Request, Status};

use crate::state::ControlState;
use crate::state::command::Command;

/// The region the caller of `request` is confined to, if it is an agent that is.
pub fn confined<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .and_then(|caller| caller.confined_to().map(str::to_string))
}

/// Whether an agent of `region` may send `command`.
pub fn check_command(region: &str, command: &Command, state: &ControlState) -> Result<(), Status> {
    let cells: Vec<&Arc<str>> = match command {
        Command::RegisterCell {
            cell_id,
            region: of,
            ..
        } => {
            return if **of == *region {
                Ok(())
            } else {
                Err(denied(region, cell_id, of))
            };
        }
        Command::SetCellState { cell_id, .. }
        | Command::Heartbeat { cell_id, .. }
        | Command::Report { cell_id, .. }
        | Command::RecordProtection { cell_id, .. }
        | Command::Rejoin { cell_id } => vec![cell_id],
        Command::RenewLeases { cells, .. } => cells.iter().collect(),
        // What the layer lets an agent send is listed above; anything else names no cell of
        // a region and is an admin's.
        _ => Vec::new(),
    };
    check_cells(region, cells, state)
}

/// Whether an agent of `region` may report on migration `id`: its target or source is one of
/// the region's cells.
pub fn check_migration(region: &str, id: u64, state: &ControlState) -> Result<(), Status> {
    match state.migrations().get(&id) {
        Some(m) => check_any(region, [&m.source, &m.target], state),
        None => Ok(()),
    }
}

/// Whether an agent of `region` may report on failover `id`: its failed cell or the one
/// taking over is one of the region's cells.
pub fn check_failover(region: &str, id: u64, state: &ControlState) -> Result<(), Status> {
    match state.failovers().get(&id) {
        Some(f) => check_any(region, [&f.cell_id, &f.standby_cell], state),
        None => Ok(()),
    }
}

fn region_of<'a>(state: &'a ControlState, cell_id: &str) -> Option<&'a Arc<str>> {
    state.cells().get(cell_id).map(|c| &c.region)
}

/// Every named cell that exists is in `region` (an unknown one is the command's to refuse).
fn check_cells<'a>(
    region: &str,
    cells: impl IntoIterator<Item = &'a Arc<str>>,
    state: &ControlState,
) -> Result<(), Status> {
    for cell_id in cells {
        if let Some(of) = region_of(state, cell_id)
            && **of != *region
        {
            return Err(denied(region, cell_id, of));
        }
    }
    Ok(())
}

fn check_any<'a>(
    region: &str,
    cells: impl IntoIterator<Item = &'a Arc<str>>,
    state: &ControlState,
) -> Result<(), Status> {
    let mut first = None;
    for cell_id in cells {
        match region_of(state, cell_id) {
            Some(of) if **of == *region => return Ok(()),
            Some(of) => {
                first.get_or_insert((cell_id, of));
            }
            None => {}
        }
    }
    match first {
        Some((cell_id, of)) => Err(denied(region, cell_id, of)),
        None => Ok(()),
    }
}

fn denied(region: &str, cell_id: &str, of: &str) -> Status {
    Status::permission_denied(format!(
        "cell_id: cell {cell_id:?} is in region {of:?}; this agent acts for {region:?} only"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::{CellHealth, CellState, Tier};

    fn state() -> ControlState {
        let mut state = ControlState::default();
        for (cell, region) in [("hz-1", "hz"), ("bj-1", "bj")] {
            let (applied, _) = state.apply(&Command::RegisterCell {
                cell_id: cell.into(),
                region: region.into(),
                zone: "a".into(),
                tier: Tier::Normal,
                endpoint: format!("{cell}:1").into(),
                capacity: 10,
                standby_of: None,
            });
            applied.expect("register");
        }
        state
    }

    #[test]
    fn an_agent_names_only_its_own_regions_cells() {
        let state = state();
        let heartbeat = |cell: &str| Command::Heartbeat {
            cell_id: cell.into(),
            health: CellHealth::default(),
        };
        assert!(check_command("hz", &heartbeat("hz-1"), &state).is_ok());
        let denied = check_command("hz", &heartbeat("bj-1"), &state).expect_err("bj");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("\"bj\""), "{denied:?}");
        let renew = Command::RenewLeases {
            cells: vec!["hz-1".into(), "bj-1".into()],
            lease_ms: 1,
        };
        assert!(
            check_command("hz", &renew, &state).is_err(),
            "one foreign cell is enough"
        );
        let register = Command::RegisterCell {
            cell_id: "bj-2".into(),
            region: "bj".into(),
            zone: "a".into(),
            tier: Tier::Normal,
            endpoint: "bj-2:1".into(),
            capacity: 10,
            standby_of: None,
        };
        assert!(check_command("hz", &register, &state).is_err());
        assert!(check_command("bj", &register, &state).is_ok());
        let activate = Command::SetCellState {
            cell_id: "unknown".into(),
            state: CellState::Active,
        };
        assert!(
            check_command("hz", &activate, &state).is_ok(),
            "the command itself refuses an unknown cell"
        );
    }
}
