//! Harness for tests that run real cellplane processes: start a cluster of `cellplane serve`
//! processes on free loopback ports, each with its own data directory, SIGKILL and restart them,
//! and reach them over gRPC.
//!
//! Binaries are taken from the cargo target directory beside the test executable (or
//! `CELLPLANE_BIN_DIR`); the test script builds them before running the tests.

pub mod agent;
pub mod apiserver;
pub mod cell;
pub mod cluster;
pub mod etcd;
pub mod helm;
pub mod history;
pub mod measure;
pub mod operator;
pub mod proxy;
pub mod rbac;
pub mod system;
pub mod traffic;

use std::path::PathBuf;

/// Path of a workspace binary, e.g. `cellplane`.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("CELLPLANE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // Beside a binary: target/<profile>/<name>; beside a test: target/<profile>/deps/<test>.
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable directory");
    let path = if dir.join(name).exists() {
        dir.join(name)
    } else {
        dir.parent().unwrap_or(dir).join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins), or set CELLPLANE_BIN_DIR",
        path.display()
    );
    path
}

/// Starts `cellplane dev` on `data` with `args` (logging to `log`) and waits until it wrote
/// `endpoints_file`, which is removed first: the system is up.
pub fn start_dev(
    data: &std::path::Path,
    endpoints_file: &std::path::Path,
    log: &std::path::Path,
    args: &[&str],
) -> std::process::Child {
    let _ = std::fs::remove_file(endpoints_file);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("dev log");
    let mut dev = std::process::Command::new(binary("cellplane"))
        .arg("dev")
        .arg("--data-dir")
        .arg(data)
        .arg("--endpoints-file")
        .arg(endpoints_file)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start cellplane dev");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !endpoints_file.exists() {
        if let Some(status) = dev.try_wait().expect("dev status") {
            panic!(
                "cellplane dev exited with {status}; it said:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cellplane dev did not come up; log in {}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    dev
}

/// Every process's pid and command line (its arguments joined by NULs).
fn command_lines() -> impl Iterator<Item = (i32, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).into_owned()))
        })
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> usize {
    command_lines()
        .filter(|(_, cmdline)| cmdline.contains(needle))
        .count()
}

/// Sends `signal` to the one process serving cell `cell_id` with its data under `data`
/// (SIGSTOP: a stalled cell).
pub fn signal_cell(data: &std::path::Path, cell_id: &str, signal: nix::sys::signal::Signal) {
    let needle = format!("--cell-id\0{cell_id}\0");
    let data = data.to_string_lossy();
    let pids: Vec<i32> = command_lines()
        .filter(|(_, cmdline)| cmdline.contains(&needle) && cmdline.contains(data.as_ref()))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(pids.len(), 1, "expected one process of cell {cell_id}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), signal).expect("signal");
}

/// SIGTERMs a `cellplane dev` process and checks it stops cleanly within 30 s, leaving no
/// agent or cell of its data directory `data` running.
pub fn stop_dev(dev: &mut std::process::Child, data: &std::path::Path) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(dev.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.try_wait().expect("dev status") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cellplane dev did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "cellplane dev exited with {status}");
    let data = data.to_string_lossy();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while processes_mentioning(&data) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "an agent or cell outlived cellplane dev"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits up to `limit` for the process in `child` to exit by itself; answers how it exited,
/// and forgets it.
pub async fn wait_exit(
    child: &mut Option<tokio::process::Child>,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let status = tokio::time::timeout(limit, child.as_mut()?.wait())
        .await
        .ok()?;
    *child = None;
    Some(status.expect("wait for the process"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up here): a port the kernel hands out for
    // `:0` is also what it hands the next outgoing connection, which could take it before the
    // process this port is for binds it.
    loop {
        let port = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Retries `call` every 20 ms until it succeeds, failing the test after `limit` with what it
/// last answered.
pub async fn until_ok<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    limit: std::time::Duration,
    mut call: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match call().await {
            Ok(value) => return value,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "{what}: {error:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}
