//! The nemesis: one fault at a time, drawn from the seed, each healed after a while, so a
//! majority of nodes can make progress between faults and the checks see both sides of each.
//! Beneath the faults every server's clock runs at a rate of its own all along.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellplane_api::simulation;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::world::{host, nodes};

/// How far a host's clock may drift either way. A lease is measured on two clocks, the cell's
/// and a node's: the detector allows `clock_drift_ms` (200 ms) on `lease_ms` (2 s), so the
/// node's may run at most 10% faster than the cell's, and 1.04 / 0.96 is 8.3% faster.
const MAX_DRIFT: f64 = 0.04;

/// A fault, naming the simulated hosts it hits: control-plane nodes, and the agent with its
/// cells where the run has one.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The host's processes are gone; they restart at the heal. When the whole `machine`
    /// went down, its disk also lost what its stores had written without a sync (the Raft
    /// log's: `cellplane_api::simulation::files`); otherwise the page cache survives.
    Crash { host: String, machine: bool },
    /// No message crosses between the host and the other servers, either way.
    Isolate(String),
    /// Nodes, fewer than half of them, are cut off from the other nodes only: clients and
    /// agents still reach them, and they go on answering from a state that no longer moves
    /// (their peer network failed, not their clients').
    PeersCut(Vec<String>),
    /// Messages from the first host to the second are lost; the other way works.
    OneWay(String, String),
    /// Messages between the two hosts wait, then arrive together: delay and reorder.
    Hold(String, String),
    /// Every link is slow (up to the given latency).
    Slow(Duration),
    /// The host's disk stops answering: its writes wait, and what they acknowledge with them.
    /// When it `ends_in_a_crash`, the host crashes before the disk answers again, losing every
    /// write it had not made durable.
    DiskStall { host: String, ends_in_a_crash: bool },
    /// Every Raft message to the node arrives twice, the copy `after` the original, so that a
    /// stale copy may land after newer messages.
    Duplicate { host: String, after: Duration },
}

/// Faults as the seed draws them, and what was done, for the run's report.
pub struct Nemesis {
    rng: StdRng,
    /// The servers faults hit, crashes too; clients are never cut off, so they see what
    /// servers do.
    hosts: Vec<String>,
    /// Where each host keeps its data, under a directory named after it.
    dir: PathBuf,
    next_at: Duration,
    active: Option<(Fault, Duration)>,
    lagging: Option<Lagging>,
    clocks: Clocks,
    pub injected: Vec<(Duration, Fault)>,
}

/// Every server's clock, running at a rate of its own whatever else is injected, each redrawn
/// now and then: a cell's lease lasts longer than it should where its clock runs slow, the
/// detector gives up on cells sooner where its runs fast. Drawn from a stream of its own, so the
/// faults are the same whatever the clocks do.
struct Clocks {
    rng: StdRng,
    next_at: Duration,
    /// Every rate set: when, on which host, the rate.
    set: Vec<(Duration, String, f64)>,
}

/// A client host cut off from every node on a schedule of its own, whatever else is injected
/// meanwhile: its route cache lags while it still reaches the cells.
struct Lagging {
    host: String,
    nodes: Vec<String>,
    rng: StdRng,
    next_at: Duration,
    /// While cut off: until when.
    cut_until: Option<Duration>,
    /// Every cut: from, until.
    cuts: Vec<(Duration, Duration)>,
}

impl Nemesis {
    pub fn new(seed: u64, dir: &Path, hosts: Vec<String>) -> Self {
        Self {
            hosts,
            dir: dir.to_path_buf(),
            // Not the network's stream: turmoil draws latencies from its own generator.
            rng: StdRng::seed_from_u64(seed ^ 0x006E_656D_6573_6973),
            next_at: Duration::from_secs(3),
            active: None,
            lagging: None,
            clocks: Clocks {
                rng: StdRng::seed_from_u64(seed ^ 0x0063_6C6F_636B),
                next_at: Duration::ZERO,
                set: Vec::new(),
            },
            injected: Vec::new(),
        }
    }

    /// Sets every host's clock rate the first time, then one host's every 1–4 s.
    fn step_clocks(&mut self, now: Duration) {
        let clocks = &mut self.clocks;
        if now < clocks.next_at {
            return;
        }
        let hosts: Vec<&String> = if clocks.set.is_empty() {
            self.hosts.iter().collect()
        } else {
            vec![&self.hosts[clocks.rng.random_range(0..self.hosts.len())]]
        };
        for host in hosts {
            let rate = 1.0 + clocks.rng.random_range(-MAX_DRIFT..=MAX_DRIFT);
            simulation::set_clock_rate(&self.dir.join(host), rate);
            clocks.set.push((now, host.clone(), rate));
        }
        clocks.next_at = now + Duration::from_millis(clocks.rng.random_range(1_000..4_000));
    }

