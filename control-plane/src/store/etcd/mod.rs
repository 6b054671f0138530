//! The etcd store: the same state as the Raft store, kept as records under one prefix of an
//! etcd cluster ([`layout`]).
//!
//! A write runs the ordinary deterministic apply on a copy of the mirror's state, turns the
//! records it changed into one transaction that compares the `mod_revision` of everything the
//! decision read ([`txn`]), and, if another writer got there first, waits for the mirror to see
//! that change and decides again. A refusal decided on a mirror that may be behind is checked
//! again on a caught-up one, so no caller is refused for a state that is already gone. Every
//! node writes; none forwards.

mod layout;
mod mirror;
mod txn;

use std::sync::Arc;
use std::time::Duration;

use cellplane_api::proto::control as pb;
use etcd_client::{Client, ConnectOptions, Txn, TxnOp};

use super::view::SharedState;
use super::{RouteStore, Routed, StoreError};
use crate::config::EtcdConfig;
use crate::state::command::{Command, CommandError, CommandOutput};
use layout::{Layout, MetaKey};
use mirror::Mirror;

/// How long a caller waits for the mirror to see a revision.
const MIRROR_WAIT: Duration = Duration::from_secs(10);

/// Decisions re-made after losing a race before the caller is told to retry.
const MAX_ATTEMPTS: usize = 64;
/// How long the mirror may follow no watch before the node's route watches and listings end:
/// three of etcd's default election timeouts (1 s), so that an election never ends them.
const ETCD_OUT_OF_TOUCH: Duration = Duration::from_secs(3);

/// Why the etcd store could not open.
#[derive(Debug, thiserror::Error)]
pub enum EtcdOpenError {
    #[error("connecting to etcd {endpoints:?}: {source}")]
    Connect {
        endpoints: Vec<String>,
        source: etcd_client::Error,
    },
    #[error("loading the state from etcd: {0}")]
    Load(#[from] StoreError),
    #[error("store.{0}")]
    Tls(#[from] cellplane_api::tls::TlsError),
}

/// A control-plane node on etcd.
pub struct EtcdStore {
    node_id: u64,
    client: Client,
    layout: Layout,
    mirror: Mirror,
}

fn unavailable(context: &str) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
    move |err| StoreError::Unavailable(format!("etcd {context}: {err}"))
}

/// Replaces the revision a copy's apply assumed with the revision etcd committed at.
fn at_revision(output: CommandOutput, assumed: u64, committed: u64) -> CommandOutput {
    let fix = |revision: u64| {
        if revision == assumed {
            committed
        } else {
            revision
        }
    };
    match output {
        CommandOutput::Cell(mut view) => {
            view.record.registered_revision = fix(view.record.registered_revision);
            CommandOutput::Cell(view)
        }
        CommandOutput::Route(mut route) => {
            route.revision = committed;
            CommandOutput::Route(route)
        }
        CommandOutput::Migration(mut view) => {
            view.record.updated_revision = fix(view.record.updated_revision);
            CommandOutput::Migration(view)
        }
        CommandOutput::Failover(mut view) => {
            view.record.updated_revision = fix(view.record.updated_revision);
            CommandOutput::Failover(view)
        }
        CommandOutput::Done { .. } => CommandOutput::Done {
            revision: committed,
        },
        output @ (CommandOutput::Tenant(_) | CommandOutput::Leases { .. }) => output,
    }
}

impl EtcdStore {
    /// Connects, loads the state under `config.prefix` and follows it; returns once the mirror
    /// holds every write made before the call.
    pub async fn open(config: &EtcdConfig, node_id: u64) -> Result<Self, EtcdOpenError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // A member without a leader refuses at once rather than answering from a state
            // that no longer moves, and ends the mirror's watch.
            .with_require_leader(true);
        let mut endpoints = config.endpoints.clone();
        if let Some(tls) = &config.tls {
            options = options.with_tls(cellplane_api::tls::tonic_client_config(tls)?);
            // etcd-client speaks TLS to https URLs only.
            endpoints = endpoints.iter().map(|e| format!("https://{e}")).collect();
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|source| EtcdOpenError::Connect {
                endpoints: config.endpoints.clone(),
                source,
            })?;
        let layout = Layout::new(&config.prefix);
        let mirror = Mirror::start(&client, layout.clone()).await?;
        let store = Self {
            node_id,
            client,
            layout,
            mirror,
        };
        store.catch_up().await?;
        tracing::info!(
            prefix = %config.prefix,
            revision = store.mirror.shared().read(|s| s.revision()),
            tenants = store.mirror.shared().read(|s| s.tenants().len()),
            "etcd store loaded"
        );
        Ok(store)
    }

    /// Waits until the mirror holds every write under the prefix acknowledged before the call:
    /// every write also puts the `written` key, so its `mod_revision`, read linearizably, is
    /// the newest such write.
    async fn catch_up(&self) -> Result<(), StoreError> {
        let response = self
            .client
            .kv_client()
            .get(self.layout.meta(MetaKey::Written), None)
            .await
            .map_err(unavailable("read"))?;
        let written = response.kvs().first().map_or(0, |kv| kv.mod_revision());
        self.mirror.wait_for(written as u64, MIRROR_WAIT).await
    }

