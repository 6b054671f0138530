//! The Kubernetes operator (`cellplane operator`): one controller per cellplane resource,
//! each reconciling its objects against the Control API.
//!
//! - [`cell`]: a `Cell` is a registered cell; deleting one drains it first;
//! - [`tenant`]: a `Tenant` is created, changes tier by a migration, and is deleted only once
//!   the control plane confirms;
//! - [`migration`] and [`failover`]: each object starts its migration or failover once and
//!   mirrors its progress; deleting one before the switch cancels it.
//!
//! Every controller decides in a pure function of the object and what the control plane holds
//! (`decide`), and a thin executor makes the one call that decision names, records an Event and
//! writes the status by server-side apply. The operator acts only on the objects it is given:
//! tenants and cells made through the API are never touched, and an object whose counterpart
//! already exists adopts it. Only the holder of the [`lease`] acts, so two replicas never do.

pub mod cell;
pub mod conditions;
mod context;
mod convert;
mod error;
pub mod failover;
mod health;
pub mod lease;
pub mod migration;
mod run;
pub mod tenant;
pub mod writes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cellplane_api::client::ControlPlane;
use cellplane_api::tls::{Tls, TlsPaths};
use futures::StreamExt;
use kube::core::object::HasStatus;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use kube::{Api, Resource};

use conditions::{Conditions, WithConditions};

pub use context::Context;
pub use error::Error;

/// The operator's field manager for server-side apply, and its Events' reporter.
pub const MANAGER: &str = "cellplane-operator";

/// What an operator is told to be.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Control-plane nodes (`host:port`); any of them serves.
    pub control_plane: Vec<String>,
    /// The operator's identity towards the control plane (an `admin` role).
    pub tls: Option<TlsPaths>,
    /// This replica's name in the Lease and in its Events (the pod's name).
    pub identity: String,
    /// Where the Lease is kept.
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease: lease::Timing,
    /// How often a settled object is looked at again, to mirror live state (a cell's heartbeat
    /// and lag) into its status.
    pub resync: Duration,
    /// gRPC health (`grpc.health.v1`), for Kubernetes' probes.
    pub health_listen: Option<SocketAddr>,
}

/// Runs the operator until `shutdown`: waits to hold the Lease, then runs the four
/// controllers until shutdown (the Lease is then given up) or until the Lease is lost (an
/// error: the process must stop acting at once).
pub async fn run(
    config: OperatorConfig,
    kube: kube::Client,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let tls = Tls::load_optional(config.tls.as_ref())?;
    let control = ControlPlane::with_tls(config.control_plane.clone(), &tls)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    if let Some(addr) = config.health_listen {
        health::spawn(addr, stopped()).await?;
    }

    let leases = Api::namespaced(kube.clone(), &config.lease_namespace);
    let mut elector = lease::Elector::new(
        leases,
        config.lease_name.clone(),
        config.identity.clone(),
        config.lease,
    );
    tokio::select! {
        acquired = elector.acquire() => acquired?,
        () = stopped() => return Ok(()),
    }
    metrics::gauge!("cellplane_operator_leader").set(1.0);
    tracing::info!(identity = %config.identity, "holding the lease; reconciling");

    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: Some(config.identity.clone()),
    };
    let ctx = Arc::new(Context::new(kube.clone(), control, reporter, config.resync));
    let controllers = futures::future::join4(
        controller::<cellplane_crds::Cell, _>(&kube, &ctx, stopped(), cell::reconcile),
        controller::<cellplane_crds::Tenant, _>(&kube, &ctx, stopped(), tenant::reconcile),
        controller::<cellplane_crds::Migration, _>(&kube, &ctx, stopped(), migration::reconcile),
        controller::<cellplane_crds::CellFailover, _>(&kube, &ctx, stopped(), failover::reconcile),
    );
    let outcome = tokio::select! {
        lost = elector.hold() => Err(lost),
        _ = controllers => Ok(()),
    };
    metrics::gauge!("cellplane_operator_leader").set(0.0);
    if outcome.is_ok() {
        // Stopped on purpose: hand the lease over now rather than let it run out.
        elector.release().await;
    }
    outcome
}

/// When to look at an object again: soon while something is under way, else at the resync.
fn requeue(ctx: &Context, poll: bool) -> Action {
    if poll {
        Action::requeue(Duration::from_millis(
            crate::limits::OPERATOR_PROGRESS_POLL_MS,
        ))
    } else {
        Action::requeue(ctx.resync)
    }
}

/// The control plane refused `call`: a Warning Event, the object Degraded with its reason
/// (over `status`), and another try at the resync.
async fn refused<K>(
    api: &Api<K>,
    object: &K,
    ctx: &Context,
    call: &str,
    why: &str,
    status: K::Status,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>
        + HasStatus
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::Status: WithConditions,
{
    ctx.event(object, true, "Refused", call, why.into()).await;
    let conditions = Conditions::degraded("Refused", format!("{call}: {why}"));
    writes::write_status(api, object, status, &conditions).await?;
    ctx.succeeded(object);
    Ok(Action::requeue(ctx.resync))
}

/// Runs one kind's controller until `stop`.
async fn controller<K, F>(
    kube: &kube::Client,
    ctx: &Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    reconcile: fn(Arc<K>, Arc<Context>) -> F,
) where
    K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + HasStatus
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::Status: WithConditions + Clone + Default + Send + Sync,
    F: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let api: Api<K> = Api::all(kube.clone());
    let observed = move |object: Arc<K>, ctx: Arc<Context>| async move {
        let kind = K::kind(&()).to_string();
        let started = std::time::Instant::now();
        let outcome = reconcile(object.clone(), ctx.clone()).await;
        metrics::histogram!("cellplane_operator_reconcile_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        if let Err(Error::Unavailable(why)) = &outcome {
            // Say so on the object while backing off; the next good reconcile clears it.
            let conditions = Conditions::degraded(
                "ControlPlaneUnavailable",
                format!("the control plane did not answer: {why}"),
            );
            let status = object.status().cloned().unwrap_or_default();
            let api: Api<K> = Api::all(ctx.kube.clone());
            if let Err(error) = writes::write_status(&api, &*object, status, &conditions).await {
                tracing::debug!(%error, "could not mark the object degraded");
            }
        }
        outcome
    };
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(stop)
        .run(observed, context::error_policy::<K>, ctx.clone())
        .for_each(|_| futures::future::ready(()))
        .await;
}
