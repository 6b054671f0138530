//! Control-plane membership: which step a requested change needs, decided against the current
//! membership by [`plan`] (pure), and carried out through openraft by the store: a new node
//! joins as a learner and is made a voter only once it has caught up, so it never counts
//! towards a quorum it cannot serve; a removed node leaves the voters and the node set in one
//! joint change.
//!
//! Adding a node back under the id it had after its disk was lost is safe only once it was
//! removed: a voter that forgot its vote could vote twice in one term. Remove, wipe, add is the
//! procedure; [`plan`] refuses to add an id that is still a voter at another address.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::command::{CommandError, Entity};

/// A membership change ops asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add { node_id: u64, addr: String },
    Remove { node_id: u64 },
}

/// The step the change needs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Add the node as a learner, wait until it caught up, then make it a voter.
    Join,
    /// The node is a learner already (an earlier add that did not finish): make it a voter.
    Promote,
    /// Nothing to do: the node is a voter at that address.
    Done,
    /// Take a voter out of the voters and the node set.
    RemoveVoter,
    /// Forget a learner.
    RemoveLearner,
}

/// The current membership: every node with its address, and which of them vote.
#[derive(Debug, Clone, Default)]
pub struct Members {
    pub nodes: BTreeMap<u64, String>,
    pub voters: BTreeSet<u64>,
}

pub fn plan(change: &Change, members: &Members) -> Result<Plan, CommandError> {
    match change {
        Change::Add { node_id, addr } => {
            if *node_id == 0 {
                return Err(CommandError::Invalid {
                    field: "node_id".into(),
                    rule: "must be at least 1".into(),
                });
            }
            if let Some((other, _)) = members
                .nodes
                .iter()
                .find(|(id, a)| *id != node_id && *a == addr)
            {
                return Err(CommandError::FailedPrecondition(format!(
                    "addr: node {other} serves at {addr}; one address per node"
                )));
            }
            match members.nodes.get(node_id) {
                None => Ok(Plan::Join),
                Some(known) if known != addr => Err(CommandError::FailedPrecondition(format!(
                    "node_id: node {node_id} is a member at {known}; remove it first to add it at {addr}"
                ))),
                Some(_) if members.voters.contains(node_id) => Ok(Plan::Done),
                Some(_) => Ok(Plan::Promote),
            }
        }
        Change::Remove { node_id } => {
            if !members.nodes.contains_key(node_id) {
                return Err(CommandError::NotFound {
                    what: Entity::Node,
                    id: node_id.to_string(),
                });
            }
            if !members.voters.contains(node_id) {
                return Ok(Plan::RemoveLearner);
            }
            if members.voters.len() == 1 {
                return Err(CommandError::FailedPrecondition(format!(
                    "node_id: node {node_id} is the last voter; the cluster would have none"
                )));
            }
            Ok(Plan::RemoveVoter)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[u64], learners: &[u64]) -> Members {
        Members {
            nodes: voters
                .iter()
                .chain(learners)
                .map(|id| (*id, format!("10.0.0.{id}:7001")))
                .collect(),
            voters: voters.iter().copied().collect(),
        }
    }

    fn add(node_id: u64, addr: &str) -> Change {
        Change::Add {
            node_id,
            addr: addr.into(),
        }
    }

    #[test]
    fn a_node_joins_as_a_learner_first_and_an_unfinished_add_resumes() {
        let now = members(&[1, 2, 3], &[4]);
        assert_eq!(plan(&add(5, "10.0.0.5:7001"), &now), Ok(Plan::Join));
        assert_eq!(plan(&add(4, "10.0.0.4:7001"), &now), Ok(Plan::Promote));
        assert_eq!(plan(&add(3, "10.0.0.3:7001"), &now), Ok(Plan::Done));
    }

    #[test]
    fn an_add_that_would_reuse_an_id_or_an_address_is_refused() {
        let now = members(&[1, 2, 3], &[]);
        for (change, says) in [
            (add(0, "10.0.0.9:7001"), "node_id: must be at least 1"),
            (add(3, "10.0.0.9:7001"), "remove it first"),
            (add(9, "10.0.0.2:7001"), "node 2 serves at"),
        ] {
            let err = plan(&change, &now).expect_err(says);
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn removal_leaves_a_voter_and_never_empties_the_cluster() {
        let now = members(&[1, 2], &[4]);
        assert_eq!(
            plan(&Change::Remove { node_id: 2 }, &now),
            Ok(Plan::RemoveVoter)
        );
        assert_eq!(
            plan(&Change::Remove { node_id: 4 }, &now),
            Ok(Plan::RemoveLearner)
        );
        let err = plan(&Change::Remove { node_id: 7 }, &now).expect_err("unknown");
        assert!(matches!(err, CommandError::NotFound { .. }), "{err}");
        let err =
            plan(&Change::Remove { node_id: 1 }, &members(&[1], &[])).expect_err("last voter");
        assert!(err.to_string().contains("last voter"), "{err}");
    }
}
