//! `ListAudit` and `RecordAudit`: reading the audit log, and a follower's entries recorded on
//! the leader.

use cellplane_api::ids::InvalidField;
use cellplane_api::proto::control as pb;
use cellplane_api::proto::control::control_client::ControlClient;
use tonic::{Request, Response, Status};

use crate::audit::entry::{AuditEntry, parse_id};
use crate::limits::MAX_AUDIT_ENTRIES_PER_WRITE;
use crate::node::{Node, Proposal, forwarded, is_forwarded};
use crate::state::ControlState;
use crate::state::command::{Command, CommandOutput};

pub async fn list(
    node: &Node,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    let was_forwarded = is_forwarded(request.metadata());
    let message = request.into_inner();
    let limit = super::page_size(message.page_size)?;
    let before = match message.page_token.as_str() {
        "" => None,
        token => Some(parse_id(token).ok_or_else(|| {
            InvalidField::new("page_token", "must be a next_page_token ListAudit returned")
        })?),
    };
    // The calls this node took are in the log it reads; a forwarded read is answered with
    // the leader's, after the forwarding node flushed its own.
    node.auditor.flush().await;
    if let Some(channel) = node.linearize(was_forwarded).await? {
        return ControlClient::new(channel)
            .list_audit(forwarded(message))
            .await;
    }
    let response = node
        .view()
        .read(|state| page(state, &message, before, limit, node.audit_keep));
    Ok(Response::new(response))
}

/// Newest first, older than `before`, matching the request's filters.
fn page(
    state: &ControlState,
    request: &pb::ListAuditRequest,
    before: Option<(u64, u32)>,
    limit: usize,
    capacity: u32,
) -> pb::ListAuditResponse {
    let method = request.method.as_str();
    let matches = |entry: &AuditEntry| {
        (request.identity.is_empty() || *entry.identity == *request.identity)
            && (method.is_empty()
                || *entry.method == *method
                || entry.method.rsplit('/').next() == Some(method))
    };
    let older = match before {
        Some(id) => state.audit().range(..id),
        None => state.audit().range::<_, (u64, u32)>(..),
    };
    let mut found: Vec<pb::AuditEntry> = older
        .rev()
        .filter(|(_, entry)| matches(entry))
        .take(limit + 1)
        .map(|(id, entry)| entry.to_proto(*id))
        .collect();
    let more = found.len() > limit;
    found.truncate(limit);
    pb::ListAuditResponse {
        next_page_token: if more {
            found.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        },
        entries: found,
        capacity,
    }
}

pub async fn record(
    node: &Node,
    request: Request<pb::RecordAuditRequest>,
) -> Result<Response<pb::RecordAuditResponse>, Status> {
    let message = request.into_inner();
    if message.entries.is_empty() || message.entries.len() > MAX_AUDIT_ENTRIES_PER_WRITE {
        return Err(InvalidField::new(
            "entries",
            format!(
                "must hold 1 to {MAX_AUDIT_ENTRIES_PER_WRITE} entries, got {}",
                message.entries.len()
            ),
        )
        .into());
    }
    let entries = message
        .entries
        .into_iter()
        .map(AuditEntry::from_proto)
        .collect();
    let command = Command::Audit {
        entries,
        keep: node.audit_keep,
    };
    match node.propose(command, true).await? {
        Proposal::Applied(CommandOutput::Done { revision }) => {
            Ok(Response::new(pb::RecordAuditResponse { revision }))
        }
        Proposal::Applied(other) => Err(super::unexpected(other)),
        Proposal::Forward(_) => Err(Status::unavailable(
            "this node no longer leads; the sender retries its audit write elsewhere",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(identity: &str, method: &str) -> AuditEntry {
        AuditEntry {
            at_ms: 1,
            identity: identity.into(),
            peer: "127.0.0.1:1".into(),
            method: method.into(),
            request: "{}".into(),
            code: 0,
            message: String::new(),
            node_id: 1,
        }
    }

    fn state() -> ControlState {
        let mut state = ControlState::default();
        for round in 0..3 {
            let entries = vec![
                entry("ops", "Control/CreateTenant"),
                entry("agent-hz", "Control/FailoverCell"),
            ];
            let (result, _) = state.apply(&Command::Audit { entries, keep: 5 });
            assert!(result.is_ok(), "round {round}: {result:?}");
        }
        state
    }

    #[test]
    fn the_log_keeps_the_newest_and_pages_newest_first() {
        let state = state();
        assert_eq!(state.audit().len(), 5, "the oldest of 6 is dropped");
        let first = page(&state, &Default::default(), None, 2, 5);
        let ids: Vec<&str> = first.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["3.1", "3.0"]);
        assert_eq!(first.next_page_token, "3.0");
        let second = page(
            &state,
            &Default::default(),
            parse_id(&first.next_page_token),
            10,
            5,
        );
        let ids: Vec<&str> = second.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["2.1", "2.0", "1.1"]);
        assert!(second.next_page_token.is_empty());
    }

    #[test]
    fn filters_by_caller_and_by_method_with_or_without_its_service() {
        let state = state();
        let by_agent = pb::ListAuditRequest {
            identity: "agent-hz".into(),
            ..Default::default()
        };
        assert_eq!(page(&state, &by_agent, None, 10, 5).entries.len(), 3);
        for method in ["CreateTenant", "Control/CreateTenant"] {
            let request = pb::ListAuditRequest {
                method: method.into(),
                ..Default::default()
            };
            let found = page(&state, &request, None, 10, 5).entries;
            assert_eq!(found.len(), 2, "{method}");
            assert!(found.iter().all(|e| e.identity == "ops"));
        }
    }

    #[test]
    fn an_empty_write_or_a_zero_size_is_refused_and_changes_nothing() {
        let mut state = ControlState::default();
        for command in [
            Command::Audit {
                entries: vec![],
                keep: 5,
            },
            Command::Audit {
                entries: vec![entry("ops", "Control/Compact")],
                keep: 0,
            },
        ] {
            let (result, _) = state.apply(&command);
            assert!(result.is_err());
        }
        assert_eq!(state.revision(), 0);
    }
}
