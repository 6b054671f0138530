//! The tools people reach for first: grpcurl 1.8.6, which asks only for gRPC reflection
//! v1alpha, lists, describes and calls a control-plane node and an IM cell.
//!
//! The binary is `$GRPCURL_BIN`, else the one the test script installs under target/tools,
//! else `grpcurl` on the PATH.

use std::path::Path;
use std::process::Command;

use cellplane_api::proto::control::Tier;

use super::System;

const CELL: &str = "hz-a-normal-1";

/// Runs `grpcurl -plaintext FLAGS addr ARGS`; answers its output, failing the test with what
/// it said when it fails.
fn grpcurl(addr: &str, flags: &[&str], args: &[&str]) -> String {
    let installed = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tools/grpcurl");
    let binary = std::env::var("GRPCURL_BIN").unwrap_or_else(|_| {
        if Path::new(installed).exists() {
            installed.into()
        } else {
            "grpcurl".into()
        }
    });
    let addr = addr.trim_start_matches("http://");
    let output = Command::new(&binary)
        .arg("-plaintext")
        .args(flags)
        .arg(addr)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {binary} (./scripts/ensure-tools.sh grpcurl, or set GRPCURL_BIN): {e}")
        });
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "grpcurl {args:?} against {addr}: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_a_node_and_a_cell() {
    let system = System::start(&[("hz", &[(CELL, "a", "NORMAL")][..])]).await;
    assert_eq!(system.create_tenant("acme", Tier::Normal, "hz").await, CELL);
    system.cluster.wait_for_leader().await;
    let node = system.cluster.endpoints()[0].clone();

    let services = grpcurl(&node, &[], &["list"]);
    for service in [
        "cellplane.routing.v1.Routing",
        "cellplane.control.v1.Control",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(service), "{service} in {services}");
    }
    let routing = grpcurl(&node, &[], &["describe", "cellplane.routing.v1.Routing"]);
    assert!(routing.contains("rpc Lookup"), "{routing}");
    let lookup = grpcurl(
        &node,
        &["-d", r#"{"tenant_id": "acme"}"#],
        &["cellplane.routing.v1.Routing/Lookup"],
    );
    assert!(lookup.contains(CELL), "{lookup}");

    let cell = system.agent("hz").cell(CELL).addr.clone();
    let services = grpcurl(&cell, &[], &["list"]);
    for service in [
        "cellplane.cell.v1.Messaging",
        "cellplane.cell.v1.Sync",
        "cellplane.cell.v1.CellAdmin",
    ] {
        assert!(services.contains(service), "{service} in {services}");
    }
    let messaging = grpcurl(&cell, &[], &["describe", "cellplane.cell.v1.Messaging"]);
    assert!(messaging.contains("rpc SendMessage"), "{messaging}");
    let status = grpcurl(
        &cell,
        &["-d", r#"{"without_keys": true}"#],
        &["cellplane.cell.v1.CellAdmin/CellStatus"],
    );
    assert!(status.contains(CELL), "{status}");
}
