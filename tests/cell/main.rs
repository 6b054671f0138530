//! Tests against a real `im-cell serve` process: crash safety, sync delivery and bad input.

mod bad_input;
mod crash;
mod fencing;
mod limits;
mod pns;
mod standby;
mod sync;
mod transfer;

use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, ExportChunk, ExportRequest, SendMessageRequest,
};
use cellplane_tests::cell::CellProcess;

/// Creates a group of `members` at route epoch 1.
pub async fn group(cell: &CellProcess, tenant: &str, conversation: &str, members: &[&str]) {
    cell.messaging()
        .create_conversation(CreateConversationRequest {
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            kind: ConversationKind::Group as i32,
            member_ids: members.iter().map(|m| m.to_string()).collect(),
            route_epoch: 1,
        })
        .await
        .expect("create conversation");
}

pub fn send(
    tenant: &str,
    conversation: &str,
    sender: &str,
    client_msg_id: &str,
    body: &[u8],
) -> SendMessageRequest {
    SendMessageRequest {
        tenant_id: tenant.into(),
        conversation_id: conversation.into(),
        sender_id: sender.into(),
        client_msg_id: client_msg_id.into(),
        body: body.to_vec(),
        receiver_ids: Vec::new(),
        route_epoch: 1,
        client_type: "test".into(),
        app_id: "tests".into(),
        ..Default::default()
    }
}

/// A tenant's export: a snapshot of its rows from LSN 0, or its cell log after `from_lsn`.
pub async fn export(
    cell: &CellProcess,
    tenant: &str,
    from_lsn: u64,
    log_only: bool,
) -> Vec<ExportChunk> {
    let mut stream = cell
        .admin()
        .export(ExportRequest {
            tenant_id: tenant.into(),
            conversation_id: String::new(),
            from_lsn,
            log_only,
        })
        .await
        .expect("export")
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.expect("export stream") {
        chunks.push(chunk);
    }
    chunks
}

/// Imports an export; returns the source LSN the cell has applied.
pub async fn import(cell: &CellProcess, chunks: Vec<ExportChunk>) -> u64 {
    cell.admin()
        .import(futures::stream::iter(chunks))
        .await
        .expect("import")
        .into_inner()
        .source_lsn
}
