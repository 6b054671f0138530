//! The snapshot file: the whole state machine, streamed as length-prefixed postcard frames.
//!
//! Frames hold chunks of records, so writing ten million tenants needs neither one huge buffer
//! nor one allocation per tenant. The file ends with a frame that counts what came before, so a
//! truncated file is refused rather than installed as a smaller state.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imbl::{OrdMap, Vector};
use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::NodeId;
use super::codec::{self, CodecError};
use crate::audit::entry::{AuditEntry, AuditId};
use crate::failover::record::{FailoverRecord, HaltRecord, LeaseRecord};
use crate::migration::record::MigrationRecord;
use crate::state::history::{History, RouteEvent};
use crate::state::model::{
    CellRecord, OverrideRecord, ProtectionRecord, ReplicationHealth, TenantRecord,
};
use crate::state::{ControlState, OverrideKey, Parts};

const MAGIC: &[u8; 8] = b"CPSNAP02";

/// Records per frame: large enough to amortize framing, small enough to keep buffers small.
const CHUNK_RECORDS: usize = 4096;

/// Largest frame a reader accepts, so a corrupt length cannot ask for gigabytes.
const MAX_FRAME_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot encoding: {0}")]
    Codec(#[from] CodecError),
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Serialize, Deserialize)]
struct Header {
    meta: SnapshotMeta<NodeId, BasicNode>,
    revision: u64,
    compacted_revision: u64,
}

#[derive(Default, Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Counts {
    cells: u64,
    tenants: u64,
    overrides: u64,
    migrations: u64,
    retired: u64,
    events: u64,
}

#[derive(Serialize, Deserialize)]
enum Frame {
    Header(Header),
    Cells(Vec<(Arc<str>, CellRecord)>),
    Tenants(Vec<(Arc<str>, TenantRecord)>),
    Overrides(Vec<(OverrideKey, OverrideRecord)>),
    Migrations(Vec<(u64, MigrationRecord)>),
    Retired(Vec<(Arc<str>, u64)>),
    Events(Vec<RouteEvent>),
    End(Counts),
    /// Primaries' protection: after the frames above in the enum so that snapshots written
    /// before it existed still read; written before `End`, outside its counts.
    Protection(Vec<(Arc<str>, ProtectionRecord)>),
    /// Cells' replication as their agents reported it; like `Protection`.
    Replication(Vec<(Arc<str>, ReplicationHealth)>),
    /// Cells' lease renewals; like `Protection`.
    Leases(Vec<(Arc<str>, LeaseRecord)>),
    /// Failovers; like `Protection`.
    Failovers(Vec<(u64, FailoverRecord)>),
    /// Automatic failover stopped by a storm; like `Protection`, written only when set.
    FailoverHalt(HaltRecord),
    /// The audit log; like `Protection`.
    Audit(Vec<(AuditId, AuditEntry)>),
}

struct FrameWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    fn write(&mut self, frame: &Frame) -> Result<(), SnapshotError> {
        self.buf.clear();
        codec::encode_into(frame, &mut self.buf)?;
        let len = u32::try_from(self.buf.len())
            .map_err(|_| SnapshotError::Corrupt("frame over 4 GiB".into()))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&self.buf)?;
        Ok(())
    }

    fn chunks<T: Clone, I: Iterator<Item = T>>(
        &mut self,
        items: I,
        wrap: impl Fn(Vec<T>) -> Frame,
    ) -> Result<u64, SnapshotError> {
        let mut count = 0u64;
        let mut chunk = Vec::with_capacity(CHUNK_RECORDS);
        for item in items {
            chunk.push(item);
            count += 1;
            if chunk.len() == CHUNK_RECORDS {
                self.write(&wrap(std::mem::take(&mut chunk)))?;
            }
        }
        if !chunk.is_empty() {
            self.write(&wrap(chunk))?;
        }
        Ok(count)
    }
}

static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name beside `path`, unique within the process so a snapshot being built and
/// one being installed never share a scratch file. Leftovers end in `.tmp` and are removed when a
/// node opens its snapshot directory.
pub fn scratch_path(path: &Path) -> PathBuf {
    let n = SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_extension(format!("{n}.tmp"))
}

