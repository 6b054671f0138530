//! Between the resources' words and the Control API's.

use cellplane_api::proto::control as pb;
use cellplane_crds::Tier;
use k8s_openapi::jiff::Timestamp;

pub fn tier_to_proto(tier: Tier) -> pb::Tier {
    match tier {
        Tier::High => pb::Tier::High,
        Tier::Normal => pb::Tier::Normal,
        Tier::Low => pb::Tier::Low,
    }
}

pub fn tier_from_proto(tier: i32) -> Option<Tier> {
    match pb::Tier::try_from(tier).ok()? {
        pb::Tier::High => Some(Tier::High),
        pb::Tier::Normal => Some(Tier::Normal),
        pb::Tier::Low => Some(Tier::Low),
        pb::Tier::Unspecified => None,
    }
}

/// An enum value's proto name without its type's prefix: `MIGRATION_PHASE_DONE` → `DONE`.
pub fn name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_string()
}

pub fn migration_phase(phase: i32) -> pb::MigrationPhase {
    pb::MigrationPhase::try_from(phase).unwrap_or(pb::MigrationPhase::Unspecified)
}

pub fn failover_phase(phase: i32) -> pb::FailoverPhase {
    pb::FailoverPhase::try_from(phase).unwrap_or(pb::FailoverPhase::Unspecified)
}

/// A time the control plane gives in milliseconds since the epoch, as RFC 3339; none for 0.
pub fn rfc3339(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    Timestamp::from_millisecond(i64::try_from(ms).ok()?)
        .ok()
        .map(|t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_and_names_convert_both_ways() {
        for tier in [Tier::High, Tier::Normal, Tier::Low] {
            assert_eq!(tier_from_proto(tier_to_proto(tier) as i32), Some(tier));
        }
        assert_eq!(tier_from_proto(0), None);
        assert_eq!(tier_from_proto(99), None);
        assert_eq!(name("MIGRATION_PHASE_DONE", "MIGRATION_PHASE_"), "DONE");
        assert_eq!(rfc3339(0), None);
        assert_eq!(rfc3339(1_500).as_deref(), Some("1970-01-01T00:00:01.5Z"));
    }
}
