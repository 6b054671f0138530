//! Writes to whichever cell owns a conversation, following it when it moves.
//!
//! The route comes from the [`RouteCache`]; the write carries the route's epoch. A cell that
//! refuses with `WRONG_CELL` says why: the key is frozen for a move (wait the time it names),
//! it moved (wait until the cache has the new route, then write there), or the new owner has
//! not been granted the key yet (retry shortly). A migration therefore costs a writer a pause,
//! never an error, as long as it ends within the deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use super::{RouteCache, channel, failed_in_transport};
use crate::detail;
use crate::proto::cell::messaging_client::MessagingClient;
use crate::proto::cell::{
    Conversation, CreateConversationRequest, SendMessageRequest, SendMessageResponse,
};
use crate::proto::routing::Route;
use crate::tls::Tls;

/// Tuning of a [`Messenger`].
#[derive(Debug, Clone)]
pub struct MessengerOptions {
    /// How long one write may keep retrying through a move before its last refusal is
    /// returned.
    pub deadline: Duration,
    /// Wait between retries when the refusal names no time.
    pub retry_pause: Duration,
    pub connect_timeout: Duration,
    /// How long one attempt may wait for its answer before it is sent again (to whichever
    /// cell owns the key by then): a cell that hangs must not hold a writer past a failover.
    pub attempt_timeout: Duration,
    /// mTLS to the cells, or plaintext (the default).
    pub tls: Tls,
}

impl Default for MessengerOptions {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            retry_pause: Duration::from_millis(5),
            connect_timeout: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(1),
            tls: Tls::plaintext(),
        }
    }
}

/// Sends writes to the owning cell of each conversation.
pub struct Messenger {
    routes: Arc<RouteCache>,
    clients: Mutex<HashMap<String, MessagingClient<Channel>>>,
    options: MessengerOptions,
}

impl Messenger {
    pub fn new(routes: Arc<RouteCache>, options: MessengerOptions) -> Self {
        Self {
            routes,
            clients: Mutex::new(HashMap::new()),
            options,
        }
    }

    /// The route of a conversation and a client of the cell that owns it.
    pub fn owner(
        &self,
        tenant_id: &str,
        conversation_id: &str,
    ) -> Result<(Route, MessagingClient<Channel>), Status> {
        let route = self
            .routes
            .lookup(tenant_id, conversation_id)
            .ok_or_else(|| {
                Status::not_found(format!("tenant_id: no route for tenant {tenant_id:?}"))
            })?;
        let mut clients = self
            .clients
            .lock()
            .expect("messenger client cache poisoned");
        let client = match clients.get(&route.endpoint) {
            Some(client) => client.clone(),
            None => {
                let client = MessagingClient::new(
                    channel(
                        &route.endpoint,
                        self.options.connect_timeout,
                        &self.options.tls,
                    )
                    .map_err(|e| Status::failed_precondition(e.to_string()))?,
                );
                clients.insert(route.endpoint.clone(), client.clone());
                client
            }
        };
        Ok((route, client))
    }

    /// Drops the client of `endpoint`, and with it its connection once calls on it end.
    fn forget(&self, endpoint: &str) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(endpoint);
        }
    }

    /// Runs one write against the owner of `(tenant_id, conversation_id)`; `call` gets the
    /// client and the route epoch to put in the request, and may be called again after a
    /// refusal.
    pub async fn write<T, F, Fut>(
        &self,
        tenant_id: &str,
        conversation_id: &str,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(MessagingClient<Channel>, u64) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.options.deadline;
        // An epoch the route must reach before the next try, learned from a refusal.
        let mut at_least = 0;
        loop {
            let (route, client) = self.owner(tenant_id, conversation_id)?;
            if route.epoch < at_least && Instant::now() < deadline {
                tokio::time::sleep(self.options.retry_pause).await;
                continue;
            }
            let limit = self
                .options
                .attempt_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let status = match tokio::time::timeout(limit, call(client, route.epoch)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    // The connection may be to a machine that died without closing it (no
                    // FIN, no RST): every call on it would wait until keepalive gives it up,
                    // 15 s on. The next try connects afresh.
                    self.forget(&route.endpoint);
                    Status::deadline_exceeded(format!(
                        "cell {} did not answer within {limit:?}",
                        route.cell_id
                    ))
                }
            };
            if Instant::now() >= deadline {
                return Err(status);
            }
            let pause = match detail::wrong_cell(&status) {
                Some(wrong) if wrong.frozen => Duration::from_millis(wrong.retry_after_ms),
                Some(wrong) => {
                    // The key moved on (current_epoch), or the cell already holds a newer
                    // grant than the cached route (cell_epoch): wait for the cache to catch up.
                    at_least = at_least
                        .max(wrong.current_epoch)
                        .max(wrong.cell_epoch)
                        .max(route.epoch);
                    self.options.retry_pause
                }
                // The cell restarting, unreachable, hung, or its connection cut mid-call: the
                // owner of the route then, a moment later. Writes carry ids that make a resent
                // one answer as the first did, so resending after a cut is safe.
                None if matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                ) || failed_in_transport(&status) =>
                {
                    self.options.retry_pause * 10
                }
                None => return Err(status),
            };
            tokio::time::sleep(pause.min(deadline - Instant::now())).await;
        }
    }

    pub async fn send_message(
        &self,
        request: SendMessageRequest,
    ) -> Result<SendMessageResponse, Status> {
        let (tenant, conversation) = (request.tenant_id.clone(), request.conversation_id.clone());
        self.write(&tenant, &conversation, |mut client, epoch| {
            let mut request = request.clone();
            request.route_epoch = epoch;
            async move { client.send_message(request).await }
        })
        .await
    }

    pub async fn create_conversation(
        &self,
        request: CreateConversationRequest,
    ) -> Result<Conversation, Status> {
        let (tenant, conversation) = (request.tenant_id.clone(), request.conversation_id.clone());
        self.write(&tenant, &conversation, |mut client, epoch| {
            let mut request = request.clone();
            request.route_epoch = epoch;
            async move { client.create_conversation(request).await }
        })
        .await
    }
}
