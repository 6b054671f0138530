//! The `Migration` controller: each object starts its history-first migration once and
//! mirrors its progress (phase, records copied, lag, the write pause), as a [`Run`]. An object
//! whose status lost the migration's id adopts the first migration of its key to its target
//! after the newest one recorded before it started. Deleting the object before the route
//! switched cancels the migration (finalizer).

use std::sync::Arc;
use std::time::Duration;

use cellplane_api::proto::control as pb;
use cellplane_crds::{Migration, MigrationSpec, MigrationStatus};
use kube::Api;
use kube::runtime::controller::Action as Requeue;
use tonic::Code;

use super::conditions::Conditions;
use super::convert::{migration_phase, name};
use super::run::{self, Decision, Deletion, Found, Run};
use super::{Context, Error, writes};
use crate::limits::{OPERATOR_PROGRESS_POLL_MS, OPERATOR_PROGRESS_WAIT_MS};
use crate::migration::record::parse_id;

/// Among the key's migrations, the one this object started: to its target, numbered after
/// `after` (the tenant's newest when the object started its own), the first.
pub fn adoptable<'a>(
    spec: &MigrationSpec,
    after: u64,
    migrations: &'a [pb::Migration],
) -> Option<&'a pb::Migration> {
    let conversation = spec.conversation.as_deref().unwrap_or("");
    migrations
        .iter()
        .filter_map(|m| parse_id(&m.migration_id).map(|n| (n, m)))
        .filter(|(n, m)| {
            m.tenant_id == spec.tenant
                && m.conversation_id == conversation
                && m.target_cell == spec.target_cell
                && *n > after
        })
        .min_by_key(|(n, _)| *n)
        .map(|(_, m)| m)
}

/// The number of the newest of `migrations` (0 for none).
pub fn newest(migrations: &[pb::Migration]) -> u64 {
    migrations
        .iter()
        .filter_map(|m| parse_id(&m.migration_id))
        .max()
        .unwrap_or(0)
}

pub fn decide(m: &pb::Migration) -> Decision<MigrationStatus> {
    let phase = migration_phase(m.phase);
    let status = MigrationStatus {
        migration_id: Some(m.migration_id.clone()),
        source_cell: Some(m.source_cell.clone()),
        phase: Some(name(phase.as_str_name(), "MIGRATION_PHASE_")),
        copied: m.rows_copied,
        lag: m.source_lsn.saturating_sub(m.copied_lsn),
        pause_ms: (m.frozen_ms > 0 && m.switched_ms >= m.frozen_ms)
            .then(|| m.switched_ms - m.frozen_ms),
        ..MigrationStatus::default()
    };
    let (conditions, poll) = match phase {
        pb::MigrationPhase::Done => (
            Conditions::ready(
                "Done",
                format!(
                    "moved from {} to {} at epoch {}",
                    m.source_cell,
                    m.target_cell,
                    m.source_epoch + 1
                ),
            ),
            false,
        ),
        pb::MigrationPhase::Failed => (
            Conditions::degraded("Failed", format!("the migration failed: {}", m.error)),
            false,
        ),
        pb::MigrationPhase::RolledBack => (
            Conditions::degraded(
                "RolledBack",
                format!("the key stayed on {}: {}", m.source_cell, m.error),
            ),
            false,
        ),
        other => (
            Conditions::progressing(
                "Migrating",
                format!(
                    "{}: {} records copied",
                    name(other.as_str_name(), "MIGRATION_PHASE_"),
                    m.rows_copied
                ),
            ),
            true,
        ),
    };
    Decision {
        status,
        conditions,
        poll,
    }
}

fn before_switch(phase: pb::MigrationPhase) -> bool {
    use pb::MigrationPhase::*;
    matches!(phase, Planned | Copying | CatchingUp | Freezing)
}

fn finished(phase: pb::MigrationPhase) -> bool {
    use pb::MigrationPhase::*;
    matches!(phase, Done | RolledBack | Failed)
}

pub fn decide_deletion(migration: Option<&pb::Migration>) -> Deletion {
    match migration.map(|m| migration_phase(m.phase)) {
        None => Deletion::Release,
        Some(phase) if finished(phase) => Deletion::Release,
        Some(phase) if before_switch(phase) => Deletion::Cancel,
        Some(_) => Deletion::Wait,
    }
}

