//! The `Tenant` controller: a tenant is created at its tier in its home region, changes tier
//! by a migration the control plane plans, and is deleted (finalizer) only once the control
//! plane has confirmed it. A tenant that already exists is adopted; its home region can never
//! change, so a `Tenant` that names another one is degraded, not acted on.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use cellplane_crds::{Tenant, TenantSpec, TenantStatus};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};
use tonic::Code;

use super::conditions::Conditions;
use super::convert::{tier_from_proto, tier_to_proto};
use super::{Context, Error, writes};

/// After a tier change failed, how long before the operator tries it again: the cause (no
/// cell of the new tier with room, a cell down) is rarely gone sooner.
pub const TIER_RETRY_MS: u64 = 60_000;

/// What the control plane holds of the tenant, as far as the decision needs it.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    pub tenant: Option<pb::Tenant>,
    /// The newest whole-tenant migration to the spec's tier (looked up only while the tier
    /// differs).
    pub tier_change: Option<pb::Migration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    ChangeTier,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Option<Action>,
    /// The status without its conditions.
    pub status: TenantStatus,
    pub conditions: Conditions,
    /// Look again this soon: something is under way.
    pub poll: bool,
}

/// Decides what the tenant needs, from its spec and what the control plane holds, at `now_ms`.
pub fn decide(spec: &TenantSpec, remote: &Remote, now_ms: u64) -> Decision {
    let Some(tenant) = &remote.tenant else {
        return Decision {
            action: Some(Action::Create),
            status: TenantStatus::default(),
            conditions: Conditions::progressing("Creating", "creating the tenant"),
            poll: true,
        };
    };
    let migrating = tenant.state == pb::TenantState::TenantMigrating as i32;
    let status = TenantStatus {
        primary_cell: Some(tenant.primary_cell.clone()),
        standby_cells: tenant.standby_cells.clone(),
        epoch: tenant.epoch,
        phase: Some(if migrating { "Migrating" } else { "Placed" }.into()),
        ..TenantStatus::default()
    };
    let decision = |action, conditions, poll| Decision {
        action,
        status: status.clone(),
        conditions,
        poll,
    };
    if tenant.home_region != spec.home_region {
        return decision(
            None,
            Conditions::degraded(
                "HomeRegionDiffers",
                format!(
                    "tenant {} exists with home region {:?}, not {:?}; a home region never changes",
                    tenant.tenant_id, tenant.home_region, spec.home_region
                ),
            ),
            false,
        );
    }
    if migrating {
        return decision(
            None,
            Conditions::progressing("Migrating", "a migration of the tenant is under way"),
            true,
        );
    }
    let tier = tier_from_proto(tenant.tier);
    if tier != Some(spec.tier) {
        if let Some(failed) = remote
            .tier_change
            .as_ref()
            .filter(|m| given_up(m) && now_ms < m.updated_ms.saturating_add(TIER_RETRY_MS))
        {
            return decision(
                None,
                Conditions::degraded(
                    "TierChangeFailed",
                    format!(
                        "migration {} to {:?} ended {}: {}; retried {} s after it",
                        failed.migration_id,
                        spec.tier,
                        super::convert::name(
                            super::convert::migration_phase(failed.phase).as_str_name(),
                            "MIGRATION_PHASE_"
                        ),
                        failed.error,
                        TIER_RETRY_MS / 1000
                    ),
                ),
                false,
            );
        }
        return decision(
            Some(Action::ChangeTier),
            Conditions::progressing(
                "ChangingTier",
                format!("moving the tenant from {tier:?} to {:?}", spec.tier),
            ),
            true,
        );
    }
    let placed = format!("on cell {} at epoch {}", tenant.primary_cell, tenant.epoch);
    let conditions = if tenant.guarantee_holds {
        Conditions::ready("Placed", placed)
    } else {
        let protection = match pb::Protection::try_from(tenant.protection) {
            Ok(pb::Protection::Unspecified) | Err(_) => "not yet reported".to_string(),
            Ok(known) => super::convert::name(known.as_str_name(), "PROTECTION_"),
        };
        Conditions::ready("Placed", placed).and_degraded(
            "Unprotected",
            format!(
                "the protection of cell {} is {protection}: the {:?} tier's guarantee does not hold now",
                tenant.primary_cell, spec.tier
            ),
        )
    };
    decision(None, conditions, false)
}

fn given_up(migration: &pb::Migration) -> bool {
    matches!(
        super::convert::migration_phase(migration.phase),
        pb::MigrationPhase::Failed | pb::MigrationPhase::RolledBack
    )
}

/// What deleting the tenant needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    Delete,
    /// A migration of the tenant must end first (the control plane refuses the delete).
    Wait,
    /// The control plane holds no such tenant: the object may go.
    Gone,
}

