//! The mirror: this node's copy of the records under the prefix, kept current by one etcd
//! watch. Reads are answered from it; writes decide on it and then wait until it has seen their
//! own revision, so a caller reads its writes on any node.
//!
//! On start the mirror loads the records as of the revision history was last compacted to and
//! replays etcd's history from there, so its route history (what `Watch` resumes from) covers
//! exactly what etcd still holds, as the Raft store's history covers what it did not compact.
//! If etcd compacted further on its own, or the watch fell behind a compaction, the mirror
//! reloads the current records and tells watchers to re-read (they get OUT_OF_RANGE).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KvClient, WatchOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::layout::{self, Layout, MetaKey, Parsed};
use crate::state::history::RouteEvent;
use crate::store::StoreError;
use crate::store::view::{MachineState, SharedState, WatchBatch, WatchSignal};

/// Records read per page when loading.
const LOAD_PAGE: i64 = 10_000;

/// Pause before re-opening a broken watch.
const REWATCH_BACKOFF: Duration = Duration::from_millis(200);

/// A running mirror; dropping it does not stop it, [`Mirror::stop`] does.
pub struct Mirror {
    shared: Arc<SharedState>,
    seen: Arc<Seen>,
    /// Since when no watch has been open, while none is.
    broken_since: Arc<Mutex<Option<Instant>>>,
    task: JoinHandle<()>,
}

/// The revision through which the mirror holds every change under the prefix, and the callers
/// waiting for a later one. Each waiter is woken once, when its revision arrives, so hundreds of
/// writers waiting on their own commits cost nothing while other revisions go by.
#[derive(Debug, Default)]
struct Seen {
    state: Mutex<SeenState>,
}

#[derive(Debug, Default)]
struct SeenState {
    revision: u64,
    waiting: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Seen {
    fn new(revision: u64) -> Self {
        Self {
            state: Mutex::new(SeenState {
                revision,
                waiting: BTreeMap::new(),
            }),
        }
    }

    fn revision(&self) -> u64 {
        self.state.lock().expect("seen lock").revision
    }

    /// Records that the mirror holds everything through `revision` and wakes whoever waited
    /// for it.
    fn advance(&self, revision: u64) {
        let ready = {
            let mut state = self.state.lock().expect("seen lock");
            state.revision = state.revision.max(revision);
            let later = state.waiting.split_off(&(revision + 1));
            std::mem::replace(&mut state.waiting, later)
        };
        for waiter in ready.into_values().flatten() {
            let _ = waiter.send(());
        }
    }

    /// `None` when `revision` is already held, else what fires once it is.
    fn wait(&self, revision: u64) -> Option<oneshot::Receiver<()>> {
        let mut state = self.state.lock().expect("seen lock");
        if state.revision >= revision {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        state.waiting.entry(revision).or_default().push(tx);
        Some(rx)
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // The prefix ends with '/', never 0xff, so incrementing the last byte is enough.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn unavailable(context: &str, err: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd {context}: {err}"))
}

/// Whether an etcd error says the revision asked for was compacted away.
fn is_compacted(err: &etcd_client::Error) -> bool {
    err.to_string().contains("compacted")
}

/// The records under the prefix as of `at` (the current revision when `None`), and that
/// revision. Derived counters are rebuilt as the records go in.
async fn load(
    kv: &mut KvClient,
    layout: &Layout,
    at: Option<i64>,
) -> Result<(MachineState, u64), etcd_client::Error> {
    let end = prefix_end(layout.prefix());
    let mut from = layout.prefix().as_bytes().to_vec();
    let mut revision = at;
    let mut machine = MachineState::default();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LOAD_PAGE);
        if let Some(revision) = revision {
            options = options.with_revision(revision);
        }
        let response = kv.get(from.clone(), Some(options)).await?;
        let at = *revision.get_or_insert(response.header().map_or(0, |h| h.revision()));
        for kv in response.kvs() {
            apply_put(&mut machine, layout, kv);
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => {
                let at = at as u64;
                machine.control.advance_to(at);
                machine.control.start_history_at(at);
                return Ok((machine, at));
            }
        }
    }
}

/// Applies one put under the prefix; the route event it causes, if any.
fn apply_put(
    machine: &mut MachineState,
    layout: &Layout,
    kv: &etcd_client::KeyValue,
) -> Option<RouteEvent> {
    let revision = kv.mod_revision() as u64;
    match layout.parse(kv.key()) {
        Some(Parsed::Record(key)) => match layout::decode(&key, kv.value()) {
            Ok(record) => {
                let created = kv.create_revision() as u64;
                match machine
                    .control
                    .put_record(key.clone(), record, revision, created)
                {
                    Ok(event) => {
                        machine.mod_revisions.insert(key, revision);
                        event
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "skipping an etcd record");
                        None
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "skipping an etcd record this build cannot read");
                None
            }
        },
        Some(Parsed::Meta(MetaKey::Compacted)) => {
            let compacted = std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(compacted) = compacted {
                machine.control.compact_history(compacted);
            }
            None
        }
        Some(Parsed::Meta(MetaKey::Written)) => None,
        None => {
            tracing::debug!(key = %String::from_utf8_lossy(kv.key()), "ignoring an unknown key under the prefix");
            None
        }
    }
}

fn apply_delete(
    machine: &mut MachineState,
    layout: &Layout,
    kv: &etcd_client::KeyValue,
) -> Option<RouteEvent> {
    match layout.parse(kv.key()) {
        Some(Parsed::Record(key)) => {
            machine.mod_revisions.remove(&key);
            machine
                .control
                .delete_record(&key, kv.mod_revision() as u64)
        }
        _ => None,
    }
}

/// The revision history was compacted to, as the last compaction through cellplane recorded.
async fn compacted_marker(kv: &mut KvClient, layout: &Layout) -> Result<u64, etcd_client::Error> {
    let response = kv.get(layout.meta(MetaKey::Compacted), None).await?;
    Ok(response
        .kvs()
        .first()
        .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
        .unwrap_or(0))
}

impl Mirror {
    /// Loads the records and starts following the watch; returns once the mirror holds every
    /// write made before the call.
    pub async fn start(client: &Client, layout: Layout) -> Result<Self, StoreError> {
        let mut kv = client.kv_client();
        let compacted = compacted_marker(&mut kv, &layout)
            .await
            .map_err(|e| unavailable("reading the compaction marker", e))?;
        let (machine, revision) = if compacted == 0 {
            // Never compacted through cellplane: replay etcd's whole history from the start.
            (MachineState::default(), 0)
        } else {
            match load(&mut kv, &layout, Some(compacted as i64)).await {
                Ok(loaded) => loaded,
                Err(err) if is_compacted(&err) => load(&mut kv, &layout, None)
                    .await
                    .map_err(|e| unavailable("loading the records", e))?,
                Err(err) => return Err(unavailable("loading the records", err)),
            }
        };
        let shared = Arc::new(SharedState::new(machine));
        let seen = Arc::new(Seen::new(revision));
        let broken_since = Arc::new(Mutex::new(None));
        let task = tokio::spawn(follow(
            client.clone(),
            layout,
            (shared.clone(), seen.clone()),
            broken_since.clone(),
        ));
        Ok(Self {
            shared,
            seen,
            broken_since,
            task,
        })
    }

