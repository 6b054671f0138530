//! One IM cell: opens its store, starts the writer, and serves Messaging, Sync, CellAdmin,
//! Replication, health and reflection on one listener until told to stop. A standby also
//! follows its primary's cell log.

use std::future::Future;
use std::time::Duration;

use cellplane_api::auth::{AuthLayer, Policy};
use cellplane_api::net::Listener;
use cellplane_api::proto;
use cellplane_api::tls::Tls;
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::config::{CellConfig, ConfigError};
use crate::error::CellError;
use crate::lease::Lease;
use crate::messaging::MessagingService;
use crate::pns::Notifier;
use crate::replication::ReplicationState;
use crate::replication::gate::SyncGate;
use crate::replication::primary::{self, ReplicationService};
use crate::replication::role::Role;
use crate::replication::standby;
use crate::store::Store;
use crate::store::log_trim::LogBound;
use crate::store::writer::Writer;
use crate::sync::SyncService;
use crate::sync::hub::SyncHub;

/// How often a synchronous primary checks whether its answers waited too long.
const GATE_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cell(#[from] CellError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] cellplane_api::tls::TlsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the cell until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    config: CellConfig,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = Tls::load_optional(config.tls.as_ref())?;
    serve_with(config, tls, listener.into(), shutdown).await
}

/// [`serve`] with `tls` given rather than loaded from the config: the simulation passes
/// plaintext over its own network.
pub async fn serve_with(
    config: CellConfig,
    tls: Tls,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)?;
    // Twice the rebase threshold: a device that was just told to read its backlog still finds
    // it while its user's head moves on.
    let store = Store::open(
        &config.data_dir,
        config.limits.rebase_backlog_events.saturating_mul(2),
    )?;
    let notifier = config
        .pns
        .clone()
        .map(|pns| Notifier::start(config.cell_id.clone(), pns, store.clone()))
        .transpose()?;
    let hub = SyncHub::with_notifier(notifier);
    // A standby promoted before it restarted stays a primary when started again as the
    // standby of the primary it was promoted from (its configured role); started as the
    // standby of another, or as one that rejoined after a failover moved its keys away, it is
    // a standby again and starts over from that primary's snapshot.
    let promotion = store.promotion()?;
    let standby = match (&config.standby, &promotion) {
        (Some(standby), Some(promotion))
            if promotion.from == standby.primary_cell_id && !standby.rejoined =>
        {
            tracing::info!(from = %promotion.from, applied_lsn = promotion.applied_lsn, "this standby was promoted before: serving as a primary");
            None
        }
        (standby, _) => standby.clone(),
    };
    match &standby {
        Some(standby) => {
            if store.follow(&standby.primary_cell_id)? {
                tracing::info!(primary = %standby.primary_cell_id, "following a new primary: starting over from its snapshot");
            }
        }
        // A standby holds its primary's grants: run as a primary without a promotion, it
        // could write keys another cell owns.
        None => {
            if let (Some(followed), None) = (store.followed()?, &promotion) {
                return Err(ServeError::Config(ConfigError::new(
                    "standby",
                    format!(
                        "this cell's data is a standby of {followed:?} and was never promoted: start it with --standby-of {followed} (or promote it)"
                    ),
                )));
            }
        }
    }
    let standby_of = standby.as_ref().map(|s| s.primary_cell_id.clone());
    let role = Role::new(standby_of.clone());
    let lease = Lease::new(
        config.lease_required,
        cellplane_api::clock::Monotonic::of(&config.data_dir),
    );
    // A standby answers nobody's sends: standbys configured for it (a primary that rejoined
    // as a standby keeps its config) wait for nothing.
    let sync_standbys = match &standby {
        Some(_) => Vec::new(),
        None => config.replication.sync_standbys.clone(),
    };
    let gate = SyncGate::new(
        &sync_standbys,
        Duration::from_millis(config.replication.sync_timeout_ms),
        store.last_lsn()?,
        hub.clone(),
    );
    let (closing_tx, closing) = watch::channel(false);
    // Always: standbys can be added while the cell runs.
    {
        let gate = gate.clone();
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(GATE_TICK);
            loop {
                tokio::select! {
                    _ = ticker.tick() => gate.tick(tokio::time::Instant::now()),
                    _ = closing.wait_for(|closing| *closing) => return,
                }
            }
        });
    }
    let writer = Writer::start(
        store.clone(),
        config.cell_id.clone(),
        role.clone(),
        lease.clone(),
        config.limits.clone(),
        LogBound {
            max_bytes: config.replication.log_retention_bytes,
            max_age: Duration::from_millis(config.replication.log_retention_ms),
        },
        gate.clone(),
    )?;
    let held = gate.clone();
    let replication = ReplicationState::new(gate);
    primary::track_commits(writer.commits(), replication.clone());
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    if let Some(primary) = standby {
        tokio::spawn(standby::run(
            config.cell_id.clone(),
            standby::Primary {
                config: primary,
                tls: tls.clone(),
            },
            role.clone(),
            store.clone(),
            writer.clone(),
            replication.clone(),
            closing.clone(),
        ));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::cell::messaging_server::MessagingServer<MessagingService>>()
        .await;
    health_reporter
        .set_serving::<proto::cell::sync_server::SyncServer<SyncService>>()
        .await;
    let (reflection, reflection_v1alpha) = cellplane_api::serve::reflection()?;

    tracing::info!(cell_id = %config.cell_id, listen = %listener.local_addr()?, last_lsn = store.last_lsn()?, standby_of = standby_of.as_deref().unwrap_or("-"), mtls = tls.is_enabled(), "IM cell serving");
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.limits.max_streams_per_connection));
    let policy = Policy::for_server(tls.is_enabled(), config.auth.as_ref(), crate::access::rules);
    if tls.is_enabled() && !policy.is_enforced() {
        tracing::warn!(
            "mTLS without an auth policy: every certificate of the CA may call everything"
        );
    }
    let stopping = closing.clone();
    let served = server
        .layer(AuthLayer::new(policy))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::cell::messaging_server::MessagingServer::new(MessagingService::new(
                store.clone(),
                writer.clone(),
                config.limits.clone(),
            ))
            .max_decoding_message_size(config.limits.max_request_bytes),
        )
        .add_service(
            proto::cell::sync_server::SyncServer::new(SyncService::new(
                store.clone(),
                hub,
                &config.limits,
                closing.clone(),
            ))
            .max_decoding_message_size(config.limits.max_request_bytes),
        )
        .add_service(proto::cell::replication_server::ReplicationServer::new(
            ReplicationService::new(
                store.clone(),
                writer.commits(),
                replication.clone(),
                closing,
            ),
        ))
        .add_service(proto::cell::cell_admin_server::CellAdminServer::new(
            AdminService::new(
                config.cell_id.clone(),
                role,
                lease,
                store.clone(),
                writer,
                replication,
            ),
        ))
        .serve_with_incoming_shutdown(tls.incoming(listener), shutdown);
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let drained = cellplane_api::serve::drain_within(served, stopping, grace).await;
    // Sends still held for the synchronous standbys end now, and their connections with them:
    // nothing of the cell, its store least of all, outlives it (it may run again in this
    // process, as the agent's tasks do).
    held.refuse_held();
    if let Some(served) = drained {
        served?;
        tracing::info!(cell_id = %config.cell_id, "IM cell drained");
    }
    Ok(())
}
