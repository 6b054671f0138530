//! What every reconcile shares: the clients, the Event recorder, and each object's run of
//! failures, from which its back-off grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::client::{ControlPlane, retryable};
use cellplane_api::proto::control::control_client::ControlClient;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use tonic::transport::Channel;

use super::Error;
use crate::limits::{OPERATOR_BACKOFF_FIRST_MS, OPERATOR_BACKOFF_MAX_MS};

pub struct Context {
    pub kube: kube::Client,
    pub control: ControlPlane,
    recorder: Recorder,
    /// How often a settled object is looked at again.
    pub resync: Duration,
    /// Failures in a row, by `kind/name`: the next back-off doubles with each.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        kube: kube::Client,
        control: ControlPlane,
        reporter: Reporter,
        resync: Duration,
    ) -> Self {
        Self {
            recorder: Recorder::new(kube.clone(), reporter),
            kube,
            control,
            resync,
            failures: Mutex::default(),
        }
    }

    /// Records an Event on `object`. An Event that cannot be written is logged and dropped:
    /// it must never hold up the change it describes.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "could not record an Event");
        }
    }

    /// Calls the control plane (trying its nodes in turn): its answer or its refusal. A
    /// control plane that stays unreachable or without a leader for the whole call is an
    /// error, which backs off.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<Result<T, tonic::Status>, Error>
    where
        F: FnMut(ControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.control.call(call).await {
            Err(status) if retryable(&status) => Err(Error::Unavailable(status.message().into())),
            answer => Ok(answer),
        }
    }

    /// The reconcile of `object` succeeded: its back-off starts over.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, object: &K) {
        self.lock().remove(&key(object));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic elsewhere while holding this map cannot leave it inconsistent.
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}",
        K::kind(&()),
        object.meta().name.as_deref().unwrap_or("")
    )
}

/// The back-off after `failures` failures in a row: doubling from the first, up to the most.
pub fn backoff(failures: u32) -> Duration {
    let ms = OPERATOR_BACKOFF_FIRST_MS
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(OPERATOR_BACKOFF_MAX_MS);
    Duration::from_millis(ms)
}

/// What a failed reconcile does next: a conflict is retried at once with the fresh object;
/// anything else backs off, longer with each failure in a row.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&()).to_string();
    metrics::counter!("cellplane_operator_reconcile_errors_total", "kind" => kind.clone())
        .increment(1);
    if error.is_conflict() {
        metrics::counter!("cellplane_operator_conflicts_total", "kind" => kind).increment(1);
        tracing::debug!(name = %object.name_any(), "conflict; retrying with the fresh object");
        return Action::requeue(Duration::from_millis(OPERATOR_BACKOFF_FIRST_MS));
    }
    let failures = {
        let mut map = ctx.lock();
        let count = map.entry(key(object.as_ref())).or_default();
        *count = count.saturating_add(1);
        *count
    };
    let wait = backoff(failures);
    tracing::warn!(kind, name = %object.name_any(), %error, retry_in_ms = wait.as_millis() as u64, "reconcile failed");
    Action::requeue(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_and_stops_at_its_most() {
        assert_eq!(backoff(1), Duration::from_millis(OPERATOR_BACKOFF_FIRST_MS));
        assert_eq!(
            backoff(2),
            Duration::from_millis(2 * OPERATOR_BACKOFF_FIRST_MS)
        );
        assert_eq!(
            backoff(3),
            Duration::from_millis(4 * OPERATOR_BACKOFF_FIRST_MS)
        );
        assert_eq!(backoff(64), Duration::from_millis(OPERATOR_BACKOFF_MAX_MS));
        assert_eq!(
            backoff(u32::MAX),
            Duration::from_millis(OPERATOR_BACKOFF_MAX_MS)
        );
    }
}