pub fn decide_deletion(remote: &Remote) -> Deletion {
    match &remote.tenant {
        None => Deletion::Gone,
        Some(t) if t.state == pb::TenantState::TenantMigrating as i32 => Deletion::Wait,
        Some(_) => Deletion::Delete,
    }
}

async fn fetch(ctx: &Context, object: &Tenant) -> Result<Remote, Error> {
    let id = object.name_any();
    let tenant = match ctx
        .call(|mut c| {
            let request = pb::GetTenantRequest {
                tenant_id: id.clone(),
            };
            async move { c.get_tenant(request).await }
        })
        .await?
    {
        Ok(tenant) => Some(tenant),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => return Err(Error::Refused(status.message().into())),
    };
    let wanted = tier_to_proto(object.spec.tier) as i32;
    let tier_change = match &tenant {
        Some(t) if t.tier != wanted => ctx
            .call(|mut c| {
                let request = pb::ListMigrationsRequest {
                    active_only: false,
                    tenant_id: id.clone(),
                };
                async move { c.list_migrations(request).await }
            })
            .await?
            .map_err(|s| Error::Refused(s.message().into()))?
            .migrations
            .into_iter()
            .filter(|m| m.conversation_id.is_empty() && m.new_tier == wanted)
            .max_by_key(|m| m.created_ms),
        _ => None,
    };
    Ok(Remote {
        tenant,
        tier_change,
    })
}

pub async fn reconcile(object: Arc<Tenant>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let api: Api<Tenant> = Api::all(ctx.kube.clone());
    if object.metadata.deletion_timestamp.is_some() {
        return delete(&api, &object, &ctx).await;
    }
    writes::add_finalizer(&api, &object).await?;
    let id = object.name_any();
    let spec = &object.spec;

    let remote = fetch(&ctx, &object).await?;
    let mut decision = decide(spec, &remote, cellplane_api::clock::now_ms());
    let first_look = object
        .status
        .as_ref()
        .is_none_or(|s| s.primary_cell.is_none());
    if let Some(action) = decision.action {
        let answer = match action {
            Action::Create => {
                ctx.call(|mut c| {
                    let request = pb::CreateTenantRequest {
                        tenant_id: id.clone(),
                        tier: tier_to_proto(spec.tier) as i32,
                        home_region: spec.home_region.clone(),
                    };
                    async move { c.create_tenant(request).await.map(|r| r.map(drop)) }
                })
                .await?
            }
            Action::ChangeTier => {
                ctx.call(|mut c| {
                    let request = pb::SetTenantTierRequest {
                        tenant_id: id.clone(),
                        tier: tier_to_proto(spec.tier) as i32,
                    };
                    async move { c.set_tenant_tier(request).await.map(|r| r.map(drop)) }
                })
                .await?
            }
        };
        let (reason, note) = match (action, answer) {
            (Action::Create, Ok(())) => (
                "Created",
                format!("created at {:?} in region {}", spec.tier, spec.home_region),
            ),
            // Made meanwhile through the API: adopted, as if it had been there first.
            (Action::Create, Err(s)) if s.code() == Code::AlreadyExists => {
                ("Adopted", "the tenant exists in the control plane".into())
            }
            (Action::ChangeTier, Ok(())) => (
                "ChangingTier",
                format!("migrating to a {:?} cell", spec.tier),
            ),
            (action, Err(status)) => {
                let verb = match action {
                    Action::Create => "CreateTenant",
                    Action::ChangeTier => "SetTenantTier",
                };
                return super::refused(
                    &api,
                    &*object,
                    &ctx,
                    verb,
                    status.message(),
                    decision.status,
                )
                .await;
            }
        };
        ctx.event(&*object, false, reason, "Reconcile", note).await;
        let remote = fetch(&ctx, &object).await?;
        decision = decide(spec, &remote, cellplane_api::clock::now_ms());
    } else if first_look && remote.tenant.is_some() {
        ctx.event(
            &*object,
            false,
            "Adopted",
            "Reconcile",
            "the tenant exists in the control plane".into(),
        )
        .await;
    }
    writes::write_status(&api, &*object, decision.status, &decision.conditions).await?;
    ctx.succeeded(&*object);
    Ok(super::requeue(&ctx, decision.poll))
}

