//! Which seeds a run covers, each in a process of its own so that it replays exactly:
//! `SIM_SEED` runs one here, `SIM_SEEDS=n` draws n at random, and otherwise the fixed set CI
//! runs.

use std::process::Command;

/// The seeds to run: the fixed ones unless the environment names others.
fn seeds(fixed: &[u64]) -> Vec<u64> {
    if let Some(n) = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()) {
        return (0..n).map(|_| rand::random::<u32>().into()).collect();
    }
    fixed.to_vec()
}

/// Runs `run` on `SIM_SEED` when set; otherwise runs the test `test` (this one) again in a
/// fresh process for each seed, and fails naming the seeds that failed.
pub fn for_each(test: &str, fixed: &[u64], run: impl FnOnce(u64)) {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)));
        if let Err(panic) = ran {
            eprintln!("simulation failed; replay with SIM_SEED={seed}");
            std::panic::resume_unwind(panic);
        }
        return;
    }
    let mut failed = Vec::new();
    for seed in seeds(fixed) {
        let status = Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", test, "--nocapture"])
            .env("SIM_SEED", seed.to_string())
            .status()
            .expect("run a seed");
        if !status.success() {
            failed.push(seed);
        }
    }
    assert!(
        failed.is_empty(),
        "seeds {failed:?} failed; replay one with SIM_SEED=<seed>"
    );
}

/// Writes `events` to the file `SIM_TRACE` names, when it names one: what a replay of the
/// seed must repeat, line by line.
pub fn trace(events: &[String]) {
    if let Ok(path) = std::env::var("SIM_TRACE") {
        std::fs::write(path, events.join("\n")).expect("write the trace");
    }
}

/// Runs the test `test` on `seed` twice, each in a process of its own as `SIM_SEED=…` does (a
/// second run in one process may differ, through state tokio keeps per process: a crash drops
/// a host's tasks, and with them its connections, in an order that state decides), and fails
/// unless both traced the same events (at least `at_least` of them) in the same order.
pub fn replays_exactly(test: &str, seed: u64, at_least: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let replay = |name: &str| {
        let trace = dir.path().join(name);
        let status = Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", test])
            .env("SIM_SEED", seed.to_string())
            .env("SIM_TRACE", &trace)
            .status()
            .expect("run the simulation");
        assert!(status.success(), "seed {seed} failed: {status}");
        std::fs::read_to_string(&trace).expect("the trace")
    };
    let (first, second) = (replay("first"), replay("second"));
    let (first, second): (Vec<&str>, Vec<&str>) =
        (first.lines().collect(), second.lines().collect());
    assert!(
        first.len() >= at_least,
        "a short run: {} events",
        first.len()
    );
    if let Some(i) = first.iter().zip(&second).position(|(a, b)| a != b) {
        let around =
            |trace: &[&str]| trace[i.saturating_sub(3)..(i + 3).min(trace.len())].join("\n");
        panic!(
            "seed {seed} diverged at event {i}:\n{}\nthen:\n{}",
            around(&first),
            around(&second)
        );
    }
    assert_eq!(first.len(), second.len(), "seed {seed}: one run went on");
}
