//! What a control-plane node is told to be: parsed from flags or one TOML file, validated once
//! with errors that name the field, then passed around as a [`NodeConfig`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::limits::MAX_AUDIT_ENTRIES;
use cellplane_api::ids::validate_endpoint;
use serde::Deserialize;

pub use cellplane_api::ids::ConfigError;

/// Raft timing and log retention. Defaults suit nodes on one LAN or loopback; spread over
/// regions, raise the election timeouts above the worst round trip.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one. Each snapshot writes
    /// the whole state, so at ten million tenants keep this in the hundreds of thousands.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot, so a briefly lagging follower catches up from the
    /// log instead of a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// How long the leader waits for a follower to install a snapshot once the last chunk is
    /// sent. Installing ten million tenants takes seconds (docs/benchmarks.md); a leader that
    /// gives up too early resends the snapshot forever.
    pub snapshot_install_timeout_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_after_logs: 200_000,
            logs_kept_after_snapshot: 10_000,
            snapshot_install_timeout_ms: 120_000,
        }
    }
}

/// Where the node keeps the routing state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// The embedded Raft cluster of `peers`, logging to `data_dir`.
    #[default]
    Raft,
    /// An etcd cluster; `peers` and `data_dir` are not used.
    Etcd(EtcdConfig),
}

impl StoreConfig {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Raft => "raft",
            Self::Etcd(_) => "etcd",
        }
    }
}

/// How to reach etcd and where in it the state lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `host:port` of etcd members; any one that answers will do.
    pub endpoints: Vec<String>,
    /// Every key of the state starts with this; several control planes can share one etcd
    /// under different prefixes.
    #[serde(default = "EtcdConfig::default_prefix")]
    pub prefix: String,
    /// mTLS to etcd: its CA and this node's client identity (`[store.tls]`); plaintext when
    /// absent. Read at start: a rotation of these files takes a restart of the node.
    #[serde(default)]
    pub tls: Option<cellplane_api::tls::TlsPaths>,
}

impl EtcdConfig {
    pub fn default_prefix() -> String {
        "/cellplane/".into()
    }

    /// Parses `--etcd-endpoints host:port,host:port`.
    pub fn parse_endpoints(text: &str) -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::new(
                "store.endpoints",
                "must list at least one etcd member",
            ));
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            validate_endpoint(&format!("store.endpoints[{i}]"), endpoint)?;
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(ConfigError::new(
                "store.prefix",
                format!(
                    "must start and end with '/' and name something, got {:?}",
                    self.prefix
                ),
            ));
        }
        Ok(())
    }
}

/// One node's configuration, as written in a TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id, one of the keys of `peers`. May be left to `--node-id`, so that the
    /// replicas of a StatefulSet share one file and each passes its own.
    #[serde(default)]
    pub node_id: u64,
    /// Where this node serves gRPC (Routing, Control, Raft, health, reflection).
    pub listen: SocketAddr,
    /// Directory of the Raft log and snapshots; a node restarts from it. Raft store only.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// Every voter of the cluster, `node id → host:port`, this node included. The lowest id
    /// initializes the cluster when its data directory is empty. Raft store only.
    #[serde(default)]
    pub peers: BTreeMap<u64, String>,
    #[serde(default)]
    pub store: StoreConfig,
    /// Where to serve Prometheus metrics over HTTP; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub migration: crate::migration::step::Settings,
    #[serde(default)]
    pub failover: crate::failover::detect::Settings,
    /// mTLS for the node's server (clients, agents, peers) and its calls to peers; plaintext
    /// when absent.
    #[serde(default)]
    pub tls: Option<cellplane_api::tls::TlsPaths>,
    /// Who may call what, by certificate common name; enforced under mTLS.
    #[serde(default)]
    pub auth: Option<cellplane_api::auth::AuthConfig>,
    /// How long calls may take to finish once the node is asked to stop; then it stops anyway.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Admin calls the audit log keeps; the oldest are dropped beyond it.
    #[serde(default = "default_audit_entries")]
    pub audit_entries: u32,
    /// What the node serves at most (`crate::limits`).
    #[serde(default)]
    pub limits: crate::limits::Limits,
}

fn default_audit_entries() -> u32 {
    crate::limits::DEFAULT_AUDIT_ENTRIES
}

