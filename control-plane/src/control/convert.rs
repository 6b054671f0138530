//! Requests in, commands and records out: every request field is validated here, before anything
//! is proposed, so a bad request changes nothing.

use std::sync::Arc;

use cellplane_api::ids::{InvalidField, validate_endpoint, validate_id, validate_optional_id};
use cellplane_api::proto::control as pb;

use crate::migration::record::{Phase, Progress, display_id, parse_id};
use crate::migration::step::Report;
use crate::state::command::{CellView, Command, MigrationView, TenantView};
use crate::state::model::{
    CellHealth, CellState, Protection, ReplicaHealth, ReplicationHealth, RouteKey, StandbyHealth,
    TenantState, Tier,
};
use cellplane_api::proto::cell as cell_pb;

fn tier(field: &str, value: i32) -> Result<Tier, InvalidField> {
    Tier::from_proto(value).ok_or_else(|| {
        InvalidField::new(
            field,
            format!("must be HIGH, NORMAL or LOW, got enum value {value}"),
        )
    })
}

fn id(field: &str, value: String) -> Result<Arc<str>, InvalidField> {
    validate_id(field, &value)?;
    Ok(Arc::from(value))
}

pub fn register_cell(request: pb::RegisterCellRequest) -> Result<Command, InvalidField> {
    validate_endpoint("endpoint", &request.endpoint)?;
    validate_optional_id("standby_of", &request.standby_of)?;
    if request.capacity == 0 {
        return Err(InvalidField::new("capacity", "must be at least 1"));
    }
    if request.standby_of == request.cell_id {
        return Err(InvalidField::new(
            "standby_of",
            "a cell cannot be its own standby",
        ));
    }
    Ok(Command::RegisterCell {
        cell_id: id("cell_id", request.cell_id)?,
        region: id("region", request.region)?,
        zone: id("zone", request.zone)?,
        tier: tier("tier", request.tier)?,
        endpoint: Arc::from(request.endpoint),
        capacity: request.capacity,
        standby_of: (!request.standby_of.is_empty()).then(|| Arc::from(request.standby_of)),
    })
}

pub fn set_cell_state(request: pb::SetCellStateRequest) -> Result<Command, InvalidField> {
    let state = CellState::from_proto(request.state).ok_or_else(|| {
        InvalidField::new(
            "state",
            format!(
                "must be JOINING, ACTIVE, DRAINING, DEMOTED or FAILED, got enum value {}",
                request.state
            ),
        )
    })?;
    Ok(Command::SetCellState {
        cell_id: id("cell_id", request.cell_id)?,
        state,
    })
}

pub fn create_tenant(request: pb::CreateTenantRequest) -> Result<Command, InvalidField> {
    Ok(Command::CreateTenant {
        tenant_id: id("tenant_id", request.tenant_id)?,
        tier: tier("tier", request.tier)?,
        home_region: id("home_region", request.home_region)?,
    })
}

pub fn move_route(request: pb::MoveRouteRequest) -> Result<Command, InvalidField> {
    validate_optional_id("conversation_id", &request.conversation_id)?;
    if request.expected_epoch == 0 {
        return Err(InvalidField::new(
            "expected_epoch",
            "must be the key's current epoch (epochs start at 1)",
        ));
    }
    let tenant_id = id("tenant_id", request.tenant_id)?;
    let key = if request.conversation_id.is_empty() {
        RouteKey::tenant(tenant_id)
    } else {
        RouteKey::conversation(tenant_id, request.conversation_id)
    };
    Ok(Command::MoveRoute {
        key,
        expected_epoch: request.expected_epoch,
        target_cell: id("target_cell", request.target_cell)?,
    })
}

pub fn cell_to_proto(view: &CellView) -> pb::Cell {
    let record = &view.record;
    pb::Cell {
        cell_id: view.cell_id.to_string(),
        region: record.region.to_string(),
        zone: record.zone.to_string(),
        tier: record.tier.to_proto() as i32,
        endpoint: record.endpoint.to_string(),
        state: record.state.to_proto() as i32,
        capacity: record.capacity,
        load: record.load,
        standby_of: record.standby_of.as_deref().unwrap_or_default().to_string(),
        registered_revision: record.registered_revision,
        health: record.health.map(|h| health_to_proto(&h)),
        protection: view
            .protection
            .map_or(pb::Protection::Unspecified, |p| p.protection.to_proto())
            as i32,
        protection_revision: view.protection.map_or(0, |p| p.revision),
        standbys: view.standbys.iter().map(|s| s.to_string()).collect(),
        replication: view.replication.as_ref().map(replication_to_proto),
    }
}

