//! Rate limits on sends: token buckets per conversation, per sender, per client type and per
//! calling app. A send over any of them is refused with RESOURCE_EXHAUSTED and a retry-after, so
//! one noisy conversation, user or integration cannot take the cell's write capacity from the
//! others.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::CellError;
use crate::limits::Limits;

/// Buckets idle this long are forgotten (they would be full again anyway).
const IDLE_FORGET: Duration = Duration::from_secs(60);

/// Buckets kept before idle ones are swept.
const SWEEP_ABOVE: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    Conversation,
    User,
    ClientType,
    App,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Self::Conversation => "conversation",
            Self::User => "sender",
            Self::ClientType => "client type",
            Self::App => "app",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The buckets one admitted send took a token from, to give them back if it writes nothing.
#[derive(Debug)]
pub struct Admitted {
    keys: [(Scope, String); 4],
}

/// The buckets of one cell.
pub struct RateLimiter {
    rates: [(Scope, f64); 4],
    buckets: Mutex<HashMap<(Scope, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> Self {
        Self {
            rates: [
                (
                    Scope::Conversation,
                    f64::from(limits.sends_per_conversation_per_sec),
                ),
                (Scope::User, f64::from(limits.sends_per_sender_per_sec)),
                (
                    Scope::ClientType,
                    f64::from(limits.sends_per_client_type_per_sec),
                ),
                (Scope::App, f64::from(limits.sends_per_app_per_sec)),
            ],
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from each bucket of a send, or refuses it — taking none — naming the
    /// limit and when to retry.
    pub fn admit(
        &self,
        tenant: &str,
        conversation: &str,
        sender: &str,
        client_type: &str,
        app: &str,
        now: Instant,
    ) -> Result<Admitted, CellError> {
        let keys = [
            (Scope::Conversation, format!("{tenant}/{conversation}")),
            (Scope::User, format!("{tenant}/{sender}")),
            (Scope::ClientType, client_type.to_string()),
            (Scope::App, app.to_string()),
        ];
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > SWEEP_ABOVE {
            buckets.retain(|_, b| now.duration_since(b.updated) < IDLE_FORGET);
        }
        // Refill and check every bucket first, so a refused send takes no token anywhere.
        let mut refill = Vec::with_capacity(keys.len());
        for ((scope, rate), (_, key)) in self.rates.iter().zip(&keys) {
            let bucket = buckets
                .get(&(*scope, key.clone()))
                .copied()
                .unwrap_or(Bucket {
                    tokens: *rate,
                    updated: now,
                });
            let elapsed = now.duration_since(bucket.updated).as_secs_f64();
            let tokens = (bucket.tokens + elapsed * rate).min(*rate);
            if tokens < 1.0 {
                let retry_after_ms = (((1.0 - tokens) / rate) * 1000.0).ceil() as u64;
                metrics::counter!("cellplane_cell_sends_rate_limited_total", "scope" => scope.name()).increment(1);
                return Err(CellError::ResourceExhausted(format!(
                    "{} rate limit of {rate}/s exceeded for {key:?}; retry after {retry_after_ms} ms",
                    scope.name()
                )));
            }
            refill.push(((*scope, key.clone()), tokens));
        }
        for (key, tokens) in refill {
            buckets.insert(
                key,
                Bucket {
                    tokens: tokens - 1.0,
                    updated: now,
                },
            );
        }
        Ok(Admitted { keys })
    }

    /// Gives back the tokens of an admitted send that wrote nothing: a writer retrying against
    /// a cell that does not own its key yet (a route switched a moment before the grant
    /// arrives) must not run out of its rate on refusals and then be refused for the rate.
    pub fn refund(&self, admitted: Admitted) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for ((scope, rate), key) in self.rates.iter().zip(admitted.keys) {
            if let Some(bucket) = buckets.get_mut(&(*scope, key.1)) {
                bucket.tokens = (bucket.tokens + 1.0).min(*rate);
            }
        }
    }
}

/// The retry-after a RESOURCE_EXHAUSTED message carries, for clients that parse it.
pub fn retry_after_ms(message: &str) -> Option<u64> {
    let after = message.split("retry after ").nth(1)?;
    after.split(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_conversation: u32) -> RateLimiter {
        RateLimiter::new(&Limits {
            sends_per_conversation_per_sec: per_conversation,
            ..Limits::default()
        })
    }

    #[test]
    fn a_burst_up_to_the_rate_passes_and_the_next_waits() {
        let limiter = limiter(5);
        let now = Instant::now();
        for _ in 0..5 {
            assert!(limiter.admit("t", "c", "u", "ios", "app", now).is_ok());
        }
        let refused = limiter.admit("t", "c", "u", "ios", "app", now).unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains("conversation rate limit of 5/s"),
            "{message}"
        );
        assert_eq!(retry_after_ms(&message), Some(200));
        // Another conversation is not affected; after the wait the first one passes again.
        assert!(limiter.admit("t", "other", "v", "ios", "app", now).is_ok());
        assert!(
            limiter
                .admit(
                    "t",
                    "c",
                    "u",
                    "ios",
                    "app",
                    now + Duration::from_millis(200)
                )
                .is_ok()
        );
    }

    #[test]
    fn a_refused_send_takes_no_token() {
        let limiter = RateLimiter::new(&Limits {
            sends_per_sender_per_sec: 1,
            ..Limits::default()
        });
        let now = Instant::now();
        assert!(limiter.admit("t", "c", "u", "web", "a", now).is_ok());
        assert!(limiter.admit("t", "c", "u", "web", "a", now).is_err());
        // The conversation bucket was not charged by the refused send.
        let buckets = limiter.buckets.lock().unwrap();
        let conversation = buckets
            .get(&(Scope::Conversation, "t/c".to_string()))
            .unwrap();
        assert!(
            (conversation.tokens
                - (f64::from(Limits::default().sends_per_conversation_per_sec) - 1.0))
                .abs()
                < 1e-9
        );
    }

    #[test]
    fn a_refunded_send_leaves_its_buckets_as_they_were() {
        let limiter = RateLimiter::new(&Limits {
            sends_per_sender_per_sec: 2,
            ..Limits::default()
        });
        let now = Instant::now();
        // Far more sends than the rate, each refunded: none is ever refused.
        for _ in 0..10 {
            let admitted = limiter
                .admit("t", "c", "u", "web", "a", now)
                .expect("admitted");
            limiter.refund(admitted);
        }
        assert!(limiter.admit("t", "c", "u", "web", "a", now).is_ok());
        assert!(limiter.admit("t", "c", "u", "web", "a", now).is_ok());
        assert!(limiter.admit("t", "c", "u", "web", "a", now).is_err());
    }
}
