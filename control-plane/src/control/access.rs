//! The roles each method of a control-plane node needs (`cellplane_api::auth`). Anything not
//! listed as a read or an agent's report needs an admin, so a method added later is closed
//! until someone decides otherwise.

use cellplane_api::auth::{Needs, Role};

const READ: Needs = &[Role::Reader, Role::Admin, Role::Agent];
const AGENT: Needs = &[Role::Agent, Role::Admin];
const ADMIN: Needs = &[Role::Admin];
const PEER: Needs = &[Role::Node];

pub fn rules(method: &str) -> Option<Needs> {
    let (service, name) = method.trim_start_matches('/').split_once('/')?;
    match service {
        "cellplane.routing.v1.Routing" => Some(READ),
        "cellplane.raft.v1.RaftTransport" => Some(PEER),
        "cellplane.control.v1.Control" => Some(match name {
            "GetCell" | "ListCells" | "GetTenant" | "ListTenants" | "ClusterStatus"
            | "GetMigration" | "ListMigrations" | "WatchMigration" | "GetDrain" | "GetFailover"
            | "ListFailovers" => READ,
            "RegisterCell" | "SetCellState" | "RecordProtection" | "ReportMigration"
            | "Heartbeat" | "RenewLeases" | "RejoinCell" | "ReportFailover" => AGENT,
            _ => ADMIN,
        }),
        // Health and reflection: any certificate of the CA.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_reports_and_ops_need_their_roles_and_new_methods_need_an_admin() {
        let needs = |m: &str| rules(m).map(|n| n.to_vec());
        assert_eq!(
            needs("/cellplane.routing.v1.Routing/Lookup"),
            Some(READ.to_vec())
        );
        assert_eq!(
            needs("/cellplane.control.v1.Control/Heartbeat"),
            Some(AGENT.to_vec())
        );
        assert_eq!(
            needs("/cellplane.control.v1.Control/FailoverCell"),
            Some(ADMIN.to_vec())
        );
        assert_eq!(
            needs("/cellplane.control.v1.Control/SomethingNew"),
            Some(ADMIN.to_vec())
        );
        assert_eq!(
            needs("/cellplane.raft.v1.RaftTransport/Append"),
            Some(PEER.to_vec())
        );
        assert_eq!(needs("/grpc.health.v1.Health/Check"), None);
    }
}