    /// The mirrored state, as reads and watches see it.
    pub fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// Waits until the mirror holds every change up to `revision`.
    pub async fn wait_for(&self, revision: u64, timeout: Duration) -> Result<(), StoreError> {
        let Some(reached) = self.seen.wait(revision) else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, reached).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Unavailable("the etcd mirror stopped".into())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the etcd watch did not deliver revision {revision} within {timeout:?}; retry"
            ))),
        }
    }

    /// How long the mirror has followed no watch, while it follows none: etcd unreachable, or
    /// its member without a leader (the client requires one, so such a member ends the watch).
    pub fn broken_for(&self) -> Option<Duration> {
        self.broken_since
            .lock()
            .expect("mirror watch state poisoned")
            .map(|since| since.elapsed())
    }

    /// Stops following etcd; the state stays readable as it was.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Follows the prefix from the mirror's revision on, forever: re-opens a broken watch where it
/// stopped, and reloads when etcd no longer has the history in between. Notes since when no
/// watch is open in `broken_since`.
async fn follow(
    client: Client,
    layout: Layout,
    (shared, seen): (Arc<SharedState>, Arc<Seen>),
    broken_since: Arc<Mutex<Option<Instant>>>,
) {
    let mut watch_client = client.watch_client();
    let mut kv = client.kv_client();
    let broken = |open: bool| {
        let mut since = broken_since.lock().expect("mirror watch state poisoned");
        if open {
            *since = None;
        } else {
            since.get_or_insert_with(Instant::now);
        }
    };
    loop {
        let from = seen.revision() + 1;
        let options = WatchOptions::new()
            .with_range(prefix_end(layout.prefix()))
            .with_start_revision(from as i64);
        let mut stream = match watch_client.watch(layout.prefix(), Some(options)).await {
            Ok(stream) => {
                broken(true);
                stream
            }
            Err(err) => {
                broken(false);
                tracing::warn!(error = %err, "etcd watch failed to open; retrying");
                tokio::time::sleep(REWATCH_BACKOFF).await;
                continue;
            }
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "etcd watch broke; re-opening");
                    break;
                }
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    tracing::warn!(
                        from,
                        compacted = response.compact_revision(),
                        "etcd compacted history the mirror had not seen; reloading"
                    );
                    match load(&mut kv, &layout, None).await {
                        Ok((machine, revision)) => {
                            shared.write(|current| {
                                *current = machine;
                                shared.publish(WatchSignal::Reset);
                            });
                            seen.advance(revision);
                        }
                        Err(err) => tracing::warn!(error = %err, "reloading from etcd failed"),
                    }
                }
                break;
            }
            apply_response(&shared, &layout, &seen, response.events());
        }
        broken(false);
        tokio::time::sleep(REWATCH_BACKOFF).await;
    }
}

/// Applies one watch message's events, one revision at a time (etcd never splits a revision
/// across messages), and tells watchers and waiting writers.
fn apply_response(
    shared: &SharedState,
    layout: &Layout,
    seen: &Seen,
    events: &[etcd_client::Event],
) {
    let mut start = 0;
    while start < events.len() {
        let revision = events[start].kv().map_or(0, |kv| kv.mod_revision());
        let mut end = start;
        while end < events.len() && events[end].kv().map_or(0, |kv| kv.mod_revision()) == revision {
            end += 1;
        }
        let revision = revision as u64;
        shared.write(|machine| {
            let changed: Vec<RouteEvent> = events[start..end]
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    match event.event_type() {
                        EventType::Put => apply_put(machine, layout, kv),
                        EventType::Delete => apply_delete(machine, layout, kv),
                    }
                })
                .collect();
            machine.control.record_events(&changed);
            machine.control.advance_to(revision);
            // Published under the lock, so a new watcher sees each change exactly once.
            shared.publish(WatchSignal::Batch(Arc::new(WatchBatch {
                revision,
                events: changed,
            })));
        });
        seen.advance(revision);
        start = end;
    }
}