/// The object's migration: by the id in its status, else the one it may adopt once it
/// recorded the newest before starting its own.
async fn fetch(ctx: &Context, object: &Migration) -> Result<Found<pb::Migration>, Error> {
    let status = object.status.as_ref();
    if let Some(id) = status.and_then(|s| s.migration_id.clone()) {
        let answer = ctx
            .call(|mut c| {
                let request = pb::GetMigrationRequest {
                    migration_id: id.clone(),
                };
                async move { c.get_migration(request).await }
            })
            .await?;
        let run = match answer {
            Ok(m) => Some(m),
            // Finished long ago and forgotten by the control plane.
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(Error::Refused(status.message().into())),
        };
        return Ok(Found { run, newest: 0 });
    }
    let listed = ctx
        .call(|mut c| {
            let request = pb::ListMigrationsRequest {
                active_only: false,
                tenant_id: object.spec.tenant.clone(),
            };
            async move { c.list_migrations(request).await }
        })
        .await?
        .map_err(|s| Error::Refused(s.message().into()))?;
    let run = status
        .and_then(|s| s.started_after)
        .and_then(|after| adoptable(&object.spec, after, &listed.migrations))
        .cloned();
    Ok(Found {
        run,
        newest: newest(&listed.migrations),
    })
}

impl Run for Migration {
    type Remote = pb::Migration;
    const START: &'static str = "Migrate";

    fn run_id(status: &MigrationStatus) -> Option<&String> {
        status.migration_id.as_ref()
    }

    fn phase(status: &MigrationStatus) -> Option<&String> {
        status.phase.as_ref()
    }

    fn started_after(status: &MigrationStatus) -> Option<u64> {
        status.started_after
    }

    fn set_started_after(status: &mut MigrationStatus, after: u64) {
        status.started_after = Some(after);
    }

    fn decide(run: &pb::Migration) -> Decision<MigrationStatus> {
        decide(run)
    }

    fn describe(run: &pb::Migration) -> String {
        format!(
            "migration {} from {} to {}",
            run.migration_id, run.source_cell, run.target_cell
        )
    }

    /// Follows the migration's watch until a change newer than `run`: each phase shows in the
    /// status within a round trip rather than at the next poll.
    async fn changed(ctx: &Context, run: &pb::Migration) {
        let (id, seen) = (run.migration_id.clone(), run.revision);
        let next = async {
            let watched = ctx
                .call(|mut c| {
                    let request = pb::WatchMigrationRequest {
                        migration_id: id.clone(),
                    };
                    async move { c.watch_migration(request).await }
                })
                .await;
            if let Ok(Ok(mut changes)) = watched {
                while let Ok(Some(change)) = changes.message().await {
                    if change.revision > seen {
                        return;
                    }
                }
            }
            // No watch, or it ended without news: poll.
            tokio::time::sleep(Duration::from_millis(OPERATOR_PROGRESS_POLL_MS)).await;
        };
        let _ = tokio::time::timeout(Duration::from_millis(OPERATOR_PROGRESS_WAIT_MS), next).await;
    }

    async fn start(&self, ctx: &Context) -> Result<Result<pb::Migration, tonic::Status>, Error> {
        ctx.call(|mut c| {
            let spec = self.spec.clone();
            async move {
                match spec.conversation {
                    Some(conversation_id) => {
                        c.migrate_conversation(pb::MigrateConversationRequest {
                            tenant_id: spec.tenant,
                            conversation_id,
                            target_cell: spec.target_cell,
                        })
                        .await
                    }
                    None => {
                        c.migrate_tenant(pb::MigrateTenantRequest {
                            tenant_id: spec.tenant,
                            target_cell: spec.target_cell,
                        })
                        .await
                    }
                }
            }
        })
        .await
    }
}

pub async fn reconcile(object: Arc<Migration>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let api: Api<Migration> = Api::all(ctx.kube.clone());
    if object.metadata.deletion_timestamp.is_some() {
        return delete(&api, &object, &ctx).await;
    }
    let migration = fetch(&ctx, &object).await?;
    if migration.run.is_none()
        && object
            .status
            .as_ref()
            .and_then(|s| s.migration_id.as_ref())
            .is_some()
    {
        // The control plane no longer keeps it; the status says how it ended.
        return Ok(Requeue::await_change());
    }
    run::reconcile(&api, &*object, &ctx, migration).await
}

