//! The writer: one thread that checks and applies every write in order, and commits them in
//! batches — group commit, one fsync per batch. In a simulation (`cellplane_api::simulation`)
//! a task on the cell's runtime commits the batches instead, so when a write is durable
//! follows the simulated clock, and a crashed host's store closes with its tasks.
//!
//! Requests queue while the previous batch is being made durable; the writer takes them all (up
//! to `max_ops_per_commit`), checks each against the state including the batch's own earlier
//! writes, stages its rows in one fjall write batch, appends its mutation to the cell log at the
//! next LSN, and assigns the `pts` of every sync event inside the same batch. Only after the
//! batch is committed and fsynced is any request answered, so an acknowledged write survives a
//! crash, and a seq or pts is never handed out twice: both live in the rows the batch writes,
//! not in a counter beside the store.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, mpsc};

use cellplane_api::clock::now_ms;
use tokio::sync::{oneshot, watch};

use super::export::{name_of, replicated_spaces};
use super::fencing::{
    self, Grant, GrantChange, Grants, Transition, check_owner, own_conversations,
};
use super::log_trim::{LogBound, LogTrim};
use super::memory::Memory;
use super::merge::{MergeBatch, merge};
use super::mutate::{
    Decider, Decision, WriteRequest, apply_mutation, replay, require_conversation,
};
use super::records::{
    GrantRecord, IdempotencyRecord, Kind, LogRecord, Mutation, PromotionRecord, ReplicaRecord,
    SyncKind, SyncRecord,
};
use super::tx::{PurgeCursor, Tx};
use super::{Space, Store, keys};
use crate::error::CellError;
use crate::lease::Lease;
use crate::limits::Limits;
use crate::replication::role::Role;

/// Requests waiting for the writer before new ones are refused with RESOURCE_EXHAUSTED.
const QUEUE_DEPTH: usize = 65_536;

/// A write, its shape already checked by the API layer.
#[derive(Debug, Clone)]
pub enum Op {
    /// An end user's write to a conversation, at the route epoch the caller looked up.
    Write {
        tenant: String,
        conversation: String,
        epoch: u64,
        request: WriteRequest,
    },
    /// A change of a route key's grant, decided by the fencing transition table.
    Change {
        tenant: String,
        conversation: String,
        change: GrantChange,
    },
    /// Merged read receipts of one conversation, fanned out to its members as one READ event
    /// each. A notification, not state: nothing is logged, and a conversation gone (moved,
    /// deleted) since simply gets none.
    Receipts {
        tenant: String,
        conversation: String,
        /// Reader → newest seq read in the window.
        readers: Vec<(String, u64)>,
    },
    /// Drops the rows of a key that moved away (its grant here is revoked or deleted).
    Purge {
        tenant: String,
        conversation: String,
        /// Where the previous slice stopped.
        after: Option<PurgeCursor>,
    },
    /// Another cell's export of a key: snapshot rows, then log records past `after_lsn` of the
    /// source. Records at or below the key's recorded import position are skipped, so a resumed
    /// import never applies a record twice.
    /// A batch of the primary's replication stream, on a standby.
    Replicate(Replicated),
    /// Makes a standby of `primary` a primary, durably.
    Promote { primary: String },
    /// Freezes every key the cell owns (a planned failover), answering the last LSN.
    FreezeAll,
    /// Thaws every key frozen whole (a planned failover given up).
    ThawAll,
    /// Part of a failed cell's history merged back into a key this cell owns at `epoch`
    /// (`store::merge`).
    Merge { epoch: u64, batch: MergeBatch },
    Import {
        tenant: String,
        conversation: String,
        /// The cell the export came from.
        source: String,
        rows: Vec<(Space, Vec<u8>, Vec<u8>)>,
        records: Vec<LogRecord>,
        /// The source LSN the chunk covers, records or not.
        through_lsn: u64,
    },
}

