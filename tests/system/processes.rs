//! Processes that cannot double up: `cellplane dev` killed outright takes its agents and cells
//! with it, a second run on the same directory comes up whole, and a server started on a data
//! directory another process holds exits at once, naming it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cellplane_api::dir_lock::{DirLock, DirLockError, EXIT_DIR_LOCKED, LOCK_FILE};
use cellplane_tests::agent::AgentProcess;
use cellplane_tests::cluster::Cluster;
use cellplane_tests::system::CELL_ARGS;
use cellplane_tests::{binary, processes_mentioning, start_dev, stop_dev};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::cellctl::ok;

/// The agents' logs of a dev data directory, read whole.
fn agent_logs(data: &Path) -> String {
    ["cn-hangzhou", "cn-beijing"]
        .iter()
        .map(|region| {
            std::fs::read_to_string(data.join("agents").join(format!("{region}.log")))
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn a_dev_system_killed_outright_leaves_nothing_and_its_next_run_comes_up_whole() {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-dev-")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    let endpoints_file = dir.path().join("endpoints.json");
    let log = dir.path().join("dev.log");
    let mut dev = start_dev(&data, &endpoints_file, &log, &[]);
    ok(
        &endpoints_file,
        &[
            "tenant",
            "create",
            "acme",
            "--tier",
            "NORMAL",
            "--region",
            "cn-hangzhou",
        ],
    );
    let needle = data.to_string_lossy().to_string();
    assert!(
        processes_mentioning(&needle) >= 2,
        "agents and cells run from the data directory"
    );

    // kill -9: nothing of the first run survives it for long.
    kill(
        Pid::from_raw(i32::try_from(dev.id()).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("SIGKILL");
    dev.wait().expect("reap dev");
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_mentioning(&needle) > 0 {
        assert!(
            Instant::now() < deadline,
            "agents or cells of the killed run are still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The next run comes up with the first one's tenants, and no cell restarts.
    let before = agent_logs(&data).len();
    let mut dev = start_dev(&data, &endpoints_file, &log, &[]);
    let tenant = ok(&endpoints_file, &["tenant", "show", "acme"]);
    assert_eq!(tenant["tenant_id"], "acme", "{tenant}");
    let cells = ok(&endpoints_file, &["cells"]);
    let cells = cells.as_array().expect("cells");
    assert!(cells.iter().all(|c| c["state"] == "ACTIVE"), "{cells:?}");
    std::thread::sleep(Duration::from_secs(2));
    let second_run = agent_logs(&data)[before..].to_string();
    assert!(
        !second_run.contains("cell exited"),
        "a cell of the second run exited: {second_run}"
    );
    assert!(
        !second_run.contains('\u{1b}'),
        "agent logs carry no terminal colour codes"
    );

    // A second cell on a held data directory exits at once, naming the holder.
    let cell_id = cells[0]["cell_id"].as_str().expect("cell id");
    let region = cells[0]["region"].as_str().expect("region");
    let cell_dir = data.join("agents").join(region).join(cell_id);
    let holder = std::fs::read_to_string(cell_dir.join(LOCK_FILE)).expect("lock file");
    let started = Instant::now();
    let second = Command::new(binary("im-cell"))
        .args(["serve", "--cell-id", cell_id, "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&cell_dir)
        .output()
        .expect("run a second im-cell");
    assert!(started.elapsed() < Duration::from_secs(5), "at once");
    assert_eq!(second.status.code(), Some(EXIT_DIR_LOCKED), "{second:?}");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains(&format!("in use by process {}", holder.trim()))
            && said.contains(&cell_dir.to_string_lossy().to_string()),
        "{said}"
    );
    // The same for a second `cellplane dev` on the directory.
    let other_endpoints = dir.path().join("other.json");
    let second_dev = Command::new(binary("cellplane"))
        .arg("dev")
        .arg("--data-dir")
        .arg(&data)
        .arg("--endpoints-file")
        .arg(&other_endpoints)
        .output()
        .expect("run a second cellplane dev");
    assert_eq!(
        second_dev.status.code(),
        Some(EXIT_DIR_LOCKED),
        "{second_dev:?}"
    );
    assert!(
        String::from_utf8_lossy(&second_dev.stderr)
            .contains(&format!("in use by process {}", dev.id())),
        "{second_dev:?}"
    );
    stop_dev(&mut dev, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_whose_data_directory_another_process_holds_is_not_restarted_in_a_loop() {
    const CELL: &str = "hz-a-normal-1";
    let cluster = Cluster::start(1, &[]).await;
    let agent = AgentProcess::start(
        "hz",
        &cluster.endpoints(),
        &[(CELL, "a", "NORMAL")],
        CELL_ARGS,
    );
    agent.wait_for_cells(Duration::from_secs(30)).await;
    let cell_dir = agent.dir.path().join("data").join(CELL);
    // The cell dies, and before its agent starts it again (100 ms later), another process
    // (this test) takes its data directory.
    agent.kill_cell(CELL);
    let deadline = Instant::now() + Duration::from_secs(2);
    let held = loop {
        match DirLock::acquire(&cell_dir) {
            Ok(lock) => break lock,
            Err(DirLockError::Held { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(err) => panic!("taking the cell's directory: {err}"),
        }
    };
    let log = agent.dir.path().join("agent.log");
    let starts = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("cell started")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("not starting the cell again")
    {
        assert!(
            Instant::now() < deadline,
            "the agent never gave up on the held cell"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let given_up = starts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(starts(), given_up, "no restart once it gave up");
    drop(held);
}

/// A supervisor can die between starting a cell and the cell reading who its parent is; the
/// cell then already belongs to init. Told its supervisor's pid, it still sees it is gone and
/// stops at once, rather than serving for ever with no one to stop it.
#[test]
fn a_cell_whose_supervisor_died_before_it_looked_stops_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A pid that was this cell's supervisor and is gone: a child that has exited.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let supervisor = gone.id();
    gone.wait().expect("true exits");
    let mut cell = Command::new(binary("im-cell"))
        .args(["serve", "--cell-id", "orphan-1", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("orphan-1"))
        .arg("--exit-with-parent")
        .env(cellplane_api::serve::PARENT_PID_ENV, supervisor.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run im-cell");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = cell.try_wait().expect("wait for im-cell") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = cell.kill();
            panic!("the cell still serves 10 s after its supervisor was gone");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut cell.stderr.take().expect("stderr"), &mut said)
        .expect("read stderr");
    assert!(status.success(), "{status}: {said}");
    assert!(said.contains("the supervising process exited"), "{said}");
}
