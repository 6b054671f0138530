//! What the `Migration` and `CellFailover` controllers share: each object starts one run in
//! the control plane, once, and mirrors it into its status. The run's id is kept in the
//! status. Starting and recording the id are two steps, so before starting, the status records
//! the number of the newest run the control plane kept (ids are the revisions that made them);
//! an object whose status has that number but no id (the operator stopped in between) adopts
//! the first later run of its key or cell instead of starting a second, and never an older
//! one, however close in time.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

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

/// What deleting an object needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Not switched yet: roll it back.
    Cancel,
    /// Switched (or cancelled) and not finished: it runs to its end.
    Wait,
    /// Finished, or not known to the control plane: the object may go.
    Release,
}

/// What the control plane holds for an object: its run, when found, and otherwise the number
/// of the newest run it keeps of the object's key or cell (0 for none).
#[derive(Debug, Clone, PartialEq)]
pub struct Found<R> {
    pub run: Option<R>,
    pub newest: u64,
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
    /// The newest run's number recorded before starting.
    fn started_after(status: &Self::Status) -> Option<u64>;
    fn set_started_after(status: &mut Self::Status, after: u64);
    fn decide(run: &Self::Remote) -> Decision<Self::Status>;
    /// The run in an Event's words.
    fn describe(run: &Self::Remote) -> String;
    fn start(
        &self,
        ctx: &Context,
    ) -> impl Future<Output = Result<Result<Self::Remote, tonic::Status>, Error>> + Send;
    /// Returns once `run` (under way) may have changed: when the control plane says it did,
    /// or after a while. The object is looked at again at once.
    fn changed(ctx: &Context, run: &Self::Remote) -> impl Future<Output = ()> + Send;
}

/// Holds the object with the finalizer, starts its run unless `found` has it (adopting a run
/// its status does not name yet), and mirrors the run into the status with an Event when it
/// settles.
pub async fn reconcile<K: Run>(
    api: &Api<K>,
    object: &K,
    ctx: &Context,
    found: Found<K::Remote>,
) -> Result<Requeue, Error>
where
    K::Status: WithConditions + Clone + Default,
{
    writes::add_finalizer(api, object).await?;
    let id_known = object.status().and_then(K::run_id).is_some();
    let recorded = object.status().and_then(K::started_after);
    let after = recorded.unwrap_or(found.newest);
    let run = match found.run {
        Some(run) => {
            if !id_known {
                let note = format!("{} was already under way", K::describe(&run));
                ctx.event(object, false, "Adopted", "Reconcile", note).await;
            }
            run
        }
        None => {
            if recorded.is_none() {
                let mut starting = K::Status::default();
                K::set_started_after(&mut starting, after);
                let conditions =
                    Conditions::progressing("Starting", format!("{} after run {after}", K::START));
                writes::write_status(api, object, starting, &conditions).await?;
            }
            match object.start(ctx).await? {
                Ok(run) => {
                    ctx.event(object, false, "Started", K::START, K::describe(&run))
                        .await;
                    run
                }
                // Refused: nothing started, so the next try records the newest run afresh
                // (another may have begun meanwhile, which is not this object's).
                Err(status) => {
                    let cleared = K::Status::default();
                    return super::refused(api, object, ctx, K::START, status.message(), cleared)
                        .await;
                }
            }
        }
    };
    let mut decision = K::decide(&run);
    K::set_started_after(&mut decision.status, after);
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
    if decision.poll {
        K::changed(ctx, &run).await;
        return Ok(Requeue::requeue(Duration::ZERO));
    }
    Ok(super::requeue(ctx, false))
}
