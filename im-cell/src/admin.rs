//! The `CellAdmin` gRPC service: grants, revocations and freezes from the control plane, and the
//! cell's status. Grant changes go through the writer, in order with the writes they fence.

use std::pin::Pin;
use tokio::time::Instant;

use cellplane_api::ids::{validate_id, validate_optional_id};
use cellplane_api::proto::cell as pb;
use cellplane_api::proto::cell::cell_admin_server::CellAdmin;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::CellError;
use crate::lease::Lease;
use crate::replication::ReplicationState;
use crate::replication::role::Role;
use crate::store::Store;
use crate::store::export::{
    EXPORT_CHUNK_BYTES, EXPORT_CHUNK_ITEMS, Excluded, ExportView, space_named,
};
use crate::store::fencing::{GrantChange, own_conversations};
use crate::store::merge::{Collector, MergeBatch, merged_so_far};
use crate::store::records::{LogRecord, decode};
use crate::store::writer::{Op, Outcome, Writer};

/// The longest lease a control plane may grant: a longer one would keep a failed cell's keys
/// unwritable for longer than any failover should take.
const MAX_LEASE_MS: u64 = 60_000;

pub type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

pub struct AdminService {
    cell_id: String,
    /// Whether this cell is a standby, and of which primary.
    role: Role,
    lease: Lease,
    store: Store,
    writer: Writer,
    replication: ReplicationState,
}

impl AdminService {
    /// Merges one batch; answers what the merge added to the key in all.
    async fn merge_batch(&self, epoch: u64, batch: MergeBatch) -> Result<u64, CellError> {
        match self.writer.submit(Op::Merge { epoch, batch }).await? {
            Outcome::Merged { total } => Ok(total),
            other => Err(CellError::Storage(format!(
                "the writer answered a merge with {other:?}"
            ))),
        }
    }

    pub fn new(
        cell_id: String,
        role: Role,
        lease: Lease,
        store: Store,
        writer: Writer,
        replication: ReplicationState,
    ) -> Self {
        Self {
            cell_id,
            role,
            lease,
            store,
            writer,
            replication,
        }
    }
}

fn route_key(tenant: &str, conversation: &str) -> Result<(), CellError> {
    validate_id("tenant_id", tenant)?;
    validate_optional_id("conversation_id", conversation)?;
    Ok(())
}

#[tonic::async_trait]
impl CellAdmin for AdminService {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        if r.epoch == 0 {
            return Err(CellError::invalid("epoch", "must be at least 1").into());
        }
        self.writer
            .submit(Op::Change {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                change: GrantChange::Grant { epoch: r.epoch },
            })
            .await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        // Empty: the key no longer exists anywhere (its tenant was deleted at `new_epoch`).
        validate_optional_id("new_cell_id", &r.new_cell_id)?;
        let change = if r.new_cell_id.is_empty() {
            GrantChange::Delete { epoch: r.new_epoch }
        } else if r.new_epoch == 0 {
            return Err(CellError::invalid(
                "new_epoch",
                "must be at least 1 when new_cell_id names the new owner",
            )
            .into());
        } else {
            GrantChange::Revoke {
                cell: r.new_cell_id,
                epoch: r.new_epoch,
            }
        };
        self.writer
            .submit(Op::Change {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                change,
            })
            .await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn freeze(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::FreezeResponse>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        match self
            .writer
            .submit(Op::Change {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                change: GrantChange::Freeze,
            })
            .await?
        {
            Outcome::Frozen { last_lsn } => Ok(Response::new(pb::FreezeResponse { last_lsn })),
            other => Err(Status::internal(format!(
                "unexpected writer outcome {other:?}"
            ))),
        }
    }

