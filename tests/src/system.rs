//! The whole system in real processes: a control plane of three `cellplane serve` nodes and
//! one `cell-agent` per region running its IM cells, with helpers to drive migrations.

use std::sync::Arc;
use std::time::Duration;

use crate::agent::AgentProcess;
use crate::cluster::Cluster;
use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::control::{
    Cell, CellState, CreateTenantRequest, Failover, FailoverCellRequest, FailoverMode,
    FailoverPhase, GetCellRequest, ListCellsRequest, ListFailoversRequest, ListFailoversResponse,
    Migration, MigrationPhase, Tier, WatchMigrationRequest,
};

/// Cells in these tests take load generators, not people: rate limits out of the way.
pub const CELL_ARGS: &[&str] = &[
    "--sends-per-conversation-per-sec",
    "1000000",
    "--sends-per-sender-per-sec",
    "1000000",
];

/// A cell an agent runs: `(cell_id, zone, tier)`.
pub type CellSpec<'a> = (&'a str, &'a str, &'a str);

/// A control plane of three nodes and one agent per region.
pub struct System {
    pub cluster: Cluster,
    pub agents: Vec<AgentProcess>,
}

impl System {
    /// Starts the cluster and the agents, and waits until every cell is ACTIVE.
    pub async fn start(regions: &[(&str, &[CellSpec<'_>])]) -> System {
        Self::start_with(&[], regions).await
    }

    /// Like [`System::start`], each control-plane node started with `node_args` too.
    pub async fn start_with(node_args: &[&str], regions: &[(&str, &[CellSpec<'_>])]) -> System {
        Self::start_with_standbys(node_args, regions, &[], &[]).await
    }

    /// Like [`System::start_with`], with `(standby, primary)` pairs among the cells and
    /// `cell_args` for every cell.
    pub async fn start_with_standbys(
        node_args: &[&str],
        regions: &[(&str, &[CellSpec<'_>])],
        standbys: &[(&str, &str)],
        cell_args: &[&str],
    ) -> System {
        let cluster = Cluster::start(3, node_args).await;
        let endpoints = cluster.endpoints();
        let args: Vec<&str> = CELL_ARGS.iter().chain(cell_args).copied().collect();
        let agents: Vec<AgentProcess> = regions
            .iter()
            .map(|(region, cells)| {
                AgentProcess::start_with_standbys(region, &endpoints, cells, standbys, &args)
            })
            .collect();
        let system = System { cluster, agents };
        let expected: usize = regions.iter().map(|(_, cells)| cells.len()).sum();
        system.wait_for_active(expected).await;
        system
    }

    /// A primary under one agent and its standby under another (two machines of region `hz`,
    /// zones a and b, NORMAL): `agents[0]` runs the primary, `agents[1]` the standby. The
    /// primary's agent reaches the control plane at `primary_reaches` (TCP proxies, say) when
    /// given; the standby is synchronous or not.
    pub async fn start_pair(
        cluster: Cluster,
        (primary_id, standby_id): (&str, &str),
        primary_reaches: Option<Vec<String>>,
        synchronous: bool,
    ) -> System {
        let endpoints = cluster.endpoints();
        let mut primary_args: Vec<&str> = CELL_ARGS.to_vec();
        if synchronous {
            primary_args.extend(["--sync-standby", standby_id]);
        }
        let primary = AgentProcess::start(
            "hz",
            primary_reaches.as_ref().unwrap_or(&endpoints),
            &[(primary_id, "a", "NORMAL")],
            &primary_args,
        );
        let primary_addr = primary.cell(primary_id).addr.clone();
        let standby = AgentProcess::start_following(
            "hz",
            &endpoints,
            &[(standby_id, "b", "NORMAL")],
            &[(standby_id, primary_id, &primary_addr)],
            CELL_ARGS,
        );
        let system = System {
            cluster,
            agents: vec![primary, standby],
        };
        system.wait_for_active(2).await;
        system
    }

    pub async fn wait_for_active(&self, expected: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let id = self.cluster.wait_for_leader().await;
            let active = match self
                .cluster
                .control(id)
                .list_cells(ListCellsRequest::default())
                .await
            {
                Ok(cells) => cells
                    .into_inner()
                    .cells
                    .iter()
                    .filter(|c| c.state == CellState::Active as i32)
                    .count(),
                Err(_) => 0,
            };
            if active >= expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {active} of {expected} cells became ACTIVE"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn create_tenant(&self, tenant_id: &str, tier: Tier, region: &str) -> String {
        let id = self.cluster.wait_for_leader().await;
        self.cluster
            .control(id)
            .create_tenant(CreateTenantRequest {
                tenant_id: tenant_id.into(),
                tier: tier as i32,
                home_region: region.into(),
            })
            .await
            .expect("create tenant")
            .into_inner()
            .primary_cell
    }

    /// A writer's view: a route cache and a messenger that follows moves.
    pub async fn messenger(&self) -> (Arc<RouteCache>, Arc<Messenger>) {
        let routes = Arc::new(
            RouteCache::start(self.cluster.endpoints(), RouteCacheOptions::default())
                .await
                .expect("route cache"),
        );
        let messenger = Arc::new(Messenger::new(
            routes.clone(),
            MessengerOptions {
                deadline: Duration::from_secs(20),
                ..MessengerOptions::default()
            },
        ));
        (routes, messenger)
    }

    /// A cell as the control plane's leader has it now.
    pub async fn cell(&self, cell_id: &str) -> Cell {
        let leader = self.cluster.wait_for_leader().await;
        self.cluster
            .control(leader)
            .get_cell(GetCellRequest {
                cell_id: cell_id.into(),
            })
            .await
            .expect("get cell")
            .into_inner()
    }

    /// Fails `cell_id` over as ops would; answers the failover as it started.
    pub async fn fail_over(&self, cell_id: &str, mode: FailoverMode, reason: &str) -> Failover {
        let leader = self.cluster.wait_for_leader().await;
        self.cluster
            .control(leader)
            .failover_cell(FailoverCellRequest {
                cell_id: cell_id.into(),
                mode: mode as i32,
                reason: reason.into(),
            })
            .await
            .expect("failover")
            .into_inner()
    }

    /// Every failover, with what the detector holds back, as the leader has them now.
    pub async fn list_failovers(&self) -> ListFailoversResponse {
        let leader = self.cluster.wait_for_leader().await;
        self.cluster
            .control(leader)
            .list_failovers(ListFailoversRequest::default())
            .await
            .expect("list failovers")
            .into_inner()
    }

    pub fn agent(&self, region: &str) -> &AgentProcess {
        self.agents
            .iter()
            .find(|a| a.region == region)
            .expect("an agent of the region")
    }

    /// Follows a migration until it finishes; returns its last state.
    pub async fn wait_for_migration(&self, migration_id: &str, limit: Duration) -> Migration {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let id = self.cluster.wait_for_leader().await;
            let stream = self
                .cluster
                .control(id)
                .watch_migration(WatchMigrationRequest {
                    migration_id: migration_id.into(),
                })
                .await;
            if let Ok(stream) = stream {
                let mut stream = stream.into_inner();
                let mut last = None;
                loop {
                    let next = tokio::time::timeout_at(deadline, stream.message()).await;
                    match next {
                        Ok(Ok(Some(m))) => last = Some(m),
                        Ok(_) => break,
                        Err(_) => panic!(
                            "migration {migration_id} did not finish within {limit:?}: {last:?}"
                        ),
                    }
                }
                if let Some(m) = last
                    && is_finished(&m)
                {
                    return m;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "migration {migration_id} did not finish within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn is_finished(m: &Migration) -> bool {
    matches!(
        MigrationPhase::try_from(m.phase),
        Ok(MigrationPhase::Done | MigrationPhase::RolledBack | MigrationPhase::Failed)
    )
}

/// Waits until `done` answers true, checking every 50 ms; fails the test naming `what` after
/// `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The failover moved the keys for good: DONE, or MERGED once the failed cell came back.
pub fn switched(f: &Failover) -> bool {
    matches!(
        FailoverPhase::try_from(f.phase),
        Ok(FailoverPhase::Done | FailoverPhase::Merged)
    )
}

pub fn phase_name(m: &Migration) -> &'static str {
    MigrationPhase::try_from(m.phase)
        .map(|p| p.as_str_name())
        .unwrap_or("?")
}
