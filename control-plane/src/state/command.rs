//! Commands replicated through Raft, and what applying them answers.
//!
//! A command is validated before it is proposed (ids, enums) and its preconditions are checked
//! again when it is applied, deterministically, against the state at that log position: two
//! racing proposals cannot both pass a check that only one may pass.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::model::{
    CellHealth, CellState, Protection, ProtectionRecord, ReplicationHealth, RouteKey, RouteView,
    Tier,
};
use crate::audit::entry::AuditEntry;
use crate::failover::record::{FailoverRecord, MergedKey, Mode, Phase as FailoverPhase};
use crate::migration::record::{MigrationRecord, Phase, Progress};

/// A change to the control plane's state. Every successfully applied command bumps the revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterCell {
        cell_id: Arc<str>,
        region: Arc<str>,
        zone: Arc<str>,
        tier: Tier,
        endpoint: Arc<str>,
        capacity: u64,
        standby_of: Option<Arc<str>>,
    },
    SetCellState {
        cell_id: Arc<str>,
        state: CellState,
    },
    /// Placement is decided while applying, from the state at that log position, so concurrent
    /// creates see each other's load and every replica chooses the same cell.
    CreateTenant {
        tenant_id: Arc<str>,
        tier: Tier,
        home_region: Arc<str>,
    },
    DeleteTenant {
        tenant_id: Arc<str>,
    },
    /// Compare-and-set of one route key: the primitive migration and failover build on.
    MoveRoute {
        key: RouteKey,
        expected_epoch: u64,
        target_cell: Arc<str>,
    },
    /// Drops route-event history up to and including `revision`; watches from before it get
    /// OUT_OF_RANGE.
    Compact {
        revision: u64,
    },
    /// Plans a migration of `key` to `target_cell` (chosen by placement when `None`); with
    /// `new_tier` it is a tier change. Refused while another migration of the tenant runs.
    StartMigration {
        key: RouteKey,
        target_cell: Option<Arc<str>>,
        new_tier: Option<Tier>,
        now_ms: u64,
    },
    /// Moves migration `id` from phase `from` (compare-and-set) to `to`, merging `progress`.
    /// Into `Switching` it also moves the route to the target at `epoch + 1`, in this one
    /// command.
    AdvanceMigration {
        id: u64,
        from: Phase,
        to: Phase,
        progress: Progress,
        error: Option<String>,
        now_ms: u64,
        /// Recorded at the switch: when the source may drop the key's rows; `None` keeps them.
        purge_after_ms: Option<u64>,
    },
    /// What a cell's agent last saw of it.
    Heartbeat {
        cell_id: Arc<str>,
        health: CellHealth,
    },
    /// A primary's protection, as its agent saw it (appended last: log entries written before
    /// it existed decode as they were).
    RecordProtection {
        cell_id: Arc<str>,
        protection: Protection,
    },
    /// What a cell's agent last saw of it, replication included (what heartbeats send now;
    /// `Heartbeat` stays for log entries written before).
    Report {
        cell_id: Arc<str>,
        health: CellHealth,
        replication: Option<ReplicationHealth>,
    },
    /// Renews the leases of an agent's cells: one command per agent and round, whatever the
    /// number of its cells.
    RenewLeases {
        cells: Vec<Arc<str>>,
        lease_ms: u64,
    },
    /// Fails a primary over. With `expected_renewals` (the detector's decision) it is a
    /// compare-and-set on the cell's lease, which the detector has already waited out: the
    /// keys move at once. Without it (ops), the cell stops being renewed and the failover
    /// waits out the lease in FENCING. `standby` names the standby to promote (the detector
    /// passes over standbys whose own leases lapsed); `None` lets apply choose.
    StartFailover {
        cell_id: Arc<str>,
        standby: Option<Arc<str>>,
        mode: Mode,
        reason: String,
        automatic: bool,
        expected_renewals: Option<u64>,
        now_ms: u64,
    },
    /// A cell a failover left behind becomes a standby of the cell that took over: a failed
    /// or demoted primary (once nothing only it holds is left to merge back; JOINING until
    /// it follows), or a standby whose primary was failed over.
    Rejoin {
        cell_id: Arc<str>,
    },
    /// The detector found more primaries failed at once than it may fail over: automatic
    /// failover stops until ops resume it.
    HaltAutomaticFailover {
        cells: Vec<Arc<str>>,
        now_ms: u64,
    },
    /// Ops resume automatic failover after a storm.
    ResumeAutomaticFailover,
    /// Starts the evacuation of a primary: it becomes DRAINING (no new placements), refused
    /// for the last ACTIVE primary of its tier in its region, whose keys would have nowhere
    /// to go.
    DrainCell {
        cell_id: Arc<str>,
    },
    /// Forgets a cell that holds no key, follows no migration and has no standby.
    RemoveCell {
        cell_id: Arc<str>,
    },
    /// Moves failover `id` from phase `from` (compare-and-set) to `to`; into PROMOTING it
    /// moves every key of the failed cell, in this one command.
    AdvanceFailover {
        id: u64,
        from: FailoverPhase,
        to: FailoverPhase,
        /// Into CATCHING_UP: the cell's last LSN once frozen. Into PROMOTING from it: the
        /// primary LSN the standby applied (at least the frozen one).
        lsn: u64,
        /// Into THAWING: why the failover was given up.
        error: Option<String>,
        /// Into MERGED: every key of the failover and the messages only the failed cell held.
        merged: Vec<MergedKey>,
        now_ms: u64,
    },
    /// Records admin calls in the audit log, then drops the oldest entries beyond `keep`.
    Audit {
        entries: Vec<AuditEntry>,
        keep: u32,
    },
}

