//! Offline notifications (the seeds' PNS, the vendors' push channels): a new message for a
//! member with no device online is handed to a notification sink — a webhook the cell POSTs
//! batches of notifications to — and what the sink does not take is recorded in the store.
//!
//! Notifications are best effort by nature (the message itself is durable and syncs when a
//! device comes back), so they never slow a send: the hub offers them to a bounded queue, and a
//! full queue counts as undelivered rather than as back-pressure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::ConfigError;
use crate::store::Store;

/// Where and how notifications go: the `[pns]` table of a cell's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PnsConfig {
    /// `http://host:port/path`; every batch is one POST of JSON.
    pub webhook: String,
    /// Most notifications in one POST.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How long the first notification of a batch waits for others.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// POSTs of one batch before it is recorded as undelivered.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Notifications waiting to be sent before new ones are recorded as undelivered.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_batch_max() -> usize {
    100
}
fn default_flush_ms() -> u64 {
    200
}
fn default_attempts() -> u32 {
    3
}
fn default_queue() -> usize {
    10_000
}

impl PnsConfig {
    /// A sink at `webhook` with the default batching.
    pub fn webhook(webhook: String) -> Self {
        Self {
            webhook,
            batch_max: default_batch_max(),
            flush_ms: default_flush_ms(),
            attempts: default_attempts(),
            queue: default_queue(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        Webhook::parse(&self.webhook)?;
        for (field, value) in [
            ("pns.batch_max", self.batch_max),
            ("pns.attempts", self.attempts as usize),
            ("pns.queue", self.queue),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A parsed `http://host:port/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Webhook {
    authority: String,
    path: String,
}

impl Webhook {
    fn parse(url: &str) -> Result<Self, ConfigError> {
        let invalid = |rule: &str| ConfigError::new("pns.webhook", format!("{rule}, got {url:?}"));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| invalid("must start with http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(invalid("must name a port (http://host:port/path)"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(invalid("must be http://host:port/path"));
        }
        Ok(Self {
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// One offline member to notify of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub tenant_id: String,
    pub user_id: String,
    pub conversation_id: String,
    pub seq: u64,
    pub message_id: String,
    pub sender_id: String,
}

/// What one POST carries.
#[derive(Debug, Serialize)]
struct Batch<'a> {
    cell_id: &'a str,
    notifications: &'a [Notification],
}

/// What the store keeps of notifications the sink did not take.
#[derive(Debug, Serialize, Deserialize)]
struct Undelivered {
    notification: Notification,
    error: String,
}

/// The hub's handle to the sender. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    queue: mpsc::Sender<Notification>,
    store: Store,
}

impl Notifier {
    /// Starts the sender task.
    pub fn start(cell_id: String, config: PnsConfig, store: Store) -> Result<Self, ConfigError> {
        let webhook = Webhook::parse(&config.webhook)?;
        let (queue, pending) = mpsc::channel(config.queue);
        tokio::spawn(send_batches(
            cell_id,
            config,
            webhook,
            pending,
            store.clone(),
        ));
        Ok(Self { queue, store })
    }

    /// Offers a notification without waiting; a full queue records it as undelivered.
    pub fn offer(&self, notification: Notification) {
        if let Err(err) = self.queue.try_send(notification) {
            let notification = match err {
                mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
            };
            record(
                &self.store,
                &[notification],
                "the notification queue was full",
            );
        }
    }
}

/// A key that sorts undelivered notifications by when they were given up on.
fn undelivered_key() -> Vec<u8> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut key = nanos.to_be_bytes().to_vec();
    key.extend_from_slice(&SEQUENCE.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    key
}

/// Keeps what could not be delivered, so ops can see and replay it.
fn record(store: &Store, notifications: &[Notification], error: &str) {
    metrics::counter!("cellplane_cell_notifications_undelivered_total")
        .increment(notifications.len() as u64);
    for notification in notifications {
        let key = undelivered_key();
        let value = Undelivered {
            notification: notification.clone(),
            error: error.to_string(),
        };
        match serde_json::to_vec(&value) {
            Ok(bytes) => {
                if let Err(err) = store.spaces.undelivered.insert(key, bytes) {
                    tracing::error!(error = %err, "cannot record an undelivered notification");
                }
            }
            Err(err) => tracing::error!(error = %err, "cannot encode an undelivered notification"),
        }
    }
    tracing::warn!(
        count = notifications.len(),
        error,
        "notifications not delivered"
    );
}

async fn send_batches(
    cell_id: String,
    config: PnsConfig,
    webhook: Webhook,
    mut pending: mpsc::Receiver<Notification>,
    store: Store,
) {
    let flush = Duration::from_millis(config.flush_ms);
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + flush;
        while batch.len() < config.batch_max {
            match tokio::time::timeout_at(deadline, pending.recv()).await {
                Ok(Some(next)) => batch.push(next),
                Ok(None) | Err(_) => break,
            }
        }
        let body = match serde_json::to_vec(&Batch {
            cell_id: &cell_id,
            notifications: &batch,
        }) {
            Ok(body) => body,
            Err(err) => {
                record(&store, &batch, &err.to_string());
                continue;
            }
        };
        let mut last_error = String::new();
        let mut delivered = false;
        for attempt in 1..=config.attempts {
            match post(&webhook, body.clone()).await {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(err) => {
                    last_error = err;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
            }
        }
        if delivered {
            metrics::counter!("cellplane_cell_notifications_delivered_total")
                .increment(batch.len() as u64);
        } else {
            record(&store, &batch, &last_error);
        }
    }
}

/// One POST; `Err` unless the sink answered 2xx.
async fn post(webhook: &Webhook, body: Vec<u8>) -> Result<(), String> {
    let stream = TcpStream::connect(&webhook.authority)
        .await
        .map_err(|e| format!("connecting to {}: {e}", webhook.authority))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {}: {e}", webhook.authority))?;
    tokio::spawn(connection);
    let request = Request::post(webhook.path.as_str())
        .header(hyper::header::HOST, webhook.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("POST {}{}: {e}", webhook.authority, webhook.path))?;
    let status = response.status();
    // Drain the answer so the connection closes cleanly.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the sink answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_parse_and_bad_ones_name_the_field() {
        assert_eq!(
            Webhook::parse("http://127.0.0.1:9000/push"),
            Ok(Webhook {
                authority: "127.0.0.1:9000".into(),
                path: "/push".into()
            })
        );
        assert_eq!(
            Webhook::parse("http://pns.local:80").map(|w| w.path),
            Ok("/".into())
        );
        for bad in [
            "https://a:1/x",
            "http://nohost/x",
            "http://a:port/x",
            "ftp://a:1",
        ] {
            assert_eq!(
                Webhook::parse(bad).map_err(|e| e.field),
                Err("pns.webhook".to_string()),
                "{bad}"
            );
        }
    }
}
