//! What the scripted tests share, those that set up one interleaving on purpose rather than
//! leave it to the nemesis: the clients ask the driver for changes to the network and the
//! hosts at the moments they choose, and the driver carries each out before the next step.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A change to the network or the hosts.
pub enum Change {
    Partition(String, String),
    Repair(String, String),
    Crash(String),
    Bounce(String),
    /// Anything else, given the simulation and the directory its hosts keep their data in.
    Run(fn(&mut turmoil::Sim<'_>, &Path)),
}

/// The changes the clients asked for and the driver has not carried out yet.
pub type Changes = Arc<Mutex<Vec<Change>>>;

pub fn ask(changes: &Changes, change: Change) {
    changes.lock().expect("changes").push(change);
}

fn apply(sim: &mut turmoil::Sim<'_>, dir: &Path, change: Change) {
    match change {
        Change::Partition(a, b) => sim.partition(a.as_str(), b.as_str()),
        Change::Repair(a, b) => sim.repair(a.as_str(), b.as_str()),
        Change::Crash(host) => sim.crash(host.as_str()),
        Change::Bounce(host) => sim.bounce(host.as_str()),
        Change::Run(change) => change(sim, dir),
    }
}

/// Runs `clients` on a host of its own in `sim` until they finish, carrying out the changes
/// they ask for; their outcome, or a panic naming the seed.
pub fn run<T, Fut>(
    seed: u64,
    mut sim: turmoil::Sim<'_>,
    dir: &Path,
    changes: &Changes,
    clients: Fut,
) -> T
where
    T: 'static,
    Fut: Future<Output = Result<T, String>> + 'static,
{
    let outcome: Arc<Mutex<Option<Result<T, String>>>> = Arc::default();
    {
        let outcome = outcome.clone();
        sim.client("clients", async move {
            let done = clients.await;
            *outcome.lock().expect("outcome") = Some(done);
            Ok(())
        });
    }
    while !sim.step().unwrap_or_else(|e| panic!("seed {seed}: {e}")) {
        let asked: Vec<Change> = changes.lock().expect("changes").drain(..).collect();
        for change in asked {
            apply(&mut sim, dir, change);
        }
        if outcome.lock().expect("outcome").is_some() {
            break;
        }
    }
    let outcome = outcome.lock().expect("outcome").take();
    outcome
        .unwrap_or_else(|| panic!("seed {seed}: the clients never finished"))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

/// Starts writers on `host` through a `Messenger` that gives up each write after `deadline`,
/// for `tenants` with `groups` conversations each, until `write_for` has passed; their
/// acknowledgements go to `acked`. Cut off from the nodes afterwards, they keep sending to the
/// owner their route cache last named.
pub fn add_stale_writers(
    sim: &mut turmoil::Sim<'_>,
    host: &str,
    (tenants, groups): (&'static [&'static str], usize),
    (deadline, write_for): (Duration, Duration),
    acked: &Arc<Mutex<crate::workload::Acked>>,
) {
    let acked = acked.clone();
    sim.client(host, async move {
        let messenger = loop {
            match crate::workload::messenger_with(deadline).await {
                Ok(messenger) => break messenger,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut writers = tokio::task::JoinSet::new();
        let until = tokio::time::Instant::now() + write_for;
        crate::workload::spawn_writers(
            &mut writers,
            &messenger,
            (tenants, groups),
            "stale",
            until,
            &acked,
        );
        while writers.join_next().await.is_some() {}
        Ok(())
    });
}

/// Waits until the stale writers of [`add_stale_writers`] had a send acknowledged (their
/// route cache names the owner), then cuts their host off from every node.
pub async fn cut_off_stale_writers(
    host: &str,
    acked: &Mutex<crate::workload::Acked>,
    changes: &Changes,
) {
    while !acked
        .lock()
        .expect("acked")
        .values()
        .flatten()
        .any(|a| a.id.contains("stale"))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in 1..=crate::world::nodes() {
        ask(
            changes,
            Change::Partition(host.into(), crate::world::host(id)),
        );
    }
}