/// What a standby's writer takes from its primary's replication stream.
#[derive(Debug, Clone, Default)]
pub struct Replicated {
    /// The first batch of a bootstrap: drop every exported row held before.
    pub begin: bool,
    /// Snapshot rows of the whole primary.
    pub rows: Vec<(Space, Vec<u8>, Vec<u8>)>,
    /// Primary cell-log records, each the one after the position.
    pub records: Vec<LogRecord>,
    /// The last batch of a bootstrap: the rows cover the primary's log up to `through_lsn`.
    pub done: bool,
    /// Where the batch brings the standby in the primary's log.
    pub through_lsn: u64,
}

/// A conversation as answers show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationView {
    pub kind: Kind,
    pub members: Vec<String>,
    pub created_ms: u64,
    pub last_seq: u64,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Conversation(ConversationView),
    Sent(IdempotencyRecord),
    Done,
    Frozen {
        last_lsn: u64,
    },
    /// The newest source LSN imported for the key.
    Imported {
        source_lsn: u64,
    },
    /// A slice of a key's rows was dropped; rows remain after `next`.
    Purged {
        next: Option<PurgeCursor>,
    },
    /// Where a standby stands in its primary's log now.
    Replica(ReplicaRecord),
    /// Messages a merge added to its route key in all.
    Merged {
        total: u64,
    },
    /// The standby is a primary; `already` when it was before this request.
    Promoted {
        applied_lsn: u64,
        already: bool,
    },
}

use crate::replication::gate::{Reply, SyncGate};

/// Rows a purge drops in one batch: a few milliseconds of the writer's time.
const PURGE_ROWS_PER_BATCH: usize = 5_000;

/// A handle to the writer. Cheap to clone; the writer stops when every handle is gone.
#[derive(Clone)]
pub struct Writer {
    queue: Queue,
    grants: Arc<RwLock<Grants>>,
    commits: watch::Receiver<u64>,
}

/// Where requests wait for the writer.
#[derive(Clone)]
enum Queue {
    /// The writer thread's queue.
    Thread(mpsc::SyncSender<(Op, Reply)>),
    /// In a simulation: the writer's state itself, committed by a task of the caller's runtime.
    Inline(Arc<Mutex<Inline>>),
}

/// The writer of a simulated cell.
struct Inline {
    state: WriterState,
    pending: VecDeque<(Op, Reply)>,
    /// A task is committing the pending requests, or about to.
    draining: bool,
    /// Where the store writes, so a simulated disk stall can hold its commits.
    dir: PathBuf,
}

impl Inline {
    fn push(this: &Arc<Mutex<Self>>, request: (Op, Reply)) -> Result<(), CellError> {
        let mut inline = this.lock().map_err(|_| stopped())?;
        if inline.pending.len() >= QUEUE_DEPTH {
            return Err(queue_full());
        }
        inline.pending.push_back(request);
        if !inline.draining {
            inline.draining = true;
            tokio::spawn(Self::drain(this.clone()));
        }
        Ok(())
    }

    /// Commits what is pending, a batch at a time.
    async fn drain(this: Arc<Mutex<Self>>) {
        let Some(dir) = this.lock().ok().map(|inline| inline.dir.clone()) else {
            return;
        };
        loop {
            // Requests made at the same instant join one batch, as those queued while the
            // thread commits the batch before do; so do those queued while the disk stalls.
            tokio::task::yield_now().await;
            cellplane_api::simulation::disk_ready(&dir).await;
            let Ok(mut inline) = this.lock() else {
                return;
            };
            let size = inline
                .pending
                .len()
                .min(inline.state.limits.max_ops_per_commit);
            if size == 0 {
                inline.draining = false;
                return;
            }
            let batch = inline.pending.drain(..size).collect();
            inline.state.commit_batch(batch);
        }
    }
}

fn queue_full() -> CellError {
    CellError::ResourceExhausted("the cell's write queue is full; retry after 100 ms".into())
}