/// Writes `state` to `path` atomically: a temporary file, fsynced, then renamed.
pub fn write(
    path: &Path,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    state: &ControlState,
) -> Result<(), SnapshotError> {
    let tmp = scratch_path(path);
    let file = File::create(&tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(MAGIC)?;
    let mut writer = FrameWriter {
        out,
        buf: Vec::new(),
    };
    writer.write(&Frame::Header(Header {
        meta: meta.clone(),
        revision: state.revision(),
        compacted_revision: state.compacted_revision(),
    }))?;
    let counts = Counts {
        cells: writer.chunks(
            state.cells().iter().map(|(k, v)| (k.clone(), v.clone())),
            Frame::Cells,
        )?,
        tenants: writer.chunks(
            state.tenants().iter().map(|(k, v)| (k.clone(), v.clone())),
            Frame::Tenants,
        )?,
        overrides: writer.chunks(
            state
                .overrides()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
            Frame::Overrides,
        )?,
        migrations: writer.chunks(
            state.migrations().iter().map(|(k, v)| (*k, v.clone())),
            Frame::Migrations,
        )?,
        retired: writer.chunks(
            state.retired().iter().map(|(k, v)| (k.clone(), *v)),
            Frame::Retired,
        )?,
        events: writer.chunks(state.history().events().iter().cloned(), Frame::Events)?,
    };
    writer.chunks(
        state.protection().iter().map(|(k, v)| (k.clone(), *v)),
        Frame::Protection,
    )?;
    writer.chunks(
        state.leases().iter().map(|(k, v)| (k.clone(), *v)),
        Frame::Leases,
    )?;
    writer.chunks(
        state.failovers().iter().map(|(k, v)| (*k, v.clone())),
        Frame::Failovers,
    )?;
    writer.chunks(
        state
            .replication()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
        Frame::Replication,
    )?;
    if let Some(halt) = state.failover_halt() {
        writer.write(&Frame::FailoverHalt(halt.clone()))?;
    }
    writer.chunks(
        state.audit().iter().map(|(k, v)| (*k, v.clone())),
        Frame::Audit,
    )?;
    writer.write(&Frame::End(counts))?;
    let file = writer
        .out
        .into_inner()
        .map_err(|e| SnapshotError::Io(e.into_error()))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads only the header, to learn what a snapshot file holds.
pub fn read_meta(path: &Path) -> Result<SnapshotMeta<NodeId, BasicNode>, SnapshotError> {
    let mut reader = FrameReader::open(File::open(path)?)?;
    match reader.next()? {
        Some(Frame::Header(header)) => Ok(header.meta),
        _ => Err(SnapshotError::Corrupt("missing header".into())),
    }
}

/// Reads a whole snapshot back into a state, interning cell and region ids so millions of
/// tenants share one copy of each.
pub fn read(
    input: impl Read,
) -> Result<(SnapshotMeta<NodeId, BasicNode>, ControlState), SnapshotError> {
    let mut reader = FrameReader::open(input)?;
    let Some(Frame::Header(header)) = reader.next()? else {
        return Err(SnapshotError::Corrupt("missing header".into()));
    };
    let mut cells: OrdMap<Arc<str>, CellRecord> = OrdMap::new();
    let mut tenants: OrdMap<Arc<str>, TenantRecord> = OrdMap::new();
    let mut overrides: OrdMap<OverrideKey, OverrideRecord> = OrdMap::new();
    let mut migrations: OrdMap<u64, MigrationRecord> = OrdMap::new();
    let mut retired: OrdMap<Arc<str>, u64> = OrdMap::new();
    let mut protection: OrdMap<Arc<str>, ProtectionRecord> = OrdMap::new();
    let mut replication: OrdMap<Arc<str>, ReplicationHealth> = OrdMap::new();
    let mut leases: OrdMap<Arc<str>, LeaseRecord> = OrdMap::new();
    let mut failovers: OrdMap<u64, FailoverRecord> = OrdMap::new();
    let mut failover_halt = None;
    let mut audit: OrdMap<AuditId, AuditEntry> = OrdMap::new();
    let mut events: Vector<RouteEvent> = Vector::new();
    let mut regions: HashSet<Arc<str>> = HashSet::new();
    let mut seen = Counts::default();
    let intern_cell = |cells: &OrdMap<Arc<str>, CellRecord>, id: Arc<str>| {
        cells
            .get_key_value(&id)
            .map(|(k, _)| k.clone())
            .unwrap_or(id)
    };
    loop {
        match reader.next()? {
            Some(Frame::Cells(chunk)) => {
                seen.cells += chunk.len() as u64;
                cells.extend(chunk);
            }
            Some(Frame::Tenants(chunk)) => {
                seen.tenants += chunk.len() as u64;
                for (tenant_id, mut record) in chunk {
                    record.primary_cell = intern_cell(&cells, record.primary_cell);
                    record.home_region = match regions.get(&record.home_region) {
                        Some(region) => region.clone(),
                        None => {
                            regions.insert(record.home_region.clone());
                            record.home_region
                        }
                    };
                    tenants.insert(tenant_id, record);
                }
            }
            Some(Frame::Overrides(chunk)) => {
                seen.overrides += chunk.len() as u64;
                for (key, mut record) in chunk {
                    record.cell_id = intern_cell(&cells, record.cell_id);
                    overrides.insert(key, record);
                }
            }
            Some(Frame::Migrations(chunk)) => {
                seen.migrations += chunk.len() as u64;
                migrations.extend(chunk);
            }
            Some(Frame::Retired(chunk)) => {
                seen.retired += chunk.len() as u64;
                retired.extend(chunk);
            }
            Some(Frame::Events(chunk)) => {
                seen.events += chunk.len() as u64;
                events.extend(chunk);
            }
            Some(Frame::Protection(chunk)) => protection.extend(chunk),
            Some(Frame::Replication(chunk)) => replication.extend(chunk),
            Some(Frame::Leases(chunk)) => leases.extend(chunk),
            Some(Frame::Failovers(chunk)) => failovers.extend(chunk),
            Some(Frame::FailoverHalt(halt)) => failover_halt = Some(halt),
            Some(Frame::Audit(chunk)) => audit.extend(chunk),
            Some(Frame::End(counts)) => {
                if counts != seen {
                    return Err(SnapshotError::Corrupt(format!(
                        "end frame counts {counts:?} but the file held {seen:?}"
                    )));
                }
                break;
            }
            Some(Frame::Header(_)) => {
                return Err(SnapshotError::Corrupt("second header".into()));
            }
            None => return Err(SnapshotError::Corrupt("truncated: no end frame".into())),
        }
    }
    let state = ControlState::from_parts(Parts {
        revision: header.revision,
        cells,
        tenants,
        overrides,
        migrations,
        retired,
        protection,
        replication,
        leases,
        failovers,
        failover_halt,
        audit,
        history: History::from_parts(events, header.compacted_revision),
    });
    Ok((header.meta, state))
}

struct FrameReader<R: Read> {
    input: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    fn open(file: R) -> Result<Self, SnapshotError> {
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(SnapshotError::Corrupt("not a cellplane snapshot".into()));
        }
        Ok(Self {
            input,
            buf: Vec::new(),
        })
    }

    fn next(&mut self) -> Result<Option<Frame>, SnapshotError> {
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(SnapshotError::Corrupt(format!("frame of {len} bytes")));
        }
        // Read what is there rather than allocate what the header claims: a corrupt length
        // costs no more memory than the file holds.
        self.buf.clear();
        (&mut self.input)
            .take(len as u64)
            .read_to_end(&mut self.buf)?;
        if self.buf.len() < len {
            return Err(SnapshotError::Corrupt(format!(
                "truncated: a frame of {len} bytes holds {}",
                self.buf.len()
            )));
        }
        Ok(Some(codec::decode(&self.buf)?))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, StoredMembership};

    use super::*;
    use crate::state::command::Command;
    use crate::state::model::{CellState, RouteKey, Tier};

    fn sample_state() -> ControlState {
        let mut state = ControlState::default();
        for (cell, zone) in [("cell-a", "a"), ("cell-b", "b")] {
            let commands = [
                Command::RegisterCell {
                    cell_id: Arc::from(cell),
                    region: Arc::from("hz"),
                    zone: Arc::from(zone),
                    tier: Tier::Low,
                    endpoint: Arc::from("127.0.0.1:9000"),
                    capacity: 1_000_000,
                    standby_of: None,
                },
                Command::SetCellState {
                    cell_id: Arc::from(cell),
                    state: CellState::Active,
                },
            ];
            for command in commands {
                state.apply(&command).0.expect("apply");
            }
        }
        for i in 0..10_000 {
            state
                .apply(&Command::CreateTenant {
                    tenant_id: Arc::from(format!("tenant-{i:05}")),
                    tier: Tier::Low,
                    home_region: Arc::from("hz"),
                })
                .0
                .expect("create");
        }
        let other_cell = match state
            .tenants()
            .get("tenant-00007")
            .map(|t| t.primary_cell.clone())
        {
            Some(cell) if &*cell == "cell-a" => "cell-b",
            _ => "cell-a",
        };
        state
            .apply(&Command::MoveRoute {
                key: RouteKey::conversation("tenant-00007", "group"),
                expected_epoch: 1,
                target_cell: Arc::from(other_cell),
            })
            .0
            .expect("override");
        state
            .apply(&Command::RecordProtection {
                cell_id: Arc::from("cell-a"),
                protection: crate::state::model::Protection::Degraded,
            })
            .0
            .expect("protection");
        state
            .apply(&Command::Report {
                cell_id: Arc::from("cell-b"),
                health: Default::default(),
                replication: Some(crate::state::model::ReplicationHealth {
                    standbys: Vec::new(),
                    replica: Some(crate::state::model::ReplicaHealth {
                        applied_lsn: 7,
                        ..Default::default()
                    }),
                }),
            })
            .0
            .expect("report");
        // A NORMAL primary failed over to its standby, with leases renewed before.
        for (cell, zone, standby_of) in [("cell-n", "a", None), ("cell-s", "b", Some("cell-n"))] {
            state
                .apply(&Command::RegisterCell {
                    cell_id: Arc::from(cell),
                    region: Arc::from("hz"),
                    zone: Arc::from(zone),
                    tier: Tier::Normal,
                    endpoint: Arc::from("127.0.0.1:9001"),
                    capacity: 10,
                    standby_of: standby_of.map(Arc::from),
                })
                .0
                .expect("register");
            state
                .apply(&Command::SetCellState {
                    cell_id: Arc::from(cell),
                    state: CellState::Active,
                })
                .0
                .expect("activate");
        }
        state
            .apply(&Command::RenewLeases {
                cells: vec![Arc::from("cell-a"), Arc::from("cell-n")],
                lease_ms: 2_000,
            })
            .0
            .expect("renew");
        state
            .apply(&Command::StartFailover {
                cell_id: Arc::from("cell-n"),
                standby: None,
                mode: crate::failover::record::Mode::Forced,
                reason: "sample".into(),
                automatic: false,
                expected_renewals: None,
                now_ms: 1,
            })
            .0
            .expect("failover");
        state
            .apply(&Command::HaltAutomaticFailover {
                cells: vec![Arc::from("cell-a")],
                now_ms: 2,
            })
            .0
            .expect("halt");
        state
            .apply(&Command::Audit {
                entries: vec![crate::audit::entry::AuditEntry {
                    at_ms: 3,
                    identity: Arc::from("ops"),
                    peer: Arc::from("127.0.0.1:9"),
                    method: Arc::from("Control/FailoverCell"),
                    request: "{ cell_id: \"cell-n\" }".into(),
                    code: 0,
                    message: String::new(),
                    node_id: 1,
                }],
                keep: 10,
            })
            .0
            .expect("audit");
        state
    }

    fn meta() -> SnapshotMeta<NodeId, BasicNode> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 10_010)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-10010".into(),
        }
    }

    #[test]
    fn a_written_snapshot_reads_back_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snap");
        let state = sample_state();
        write(&path, &meta(), &state).expect("write");
        assert_eq!(read_meta(&path).expect("meta").snapshot_id, "2-10010");
        let (read_back_meta, read_back) = read(File::open(&path).expect("open")).expect("read");
        assert_eq!(read_back_meta.last_log_id, meta().last_log_id);
        assert_eq!(read_back.revision(), state.revision());
        assert_eq!(read_back.cells(), state.cells());
        assert_eq!(read_back.tenants(), state.tenants());
        assert_eq!(read_back.overrides(), state.overrides());
        assert_eq!(read_back.protection(), state.protection());
        assert_eq!(read_back.protection().len(), 1);
        assert_eq!(read_back.replication(), state.replication());
        assert_eq!(read_back.replication().len(), 1);
        assert_eq!(read_back.leases(), state.leases());
        assert_eq!(read_back.leases().len(), 2);
        assert_eq!(read_back.failovers(), state.failovers());
        assert_eq!(read_back.failovers().len(), 1);
        assert_eq!(read_back.failover_halt(), state.failover_halt());
        assert!(read_back.failover_halt().is_some());
        assert_eq!(read_back.audit(), state.audit());
        assert_eq!(read_back.audit().len(), 1);
        assert_eq!(read_back.history(), state.history());
        // Interning: every tenant on cell-a shares the cell map's id.
        let cell_key = read_back
            .cells()
            .get_key_value("cell-a")
            .map(|(k, _)| k.clone());
        let tenant_cell = read_back
            .tenants()
            .get("tenant-00000")
            .map(|t| t.primary_cell.clone());
        assert!(Arc::ptr_eq(
            &cell_key.expect("cell"),
            &tenant_cell.expect("tenant")
        ));
    }

    #[test]
    fn a_truncated_snapshot_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snap");
        write(&path, &meta(), &sample_state()).expect("write");
        let len = std::fs::metadata(&path).expect("metadata").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(len - 10).expect("truncate");
        assert!(read(File::open(&path).expect("open")).is_err());
    }
}