    /// Compaction: recorded under the prefix first (so every mirror drops the same history, and
    /// one that restarts replays from there), then etcd's own.
    async fn compact(&self, revision: u64) -> Result<CommandOutput, StoreError> {
        self.catch_up().await?;
        let (current, compacted) = self.view().read(|s| (s.revision(), s.compacted_revision()));
        if revision > current {
            return Err(CommandError::Invalid {
                field: "revision".into(),
                rule: format!("must be at most the current revision {current}"),
            }
            .into());
        }
        let marker = revision.max(compacted);
        let txn = Txn::new().and_then([
            TxnOp::put(
                self.layout.meta(MetaKey::Compacted),
                marker.to_string(),
                None,
            ),
            TxnOp::put(self.layout.meta(MetaKey::Written), Vec::new(), None),
        ]);
        let mut kv = self.client.kv_client();
        let response = kv.txn(txn).await.map_err(unavailable("compaction"))?;
        let committed = response.header().map_or(0, |h| h.revision()) as u64;
        if marker > 0
            && let Err(err) = kv.compact(marker as i64, None).await
            && !err.to_string().contains("compacted")
        {
            return Err(unavailable("compaction")(err));
        }
        self.mirror.wait_for(committed, MIRROR_WAIT).await?;
        Ok(CommandOutput::Done {
            revision: committed,
        })
    }
}

#[tonic::async_trait]
impl RouteStore for EtcdStore {
    async fn execute(
        &self,
        command: Command,
        _forwarded: bool,
    ) -> Result<Routed<CommandOutput>, StoreError> {
        if let Command::Compact { revision } = command {
            return self.compact(revision).await.map(Routed::Here);
        }
        let mut caught_up = false;
        for _ in 0..MAX_ATTEMPTS {
            let before = self.mirror.shared().snapshot();
            let mut after = before.control.clone();
            let assumed = before.control.revision() + 1;
            let (result, _) = after.apply(&command);
            let (output, changes) = match result {
                Ok(output) => (output, after.changes_since(&before.control)),
                Err(refusal) if caught_up => return Err(refusal.into()),
                Err(_) => {
                    self.catch_up().await?;
                    caught_up = true;
                    continue;
                }
            };
            if changes.is_empty() {
                if caught_up {
                    return Ok(Routed::Here(output));
                }
                // Nothing to write: make sure that is true of the newest state.
                self.catch_up().await?;
                caught_up = true;
                continue;
            }
            let txn = txn::build(&self.layout, &before, changes);
            let response = self
                .client
                .kv_client()
                .txn(txn)
                .await
                .map_err(unavailable(command.kind()))?;
            if response.succeeded() {
                let committed = response.header().map_or(0, |h| h.revision()) as u64;
                self.mirror.wait_for(committed, MIRROR_WAIT).await?;
                return Ok(Routed::Here(at_revision(output, assumed, committed)));
            }
            // Another writer changed what this decision read: see its change, decide again.
            metrics::counter!("cellplane_etcd_txn_conflicts_total", "command" => command.kind())
                .increment(1);
            self.catch_up().await?;
            caught_up = true;
        }
        Err(StoreError::Unavailable(format!(
            "{}: lost {MAX_ATTEMPTS} races in a row for the same records; retry",
            command.kind()
        )))
    }

    async fn linearize(&self, _forwarded: bool) -> Result<Routed<()>, StoreError> {
        self.catch_up().await.map(Routed::Here)
    }

    fn view(&self) -> &Arc<SharedState> {
        self.mirror.shared()
    }

    fn drives_migrations(&self) -> bool {
        true
    }

    fn out_of_touch(&self) -> Option<String> {
        let broken = self.mirror.broken_for()?;
        (broken > ETCD_OUT_OF_TOUCH).then(|| {
            format!(
                "node {} has followed no etcd watch for {:.1} s (more than {:.1} s), so its routes may be behind",
                self.node_id,
                broken.as_secs_f64(),
                ETCD_OUT_OF_TOUCH.as_secs_f64()
            )
        })
    }

    async fn change_membership(
        &self,
        _change: crate::raft::membership::Change,
        _forwarded: bool,
    ) -> Result<Routed<Vec<pb::Member>>, StoreError> {
        Err(StoreError::Refused(CommandError::FailedPrecondition(
            "node_id: on the etcd store every node is stateless and the members are etcd's own; change them with etcdctl member add/remove".into(),
        )))
    }

    async fn status(&self) -> Result<pb::ClusterStatusResponse, StoreError> {
        let mut client = self.client.clone();
        let status = client.status().await.map_err(unavailable("status"))?;
        let members = client
            .member_list()
            .await
            .map_err(unavailable("member list"))?;
        let (revision, compacted_revision) =
            self.view().read(|s| (s.revision(), s.compacted_revision()));
        Ok(pb::ClusterStatusResponse {
            node_id: self.node_id,
            leader_id: status.leader(),
            term: status.raft_term(),
            last_log_index: status.raft_index(),
            applied_index: status.raft_applied_index(),
            snapshot_index: 0,
            revision,
            compacted_revision,
            members: members
                .members()
                .iter()
                .map(|m| pb::Member {
                    node_id: m.id(),
                    addr: m.client_urls().first().cloned().unwrap_or_default(),
                    voter: !m.is_learner(),
                })
                .collect(),
            role: "Mirror".into(),
            purged_index: 0,
            store: "etcd".into(),
        })
    }

    async fn shutdown(&self) {
        self.mirror.stop();
    }
}
