//! Carries out the migrations whose target is one of this agent's cells, and thaws the keys of
//! its cells whose migrations were rolled back.
//!
//! The control plane decides; the agent acts and reports. For each migration it follows the
//! phase the last report answered: in COPYING the target pulls a snapshot of the key from the
//! source (`Export` into `Import`); in CATCHING_UP it pulls the source's log tail and reports
//! the lag; in FREEZING it freezes the key on the source and pulls the tail up to the frozen
//! LSN; after the switch it grants the target the new epoch and revokes the source. Every step
//! can be repeated, so an agent that restarts mid-phase simply does its phase again. What to do
//! next is decided by the pure functions of `step.rs`; this module carries it out.

mod step;

use std::collections::HashMap;
use std::time::Duration;

use cellplane_api::failpoint::crash_point;
use cellplane_api::proto::cell as cell_pb;
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::MigrationPhase as Phase;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::cells::{LocalCells, remote_admin};
use cellplane_api::client::ControlPlane;
use cellplane_api::clock::now_ms;
use step::{OnFailure, Purge, Repair, Step, Work, next_step, on_failure, phase, repair_frozen};

/// Pause between catch-up passes, so a migration of an idle key does not spin.
const CATCH_UP_PAUSE: Duration = Duration::from_millis(20);

/// How often the agent re-checks the frozen keys of its cells against their migrations.
const THAW_INTERVAL: Duration = Duration::from_secs(2);

fn is_terminal(phase: Phase) -> bool {
    matches!(phase, Phase::Done | Phase::RolledBack | Phase::Failed)
}

fn key_request(m: &pb::Migration) -> cell_pb::KeyRequest {
    cell_pb::KeyRequest {
        tenant_id: m.tenant_id.clone(),
        conversation_id: m.conversation_id.clone(),
    }
}

