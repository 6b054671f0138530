//! The tower layer that records admin calls. It runs outside the role check, so it sees the
//! calls the check refuses, and reads each audited call's request once (bounded) to say what
//! was asked. Calls a peer forwards are recorded by the node that took them first, not again.

use std::sync::Arc;
use std::task::{Context, Poll};

use cellplane_api::auth::{self, Policy};
use cellplane_api::proto::control as pb;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Limited};
use tonic::body::Body;

use super::entry::{AuditEntry, cut};
use super::writer::Auditor;
use crate::limits::{MAX_AUDIT_MESSAGE_TEXT, MAX_AUDIT_REQUEST_TEXT};
use crate::node::FORWARDED_METADATA;

/// Whether calls of `method` (a full path) are audited.
pub type Audited = fn(&str) -> bool;

#[derive(Clone)]
pub struct AuditLayer {
    auditor: Auditor,
    policy: Arc<Policy>,
    audited: Audited,
    node_id: u64,
    /// Largest request body an audited call may send: the node's request limit plus the gRPC
    /// frame header. Larger ones are refused here, before anything buffers them.
    max_body_bytes: usize,
}

impl AuditLayer {
    pub fn new(
        auditor: Auditor,
        policy: Arc<Policy>,
        audited: Audited,
        node_id: u64,
        max_request_bytes: usize,
    ) -> Self {
        Self {
            auditor,
            policy,
            audited,
            node_id,
            max_body_bytes: max_request_bytes.saturating_add(5),
        }
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recorded {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Recorded<S> {
    inner: S,
    layer: AuditLayer,
}

impl<S> tower::Service<http::Request<Body>> for Recorded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path().to_string();
        let identity = auth::identity(&request);
        let forwarded_by_peer = request.headers().contains_key(FORWARDED_METADATA)
            && self.layer.policy.is_peer(identity.as_deref());
        if !(self.layer.audited)(&path) || forwarded_by_peer {
            return Box::pin(self.inner.call(request));
        }
        // The service that was polled ready takes this call; a fresh clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let layer = self.layer.clone();
        Box::pin(async move {
            let at_ms = cellplane_api::clock::now_ms();
            let peer = auth::peer(&request).map_or_else(String::new, |a| a.to_string());
            let (parts, body) = request.into_parts();
            let (request_text, response) =
                match Limited::new(body, layer.max_body_bytes).collect().await {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        let text = describe(&path, &bytes);
                        let request = http::Request::from_parts(
                            parts,
                            Body::new(http_body_util::Full::new(bytes)),
                        );
                        (text, inner.call(request).await?)
                    }
                    Err(error) => {
                        let status = if error.is::<http_body_util::LengthLimitError>() {
                            // The code tonic's decoder answers for the same, so one server
                            // answers alike whichever method is asked.
                            tonic::Status::out_of_range(format!(
                                "request: must be at most {} bytes (limits.max_request_bytes)",
                                layer.max_body_bytes - 5
                            ))
                        } else {
                            tonic::Status::cancelled(format!("request: {error}"))
                        };
                        (String::new(), status.into_http())
                    }
                };
            let (code, message) = outcome(&response);
            layer
                .auditor
                .record(AuditEntry {
                    at_ms,
                    identity: identity.unwrap_or_default(),
                    peer: peer.into(),
                    method: short_method(&path).into(),
                    request: request_text,
                    code,
                    message: cut(message, MAX_AUDIT_MESSAGE_TEXT),
                    node_id: layer.node_id,
                })
                .await;
            Ok(response)
        })
    }
}

/// `Control/CreateTenant` for `/cellplane.control.v1.Control/CreateTenant`.
fn short_method(path: &str) -> String {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, name)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{name}")
        }
        None => path.to_string(),
    }
}

/// The status of a unary answer: a refusal carries `grpc-status` in its headers (trailers
/// only); an answer with a body and no status in its headers is OK.
fn outcome(response: &http::Response<Body>) -> (i32, String) {
    tonic::Status::from_header_map(response.headers()).map_or((0, String::new()), |status| {
        (status.code() as i32, status.message().to_string())
    })
}

