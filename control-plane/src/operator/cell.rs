//! The `Cell` controller: a `Cell` is a cell registered with the control plane. Its agent
//! usually registers it first, and the object adopts it; otherwise the operator registers it
//! as the spec says. Its status mirrors what the control plane knows (state, tenants,
//! protection, standby lag, last heartbeat), looked at again every resync. Deleting a `Cell`
//! drains its keys to other cells first (finalizer), then removes it.

use std::sync::Arc;

use cellplane_api::proto::control as pb;
use cellplane_crds::{Cell, CellSpec, CellStatus};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};
use tonic::Code;

use super::conditions::Conditions;
use super::convert::{name, rfc3339, tier_from_proto, tier_to_proto};
use super::{Context, Error, writes};

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Register the cell (it is not registered).
    pub register: bool,
    pub status: CellStatus,
    pub conditions: Conditions,
}

/// Decides what the cell needs from its spec and its registration, if any.
pub fn decide(spec: &CellSpec, cell: Option<&pb::Cell>) -> Decision {
    let Some(cell) = cell else {
        return Decision {
            register: true,
            status: CellStatus::default(),
            conditions: Conditions::progressing("Registering", "registering the cell"),
        };
    };
    let state = pb::CellState::try_from(cell.state).unwrap_or(pb::CellState::Unspecified);
    let protection =
        pb::Protection::try_from(cell.protection).unwrap_or(pb::Protection::Unspecified);
    let lag = cell
        .replication
        .as_ref()
        .map(|r| r.standbys.iter().map(|s| s.lag_lsns).max().unwrap_or(0))
        .unwrap_or(0);
    let status = CellStatus {
        phase: Some(state.as_str_name().into()),
        tenants: cell.load,
        protection: (protection != pb::Protection::Unspecified)
            .then(|| name(protection.as_str_name(), "PROTECTION_")),
        lag,
        last_heartbeat: cell
            .health
            .as_ref()
            .and_then(|h| rfc3339(h.last_heartbeat_ms)),
        ..CellStatus::default()
    };
    let differs = differences(spec, cell);
    let conditions = if !differs.is_empty() {
        Conditions::degraded(
            "SpecDiffers",
            format!(
                "cell {} is registered with another {}; a registered cell's region, zone, tier, endpoint and capacity never change",
                cell.cell_id,
                differs.join(", ")
            ),
        )
    } else {
        match state {
            pb::CellState::Active if protection == pb::Protection::Degraded => {
                Conditions::ready("Active", "serving").and_degraded(
                    "Unprotected",
                    "the cell goes on without its synchronous standby",
                )
            }
            pb::CellState::Active if cell.health.as_ref().is_some_and(|h| !h.healthy) => {
                Conditions::ready("Active", "serving")
                    .and_degraded("Unhealthy", "its agent reports the cell unhealthy")
            }
            pb::CellState::Active => Conditions::ready("Active", "serving"),
            pb::CellState::Joining => {
                Conditions::progressing("Joining", "waiting for the cell's agent to report it")
            }
            pb::CellState::Draining => {
                Conditions::progressing("Draining", "its keys are moving to other cells")
            }
            pb::CellState::Demoted => Conditions::degraded("Demoted", "the cell was demoted"),
            pb::CellState::Failed => {
                Conditions::degraded("Failed", "the cell failed; its keys were failed over")
            }
            pb::CellState::Unspecified => Conditions::degraded("Unknown", "unknown cell state"),
        }
    };
    Decision {
        register: false,
        status,
        conditions,
    }
}

/// The spec's fields the registration disagrees with.
fn differences(spec: &CellSpec, cell: &pb::Cell) -> Vec<&'static str> {
    let mut differs = Vec::new();
    if spec.region != cell.region {
        differs.push("region");
    }
    if spec.zone != cell.zone {
        differs.push("zone");
    }
    if tier_from_proto(cell.tier) != Some(spec.tier) {
        differs.push("tier");
    }
    if spec.endpoint != cell.endpoint {
        differs.push("endpoint");
    }
    if spec.capacity != cell.capacity {
        differs.push("capacity");
    }
    differs
}

/// What deleting the cell needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// An ACTIVE primary: move its keys away (DrainCell).
    Drain,
    /// A standby, or a cell never activated: it holds no keys, so it is only taken out of
    /// service (SetCellState) before removal.
    TakeOut(pb::CellState),
    /// Its keys are still moving.
    Wait(String),
    Remove,
    /// Not registered: the object may go.
    Gone,
}