/// Runs until shutdown: follows every migration and starts a worker for each that targets
/// one of this agent's cells.
pub async fn run(control: ControlPlane, cells: LocalCells, mut shutdown: watch::Receiver<bool>) {
    let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
    let thaw = tokio::spawn(thaw_loop(control.clone(), cells.clone()));
    loop {
        tokio::select! {
            result = follow(&control, &cells, &mut workers) => {
                if let Err(status) = result {
                    tracing::warn!(%status, "migration watch interrupted; watching again");
                }
            }
            _ = shutdown.changed() => break,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    thaw.abort();
    for (_, worker) in workers {
        worker.abort();
    }
}

async fn follow(
    control: &ControlPlane,
    cells: &LocalCells,
    workers: &mut HashMap<String, JoinHandle<()>>,
) -> Result<(), Status> {
    let mut stream = control
        .call(|mut c| async move {
            c.watch_migration(pb::WatchMigrationRequest {
                migration_id: String::new(),
            })
            .await
        })
        .await?;
    while let Some(m) = stream.message().await? {
        let phase = phase(&m);
        workers.retain(|_, worker| !worker.is_finished());
        if cells.contains_key(&m.target_cell)
            && !is_terminal(phase)
            && !workers.contains_key(&m.migration_id)
        {
            let id = m.migration_id.clone();
            let worker = Worker {
                control: control.clone(),
                cells: cells.clone(),
            };
            workers.insert(id, tokio::spawn(worker.carry_out(m.clone())));
        }
        if cells.contains_key(&m.source_cell) && matches!(phase, Phase::RolledBack | Phase::Failed)
        {
            thaw(cells, &m).await;
        }
    }
    Err(Status::unavailable("the migration watch ended"))
}

/// Unfreezes the key of a migration that ended before its switch on its source cell.
async fn thaw(cells: &LocalCells, m: &pb::Migration) {
    let Some(cell) = cells.get(&m.source_cell) else {
        return;
    };
    match cell.admin.clone().unfreeze(key_request(m)).await {
        Ok(_) => {
            tracing::info!(migration = %m.migration_id, "source key unfrozen after {}", phase(m).as_str_name())
        }
        // Never frozen, or already revoked: nothing to thaw.
        Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {}
        Err(status) => {
            tracing::warn!(migration = %m.migration_id, %status, "could not unfreeze the source key")
        }
    }
}

/// Repairs what a lost message or a crash can leave behind: a key frozen on one of this
/// agent's cells whose migration has ended. Rolled back or failed: unfreeze it. Switched:
/// revoke it towards the target. A frozen key without a migration is left as it is, and so
/// is every key of a cell in a failover (a PLANNED one freezes them all; it thaws them itself
/// if it is given up).
async fn thaw_loop(control: ControlPlane, cells: LocalCells) {
    loop {
        tokio::time::sleep(THAW_INTERVAL).await;
        let Ok(failing) = control
            .call(|mut c| async move {
                c.list_failovers(pb::ListFailoversRequest { active_only: true })
                    .await
            })
            .await
        else {
            continue;
        };
        let failing: Vec<String> = failing.failovers.into_iter().map(|f| f.cell_id).collect();
        // A standby's frozen keys are its primary's, repaired there.
        for (cell_id, cell) in cells
            .iter()
            .filter(|(id, c)| !c.is_standby() && !failing.contains(id))
        {
            // A hung cell must not hold up the others' repairs.
            let Ok(Ok(status)) = tokio::time::timeout(
                THAW_INTERVAL,
                cell.admin
                    .clone()
                    .cell_status(cell_pb::CellStatusRequest::default()),
            )
            .await
            else {
                continue;
            };
            for key in status.into_inner().keys.into_iter().filter(|k| k.frozen) {
                let tenant_id = key.tenant_id.clone();
                let Ok(list) = control
                    .call(|mut c| {
                        let tenant_id = tenant_id.clone();
                        async move {
                            c.list_migrations(pb::ListMigrationsRequest {
                                active_only: false,
                                tenant_id,
                            })
                            .await
                        }
                    })
                    .await
                else {
                    continue;
                };
                let latest = list.migrations.into_iter().rev().find(|m| {
                    m.conversation_id == key.conversation_id && m.source_cell == *cell_id
                });
                let Some(m) = latest else { continue };
                match repair_frozen(&m) {
                    Some(Repair::Thaw) => thaw(&cells, &m).await,
                    Some(Repair::Revoke { to_cell, to_epoch }) => {
                        let _ = cell
                            .admin
                            .clone()
                            .revoke(cell_pb::RevokeRequest {
                                tenant_id: m.tenant_id.clone(),
                                conversation_id: m.conversation_id.clone(),
                                new_cell_id: to_cell,
                                new_epoch: to_epoch,
                            })
                            .await;
                    }
                    None => {}
                }
            }
        }
    }
}

/// What the target side has copied so far.
#[derive(Debug, Default, Clone, Copy)]
struct Copied {
    lsn: u64,
    rows: u64,
    bytes: u64,
}

struct Worker {
    control: ControlPlane,
    cells: LocalCells,
}

impl Worker {
    async fn carry_out(self, mut m: pb::Migration) {
        let id = m.migration_id.clone();
        let Some(target) = self.cells.get(&m.target_cell).map(|c| c.admin.clone()) else {
            return;
        };
        // The watch is served by whichever node answered, which may lag: a migration it shows
        // under way may have ended since, and a copy done again after its switch would bring
        // the source's later purge. Work from the current record, read linearizably.
        m = loop {
            match self.get(&id).await {
                Ok(current) => break current,
                Err(status) if status.code() == Code::NotFound => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut copied = Copied {
            lsn: m.copied_lsn,
            rows: m.rows_copied,
            bytes: m.bytes_copied,
        };
        let mut source: Option<CellAdminClient<Channel>> = None;
        let mut failures = 0u32;
        tracing::info!(migration = %id, tenant = %m.tenant_id, conversation = %m.conversation_id, from = %m.source_cell, to = %m.target_cell, "carrying out migration");
        loop {
            let current = phase(&m);
            let work = match next_step(&m, now_ms()) {
                Step::Do(work) => work,
                Step::Finish { thaw_source } => {
                    if thaw_source && let Some(source) = &mut source {
                        let _ = source.unfreeze(key_request(&m)).await;
                    }
                    tracing::info!(migration = %id, phase = current.as_str_name(), error = %m.error, "migration finished");
                    return;
                }
                Step::Poll => {
                    tokio::time::sleep(CATCH_UP_PAUSE).await;
                    m = self.get(&id).await.unwrap_or(m);
                    continue;
                }
            };
            if source.is_none() {
                source = self.source_admin(&m.source_cell).await.ok();
            }
            let done = match &mut source {
                Some(source) => self.execute(&m, work, source, &target, &mut copied).await,
                None => Err(Status::unavailable(format!(
                    "source cell {:?} is not known to the control plane",
                    m.source_cell
                ))),
            };
            let report = match done {
                Ok(Some(report)) => {
                    failures = 0;
                    report
                }
                // Nothing to report yet (a grace period running): do the phase again.
                Ok(None) => continue,
                Err(status) => {
                    failures += 1;
                    tracing::warn!(migration = %id, phase = current.as_str_name(), failures, %status, "migration step failed");
                    match on_failure(current, failures) {
                        OnFailure::Retry(pause) => {
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        OnFailure::Report => pb::ReportMigrationRequest {
                            migration_id: id.clone(),
                            phase: current as i32,
                            error: format!(
                                "{} failed {failures} times: {status}",
                                current.as_str_name()
                            ),
                            ..Default::default()
                        },
                    }
                }
            };
            match self
                .control
                .call(|mut c| {
                    let report = report.clone();
                    async move { c.report_migration(report).await }
                })
                .await
            {
                Ok(next) => {
                    let stayed = phase(&next) == current;
                    m = next;
                    if stayed && current == Phase::CatchingUp {
                        tokio::time::sleep(CATCH_UP_PAUSE).await;
                    }
                }
                Err(status) if status.code() == Code::NotFound => return,
                Err(status) => {
                    tracing::warn!(migration = %id, %status, "report not accepted; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn get(&self, id: &str) -> Result<pb::Migration, Status> {
        let id = id.to_string();
        self.control
            .call(|mut c| {
                let migration_id = id.clone();
                async move {
                    c.get_migration(pb::GetMigrationRequest { migration_id })
                        .await
                }
            })
            .await
    }

    async fn source_admin(&self, cell_id: &str) -> Result<CellAdminClient<Channel>, Status> {
        if let Some(cell) = self.cells.get(cell_id) {
            return Ok(cell.admin.clone());
        }
        let cell_id = cell_id.to_string();
        let cell = self
            .control
            .call(|mut c| {
                let cell_id = cell_id.clone();
                async move { c.get_cell(pb::GetCellRequest { cell_id }).await }
            })
            .await?;
        remote_admin(&cell.endpoint, self.control.tls())
    }

    /// Does `work` once and says what to report (nothing yet, when it has to wait).
    async fn execute(
        &self,
        m: &pb::Migration,
        work: Work,
        source: &mut CellAdminClient<Channel>,
        target: &CellAdminClient<Channel>,
        copied: &mut Copied,
    ) -> Result<Option<pb::ReportMigrationRequest>, Status> {
        let mut report = pb::ReportMigrationRequest {
            migration_id: m.migration_id.clone(),
            phase: m.phase,
            ..Default::default()
        };
        let name = work.name();
        crash_point(&format!("migrate-{name}-before"));
        let revoke_source = |epoch| cell_pb::RevokeRequest {
            tenant_id: m.tenant_id.clone(),
            conversation_id: m.conversation_id.clone(),
            new_cell_id: m.target_cell.clone(),
            new_epoch: epoch,
        };
        match work {
            Work::Copy => {
                pull(m, source, target, 0, false, copied).await?;
                report.source_lsn = copied.lsn;
                report.phase_done = true;
            }
            Work::CatchUp => {
                pull(m, source, target, copied.lsn, true, copied).await?;
                report.source_lsn = source
                    .cell_status(cell_pb::CellStatusRequest { without_keys: true })
                    .await?
                    .into_inner()
                    .last_lsn;
            }
            Work::Freeze => {
                let frozen = source.freeze(key_request(m)).await?.into_inner().last_lsn;
                while copied.lsn < frozen {
                    let before = copied.lsn;
                    pull(m, source, target, copied.lsn, true, copied).await?;
                    if copied.lsn == before {
                        return Err(Status::internal(format!(
                            "the source's tail stopped at LSN {before}, below the frozen LSN {frozen}"
                        )));
                    }
                }
                report.frozen_lsn = frozen;
                report.source_lsn = frozen;
                report.phase_done = true;
            }
            Work::Switch { epoch } => {
                target
                    .clone()
                    .grant(cell_pb::GrantRequest {
                        tenant_id: m.tenant_id.clone(),
                        conversation_id: m.conversation_id.clone(),
                        epoch,
                    })
                    .await?;
                // The source is frozen, so it takes no writes either way; the revocation tells
                // writers that still reach it where the key went. Its own agent revokes it too.
                if let Err(status) = source.revoke(revoke_source(epoch)).await {
                    tracing::warn!(migration = %m.migration_id, %status, "source not revoked yet; its agent will");
                }
                report.phase_done = true;
            }
            Work::Cleanup { epoch, purge } => {
                // The source is surely revoked before anything is dropped.
                source.revoke(revoke_source(epoch)).await?;
                match purge {
                    Purge::After(wait) => {
                        tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                        return Ok(None);
                    }
                    // The source's cell log records the purge like any change.
                    Purge::Now => {
                        source.purge(key_request(m)).await?;
                    }
                    Purge::Never => {}
                }
                report.phase_done = true;
            }
        }
        report.copied_lsn = copied.lsn;
        report.rows_copied = copied.rows;
        report.bytes_copied = copied.bytes;
        // Done, not yet reported: the step is done again after a restart.
        crash_point(&format!("migrate-{name}-after"));
        Ok(Some(report))
    }
}

/// Streams the key's export from the source into the target's import: a snapshot of its rows
/// (`from_lsn` 0), or its log after `from_lsn`. Updates `copied` with what the target holds.
async fn pull(
    m: &pb::Migration,
    source: &mut CellAdminClient<Channel>,
    target: &CellAdminClient<Channel>,
    from_lsn: u64,
    log_only: bool,
    copied: &mut Copied,
) -> Result<(), Status> {
    let mut export = source
        .export(cell_pb::ExportRequest {
            tenant_id: m.tenant_id.clone(),
            conversation_id: m.conversation_id.clone(),
            from_lsn,
            log_only,
        })
        .await?
        .into_inner();
    let (tx, rx) = mpsc::channel::<cell_pb::ExportChunk>(4);
    let mut target = target.clone();
    let import = tokio::spawn(async move { target.import(ReceiverStream::new(rx)).await });
    let mut rows = 0u64;
    let mut bytes = 0u64;
    let mut failed = None;
    loop {
        match export.message().await {
            Ok(Some(chunk)) => {
                rows += chunk.rows.len() as u64 + chunk.log_records.len() as u64;
                bytes += chunk
                    .rows
                    .iter()
                    .map(|r| (r.key.len() + r.value.len()) as u64)
                    .sum::<u64>()
                    + chunk
                        .log_records
                        .iter()
                        .map(|r| r.len() as u64)
                        .sum::<u64>();
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                failed = Some(status);
                break;
            }
        }
    }
    drop(tx);
    let imported = import
        .await
        .map_err(|e| Status::internal(format!("import task: {e}")))?;
    if let Some(status) = failed {
        return Err(status);
    }
    let imported = imported?.into_inner();
    copied.lsn = copied.lsn.max(imported.source_lsn);
    copied.rows += rows;
    copied.bytes += bytes;
    Ok(())
}