/// The request of one gRPC call (its one length-prefixed message) as text, for the log; any
/// bytes at all give some text.
pub fn describe(path: &str, body: &[u8]) -> String {
    let Some((&compressed, rest)) = body.split_first() else {
        return "(empty)".into();
    };
    let Some(message) = rest
        .get(..4)
        .and_then(|len| len.try_into().ok())
        .map(|len: [u8; 4]| u32::from_be_bytes(len) as usize)
        .and_then(|len| rest.get(4..4 + len))
    else {
        return format!("(malformed: {} bytes)", body.len());
    };
    if compressed != 0 {
        return format!("(compressed: {} bytes)", message.len());
    }
    let name = path.rsplit('/').next().unwrap_or_default();
    cut(text_of(name, message), MAX_AUDIT_REQUEST_TEXT)
}

/// Decodes `message` as the request type of Control method `name`, as its fields read.
fn text_of(name: &str, message: &[u8]) -> String {
    fn decoded<T: prost::Message + Default + std::fmt::Debug>(message: &[u8]) -> String {
        match T::decode(message) {
            Ok(request) => {
                let text = format!("{request:?}");
                // Drop the type name: the method says it.
                match text.find('{') {
                    Some(start) => text[start..].to_string(),
                    None => "{}".into(),
                }
            }
            Err(error) => format!("(undecodable: {error})"),
        }
    }
    match name {
        "CreateTenant" => decoded::<pb::CreateTenantRequest>(message),
        "DeleteTenant" => decoded::<pb::DeleteTenantRequest>(message),
        "MoveRoute" => decoded::<pb::MoveRouteRequest>(message),
        "Compact" => decoded::<pb::CompactRequest>(message),
        "AddNode" => decoded::<pb::AddNodeRequest>(message),
        "RemoveNode" => decoded::<pb::RemoveNodeRequest>(message),
        "MigrateTenant" => decoded::<pb::MigrateTenantRequest>(message),
        "MigrateConversation" => decoded::<pb::MigrateConversationRequest>(message),
        "SetTenantTier" => decoded::<pb::SetTenantTierRequest>(message),
        "CancelMigration" => decoded::<pb::CancelMigrationRequest>(message),
        "FailoverCell" => decoded::<pb::FailoverCellRequest>(message),
        "CancelFailover" => decoded::<pb::CancelFailoverRequest>(message),
        "FailoverRegion" => decoded::<pb::FailoverRegionRequest>(message),
        "DrainCell" => decoded::<pb::DrainCellRequest>(message),
        "RemoveCell" => decoded::<pb::RemoveCellRequest>(message),
        "ResumeAutomaticFailover" => decoded::<pb::ResumeAutomaticFailoverRequest>(message),
        "SetCellState" => decoded::<pb::SetCellStateRequest>(message),
        "RegisterCell" => decoded::<pb::RegisterCellRequest>(message),
        _ => format!("({} bytes)", message.len()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn frame(message: &impl prost::Message) -> Bytes {
        let encoded = message.encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        body.into()
    }

    #[test]
    fn a_request_reads_as_its_fields_with_enum_names() {
        let body = frame(&pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            tier: pb::Tier::High as i32,
            home_region: "hz".into(),
        });
        let text = describe("/cellplane.control.v1.Control/CreateTenant", &body);
        assert!(text.starts_with('{'), "{text}");
        assert!(text.contains("\"acme\""), "{text}");
        assert!(text.contains("High"), "{text}");
    }

    #[test]
    fn malformed_or_huge_bodies_are_described_not_trusted() {
        let path = "/cellplane.control.v1.Control/CreateTenant";
        assert_eq!(describe(path, &Bytes::new()), "(empty)");
        assert!(describe(path, &Bytes::from_static(&[0, 0, 0, 0, 9, 1])).starts_with("(malformed"));
        assert!(
            describe(path, &Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]))
                .starts_with("(undecodable")
        );
        let long = frame(&pb::CreateTenantRequest {
            tenant_id: "t".repeat(10_000),
            ..Default::default()
        });
        assert!(describe(path, &long).len() <= MAX_AUDIT_REQUEST_TEXT);
    }

    #[test]
    fn methods_read_short() {
        assert_eq!(
            short_method("/cellplane.control.v1.Control/FailoverCell"),
            "Control/FailoverCell"
        );
    }
}