    async fn unfreeze(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        self.writer
            .submit(Op::Change {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                change: GrantChange::Unfreeze,
            })
            .await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn purge(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        let mut after = None;
        loop {
            let outcome = self
                .writer
                .submit(Op::Purge {
                    tenant: r.tenant_id.clone(),
                    conversation: r.conversation_id.clone(),
                    after,
                })
                .await?;
            match outcome {
                Outcome::Purged { next: Some(next) } => after = Some(next),
                _ => return Ok(Response::new(pb::AdminEmpty {})),
            }
        }
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        let view = ExportView::open(&self.store)?;
        let tail = r.from_lsn > 0 || r.log_only;
        let first = self.store.first_lsn()?;
        if tail && first > 1 && r.from_lsn + 1 < first {
            return Err(Status::out_of_range(format!(
                "from_lsn: the cell keeps its log from LSN {first}; {} is gone, copy a snapshot (from_lsn 0) instead",
                r.from_lsn + 1
            )));
        }
        let excluded: Excluded = if r.conversation_id.is_empty() {
            own_conversations(&self.writer.grants(), &r.tenant_id).collect()
        } else {
            Excluded::new()
        };
        let (out, chunks) = mpsc::channel(4);
        let source_cell_id = self.cell_id.clone();
        tokio::spawn(cellplane_api::simulation::produce(out, move |emit| {
            let empty = || pb::ExportChunk {
                tenant_id: r.tenant_id.clone(),
                conversation_id: r.conversation_id.clone(),
                source_cell_id: source_cell_id.clone(),
                ..Default::default()
            };
            let mut chunk = empty();
            let mut bytes = 0usize;
            let mut flush = |chunk: &mut pb::ExportChunk, bytes: &mut usize| {
                *bytes = 0;
                let full = std::mem::replace(chunk, empty());
                emit(Ok(full))
            };
            let result = if r.from_lsn == 0 && !r.log_only {
                view.rows(
                    &r.tenant_id,
                    &r.conversation_id,
                    &excluded,
                    |space, key, value| {
                        bytes += key.len() + value.len();
                        chunk.rows.push(pb::ExportRow {
                            space: space.to_string(),
                            key,
                            value,
                        });
                        let full =
                            chunk.rows.len() >= EXPORT_CHUNK_ITEMS || bytes >= EXPORT_CHUNK_BYTES;
                        !full || flush(&mut chunk, &mut bytes)
                    },
                )
            } else {
                view.log(
                    &r.tenant_id,
                    &r.conversation_id,
                    &excluded,
                    r.from_lsn,
                    |record| {
                        bytes += record.len();
                        chunk.log_records.push(record);
                        let full = chunk.log_records.len() >= EXPORT_CHUNK_ITEMS
                            || bytes >= EXPORT_CHUNK_BYTES;
                        !full || flush(&mut chunk, &mut bytes)
                    },
                )
            };
            match result {
                Ok(()) => {
                    chunk.through_lsn = view.through_lsn;
                    flush(&mut chunk, &mut bytes);
                }
                Err(err) => {
                    emit(Err(err.into()));
                }
            }
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(chunks))))
    }

    async fn import(
        &self,
        request: Request<Streaming<pb::ExportChunk>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let mut chunks = request.into_inner();
        let mut key: Option<(String, String)> = None;
        let mut source_lsn = 0;
        while let Some(chunk) = chunks.message().await? {
            route_key(&chunk.tenant_id, &chunk.conversation_id)?;
            validate_id("source_cell_id", &chunk.source_cell_id)?;
            let chunk_key = (chunk.tenant_id.clone(), chunk.conversation_id.clone());
            if key.get_or_insert_with(|| chunk_key.clone()) != &chunk_key {
                return Err(CellError::invalid(
                    "tenant_id",
                    "every chunk of one import must name the same key",
                )
                .into());
            }
            let mut rows = Vec::with_capacity(chunk.rows.len());
            for (i, row) in chunk.rows.into_iter().enumerate() {
                let space = space_named(&row.space).ok_or_else(|| {
                    CellError::invalid(
                        format!("rows[{i}].space"),
                        format!("{:?} is not an exported keyspace", row.space),
                    )
                })?;
                rows.push((space, row.key, row.value));
            }
            let mut records = Vec::with_capacity(chunk.log_records.len());
            for (i, bytes) in chunk.log_records.iter().enumerate() {
                let record: LogRecord = decode(bytes).map_err(|e| {
                    CellError::invalid(
                        format!("log_records[{i}]"),
                        format!("is not a cell-log record: {e}"),
                    )
                })?;
                let belongs = record.tenant_id == chunk_key.0
                    && (chunk_key.1.is_empty() || record.conversation_id == chunk_key.1);
                if !belongs {
                    return Err(CellError::invalid(
                        format!("log_records[{i}]"),
                        format!(
                            "belongs to {}/{}, not the imported key",
                            record.tenant_id, record.conversation_id
                        ),
                    )
                    .into());
                }
                records.push(record);
            }
            let outcome = self
                .writer
                .submit(Op::Import {
                    tenant: chunk_key.0,
                    conversation: chunk_key.1,
                    source: chunk.source_cell_id,
                    rows,
                    records,
                    through_lsn: chunk.through_lsn,
                })
                .await?;
            if let Outcome::Imported { source_lsn: lsn } = outcome {
                source_lsn = lsn;
            }
        }
        Ok(Response::new(pb::ImportResponse { source_lsn }))
    }

    async fn merge(
        &self,
        request: Request<Streaming<pb::MergeChunk>>,
    ) -> Result<Response<pb::MergeResponse>, Status> {
        let mut chunks = request.into_inner();
        // (merge id, epoch, tenant, conversation) of the first chunk; every other must match.
        let mut call: Option<(String, u64, String, String)> = None;
        let mut collector: Option<Collector> = None;
        let mut merged = None;
        while let Some(chunk) = chunks.message().await? {
            validate_id("merge_id", &chunk.merge_id).map_err(CellError::from)?;
            if chunk.epoch == 0 {
                return Err(CellError::invalid("epoch", "must be at least 1").into());
            }
            let export = chunk
                .export
                .ok_or_else(|| CellError::invalid("export", "is required"))?;
            route_key(&export.tenant_id, &export.conversation_id)?;
            if !export.log_records.is_empty() {
                return Err(CellError::invalid(
                    "export.log_records",
                    "a merge takes an export's snapshot rows, not its cell log",
                )
                .into());
            }
            let this = (
                chunk.merge_id,
                chunk.epoch,
                export.tenant_id,
                export.conversation_id,
            );
            if call.get_or_insert_with(|| this.clone()) != &this {
                return Err(CellError::invalid(
                    "merge_id",
                    "every chunk of one merge must name the same merge, epoch and key",
                )
                .into());
            }
            let rows = collector.get_or_insert_with(|| Collector::new(&this.0, &this.2, &this.3));
            for (i, row) in export.rows.into_iter().enumerate() {
                let space = space_named(&row.space).ok_or_else(|| {
                    CellError::invalid(
                        format!("export.rows[{i}].space"),
                        format!("{:?} is not an exported keyspace", row.space),
                    )
                })?;
                if let Some(batch) = rows.take(space, &row.key, &row.value)? {
                    merged = Some(self.merge_batch(this.1, batch).await?);
                }
            }
        }
        let (Some((merge_id, epoch, tenant, conversation)), Some(rows)) = (call, collector) else {
            return Err(CellError::invalid("export", "a merge needs at least one chunk").into());
        };
        for batch in rows.finish()? {
            merged = Some(self.merge_batch(epoch, batch).await?);
        }
        let merged = match merged {
            Some(total) => total,
            None => merged_so_far(&self.store, &merge_id, &tenant, &conversation)?,
        };
        Ok(Response::new(pb::MergeResponse { merged }))
    }

    async fn release_sync(
        &self,
        request: Request<pb::ReleaseSyncRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        self.replication
            .gate()
            .release(request.into_inner().episode)?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn lease_ticket(
        &self,
        _request: Request<pb::AdminEmpty>,
    ) -> Result<Response<pb::LeaseTicketResponse>, Status> {
        Ok(Response::new(pb::LeaseTicketResponse {
            ticket: self.lease.ticket(),
        }))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let r = request.into_inner();
        if r.lease_ms == 0 || r.lease_ms > MAX_LEASE_MS {
            return Err(CellError::invalid(
                "lease_ms",
                format!("must be between 1 and {MAX_LEASE_MS}"),
            )
            .into());
        }
        let remaining = self
            .lease
            .extend(r.ticket, std::time::Duration::from_millis(r.lease_ms))?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            remaining_ms: remaining.as_millis() as u64,
        }))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let r = request.into_inner();
        validate_id("primary_cell_id", &r.primary_cell_id).map_err(CellError::from)?;
        match self
            .writer
            .submit(Op::Promote {
                primary: r.primary_cell_id,
            })
            .await?
        {
            Outcome::Promoted {
                applied_lsn,
                already,
            } => Ok(Response::new(pb::PromoteResponse {
                applied_lsn,
                already,
            })),
            other => Err(Status::internal(format!(
                "the writer answered a promotion with {other:?}"
            ))),
        }
    }

    async fn freeze_all(
        &self,
        _request: Request<pb::AdminEmpty>,
    ) -> Result<Response<pb::FreezeResponse>, Status> {
        match self.writer.submit(Op::FreezeAll).await? {
            Outcome::Frozen { last_lsn } => Ok(Response::new(pb::FreezeResponse { last_lsn })),
            other => Err(Status::internal(format!(
                "the writer answered a freeze with {other:?}"
            ))),
        }
    }

    async fn set_sync_standbys(
        &self,
        request: Request<pb::SetSyncStandbysRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let standbys = request.into_inner().standbys;
        for (i, standby) in standbys.iter().enumerate() {
            validate_id(&format!("standbys[{i}]"), standby).map_err(CellError::from)?;
        }
        if let Some(primary) = self.role.standby_of() {
            return Err(CellError::FailedPrecondition(format!(
                "this cell is a standby of {primary:?}: it answers no sends to wait with"
            ))
            .into());
        }
        self.replication.gate().set_standbys(&standbys);
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn thaw_all(
        &self,
        _request: Request<pb::AdminEmpty>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        self.writer.submit(Op::ThawAll).await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn cell_status(
        &self,
        request: Request<pb::CellStatusRequest>,
    ) -> Result<Response<pb::CellStatusResponse>, Status> {
        let with_keys = !request.into_inner().without_keys;
        let mut keys: Vec<pb::OwnedKey> = self
            .writer
            .grants()
            .into_iter()
            .filter(|(_, grant)| with_keys && grant.is_owned())
            .map(|((tenant_id, conversation_id), grant)| pb::OwnedKey {
                tenant_id,
                conversation_id,
                epoch: grant.epoch(),
                frozen: grant.is_frozen(),
            })
            .collect();
        keys.sort_by(|a, b| {
            (&a.tenant_id, &a.conversation_id).cmp(&(&b.tenant_id, &b.conversation_id))
        });
        let last_lsn = self.store.last_lsn()?;
        let standby_of = self.role.standby_of();
        Ok(Response::new(pb::CellStatusResponse {
            cell_id: self.cell_id.clone(),
            last_lsn,
            replica: standby_of.as_ref().map(|_| self.replication.replica()),
            standby_of: standby_of.unwrap_or_default(),
            lease_required: self.lease.required(),
            lease_remaining_ms: self
                .lease
                .remaining()
                .map_or(0, |left| left.as_millis() as u64),
            promoted_from: self
                .store
                .promotion()?
                .map(|promotion| promotion.from)
                .unwrap_or_default(),
            standbys: self.replication.standbys(last_lsn, Instant::now()),
            sync: Some(self.replication.gate().status()),
            first_lsn: self.store.first_lsn()?,
            keys,
            conversations: self.store.spaces.conversations.approximate_len() as u64,
            messages: self.store.spaces.messages.approximate_len() as u64,
            disk_bytes: self.store.db.disk_space().unwrap_or(0),
            // Only ever appended to, so the estimate is the count, without a scan per heartbeat.
            undelivered_notifications: self.store.spaces.undelivered.approximate_len() as u64,
        }))
    }
}