fn stopped() -> CellError {
    CellError::Storage("the writer stopped".into())
}

impl Writer {
    /// Starts the writer over `store`. A standby (`role`) takes only its primary's replication
    /// stream and refuses every other write until it is promoted; a primary takes end users'
    /// writes only while it holds its `lease`.
    pub fn start(
        store: Store,
        cell_id: String,
        role: Role,
        lease: Lease,
        limits: Limits,
        log_bound: LogBound,
        gate: SyncGate,
    ) -> Result<Self, CellError> {
        let grants = store.grants()?;
        let shared = Arc::new(RwLock::new(grants.clone()));
        let last_lsn = store.last_lsn()?;
        let (commits, committed) = watch::channel(last_lsn);
        let log_trim = LogTrim::open(&store, log_bound, now_ms())?;
        let mut state = WriterState {
            log_trim,
            store,
            cell_id,
            role,
            lease,
            promoting: false,
            commits,
            limits,
            gate,
            grants,
            shared: shared.clone(),
            last_lsn,
            memory: Memory::default(),
            grants_stale: false,
        };
        let queue = if cellplane_api::simulation::active() {
            let dir = state.store.spaces.log.path().to_path_buf();
            Queue::Inline(Arc::new(Mutex::new(Inline {
                state,
                pending: VecDeque::new(),
                draining: false,
                dir,
            })))
        } else {
            let (queue, requests) = mpsc::sync_channel(QUEUE_DEPTH);
            std::thread::Builder::new()
                .name("cell-writer".into())
                .spawn(move || state.run(requests))
                .map_err(|e| CellError::Storage(format!("starting the writer: {e}")))?;
            Queue::Thread(queue)
        };
        Ok(Self {
            queue,
            grants: shared,
            commits: committed,
        })
    }

    /// Submits a write and waits until it is durable (or refused).
    pub async fn submit(&self, op: Op) -> Result<Outcome, CellError> {
        self.enqueue(op)?.await
    }

    /// Queues a write now, in order with every write queued before it, and returns what
    /// resolves once it is durable (or refused): a caller can queue the next before this one
    /// commits, and the writer commits them together.
    pub fn enqueue(
        &self,
        op: Op,
    ) -> Result<impl Future<Output = Result<Outcome, CellError>> + use<>, CellError> {
        let (reply, answer) = oneshot::channel();
        match &self.queue {
            Queue::Thread(queue) => queue.try_send((op, reply)).map_err(|e| match e {
                mpsc::TrySendError::Full(_) => queue_full(),
                mpsc::TrySendError::Disconnected(_) => stopped(),
            })?,
            Queue::Inline(inline) => Inline::push(inline, (op, reply))?,
        }
        Ok(async move {
            answer
                .await
                .map_err(|_| CellError::Storage("the writer dropped the request".into()))?
        })
    }

    /// The newest LSN of the cell log that is durable, as it moves.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    /// The grants as of the last committed batch.
    pub fn grants(&self) -> Grants {
        self.grants.read().map(|g| g.clone()).unwrap_or_default()
    }
}

struct WriterState {
    /// Keeps the cell log within its bound.
    log_trim: LogTrim,
    store: Store,
    cell_id: String,
    /// Whether this cell is a standby, and of which primary.
    role: Role,
    /// End users' writes are accepted only while it runs.
    lease: Lease,
    /// A promotion is staged in the open batch: the role changes once it is durable.
    promoting: bool,
    /// Told the newest durable LSN after every commit (replication follows it).
    commits: watch::Sender<u64>,
    limits: Limits,
    /// Answers a committed batch, at once or once the synchronous standbys have it.
    gate: SyncGate,
    /// Authoritative while the writer runs: changed by grant ops as they are applied, reloaded
    /// from the store if a batch fails to commit.
    grants: Grants,
    shared: Arc<RwLock<Grants>>,
    last_lsn: u64,
    /// What the writer remembers between batches, handed to each batch and taken back after it.
    memory: Memory,
    /// On a standby: a batch changed the grants; they are read back once it is durable.
    grants_stale: bool,
}

