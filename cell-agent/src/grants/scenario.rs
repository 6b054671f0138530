//! The grant executor against scripted fakes of the Routing service and of a cell's admin API
//! (served over gRPC on loopback): given the routes, what the cell holds and a watch, the
//! calls the cell receives, in order. The real-process tests run the same code against real
//! servers; these pin down each case of the plan without a control plane.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use cellplane_api::client::ControlPlane;
use cellplane_api::proto::cell as cell_pb;
use cellplane_api::proto::cell::cell_admin_server::{CellAdmin, CellAdminServer};
use cellplane_api::proto::routing as pb;
use cellplane_api::proto::routing::routing_server::{Routing, RoutingServer};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::cells::local_cells;
use crate::config::CellSpec;

type Calls = Arc<Mutex<Vec<String>>>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn route(tenant: &str, conversation: &str, cell: &str, epoch: u64) -> pb::Route {
    pb::Route {
        tenant_id: tenant.into(),
        conversation_id: conversation.into(),
        cell_id: cell.into(),
        epoch,
        ..Default::default()
    }
}

/// The Routing service as a script: every route at revision 10, lookups of keys no longer
/// routed to the agent's cells, and the watch's messages.
#[derive(Clone, Default)]
struct ScriptedRouting {
    routes: Vec<pb::Route>,
    lookups: HashMap<(String, String), pb::Route>,
    watch: Vec<pb::WatchResponse>,
}

#[tonic::async_trait]
impl Routing for ScriptedRouting {
    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let r = request.into_inner();
        match self.lookups.get(&(r.tenant_id, r.conversation_id)) {
            Some(route) => Ok(Response::new(pb::LookupResponse {
                route: Some(route.clone()),
            })),
            None => Err(Status::not_found("tenant_id: no such tenant")),
        }
    }

    async fn batch_lookup(
        &self,
        _: Request<pb::BatchLookupRequest>,
    ) -> Result<Response<pb::BatchLookupResponse>, Status> {
        Err(Status::unimplemented("the agent does not batch lookups"))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        assert_eq!(
            request.into_inner().from_revision,
            11,
            "the watch resumes after the listing"
        );
        let messages = self.watch.clone().into_iter().map(Ok);
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn list_routes(
        &self,
        request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        // One route a page, so the executor's paging is part of the script.
        let r = request.into_inner();
        let index: usize = r.page_token.parse().unwrap_or(0);
        let next = index + 1;
        Ok(Response::new(pb::ListRoutesResponse {
            routes: self.routes.get(index).cloned().into_iter().collect(),
            next_page_token: if next < self.routes.len() {
                next.to_string()
            } else {
                String::new()
            },
            revision: 10,
        }))
    }

    async fn list_tenant_cells(
        &self,
        _: Request<pb::ListTenantCellsRequest>,
    ) -> Result<Response<pb::ListTenantCellsResponse>, Status> {
        Err(Status::unimplemented(
            "the agent does not list tenant cells",
        ))
    }
}

/// A cell's admin API that holds `keys` and records every change it is asked for.
#[derive(Clone)]
struct RecordingCell {
    keys: Vec<cell_pb::OwnedKey>,
    calls: Calls,
}

impl RecordingCell {
    fn record(&self, call: String) {
        self.calls.lock().expect("calls").push(call);
    }
}

#[tonic::async_trait]
impl CellAdmin for RecordingCell {
    type ExportStream = BoxStream<cell_pb::ExportChunk>;

    async fn grant(
        &self,
        request: Request<cell_pb::GrantRequest>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        self.record(format!(
            "grant {}/{} {}",
            r.tenant_id, r.conversation_id, r.epoch
        ));
        Ok(Response::new(cell_pb::AdminEmpty {}))
    }

    async fn revoke(
        &self,
        request: Request<cell_pb::RevokeRequest>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        self.record(format!(
            "revoke {}/{} to {:?} {}",
            r.tenant_id, r.conversation_id, r.new_cell_id, r.new_epoch
        ));
        Ok(Response::new(cell_pb::AdminEmpty {}))
    }

    async fn purge(
        &self,
        request: Request<cell_pb::KeyRequest>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        self.record(format!("purge {}/{}", r.tenant_id, r.conversation_id));
        Ok(Response::new(cell_pb::AdminEmpty {}))
    }

    async fn cell_status(
        &self,
        _: Request<cell_pb::CellStatusRequest>,
    ) -> Result<Response<cell_pb::CellStatusResponse>, Status> {
        Ok(Response::new(cell_pb::CellStatusResponse {
            keys: self.keys.clone(),
            ..Default::default()
        }))
    }

    async fn freeze(
        &self,
        _: Request<cell_pb::KeyRequest>,
    ) -> Result<Response<cell_pb::FreezeResponse>, Status> {
        Err(Status::unimplemented("grants never freeze"))
    }

    async fn unfreeze(
        &self,
        _: Request<cell_pb::KeyRequest>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        Err(Status::unimplemented("grants never thaw"))
    }

    async fn release_sync(
        &self,
        _: Request<cell_pb::ReleaseSyncRequest>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        Err(Status::unimplemented("grants never release"))
    }

