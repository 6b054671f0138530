//! The Raft state machine: applies committed commands to the in-memory [`ControlState`], builds
//! and installs snapshot files, and feeds route events to watches.
//!
//! The state lives behind a read-write lock held only for the length of an apply batch or a
//! query. Building a snapshot clones the persistent maps under the read lock (O(1)) and writes
//! the file on a blocking thread, so reads and applies go on while ten million tenants are
//! written out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use tokio::io::AsyncSeekExt;

use super::snapshot::{self, SnapshotError};
use super::{NodeId, TypeConfig};
use crate::state::ControlState;
use crate::state::command::{Applied, CommandBatch};
use crate::store::view::{MachineState, SharedState, WatchBatch, WatchSignal};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Snapshot files in one directory, named by the last log index they contain.
#[derive(Debug, Clone)]
struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    fn path_for(&self, meta: &SnapshotMeta<NodeId, BasicNode>) -> PathBuf {
        let index = meta.last_log_id.map(|id| id.index).unwrap_or_default();
        self.dir.join(format!("snapshot-{index:020}.snap"))
    }

    /// The newest complete snapshot file, if any.
    fn latest(&self) -> std::io::Result<Option<PathBuf>> {
        let mut newest: Option<PathBuf> = None;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_snapshot = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".snap"));
            if is_snapshot && newest.as_ref().is_none_or(|best| path > *best) {
                newest = Some(path);
            }
        }
        Ok(newest)
    }

    /// Removes every snapshot older than `keep`. Readers that still hold an older file open
    /// (a transfer to a follower) keep reading it.
    fn prune(&self, keep: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with("snapshot-") && name.ends_with(".snap") && path.as_path() < keep {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Removes scratch files a crash left behind; only safe before anything writes here.
    fn remove_leftovers(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "tmp") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// openraft's handle on the state machine.
pub struct StateMachineStore {
    shared: Arc<SharedState>,
    snapshots: SnapshotDir,
}

impl StateMachineStore {
    /// Opens the state machine from the newest snapshot in `dir` (or empty), returning the store
    /// for openraft and the shared state for the services. openraft then re-applies the
    /// committed log after the snapshot.
    pub fn open(dir: &Path) -> Result<(Self, Arc<SharedState>), SnapshotError> {
        std::fs::create_dir_all(dir)?;
        let snapshots = SnapshotDir {
            dir: dir.to_path_buf(),
        };
        snapshots.remove_leftovers()?;
        let machine = match snapshots.latest()? {
            Some(path) => {
                let (meta, control) = snapshot::read(std::fs::File::open(&path)?)?;
                tracing::info!(
                    snapshot = %path.display(),
                    revision = control.revision(),
                    tenants = control.tenants().len(),
                    "loaded state machine snapshot"
                );
                snapshots.prune(&path)?;
                MachineState {
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership,
                    control,
                    ..Default::default()
                }
            }
            None => MachineState::default(),
        };
        let shared = Arc::new(SharedState::new(machine));
        Ok((
            Self {
                shared: shared.clone(),
                snapshots,
            },
            shared,
        ))
    }
}

fn snapshot_error(err: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::new(&err)).into()
}

/// Builds snapshot files from a point-in-time clone of the state.
pub struct SnapshotBuilder {
    shared: Arc<SharedState>,
    snapshots: SnapshotDir,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let source = self.shared.snapshot();
        let meta = SnapshotMeta {
            last_log_id: source.last_applied,
            last_membership: source.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                source.last_applied.map(|id| id.index).unwrap_or_default(),
                source.control.revision()
            ),
        };
        let path = self.snapshots.path_for(&meta);
        let snapshots = self.snapshots.clone();
        let started = std::time::Instant::now();
        let write_meta = meta.clone();
        let written = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SnapshotError> {
            snapshot::write(&written, &write_meta, &source.control)?;
            snapshots.prune(&written)?;
            Ok(())
        })
        .await
        .map_err(snapshot_error)?
        .map_err(snapshot_error)?;
        metrics::histogram!("cellplane_snapshot_build_seconds").record(started.elapsed());
        tracing::info!(snapshot = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "built snapshot");
        let file = tokio::fs::File::open(&path).await.map_err(snapshot_error)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let machine = self
            .shared
            .machine
            .read()
            .expect("state lock poisoned: an apply panicked");
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut machine = self
            .shared
            .machine
            .write()
            .expect("state lock poisoned: an apply panicked");
        for entry in entries {
            if let Some(last) = machine.last_applied {
                assert!(entry.log_id.index > last.index, "log applied out of order");
            }
            machine.last_applied = Some(entry.log_id);
            let applied = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(CommandBatch(commands)) => {
                    let mut results = Vec::with_capacity(commands.len());
                    for command in &commands {
                        let (result, events) = machine.control.apply(command);
                        let ok = if result.is_ok() { "true" } else { "false" };
                        metrics::counter!(
                            "cellplane_commands_applied_total",
                            "command" => command.kind(),
                            "ok" => ok
                        )
                        .increment(1);
                        // Every applied command is announced, with its route events or none,
                        // so watchers learn the revision moved. No receivers is normal.
                        if result.is_ok() {
                            let batch = WatchBatch {
                                revision: machine.control.revision(),
                                events,
                            };
                            let _ = self
                                .shared
                                .watch_tx
                                .send(WatchSignal::Batch(Arc::new(batch)));
                        }
                        results.push(result);
                    }
                    results
                }
                EntryPayload::Membership(membership) => {
                    machine.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
            };
            results.push(Applied(applied));
        }
        metrics::gauge!("cellplane_revision").set(machine.control.revision() as f64);
        if let Some(last) = machine.last_applied {
            metrics::gauge!("cellplane_raft_applied_index").set(last.index as f64);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        // An anonymous file: a transfer that is abandoned leaves nothing behind.
        let file = tempfile::tempfile_in(&self.snapshots.dir).map_err(snapshot_error)?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let mut received = *snapshot;
        received
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(snapshot_error)?;
        let mut received = received.into_std().await;
        let path = self.snapshots.path_for(meta);
        let scratch = snapshot::scratch_path(&path);
        let snapshots = self.snapshots.clone();
        let expected = meta.last_log_id;
        let (file_meta, control) = tokio::task::spawn_blocking(
            move || -> Result<(SnapshotMeta<NodeId, BasicNode>, ControlState), SnapshotError> {
                // Keep the received bytes as this node's own snapshot, then load from it.
                let mut out = std::fs::File::create(&scratch)?;
                std::io::copy(&mut received, &mut out)?;
                out.sync_all()?;
                std::fs::rename(&scratch, &path)?;
                let loaded = snapshot::read(std::fs::File::open(&path)?)?;
                if loaded.0.last_log_id != expected {
                    return Err(SnapshotError::Corrupt(format!(
                        "snapshot file covers {:?}, the leader announced {expected:?}",
                        loaded.0.last_log_id
                    )));
                }
                snapshots.prune(&path)?;
                Ok(loaded)
            },
        )
        .await
        .map_err(snapshot_error)?
        .map_err(snapshot_error)?;
        tracing::info!(snapshot_id = %file_meta.snapshot_id, revision = control.revision(), "installed snapshot");
        {
            let mut machine = self
                .shared
                .machine
                .write()
                .expect("state lock poisoned: an apply panicked");
            *machine = MachineState {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                control,
                ..Default::default()
            };
            let _ = self.shared.watch_tx.send(WatchSignal::Reset);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(path) = self.snapshots.latest().map_err(snapshot_error)? else {
            return Ok(None);
        };
        let read_path = path.clone();
        let meta = tokio::task::spawn_blocking(move || snapshot::read_meta(&read_path))
            .await
            .map_err(snapshot_error)?
            .map_err(snapshot_error)?;
        let file = tokio::fs::File::open(&path).await.map_err(snapshot_error)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}
