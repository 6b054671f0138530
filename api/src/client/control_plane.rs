//! A connection to the control plane as a whole: every node's address, and calls that move on
//! to the next node while one is down or has no leader. Any node serves: followers forward
//! writes to the leader. Agents and `cellctl` talk to the control plane through it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{ClientError, channel};
use crate::proto::control::control_client::ControlClient;
use crate::proto::routing::routing_client::RoutingClient;
use crate::tls::Tls;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one call keeps trying other nodes before it gives up.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// Whether another node, or the same one a moment later, may answer differently.
pub fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

#[derive(Clone)]
pub struct ControlPlane {
    /// The caller's identity, also for whatever else it connects to (an agent's cells).
    tls: Tls,
    endpoints: Arc<Vec<String>>,
    channels: Arc<Vec<Channel>>,
    current: Arc<AtomicUsize>,
    /// How long one node may take to answer before the call moves on to the next.
    attempt_timeout: Option<Duration>,
}

impl ControlPlane {
    /// Plaintext connections to `endpoints`.
    pub fn new(endpoints: Vec<String>) -> Result<Self, ClientError> {
        Self::with_tls(endpoints, &Tls::plaintext())
    }

    /// Connections to `endpoints` over mTLS when `tls` holds an identity.
    pub fn with_tls(endpoints: Vec<String>, tls: &Tls) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let channels = endpoints
            .iter()
            .map(|endpoint| channel(endpoint, CONNECT_TIMEOUT, tls))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            tls: tls.clone(),
            endpoints: Arc::new(endpoints),
            channels: Arc::new(channels),
            current: Arc::new(AtomicUsize::new(0)),
            attempt_timeout: None,
        })
    }

    /// Gives each node `timeout` to answer before a call moves on to the next. A node whose
    /// machine died, or that a partition cut off, holds calls on its connection until
    /// keepalive gives the connection up (15 s); a caller that must hear within a lease
    /// cannot wait that long. A call that times out may still take effect, as one cut off
    /// mid-way may: set it only where every call is safe to repeat.
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// The TLS this client connects with.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    fn channel(&self) -> Channel {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    /// Moves on to the next node after this one failed.
    fn rotate(&self, failed: usize) {
        let _ = self.current.compare_exchange(
            failed,
            (failed + 1) % self.channels.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel())
    }

    /// A Routing client of the node calls go to now, and which node that is: a caller that
    /// holds a stream open on it (a watch) says [`ControlPlane::moved_on_from`] it when the
    /// stream fails, so that it and every other call try the next node.
    pub fn routing_at(&self) -> (usize, RoutingClient<Channel>) {
        let node = self.current.load(Ordering::Relaxed) % self.channels.len();
        (node, RoutingClient::new(self.channels[node].clone()))
    }

    /// Moves calls on to the node after `node`, unless they moved on already.
    pub fn moved_on_from(&self, node: usize) {
        self.rotate(node);
    }

    /// Calls the Control service, trying the nodes in turn while they are unreachable or
    /// without a leader; any other answer is final.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: FnMut(ControlClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(ControlClient::new, call).await
    }

    /// Calls the Routing service like [`ControlPlane::call`].
    pub async fn call_routing<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: FnMut(RoutingClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(RoutingClient::new, call).await
    }

    async fn call_on<C, T, F, Fut>(
        &self,
        client: impl Fn(Channel) -> C,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        let mut backoff = Duration::from_millis(20);
        loop {
            let node = self.current.load(Ordering::Relaxed) % self.channels.len();
            let attempt = call(client(self.channels[node].clone()));
            let answer = match self.attempt_timeout {
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "{} did not answer within {limit:?}",
                            self.endpoints[node]
                        )))
                    }),
                None => attempt.await,
            };
            match answer {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if retryable(&status) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(node = %self.endpoints[node], %status, "control plane call failed; trying the next node");
                    self.rotate(node);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(status) => return Err(status),
            }
        }
    }
}
