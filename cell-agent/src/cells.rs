//! The cells of the agent's region as the agent knows them: their admin clients, their
//! registration with the control plane, and the heartbeats that report their health.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cellplane_api::client::channel;
use cellplane_api::proto::cell::CellStatusRequest;
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::control as pb;
use cellplane_api::tls::Tls;
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::Channel;

use crate::config::CellSpec;
use crate::supervisor::Role;
use cellplane_api::client::ControlPlane;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Largest answer the agent takes from its own cells.
const MAX_STATUS_BYTES: usize = 256 << 20;

/// How long a cell may take to answer a status request in a heartbeat.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// One cell this agent runs.
#[derive(Clone)]
pub struct LocalCell {
    pub spec: CellSpec,
    pub endpoint: String,
    pub admin: CellAdminClient<Channel>,
    /// A standby by its config that a failover made a primary.
    promoted: Arc<AtomicBool>,
    /// What the cell runs as, when the control plane changed it since the config was written.
    role: Arc<watch::Sender<Role>>,
}

impl LocalCell {
    /// Whether the cell follows a primary now: told to by the control plane after a failover,
    /// or configured as a standby and not promoted.
    pub fn is_standby(&self) -> bool {
        self.role.borrow().following.is_some()
            || (self.spec.standby_of.is_some() && !self.promoted.load(Ordering::Acquire))
    }

    /// The control plane made this standby a primary, and the cell knows it.
    pub fn mark_promoted(&self) {
        self.promoted.store(true, Ordering::Release);
        // A primary it rejoined earlier is no longer one to follow: restarted, it must not
        // start over as that one's standby, wiping what it wrote as a primary. The supervisor
        // notes this without restarting the promoted cell, and a later rejoin of the same
        // primary is a change it acts on.
        self.role
            .send_if_modified(|role| role.following.take().is_some());
    }

    /// The primary the supervisor starts the cell as a standby of: as its role says, else as
    /// configured unless a failover promoted it.
    pub fn configured_primary(&self) -> Option<String> {
        match &self.role.borrow().following {
            Some(following) => Some(following.primary.clone()),
            None if self.spec.standby_of.is_some() && !self.promoted.load(Ordering::Acquire) => {
                self.spec.standby_of.clone()
            }
            None => None,
        }
    }

    /// Follows the cell's role, as the supervisor starts it.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Runs the cell in `role` from now on: the supervisor restarts it if that changes it.
    pub fn set_role(&self, role: Role) -> bool {
        self.role.send_if_modified(|current| {
            let changed = *current != role;
            *current = role;
            changed
        })
    }
}

/// This agent's cells by id.
pub type LocalCells = Arc<BTreeMap<String, LocalCell>>;

pub fn local_cells(
    specs: &[CellSpec],
    tls: &Tls,
) -> Result<LocalCells, cellplane_api::client::ClientError> {
    let mut cells = BTreeMap::new();
    for spec in specs {
        let endpoint = spec.endpoint();
        // A cell's status lists every key it holds: a million tenants are tens of megabytes.
        let admin = CellAdminClient::new(channel(&endpoint, CONNECT_TIMEOUT, tls)?)
            .max_decoding_message_size(MAX_STATUS_BYTES);
        cells.insert(
            spec.cell_id.clone(),
            LocalCell {
                spec: spec.clone(),
                endpoint,
                admin,
                promoted: Arc::default(),
                role: Arc::new(watch::Sender::new(Role::default())),
            },
        );
    }
    Ok(Arc::new(cells))
}

/// An admin client for a cell of another agent, by its registered endpoint.
pub fn remote_admin(endpoint: &str, tls: &Tls) -> Result<CellAdminClient<Channel>, Status> {
    channel(endpoint, CONNECT_TIMEOUT, tls)
        .map(CellAdminClient::new)
        .map_err(|e| Status::failed_precondition(format!("cell endpoint {endpoint:?}: {e}")))
}

fn tier(name: &str) -> pb::Tier {
    match name {
        "HIGH" => pb::Tier::High,
        "NORMAL" => pb::Tier::Normal,
        _ => pb::Tier::Low,
    }
}

use cellplane_api::clock::now_ms;

