//! The nemesis: one fault at a time, drawn from the seed, each healed after a while, so a
//! majority of nodes can make progress between faults and the checks see both sides of each.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::world::{NODES, host};

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The node's process is gone (its disk stays); it restarts at the heal.
    Crash(u64),
    /// No message crosses between the node and the others, either way.
    Isolate(u64),
    /// Messages from the first node to the second are lost; the other way works.
    OneWay(u64, u64),
    /// Messages between the two nodes wait, then arrive together: delay and reorder.
    Hold(u64, u64),
    /// Every link is slow (up to the given latency).
    Slow(Duration),
}

/// Faults as the seed draws them, and what was done, for the run's report.
pub struct Nemesis {
    rng: StdRng,
    next_at: Duration,
    active: Option<(Fault, Duration)>,
    pub injected: Vec<(Duration, Fault)>,
}

impl Nemesis {
    pub fn new(seed: u64) -> Self {
        Self {
            // Not the network's stream: turmoil draws latencies from its own generator.
            rng: StdRng::seed_from_u64(seed ^ 0x006E_656D_6573_6973),
            next_at: Duration::from_secs(3),
            active: None,
            injected: Vec::new(),
        }
    }

    /// Injects or heals what is due at `now`; `leader` is the node clients last saw lead,
    /// which a crash picks more often than the others.
    pub fn step(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, leader: Option<u64>) {
        if let Some((fault, heal_at)) = self.active {
            if now >= heal_at {
                heal(sim, fault);
                self.active = None;
                self.next_at = now + Duration::from_millis(self.rng.random_range(300..2_000));
            }
            return;
        }
        if now < self.next_at {
            return;
        }
        let fault = self.draw(leader);
        inject(sim, fault);
        let lasts = Duration::from_millis(self.rng.random_range(200..3_000));
        self.active = Some((fault, now + lasts));
        self.injected.push((now, fault));
    }

    /// Heals whatever is active: the run is over.
    pub fn heal_all(&mut self, sim: &mut turmoil::Sim<'_>) {
        if let Some((fault, _)) = self.active.take() {
            heal(sim, fault);
        }
    }

    fn node(&mut self) -> u64 {
        self.rng.random_range(1..=NODES)
    }

    fn other(&mut self, than: u64) -> u64 {
        let step = self.rng.random_range(1..NODES);
        (than - 1 + step) % NODES + 1
    }

    fn draw(&mut self, leader: Option<u64>) -> Fault {
        match self.rng.random_range(0..10) {
            0..=2 => Fault::Crash(
                leader
                    .filter(|_| self.rng.random_bool(0.7))
                    .unwrap_or_else(|| self.node()),
            ),
            3..=4 => Fault::Isolate(self.node()),
            5..=6 => {
                let from = self.node();
                Fault::OneWay(from, self.other(from))
            }
            7..=8 => {
                let a = self.node();
                Fault::Hold(a, self.other(a))
            }
            _ => Fault::Slow(Duration::from_millis(self.rng.random_range(50..400))),
        }
    }
}

fn others(id: u64) -> Vec<String> {
    (1..=NODES).filter(|&n| n != id).map(host).collect()
}

fn inject(sim: &mut turmoil::Sim<'_>, fault: Fault) {
    match fault {
        Fault::Crash(id) => sim.crash(host(id)),
        Fault::Isolate(id) => {
            for other in others(id) {
                sim.partition(host(id), other);
            }
        }
        Fault::OneWay(from, to) => sim.partition_oneway(host(from), host(to)),
        Fault::Hold(a, b) => sim.hold(host(a), host(b)),
        Fault::Slow(latency) => sim.set_max_message_latency(latency),
    }
}

fn heal(sim: &mut turmoil::Sim<'_>, fault: Fault) {
    match fault {
        Fault::Crash(id) => sim.bounce(host(id)),
        Fault::Isolate(id) => {
            for other in others(id) {
                sim.repair(host(id), other);
            }
        }
        Fault::OneWay(from, to) => sim.repair_oneway(host(from), host(to)),
        Fault::Hold(a, b) => sim.release(host(a), host(b)),
        Fault::Slow(_) => sim.set_max_message_latency(Duration::from_millis(20)),
    }
}
