//! The `Messaging` gRPC service: request shape is checked here (ids, sizes, limits); state is
//! checked and changed by the writer; reads go to the store.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use cellplane_api::ids::validate_id;
use cellplane_api::proto::cell as pb;
use cellplane_api::proto::cell::messaging_server::Messaging;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::error::CellError;
use crate::limits::Limits;
use crate::rate::{Admitted, RateLimiter, retry_after_ms};
use crate::receipts::{Receipt, ReceiptMerger};
use crate::store::Store;
use crate::store::mutate::WriteRequest;
use crate::store::records::{Kind, MessageRecord};
use crate::store::writer::{ConversationView, Op, Outcome, Writer};

/// Messages counted when computing an unread count; beyond it the count reads as this cap.
pub const MAX_UNREAD_COUNT: usize = 9_999;

pub struct MessagingService {
    store: Store,
    writer: Writer,
    limits: Limits,
    rates: RateLimiter,
    receipts: ReceiptMerger,
    /// Places for LOW-priority sends waiting for their turn under the rate limits.
    low_priority: Arc<Semaphore>,
}

impl MessagingService {
    pub fn new(store: Store, writer: Writer, limits: Limits) -> Self {
        let rates = RateLimiter::new(&limits);
        let receipts = ReceiptMerger::start(writer.clone());
        let low_priority = Arc::new(Semaphore::new(limits.low_priority_max_waiting));
        Self {
            store,
            writer,
            limits,
            rates,
            receipts,
            low_priority,
        }
    }

    /// Admits a send under the rate limits. A NORMAL send is admitted now or refused; a LOW
    /// one over a limit waits for its turn (as many of them as there are places), up to
    /// `low_priority_max_wait_ms`, so bursts of reactions or bot pushes are smoothed rather
    /// than refused.
    async fn admit(&self, r: &pb::SendMessageRequest) -> Result<Admitted, CellError> {
        let low = match pb::Priority::try_from(r.priority) {
            Ok(pb::Priority::Normal) => false,
            Ok(pb::Priority::Low) => true,
            Err(_) => {
                return Err(CellError::invalid(
                    "priority",
                    format!("must be NORMAL or LOW, got enum value {}", r.priority),
                ));
            }
        };
        let try_admit = || {
            self.rates.admit(
                &r.tenant_id,
                &r.conversation_id,
                &r.sender_id,
                &r.client_type,
                &r.app_id,
                Instant::now(),
            )
        };
        let mut refused = match try_admit() {
            Ok(admitted) => return Ok(admitted),
            Err(refused) => refused,
        };
        if !low {
            return Err(refused);
        }
        let Ok(_place) = self.low_priority.clone().try_acquire_owned() else {
            return Err(refused);
        };
        metrics::counter!("cellplane_cell_low_priority_waits_total").increment(1);
        let deadline = Instant::now() + Duration::from_millis(self.limits.low_priority_max_wait_ms);
        loop {
            let CellError::ResourceExhausted(message) = &refused else {
                return Err(refused);
            };
            let wait = Duration::from_millis(retry_after_ms(message).unwrap_or(10).max(1));
            if Instant::now() + wait > deadline {
                return Err(CellError::ResourceExhausted(format!(
                    "{message} (a LOW-priority send waits at most {} ms)",
                    self.limits.low_priority_max_wait_ms
                )));
            }
            tokio::time::sleep(wait).await;
            refused = match try_admit() {
                Ok(admitted) => return Ok(admitted),
                Err(refused) => refused,
            };
        }
    }
}

pub fn message_to_proto(message: &MessageRecord) -> pb::Message {
    pb::Message {
        message_id: message.message_id.clone(),
        seq: message.seq,
        sender_id: message.sender_id.clone(),
        body: message.body.clone(),
        server_time_ms: message.server_time_ms,
        receiver_ids: message.receiver_ids.clone(),
        recalled: message.recalled,
        client_msg_id: message.client_msg_id.clone(),
    }
}

fn kind_to_proto(kind: Kind) -> pb::ConversationKind {
    match kind {
        Kind::Single => pb::ConversationKind::Single,
        Kind::Group => pb::ConversationKind::Group,
    }
}

fn conversation_to_proto(
    tenant: &str,
    conversation: &str,
    view: ConversationView,
) -> pb::Conversation {
    pb::Conversation {
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        kind: kind_to_proto(view.kind) as i32,
        member_ids: view.members,
        created_ms: view.created_ms,
        last_seq: view.last_seq,
    }
}

fn key(tenant: &str, conversation: &str) -> Result<(), CellError> {
    validate_id("tenant_id", tenant)?;
    validate_id("conversation_id", conversation)?;
    Ok(())
}

