//! The audit log's text of a request: any body of any admin method gives some text within its
//! bound.

#![no_main]

use cellplane_control_plane::audit::layer::describe;
use cellplane_control_plane::limits::MAX_AUDIT_REQUEST_TEXT;
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 18] = [
    "CreateTenant",
    "DeleteTenant",
    "MoveRoute",
    "Compact",
    "AddNode",
    "RemoveNode",
    "MigrateTenant",
    "MigrateConversation",
    "SetTenantTier",
    "CancelMigration",
    "FailoverCell",
    "FailoverRegion",
    "DrainCell",
    "RemoveCell",
    "ResumeAutomaticFailover",
    "SetCellState",
    "RegisterCell",
    "SomethingNew",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(which) % METHODS.len()];
    let text = describe(&format!("/cellplane.control.v1.Control/{method}"), body);
    assert!(text.len() <= MAX_AUDIT_REQUEST_TEXT, "{} bytes", text.len());
});