fn default_shutdown_grace_ms() -> u64 {
    NodeConfig::DEFAULT_SHUTDOWN_GRACE_MS
}

impl NodeConfig {
    pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

    /// A node of `store` with every other setting at its default, as a config file that
    /// names only these would give.
    pub fn new(
        node_id: u64,
        listen: SocketAddr,
        data_dir: PathBuf,
        peers: BTreeMap<u64, String>,
        store: StoreConfig,
    ) -> Self {
        Self {
            node_id,
            listen,
            data_dir,
            peers,
            store,
            metrics_listen: None,
            raft: RaftTuning::default(),
            migration: Default::default(),
            failover: Default::default(),
            tls: None,
            auth: None,
            shutdown_grace_ms: Self::DEFAULT_SHUTDOWN_GRACE_MS,
            audit_entries: crate::limits::DEFAULT_AUDIT_ENTRIES,
            limits: Default::default(),
        }
    }

    /// Reads a TOML config file; unknown fields are refused so a typo is not silently ignored.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::new("(file)", e.to_string()))
    }

    /// Checks every rule that can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::new(
                "node_id",
                "must be at least 1 (in the file or --node-id)",
            ));
        }
        if !(1..=MAX_AUDIT_ENTRIES).contains(&self.audit_entries) {
            return Err(ConfigError::new(
                "audit_entries",
                format!("must be 1 to {MAX_AUDIT_ENTRIES}"),
            ));
        }
        self.limits.validate()?;
        self.validate_migration()?;
        self.validate_failover()?;
        match &self.store {
            StoreConfig::Raft => self.validate_raft(),
            StoreConfig::Etcd(etcd) => etcd.validate(),
        }
    }

    fn validate_raft(&self) -> Result<(), ConfigError> {
        if self.peers.is_empty() {
            return Err(ConfigError::new("peers", "must list at least this node"));
        }
        if !self.peers.contains_key(&self.node_id) {
            return Err(ConfigError::new(
                "peers",
                format!("must include this node's id {}", self.node_id),
            ));
        }
        for (id, addr) in &self.peers {
            if *id == 0 {
                return Err(ConfigError::new("peers", "node ids must be at least 1"));
            }
            validate_endpoint(&format!("peers.{id}"), addr)?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0 {
            return Err(ConfigError::new(
                "raft.heartbeat_interval_ms",
                "must be at least 1",
            ));
        }
        if raft.election_timeout_min_ms <= raft.heartbeat_interval_ms {
            return Err(ConfigError::new(
                "raft.election_timeout_min_ms",
                "must be greater than raft.heartbeat_interval_ms",
            ));
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return Err(ConfigError::new(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms",
            ));
        }
        if raft.snapshot_install_timeout_ms < raft.heartbeat_interval_ms {
            return Err(ConfigError::new(
                "raft.snapshot_install_timeout_ms",
                "must be at least raft.heartbeat_interval_ms",
            ));
        }
        if raft.snapshot_after_logs == 0 {
            return Err(ConfigError::new(
                "raft.snapshot_after_logs",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_migration(&self) -> Result<(), ConfigError> {
        let migration = &self.migration;
        if migration.freeze_timeout_ms == 0 {
            return Err(ConfigError::new(
                "migration.freeze_timeout_ms",
                "must be at least 1",
            ));
        }
        if migration.stall_timeout_ms < migration.freeze_timeout_ms {
            return Err(ConfigError::new(
                "migration.stall_timeout_ms",
                "must be at least migration.freeze_timeout_ms",
            ));
        }
        Ok(())
    }

    fn validate_failover(&self) -> Result<(), ConfigError> {
        let failover = &self.failover;
        if !(100..=60_000).contains(&failover.lease_ms) {
            return Err(ConfigError::new(
                "failover.lease_ms",
                "must be between 100 and 60000",
            ));
        }
        if failover.clock_drift_ms >= failover.lease_ms {
            return Err(ConfigError::new(
                "failover.clock_drift_ms",
                "must be below failover.lease_ms",
            ));
        }
        Ok(())
    }

    /// Parses `--peers 1=host:port,2=host:port`.
    pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
        let mut peers = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((id, addr)) = part.split_once('=') else {
                return Err(ConfigError::new(
                    "peers",
                    format!("{part:?} is not ID=HOST:PORT"),
                ));
            };
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| ConfigError::new("peers", format!("{id:?} is not a node id")))?;
            if peers.insert(id, addr.trim().to_string()).is_some() {
                return Err(ConfigError::new(
                    "peers",
                    format!("node id {id} is listed twice"),
                ));
            }
        }
        Ok(peers)
    }

    /// The node that initializes a new cluster.
    pub fn bootstrapper(&self) -> Option<u64> {
        self.peers.keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig::new(
            1,
            "127.0.0.1:7001".parse().expect("addr"),
            PathBuf::from("/tmp/cp"),
            NodeConfig::parse_peers("1=127.0.0.1:7001,2=127.0.0.1:7002").expect("peers"),
            StoreConfig::Raft,
        )
    }

    #[test]
    fn a_sound_config_validates() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let mut c = config();
        c.node_id = 3;
        assert_eq!(c.validate().map_err(|e| e.field), Err("peers".into()));

        let mut c = config();
        c.peers.insert(4, "nohost".into());
        assert_eq!(c.validate().map_err(|e| e.field), Err("peers.4".into()));

        let mut c = config();
        c.raft.election_timeout_min_ms = 50;
        assert_eq!(
            c.validate().map_err(|e| e.field),
            Err("raft.election_timeout_min_ms".into())
        );
    }

    #[test]
    fn peers_parse_and_refuse_duplicates() {
        assert!(NodeConfig::parse_peers("1=a:1,1=b:2").is_err());
        assert!(NodeConfig::parse_peers("x=a:1").is_err());
        assert_eq!(
            NodeConfig::parse_peers("2=a:1, 1=b:2").map(|p| p.len()),
            Ok(2)
        );
    }

    #[test]
    fn toml_files_parse_and_unknown_fields_are_refused() {
        let text = r#"
            node_id = 2
            listen = "127.0.0.1:7002"
            data_dir = "/var/lib/cellplane"
            [peers]
            1 = "127.0.0.1:7001"
            2 = "127.0.0.1:7002"
            [raft]
            snapshot_after_logs = 1000
        "#;
        let parsed = NodeConfig::from_toml(text).expect("parse");
        assert_eq!(parsed.raft.snapshot_after_logs, 1000);
        assert_eq!(parsed.validate(), Ok(()));
        assert!(NodeConfig::from_toml("node_idd = 1").is_err());
    }

    #[test]
    fn a_file_shared_by_several_nodes_leaves_the_node_id_to_the_flag() {
        let text = r#"
            listen = "0.0.0.0:7001"
            data_dir = "/var/lib/cellplane"
            [peers]
            1 = "cp-0.cp-peers:7001"
            2 = "cp-1.cp-peers:7001"
            3 = "cp-2.cp-peers:7001"
        "#;
        let mut parsed = NodeConfig::from_toml(text).expect("parse");
        assert_eq!(
            parsed.validate().map_err(|e| e.field),
            Err("node_id".into())
        );
        parsed.node_id = 2;
        assert_eq!(parsed.validate(), Ok(()));
    }

    #[test]
    fn an_etcd_node_needs_endpoints_and_a_prefix_but_no_peers() {
        let text = r#"
            node_id = 1
            listen = "127.0.0.1:7001"
            [store]
            kind = "etcd"
            endpoints = ["127.0.0.1:2379", "127.0.0.1:22379"]
        "#;
        let parsed = NodeConfig::from_toml(text).expect("parse");
        assert_eq!(parsed.validate(), Ok(()));
        let StoreConfig::Etcd(etcd) = &parsed.store else {
            panic!("etcd store expected");
        };
        assert_eq!(etcd.prefix, "/cellplane/");

        let mut broken = parsed.clone();
        broken.store = StoreConfig::Etcd(EtcdConfig {
            endpoints: vec![],
            prefix: "/x/".into(),
            tls: None,
        });
        assert_eq!(
            broken.validate().map_err(|e| e.field),
            Err("store.endpoints".into())
        );
        broken.store = StoreConfig::Etcd(EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "cellplane".into(),
            tls: None,
        });
        assert_eq!(
            broken.validate().map_err(|e| e.field),
            Err("store.prefix".into())
        );
        assert!(
            NodeConfig::from_toml(
                "node_id = 1\nlisten = \"127.0.0.1:1\"\n[store]\nkind = \"zookeeper\""
            )
            .is_err()
        );
    }
}
