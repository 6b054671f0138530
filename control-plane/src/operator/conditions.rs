//! The three conditions every cellplane resource carries, as Kubernetes tools expect them:
//! `Ready` (it is what the spec asks), `Progressing` (a change is under way) and `Degraded`
//! (something needs a person). A condition's transition time moves only when its status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// One condition as a decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub status: bool,
    /// CamelCase, for machines.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl State {
    fn off(reason: &'static str) -> Self {
        Self {
            status: false,
            reason,
            message: String::new(),
        }
    }
}

/// `Ready`, `Progressing` and `Degraded`, as one decision sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conditions {
    pub ready: State,
    pub progressing: State,
    pub degraded: State,
}

impl Conditions {
    /// What the spec asks is in place.
    pub fn ready(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: State {
                status: true,
                reason,
                message: message.into(),
            },
            progressing: State::off(reason),
            degraded: State::off(reason),
        }
    }

    /// A change is under way.
    pub fn progressing(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: State::off(reason),
            progressing: State {
                status: true,
                reason,
                message: message.into(),
            },
            degraded: State::off(reason),
        }
    }

    /// Something is wrong that the operator cannot mend by itself.
    pub fn degraded(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: State::off(reason),
            progressing: State::off(reason),
            degraded: State {
                status: true,
                reason,
                message: message.into(),
            },
        }
    }

    /// Also degraded, while keeping what else holds (a tenant placed but not protected).
    pub fn and_degraded(mut self, reason: &'static str, message: impl Into<String>) -> Self {
        self.degraded = State {
            status: true,
            reason,
            message: message.into(),
        };
        self
    }

    /// As Kubernetes conditions of an object at `generation`, keeping the transition time of
    /// each condition in `existing` whose status did not change.
    pub fn to_k8s(
        &self,
        existing: &[Condition],
        generation: Option<i64>,
        now: Timestamp,
    ) -> Vec<Condition> {
        [
            ("Ready", &self.ready),
            ("Progressing", &self.progressing),
            ("Degraded", &self.degraded),
        ]
        .into_iter()
        .map(|(type_, state)| {
            let status = if state.status { "True" } else { "False" };
            let since = existing
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: type_.into(),
                status: status.into(),
                reason: state.reason.into(),
                message: state.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
    }
}

/// A resource status that carries conditions and the generation they describe.
pub trait WithConditions: serde::Serialize + PartialEq {
    fn conditions(&self) -> &[Condition];
    fn set_conditions(&mut self, generation: Option<i64>, conditions: Vec<Condition>);
}

macro_rules! with_conditions {
    ($($status:ty),*) => {$(
        impl WithConditions for $status {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn set_conditions(&mut self, generation: Option<i64>, conditions: Vec<Condition>) {
                self.observed_generation = generation;
                self.conditions = conditions;
            }
        }
    )*};
}

with_conditions!(
    cellplane_crds::CellStatus,
    cellplane_crds::TenantStatus,
    cellplane_crds::MigrationStatus,
    cellplane_crds::CellFailoverStatus
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let t1 = Timestamp::from_second(2_000).expect("time");
        let first = Conditions::progressing("Creating", "creating").to_k8s(&[], Some(1), t0);
        assert!(first.iter().all(|c| c.last_transition_time == Time(t0)));

        let same = Conditions::progressing("Migrating", "still").to_k8s(&first, Some(2), t1);
        assert!(same.iter().all(|c| c.last_transition_time == Time(t0)));
        assert!(same.iter().all(|c| c.observed_generation == Some(2)));

        let ready = Conditions::ready("Placed", "placed").to_k8s(&same, Some(2), t1);
        let time = |type_: &str| {
            ready
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| c.last_transition_time.clone())
        };
        assert_eq!(time("Ready"), Some(Time(t1)));
        assert_eq!(time("Progressing"), Some(Time(t1)));
        assert_eq!(time("Degraded"), Some(Time(t0)));
    }

    #[test]
    fn exactly_the_named_condition_is_true() {
        let degraded = Conditions::ready("Placed", "placed").and_degraded("Unprotected", "x");
        assert!(degraded.ready.status && degraded.degraded.status && !degraded.progressing.status);
        let conditions =
            Conditions::degraded("Failed", "no").to_k8s(&[], None, Timestamp::UNIX_EPOCH);
        let statuses: Vec<(&str, &str)> = conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            statuses,
            [
                ("Ready", "False"),
                ("Progressing", "False"),
                ("Degraded", "True")
            ]
        );
    }
}
