//! Tier- and region-aware choice of cells for tenants.
//!
//! Placement is a pure function of the replicated state, evaluated while a command is applied, so
//! every replica makes the same choice and the choice can be tested without a cluster. Ties are
//! broken by cell id, so the answer never depends on iteration accidents.

use std::sync::Arc;

use imbl::OrdMap;

use crate::state::model::{CellRecord, CellState, Tier};

/// The cell a tenant of `tier` homed in `region` is placed on: an ACTIVE primary cell (not a
/// standby) of that tier in that region with the most spare capacity, other than `except` (the
/// cell a migrating tenant leaves); `None` when no cell has room.
pub fn choose_primary(
    cells: &OrdMap<Arc<str>, CellRecord>,
    tier: Tier,
    region: &str,
    except: Option<&str>,
) -> Option<Arc<str>> {
    let mut best: Option<(&Arc<str>, u64)> = None;
    for (cell_id, cell) in cells {
        let eligible = Some(cell_id.as_ref()) != except
            && cell.state == CellState::Active
            && cell.tier == tier
            && cell.region.as_ref() == region
            && cell.standby_of.is_none()
            && cell.spare() > 0;
        if !eligible {
            continue;
        }
        // Strictly greater: on a tie the first cell in id order wins.
        if best.is_none_or(|(_, spare)| cell.spare() > spare) {
            best = Some((cell_id, cell.spare()));
        }
    }
    best.map(|(cell_id, _)| cell_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(region: &str, zone: &str, tier: Tier, capacity: u64, load: u64) -> CellRecord {
        CellRecord {
            region: Arc::from(region),
            zone: Arc::from(zone),
            tier,
            endpoint: Arc::from("127.0.0.1:1"),
            state: CellState::Active,
            capacity,
            load,
            standby_of: None,
            registered_revision: 1,
            health: None,
        }
    }

    #[test]
    fn picks_the_cell_with_most_spare_capacity_of_tier_and_region() {
        let mut cells = OrdMap::new();
        cells.insert(Arc::from("hz-a-high-1"), cell("hz", "a", Tier::High, 10, 9));
        cells.insert(Arc::from("hz-b-high-2"), cell("hz", "b", Tier::High, 10, 2));
        cells.insert(Arc::from("hz-a-low-1"), cell("hz", "a", Tier::Low, 100, 0));
        cells.insert(
            Arc::from("sh-a-high-1"),
            cell("sh", "a", Tier::High, 100, 0),
        );
        assert_eq!(
            choose_primary(&cells, Tier::High, "hz", None).as_deref(),
            Some("hz-b-high-2")
        );
        assert_eq!(choose_primary(&cells, Tier::Normal, "hz", None), None);
        assert_eq!(choose_primary(&cells, Tier::High, "bj", None), None);
    }

    #[test]
    fn skips_full_inactive_and_standby_cells_and_breaks_ties_by_id() {
        let mut cells = OrdMap::new();
        cells.insert(Arc::from("a-full"), cell("hz", "a", Tier::Low, 5, 5));
        let mut draining = cell("hz", "a", Tier::Low, 50, 0);
        draining.state = CellState::Draining;
        cells.insert(Arc::from("b-draining"), draining);
        let mut standby = cell("hz", "b", Tier::Low, 50, 0);
        standby.standby_of = Some(Arc::from("a-full"));
        cells.insert(Arc::from("c-standby"), standby);
        cells.insert(Arc::from("e-second"), cell("hz", "a", Tier::Low, 10, 0));
        cells.insert(Arc::from("d-first"), cell("hz", "a", Tier::Low, 10, 0));
        assert_eq!(
            choose_primary(&cells, Tier::Low, "hz", None).as_deref(),
            Some("d-first")
        );
    }

    #[test]
    fn repeated_placement_converges_to_balanced_load() {
        let mut cells = OrdMap::new();
        cells.insert(Arc::from("x"), cell("hz", "a", Tier::Normal, 100, 0));
        cells.insert(Arc::from("y"), cell("hz", "b", Tier::Normal, 100, 40));
        for _ in 0..60 {
            let chosen = choose_primary(&cells, Tier::Normal, "hz", None).expect("room left");
            if let Some(cell) = cells.get_mut(&chosen) {
                cell.load += 1;
            }
        }
        let loads: Vec<u64> = cells.values().map(|c| c.load).collect();
        assert_eq!(loads, vec![50, 50]);
    }
}