fn conversation_view(
    tx: &Tx,
    tenant: &str,
    conversation: &str,
) -> Result<ConversationView, CellError> {
    let record = require_conversation(tx, tenant, conversation)?;
    Ok(ConversationView {
        kind: record.kind,
        members: tx.members(tenant, conversation)?,
        created_ms: record.created_ms,
        last_seq: record.last_seq,
    })
}

/// The import position of a key: the newest source LSN applied.
/// Where an import of `(tenant, conversation)` from `source` stands. Positions are LSNs of the
/// source's log, so each source has its own: a key that comes back from another cell starts
/// over instead of skipping that cell's records.
fn import_key(tenant: &str, conversation: &str, source: &str) -> Vec<u8> {
    keys::Key::new()
        .id(tenant)
        .id(conversation)
        .id(source)
        .into_bytes()
}

impl WriterState {
    fn run(&mut self, requests: mpsc::Receiver<(Op, Reply)>) {
        while let Ok(first) = requests.recv() {
            let mut pending = vec![first];
            while pending.len() < self.limits.max_ops_per_commit {
                match requests.try_recv() {
                    Ok(request) => pending.push(request),
                    Err(_) => break,
                }
            }
            self.commit_batch(pending);
        }
    }

    fn commit_batch(&mut self, pending: Vec<(Op, Reply)>) {
        let mut tx = Tx::new(
            self.store.clone(),
            self.last_lsn,
            std::mem::take(&mut self.memory),
        );
        let mut answers = Vec::with_capacity(pending.len());
        // A request that fails after staging part of its writes would leave them in the batch:
        // the whole batch is then refused rather than committed half-applied.
        let mut poisoned: Option<CellError> = None;
        let mut writes = Vec::with_capacity(pending.len());
        for (op, reply) in pending {
            let staged_before = tx.writes;
            writes.push(matches!(op, Op::Write { .. } | Op::Merge { .. }));
            let answer = self.apply(&mut tx, op);
            if let Err(err) = &answer
                && tx.writes != staged_before
            {
                poisoned = Some(err.clone());
            }
            answers.push((reply, answer));
        }
        let now = now_ms();
        if poisoned.is_none()
            && let Err(err) = self.log_trim.trim(&mut tx, self.last_lsn, now)
        {
            poisoned = Some(err);
        }
        let lsn = tx.lsn;
        let appended = tx.log_bytes;
        let deliveries = std::mem::take(&mut tx.deliveries);
        let mut memory = std::mem::take(&mut tx.memory);
        let ops = answers.len();
        let committed = match poisoned {
            Some(err) => Err(CellError::Storage(format!(
                "a request failed mid-write: {err}"
            ))),
            None if tx.writes == 0 => Ok(()),
            None => {
                // Before the batch is durable: nothing of it may have been acknowledged.
                cellplane_api::failpoint::crash_point("cell-commit");
                tx.commit_durably()
            }
        };
        metrics::histogram!("cellplane_cell_ops_per_commit").record(ops as f64);
        match committed {
            Ok(()) => {
                self.log_trim.settle(self.last_lsn + 1, appended, now);
                self.last_lsn = lsn;
                self.commits.send_if_modified(|durable| {
                    let moved = *durable != lsn;
                    *durable = lsn;
                    moved
                });
                memory.settle(tx.staged());
                self.memory = memory;
                if std::mem::take(&mut self.grants_stale) {
                    match self.store.grants() {
                        Ok(grants) => self.grants = grants,
                        Err(err) => tracing::error!(error = %err, "reading the grants back"),
                    }
                }
                if let Ok(mut shared) = self.shared.write() {
                    shared.clone_from(&self.grants);
                }
                if std::mem::take(&mut self.promoting) {
                    self.role.promote();
                    tracing::info!(cell_id = %self.cell_id, "promoted: this cell is a primary now");
                }
                // A write is accepted when it is answered: one whose batch became durable only
                // after the lease ran out is refused (its retry may land on the new owner),
                // so nothing is acknowledged past the lease.
                let answers = match self.lease.check() {
                    Ok(()) => answers,
                    Err(expired) => answers
                        .into_iter()
                        .zip(writes)
                        .map(|((reply, answer), write)| match answer {
                            Ok(_) if write => (reply, Err(expired.clone())),
                            answer => (reply, answer),
                        })
                        .collect(),
                };
                self.gate.committed(lsn, answers, deliveries);
            }
            Err(err) => {
                self.promoting = false;
                self.log_trim.forget();
                tracing::error!(error = %err, "commit failed; refusing the batch");
                // What it remembers may name rows and pts of the refused batch: read them from
                // the store again.
                memory.clear();
                self.memory = memory;
                // Nothing of the batch is durable: forget its grant changes too.
                if let Ok(grants) = self.store.grants() {
                    self.grants = grants;
                }
                for (reply, _) in answers {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn apply(&mut self, tx: &mut Tx, op: Op) -> Result<Outcome, CellError> {
        if let Op::Promote { primary } = op {
            return self.promote(tx, primary);
        }
        if let Some(primary) = self.role.standby_of()
            && !self.promoting
        {
            return match op {
                Op::Replicate(batch) => {
                    // The primary's grants reach the standby as rows (a bootstrap) or fences.
                    self.grants_stale |= batch.begin
                        || !batch.rows.is_empty()
                        || batch
                            .records
                            .iter()
                            .any(|r| matches!(r.mutation, Mutation::Fence { .. }));
                    replicate(tx, batch)
                }
                Op::Write {
                    tenant,
                    conversation,
                    ..
                } => Err(CellError::WrongCell {
                    message: format!(
                        "this cell is a standby of {primary:?} and takes no writes; write to the primary"
                    ),
                    detail: Box::new(cellplane_api::proto::cell::WrongCell {
                        tenant_id: tenant,
                        conversation_id: conversation,
                        current_cell_id: primary.clone(),
                        ..Default::default()
                    }),
                }),
                _ => Err(CellError::FailedPrecondition(format!(
                    "this cell is a standby of {primary:?}: it changes only by following its primary's log"
                ))),
            };
        }
        match op {
            Op::Promote { .. } => unreachable!("promotions are handled above"),
            Op::FreezeAll => {
                self.change_all(tx, GrantChange::Freeze, |g| {
                    matches!(g, Grant::Owned { .. })
                })?;
                // Every write the cell accepted is at or below this LSN; none comes after.
                Ok(Outcome::Frozen { last_lsn: tx.lsn })
            }
            Op::ThawAll => {
                self.change_all(tx, GrantChange::Unfreeze, |g| {
                    matches!(g, Grant::Frozen { .. })
                })?;
                Ok(Outcome::Done)
            }
            Op::Replicate(_) => Err(CellError::FailedPrecondition(
                "this cell is no standby: it takes no replication stream".into(),
            )),
            Op::Write {
                tenant,
                conversation,
                epoch,
                request,
            } => self.write(tx, &tenant, &conversation, epoch, request),
            Op::Change {
                tenant,
                conversation,
                change,
            } => self.change_grant(tx, tenant, conversation, change),
            Op::Receipts {
                tenant,
                conversation,
                readers,
            } => receipts(tx, &tenant, &conversation, readers),
            Op::Merge { epoch, batch } => {
                self.lease.check()?;
                check_owner(&self.grants, &batch.tenant, &batch.conversation, epoch)?;
                Ok(Outcome::Merged {
                    total: merge(tx, batch)?,
                })
            }
            Op::Purge {
                tenant,
                conversation,
                after,
            } => self.purge(tx, &tenant, &conversation, after),
            Op::Import {
                tenant,
                conversation,
                source,
                rows,
                records,
                through_lsn,
            } => {
                // A migration copies a key before its switch grants it here. A copy into a key
                // this cell owns could only come from one that outlived its migration, and it
                // may carry the source's later purge of the key.
                let key = (tenant.clone(), conversation.clone());
                if self.grants.get(&key).is_some_and(Grant::is_owned) {
                    return Err(CellError::FailedPrecondition(format!(
                        "tenant_id: this cell owns {tenant}/{conversation}; it takes a copy of a key only before the key is granted to it"
                    )));
                }
                import(
                    tx,
                    (&tenant, &conversation),
                    &import_key(&tenant, &conversation, &source),
                    rows,
                    records,
                    through_lsn,
                )
            }
        }
    }

    /// Makes this standby a primary: the promotion is staged in the batch, and the role
    /// changes once it is durable. A standby in the middle of a bootstrap holds part of its
    /// primary's rows and is refused; a cell already promoted from `primary` answers as the
    /// first time.
    fn promote(&mut self, tx: &mut Tx, primary: String) -> Result<Outcome, CellError> {
        let position: ReplicaRecord = tx
            .get(Space::Replica, keys::REPLICA_POSITION)?
            .unwrap_or_default();
        match self.role.standby_of() {
            None => match self.store.promotion()? {
                Some(promotion) if promotion.from == primary => Ok(Outcome::Promoted {
                    applied_lsn: promotion.applied_lsn,
                    already: true,
                }),
                Some(promotion) => Err(CellError::FailedPrecondition(format!(
                    "primary_cell_id: this cell was promoted from {:?}, not {primary:?}",
                    promotion.from
                ))),
                None => Err(CellError::FailedPrecondition(
                    "this cell is a primary, not a standby: there is nothing to promote".into(),
                )),
            },
            Some(followed) if followed != primary => Err(CellError::FailedPrecondition(format!(
                "primary_cell_id: this cell is a standby of {followed:?}, not {primary:?}"
            ))),
            Some(_) if position.bootstrapping => Err(CellError::FailedPrecondition(
                "this standby is in the middle of a bootstrap and holds only part of its primary's data; it cannot be promoted".into(),
            )),
            Some(_) if self.promoting => Ok(Outcome::Promoted {
                applied_lsn: position.applied_lsn,
                already: false,
            }),
            Some(from) => {
                tx.put(
                    Space::Replica,
                    keys::REPLICA_PROMOTED.to_vec(),
                    &PromotionRecord {
                        from,
                        applied_lsn: position.applied_lsn,
                    },
                );
                self.promoting = true;
                Ok(Outcome::Promoted {
                    applied_lsn: position.applied_lsn,
                    already: false,
                })
            }
        }
    }

    /// An end user's write: decided against the batch so far, then applied.
    fn write(
        &mut self,
        tx: &mut Tx,
        tenant: &str,
        conversation: &str,
        epoch: u64,
        request: WriteRequest,
    ) -> Result<Outcome, CellError> {
        self.lease.check()?;
        let returns_conversation = matches!(
            request,
            WriteRequest::CreateConversation { .. }
                | WriteRequest::AddMembers { .. }
                | WriteRequest::RemoveMembers { .. }
        );
        let decider = Decider {
            cell_id: &self.cell_id,
            limits: &self.limits,
            grants: &self.grants,
        };
        let mutation = match decider.decide(tx, tenant, conversation, epoch, request)? {
            Decision::Retry(first) => return Ok(Outcome::Sent(first)),
            Decision::Unchanged => None,
            Decision::Apply(mutation) => Some(mutation),
        };
        let sent = mutation.as_ref().and_then(|mutation| match mutation {
            Mutation::Send { message } => Some(IdempotencyRecord {
                message_id: message.message_id.clone(),
                seq: message.seq,
                server_time_ms: message.server_time_ms,
            }),
            _ => None,
        });
        if let Some(mutation) = mutation {
            apply_mutation(tx, tenant, conversation, mutation, true)?;
        }
        if let Some(sent) = sent {
            Ok(Outcome::Sent(sent))
        } else if returns_conversation {
            Ok(Outcome::Conversation(conversation_view(
                tx,
                tenant,
                conversation,
            )?))
        } else {
            Ok(Outcome::Done)
        }
    }

    /// A grant, revocation, delete, freeze or thaw, as the fencing table decides it.
    fn change_grant(
        &mut self,
        tx: &mut Tx,
        tenant: String,
        conversation: String,
        change: GrantChange,
    ) -> Result<Outcome, CellError> {
        let key = (tenant, conversation);
        let tenant_grant = self.grants.get(&(key.0.clone(), String::new()));
        let transition = fencing::transition(
            &self.cell_id,
            (&key.0, &key.1),
            self.grants.get(&key),
            tenant_grant,
            &change,
        )?;
        let fence = match &transition {
            Transition::Put(grant) => Some(Some(GrantRecord::from(grant))),
            Transition::Remove => Some(None),
            Transition::Unchanged => None,
        };
        if let Some(grant) = fence {
            // Through the cell log, so standbys hold the same grants and freezes.
            apply_mutation(tx, &key.0, &key.1, Mutation::Fence { grant }, false)?;
            match transition {
                Transition::Put(grant) => {
                    self.grants.insert(key, grant);
                }
                _ => {
                    self.grants.remove(&key);
                }
            }
        }
        Ok(match change {
            // Every write to the key so far is at or below this LSN; none comes after while
            // it is frozen.
            GrantChange::Freeze => Outcome::Frozen { last_lsn: tx.lsn },
            _ => Outcome::Done,
        })
    }

    /// Applies `change` to every key whose grant `applies` to, through the transition table.
    fn change_all(
        &mut self,
        tx: &mut Tx,
        change: GrantChange,
        applies: impl Fn(&Grant) -> bool,
    ) -> Result<(), CellError> {
        let keys: Vec<(String, String)> = self
            .grants
            .iter()
            .filter(|(_, grant)| applies(grant))
            .map(|(key, _)| key.clone())
            .collect();
        for (tenant, conversation) in keys {
            self.change_grant(tx, tenant, conversation, change.clone())?;
        }
        Ok(())
    }

    /// One bounded slice of a moved-away key's rows.
    fn purge(
        &mut self,
        tx: &mut Tx,
        tenant: &str,
        conversation: &str,
        after: Option<PurgeCursor>,
    ) -> Result<Outcome, CellError> {
        let key = (tenant.to_string(), conversation.to_string());
        if self.grants.get(&key).is_none_or(|g| g.is_owned()) {
            return Err(CellError::FailedPrecondition(format!(
                "{tenant}/{conversation} has not moved away from this cell; only a revoked key's rows are dropped"
            )));
        }
        let excluded: Vec<String> = if conversation.is_empty() {
            own_conversations(&self.grants, tenant).collect()
        } else {
            Vec::new()
        };
        let excluded_set = excluded.iter().cloned().collect();
        // A bounded slice per batch, so dropping a large tenant never stalls the cell's other
        // writes; the caller repeats until nothing remains. Each slice is logged; replaying the
        // first drops everything, the rest then find nothing.
        let next = tx.purge(
            tenant,
            conversation,
            &excluded_set,
            Some(PURGE_ROWS_PER_BATCH),
            after.as_ref(),
        )?;
        tx.log(tenant, conversation, Mutation::Purge { excluded });
        Ok(Outcome::Purged { next })
    }
}

/// Merged read receipts: one READ event for each member who is not among the readers.
fn receipts(
    tx: &mut Tx,
    tenant: &str,
    conversation: &str,
    readers: Vec<(String, u64)>,
) -> Result<Outcome, CellError> {
    let members = tx.members(tenant, conversation)?;
    let user_ids: Vec<String> = readers.iter().map(|(user, _)| user.clone()).collect();
    let seq = readers.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
    for member in members.iter().filter(|m| !user_ids.contains(m)) {
        tx.event(tenant, member, |pts| SyncRecord {
            pts,
            kind: SyncKind::Read,
            conversation_id: conversation.to_string(),
            seq,
            message: None,
            user_ids: user_ids.clone(),
            joined: false,
        })?;
    }
    Ok(Outcome::Done)
}

/// Applies one chunk of another cell's export of `(tenant, conversation)`: its snapshot rows,
/// logged as one `ImportRows`, then its log records, skipping those at or below the position
/// recorded under `position_key`; records the new position.
fn import(
    tx: &mut Tx,
    (tenant, conversation): (&str, &str),
    position_key: &[u8],
    rows: Vec<(Space, Vec<u8>, Vec<u8>)>,
    records: Vec<LogRecord>,
    through_lsn: u64,
) -> Result<Outcome, CellError> {
    let mut position: u64 = tx.get(Space::Imports, position_key)?.unwrap_or(0);
    if !rows.is_empty() {
        let rows = rows
            .into_iter()
            .map(|(space, key, value)| {
                let name = name_of(space).ok_or_else(|| {
                    CellError::invalid("rows", format!("{space:?} is not an exported keyspace"))
                })?;
                Ok((name.to_string(), key, value))
            })
            .collect::<Result<Vec<_>, CellError>>()?;
        apply_mutation(
            tx,
            tenant,
            conversation,
            Mutation::ImportRows { rows },
            false,
        )?;
    }
    for record in records {
        if record.lsn <= position {
            continue;
        }
        let lsn = record.lsn;
        replay(tx, record)?;
        position = lsn;
    }
    position = position.max(through_lsn);
    tx.put(Space::Imports, position_key.to_vec(), &position);
    Ok(Outcome::Imported {
        source_lsn: position,
    })
}

/// Applies a batch of the primary's replication stream on a standby: a bootstrap's snapshot
/// rows (the first batch drops what the standby held), then log records in order, and the new
/// position in the same write. Records are applied without sync events: devices of a promoted
/// standby catch up with a REBASE.
fn replicate(tx: &mut Tx, batch: Replicated) -> Result<Outcome, CellError> {
    let mut position: ReplicaRecord = tx
        .get(Space::Replica, keys::REPLICA_POSITION)?
        .unwrap_or_default();
    if batch.begin {
        for (space, _) in replicated_spaces() {
            for item in tx.store().spaces.get(space).iter() {
                let key = item.key()?;
                tx.delete(space, key.to_vec());
            }
        }
        position = ReplicaRecord {
            applied_lsn: 0,
            bootstrapping: true,
        };
    } else if !batch.rows.is_empty() && !position.bootstrapping {
        return Err(CellError::FailedPrecondition(
            "snapshot rows arrived outside a bootstrap".into(),
        ));
    }
    for (space, key, value) in &batch.rows {
        super::foreign::check_row(&format!("{space:?}"), key, value)?;
    }
    for (space, key, value) in batch.rows {
        tx.put_raw(space, key, value);
    }
    if batch.done {
        position = ReplicaRecord {
            applied_lsn: batch.through_lsn,
            bootstrapping: false,
        };
    }
    for record in batch.records {
        if position.bootstrapping {
            return Err(CellError::FailedPrecondition(
                "log records arrived before the bootstrap finished".into(),
            ));
        }
        if record.lsn <= position.applied_lsn {
            continue;
        }
        if record.lsn != position.applied_lsn + 1 {
            return Err(CellError::FailedPrecondition(format!(
                "the primary's log jumped from LSN {} to {}",
                position.applied_lsn, record.lsn
            )));
        }
        position.applied_lsn = record.lsn;
        replay(tx, record)?;
    }
    tx.put(Space::Replica, keys::REPLICA_POSITION.to_vec(), &position);
    Ok(Outcome::Replica(position))
}