async fn delete(api: &Api<Migration>, object: &Migration, ctx: &Context) -> Result<Requeue, Error> {
    if !writes::has_finalizer(object) {
        return Ok(Requeue::await_change());
    }
    let migration = fetch(ctx, object).await?.run;
    match decide_deletion(migration.as_ref()) {
        Deletion::Cancel => {
            let id = migration.map(|m| m.migration_id).unwrap_or_default();
            let answer = ctx
                .call(|mut c| {
                    let request = pb::CancelMigrationRequest {
                        migration_id: id.clone(),
                    };
                    async move { c.cancel_migration(request).await }
                })
                .await?;
            match answer {
                Ok(_) => {
                    ctx.event(
                        object,
                        false,
                        "Cancelled",
                        "CancelMigration",
                        format!(
                            "migration {id} rolled back: the object was deleted before the switch"
                        ),
                    )
                    .await
                }
                // It switched meanwhile: it runs to its end.
                Err(status) => {
                    ctx.event(
                        object,
                        true,
                        "NotCancelled",
                        "CancelMigration",
                        status.message().into(),
                    )
                    .await
                }
            }
            Ok(super::requeue(ctx, true))
        }
        Deletion::Wait => Ok(super::requeue(ctx, true)),
        Deletion::Release => {
            writes::remove_finalizer(api, object).await?;
            ctx.succeeded(object);
            Ok(Requeue::await_change())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MigrationSpec {
        MigrationSpec {
            tenant: "t".into(),
            conversation: None,
            target_cell: "c2".into(),
        }
    }

    fn migration(
        id: &str,
        target: &str,
        created_ms: u64,
        phase: pb::MigrationPhase,
    ) -> pb::Migration {
        pb::Migration {
            migration_id: id.into(),
            tenant_id: "t".into(),
            source_cell: "c1".into(),
            target_cell: target.into(),
            created_ms,
            phase: phase as i32,
            ..pb::Migration::default()
        }
    }

    #[test]
    fn an_object_adopts_only_a_later_run_of_its_key_to_its_target() {
        use pb::MigrationPhase::*;
        // All in one second: only the numbers tell which began after the object recorded
        // mig-5 as the newest.
        let runs = [
            migration("mig-5", "c2", 1_000, Done),
            migration("mig-6", "c3", 1_000, Copying),
            migration("mig-8", "c2", 1_000, Planned),
            migration("mig-7", "c2", 1_000, Copying),
        ];
        let found = adoptable(&spec(), 5, &runs).map(|m| m.migration_id.as_str());
        assert_eq!(found, Some("mig-7"));
        assert_eq!(newest(&runs), 8);
        assert!(adoptable(&spec(), 8, &runs).is_none());
        let conversation = MigrationSpec {
            conversation: Some("c".into()),
            ..spec()
        };
        assert!(adoptable(&conversation, 0, &runs).is_none());
    }

    #[test]
    fn progress_is_mirrored_and_deletion_cancels_only_before_the_switch() {
        use pb::MigrationPhase::*;
        let copying = pb::Migration {
            rows_copied: 7,
            source_lsn: 20,
            copied_lsn: 15,
            ..migration("m", "c2", 0, Copying)
        };
        let d = decide(&copying);
        assert!(d.poll);
        assert_eq!((d.status.copied, d.status.lag), (7, 5));
        let done = pb::Migration {
            frozen_ms: 100,
            switched_ms: 130,
            ..migration("m", "c2", 0, Done)
        };
        let d = decide(&done);
        assert!(d.conditions.ready.status && !d.poll);
        assert_eq!(d.status.pause_ms, Some(30));
        assert!(
            decide(&migration("m", "c2", 0, Failed))
                .conditions
                .degraded
                .status
        );

        for phase in [Planned, Copying, CatchingUp, Freezing] {
            let m = migration("m", "c2", 0, phase);
            assert_eq!(decide_deletion(Some(&m)), Deletion::Cancel, "{phase:?}");
        }
        for phase in [Switching, Cleanup] {
            let m = migration("m", "c2", 0, phase);
            assert_eq!(decide_deletion(Some(&m)), Deletion::Wait, "{phase:?}");
        }
        for phase in [Done, RolledBack, Failed] {
            let m = migration("m", "c2", 0, phase);
            assert_eq!(decide_deletion(Some(&m)), Deletion::Release, "{phase:?}");
        }
        assert_eq!(decide_deletion(None), Deletion::Release);
    }
}
