//! A node cut off from the other nodes, while its clients still reach it, must not keep their
//! watches open on a state that no longer moves: once it has heard from no leader for three
//! election timeouts it ends route and migration watches with UNAVAILABLE and refuses
//! listings, so watchers move to a node that is in touch; after the heal it serves them again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::control::WatchMigrationRequest;
use cellplane_api::proto::routing::{ListRoutesRequest, WatchRequest};
use tonic::Code;

use crate::one_cut::{self, Cut};
use crate::world::{self, nodes, routing};

/// How long the node is cut off.
const CUT_FOR: Duration = Duration::from_secs(6);
/// Silence past which a node is out of touch: three election timeouts of 800 ms.
const GRACE: Duration = Duration::from_millis(2_400);
/// The latest a watch may end after the cut: a follower first waits out an election timeout
/// before it calls itself leaderless, then the grace, then the next check (every 500 ms).
const ENDS_WITHIN: Duration = Duration::from_millis(4_500);

async fn list(id: u64) -> Result<u64, tonic::Status> {
    let mut client = routing(id);
    let listed = client.list_routes(ListRoutesRequest {
        page_size: 1,
        page_token: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(1), listed).await {
        Ok(answer) => answer.map(|page| page.into_inner().revision),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 1 s")),
    }
}

/// What the clients saw.
#[derive(Debug)]
struct Seen {
    /// How long after the cut the route watch ended, with the status it ended with.
    ended: Duration,
    status: tonic::Status,
    /// The same for a watch of every migration, opened on the node beside it.
    migrations_ended: Duration,
    migrations_status: tonic::Status,
    /// A listing on the cut node once the watch ended, and one on another node then.
    listed_there: Result<u64, tonic::Status>,
    listed_elsewhere: Result<u64, tonic::Status>,
    /// How long after the heal the node served a listing and a watch event again.
    served_again: Duration,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Reads `stream` until it ends: when, and how.
async fn until_ended<T>(mut stream: tonic::Streaming<T>) -> (Duration, tonic::Status) {
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break tonic::Status::ok("the stream closed"),
            Err(status) => break status,
        }
    };
    (now(), status)
}

async fn clients(node: u64, cut: Arc<Mutex<Cut>>) -> Result<Seen, String> {
    one_cut::start_writes().await;
    let stream = routing(node)
        .watch(WatchRequest { from_revision: 0 })
        .await
        .map_err(|status| format!("watch on node {node}: {status}"))?
        .into_inner();
    let migrations = world::control(node)
        .watch_migration(WatchMigrationRequest {
            migration_id: String::new(),
        })
        .await
        .map_err(|status| format!("migration watch on node {node}: {status}"))?
        .into_inner();
    let migrations = tokio::spawn(until_ended(migrations));
    cut.lock().expect("cut").ready = true;
    let (ended_at, status) = until_ended(stream).await;
    let (migrations_ended_at, migrations_status) = migrations
        .await
        .map_err(|e| format!("migration watch: {e}"))?;
    let cut_at = cut
        .lock()
        .expect("cut")
        .at
        .ok_or("the watch ended before the cut")?;
    let ended = ended_at.saturating_sub(cut_at);
    let migrations_ended = migrations_ended_at.saturating_sub(cut_at);
    let listed_there = list(node).await;
    let other = (1..=nodes()).find(|id| *id != node).expect("another node");
    let listed_elsewhere = list(other).await;
    let healed_at = one_cut::healed(&cut).await;
    loop {
        if list(node).await.is_ok()
            && let Ok(watch) = routing(node).watch(WatchRequest { from_revision: 0 }).await
            && let Ok(Ok(Some(_))) =
                tokio::time::timeout(Duration::from_secs(1), watch.into_inner().message()).await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Seen {
        ended,
        status,
        migrations_ended,
        migrations_status,
        listed_there,
        listed_elsewhere,
        served_again: now() - healed_at,
    })
}

fn run(seed: u64, node: u64) -> Seen {
    one_cut::run(seed, node, CUT_FOR, move |cut| clients(node, cut))
}

#[test]
fn a_node_cut_off_from_its_peers_ends_its_watches_and_serves_again_after_the_heal() {
    // Node 1 leads in both seeds' first term, so both a cut-off leader and a cut-off follower
    // are covered.
    for (seed, node) in [(1, 1), (2, 3)] {
        let seen = run(seed, node);
        eprintln!("seed {seed}, node {node}: {seen:?}");
        assert_eq!(
            seen.status.code(),
            Code::Unavailable,
            "seed {seed}: {seen:?}"
        );
        assert!(
            seen.status.message().contains("heard from no leader"),
            "seed {seed}: the status names the reason: {}",
            seen.status.message()
        );
        assert!(
            (GRACE..=ENDS_WITHIN).contains(&seen.ended),
            "seed {seed}: the watch ended {:?} after the cut",
            seen.ended
        );
        assert_eq!(
            seen.migrations_status.code(),
            Code::Unavailable,
            "seed {seed}: {seen:?}"
        );
        assert!(
            (GRACE..=ENDS_WITHIN).contains(&seen.migrations_ended),
            "seed {seed}: the migration watch ended {:?} after the cut",
            seen.migrations_ended
        );
        let refused = seen
            .listed_there
            .as_ref()
            .expect_err("a listing on the cut node");
        assert_eq!(
            refused.code(),
            Code::Unavailable,
            "seed {seed}: {refused:?}"
        );
        assert!(
            seen.listed_elsewhere.is_ok(),
            "seed {seed}: another node lists: {:?}",
            seen.listed_elsewhere
        );
        assert!(
            seen.served_again <= Duration::from_secs(3),
            "seed {seed}: served again {:?} after the heal",
            seen.served_again
        );
    }
}
