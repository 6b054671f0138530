//! The durable Raft log, vote and commit index, in one redb file.
//!
//! Every append is one redb transaction committed with an fsync before openraft is told the
//! entries are durable, so an acknowledged write survives a crash. openraft hands over all the
//! entries queued since the last append in one call, so concurrent writes share one fsync.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::codec;
use super::{NodeId, TypeConfig};

/// Log entries by index, postcard-encoded.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
/// Vote, last purged log id and commit index.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const PURGED: &str = "last_purged";
const COMMITTED: &str = "committed";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The log store of one node. Clones share the database; the clone handed to openraft as the
/// log reader reads through its own transactions.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn redb_error(err: impl Into<redb::Error>) -> AnyError {
    AnyError::new(&err.into())
}

impl LogStore {
    /// Opens (or creates) the log in `path`.
    pub fn open(path: &Path) -> Result<Self, redb::Error> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
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

    /// Writes one meta value; `durable` decides whether the commit waits for an fsync.
    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durable: bool,
    ) -> Result<(), AnyError> {
        let bytes = codec::encode(value).map_err(|e| AnyError::new(&e))?;
        let db = self.db.clone();
        run_blocking(move || {
            let mut txn = db.begin_write().map_err(redb_error)?;
            if !durable {
                txn.set_durability(Durability::None)
                    .map_err(|e| AnyError::error(e.to_string()))?;
            }
            {
                let mut table = txn.open_table(META).map_err(redb_error)?;
                table.insert(key, bytes.as_slice()).map_err(redb_error)?;
            }
            txn.commit().map_err(redb_error)
        })
        .await
    }
}

/// Runs blocking redb work off the async workers, so an fsync never stalls other requests.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AnyError> + Send + 'static,
) -> Result<T, AnyError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AnyError::error(format!("storage task failed: {e}")))?
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
                entries.push(codec::decode(value.value()).map_err(|e| AnyError::new(&e))?);
            }
            Ok(entries)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>, AnyError> {
            let last_purged_log_id: Option<LogId<NodeId>> = self.read_meta(PURGED)?;
            let txn = self.db.begin_read().map_err(redb_error)?;
            let table = txn.open_table(LOGS).map_err(redb_error)?;
            let last = match table.last().map_err(redb_error)? {
                Some((_, value)) => {
                    let entry: Entry<TypeConfig> =
                        codec::decode(value.value()).map_err(|e| AnyError::new(&e))?;
                    Some(*entry.get_log_id())
                }
                None => last_purged_log_id,
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
        self.read_meta(VOTE)
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    /// The commit index may lag on disk: a later durable append carries it, and a node that
    /// restarts with an older one only re-applies entries it learns are committed again.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.write_meta(COMMITTED, &committed, false)
            .await
            .map_err(|e| StorageIOError::write(e).into())
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
        for entry in entries {
            let bytes =
                codec::encode(&entry).map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let db = self.db.clone();
        let written = run_blocking(move || {
            let txn = db.begin_write().map_err(redb_error)?;
            {
                let mut table = txn.open_table(LOGS).map_err(redb_error)?;
                for (index, bytes) in &encoded {
                    table.insert(index, bytes.as_slice()).map_err(redb_error)?;
                }
            }
            txn.commit().map_err(redb_error)
        })
        .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(err) => {
                callback.log_io_completed(Err(std::io::Error::other(err.to_string())));
                Err(StorageIOError::write_logs(err).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        run_blocking(move || {
            let txn = db.begin_write().map_err(redb_error)?;
            {
                let mut table = txn.open_table(LOGS).map_err(redb_error)?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(redb_error)?;
            }
            txn.commit().map_err(redb_error)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let bytes =
            codec::encode(&log_id).map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        let db = self.db.clone();
        run_blocking(move || {
            let txn = db.begin_write().map_err(redb_error)?;
            {
                let mut meta = txn.open_table(META).map_err(redb_error)?;
                meta.insert(PURGED, bytes.as_slice()).map_err(redb_error)?;
                let mut table = txn.open_table(LOGS).map_err(redb_error)?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(redb_error)?;
            }
            txn.commit().map_err(redb_error)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
