//! The roles each method of a control-plane node needs (`cellplane_api::auth`). Anything not
//! listed as a read or an agent's report needs an admin, so a method added later is closed
//! until someone decides otherwise.

use cellplane_api::auth::{Needs, Role};

const READ: Needs = &[Role::Reader, Role::Admin, Role::Agent];
const AGENT: Needs = &[Role::Agent, Role::Admin];
const ADMIN: Needs = &[Role::Admin];
const PEER: Needs = &[Role::Node];

const CONTROL: &str = "cellplane.control.v1.Control";

pub fn rules(method: &str) -> Option<Needs> {
    let (service, name) = method.trim_start_matches('/').split_once('/')?;
    match service {
        "cellplane.routing.v1.Routing" => Some(READ),
        "cellplane.raft.v1.RaftTransport" => Some(PEER),
        CONTROL => Some(match name {
            "GetCell" | "ListCells" | "GetTenant" | "ListTenants" | "ClusterStatus"
            | "GetMigration" | "ListMigrations" | "WatchMigration" | "GetDrain" | "GetFailover"
            | "ListFailovers" => READ,
            "RegisterCell" | "SetCellState" | "RecordProtection" | "ReportMigration"
            | "Heartbeat" | "RenewLeases" | "RejoinCell" | "ReportFailover" => AGENT,
            "RecordAudit" => PEER,
            _ => ADMIN,
        }),
        // Health and reflection: any certificate of the CA.
        _ => None,
    }
}

/// Whether calls of `method` go into the audit log: every call of a method only an admin may
/// make, whoever made it, except reading the log itself.
pub fn audited(method: &str) -> bool {
    let Some((service, name)) = method.trim_start_matches('/').split_once('/') else {
        return false;
    };
    service == CONTROL && name != "ListAudit" && rules(method) == Some(ADMIN)
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
        assert_eq!(
            needs("/cellplane.control.v1.Control/RecordAudit"),
            Some(PEER.to_vec())
        );
    }

    #[test]
    fn admin_calls_are_audited_and_reads_reports_and_the_log_itself_are_not() {
        for method in [
            "CreateTenant",
            "FailoverCell",
            "MoveRoute",
            "AddNode",
            "Unknown",
        ] {
            assert!(audited(&format!("/{CONTROL}/{method}")), "{method}");
        }
        for method in ["GetTenant", "Heartbeat", "ListAudit", "RecordAudit"] {
            assert!(!audited(&format!("/{CONTROL}/{method}")), "{method}");
        }
        assert!(!audited("/cellplane.routing.v1.Routing/Lookup"));
        assert!(!audited("/grpc.health.v1.Health/Check"));
    }
}