impl Command {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RegisterCell { .. } => "register_cell",
            Self::SetCellState { .. } => "set_cell_state",
            Self::CreateTenant { .. } => "create_tenant",
            Self::DeleteTenant { .. } => "delete_tenant",
            Self::MoveRoute { .. } => "move_route",
            Self::Compact { .. } => "compact",
            Self::StartMigration { .. } => "start_migration",
            Self::AdvanceMigration { .. } => "advance_migration",
            Self::Heartbeat { .. } => "heartbeat",
            Self::RecordProtection { .. } => "record_protection",
            Self::Report { .. } => "report",
            Self::RenewLeases { .. } => "renew_leases",
            Self::StartFailover { .. } => "start_failover",
            Self::AdvanceFailover { .. } => "advance_failover",
            Self::DrainCell { .. } => "drain_cell",
            Self::Rejoin { .. } => "rejoin",
            Self::HaltAutomaticFailover { .. } => "halt_automatic_failover",
            Self::ResumeAutomaticFailover => "resume_automatic_failover",
            Self::RemoveCell { .. } => "remove_cell",
            Self::Audit { .. } => "audit",
        }
    }
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// Boxed: a cell with its protection and replication is by far the largest answer.
    Cell(Box<CellView>),
    Tenant(TenantView),
    Route(RouteView),
    Migration(MigrationView),
    Failover(Box<FailoverView>),
    /// Leases renewed, and cells refused a renewal.
    Leases {
        granted: Vec<Arc<str>>,
        refused: Vec<Arc<str>>,
    },
    /// The command changed state without a record to return (delete, compact).
    Done {
        revision: u64,
    },
}

/// A cell with its id, as answers carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellView {
    pub cell_id: Arc<str>,
    pub record: super::model::CellRecord,
    /// A primary's protection, once its agent recorded one.
    pub protection: Option<ProtectionRecord>,
    /// The cells registered as its standbys.
    pub standbys: Vec<Arc<str>>,
    /// Replication as its agent last reported it.
    pub replication: Option<ReplicationHealth>,
}

/// A tenant with its id, as answers carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant_id: Arc<str>,
    pub record: super::model::TenantRecord,
    /// Its primary cell's protection, once recorded.
    pub protection: Option<ProtectionRecord>,
    /// Its primary cell's standbys.
    pub standby_cells: Vec<Arc<str>>,
}

/// A migration with its id, as answers carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationView {
    pub id: u64,
    pub record: MigrationRecord,
}

/// A failover with its id, as answers carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverView {
    pub id: u64,
    pub record: FailoverRecord,
}

/// The kind of record a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entity {
    Cell,
    Tenant,
    Migration,
    Failover,
    /// A control-plane node.
    Node,
}

impl Entity {
    /// The request field that names a record of this kind.
    pub fn field(self) -> &'static str {
        match self {
            Self::Cell => "cell_id",
            Self::Tenant => "tenant_id",
            Self::Migration => "migration_id",
            Self::Failover => "failover_id",
            Self::Node => "node_id",
        }
    }
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cell => "cell",
            Self::Tenant => "tenant",
            Self::Migration => "migration",
            Self::Failover => "failover",
            Self::Node => "node",
        })
    }
}

/// Why a command was refused. Refusals are deterministic: every replica refuses alike, and a
/// refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{what} {id:?} not found")]
    NotFound { what: Entity, id: String },
    /// A request field names a record that does not exist (`target_cell`, say).
    #[error("{field}: {what} {id:?} does not exist")]
    Dangling {
        field: String,
        what: Entity,
        id: String,
    },
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: Entity, id: String },
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation holds what the command needs (a tenant already migrating).
    #[error("{0}")]
    Busy(String),
    /// The caller's expected epoch is not the key's epoch; carries the current route.
    #[error("expected_epoch: key {key} is at epoch {}, not {expected}", current.epoch)]
    StaleEpoch {
        key: String,
        expected: u64,
        current: RouteView,
    },
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
    /// A cluster-wide limit is reached (migrations or failovers in flight); the caller may
    /// retry once some finish.
    #[error("{0}")]
    Exhausted(String),
}

/// The response of one applied log entry.
pub type CommandResult = Result<CommandOutput, CommandError>;

/// What one Raft log entry carries: the commands proposed together.
///
/// openraft 0.9 waits for each append to be durable before it takes the next, so one entry per
/// command would cost one fsync per command. The proposer packs every command that arrives while
/// the previous entry is in flight into one entry: under load, hundreds of commands share an
/// fsync and a replication round trip. Each command still applies on its own, in order, and
/// bumps the revision by one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandBatch(pub Vec<Command>);

/// What the state machine answers for one log entry: one result per command, in order (none for
/// membership and blank entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Vec<CommandResult>);
