//! What a cell is told to be — one TOML file, flags, or both (flags win) — validated once
//! with errors that name the field.
//!
//! ```toml
//! cell_id = "hz-a-normal-1"
//! listen = "10.0.1.5:7100"
//! data_dir = "/var/lib/cellplane/hz-a-normal-1"
//! metrics_listen = "10.0.1.5:9100"
//! [limits]
//! max_body_bytes = 65536
//! sends_per_sender_per_sec = 100
//! [pns]
//! webhook = "http://10.0.9.1:8080/notify"
//! [replication]                      # only on a primary
//! sync_standbys = ["hz-b-normal-s1"] # a send waits for these
//! sync_timeout_ms = 1000
//! log_retention_bytes = 1073741824   # the cell log kept: 1 GiB,
//! log_retention_ms = 86400000        # and a day
//! [standby]                          # only on a standby
//! primary_cell_id = "hz-b-normal-1"
//! primary_endpoint = "10.0.2.5:7100"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use cellplane_api::ids::validate_id;
use serde::Deserialize;

use crate::limits::Limits;
use crate::pns::PnsConfig;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// The cell's id as the control plane knows it; part of every message id.
    pub cell_id: String,
    pub listen: SocketAddr,
    /// Where the cell's store lives; the cell restarts from it.
    pub data_dir: PathBuf,
    /// Where to serve Prometheus metrics over HTTP; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub limits: Limits,
    /// Where notifications for offline members go; none when absent.
    #[serde(default)]
    pub pns: Option<PnsConfig>,
    /// Run as the standby of another cell: follow its cell log and take no writes.
    #[serde(default)]
    pub standby: Option<StandbyConfig>,
    /// On a primary: the standbys a send waits for.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Take end users' writes only while holding a lease from the control plane, renewed by
    /// the cell's agent. Agents always start cells so; a cell run on its own needs none.
    #[serde(default)]
    pub lease_required: bool,
    /// mTLS for the cell's server and its calls to its primary; plaintext when absent.
    #[serde(default)]
    pub tls: Option<cellplane_api::tls::TlsPaths>,
    /// Who may call what, by certificate common name; enforced under mTLS.
    #[serde(default)]
    pub auth: Option<cellplane_api::auth::AuthConfig>,
    /// How long calls may take to finish once the cell is asked to stop; then it stops
    /// anyway. Below the agent's 5 s before it kills a cell.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

fn default_shutdown_grace_ms() -> u64 {
    CellConfig::DEFAULT_SHUTDOWN_GRACE_MS
}

/// A primary's synchronous standbys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Standbys (cell ids) every send waits for: it is answered once each has it durably.
    /// Ignored while the cell runs as a standby (a primary a failover left behind rejoins as
    /// one with its config unchanged) and used once it is a primary again.
    pub sync_standbys: Vec<String>,
    /// How long answers may wait for them before the cell stalls and asks (through its agent)
    /// to be recorded as not in sync.
    pub sync_timeout_ms: u64,
    /// The cell log kept, in bytes: a standby or migration further behind starts over from a
    /// snapshot.
    pub log_retention_bytes: u64,
    /// The cell log kept, in age.
    pub log_retention_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            sync_standbys: Vec::new(),
            sync_timeout_ms: 1_000,
            log_retention_bytes: 1 << 30,
            log_retention_ms: 24 * 3_600_000,
        }
    }
}

/// The primary a standby follows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyConfig {
    /// The primary's cell id.
    pub primary_cell_id: String,
    /// Where the primary serves gRPC (`host:port`).
    pub primary_endpoint: String,
    /// This cell was a primary that a failover moved away from, and it rejoins as the standby
    /// of the cell that took over: any promotion it remembers is over, even one from this
    /// same primary (failed over there and back), and it starts over from its snapshot.
    #[serde(default)]
    pub rejoined: bool,
}

pub use cellplane_api::ids::ConfigError;

impl CellConfig {
    pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 3_000;

    /// Parses a TOML file; unknown fields are refused so a typo is not silently ignored.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::new("(file)", e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("cell_id", &self.cell_id)?;
        let positive = [
            ("limits.max_body_bytes", self.limits.max_body_bytes),
            ("limits.max_group_members", self.limits.max_group_members),
            (
                "limits.max_members_per_call",
                self.limits.max_members_per_call,
            ),
            ("limits.max_receivers", self.limits.max_receivers),
            ("limits.max_ops_per_commit", self.limits.max_ops_per_commit),
            (
                "limits.max_history_page",
                self.limits.max_history_page as usize,
            ),
            ("limits.max_request_bytes", self.limits.max_request_bytes),
            (
                "limits.max_streams_per_connection",
                self.limits.max_streams_per_connection as usize,
            ),
            ("limits.max_subscriptions", self.limits.max_subscriptions),
            (
                "limits.max_subscriptions_per_connection",
                self.limits.max_subscriptions_per_connection,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        if let Some(pns) = &self.pns {
            pns.validate()?;
        }
        for (i, standby) in self.replication.sync_standbys.iter().enumerate() {
            validate_id(&format!("replication.sync_standbys[{i}]"), standby)?;
        }
        if self.replication.log_retention_ms == 0 {
            return Err(ConfigError::new(
                "replication.log_retention_ms",
                "must be at least 1",
            ));
        }
        if self.replication.sync_timeout_ms == 0 {
            return Err(ConfigError::new(
                "replication.sync_timeout_ms",
                "must be at least 1",
            ));
        }
        if let Some(standby) = &self.standby {
            validate_id("standby.primary_cell_id", &standby.primary_cell_id)?;
            if standby.primary_cell_id == self.cell_id {
                return Err(ConfigError::new(
                    "standby.primary_cell_id",
                    "must name another cell than cell_id",
                ));
            }
            if standby.primary_endpoint.is_empty() {
                return Err(ConfigError::new(
                    "standby.primary_endpoint",
                    "must be host:port of the primary",
                ));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_parses_with_default_limits_and_unknown_fields_are_refused() {
        let text = r#"
            cell_id = "hz-a-normal-1"
            listen = "127.0.0.1:7100"
            data_dir = "/tmp/cell"
            [limits]
            max_body_bytes = 1024
        "#;
        let config = CellConfig::from_toml(text).expect("parse");
        assert_eq!(config.limits.max_body_bytes, 1024);
        assert_eq!(
            config.limits.max_group_members,
            Limits::default().max_group_members
        );
        assert_eq!(config.validate(), Ok(()));
        assert!(CellConfig::from_toml(&text.replace("max_body_bytes", "max_bodyy")).is_err());
        let zero = CellConfig::from_toml(&text.replace("1024", "0")).expect("parse");
        assert_eq!(
            zero.validate().map_err(|e| e.field),
            Err("limits.max_body_bytes".into())
        );
        let bad_id = CellConfig::from_toml(&text.replace("hz-a-normal-1", "a b")).expect("parse");
        assert_eq!(
            bad_id.validate().map_err(|e| e.field),
            Err("cell_id".into())
        );
    }
}
