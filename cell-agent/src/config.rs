//! What an agent runs: one TOML file listing its region's cells.
//!
//! ```toml
//! data_dir = "/var/lib/cellplane/agent-hz"
//! [[cells]]
//! cell_id = "hz-a-high-1"
//! zone = "a"
//! tier = "HIGH"
//! listen = "10.0.0.5:7101"
//! capacity = 1000
//! [[cells]]
//! cell_id = "hz-b-high-s1"          # its in-region standby
//! zone = "b"
//! tier = "HIGH"
//! listen = "10.0.0.6:7101"
//! capacity = 1000
//! standby_of = "hz-a-high-1"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use cellplane_api::ids::{validate_endpoint, validate_id, validate_optional_id};
use serde::Deserialize;

pub use cellplane_api::ids::ConfigError;

/// How a crashed cell is restarted: after `initial_backoff_ms`, doubling up to
/// `max_backoff_ms`, back to the start once a cell stayed up for `stable_after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub stable_after_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 200,
            max_backoff_ms: 5_000,
            stable_after_ms: 30_000,
        }
    }
}

/// One IM cell the agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSpec {
    pub cell_id: String,
    pub zone: String,
    /// `HIGH`, `NORMAL` or `LOW`.
    pub tier: String,
    /// Where the cell serves.
    pub listen: SocketAddr,
    /// The `host:port` others reach the cell at, registered in routes and given to its
    /// standbys; `listen` when absent. Needed when `listen` is a wildcard (`0.0.0.0:7100` in a
    /// pod, reached through its Service's name).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Tenants the cell is sized for.
    pub capacity: u64,
    /// Run the cell as the standby of this primary cell (which follows the tiers' rules: another
    /// zone of the region, or another region for a HIGH primary's remote standby).
    #[serde(default)]
    pub standby_of: Option<String>,
    /// Where the primary of `standby_of` serves; found in this file when the primary is one of
    /// this agent's cells, needed here otherwise.
    #[serde(default)]
    pub primary_endpoint: Option<String>,
    /// On a primary: the standbys every send waits for. By default its in-region standby (the
    /// cell of this file that is its standby); list a remote standby here to make it
    /// synchronous too, or none for an asynchronous in-region standby. On a standby: the
    /// remote standbys it waits for, besides its in-region ones, once a failover promotes it
    /// (its old primary, rejoined as its standby, say).
    #[serde(default)]
    pub sync_standbys: Option<Vec<String>>,
    /// How long sends may wait for them before the primary asks to be recorded out of sync.
    #[serde(default)]
    pub sync_timeout_ms: Option<u64>,
    /// Extra `im-cell serve` flags (limits, rate limits, metrics).
    #[serde(default)]
    pub args: Vec<String>,
}

impl CellSpec {
    /// Where others reach the cell: `advertise`, else `listen`.
    pub fn endpoint(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// The agent's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Each cell stores its data in `data_dir/<cell_id>` and logs to `data_dir/<cell_id>.log`.
    pub data_dir: PathBuf,
    /// The `im-cell` binary; by default the one beside the agent's own executable.
    #[serde(default)]
    pub im_cell_binary: Option<PathBuf>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default)]
    pub restart: RestartPolicy,
    pub cells: Vec<CellSpec>,
    /// mTLS for the agent's calls (control plane, cells) and its cells' servers and calls:
    /// each cell is started with these files too. Plaintext when absent.
    #[serde(default)]
    pub tls: Option<cellplane_api::tls::TlsPaths>,
    /// Who may call its cells, by certificate common name; enforced under mTLS.
    #[serde(default)]
    pub cell_auth: Option<cellplane_api::auth::AuthConfig>,
}

fn default_heartbeat_ms() -> u64 {
    1_000
}

pub const TIERS: [&str; 3] = ["HIGH", "NORMAL", "LOW"];

