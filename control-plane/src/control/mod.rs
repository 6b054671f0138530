//! The `Control` gRPC service: cells, tenants, route moves and cluster status.
//!
//! Writes are validated, then proposed through Raft; a follower forwards them to the leader
//! once. Reads of cells and tenants are linearizable, so an operator always reads their own
//! writes whichever node they asked.

pub mod access;
pub mod audit;
pub mod convert;
pub mod drains;
pub mod failovers;
pub mod migrations;
pub mod scope;
pub mod status;

use std::sync::Arc;

use cellplane_api::ids::{InvalidField, validate_endpoint, validate_id};
use cellplane_api::limits::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::control_server::Control;
use tonic::{Request, Response, Status};

use crate::node::{Node, Proposal, forwarded, is_forwarded};
use crate::raft::membership::Change;
use crate::state::command::{Command, CommandOutput};
use crate::store::Routed;
use cellplane_api::clock::now_ms;

pub struct ControlService {
    node: Arc<Node>,
}

impl ControlService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Applies a membership change on the leader, or answers where to forward it.
    async fn change_membership(
        &self,
        change: Change,
        was_forwarded: bool,
    ) -> Result<Routed<Response<pb::MembershipResponse>>, Status> {
        Ok(
            match self
                .node
                .store
                .change_membership(change, was_forwarded)
                .await?
            {
                Routed::Here(members) => {
                    Routed::Here(Response::new(pb::MembershipResponse { members }))
                }
                Routed::Forward(channel) => Routed::Forward(channel),
            },
        )
    }
}

/// Checks a page size: 0 means the default; above the maximum is refused rather than clamped,
/// so a caller never silently gets less than it asked for.
pub fn page_size(value: u32) -> Result<usize, InvalidField> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n > MAX_PAGE_SIZE => Err(InvalidField::new(
            "page_size",
            format!("must be at most {MAX_PAGE_SIZE}, got {n}"),
        )),
        n => Ok(n as usize),
    }
}

fn unexpected(output: CommandOutput) -> Status {
    Status::internal(format!("unexpected command output {output:?}"))
}

fn cell_output(output: CommandOutput) -> Result<pb::Cell, Status> {
    match output {
        CommandOutput::Cell(view) => Ok(convert::cell_to_proto(&view)),
        other => Err(unexpected(other)),
    }
}

fn tenant_output(output: CommandOutput) -> Result<pb::Tenant, Status> {
    match output {
        CommandOutput::Tenant(view) => Ok(convert::tenant_to_proto(&view)),
        other => Err(unexpected(other)),
    }
}

