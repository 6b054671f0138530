//! The durable Raft log, vote and commit index, in one redb file.
//!
//! Group commit: `append` hands its entries to one writer thread and returns; the entries are
//! readable at once (openraft replicates them before they are durable) from an in-memory overlay.
//! The writer takes every job queued since its last commit, writes them in one redb transaction
//! with one fsync, and only then reports those appends durable. While one fsync runs, the appends
//! that arrive meanwhile queue up and share the next one. openraft counts an entry towards a
//! quorum only once it is reported durable, so an acknowledged write survives a crash.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::codec;
use super::disk_wait::DiskWait;
use super::simulated_disk::SimulatedDisk;
use super::{NodeId, TypeConfig};

/// Log entries by index, postcard-encoded.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
/// Vote, last purged log id and commit index.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const PURGED: &str = "last_purged";
const COMMITTED: &str = "committed";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The log store of one node. Clones share the database, the overlay and the writer; the clone
/// handed to openraft as the log reader reads through its own transactions.
#[derive(Clone)]
pub struct LogStore {
    node_id: NodeId,
    db: Arc<Database>,
    /// Entries handed to the writer and not yet written, readable meanwhile.
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    /// The newest commit index openraft reported; the writer stores it with its next batch.
    committed: Arc<Mutex<Option<LogId<NodeId>>>>,
    writer: Writer,
    /// When the jobs the writer has not written yet were queued.
    disk_wait: DiskWait,
}