async fn delete(api: &Api<Tenant>, object: &Tenant, ctx: &Context) -> Result<Requeue, Error> {
    if !writes::has_finalizer(object) {
        return Ok(Requeue::await_change());
    }
    let id = object.name_any();
    let remote = fetch(ctx, object).await?;
    match decide_deletion(&remote) {
        Deletion::Wait => {
            let conditions = Conditions::progressing(
                "Deleting",
                "waiting for the tenant's migration to end before deleting it",
            );
            let mut status = object.status.clone().unwrap_or_default();
            status.phase = Some("Deleting".into());
            writes::write_status(api, object, status, &conditions).await?;
            return Ok(super::requeue(ctx, true));
        }
        Deletion::Delete => {
            let answer = ctx
                .call(|mut c| {
                    let request = pb::DeleteTenantRequest {
                        tenant_id: id.clone(),
                    };
                    async move { c.delete_tenant(request).await }
                })
                .await?;
            match answer {
                Ok(done) => {
                    ctx.event(
                        object,
                        false,
                        "Deleted",
                        "DeleteTenant",
                        format!("deleted at revision {}", done.revision),
                    )
                    .await;
                }
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => {
                    let status_now = object.status.clone().unwrap_or_default();
                    return super::refused(
                        api,
                        object,
                        ctx,
                        "DeleteTenant",
                        status.message(),
                        status_now,
                    )
                    .await;
                }
            }
        }
        Deletion::Gone => {}
    }
    writes::remove_finalizer(api, object).await?;
    ctx.succeeded(object);
    Ok(Requeue::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_crds::Tier;

    fn spec(tier: Tier) -> TenantSpec {
        TenantSpec {
            tier,
            home_region: "hz".into(),
        }
    }

    fn placed(tier: pb::Tier, state: pb::TenantState) -> pb::Tenant {
        pb::Tenant {
            tenant_id: "t".into(),
            tier: tier as i32,
            home_region: "hz".into(),
            primary_cell: "c1".into(),
            epoch: 3,
            state: state as i32,
            guarantee_holds: true,
            ..pb::Tenant::default()
        }
    }

    fn remote(tenant: Option<pb::Tenant>, tier_change: Option<pb::Migration>) -> Remote {
        Remote {
            tenant,
            tier_change,
        }
    }

    #[test]
    fn a_missing_tenant_is_created_and_a_placed_one_is_ready() {
        let d = decide(&spec(Tier::Normal), &remote(None, None), 0);
        assert_eq!(d.action, Some(Action::Create));
        let t = placed(pb::Tier::Normal, pb::TenantState::TenantActive);
        let d = decide(&spec(Tier::Normal), &remote(Some(t.clone()), None), 0);
        assert_eq!(d.action, None);
        assert!(d.conditions.ready.status && !d.conditions.degraded.status);
        assert_eq!(d.status.primary_cell.as_deref(), Some("c1"));
        assert_eq!(d.status.epoch, 3);
        let unprotected = pb::Tenant {
            guarantee_holds: false,
            ..t
        };
        let d = decide(&spec(Tier::Normal), &remote(Some(unprotected), None), 0);
        assert!(d.conditions.ready.status && d.conditions.degraded.status);
    }

    #[test]
    fn a_tier_change_starts_once_waits_for_its_migration_and_retries_after_a_failure() {
        let t = placed(pb::Tier::Normal, pb::TenantState::TenantActive);
        let d = decide(&spec(Tier::High), &remote(Some(t.clone()), None), 0);
        assert_eq!(d.action, Some(Action::ChangeTier));
        let migrating = placed(pb::Tier::Normal, pb::TenantState::TenantMigrating);
        let d = decide(&spec(Tier::High), &remote(Some(migrating), None), 0);
        assert_eq!(d.action, None);
        assert!(d.poll && d.conditions.progressing.status);
        let failed = pb::Migration {
            phase: pb::MigrationPhase::Failed as i32,
            updated_ms: 1_000,
            error: "no HIGH cell".into(),
            ..pb::Migration::default()
        };
        let d = decide(
            &spec(Tier::High),
            &remote(Some(t.clone()), Some(failed.clone())),
            2_000,
        );
        assert_eq!(d.action, None);
        assert!(d.conditions.degraded.status);
        assert!(d.conditions.degraded.message.contains("no HIGH cell"));
        let later = 1_000 + TIER_RETRY_MS;
        let d = decide(&spec(Tier::High), &remote(Some(t), Some(failed)), later);
        assert_eq!(d.action, Some(Action::ChangeTier));
    }

    #[test]
    fn a_tenant_of_another_home_region_is_never_acted_on() {
        let t = pb::Tenant {
            home_region: "eu".into(),
            ..placed(pb::Tier::Low, pb::TenantState::TenantActive)
        };
        let d = decide(&spec(Tier::High), &remote(Some(t), None), 0);
        assert_eq!(d.action, None);
        assert_eq!(d.conditions.degraded.reason, "HomeRegionDiffers");
    }

    #[test]
    fn deletion_waits_for_a_migration_and_ends_when_the_tenant_is_gone() {
        let active = placed(pb::Tier::Normal, pb::TenantState::TenantActive);
        let migrating = placed(pb::Tier::Normal, pb::TenantState::TenantMigrating);
        assert_eq!(
            decide_deletion(&remote(Some(active), None)),
            Deletion::Delete
        );
        assert_eq!(
            decide_deletion(&remote(Some(migrating), None)),
            Deletion::Wait
        );
        assert_eq!(decide_deletion(&remote(None, None)), Deletion::Gone);
    }
}
