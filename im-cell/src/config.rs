//! What a cell is told to be, validated once.

use std::net::SocketAddr;
use std::path::PathBuf;

use cellplane_api::ids::validate_id;

use crate::limits::Limits;

#[derive(Debug, Clone)]
pub struct CellConfig {
    /// The cell's id as the control plane knows it; part of every message id.
    pub cell_id: String,
    pub listen: SocketAddr,
    /// Where the cell's store lives; the cell restarts from it.
    pub data_dir: PathBuf,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field {field}: {rule}")]
pub struct ConfigError {
    pub field: String,
    pub rule: String,
}

impl CellConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("cell_id", &self.cell_id).map_err(|e| ConfigError {
            field: e.field,
            rule: e.rule,
        })?;
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
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError {
                    field: field.into(),
                    rule: "must be at least 1".into(),
                });
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError {
                field: "data_dir".into(),
                rule: "must not be empty".into(),
            });
        }
        Ok(())
    }
}