/// Registers `cell` (idempotent: an agent restart registers the same cell again), and makes a
/// joining primary ACTIVE, so placement may use it, once the cell process answers. A cell the
/// control plane demoted or failed stays as it is: only ops bring it back.
pub async fn join(
    control: &ControlPlane,
    region: &str,
    cell: &LocalCell,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), Status> {
    let spec = &cell.spec;
    let request = pb::RegisterCellRequest {
        cell_id: spec.cell_id.clone(),
        region: region.to_string(),
        zone: spec.zone.clone(),
        tier: tier(&spec.tier) as i32,
        endpoint: cell.endpoint.clone(),
        capacity: spec.capacity,
        standby_of: spec.standby_of.clone().unwrap_or_default(),
    };
    if let Some(primary) = &spec.standby_of {
        wait_for_primary(control, primary, shutdown).await?;
    }
    let registered = loop {
        let request = request.clone();
        match control
            .call(|mut c| {
                let request = request.clone();
                async move { c.register_cell(request).await }
            })
            .await
        {
            Ok(registered) => break registered,
            Err(status) if cellplane_api::client::retryable(&status) && !*shutdown.borrow() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(status),
        }
    };
    if spec.standby_of.is_some() && registered.standby_of.is_empty() {
        // A failover promoted it: the cell has the promotion on disk, or its agent's failover
        // executor gives it before reporting the failover done.
        tracing::info!(cell_id = %spec.cell_id, "cell was promoted to primary by a failover");
        cell.mark_promoted();
    }
    if !activates_on_join(spec.standby_of.as_deref(), &registered) {
        return Ok(());
    }
    let mut admin = cell.admin.clone();
    while admin
        .cell_status(CellStatusRequest { without_keys: true })
        .await
        .is_err()
    {
        if *shutdown.borrow() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cell_id = spec.cell_id.clone();
    control
        .call(|mut c| {
            let request = pb::SetCellStateRequest {
                cell_id: cell_id.clone(),
                state: pb::CellState::Active as i32,
            };
            async move { c.set_cell_state(request).await }
        })
        .await?;
    tracing::info!(cell_id = %spec.cell_id, "cell is ACTIVE");
    Ok(())
}

/// Whether `join` waits for the cell to answer and then makes it ACTIVE: only a primary by its
/// config, registered as one, and JOINING.
///
/// A cell a failover made the standby of another runs as configured only until the roles
/// loop, which starts once every cell joined, restarts it following its primary — and its
/// disk may refuse the configured role outright, so it is not waited for here. A standby is
/// made ACTIVE by that loop too, once it follows its primary: answering alone does not say it
/// has begun to. Nor is a cell that is not JOINING waited for, which has nothing to become:
/// its disk may refuse the configured role too (a standby a failover is promoting, whose
/// config says primary), and the failover executor, which starts with the roles loop, must
/// still promote it.
fn activates_on_join(configured_standby_of: Option<&str>, registered: &pb::Cell) -> bool {
    configured_standby_of.is_none()
        && registered.standby_of.is_empty()
        && registered.state == pb::CellState::Joining as i32
}

/// Waits until `primary` is registered: the control plane takes a standby only after its
/// primary.
async fn wait_for_primary(
    control: &ControlPlane,
    primary: &str,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), Status> {
    loop {
        let found = control
            .call(|mut c| {
                let cell_id = primary.to_string();
                async move { c.get_cell(pb::GetCellRequest { cell_id }).await }
            })
            .await;
        match found {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound && !*shutdown.borrow() => {
                tracing::info!(%primary, "waiting for the primary to register");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// Reports every cell's health and size each `interval` until shutdown.
pub async fn heartbeats(
    control: ControlPlane,
    cells: LocalCells,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A round of reports waits on the control plane (each call retries for a while when
        // it is unreachable); shutdown must not wait for it.
        tokio::select! {
            () = report(&control, &cells) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Reports each cell's health and size once.
async fn report(control: &ControlPlane, cells: &LocalCells) {
    for cell in cells.values() {
        let mut admin = cell.admin.clone();
        let status = tokio::time::timeout(
            STATUS_TIMEOUT,
            admin.cell_status(CellStatusRequest { without_keys: true }),
        )
        .await;
        let (health, replication) = match status {
            Ok(Ok(status)) => {
                let s = status.into_inner();
                let replication = (!s.standbys.is_empty() || s.replica.is_some()).then_some(
                    pb::CellReplication {
                        standbys: s.standbys,
                        replica: s.replica,
                    },
                );
                let health = pb::CellHealth {
                    last_heartbeat_ms: now_ms(),
                    healthy: true,
                    last_lsn: s.last_lsn,
                    conversations: s.conversations,
                    messages: s.messages,
                    disk_bytes: s.disk_bytes,
                };
                (health, replication)
            }
            _ => {
                let health = pb::CellHealth {
                    last_heartbeat_ms: now_ms(),
                    healthy: false,
                    ..Default::default()
                };
                (health, None)
            }
        };
        let request = pb::HeartbeatRequest {
            cell_id: cell.spec.cell_id.clone(),
            health: Some(health),
            replication,
        };
        if let Err(status) = control
            .call(|mut c| {
                let request = request.clone();
                async move { c.heartbeat(request).await }
            })
            .await
        {
            tracing::warn!(cell_id = %cell.spec.cell_id, %status, "heartbeat not recorded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(state: pb::CellState, standby_of: &str) -> pb::Cell {
        pb::Cell {
            cell_id: "c1".into(),
            state: state as i32,
            standby_of: standby_of.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_joining_primary_registered_as_configured_is_waited_for() {
        use pb::CellState::{Active, Demoted, Draining, Failed, Joining};
        assert!(activates_on_join(None, &registered(Joining, "")));
        // An agent restarting: the cell is ACTIVE, draining, demoted or failed already.
        for state in [Active, Draining, Demoted, Failed] {
            assert!(
                !activates_on_join(None, &registered(state, "")),
                "{state:?}"
            );
        }
        // A standby by its config, or by a failover since: the roles loop starts it following.
        assert!(!activates_on_join(Some("p"), &registered(Joining, "p")));
        assert!(!activates_on_join(None, &registered(Joining, "c2")));
        assert!(!activates_on_join(None, &registered(Active, "c2")));
        // A standby a failover is promoting: the failover cleared its standby_of, and its
        // config may say primary (an old primary rejoined as a standby) or standby; its disk
        // refuses to start it as a primary until the failover executor promotes it.
        assert!(!activates_on_join(None, &registered(Active, "")));
        assert!(!activates_on_join(Some("p"), &registered(Active, "")));
    }
}
