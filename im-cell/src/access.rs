//! The roles each method of an IM cell needs (`cellplane_api::auth`): IM front ends (readers)
//! and ops write and sync through Messaging and Sync; only agents — and through them the
//! control plane's decisions — reach CellAdmin, and only cells following as standbys (which
//! hold their agent's identity) reach Replication.

use cellplane_api::auth::{Needs, Role};

const FRONT_END: Needs = &[Role::Reader, Role::Admin];
const AGENT: Needs = &[Role::Agent];

pub fn rules(method: &str) -> Option<Needs> {
    let (service, _) = method.trim_start_matches('/').split_once('/')?;
    match service {
        "cellplane.cell.v1.Messaging" | "cellplane.cell.v1.Sync" => Some(FRONT_END),
        "cellplane.cell.v1.CellAdmin" | "cellplane.cell.v1.Replication" => Some(AGENT),
        // Health and reflection: any certificate of the CA.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_ends_write_and_only_agents_administer() {
        assert_eq!(
            rules("/cellplane.cell.v1.Messaging/SendMessage"),
            Some(FRONT_END)
        );
        assert_eq!(rules("/cellplane.cell.v1.CellAdmin/Grant"), Some(AGENT));
        assert_eq!(rules("/cellplane.cell.v1.Replication/Follow"), Some(AGENT));
        assert_eq!(rules("/grpc.reflection.v1.ServerReflection/Info"), None);
    }
}