    /// Also cuts the client host `host` off from `nodes` now and then, whatever else is
    /// injected meanwhile.
    pub fn lagging(mut self, seed: u64, host: &str, nodes: Vec<String>) -> Self {
        self.lagging = Some(Lagging {
            host: host.into(),
            nodes,
            rng: StdRng::seed_from_u64(seed ^ 0x006C_6167),
            next_at: Duration::from_secs(3),
            cut_until: None,
            cuts: Vec::new(),
        });
        self
    }

    /// Cuts the lagging host off, or reconnects it, as its schedule says at `now`.
    fn step_lagging(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration) {
        let Some(lagging) = &mut self.lagging else {
            return;
        };
        match lagging.cut_until {
            Some(until) if now >= until => {
                lagging.repair(sim);
                lagging.next_at = now + Duration::from_millis(lagging.rng.random_range(500..4_000));
            }
            None if now >= lagging.next_at => {
                for node in &lagging.nodes {
                    sim.partition(lagging.host.as_str(), node.as_str());
                }
                let lasts = Duration::from_millis(lagging.rng.random_range(500..4_000));
                lagging.cut_until = Some(now + lasts);
                lagging.cuts.push((now, now + lasts));
            }
            _ => {}
        }
    }

    /// Injects or heals what is due at `now`; `leader` is the node clients last saw lead,
    /// which a crash picks more often than the others.
    pub fn step(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, leader: Option<u64>) {
        self.step_lagging(sim, now);
        self.step_clocks(now);
        if let Some((fault, heal_at)) = &self.active {
            if now >= *heal_at {
                if let Fault::DiskStall {
                    host,
                    ends_in_a_crash: true,
                } = fault
                {
                    // The machine goes down before the disk answers again: what waited on
                    // the disk is lost, and what was written but not synced.
                    let crash = Fault::Crash {
                        host: host.clone(),
                        machine: true,
                    };
                    inject(sim, &self.hosts, &self.dir, &crash);
                    heal(sim, &self.hosts, &self.dir, fault);
                    let lasts = Duration::from_millis(self.rng.random_range(200..3_000));
                    self.injected.push((now, crash.clone()));
                    self.active = Some((crash, now + lasts));
                    return;
                }
                heal(sim, &self.hosts, &self.dir, fault);
                self.active = None;
                self.next_at = now + Duration::from_millis(self.rng.random_range(300..2_000));
            }
            return;
        }
        if now < self.next_at {
            return;
        }
        let fault = self.draw(leader);
        inject(sim, &self.hosts, &self.dir, &fault);
        let lasts = Duration::from_millis(self.rng.random_range(200..3_000));
        self.active = Some((fault.clone(), now + lasts));
        self.injected.push((now, fault));
    }

    /// Every fault injected, a line each with its instant, the lagging host's cuts and the
    /// clock rates.
    pub fn report(&self) -> Vec<String> {
        let faults = self
            .injected
            .iter()
            .map(|(at, fault)| format!("{:>8.3}s {fault:?}", at.as_secs_f64()));
        let lags = self.lagging.iter().flat_map(|lagging| {
            lagging.cuts.iter().map(|(from, until)| {
                format!(
                    "{:>8.3}s {} cut off from the nodes until {:.3}s",
                    from.as_secs_f64(),
                    lagging.host,
                    until.as_secs_f64()
                )
            })
        });
        let clocks = self.clocks.set.iter().map(|(at, host, rate)| {
            format!(
                "{:>8.3}s {host}'s clock runs at {rate:.3}",
                at.as_secs_f64()
            )
        });
        faults.chain(lags).chain(clocks).collect()
    }

    /// Heals whatever is active: the run is over.
    pub fn heal_all(&mut self, sim: &mut turmoil::Sim<'_>) {
        if let Some((fault, _)) = self.active.take() {
            heal(sim, &self.hosts, &self.dir, &fault);
        }
        if let Some(lagging) = &mut self.lagging {
            lagging.repair(sim);
        }
        for host in &self.hosts {
            simulation::set_clock_rate(&self.dir.join(host), 1.0);
        }
    }

    fn pick(&mut self) -> String {
        self.hosts[self.rng.random_range(0..self.hosts.len())].clone()
    }

    fn other(&mut self, than: &str) -> String {
        let others: Vec<&String> = self.hosts.iter().filter(|h| *h != than).collect();
        others[self.rng.random_range(0..others.len())].clone()
    }

