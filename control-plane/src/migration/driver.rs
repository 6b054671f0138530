//! The leader's side of the coordinator: a few times a second it steps every unfinished
//! migration with the time, which starts planned ones and fails the ones that stopped moving,
//! and starts the migrations that evacuate DRAINING cells.
//! Every node runs it, but only the current leader acts, so after a leader change the new
//! leader picks up where the old one was; the state it reads is the replicated state.

use std::sync::Arc;
use std::time::Duration;

use super::step::{Decision, Event, step};
use crate::node::{Node, Proposal};

/// How often the leader looks at unfinished migrations.
const TICK: Duration = Duration::from_millis(100);

use cellplane_api::clock::now_ms;

/// Runs until the node shuts down.
pub async fn run(node: Arc<Node>) {
    let mut shutdown = node.shutdown_signal();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !node.store.drives_migrations() {
            continue;
        }
        let now = now_ms();
        let (decisions, drains): (Vec<_>, _) = node.view().read(|state| {
            let decisions = state
                .migrations()
                .iter()
                .filter(|(_, m)| !m.phase.is_terminal())
                .map(|(id, m)| step(*id, m, Event::Tick, now, &node.migration))
                .collect();
            (decisions, crate::drain::plan(state, now))
        });
        let commands = decisions
            .into_iter()
            .filter_map(|decision| match decision {
                Decision::Propose(command) => Some(command),
                _ => None,
            })
            .chain(drains);
        for command in commands {
            let kind = command.kind();
            // A refusal here is a lost race with a report or another leader (or, for a drain,
            // a key with nowhere to go yet): the next tick decides again from the newer state.
            match node.propose(command, true).await {
                Ok(Proposal::Applied(_)) => {}
                Ok(Proposal::Forward(_)) => {}
                Err(status) => {
                    tracing::debug!(kind, %status, "migration tick refused");
                }
            }
        }
    }
}
