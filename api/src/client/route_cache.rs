//! A full route cache kept fresh by the control plane's `Watch`.
//!
//! Loading pages through `ListRoutes` and then watching from the first page's revision + 1 makes
//! the cache converge on the control plane's state: every change after the load began is
//! replayed. Each cached route remembers the revision it is known at, and an event older than
//! that is skipped, so a replayed event never rolls a route back even for a moment.
//!
//! The cache follows one node at a time. When that node dies or stops, it resumes on the next
//! node from the last revision it saw; when that revision has been compacted away, it reloads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ClientError, channel};
use crate::proto::routing::routing_client::RoutingClient;
use crate::proto::routing::{ListRoutesRequest, Route, RouteEventKind, WatchRequest};
use crate::tls::Tls;

/// Tuning of a [`RouteCache`].
#[derive(Debug, Clone)]
pub struct RouteCacheOptions {
    /// Routes per `ListRoutes` page while loading.
    pub page_size: u32,
    pub connect_timeout: Duration,
    /// First wait before trying the next node; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// mTLS to the control plane, or plaintext (the default).
    pub tls: Tls,
}

impl Default for RouteCacheOptions {
    fn default() -> Self {
        Self {
            page_size: 5_000,
            connect_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            tls: Tls::plaintext(),
        }
    }
}

/// One cached route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRoute {
    pub cell_id: String,
    pub endpoint: String,
    pub epoch: u64,
    /// The revision this route is known to be current at.
    pub known_at: u64,
}

#[derive(Debug, Default)]
struct Routes {
    tenants: HashMap<String, CachedRoute>,
    overrides: HashMap<(String, String), CachedRoute>,
}

impl Routes {
    fn slot(&mut self, route: &Route) -> Option<&mut CachedRoute> {
        if route.conversation_id.is_empty() {
            self.tenants.get_mut(&route.tenant_id)
        } else {
            self.overrides
                .get_mut(&(route.tenant_id.clone(), route.conversation_id.clone()))
        }
    }

    fn put(&mut self, route: &Route, known_at: u64) {
        if self
            .slot(route)
            .is_some_and(|cached| cached.known_at > known_at)
        {
            return;
        }
        let cached = CachedRoute {
            cell_id: route.cell_id.clone(),
            endpoint: route.endpoint.clone(),
            epoch: route.epoch,
            known_at,
        };
        if route.conversation_id.is_empty() {
            self.tenants.insert(route.tenant_id.clone(), cached);
        } else {
            self.overrides.insert(
                (route.tenant_id.clone(), route.conversation_id.clone()),
                cached,
            );
        }
    }

    fn delete(&mut self, route: &Route, revision: u64) {
        if self
            .slot(route)
            .is_some_and(|cached| cached.known_at > revision)
        {
            return;
        }
        if route.conversation_id.is_empty() {
            self.tenants.remove(&route.tenant_id);
        } else {
            self.overrides
                .remove(&(route.tenant_id.clone(), route.conversation_id.clone()));
        }
    }
}

struct Shared {
    routes: RwLock<Routes>,
    /// The revision the cache has caught up to.
    revision: watch::Sender<u64>,
}

/// An in-memory copy of every route, following the control plane. Dropping it stops the
/// background task.
pub struct RouteCache {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for RouteCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RouteCache {
    /// Loads every route from one of `endpoints` and starts following changes. Returns once the
    /// first load is complete, or fails when no endpoint answers.
    pub async fn start(
        endpoints: Vec<String>,
        options: RouteCacheOptions,
    ) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut clients = Vec::new();
        for endpoint in &endpoints {
            clients.push(RoutingClient::new(channel(
                endpoint,
                options.connect_timeout,
                &options.tls,
            )?));
        }
        let (revision_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            routes: RwLock::new(Routes::default()),
            revision: revision_tx,
        });
        let mut last_error = String::new();
        let mut loaded_from = None;
        for (i, client) in clients.iter_mut().enumerate() {
            match load(client, &shared, options.page_size).await {
                Ok(()) => {
                    loaded_from = Some(i);
                    break;
                }
                Err(status) => last_error = format!("{}: {status}", endpoints[i]),
            }
        }
        let Some(first) = loaded_from else {
            return Err(ClientError::Unreachable(last_error));
        };
        let task = tokio::spawn(follow(clients, first, shared.clone(), options));
        Ok(Self { shared, task })
    }

    /// The route of a conversation (or, with an empty `conversation_id`, of the tenant):
    /// its override if it has one, else its tenant's placement. `None` for an unknown tenant.
    pub fn lookup(&self, tenant_id: &str, conversation_id: &str) -> Option<Route> {
        let routes = self
            .shared
            .routes
            .read()
            .expect("route cache lock poisoned");
        let revision = *self.shared.revision.borrow();
        let (cached, is_override) = if conversation_id.is_empty() {
            (routes.tenants.get(tenant_id)?, false)
        } else {
            match routes
                .overrides
                .get(&(tenant_id.to_string(), conversation_id.to_string()))
            {
                Some(cached) => (cached, true),
                None => (routes.tenants.get(tenant_id)?, false),
            }
        };
        Some(Route {
            tenant_id: tenant_id.to_string(),
            conversation_id: conversation_id.to_string(),
            cell_id: cached.cell_id.clone(),
            endpoint: cached.endpoint.clone(),
            epoch: cached.epoch,
            revision,
            is_override,
        })
    }

    /// The control-plane revision the cache has caught up to.
    pub fn revision(&self) -> u64 {
        *self.shared.revision.borrow()
    }

    /// Tenants and overrides held.
    pub fn len(&self) -> (usize, usize) {
        let routes = self
            .shared
            .routes
            .read()
            .expect("route cache lock poisoned");
        (routes.tenants.len(), routes.overrides.len())
    }

    /// Waits until the cache has caught up to `revision`; false on timeout. Useful after a write
    /// whose answer carried the revision, to read it back from the cache.
    pub async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.revision.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|seen| *seen >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Loads every route through one client, replacing the cache.
