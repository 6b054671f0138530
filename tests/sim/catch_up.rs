//! A follower cut off from the other nodes for a moment must be back in step soon after the
//! cut heals. The simulated network loses what a cut link carried and never resends it, so
//! every connection that crossed the cut is dead afterwards without being closed, as one
//! through a middlebox that forgot the flow is: the follower catches up only once the nodes
//! find that out and connect anew. Until then it answers reads from an old state and does not
//! count towards the quorum, so the next crash of another node stops every write.

use std::time::Duration;

use crate::one_cut::{self, revision};
use crate::world::nodes;

/// How long the follower is cut off.
const CUT_FOR: Duration = Duration::from_secs(1);
/// How long after the heal it may take to have everything the others had at the heal: the
/// nodes' keepalive (1 s of silence, then 1 s for the ping) and a few heartbeats.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(3);

/// Cuts `follower` off from the other nodes once writes flow, heals the cut `CUT_FOR` later,
/// and answers how long after the heal the follower had every revision the others had
/// applied at the heal.
fn run(seed: u64, follower: u64) -> Duration {
    one_cut::run(seed, follower, CUT_FOR, move |cut| async move {
        one_cut::start_writes().await;
        cut.lock().expect("cut").ready = true;
        let healed_at = one_cut::healed(&cut).await;
        let mut target = 0;
        for other in (1..=nodes()).filter(|id| *id != follower) {
            target = target.max(revision(other).await.unwrap_or(0));
        }
        while revision(follower).await.unwrap_or(0) < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(turmoil::sim_elapsed().unwrap_or_default() - healed_at)
    })
}

#[test]
fn a_follower_cut_off_for_a_moment_catches_up_soon_after_the_heal() {
    for (seed, follower) in [(1, 3), (2, 2)] {
        let took = run(seed, follower);
        eprintln!("seed {seed}: node {follower} caught up {took:?} after the heal");
        assert!(
            took <= CATCH_UP_WITHIN,
            "seed {seed}: node {follower} caught up only {took:?} after the heal"
        );
    }
}