    async fn export(
        &self,
        _: Request<cell_pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("grants never export"))
    }

    async fn import(
        &self,
        _: Request<Streaming<cell_pb::ExportChunk>>,
    ) -> Result<Response<cell_pb::ImportResponse>, Status> {
        Err(Status::unimplemented("grants never import"))
    }

    async fn merge(
        &self,
        _: Request<Streaming<cell_pb::MergeChunk>>,
    ) -> Result<Response<cell_pb::MergeResponse>, Status> {
        Err(Status::unimplemented("grants never merge"))
    }

    async fn lease_ticket(
        &self,
        _: Request<cell_pb::AdminEmpty>,
    ) -> Result<Response<cell_pb::LeaseTicketResponse>, Status> {
        Err(Status::unimplemented("grants never renew leases"))
    }

    async fn extend_lease(
        &self,
        _: Request<cell_pb::ExtendLeaseRequest>,
    ) -> Result<Response<cell_pb::ExtendLeaseResponse>, Status> {
        Err(Status::unimplemented("grants never renew leases"))
    }

    async fn promote(
        &self,
        _: Request<cell_pb::PromoteRequest>,
    ) -> Result<Response<cell_pb::PromoteResponse>, Status> {
        Err(Status::unimplemented("grants never promote"))
    }

    async fn freeze_all(
        &self,
        _: Request<cell_pb::AdminEmpty>,
    ) -> Result<Response<cell_pb::FreezeResponse>, Status> {
        Err(Status::unimplemented("grants never freeze"))
    }

    async fn thaw_all(
        &self,
        _: Request<cell_pb::AdminEmpty>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        Err(Status::unimplemented("grants never thaw"))
    }

    async fn set_sync_standbys(
        &self,
        _: Request<cell_pb::SetSyncStandbysRequest>,
    ) -> Result<Response<cell_pb::AdminEmpty>, Status> {
        Err(Status::unimplemented("grants never change standbys"))
    }
}

/// Serves `router` on a free loopback port; returns the address.
async fn serve(router: tonic::transport::server::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    tokio::spawn(
        router.serve_with_incoming(cellplane_api::tls::Tls::plaintext().incoming(listener)),
    );
    addr
}

fn owned(tenant: &str, conversation: &str, epoch: u64) -> cell_pb::OwnedKey {
    cell_pb::OwnedKey {
        tenant_id: tenant.into(),
        conversation_id: conversation.into(),
        epoch,
        frozen: false,
    }
}

fn put(route: pb::Route) -> pb::RouteEvent {
    pb::RouteEvent {
        revision: 11,
        kind: pb::RouteEventKind::Put as i32,
        route: Some(route),
    }
}

/// Runs one pass of the executor for one cell, `cell-a`, and returns the calls it received.
async fn run(routing: ScriptedRouting, held: Vec<cell_pb::OwnedKey>) -> Vec<String> {
    let calls: Calls = Arc::default();
    let cell = RecordingCell {
        keys: held,
        calls: calls.clone(),
    };
    let server = tonic::transport::Server::builder;
    let cell_addr = serve(server().add_service(CellAdminServer::new(cell))).await;
    let control_addr = serve(server().add_service(RoutingServer::new(routing))).await;
    let spec = CellSpec {
        cell_id: "cell-a".into(),
        zone: "a".into(),
        tier: "NORMAL".into(),
        listen: cell_addr.parse().expect("address"),
        advertise: None,
        capacity: 10,
        standby_of: None,
        primary_endpoint: None,
        sync_standbys: None,
        sync_timeout_ms: None,
        args: Vec::new(),
    };
    let cells = local_cells(&[spec], &cellplane_api::tls::Tls::plaintext()).expect("cells");
    let control = ControlPlane::new(vec![control_addr]).expect("control plane");
    let (_, routing) = control.routing_at();
    let Err(super::Interrupted::Routes(ended)) = super::follow(routing, &cells).await else {
        panic!("the pass ends with the scripted watch, not with the cell");
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    calls.lock().expect("calls").clone()
}

#[tokio::test]
async fn a_load_grants_what_the_cell_lacks_and_resolves_what_it_should_not_hold() {
    let routing = ScriptedRouting {
        routes: vec![
            route("held", "", "cell-a", 3),
            route("newer", "", "cell-a", 5),
            route("elsewhere", "", "cell-b", 1),
        ],
        lookups: HashMap::from([
            (
                ("moved".to_string(), String::new()),
                route("moved", "", "cell-b", 4),
            ),
            (
                ("held".to_string(), "hot".to_string()),
                route("held", "", "cell-a", 3),
            ),
        ]),
        watch: Vec::new(),
    };
    let held = vec![
        owned("held", "", 3),
        owned("newer", "", 4),
        owned("moved", "", 3),
        owned("deleted", "", 2),
        // A conversation frozen alone on its tenant's cell: its route is the tenant's, here.
        owned("held", "hot", 3),
    ];
    assert_eq!(
        run(routing, held).await,
        vec![
            "grant newer/ 5",
            "revoke deleted/ to \"\" 2",
            "purge deleted/",
            "revoke moved/ to \"cell-b\" 4",
        ]
    );
}

#[tokio::test]
async fn the_watch_grants_arrivals_revokes_departures_and_drops_deletes() {
    let routing = ScriptedRouting {
        routes: vec![
            route("stays", "", "cell-a", 1),
            route("leaves", "", "cell-a", 2),
        ],
        lookups: HashMap::new(),
        watch: vec![
            pb::WatchResponse {
                revision: 11,
                events: vec![
                    put(route("arrives", "", "cell-a", 7)),
                    put(route("leaves", "", "cell-b", 3)),
                ],
            },
            // A revision with no route change: nothing to do.
            pb::WatchResponse {
                revision: 12,
                events: Vec::new(),
            },
            pb::WatchResponse {
                revision: 13,
                events: vec![pb::RouteEvent {
                    revision: 13,
                    kind: pb::RouteEventKind::Delete as i32,
                    route: Some(route("stays", "", "cell-a", 1)),
                }],
            },
        ],
    };
    let held = vec![owned("stays", "", 1), owned("leaves", "", 2)];
    assert_eq!(
        run(routing, held).await,
        vec![
            "grant arrives/ 7",
            "revoke leaves/ to \"cell-b\" 3",
            "revoke stays/ to \"\" 1",
            "purge stays/",
        ]
    );
}
