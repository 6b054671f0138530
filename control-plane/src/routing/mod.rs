//! The `Routing` gRPC service: "which cell owns this conversation, at which epoch".
//!
//! STALE answers come from this node's replica and cost a map lookup; LINEARIZABLE answers
//! confirm leadership through the read index first (a follower forwards them to the leader).
//! STALE is safe for senders because cells refuse writes that name an older epoch.

mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;

use cellplane_api::ids::{InvalidField, validate_id, validate_optional_id};
use cellplane_api::limits::MAX_BATCH_KEYS;
use cellplane_api::proto::routing as pb;
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::proto::routing::routing_server::Routing;
use tonic::{Request, Response, Status};

use crate::control::page_size;
use crate::control::status::command_error;
use crate::node::{Node, forwarded, is_forwarded};
use crate::state::model::RouteKey;

pub struct RoutingService {
    node: Arc<Node>,
}

impl RoutingService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// Whether a request asked for a linearizable answer.
fn linearizable(value: i32) -> Result<bool, InvalidField> {
    match pb::Consistency::try_from(value) {
        Ok(pb::Consistency::Linearizable) => Ok(true),
        Ok(pb::Consistency::Stale | pb::Consistency::Unspecified) => Ok(false),
        Err(_) => Err(InvalidField::new(
            "consistency",
            format!("must be LINEARIZABLE or STALE, got enum value {value}"),
        )),
    }
}

fn route_key(
    tenant_field: &str,
    conversation_field: &str,
    tenant_id: &str,
    conversation_id: &str,
) -> Result<RouteKey, InvalidField> {
    validate_id(tenant_field, tenant_id)?;
    validate_optional_id(conversation_field, conversation_id)?;
    Ok(if conversation_id.is_empty() {
        RouteKey::tenant(tenant_id)
    } else {
        RouteKey::conversation(tenant_id, conversation_id)
    })
}

/// Page tokens are the last key of the previous page: `tenant` or `tenant/conversation`
/// (`/` cannot occur in an id).
fn parse_route_token(token: &str) -> Result<Option<RouteKey>, InvalidField> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed = |_| InvalidField::new("page_token", "is not a token this service issued");
    let key = match token.split_once('/') {
        Some((tenant, conversation)) => {
            validate_id("page_token", tenant).map_err(malformed)?;
            validate_id("page_token", conversation).map_err(malformed)?;
            RouteKey::conversation(tenant, conversation)
        }
        None => {
            validate_id("page_token", token).map_err(malformed)?;
            RouteKey::tenant(token)
        }
    };
    Ok(Some(key))
}