fn replication_to_proto(replication: &ReplicationHealth) -> pb::CellReplication {
    pb::CellReplication {
        standbys: replication
            .standbys
            .iter()
            .map(|s| cell_pb::StandbyStatus {
                cell_id: s.cell_id.to_string(),
                acked_lsn: s.acked_lsn,
                lag_lsns: s.lag_lsns,
                lag_ms: s.lag_ms,
                connected: s.connected,
                bootstraps: s.bootstraps,
            })
            .collect(),
        replica: replication.replica.map(|r| cell_pb::ReplicaStatus {
            applied_lsn: r.applied_lsn,
            primary_lsn: r.primary_lsn,
            bootstrapping: r.bootstrapping,
            bootstrap_rows: r.bootstrap_rows,
            connected: r.connected,
        }),
    }
}

fn replication_from_proto(
    replication: pb::CellReplication,
) -> Result<ReplicationHealth, InvalidField> {
    let standbys = replication
        .standbys
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(StandbyHealth {
                cell_id: id(&format!("replication.standbys[{i}].cell_id"), s.cell_id)?,
                acked_lsn: s.acked_lsn,
                lag_lsns: s.lag_lsns,
                lag_ms: s.lag_ms,
                connected: s.connected,
                bootstraps: s.bootstraps,
            })
        })
        .collect::<Result<Vec<_>, InvalidField>>()?;
    Ok(ReplicationHealth {
        standbys,
        replica: replication.replica.map(|r| ReplicaHealth {
            applied_lsn: r.applied_lsn,
            primary_lsn: r.primary_lsn,
            bootstrapping: r.bootstrapping,
            bootstrap_rows: r.bootstrap_rows,
            connected: r.connected,
        }),
    })
}

pub fn record_protection(request: pb::RecordProtectionRequest) -> Result<Command, InvalidField> {
    let protection = Protection::from_proto(request.protection).ok_or_else(|| {
        InvalidField::new(
            "protection",
            format!(
                "must be NONE, CATCHING_UP, IN_SYNC or DEGRADED, got enum value {}",
                request.protection
            ),
        )
    })?;
    Ok(Command::RecordProtection {
        cell_id: id("cell_id", request.cell_id)?,
        protection,
    })
}

pub fn health_to_proto(health: &CellHealth) -> pb::CellHealth {
    pb::CellHealth {
        last_heartbeat_ms: health.last_heartbeat_ms,
        healthy: health.healthy,
        last_lsn: health.last_lsn,
        conversations: health.conversations,
        messages: health.messages,
        disk_bytes: health.disk_bytes,
    }
}

pub fn heartbeat(request: pb::HeartbeatRequest) -> Result<Command, InvalidField> {
    let Some(health) = request.health else {
        return Err(InvalidField::new("health", "is required"));
    };
    Ok(Command::Report {
        replication: request
            .replication
            .map(replication_from_proto)
            .transpose()?,
        cell_id: id("cell_id", request.cell_id)?,
        health: CellHealth {
            last_heartbeat_ms: health.last_heartbeat_ms,
            healthy: health.healthy,
            last_lsn: health.last_lsn,
            conversations: health.conversations,
            messages: health.messages,
            disk_bytes: health.disk_bytes,
        },
    })
}

/// A migration id from a request: `mig-<n>`.
pub fn migration_id(value: &str) -> Result<u64, InvalidField> {
    parse_id(value).ok_or_else(|| {
        InvalidField::new(
            "migration_id",
            format!("must be mig-<number>, got {value:?}"),
        )
    })
}

pub fn migrate_tenant(
    request: pb::MigrateTenantRequest,
    now_ms: u64,
) -> Result<Command, InvalidField> {
    validate_optional_id("target_cell", &request.target_cell)?;
    Ok(Command::StartMigration {
        key: RouteKey::tenant(id("tenant_id", request.tenant_id)?),
        target_cell: (!request.target_cell.is_empty()).then(|| Arc::from(request.target_cell)),
        new_tier: None,
        now_ms,
    })
}

pub fn migrate_conversation(
    request: pb::MigrateConversationRequest,
    now_ms: u64,
) -> Result<Command, InvalidField> {
    Ok(Command::StartMigration {
        key: RouteKey::conversation(
            id("tenant_id", request.tenant_id)?,
            id("conversation_id", request.conversation_id)?,
        ),
        target_cell: Some(id("target_cell", request.target_cell)?),
        new_tier: None,
        now_ms,
    })
}

