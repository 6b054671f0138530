//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas only one acts. A holder renews the Lease every `renew_every`; another replica takes
//! it only once it has seen the Lease unchanged for a whole `duration` by its own clock (never
//! by comparing the holder's timestamps with its own clock, so clock skew between machines
//! cannot hand the Lease over early). Every write is guarded by the Lease's resourceVersion,
//! so of two replicas taking it at once one gets a conflict. A holder that cannot renew for
//! two thirds of `duration` stops acting before anyone else may start.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use super::Error;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease left unrenewed stays its holder's.
    pub duration: Duration,
    /// How often the holder renews it (and others look at it).
    pub renew_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// What a replica does with the Lease it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// There is none yet.
    Create,
    /// Nobody holds it, or its holder let it run out.
    Take,
    /// It is this replica's.
    Renew,
    /// Another replica holds it.
    Wait,
}

/// Decides from the Lease as read, and how long this replica has seen it unchanged.
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    timing: Timing,
) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(timing.duration);
    match spec.holder_identity.as_deref() {
        None | Some("") => Step::Take,
        Some(holder) if holder == me => Step::Renew,
        Some(_) if unchanged_for >= duration => Step::Take,
        Some(_) => Step::Wait,
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
    timing: Timing,
    /// The Lease's resourceVersion as last read, and since when this replica has seen it.
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: String, me: String, timing: Timing) -> Self {
        Self {
            api,
            name,
            me,
            timing,
            observed: None,
        }
    }

    /// Returns once this replica holds the Lease.
    pub async fn acquire(&mut self) -> Result<(), Error> {
        loop {
            match self.try_acquire().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(Error::Kube(kube::Error::Api(status)))
                    if status.is_conflict() || status.is_already_exists() => {}
                Err(error) => tracing::warn!(%error, "reading the lease"),
            }
            tokio::time::sleep(self.timing.renew_every).await;
        }
    }

    async fn try_acquire(&mut self) -> Result<bool, Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let version = lease
            .as_ref()
            .and_then(|l| l.resource_version())
            .unwrap_or_default();
        let now = Instant::now();
        let since = match &self.observed {
            Some((seen, since)) if *seen == version => *since,
            _ => {
                self.observed = Some((version, now));
                now
            }
        };
        let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
        match decide(spec, &self.me, now - since, self.timing) {
            Step::Wait => Ok(false),
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.held(None)),
                };
                self.api.create(&PostParams::default(), &lease).await?;
                Ok(true)
            }
            Step::Take | Step::Renew => {
                let mut lease = lease.unwrap_or_default();
                lease.spec = Some(self.held(lease.spec.as_ref()));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await?;
                Ok(true)
            }
        }
    }

    /// The Lease's spec with this replica holding it from now.
    fn held(&self, before: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let transitions = before.and_then(|s| s.lease_transitions).unwrap_or(0);
        // A new Lease starts with its first holder: no transition yet.
        let mine = before.is_none_or(|s| s.holder_identity.as_deref() == Some(self.me.as_str()));
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: i32::try_from(self.timing.duration.as_secs()).ok(),
            acquire_time: if mine {
                before.and_then(|s| s.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..LeaseSpec::default()
        }
    }

    /// Renews the Lease until it is lost; returns why.
    pub async fn hold(&mut self) -> Error {
        let mut renewed = Instant::now();
        let deadline = self.timing.duration * 2 / 3;
        loop {
            tokio::time::sleep(self.timing.renew_every).await;
            match self.renew().await {
                Ok(()) => renewed = Instant::now(),
                Err(lost @ Error::LeaseLost(_)) => return lost,
                Err(error) if renewed.elapsed() >= deadline => {
                    return Error::LeaseLost(format!(
                        "could not renew it for {:?}: {error}",
                        renewed.elapsed()
                    ));
                }
                Err(error) => tracing::warn!(%error, "renewing the lease; retrying"),
            }
        }
    }

    async fn renew(&self) -> Result<(), Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Err(Error::LeaseLost("the lease was deleted".into()));
        };
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        if holder.as_deref() != Some(self.me.as_str()) {
            return Err(Error::LeaseLost(format!("held by {holder:?}")));
        }
        lease.spec = Some(self.held(lease.spec.as_ref()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Err(kube::Error::Api(status)) if status.is_conflict() => {
                Err(Error::LeaseLost("changed by another replica".into()))
            }
            answer => answer.map(drop).map_err(Error::from),
        }
    }

    /// Gives the Lease up, so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return;
        }
        spec.holder_identity = None;
        if let Err(error) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(%error, "giving up the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_changes_hands_only_when_free_or_unchanged_for_its_whole_duration() {
        let t = Timing::default();
        let s = Duration::from_secs;
        assert_eq!(decide(None, "a", s(0), t), Step::Create);
        assert_eq!(decide(Some(&held_by(None)), "a", s(0), t), Step::Take);
        assert_eq!(decide(Some(&held_by(Some(""))), "a", s(0), t), Step::Take);
        assert_eq!(decide(Some(&held_by(Some("a"))), "a", s(0), t), Step::Renew);
        assert_eq!(decide(Some(&held_by(Some("b"))), "a", s(14), t), Step::Wait);
        assert_eq!(decide(Some(&held_by(Some("b"))), "a", s(15), t), Step::Take);
        // The Lease's own duration wins over this replica's setting.
        let short = LeaseSpec {
            lease_duration_seconds: Some(3),
            ..held_by(Some("b"))
        };
        assert_eq!(decide(Some(&short), "a", s(3), t), Step::Take);
    }
}