pub fn decide_deletion(cell: Option<&pb::Cell>, drain: Option<&pb::DrainProgress>) -> Deletion {
    let Some(cell) = cell else {
        return Deletion::Gone;
    };
    let state = pb::CellState::try_from(cell.state).unwrap_or(pb::CellState::Unspecified);
    match state {
        pb::CellState::Active if !cell.standby_of.is_empty() => {
            Deletion::TakeOut(pb::CellState::Draining)
        }
        pb::CellState::Active => Deletion::Drain,
        pb::CellState::Joining | pb::CellState::Unspecified => {
            Deletion::TakeOut(pb::CellState::Demoted)
        }
        pb::CellState::Draining => match drain {
            Some(d) if d.keys_left > 0 || d.migrations_running > 0 => Deletion::Wait(format!(
                "draining: {} keys left, {} migrations running{}",
                d.keys_left,
                d.migrations_running,
                if d.last_error.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {})", d.last_error)
                }
            )),
            _ => Deletion::Remove,
        },
        pb::CellState::Demoted | pb::CellState::Failed => Deletion::Remove,
    }
}

async fn fetch(ctx: &Context, id: &str) -> Result<Option<pb::Cell>, Error> {
    let answer = ctx
        .call(|mut c| {
            let request = pb::GetCellRequest {
                cell_id: id.to_string(),
            };
            async move { c.get_cell(request).await }
        })
        .await?;
    match answer {
        Ok(cell) => Ok(Some(cell)),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(Error::Refused(status.message().into())),
    }
}

pub async fn reconcile(object: Arc<Cell>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let api: Api<Cell> = Api::all(ctx.kube.clone());
    if object.metadata.deletion_timestamp.is_some() {
        return delete(&api, &object, &ctx).await;
    }
    writes::add_finalizer(&api, &object).await?;
    let id = object.name_any();
    let spec = &object.spec;

    let cell = fetch(&ctx, &id).await?;
    let mut decision = decide(spec, cell.as_ref());
    if decision.register {
        let answer = ctx
            .call(|mut c| {
                let request = pb::RegisterCellRequest {
                    cell_id: id.clone(),
                    region: spec.region.clone(),
                    zone: spec.zone.clone(),
                    tier: tier_to_proto(spec.tier) as i32,
                    endpoint: spec.endpoint.clone(),
                    capacity: spec.capacity,
                    standby_of: spec.standby_of.clone().unwrap_or_default(),
                };
                async move { c.register_cell(request).await }
            })
            .await?;
        match answer {
            Ok(cell) => {
                ctx.event(
                    &*object,
                    false,
                    "Registered",
                    "RegisterCell",
                    format!(
                        "registered in {}/{} at {}",
                        spec.region, spec.zone, spec.endpoint
                    ),
                )
                .await;
                decision = decide(spec, Some(&cell));
            }
            Err(status) => {
                return super::refused(
                    &api,
                    &*object,
                    &ctx,
                    "RegisterCell",
                    status.message(),
                    decision.status,
                )
                .await;
            }
        }
    } else if object.status.as_ref().is_none_or(|s| s.phase.is_none()) {
        ctx.event(
            &*object,
            false,
            "Adopted",
            "Reconcile",
            "the cell is registered with the control plane".into(),
        )
        .await;
    }
    writes::write_status(&api, &*object, decision.status, &decision.conditions).await?;
    ctx.succeeded(&*object);
    Ok(super::requeue(&ctx, false))
}

