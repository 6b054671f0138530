//! Linearizable reads that share one leadership check.
//!
//! A linearizable read needs the leader to confirm, with a quorum round trip, that it still
//! leads, and then to wait until it has applied up to its commit index (openraft's
//! `ensure_linearizable`). Reads that arrive while a check is in flight wait for the next one — a
//! check that began before a read arrived cannot vouch for it — and every read queued by then
//! shares that next check. Under load one round trip serves hundreds of reads.

use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use tokio::sync::{mpsc, oneshot};

use super::{NodeId, Raft};

/// Why a read could not be made linearizable here.
#[derive(Debug, Clone)]
pub enum ReadIndexError {
    /// This node does not lead; the leader, when known.
    ForwardToLeader(ForwardToLeader<NodeId, BasicNode>),
    /// No quorum confirmed leadership (or Raft is stopping); retry.
    Unavailable(String),
}

type Waiter = oneshot::Sender<Result<(), ReadIndexError>>;

/// A handle to the read-index task; cheap to clone.
#[derive(Clone)]
pub struct ReadIndex {
    queue: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the task for `raft`; it stops when every handle is dropped.
    pub fn start(raft: Raft) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, receiver));
        Self { queue }
    }

    /// Returns once this node's state is fresh enough for a linearizable read.
    pub async fn ensure(&self) -> Result<(), ReadIndexError> {
        let (waiter, ready) = oneshot::channel();
        self.queue
            .send(waiter)
            .map_err(|_| ReadIndexError::Unavailable("read index stopped".into()))?;
        ready
            .await
            .map_err(|_| ReadIndexError::Unavailable("read index dropped the request".into()))?
    }
}

async fn run(raft: Raft, mut queue: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = queue.recv().await {
        let mut waiters = vec![first];
        while let Ok(waiter) = queue.try_recv() {
            waiters.push(waiter);
        }
        metrics::histogram!("cellplane_reads_per_leadership_check").record(waiters.len() as f64);
        let outcome = match raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(leader))) => {
                Err(ReadIndexError::ForwardToLeader(leader))
            }
            Err(err) => Err(ReadIndexError::Unavailable(err.to_string())),
        };
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}