impl AgentConfig {
    /// Parses a TOML file; unknown fields are refused so a typo is not silently ignored.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut config: Self =
            toml::from_str(text).map_err(|e| ConfigError::new("(file)", e.to_string()))?;
        config.validate()?;
        config.resolve_primaries();
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cells.is_empty() {
            return Err(ConfigError::new("cells", "must list at least one cell"));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(ConfigError::new(
                "heartbeat_interval_ms",
                "must be at least 1",
            ));
        }
        if self.restart.initial_backoff_ms == 0
            || self.restart.max_backoff_ms < self.restart.initial_backoff_ms
        {
            return Err(ConfigError::new(
                "restart",
                "initial_backoff_ms must be at least 1 and at most max_backoff_ms",
            ));
        }
        let mut ids = HashSet::new();
        let mut listens = HashSet::new();
        for (i, cell) in self.cells.iter().enumerate() {
            let field = |name: &str| format!("cells[{i}].{name}");
            let check = |name: &str, value: &str| validate_id(&field(name), value);
            check("cell_id", &cell.cell_id)?;
            check("zone", &cell.zone)?;
            validate_optional_id(
                &field("standby_of"),
                cell.standby_of.as_deref().unwrap_or(""),
            )
            .map_err(|e| ConfigError::new(e.field, e.rule))?;
            if !TIERS.contains(&cell.tier.as_str()) {
                return Err(ConfigError::new(
                    field("tier"),
                    "must be HIGH, NORMAL or LOW",
                ));
            }
            if cell.capacity == 0 {
                return Err(ConfigError::new(field("capacity"), "must be at least 1"));
            }
            if !ids.insert(cell.cell_id.as_str()) {
                return Err(ConfigError::new(field("cell_id"), "is listed twice"));
            }
            if !listens.insert(cell.listen) {
                return Err(ConfigError::new(field("listen"), "is used by another cell"));
            }
            if let Some(advertise) = &cell.advertise {
                validate_endpoint(&field("advertise"), advertise)
                    .map_err(|e| ConfigError::new(e.field, e.rule))?;
            } else if cell.listen.ip().is_unspecified() {
                return Err(ConfigError::new(
                    field("advertise"),
                    "is needed: listen is a wildcard address that others cannot reach",
                ));
            }
            match (&cell.standby_of, &cell.primary_endpoint) {
                (Some(primary), _) if *primary == cell.cell_id => {
                    return Err(ConfigError::new(
                        field("standby_of"),
                        "must name another cell than cell_id",
                    ));
                }
                (Some(primary), None) if !self.cells.iter().any(|c| c.cell_id == *primary) => {
                    return Err(ConfigError::new(
                        field("primary_endpoint"),
                        format!(
                            "is needed: the primary {primary:?} is not one of this agent's cells"
                        ),
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        field("primary_endpoint"),
                        "is for a standby: set standby_of too",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The standbys the primary `cell` waits for: as configured, or else its in-region
    /// standby among this agent's cells.
    pub fn sync_standbys(&self, cell: &CellSpec) -> Vec<String> {
        if cell.standby_of.is_some() {
            return Vec::new();
        }
        match &cell.sync_standbys {
            Some(listed) => listed.clone(),
            None => self
                .cells
                .iter()
                .filter(|c| c.standby_of.as_deref() == Some(cell.cell_id.as_str()))
                .map(|c| c.cell_id.clone())
                .collect(),
        }
    }

    /// Fills in the endpoint of each standby's primary that is one of this agent's cells, and
    /// each primary's synchronous standbys.
    fn resolve_primaries(&mut self) {
        let sync: Vec<Vec<String>> = self.cells.iter().map(|c| self.sync_standbys(c)).collect();
        for (cell, sync) in self.cells.iter_mut().zip(sync) {
            if cell.standby_of.is_none() {
                cell.sync_standbys = Some(sync);
            }
        }
        let endpoints: Vec<(String, String)> = self
            .cells
            .iter()
            .map(|c| (c.cell_id.clone(), c.endpoint()))
            .collect();
        for cell in &mut self.cells {
            if let (Some(primary), None) = (&cell.standby_of, &cell.primary_endpoint) {
                cell.primary_endpoint = endpoints
                    .iter()
                    .find(|(id, _)| id == primary)
                    .map(|(_, endpoint)| endpoint.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOUND: &str = r#"
        data_dir = "/tmp/agent"
        [[cells]]
        cell_id = "hz-a-high-1"
        zone = "a"
        tier = "HIGH"
        listen = "127.0.0.1:7101"
        capacity = 10
    "#;

    #[test]
    fn a_sound_config_parses_with_defaults() {
        let config = AgentConfig::from_toml(SOUND).expect("parse");
        assert_eq!(config.heartbeat_interval_ms, 1_000);
        assert_eq!(config.restart, RestartPolicy::default());
        assert_eq!(config.cells[0].tier, "HIGH");
    }

    #[test]
    fn a_standby_finds_its_local_primarys_endpoint() {
        let text = format!(
            "{SOUND}{}",
            r#"
            [[cells]]
            cell_id = "hz-b-high-s1"
            zone = "b"
            tier = "HIGH"
            listen = "127.0.0.1:7102"
            capacity = 10
            standby_of = "hz-a-high-1"
            [[cells]]
            cell_id = "hz-c-high-r1"
            zone = "c"
            tier = "HIGH"
            listen = "127.0.0.1:7103"
            capacity = 10
            standby_of = "bj-a-high-1"
            primary_endpoint = "10.1.0.5:7101"
            "#
        );
        let config = AgentConfig::from_toml(&text).expect("parse");
        assert_eq!(
            config.cells[1].primary_endpoint.as_deref(),
            Some("127.0.0.1:7101")
        );
        assert_eq!(
            config.sync_standbys(&config.cells[0]),
            vec!["hz-b-high-s1".to_string()],
            "the in-region standby is synchronous by default"
        );
        assert!(config.sync_standbys(&config.cells[1]).is_empty());
        assert_eq!(
            config.cells[2].primary_endpoint.as_deref(),
            Some("10.1.0.5:7101")
        );
    }

    #[test]
    fn a_cell_behind_a_service_is_reached_at_its_advertised_name() {
        let text = r#"
            data_dir = "/var/lib/cellplane/cells"
            [[cells]]
            cell_id = "hz-a-high-1"
            zone = "a"
            tier = "HIGH"
            listen = "0.0.0.0:7100"
            advertise = "agent-hz.cellplane.svc:7100"
            capacity = 10
            [[cells]]
            cell_id = "hz-b-high-s1"
            zone = "b"
            tier = "HIGH"
            listen = "0.0.0.0:7101"
            advertise = "agent-hz.cellplane.svc:7101"
            capacity = 10
            standby_of = "hz-a-high-1"
        "#;
        let config = AgentConfig::from_toml(text).expect("parse");
        assert_eq!(config.cells[0].endpoint(), "agent-hz.cellplane.svc:7100");
        assert_eq!(
            config.cells[1].primary_endpoint.as_deref(),
            Some("agent-hz.cellplane.svc:7100")
        );
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let field = |text: &str| {
            AgentConfig::from_toml(text)
                .map(|_| ())
                .map_err(|e| e.field)
        };
        assert_eq!(
            field(&SOUND.replace("HIGH", "GOLD")),
            Err("cells[0].tier".into())
        );
        assert_eq!(
            field(&SOUND.replace("hz-a-high-1", "a b")),
            Err("cells[0].cell_id".into())
        );
        assert_eq!(
            field(&SOUND.replace("capacity = 10", "capacity = 0")),
            Err("cells[0].capacity".into())
        );
        let twice = format!("{SOUND}{}", &SOUND[SOUND.find("[[cells]]").unwrap_or(0)..]);
        assert_eq!(field(&twice), Err("cells[1].cell_id".into()));
        let remote = format!("{SOUND}standby_of = \"bj-a-high-1\"\n");
        assert_eq!(field(&remote), Err("cells[0].primary_endpoint".into()));
        let own = format!("{SOUND}standby_of = \"hz-a-high-1\"\n");
        assert_eq!(field(&own), Err("cells[0].standby_of".into()));
        let wildcard = SOUND.replace("127.0.0.1:7101", "0.0.0.0:7101");
        assert_eq!(field(&wildcard), Err("cells[0].advertise".into()));
        let unreachable = format!("{wildcard}advertise = \"no port\"\n");
        assert_eq!(field(&unreachable), Err("cells[0].advertise".into()));
        assert_eq!(field(&SOUND.replace("zone", "zonee")), Err("(file)".into()));
    }
}
