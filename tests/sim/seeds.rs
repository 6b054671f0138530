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