/// Checks a list of user ids: each valid, none repeated, at most `max`.
fn user_ids(field: &str, ids: &[String], max: usize) -> Result<(), CellError> {
    if ids.len() > max {
        return Err(CellError::invalid(
            field,
            format!("at most {max} per call, got {}", ids.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        validate_id(&format!("{field}[{i}]"), id)?;
        if !seen.insert(id) {
            return Err(CellError::invalid(
                format!("{field}[{i}]"),
                format!("{id:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

fn expect_conversation(outcome: Outcome) -> Result<ConversationView, Status> {
    match outcome {
        Outcome::Conversation(view) => Ok(view),
        other => Err(Status::internal(format!(
            "unexpected writer outcome {other:?}"
        ))),
    }
}

impl MessagingService {
    async fn write(&self, op: Op) -> Result<Outcome, Status> {
        Ok(self.writer.submit(op).await?)
    }

    /// Adds or removes members: the same checks, another write.
    async fn change_members(
        &self,
        r: pb::ChangeMembersRequest,
        write: impl FnOnce(Vec<String>) -> WriteRequest,
    ) -> Result<Response<pb::Conversation>, Status> {
        key(&r.tenant_id, &r.conversation_id)?;
        user_ids(
            "member_ids",
            &r.member_ids,
            self.limits.max_members_per_call,
        )?;
        let view = expect_conversation(
            self.write(Op::Write {
                tenant: r.tenant_id.clone(),
                conversation: r.conversation_id.clone(),
                epoch: r.route_epoch,
                request: write(r.member_ids),
            })
            .await?,
        )?;
        Ok(Response::new(conversation_to_proto(
            &r.tenant_id,
            &r.conversation_id,
            view,
        )))
    }

    /// A write about one message of one user (read, recall, delete for me).
    async fn write_message_ref(
        &self,
        r: pb::MessageRefRequest,
        write: impl FnOnce(String, u64) -> WriteRequest,
    ) -> Result<Outcome, Status> {
        self.message_ref(&r)?;
        self.write(Op::Write {
            tenant: r.tenant_id,
            conversation: r.conversation_id,
            epoch: r.route_epoch,
            request: write(r.user_id, r.seq),
        })
        .await
    }

    fn message_ref(&self, request: &pb::MessageRefRequest) -> Result<(), CellError> {
        key(&request.tenant_id, &request.conversation_id)?;
        validate_id("user_id", &request.user_id)?;
        if request.seq == 0 {
            return Err(CellError::invalid("seq", "must be at least 1"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Messaging for MessagingService {
    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let r = request.into_inner();
        key(&r.tenant_id, &r.conversation_id)?;
        let kind = match pb::ConversationKind::try_from(r.kind) {
            Ok(pb::ConversationKind::Single) => Kind::Single,
            Ok(pb::ConversationKind::Group) => Kind::Group,
            _ => {
                return Err(CellError::invalid(
                    "kind",
                    format!("must be SINGLE or GROUP, got enum value {}", r.kind),
                )
                .into());
            }
        };
        user_ids("member_ids", &r.member_ids, self.limits.max_group_members)?;
        match kind {
            Kind::Single if r.member_ids.len() != 2 => {
                return Err(CellError::invalid(
                    "member_ids",
                    format!(
                        "a single chat has exactly 2 members, got {}",
                        r.member_ids.len()
                    ),
                )
                .into());
            }
            Kind::Group if r.member_ids.is_empty() => {
                return Err(
                    CellError::invalid("member_ids", "a group needs at least 1 member").into(),
                );
            }
            _ => {}
        }
        let view = expect_conversation(
            self.write(Op::Write {
                tenant: r.tenant_id.clone(),
                conversation: r.conversation_id.clone(),
                epoch: r.route_epoch,
                request: WriteRequest::CreateConversation {
                    kind,
                    members: r.member_ids,
                },
            })
            .await?,
        )?;
        Ok(Response::new(conversation_to_proto(
            &r.tenant_id,
            &r.conversation_id,
            view,
        )))
    }

    async fn add_members(
        &self,
        request: Request<pb::ChangeMembersRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        self.change_members(request.into_inner(), |members| WriteRequest::AddMembers {
            members,
        })
        .await
    }

    async fn remove_members(
        &self,
        request: Request<pb::ChangeMembersRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        self.change_members(request.into_inner(), |members| {
            WriteRequest::RemoveMembers { members }
        })
        .await
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let r = request.into_inner();
        key(&r.tenant_id, &r.conversation_id)?;
        validate_id("sender_id", &r.sender_id)?;
        validate_id("client_msg_id", &r.client_msg_id)?;
        if r.body.len() > self.limits.max_body_bytes {
            return Err(CellError::invalid(
                "body",
                format!(
                    "must be at most {} bytes, got {}",
                    self.limits.max_body_bytes,
                    r.body.len()
                ),
            )
            .into());
        }
        user_ids("receiver_ids", &r.receiver_ids, self.limits.max_receivers)?;
        cellplane_api::ids::validate_optional_id("client_type", &r.client_type)?;
        cellplane_api::ids::validate_optional_id("app_id", &r.app_id)?;
        let admitted = self.admit(&r).await?;
        let written = self
            .write(Op::Write {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                epoch: r.route_epoch,
                request: WriteRequest::Send {
                    sender: r.sender_id,
                    client_msg_id: r.client_msg_id,
                    body: r.body,
                    receivers: r.receiver_ids,
                },
            })
            .await;
        let outcome = match written {
            Ok(outcome) => outcome,
            Err(refused) => {
                self.rates.refund(admitted);
                return Err(refused);
            }
        };
        match outcome {
            Outcome::Sent(sent) => Ok(Response::new(pb::SendMessageResponse {
                message_id: sent.message_id,
                seq: sent.seq,
                server_time_ms: sent.server_time_ms,
            })),
            other => Err(Status::internal(format!(
                "unexpected writer outcome {other:?}"
            ))),
        }
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let r = request.into_inner();
        key(&r.tenant_id, &r.conversation_id)?;
        validate_id("user_id", &r.user_id)?;
        if r.limit == 0 || r.limit > self.limits.max_history_page {
            return Err(CellError::invalid(
                "limit",
                format!(
                    "must be 1..={}, got {}",
                    self.limits.max_history_page, r.limit
                ),
            )
            .into());
        }
        if self
            .store
            .conversation(&r.tenant_id, &r.conversation_id)?
            .is_none()
        {
            return Err(CellError::NotFound(format!(
                "conversation_id: conversation {:?} of tenant {:?} does not exist",
                r.conversation_id, r.tenant_id
            ))
            .into());
        }
        if self
            .store
            .member(&r.tenant_id, &r.conversation_id, &r.user_id)?
            .is_none()
        {
            return Err(CellError::PermissionDenied(format!(
                "user_id: {:?} is not a member of {:?}",
                r.user_id, r.conversation_id
            ))
            .into());
        }
        let (messages, has_more) = self.store.history(
            &r.tenant_id,
            &r.conversation_id,
            &r.user_id,
            r.before_seq,
            r.limit as usize,
        )?;
        Ok(Response::new(pb::GetHistoryResponse {
            messages: messages.iter().map(message_to_proto).collect(),
            has_more,
        }))
    }

    async fn mark_read(
        &self,
        request: Request<pb::MessageRefRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.write_message_ref(r.clone(), |user, seq| WriteRequest::MarkRead { user, seq })
            .await?;
        // The reader's own devices heard of it in the write; the other members hear of it
        // merged with the window's other receipts.
        self.receipts.add(Receipt {
            tenant: r.tenant_id,
            conversation: r.conversation_id,
            user: r.user_id,
            seq: r.seq,
        });
        Ok(Response::new(pb::Empty {}))
    }

    async fn recall_message(
        &self,
        request: Request<pb::MessageRefRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.write_message_ref(request.into_inner(), |user, seq| WriteRequest::Recall {
            user,
            seq,
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn delete_for_me(
        &self,
        request: Request<pb::MessageRefRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.write_message_ref(request.into_inner(), |user, seq| {
            WriteRequest::DeleteForMe { user, seq }
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_conversations(
        &self,
        request: Request<pb::GetConversationsRequest>,
    ) -> Result<Response<pb::GetConversationsResponse>, Status> {
        let r = request.into_inner();
        validate_id("tenant_id", &r.tenant_id)?;
        validate_id("user_id", &r.user_id)?;
        let mut conversations = Vec::new();
        for conversation in self.store.user_conversations(&r.tenant_id, &r.user_id)? {
            let Some(record) = self.store.conversation(&r.tenant_id, &conversation)? else {
                continue;
            };
            let read_seq = self
                .store
                .member(&r.tenant_id, &conversation, &r.user_id)?
                .map(|m| m.read_seq)
                .unwrap_or(0);
            // Computed on read, not counted on every send. One page, newest first, serves both
            // the last message and the unread count.
            let unread_window =
                MAX_UNREAD_COUNT.min(record.last_seq.saturating_sub(read_seq) as usize);
            let (newest, _) = self.store.history(
                &r.tenant_id,
                &conversation,
                &r.user_id,
                0,
                unread_window.max(1),
            )?;
            let unread = newest.iter().filter(|m| m.seq > read_seq).count() as u64;
            conversations.push(pb::ConversationSummary {
                conversation_id: conversation,
                kind: kind_to_proto(record.kind) as i32,
                unread,
                last_message: newest.first().map(message_to_proto),
                read_seq,
            });
        }
        Ok(Response::new(pb::GetConversationsResponse {
            conversations,
        }))
    }
}