/// Proposes the command a write request converts to, or forwards the request to the leader:
/// the shape every plain write of this service has.
macro_rules! write_or_forward {
    ($self:ident, $request:ident, $method:ident, |$message:ident| $command:expr, $output:expr) => {{
        let was_forwarded = is_forwarded($request.metadata());
        let confined = scope::confined(&$request);
        let $message = $request.into_inner();
        let command = $command;
        if let Some(region) = &confined {
            $self
                .node
                .view()
                .read(|state| scope::check_command(region, &command, state))?;
        }
        match $self.node.propose(command, was_forwarded).await? {
            Proposal::Applied(output) => Ok(Response::new($output(output)?)),
            Proposal::Forward(channel) => {
                ControlClient::new(channel)
                    .$method(forwarded($message))
                    .await
            }
        }
    }};
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn register_cell(
        &self,
        request: Request<pb::RegisterCellRequest>,
    ) -> Result<Response<pb::Cell>, Status> {
        write_or_forward!(
            self,
            request,
            register_cell,
            |message| convert::register_cell(message.clone())?,
            cell_output
        )
    }

    async fn get_cell(
        &self,
        request: Request<pb::GetCellRequest>,
    ) -> Result<Response<pb::Cell>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        validate_id("cell_id", &message.cell_id)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .get_cell(forwarded(message))
                .await;
        }
        let found = self.node.view().read(|state| {
            state
                .cells()
                .get_key_value(message.cell_id.as_str())
                .map(|(cell_id, record)| state.cell_view(cell_id, record.clone()))
        });
        match found {
            Some(view) => Ok(Response::new(convert::cell_to_proto(&view))),
            None => Err(Status::not_found(format!(
                "cell_id: cell {:?} does not exist",
                message.cell_id
            ))),
        }
    }

    async fn list_cells(
        &self,
        request: Request<pb::ListCellsRequest>,
    ) -> Result<Response<pb::ListCellsResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        cellplane_api::ids::validate_optional_id("region", &message.region)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .list_cells(forwarded(message))
                .await;
        }
        let cells = self.node.view().read(|state| {
            state
                .cells()
                .iter()
                .filter(|(_, record)| {
                    message.region.is_empty() || *record.region == *message.region
                })
                .map(|(cell_id, record)| {
                    convert::cell_to_proto(&state.cell_view(cell_id, record.clone()))
                })
                .collect()
        });
        Ok(Response::new(pb::ListCellsResponse { cells }))
    }

    async fn set_cell_state(
        &self,
        request: Request<pb::SetCellStateRequest>,
    ) -> Result<Response<pb::Cell>, Status> {
        write_or_forward!(
            self,
            request,
            set_cell_state,
            |message| convert::set_cell_state(message.clone())?,
            cell_output
        )
    }

    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        write_or_forward!(
            self,
            request,
            create_tenant,
            |message| convert::create_tenant(message.clone())?,
            tenant_output
        )
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        validate_id("tenant_id", &message.tenant_id)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .get_tenant(forwarded(message))
                .await;
        }
        let found = self.node.view().read(|state| {
            state
                .tenants()
                .get_key_value(message.tenant_id.as_str())
                .map(|(tenant_id, record)| state.tenant_view(tenant_id, record.clone()))
        });
        match found {
            Some(view) => Ok(Response::new(convert::tenant_to_proto(&view))),
            None => Err(Status::not_found(format!(
                "tenant_id: tenant {:?} does not exist",
                message.tenant_id
            ))),
        }
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        let limit = page_size(message.page_size)?;
        if !message.page_token.is_empty() {
            validate_id("page_token", &message.page_token)?;
        }
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .list_tenants(forwarded(message))
                .await;
        }
        let after = (!message.page_token.is_empty()).then_some(message.page_token.as_str());
        // One more than asked tells whether another page exists.
        let mut page = self
            .node
            .view()
            .read(|state| state.tenants_after(after, limit + 1));
        let more = page.len() > limit;
        page.truncate(limit);
        let next_page_token = if more {
            page.last()
                .map(|t| t.tenant_id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: page.iter().map(convert::tenant_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        write_or_forward!(
            self,
            request,
            delete_tenant,
            |message| {
                validate_id("tenant_id", &message.tenant_id)?;
                Command::DeleteTenant {
                    tenant_id: Arc::from(message.tenant_id.as_str()),
                }
            },
            |output| match output {
                CommandOutput::Done { revision } => Ok(pb::DeleteTenantResponse { revision }),
                other => Err(unexpected(other)),
            }
        )
    }

    async fn move_route(
        &self,
        request: Request<pb::MoveRouteRequest>,
    ) -> Result<Response<pb::MoveRouteResponse>, Status> {
        write_or_forward!(
            self,
            request,
            move_route,
            |message| convert::move_route(message.clone())?,
            |output| match output {
                CommandOutput::Route(route) => Ok(pb::MoveRouteResponse {
                    route: Some(route.to_proto()),
                }),
                other => Err(unexpected(other)),
            }
        )
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        write_or_forward!(
            self,
            request,
            compact,
            |message| Command::Compact {
                revision: message.revision,
            },
            |output| match output {
                CommandOutput::Done { revision } => Ok(pb::CompactResponse { revision }),
                other => Err(unexpected(other)),
            }
        )
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.node.store.status().await?))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        validate_endpoint("addr", &message.addr)?;
        let change = Change::Add {
            node_id: message.node_id,
            addr: message.addr.clone(),
        };
        match self.change_membership(change, was_forwarded).await? {
            Routed::Here(members) => Ok(members),
            Routed::Forward(channel) => {
                ControlClient::new(channel)
                    .add_node(forwarded(message))
                    .await
            }
        }
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        let change = Change::Remove {
            node_id: message.node_id,
        };
        match self.change_membership(change, was_forwarded).await? {
            Routed::Here(members) => Ok(members),
            Routed::Forward(channel) => {
                ControlClient::new(channel)
                    .remove_node(forwarded(message))
                    .await
            }
        }
    }

    async fn migrate_tenant(
        &self,
        request: Request<pb::MigrateTenantRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        write_or_forward!(
            self,
            request,
            migrate_tenant,
            |message| convert::migrate_tenant(message.clone(), now_ms())?,
            migrations::migration_output
        )
    }

    async fn migrate_conversation(
        &self,
        request: Request<pb::MigrateConversationRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        write_or_forward!(
            self,
            request,
            migrate_conversation,
            |message| convert::migrate_conversation(message.clone(), now_ms())?,
            migrations::migration_output
        )
    }

    async fn set_tenant_tier(
        &self,
        request: Request<pb::SetTenantTierRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        write_or_forward!(
            self,
            request,
            set_tenant_tier,
            |message| convert::set_tenant_tier(message.clone(), now_ms())?,
            migrations::migration_output
        )
    }

    async fn get_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        migrations::get(&self.node, request).await
    }

    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        migrations::list(&self.node, request).await
    }

    type WatchMigrationStream = migrations::MigrationStream;

    async fn watch_migration(
        &self,
        request: Request<pb::WatchMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
        let slot = self
            .node
            .watches
            .take(cellplane_api::streams::connection(&request))?;
        let message = request.into_inner();
        let only = if message.migration_id.is_empty() {
            None
        } else {
            Some(convert::migration_id(&message.migration_id)?)
        };
        let stream = migrations::watch(&self.node, only)?;
        Ok(Response::new(Box::pin(cellplane_api::streams::Held::new(
            stream, slot,
        ))))
    }

    async fn cancel_migration(
        &self,
        request: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        migrations::cancel(&self.node, request).await
    }

    async fn report_migration(
        &self,
        request: Request<pb::ReportMigrationRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        migrations::report(&self.node, request).await
    }

    async fn record_protection(
        &self,
        request: Request<pb::RecordProtectionRequest>,
    ) -> Result<Response<pb::Cell>, Status> {
        write_or_forward!(
            self,
            request,
            record_protection,
            |message| convert::record_protection(message.clone())?,
            cell_output
        )
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        write_or_forward!(
            self,
            request,
            heartbeat,
            |message| convert::heartbeat(message.clone())?,
            |output| match output {
                CommandOutput::Cell(view) => Ok::<_, Status>(pb::HeartbeatResponse {
                    state: view.record.state.to_proto() as i32,
                }),
                other => Err(unexpected(other)),
            }
        )
    }

    async fn renew_leases(
        &self,
        request: Request<pb::RenewLeasesRequest>,
    ) -> Result<Response<pb::RenewLeasesResponse>, Status> {
        let lease_ms = self.node.failover.lease_ms;
        write_or_forward!(
            self,
            request,
            renew_leases,
            |message| failovers::renew_leases(message.clone(), lease_ms)?,
            |output| failovers::leases_output(output, lease_ms)
        )
    }

    async fn rejoin_cell(
        &self,
        request: Request<pb::RejoinCellRequest>,
    ) -> Result<Response<pb::Cell>, Status> {
        write_or_forward!(
            self,
            request,
            rejoin_cell,
            |message| {
                validate_id("cell_id", &message.cell_id)?;
                Command::Rejoin {
                    cell_id: message.cell_id.as_str().into(),
                }
            },
            cell_output
        )
    }

    async fn failover_cell(
        &self,
        request: Request<pb::FailoverCellRequest>,
    ) -> Result<Response<pb::Failover>, Status> {
        write_or_forward!(
            self,
            request,
            failover_cell,
            |message| failovers::failover_cell(message.clone())?,
            failovers::failover_output
        )
    }

    async fn report_failover(
        &self,
        request: Request<pb::ReportFailoverRequest>,
    ) -> Result<Response<pb::Failover>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let confined = scope::confined(&request);
        let message = request.into_inner();
        let id = failovers::failover_id(&message.failover_id)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .report_failover(forwarded(message))
                .await;
        }
        if let Some(region) = &confined {
            self.node
                .view()
                .read(|state| scope::check_failover(region, id, state))?;
        }
        let (id, command) = self
            .node
            .view()
            .read(|state| failovers::report(state, &message))?;
        if let Some(command) = command {
            match self.node.propose(command, true).await {
                Ok(_) => {}
                // Lost a race with another report: answer the failover as it now is.
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
                Err(status) => return Err(status),
            }
        }
        failover_now(&self.node, id)
    }

    async fn cancel_failover(
        &self,
        request: Request<pb::CancelFailoverRequest>,
    ) -> Result<Response<pb::Failover>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        failovers::failover_id(&message.failover_id)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .cancel_failover(forwarded(message))
                .await;
        }
        // The command compares the phase it read: if the failover moved on meanwhile (the
        // standby caught up), decide again on what it is now.
        let mut attempts = 0;
        let id = loop {
            attempts += 1;
            let (id, command) = self
                .node
                .view()
                .read(|state| failovers::cancel(state, &message))?;
            match self.node.propose(command, true).await {
                Ok(_) => break id,
                Err(status) if status.code() == tonic::Code::FailedPrecondition && attempts < 3 => {
                }
                Err(status) => return Err(status),
            }
        };
        failover_now(&self.node, id)
    }

    async fn get_failover(
        &self,
        request: Request<pb::GetFailoverRequest>,
    ) -> Result<Response<pb::Failover>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        let id = failovers::failover_id(&message.failover_id)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .get_failover(forwarded(message))
                .await;
        }
        failover_now(&self.node, id)
    }

    async fn list_failovers(
        &self,
        request: Request<pb::ListFailoversRequest>,
    ) -> Result<Response<pb::ListFailoversResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .list_failovers(forwarded(message))
                .await;
        }
        let (failovers, halt) = self.node.view().read(|state| {
            (
                failovers::list(state, message.active_only),
                state.failover_halt().cloned(),
            )
        });
        Ok(Response::new(pb::ListFailoversResponse {
            failovers,
            halted_since_ms: halt.as_ref().map_or(0, |h| h.since_ms),
            halted_for: halt
                .map(|h| h.cells.iter().map(|c| c.to_string()).collect())
                .unwrap_or_default(),
            held_back: self
                .node
                .findings
                .held_back()
                .iter()
                .map(|c| c.to_string())
                .collect(),
            stranded: self
                .node
                .findings
                .stranded()
                .iter()
                .map(|c| c.to_string())
                .collect(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        audit::list(&self.node, request).await
    }

    async fn record_audit(
        &self,
        request: Request<pb::RecordAuditRequest>,
    ) -> Result<Response<pb::RecordAuditResponse>, Status> {
        audit::record(&self.node, request).await
    }

    async fn resume_automatic_failover(
        &self,
        request: Request<pb::ResumeAutomaticFailoverRequest>,
    ) -> Result<Response<pb::ResumeAutomaticFailoverResponse>, Status> {
        write_or_forward!(
            self,
            request,
            resume_automatic_failover,
            |_message| Command::ResumeAutomaticFailover,
            |output| match output {
                CommandOutput::Done { revision } => {
                    Ok(pb::ResumeAutomaticFailoverResponse { revision })
                }
                other => Err(unexpected(other)),
            }
        )
    }

    async fn drain_cell(
        &self,
        request: Request<pb::DrainCellRequest>,
    ) -> Result<Response<pb::DrainProgress>, Status> {
        write_or_forward!(
            self,
            request,
            drain_cell,
            |message| drains::drain_cell(&message)?,
            |_| self
                .node
                .view()
                .read(|state| drains::progress(state, &message.cell_id))
        )
    }

    async fn get_drain(
        &self,
        request: Request<pb::GetDrainRequest>,
    ) -> Result<Response<pb::DrainProgress>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        validate_id("cell_id", &message.cell_id)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .get_drain(forwarded(message))
                .await;
        }
        self.node
            .view()
            .read(|state| drains::progress(state, &message.cell_id))
            .map(Response::new)
    }

    async fn remove_cell(
        &self,
        request: Request<pb::RemoveCellRequest>,
    ) -> Result<Response<pb::RemoveCellResponse>, Status> {
        write_or_forward!(
            self,
            request,
            remove_cell,
            |message| drains::remove_cell(&message)?,
            |output| match output {
                CommandOutput::Done { revision } => Ok(pb::RemoveCellResponse { revision }),
                other => Err(unexpected(other)),
            }
        )
    }

    async fn failover_region(
        &self,
        request: Request<pb::FailoverRegionRequest>,
    ) -> Result<Response<pb::FailoverRegionResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        validate_id("region", &message.region)?;
        failovers::check_reason(&message.reason)?;
        if let Some(channel) = self.node.linearize(was_forwarded).await? {
            return ControlClient::new(channel)
                .failover_region(forwarded(message))
                .await;
        }
        let plan = self
            .node
            .view()
            .read(|state| failovers::region_plan(state, &message))?;
        let mut response = pb::FailoverRegionResponse::default();
        for step in plan {
            match step {
                Ok((cell_id, command)) => match self.node.propose(command, true).await {
                    Ok(Proposal::Applied(output)) => {
                        response.failovers.push(failovers::failover_output(output)?);
                    }
                    Ok(Proposal::Forward(_)) => {
                        return Err(Status::unavailable(format!(
                            "leadership moved while failing the region over, after {} of its cells ({cell_id:?} not started); retry",
                            response.failovers.len()
                        )));
                    }
                    Err(status) => response.refused.push(pb::RegionFailoverRefusal {
                        cell_id: cell_id.to_string(),
                        reason: status.message().to_string(),
                    }),
                },
                Err(refusal) => response.refused.push(refusal),
            }
        }
        Ok(Response::new(response))
    }
}

/// Failover `id` as this node's state holds it now.
fn failover_now(node: &Node, id: u64) -> Result<Response<pb::Failover>, Status> {
    node.view()
        .read(|state| state.failovers().get(&id).map(|f| f.to_proto(id)))
        .map(Response::new)
        .ok_or_else(|| failovers::not_found(id))
}