    /// Nodes fewer than half: one of three; one or two of five, the leader among two half the
    /// time, which leaves a follower hearing from a leader that lost its quorum.
    fn minority(&mut self, leader: Option<u64>) -> Vec<String> {
        let n = nodes();
        let size = if n >= 5 {
            self.rng.random_range(1..=(n - 1) / 2)
        } else {
            1
        };
        let mut cut: Vec<u64> = Vec::new();
        if size > 1
            && let Some(leader) = leader
            && self.rng.random_bool(0.5)
        {
            cut.push(leader);
        }
        while cut.len() < size as usize {
            let id = self.rng.random_range(1..=n);
            if !cut.contains(&id) {
                cut.push(id);
            }
        }
        cut.into_iter().map(host).collect()
    }

    fn draw(&mut self, leader: Option<u64>) -> Fault {
        match self.rng.random_range(0..13) {
            0..=2 => Fault::Crash {
                host: match leader {
                    Some(leader) if self.rng.random_bool(0.7) => host(leader),
                    _ => self.pick(),
                },
                machine: self.rng.random_bool(0.5),
            },
            3..=4 => Fault::Isolate(self.pick()),
            5..=6 => {
                let from = self.pick();
                Fault::OneWay(from.clone(), self.other(&from))
            }
            7..=8 => {
                let a = self.pick();
                Fault::Hold(a.clone(), self.other(&a))
            }
            9 => Fault::Slow(Duration::from_millis(self.rng.random_range(50..400))),
            10 => Fault::DiskStall {
                host: self.pick(),
                ends_in_a_crash: self.rng.random_bool(0.3),
            },
            11 => Fault::Duplicate {
                host: host(self.rng.random_range(1..=nodes())),
                after: Duration::from_millis(self.rng.random_range(1..500)),
            },
            _ => Fault::PeersCut(self.minority(leader)),
        }
    }
}

impl Lagging {
    fn repair(&mut self, sim: &mut turmoil::Sim<'_>) {
        if self.cut_until.take().is_some() {
            for node in &self.nodes {
                sim.repair(self.host.as_str(), node.as_str());
            }
        }
    }
}

/// The links an isolation cuts: between the host and every other server, or, for nodes cut
/// off from their peers, between each of them and every node outside the cut. None for other
/// faults.
fn cut_links(fault: &Fault, hosts: &[String]) -> Vec<(String, String)> {
    let (cut, from): (Vec<String>, Vec<String>) = match fault {
        Fault::Isolate(cut) => (vec![cut.clone()], hosts.to_vec()),
        Fault::PeersCut(cut) => (cut.clone(), (1..=nodes()).map(host).collect()),
        _ => return Vec::new(),
    };
    cut.iter()
        .flat_map(|one| {
            from.iter()
                .filter(|other| !cut.contains(other))
                .map(move |other| (one.clone(), other.clone()))
        })
        .collect()
}

fn inject(sim: &mut turmoil::Sim<'_>, hosts: &[String], dir: &Path, fault: &Fault) {
    match fault {
        Fault::Crash { host, machine } => {
            // First the files: the dead processes' destructors, run by the crash, write nothing.
            simulation::files::crash(&dir.join(host), *machine);
            sim.crash(host.as_str());
        }
        Fault::Isolate(_) | Fault::PeersCut(_) => {
            for (a, b) in cut_links(fault, hosts) {
                sim.partition(a.as_str(), b.as_str());
            }
        }
        Fault::OneWay(from, to) => sim.partition_oneway(from.as_str(), to.as_str()),
        Fault::Hold(a, b) => sim.hold(a.as_str(), b.as_str()),
        Fault::Slow(latency) => sim.set_max_message_latency(*latency),
        Fault::DiskStall { host, .. } => simulation::stall_disk(&dir.join(host)),
        Fault::Duplicate { host, after } => simulation::duplicate_to(host, Some(*after)),
    }
}

fn heal(sim: &mut turmoil::Sim<'_>, hosts: &[String], dir: &Path, fault: &Fault) {
    match fault {
        Fault::Crash { host, .. } => sim.bounce(host.as_str()),
        Fault::Isolate(_) | Fault::PeersCut(_) => {
            for (a, b) in cut_links(fault, hosts) {
                sim.repair(a.as_str(), b.as_str());
            }
        }
        Fault::OneWay(from, to) => sim.repair_oneway(from.as_str(), to.as_str()),
        Fault::Hold(a, b) => sim.release(a.as_str(), b.as_str()),
        Fault::Slow(_) => sim.set_max_message_latency(Duration::from_millis(20)),
        Fault::DiskStall { host, .. } => simulation::resume_disk(&dir.join(host)),
        Fault::Duplicate { host, .. } => simulation::duplicate_to(host, None),
    }
}
