//! Harness for tests that run real cellplane processes: start a cluster of `cellplane serve`
//! processes on free loopback ports, each with its own data directory, SIGKILL and restart them,
//! and reach them over gRPC.
//!
//! Binaries are taken from the cargo target directory beside the test executable (or
//! `CELLPLANE_BIN_DIR`); the test script builds them before running the tests.

pub mod cluster;

use std::path::PathBuf;

/// Path of a workspace binary, e.g. `cellplane`.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("CELLPLANE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // target/<profile>/deps/<test-exe> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins), or set CELLPLANE_BIN_DIR",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}
