//! `cellctl` against a running `cellplane dev`: the whole system as ops meet it. JSON output
//! is parsed, exit codes are checked, and the dev system stops cleanly on SIGTERM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cellplane_tests::{binary, signal_cell, start_dev, stop_dev};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Runs `cellctl -o json ARGS` against the dev system; answers the exit code and the JSON.
pub fn cellctl(endpoints_file: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new(binary("cellctl"))
        .arg("--endpoints-file")
        .arg(endpoints_file)
        .args(["--output", "json"])
        .args(args)
        .output()
        .expect("run cellctl");
    let code = out.status.code().expect("cellctl exited");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "cellctl {args:?} printed no JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, json)
}

pub fn ok(endpoints_file: &Path, args: &[&str]) -> Value {
    let (code, json) = cellctl(endpoints_file, args);
    assert_eq!(code, 0, "cellctl {args:?}: {json}");
    json
}

/// The row of a JSON list whose `field` is `id`.
fn row<'a>(list: &'a Value, field: &str, id: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .find(|r| r[field] == id)
        .unwrap_or_else(|| panic!("{id} listed: {list}"))
}

#[test]
fn cellctl_drives_a_running_dev_system() {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-dev-")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    let endpoints_file = dir.path().join("endpoints.json");
    let mut dev = start_dev(&data, &endpoints_file, &dir.path().join("dev.log"), &[]);
    let endpoints: Value =
        serde_json::from_str(&std::fs::read_to_string(&endpoints_file).expect("read endpoints"))
            .expect("endpoints JSON");
    let cells = endpoints["cells"].as_array().expect("cells");
    for tier in ["HIGH", "NORMAL", "LOW"] {
        for region in ["cn-hangzhou", "cn-beijing"] {
            assert!(
                cells
                    .iter()
                    .any(|c| c["tier"] == tier && c["region"] == region),
                "a {tier} cell in {region}"
            );
        }
    }
    assert_eq!(endpoints["control_plane"].as_array().map(Vec::len), Some(3));

    let status = ok(&endpoints_file, &["status"]);
    let roles: Vec<&str> = status
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["role"].as_str())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "Leader").count(),
        1,
        "{status}"
    );

    let members = ok(&endpoints_file, &["node", "list"]);
    let members = members.as_array().expect("members");
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| m["voter"] == true), "{members:?}");
    let (code, refused) = cellctl(&endpoints_file, &["node", "remove", "9"]);
    assert_eq!(code, 3, "no node 9: {refused}");

    let listed = ok(&endpoints_file, &["cells"]);
    let listed = listed.as_array().expect("cells");
    assert_eq!(listed.len(), cells.len());
    assert!(listed.iter().all(|c| c["state"] == "ACTIVE"), "{listed:?}");
    // Every NORMAL and HIGH primary waits for its in-region standby and says so; LOW cells
    // have no standby and no protection beyond their one copy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = ok(&endpoints_file, &["cells"]);
        let listed = listed.as_array().expect("cells");
        let primaries = listed.iter().filter(|c| c["standby_of"].is_null());
        let (protected, unprotected): (Vec<&Value>, Vec<&Value>) =
            primaries.partition(|c| c["tier"] != "LOW");
        let in_sync = protected.iter().all(|c| {
            c["protection"] == "IN_SYNC" && !c["standbys"].as_array().expect("standbys").is_empty()
        });
        let none = unprotected.iter().all(|c| c["protection"] == "NONE");
        // Heartbeats carry replication: each primary's standbys' lag, each standby's position.
        let reported = listed.iter().all(|c| {
            if c["standby_of"].is_null() {
                c["tier"] == "LOW" || c["standby_lag_lsns"].is_u64()
            } else {
                c["replica_applied_lsn"].is_u64()
            }
        });
        if in_sync && none && reported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "protection never settled: {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let tenant = ok(
        &endpoints_file,
        &[
            "tenant",
            "create",
            "umbrella",
            "--tier",
            "NORMAL",
            "--region",
            "cn-hangzhou",
        ],
    );
    let first_cell = tenant["primary_cell"].as_str().expect("cell").to_string();
    let shown = ok(&endpoints_file, &["tenant", "show", "umbrella"]);
    assert_eq!(
        shown["standby_cells"].as_array().map(Vec::len),
        Some(1),
        "a NORMAL tenant's primary has its in-region standby: {shown}"
    );
    assert_eq!(shown["guarantee_holds"], true, "{shown}");
    let route = ok(&endpoints_file, &["route", "umbrella"]);
    assert_eq!(
        (route["cell_id"].as_str(), route["epoch"].as_u64()),
        (Some(first_cell.as_str()), Some(1))
    );

    let moved = ok(&endpoints_file, &["migrate", "umbrella", "--wait"]);
    assert_eq!(moved["phase"], "DONE", "{moved}");
    assert_ne!(moved["target_cell"].as_str(), Some(first_cell.as_str()));
    let route = ok(&endpoints_file, &["route", "umbrella", "some-group"]);
    assert_eq!(route["cell_id"], moved["target_cell"]);
    assert_eq!(route["epoch"], 2);

    let all = ok(&endpoints_file, &["migrations", "--all"]);
    assert!(
        all.as_array()
            .expect("migrations")
            .iter()
            .any(|m| m["migration_id"] == moved["migration_id"])
    );
    let active = ok(&endpoints_file, &["migrations"]);
    assert_eq!(active.as_array().map(Vec::len), Some(0), "{active}");

    let tiered = ok(
        &endpoints_file,
        &["tenant", "set-tier", "umbrella", "HIGH", "--wait"],
    );
    assert_eq!(tiered["phase"], "DONE", "{tiered}");
    let tenants = ok(&endpoints_file, &["tenants"]);
    let umbrella = row(&tenants, "tenant_id", "umbrella");
    assert_eq!(umbrella["tier"], "HIGH");
    assert_eq!(umbrella["primary_cell"], tiered["target_cell"]);

    // A planned failover of a NORMAL primary to its standby, followed to its end.
    let none = ok(&endpoints_file, &["failovers"]);
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let planned = ok(
        &endpoints_file,
        &[
            "failover",
            "bj-b-normal-1",
            "--mode",
            "planned",
            "--reason",
            "kernel upgrade",
            "--wait",
        ],
    );
    // The old primary answers all along, so its agent merges it back (it held nothing the
    // standby lacked) and it rejoins: DONE moves on to MERGED, often before the wait's next
    // look, and either ends the wait.
    assert!(
        ["DONE", "MERGED"].contains(&planned["phase"].as_str().unwrap_or_default()),
        "{planned}"
    );
    assert_eq!(planned["mode"], "PLANNED");
    assert_eq!(planned["standby_cell"], "bj-c-normal-s1");
    assert_eq!(planned["lsns_behind"], 0, "{planned}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = ok(&endpoints_file, &["failovers"]);
        assert_eq!(listed[0]["failover_id"], planned["failover_id"], "{listed}");
        if listed[0]["phase"] == "MERGED" {
            assert_eq!(listed[0]["missing_messages"], 0, "{listed}");
            break;
        }
        assert!(Instant::now() < deadline, "never merged back: {listed}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A planned failover whose standby cannot catch up is given up after its timeout (10 s);
    // the wait says so with its own exit code, so a script does not go on to take down a cell
    // that kept its keys.
    signal_cell(&data, "hz-c-normal-s1", Signal::SIGSTOP);
    let (code, given_up) = cellctl(
        &endpoints_file,
        &[
            "failover",
            "hz-a-normal-1",
            "--mode",
            "planned",
            "--reason",
            "kernel upgrade",
            "--wait",
        ],
    );
    signal_cell(&data, "hz-c-normal-s1", Signal::SIGCONT);
    assert_eq!(code, 7, "{given_up}");
    assert_eq!(given_up["phase"], "ROLLED_BACK", "{given_up}");
    let listed = ok(&endpoints_file, &["cells"]);
    let kept = row(&listed, "cell_id", "hz-a-normal-1");
    assert!(
        kept["state"] == "ACTIVE" && kept["standby_of"].is_null(),
        "{kept}"
    );
    let (code, _) = cellctl(&endpoints_file, &["failover", "nope"]);
    assert_eq!(code, 3, "an unknown cell");
    let (code, json) = cellctl(&endpoints_file, &["drain", "bj-c-low-1"]);
    assert_eq!(code, 4, "the last LOW cell of its region: {json}");

    // Exit codes scripts can trust, with the error in JSON.
    let (code, json) = cellctl(&endpoints_file, &["route", "nobody"]);
    assert_eq!(code, 3, "not found: {json}");
    assert_eq!(json["error"]["code"], "NotFound");
    let (code, json) = cellctl(
        &endpoints_file,
        &["migrate", "umbrella", "--to", "bj-c-low-1"],
    );
    assert_eq!(code, 4, "refused: {json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("target_cell")),
        "{json}"
    );
    let (code, _) = cellctl(&endpoints_file, &["cancel", "mig-999999"]);
    assert_eq!(code, 3);
    let (code, json) = cellctl(&endpoints_file, &["cancel", "fo-999999", "--reason", "x"]);
    assert_eq!(code, 3, "no such failover: {json}");
    let (code, _) = cellctl(
        &endpoints_file,
        &["cancel", moved["migration_id"].as_str().expect("id")],
    );
    assert_eq!(code, 4, "a finished migration cannot be cancelled");
    let usage = Command::new(binary("cellctl"))
        .args(["migrate"])
        .output()
        .expect("run cellctl");
    assert_eq!(usage.status.code(), Some(2), "bad usage");

    // SIGTERM stops the whole system: control plane, agents and cells.
    stop_dev(&mut dev, &data);
}
