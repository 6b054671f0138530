//! The wall clock, as every component records times: milliseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by this machine's clock (a simulation's, on its thread);
/// 0 for a clock set before it.
pub fn now_ms() -> u64 {
    if let Some(simulated) = crate::simulation::wall_clock() {
        return simulated();
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