pub fn set_tenant_tier(
    request: pb::SetTenantTierRequest,
    now_ms: u64,
) -> Result<Command, InvalidField> {
    Ok(Command::StartMigration {
        key: RouteKey::tenant(id("tenant_id", request.tenant_id)?),
        target_cell: None,
        new_tier: Some(tier("tier", request.tier)?),
        now_ms,
    })
}

/// An agent's report as the coordinator's step function takes it.
pub fn report(request: &pb::ReportMigrationRequest) -> Result<Report, InvalidField> {
    let phase = Phase::from_proto(request.phase).ok_or_else(|| {
        InvalidField::new(
            "phase",
            format!(
                "must be a migration phase, got enum value {}",
                request.phase
            ),
        )
    })?;
    Ok(Report {
        phase: Some(phase),
        progress: Progress {
            copied_lsn: request.copied_lsn,
            source_lsn: request.source_lsn,
            frozen_lsn: request.frozen_lsn,
            rows_copied: request.rows_copied,
            bytes_copied: request.bytes_copied,
        },
        phase_done: request.phase_done,
        error: (!request.error.is_empty()).then(|| request.error.clone()),
    })
}

pub fn migration_to_proto(view: &MigrationView) -> pb::Migration {
    let m = &view.record;
    pb::Migration {
        migration_id: display_id(view.id),
        tenant_id: m.key.tenant_id.to_string(),
        conversation_id: m
            .key
            .conversation_id
            .as_deref()
            .unwrap_or_default()
            .to_string(),
        source_cell: m.source.to_string(),
        target_cell: m.target.to_string(),
        phase: m.phase.to_proto() as i32,
        source_epoch: m.source_epoch,
        new_tier: m.new_tier.map(|t| t.to_proto() as i32).unwrap_or_default(),
        copied_lsn: m.progress.copied_lsn,
        source_lsn: m.progress.source_lsn,
        frozen_lsn: m.progress.frozen_lsn,
        rows_copied: m.progress.rows_copied,
        bytes_copied: m.progress.bytes_copied,
        error: m.error.clone().unwrap_or_default(),
        created_ms: m.created_ms,
        updated_ms: m.updated_ms,
        frozen_ms: m.frozen_ms,
        switched_ms: m.switched_ms,
        revision: m.updated_revision,
        purge_after_ms: m.purge_after_ms.unwrap_or(0),
        keep_source_data: m.switched_ms > 0 && m.purge_after_ms.is_none(),
    }
}

pub fn tenant_to_proto(view: &TenantView) -> pb::Tenant {
    let record = &view.record;
    pb::Tenant {
        tenant_id: view.tenant_id.to_string(),
        tier: record.tier.to_proto() as i32,
        home_region: record.home_region.to_string(),
        primary_cell: record.primary_cell.to_string(),
        epoch: record.epoch,
        state: match record.state {
            TenantState::Active => pb::TenantState::TenantActive,
            TenantState::Migrating => pb::TenantState::TenantMigrating,
        } as i32,
        override_count: record.override_count,
        standby_cells: view.standby_cells.iter().map(|s| s.to_string()).collect(),
        protection: view
            .protection
            .map_or(pb::Protection::Unspecified, |p| p.protection.to_proto())
            as i32,
        guarantee_holds: match record.tier {
            Tier::Low => true,
            Tier::Normal | Tier::High => {
                view.protection.map(|p| p.protection) == Some(Protection::InSync)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let err = create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            tier: 9,
            home_region: "hz".into(),
        })
        .unwrap_err();
        assert_eq!(err.field, "tier");

        let err = move_route(pb::MoveRouteRequest {
            tenant_id: "acme".into(),
            conversation_id: "a b".into(),
            expected_epoch: 1,
            target_cell: "c".into(),
        })
        .unwrap_err();
        assert_eq!(err.field, "conversation_id");

        let err = register_cell(pb::RegisterCellRequest {
            cell_id: "c".into(),
            region: "hz".into(),
            zone: "a".into(),
            tier: pb::Tier::Low as i32,
            endpoint: "127.0.0.1:1".into(),
            capacity: 0,
            standby_of: String::new(),
        })
        .unwrap_err();
        assert_eq!(err.field, "capacity");
    }
}