/// Work for the writer thread, done in the order it was queued.
enum Job {
    Append {
        entries: Vec<(LogId<NodeId>, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Remove entries at and after the index.
    Truncate {
        from: u64,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Store a meta value (vote, commit index); `done`, when given, is told once it is durable.
    SaveMeta {
        key: &'static str,
        bytes: Vec<u8>,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    },
    /// Remove entries up to the log id and remember it as purged.
    Purge {
        upto: LogId<NodeId>,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// The vote a node restarts with. A node that crashed as leader comes back with its own vote
/// not committed, so it restarts as a follower (openraft would otherwise resume its leadership
/// at once). A resumed leader knows only the commit index on its disk, which lags what it
/// acknowledged (the writer stores it with its next batch), and would answer linearizable
/// reads from that older state: its read index is the larger of that commit index and the
/// first entry of its term, long committed. It must win an election instead, and a leader
/// serves reads only once an entry of its own term is committed and applied. The term and whom
/// it voted for are unchanged, so it still never votes twice in one term. A follower's vote
/// stays committed: it keeps waiting a full leader lease before it campaigns, as before.
fn vote_after_restart(stored: Vote<NodeId>, me: NodeId) -> Vote<NodeId> {
    if stored.leader_id().voted_for() == Some(me) {
        Vote {
            committed: false,
            ..stored
        }
    } else {
        stored
    }
}

fn redb_error(err: impl Into<redb::Error>) -> AnyError {
    AnyError::new(&err.into())
}

/// Writes one batch of jobs, and the commit index when it moved, in one durable transaction.
fn write_batch(
    db: &Database,
    jobs: &[Job],
    committed: Option<&LogId<NodeId>>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut logs = txn.open_table(LOGS)?;
        let mut meta = txn.open_table(META)?;
        if let Some(committed) = committed {
            let bytes = codec::encode(&Some(*committed))
                .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            meta.insert(COMMITTED, bytes.as_slice())?;
        }
        for job in jobs {
            match job {
                Job::Append { entries, .. } => {
                    for (log_id, bytes) in entries {
                        logs.insert(log_id.index, bytes.as_slice())?;
                    }
                }
                Job::Truncate { from, .. } => logs.retain_in(*from.., |_, _| false)?,
                Job::SaveMeta { key, bytes, .. } => {
                    meta.insert(*key, bytes.as_slice())?;
                }
                Job::Purge { upto, .. } => {
                    let bytes =
                        codec::encode(upto).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                    meta.insert(PURGED, bytes.as_slice())?;
                    logs.retain_in(..=upto.index, |_, _| false)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// What the writer shares with the store: the database, the overlay of unwritten entries, the
/// commit index to store, and when the jobs it has not written yet were queued.
#[derive(Clone)]
struct Shared {
    db: Arc<Database>,
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    committed: Arc<Mutex<Option<LogId<NodeId>>>>,
    disk_wait: DiskWait,
}

fn run_writer(shared: Shared, jobs: mpsc::Receiver<Job>) {
    let mut committed_written: Option<LogId<NodeId>> = None;
    // Ends when every clone of the store, and so every sender, is gone.
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        write_jobs(&shared, &mut committed_written, batch);
    }
}

/// Writes `batch` in one transaction and tells each job's waiter how it went.
fn write_jobs(shared: &Shared, committed_written: &mut Option<LogId<NodeId>>, batch: Vec<Job>) {
    let Shared {
        db,
        pending,
        committed,
        disk_wait,
    } = shared;
    let committed_now = committed.lock().ok().and_then(|c| *c);
    let moved = (committed_now != *committed_written)
        .then_some(committed_now)
        .flatten();
    // Before the batch is durable: no entry of it counts towards a quorum yet.
    cellplane_api::failpoint::crash_point("raft-log-write");
    let result = write_batch(db, &batch, moved.as_ref()).map_err(|e| e.to_string());
    disk_wait.written(batch.len());
    if result.is_ok() && moved.is_some() {
        *committed_written = moved;
    }
    let mut entries = 0usize;
    let mut written: Vec<LogId<NodeId>> = Vec::new();
    for job in &batch {
        if let Job::Append { entries: e, .. } = job {
            entries += e.len();
            written.extend(e.iter().map(|(log_id, _)| *log_id));
        }
    }
    if result.is_ok() {
        // Entries per fsync is how well concurrent writes share the disk.
        metrics::counter!("cellplane_raft_log_syncs_total").increment(1);
        metrics::counter!("cellplane_raft_log_entries_total").increment(entries as u64);
        if let Ok(mut pending) = pending.lock() {
            // Only if unchanged: a truncation may have put a newer entry at the index since.
            for log_id in written {
                if pending
                    .get(&log_id.index)
                    .is_some_and(|e| e.log_id == log_id)
                {
                    pending.remove(&log_id.index);
                }
            }
        }
    }
    for job in batch {
        let outcome = result.clone();
        match job {
            Job::Append { callback, .. } => {
                callback.log_io_completed(outcome.map_err(std::io::Error::other));
            }
            Job::Truncate { done, .. } | Job::Purge { done, .. } => {
                let _ = done.send(outcome);
            }
            Job::SaveMeta { done, .. } => {
                if let Some(done) = done {
                    let _ = done.send(outcome);
                }
            }
        }
    }
}

/// Where the store's jobs go.
#[derive(Clone)]
enum Writer {
    /// The writer thread, which commits every job queued since its last commit together.
    Thread(mpsc::Sender<Job>),
    /// In a simulation, a task of the node's runtime writes the jobs instead, so when they are
    /// durable depends on the simulated clock (and the simulated disk) alone. `path` is the
    /// log's file, so a simulated disk stall can hold its writes.
    Inline {
        queue: Arc<Mutex<Inline>>,
        path: Arc<Path>,
    },
}

/// The writer of a simulated node: what the writer thread would hold.
struct Inline {
    /// Jobs queued since the task last wrote, in order.
    jobs: Vec<Job>,
    /// A task is writing the queued jobs, or about to.
    draining: bool,
    committed_written: Option<LogId<NodeId>>,
}

impl LogStore {
    /// Writes the simulated node's queued jobs, a batch at a time, as the writer thread would.
    async fn drain(self) {
        let Writer::Inline { queue, path } = &self.writer else {
            return;
        };
        loop {
            // Jobs queued at the same instant share a commit, as do those queued while the
            // disk stalls.
            tokio::task::yield_now().await;
            cellplane_api::simulation::disk_ready(path).await;
            let (batch, mut committed_written) = {
                let Ok(mut inline) = queue.lock() else {
                    return;
                };
                if inline.jobs.is_empty() {
                    inline.draining = false;
                    return;
                }
                (std::mem::take(&mut inline.jobs), inline.committed_written)
            };
            write_jobs(&self.shared(), &mut committed_written, batch);
            if let Ok(mut inline) = queue.lock() {
                inline.committed_written = committed_written;
            }
        }
    }
}

impl LogStore {
    /// Opens (or creates) the log of node `node_id` at `path` and starts its writer thread
    /// (none in a simulation, where the file is on the simulated host's disk).
    pub fn open(path: &Path, node_id: NodeId) -> Result<Self, redb::Error> {
        let db = if cellplane_api::simulation::active() {
            redb::Builder::new().create_with_backend(SimulatedDisk::open(path))?
        } else {
            Database::create(path)?
        };
        let txn = db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.commit()?;
        let db = Arc::new(db);
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let committed = Arc::new(Mutex::new(None));
        let disk_wait = DiskWait::default();
        let writer = if cellplane_api::simulation::active() {
            Writer::Inline {
                queue: Arc::new(Mutex::new(Inline {
                    jobs: Vec::new(),
                    draining: false,
                    committed_written: None,
                })),
                path: Arc::from(path),
            }
        } else {
            let (jobs, receiver) = mpsc::channel();
            let shared = Shared {
                db: db.clone(),
                pending: pending.clone(),
                committed: committed.clone(),
                disk_wait: disk_wait.clone(),
            };
            std::thread::Builder::new()
                .name("raft-log-writer".into())
                .spawn(move || run_writer(shared, receiver))
                .map_err(redb::Error::Io)?;
            Writer::Thread(jobs)
        };
        Ok(Self {
            node_id,
            db,
            pending,
            committed,
            writer,
            disk_wait,
        })
    }

    /// When the jobs the writer has not written yet were queued, for `Touch`.
    pub fn disk_wait(&self) -> DiskWait {
        self.disk_wait.clone()
    }

    fn shared(&self) -> Shared {
        Shared {
            db: self.db.clone(),
            pending: self.pending.clone(),
            committed: self.committed.clone(),
            disk_wait: self.disk_wait.clone(),
        }
    }

    fn pending(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<u64, Entry<TypeConfig>>>, AnyError> {
        self.pending
            .lock()
            .map_err(|_| AnyError::error("log overlay lock poisoned"))
    }

    fn send(&self, job: Job) -> Result<(), AnyError> {
        self.disk_wait.queued(tokio::time::Instant::now());
        match &self.writer {
            Writer::Thread(jobs) => jobs
                .send(job)
                .map_err(|_| AnyError::error("raft log writer stopped")),
            Writer::Inline { queue, .. } => {
                let mut queued = queue
                    .lock()
                    .map_err(|_| AnyError::error("raft log writer lock poisoned"))?;
                queued.jobs.push(job);
                if !queued.draining {
                    queued.draining = true;
                    tokio::spawn(self.clone().drain());
                }
                Ok(())
            }
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = txn.open_table(META).map_err(redb_error)?;
        let Some(value) = table.get(key).map_err(redb_error)? else {
            return Ok(None);
        };
        codec::decode(value.value())
            .map(Some)
            .map_err(|e| AnyError::new(&e))
    }

    /// Queues a meta value behind every earlier write; when `durable`, waits until it is on disk.
    /// Going through the writer keeps RaftCore from ever waiting on redb's write lock while an
    /// fsync holds it.
    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durable: bool,
    ) -> Result<(), AnyError> {
        let bytes = codec::encode(value).map_err(|e| AnyError::new(&e))?;
        if !durable {
            return self.send(Job::SaveMeta {
                key,
                bytes,
                done: None,
            });
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Job::SaveMeta {
            key,
            bytes,
            done: Some(done),
        })?;
        Self::wait(wait).await
    }

    async fn wait(
        done: tokio::sync::oneshot::Receiver<Result<(), String>>,
    ) -> Result<(), AnyError> {
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(AnyError::error(message)),
            Err(_) => Err(AnyError::error("raft log writer stopped")),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let txn = self.db.begin_read().map_err(redb_error)?;
            let table = txn.open_table(LOGS).map_err(redb_error)?;
            let mut entries = Vec::new();
            for item in table
                .range::<u64>((range.start_bound().cloned(), range.end_bound().cloned()))
                .map_err(redb_error)?
            {
                let (_, value) = item.map_err(redb_error)?;
                let entry: Entry<TypeConfig> =
                    codec::decode(value.value()).map_err(|e| AnyError::new(&e))?;
                entries.push(entry);
            }
            // Entries not yet written win over what is on disk at the same index.
            let pending = self.pending()?;
            let unwritten =
                pending.range((range.start_bound().cloned(), range.end_bound().cloned()));
            let mut merged: BTreeMap<u64, Entry<TypeConfig>> =
                entries.into_iter().map(|e| (e.log_id.index, e)).collect();
            for (index, entry) in unwritten {
                merged.insert(*index, entry.clone());
            }
            Ok(merged.into_values().collect())
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }

    /// What replication sends: entries that follow on from `start` exactly, or none. openraft
    /// sends what this returns after the log id before `start`, so entries from a later index
    /// (the range began in the purged part, or raced a purge) would reach a follower as if
    /// they followed on — a follower whose disk was wiped would take them with no log before
    /// them. With nothing read, openraft sends a heartbeat and then the snapshot.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let entries = self.try_get_log_entries(start..end).await?;
        if entries
            .first()
            .is_some_and(|first| first.log_id.index != start)
        {
            return Ok(Vec::new());
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>, AnyError> {
            let last_purged_log_id: Option<LogId<NodeId>> = self.read_meta(PURGED)?;
            let txn = self.db.begin_read().map_err(redb_error)?;
            let table = txn.open_table(LOGS).map_err(redb_error)?;
            let pending_last = self
                .pending()?
                .values()
                .next_back()
                .map(|e| *e.get_log_id());
            let last = match (pending_last, table.last().map_err(redb_error)?) {
                (Some(log_id), _) => Some(log_id),
                (None, Some((_, value))) => {
                    let entry: Entry<TypeConfig> =
                        codec::decode(value.value()).map_err(|e| AnyError::new(&e))?;
                    Some(*entry.get_log_id())
                }
                (None, None) => last_purged_log_id,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last,
            })
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.write_meta(VOTE, vote, true)
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        let stored: Option<Vote<NodeId>> =
            self.read_meta(VOTE).map_err(StorageIOError::read_vote)?;
        Ok(stored.map(|vote| vote_after_restart(vote, self.node_id)))
    }

    /// The commit index may lag on disk: the writer stores it with its next batch, and a node
    /// that restarts with an older one re-applies only what it learns is committed again.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        *self
            .committed
            .lock()
            .map_err(|_| StorageIOError::write(AnyError::error("commit index lock poisoned")))? =
            committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        self.read_meta::<Option<LogId<NodeId>>>(COMMITTED)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let mut pending = self.pending().map_err(StorageIOError::write_logs)?;
        for entry in entries {
            let bytes =
                codec::encode(&entry).map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
            encoded.push((entry.log_id, bytes));
            pending.insert(entry.log_id.index, entry);
        }
        drop(pending);
        self.send(Job::Append {
            entries: encoded,
            callback,
        })
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let _ = self
            .pending()
            .map_err(StorageIOError::write_logs)?
            .split_off(&log_id.index);
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Job::Truncate {
            from: log_id.index,
            done,
        })
        .map_err(StorageIOError::write_logs)?;
        Self::wait(wait)
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Job::Purge { upto: log_id, done })
            .map_err(StorageIOError::write_logs)?;
        Self::wait(wait)
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::{CommittedLeaderId, RaftLogReader};

    use super::*;

    #[tokio::test]
    async fn replication_reads_nothing_from_a_range_that_starts_in_the_purged_part() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = LogStore::open(&dir.path().join("log.redb"), 1).expect("open");
        let log_id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        {
            let txn = store.db.begin_write().expect("write");
            {
                let mut logs = txn.open_table(LOGS).expect("logs");
                for index in 6..=10 {
                    let entry = Entry::<TypeConfig>::new_blank(log_id(index));
                    let bytes = codec::encode(&entry).expect("encode");
                    logs.insert(index, bytes.as_slice()).expect("insert");
                }
                let mut meta = txn.open_table(META).expect("meta");
                let purged = codec::encode(&log_id(5)).expect("encode");
                meta.insert(PURGED, purged.as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let indexes = |entries: Vec<Entry<TypeConfig>>| -> Vec<u64> {
            entries.iter().map(|e| e.log_id.index).collect()
        };
        assert_eq!(
            indexes(store.limited_get_log_entries(0, 11).await.expect("read")),
            Vec::<u64>::new(),
            "replication never gets a suffix of a range whose start was purged"
        );
        assert_eq!(
            indexes(store.limited_get_log_entries(5, 8).await.expect("read")),
            Vec::<u64>::new()
        );
        assert_eq!(
            indexes(store.limited_get_log_entries(6, 9).await.expect("read")),
            vec![6, 7, 8]
        );
        // A plain read answers what is left of the range.
        assert_eq!(
            indexes(store.try_get_log_entries(0..11).await.expect("read")),
            vec![6, 7, 8, 9, 10]
        );
    }

    /// In a simulation the log is on the simulated disk, not the machine's, and what it
    /// reported durable survives a crash of the machine that throws away every write not
    /// synced; the dead process's handles write nothing after the crash.
    #[test]
    fn in_a_simulation_what_the_log_made_durable_survives_a_machine_crash() {
        std::thread::spawn(|| {
            cellplane_api::simulation::enter_on_this_thread();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("n2/raft.redb");
            let followed = Vote::new_committed(3, 1);
            let store = runtime.block_on(async {
                let mut store = LogStore::open(&path, 2).expect("open");
                store.save_vote(&followed).await.expect("save");
                store
            });
            assert!(!path.exists(), "the machine's disk is untouched");
            cellplane_api::simulation::files::crash(&dir.path().join("n2"), true);
            drop(store);
            runtime.block_on(async {
                let mut store = LogStore::open(&path, 2).expect("reopen after the crash");
                assert_eq!(store.read_vote().await.expect("read"), Some(followed));
            });
        })
        .join()
        .expect("the test's thread");
    }

    /// openraft reads the vote once, when the node starts.
    #[tokio::test]
    async fn a_leader_restarts_as_a_follower_of_the_same_term() {
        let dir = tempfile::tempdir().expect("temp dir");
        let led = Vote::new_committed(7, 1);
        let mut leader = LogStore::open(&dir.path().join("leader.redb"), 1).expect("open");
        leader.save_vote(&led).await.expect("save");
        let restarted = leader.read_vote().await.expect("read").expect("a vote");
        assert_eq!(restarted, Vote::new(7, 1), "same term and candidate");
        assert!(!restarted.is_committed(), "no leadership resumed");

        // Node 2 followed node 1: it keeps the committed vote, and so its leader lease.
        let mut follower = LogStore::open(&dir.path().join("follower.redb"), 2).expect("open");
        follower.save_vote(&led).await.expect("save");
        assert_eq!(follower.read_vote().await.expect("read"), Some(led));
    }
}
