//! The proposer: packs concurrent commands into one Raft entry.
//!
//! openraft 0.9 appends one entry at a time and waits for each to be durable, so throughput is
//! bounded by entries, not commands. Every command proposed while an entry is in flight waits in
//! a queue; when a slot frees, the whole queue (up to [`MAX_COMMANDS_PER_ENTRY`]) becomes the
//! next entry. At low load an entry holds one command and costs no extra latency; under load
//! hundreds of commands share one fsync and one replication round trip.

use std::sync::Arc;

use openraft::BasicNode;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{NodeId, Raft};
use crate::state::command::{Command, CommandBatch, CommandResult};

/// Most commands in one log entry: bounds an entry near a megabyte.
pub const MAX_COMMANDS_PER_ENTRY: usize = 1024;

/// Entries in flight at once: one being made durable and replicated, one being formed behind it.
const ENTRIES_IN_FLIGHT: usize = 2;

/// Why a proposal was not applied.
#[derive(Debug, Clone)]
pub enum ProposeError {
    /// This node does not lead; the leader, when known.
    ForwardToLeader(ForwardToLeader<NodeId, BasicNode>),
    /// Raft could not take the entry (stopping, or a fatal error); retry elsewhere.
    Unavailable(String),
}

type Reply = oneshot::Sender<Result<CommandResult, ProposeError>>;

/// A handle to the proposer task; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<(Command, Reply)>,
}

impl Proposer {
    /// Starts the proposer task for `raft`; it stops when every handle is dropped.
    pub fn start(raft: Raft) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, receiver));
        Self { queue }
    }

    /// Proposes one command and waits for its result.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((command, reply))
            .map_err(|_| ProposeError::Unavailable("proposer stopped".into()))?;
        answer
            .await
            .map_err(|_| ProposeError::Unavailable("proposer dropped the request".into()))?
    }
}

async fn run(raft: Raft, mut queue: mpsc::UnboundedReceiver<(Command, Reply)>) {
    let slots = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        // Wait for a slot before draining, so commands that arrive meanwhile join this entry.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut commands = Vec::with_capacity(16);
        let mut replies = Vec::with_capacity(16);
        let (command, reply) = first;
        commands.push(command);
        replies.push(reply);
        while commands.len() < MAX_COMMANDS_PER_ENTRY {
            match queue.try_recv() {
                Ok((command, reply)) => {
                    commands.push(command);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("cellplane_commands_per_entry").record(commands.len() as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            let count = commands.len();
            let outcome = raft.client_write(CommandBatch(commands)).await;
            drop(slot);
            match outcome {
                Ok(response) => {
                    let results = response.data.0;
                    assert_eq!(results.len(), count, "one result per proposed command");
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Err(err) => {
                    let error = match err {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(leader)) => {
                            ProposeError::ForwardToLeader(leader)
                        }
                        other => ProposeError::Unavailable(other.to_string()),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}