#[tonic::async_trait]
impl Routing for RoutingService {
    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        let key = route_key(
            "tenant_id",
            "conversation_id",
            &message.tenant_id,
            &message.conversation_id,
        )?;
        if linearizable(message.consistency)?
            && let Some(channel) = self.node.linearize(was_forwarded).await?
        {
            return RoutingClient::new(channel).lookup(forwarded(message)).await;
        }
        let route = self
            .node
            .view()
            .read(|state| state.resolve(&key))
            .map_err(command_error)?;
        Ok(Response::new(pb::LookupResponse {
            route: Some(route.to_proto()),
        }))
    }

    async fn batch_lookup(
        &self,
        request: Request<pb::BatchLookupRequest>,
    ) -> Result<Response<pb::BatchLookupResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        if message.keys.len() > MAX_BATCH_KEYS {
            return Err(InvalidField::new(
                "keys",
                format!(
                    "at most {MAX_BATCH_KEYS} keys per batch, got {}",
                    message.keys.len()
                ),
            )
            .into());
        }
        // Malformed keys are answered per key: one bad key does not fail the batch.
        let keys: Vec<Result<RouteKey, InvalidField>> = message
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                route_key(
                    &format!("keys[{i}].tenant_id"),
                    &format!("keys[{i}].conversation_id"),
                    &key.tenant_id,
                    &key.conversation_id,
                )
            })
            .collect();
        if linearizable(message.consistency)?
            && let Some(channel) = self.node.linearize(was_forwarded).await?
        {
            return RoutingClient::new(channel)
                .batch_lookup(forwarded(message))
                .await;
        }
        let (results, revision) = self.node.view().read(|state| {
            let results = keys
                .iter()
                .zip(&message.keys)
                .map(|(parsed, asked)| {
                    let result = match parsed {
                        Err(invalid) => pb::lookup_result::Result::Error(pb::KeyError {
                            code: tonic::Code::InvalidArgument as i32,
                            message: invalid.to_string(),
                        }),
                        Ok(key) => match state.resolve(key) {
                            Ok(route) => pb::lookup_result::Result::Route(route.to_proto()),
                            Err(err) => {
                                let status = command_error(err);
                                pb::lookup_result::Result::Error(pb::KeyError {
                                    code: status.code() as i32,
                                    message: status.message().to_string(),
                                })
                            }
                        },
                    };
                    pb::LookupResult {
                        key: Some(asked.clone()),
                        result: Some(result),
                    }
                })
                .collect();
            (results, state.revision())
        });
        Ok(Response::new(pb::BatchLookupResponse { results, revision }))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let slot = self
            .node
            .watches
            .take(cellplane_api::streams::connection(&request))?;
        let stream = watch::start(&self.node, request.into_inner().from_revision)?;
        Ok(Response::new(Box::pin(cellplane_api::streams::Held::new(
            stream, slot,
        ))))
    }

    async fn list_routes(
        &self,
        request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let message = request.into_inner();
        let limit = page_size(message.page_size)?;
        let after = parse_route_token(&message.page_token)?;
        self.node.require_touch()?;
        let (mut page, revision) = self.node.view().read(|state| {
            (
                state.routes_after(after.as_ref(), limit + 1),
                state.revision(),
            )
        });
        let more = page.len() > limit;
        page.truncate(limit);
        let next_page_token = if more {
            page.last().map(|r| r.key.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRoutesResponse {
            routes: page.iter().map(|r| r.to_proto()).collect(),
            next_page_token,
            revision,
        }))
    }

    async fn list_tenant_cells(
        &self,
        request: Request<pb::ListTenantCellsRequest>,
    ) -> Result<Response<pb::ListTenantCellsResponse>, Status> {
        let was_forwarded = is_forwarded(request.metadata());
        let message = request.into_inner();
        validate_id("tenant_id", &message.tenant_id)?;
        if linearizable(message.consistency)?
            && let Some(channel) = self.node.linearize(was_forwarded).await?
        {
            return RoutingClient::new(channel)
                .list_tenant_cells(forwarded(message))
                .await;
        }
        let tenant_id: Arc<str> = Arc::from(message.tenant_id.as_str());
        let answer = self.node.view().read(|state| {
            let tenant = state
                .resolve(&RouteKey::tenant(tenant_id.clone()))
                .map_err(command_error)?;
            let mut cells: BTreeMap<Arc<str>, pb::TenantCell> = BTreeMap::new();
            cells.insert(
                tenant.cell_id.clone(),
                pb::TenantCell {
                    cell_id: tenant.cell_id.to_string(),
                    endpoint: tenant.endpoint.to_string(),
                    is_placement: true,
                    override_count: 0,
                },
            );
            for (_, record) in state.tenant_overrides(&tenant_id) {
                let entry = cells
                    .entry(record.cell_id.clone())
                    .or_insert_with(|| pb::TenantCell {
                        cell_id: record.cell_id.to_string(),
                        endpoint: state
                            .cells()
                            .get(&record.cell_id)
                            .map(|c| c.endpoint.to_string())
                            .unwrap_or_default(),
                        is_placement: false,
                        override_count: 0,
                    });
                entry.override_count += 1;
            }
            Ok::<_, Status>((cells.into_values().collect(), state.revision()))
        });
        let (cells, revision) = answer?;
        Ok(Response::new(pb::ListTenantCellsResponse {
            cells,
            revision,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_tokens_round_trip_and_refuse_garbage() {
        let key = RouteKey::conversation("t1", "c1");
        assert_eq!(parse_route_token(&key.to_string()), Ok(Some(key)));
        assert_eq!(parse_route_token("t1"), Ok(Some(RouteKey::tenant("t1"))));
        assert_eq!(parse_route_token(""), Ok(None));
        assert_eq!(
            parse_route_token("a b").map_err(|e| e.field),
            Err("page_token".to_string())
        );
        assert!(parse_route_token("t/").is_err());
    }

    #[test]
    fn unknown_consistency_values_are_refused() {
        assert_eq!(linearizable(1), Ok(true));
        assert_eq!(linearizable(0), Ok(false));
        assert_eq!(
            linearizable(7).map_err(|e| e.field),
            Err("consistency".to_string())
        );
    }
}