async fn delete(api: &Api<Cell>, object: &Cell, ctx: &Context) -> Result<Requeue, Error> {
    if !writes::has_finalizer(object) {
        return Ok(Requeue::await_change());
    }
    let id = object.name_any();
    let cell = fetch(ctx, &id).await?;
    let drain = match &cell {
        Some(c) if c.state == pb::CellState::Draining as i32 => ctx
            .call(|mut c| {
                let request = pb::GetDrainRequest {
                    cell_id: id.clone(),
                };
                async move { c.get_drain(request).await }
            })
            .await?
            .ok(),
        _ => None,
    };
    let step = decide_deletion(cell.as_ref(), drain.as_ref());
    let answer = match &step {
        Deletion::Gone => Ok(()),
        Deletion::Wait(progress) => {
            let mut status = decide(&object.spec, cell.as_ref()).status;
            status.phase = Some("DRAINING".into());
            writes::write_status(
                api,
                object,
                status,
                &Conditions::progressing("Draining", progress.clone()),
            )
            .await?;
            return Ok(super::requeue(ctx, true));
        }
        Deletion::Drain => {
            ctx.call(|mut c| {
                let request = pb::DrainCellRequest {
                    cell_id: id.clone(),
                };
                async move { c.drain_cell(request).await.map(|r| r.map(drop)) }
            })
            .await?
        }
        Deletion::TakeOut(state) => {
            ctx.call(|mut c| {
                let request = pb::SetCellStateRequest {
                    cell_id: id.clone(),
                    state: *state as i32,
                };
                async move { c.set_cell_state(request).await.map(|r| r.map(drop)) }
            })
            .await?
        }
        Deletion::Remove => {
            ctx.call(|mut c| {
                let request = pb::RemoveCellRequest {
                    cell_id: id.clone(),
                };
                async move { c.remove_cell(request).await.map(|r| r.map(drop)) }
            })
            .await?
        }
    };
    let verb = match &step {
        Deletion::Drain => "DrainCell",
        Deletion::TakeOut(_) => "SetCellState",
        Deletion::Remove => "RemoveCell",
        Deletion::Gone | Deletion::Wait(_) => "Reconcile",
    };
    if let Err(status) = answer
        && status.code() != Code::NotFound
    {
        let status_now = object.status.clone().unwrap_or_default();
        return super::refused(api, object, ctx, verb, status.message(), status_now).await;
    }
    match step {
        Deletion::Drain => {
            ctx.event(
                object,
                false,
                "Draining",
                verb,
                "moving the cell's keys to other cells before removing it".into(),
            )
            .await;
            Ok(super::requeue(ctx, true))
        }
        Deletion::TakeOut(_) => Ok(super::requeue(ctx, true)),
        Deletion::Remove | Deletion::Gone => {
            if step == Deletion::Remove {
                ctx.event(
                    object,
                    false,
                    "Removed",
                    verb,
                    "the cell is no longer registered".into(),
                )
                .await;
            }
            writes::remove_finalizer(api, object).await?;
            ctx.succeeded(object);
            Ok(Requeue::await_change())
        }
        Deletion::Wait(_) => Ok(super::requeue(ctx, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_crds::Tier;

    fn spec() -> CellSpec {
        CellSpec {
            region: "hz".into(),
            zone: "a".into(),
            tier: Tier::Normal,
            endpoint: "10.0.0.1:7000".into(),
            capacity: 100,
            standby_of: None,
            primary_zone: None,
        }
    }

    fn registered(state: pb::CellState) -> pb::Cell {
        pb::Cell {
            cell_id: "c1".into(),
            region: "hz".into(),
            zone: "a".into(),
            tier: pb::Tier::Normal as i32,
            endpoint: "10.0.0.1:7000".into(),
            capacity: 100,
            state: state as i32,
            ..pb::Cell::default()
        }
    }

    #[test]
    fn an_unregistered_cell_is_registered_and_a_different_one_is_never_changed() {
        assert!(decide(&spec(), None).register);
        let d = decide(&spec(), Some(&registered(pb::CellState::Active)));
        assert!(!d.register && d.conditions.ready.status);
        assert_eq!(d.status.phase.as_deref(), Some("ACTIVE"));
        let other = pb::Cell {
            zone: "b".into(),
            capacity: 5,
            ..registered(pb::CellState::Active)
        };
        let d = decide(&spec(), Some(&other));
        assert!(!d.register);
        assert_eq!(d.conditions.degraded.reason, "SpecDiffers");
        assert!(d.conditions.degraded.message.contains("zone, capacity"));
    }

    #[test]
    fn deletion_drains_a_primary_takes_out_the_rest_and_removes_once_empty() {
        use pb::CellState::*;
        let cell = |state| Some(registered(state));
        assert_eq!(
            decide_deletion(cell(Active).as_ref(), None),
            Deletion::Drain
        );
        let standby = pb::Cell {
            standby_of: "c0".into(),
            ..registered(Active)
        };
        assert_eq!(
            decide_deletion(Some(&standby), None),
            Deletion::TakeOut(Draining)
        );
        assert_eq!(
            decide_deletion(cell(Joining).as_ref(), None),
            Deletion::TakeOut(Demoted)
        );
        let busy = pb::DrainProgress {
            keys_left: 2,
            ..pb::DrainProgress::default()
        };
        assert!(matches!(
            decide_deletion(cell(Draining).as_ref(), Some(&busy)),
            Deletion::Wait(_)
        ));
        let empty = pb::DrainProgress::default();
        assert_eq!(
            decide_deletion(cell(Draining).as_ref(), Some(&empty)),
            Deletion::Remove
        );
        assert_eq!(
            decide_deletion(cell(Failed).as_ref(), None),
            Deletion::Remove
        );
        assert_eq!(decide_deletion(None, None), Deletion::Gone);
    }
}
