//! What the `Migration` and `CellFailover` controllers share: each object starts one run in
//! the control plane, once, and mirrors it into its status. The run's id is kept in the
//! status; an object whose status lost it (the operator stopped between the start and the
//! status write) finds and adopts the run instead of starting a second.

use std::fmt::Debug;
use std::future::Future;

use kube::core::object::HasStatus;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::conditions::{Conditions, WithConditions};
use super::{Context, Error, writes};

/// A run as its object's status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<S> {
    pub status: S,
    pub conditions: Conditions,
    /// Still under way: look again soon.
    pub poll: bool,
}

/// A resource whose object starts one run.
pub trait Run:
    Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + Debug + Send + Sync
{
    /// The run, as the control plane answers it.
    type Remote: Send + Sync;
    /// The Control call that starts a run, as Events name it.
    const START: &'static str;
    /// The run's id and phase, as the status keeps them.
    fn run_id(status: &Self::Status) -> Option<&String>;
    fn phase(status: &Self::Status) -> Option<&String>;
    fn decide(run: &Self::Remote) -> Decision<Self::Status>;
    /// The run in an Event's words.
    fn describe(run: &Self::Remote) -> String;
    fn start(
        &self,
        ctx: &Context,
    ) -> impl Future<Output = Result<Result<Self::Remote, tonic::Status>, Error>> + Send;
}

/// Holds the object with the finalizer, starts its run unless `found` is it (adopting a run
/// its status does not name yet), and mirrors the run into the status with an Event when it
/// settles.
pub async fn reconcile<K: Run>(
    api: &Api<K>,
    object: &K,
    ctx: &Context,
    found: Option<K::Remote>,
) -> Result<Requeue, Error>
where
    K::Status: WithConditions + Clone + Default,
{
    writes::add_finalizer(api, object).await?;
    let id_known = object.status().and_then(K::run_id).is_some();
    let decision = match found {
        Some(run) => {
            if !id_known {
                let note = format!("{} was already under way", K::describe(&run));
                ctx.event(object, false, "Adopted", "Reconcile", note).await;
            }
            K::decide(&run)
        }
        None => match object.start(ctx).await? {
            Ok(run) => {
                ctx.event(object, false, "Started", K::START, K::describe(&run))
                    .await;
                K::decide(&run)
            }
            Err(status) => {
                let status_now = K::Status::default();
                return super::refused(api, object, ctx, K::START, status.message(), status_now)
                    .await;
            }
        },
    };
    let was = object.status().and_then(K::phase);
    if !decision.poll && K::phase(&decision.status) != was {
        let c = &decision.conditions;
        let (reason, note) = if c.degraded.status {
            (c.degraded.reason, c.degraded.message.clone())
        } else {
            (c.ready.reason, c.ready.message.clone())
        };
        ctx.event(object, c.degraded.status, reason, "Reconcile", note)
            .await;
    }
    writes::write_status(api, object, decision.status, &decision.conditions).await?;
    ctx.succeeded(object);
    Ok(super::requeue(ctx, decision.poll))
}