async fn load(
    client: &mut RoutingClient<tonic::transport::Channel>,
    shared: &Shared,
    page_size: u32,
) -> Result<(), tonic::Status> {
    let mut fresh = Routes::default();
    let mut token = String::new();
    let mut start_revision = None;
    loop {
        let page = client
            .list_routes(ListRoutesRequest {
                page_size,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        start_revision.get_or_insert(page.revision);
        for route in &page.routes {
            fresh.put(route, page.revision);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let revision = start_revision.unwrap_or_default();
    *shared.routes.write().expect("route cache lock poisoned") = fresh;
    shared.revision.send_replace(revision);
    Ok(())
}

/// Follows `Watch` forever, moving between nodes on failure and reloading after compaction.
async fn follow(
    mut clients: Vec<RoutingClient<tonic::transport::Channel>>,
    mut current: usize,
    shared: Arc<Shared>,
    options: RouteCacheOptions,
) {
    let mut backoff = options.min_backoff;
    let mut reload = false;
    loop {
        let client = &mut clients[current];
        let outcome = async {
            if reload {
                load(client, &shared, options.page_size).await?;
            }
            let from = *shared.revision.borrow() + 1;
            let mut stream = client
                .watch(WatchRequest {
                    from_revision: from,
                })
                .await?
                .into_inner();
            while let Some(message) = stream.message().await? {
                {
                    let mut routes = shared.routes.write().expect("route cache lock poisoned");
                    for event in &message.events {
                        let Some(route) = &event.route else { continue };
                        if event.kind == RouteEventKind::Delete as i32 {
                            routes.delete(route, message.revision);
                        } else {
                            routes.put(route, message.revision);
                        }
                    }
                }
                shared.revision.send_replace(message.revision);
            }
            Err(tonic::Status::unavailable("watch stream ended"))
        }
        .await;
        let status: tonic::Status = match outcome {
            Ok(()) => continue,
            Err(status) => status,
        };
        reload = status.code() == tonic::Code::OutOfRange;
        if reload {
            tracing::info!("route cache fell behind compaction; reloading");
            backoff = options.min_backoff;
            continue;
        }
        tracing::debug!(error = %status, "route watch ended; trying the next node");
        current = (current + 1) % clients.len();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(options.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tenant: &str, conversation: &str, cell: &str, epoch: u64) -> Route {
        Route {
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            cell_id: cell.into(),
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn an_older_event_never_rolls_a_route_back() {
        let mut routes = Routes::default();
        routes.put(&route("t", "", "new", 3), 10);
        routes.put(&route("t", "", "old", 2), 7);
        assert_eq!(
            routes.tenants.get("t").map(|r| r.cell_id.as_str()),
            Some("new")
        );
        routes.delete(&route("t", "", "old", 2), 8);
        assert!(
            routes.tenants.contains_key("t"),
            "a stale delete is skipped"
        );
        routes.delete(&route("t", "", "new", 3), 11);
        assert!(!routes.tenants.contains_key("t"));
    }

    #[test]
    fn overrides_are_kept_apart_from_placements() {
        let mut routes = Routes::default();
        routes.put(&route("t", "", "a", 1), 1);
        routes.put(&route("t", "g", "b", 2), 2);
        assert_eq!(routes.tenants.len(), 1);
        assert_eq!(routes.overrides.len(), 1);
    }
}
