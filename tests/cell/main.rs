//! Tests against a real `im-cell serve` process: crash safety, sync delivery and bad input.

mod bad_input;
mod crash;
mod fencing;
mod pns;
mod standby;
mod sync;
mod transfer;

use cellplane_api::proto::cell::{ConversationKind, CreateConversationRequest, SendMessageRequest};
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
