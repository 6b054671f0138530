//! What `cellctl` shows of each record: one struct per table, serialized as is for
//! `--output json`, so the JSON keys are the table's columns in snake case.

use cellplane_api::proto::control as pb;
use cellplane_api::proto::routing::Route;
use serde::Serialize;

fn tier(value: i32) -> String {
    pb::Tier::try_from(value)
        .map(|t| t.as_str_name().to_string())
        .unwrap_or_else(|_| value.to_string())
}

fn cell_state(value: i32) -> String {
    pb::CellState::try_from(value)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| value.to_string())
}

/// The phase without its enum prefix: `COPYING`.
pub fn phase(value: i32) -> String {
    pb::MigrationPhase::try_from(value)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("MIGRATION_PHASE_")
                .to_string()
        })
        .unwrap_or_else(|_| value.to_string())
}

/// Anything `cellctl` prints as a table.
pub trait Row {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub endpoint: String,
    pub node_id: u64,
    pub role: String,
    pub leader_id: u64,
    pub term: u64,
    pub revision: u64,
    pub applied_index: u64,
    pub reachable: bool,
}

impl NodeView {
    pub fn from_status(endpoint: &str, s: &pb::ClusterStatusResponse) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            node_id: s.node_id,
            role: s.role.clone(),
            leader_id: s.leader_id,
            term: s.term,
            revision: s.revision,
            applied_index: s.applied_index,
            reachable: true,
        }
    }

    pub fn unreachable(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            node_id: 0,
            role: "UNREACHABLE".into(),
            leader_id: 0,
            term: 0,
            revision: 0,
            applied_index: 0,
            reachable: false,
        }
    }
}

impl Row for NodeView {
    const HEADERS: &'static [&'static str] = &[
        "ENDPOINT", "NODE", "ROLE", "LEADER", "TERM", "REVISION", "APPLIED",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.endpoint.clone(),
            self.node_id.to_string(),
            self.role.clone(),
            self.leader_id.to_string(),
            self.term.to_string(),
            self.revision.to_string(),
            self.applied_index.to_string(),
        ]
    }
}

/// A member of the control-plane cluster.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub node_id: u64,
    pub addr: String,
    pub voter: bool,
}

impl From<&pb::Member> for MemberView {
    fn from(m: &pb::Member) -> Self {
        Self {
            node_id: m.node_id,
            addr: m.addr.clone(),
            voter: m.voter,
        }
    }
}

impl Row for MemberView {
    const HEADERS: &'static [&'static str] = &["NODE", "ADDR", "VOTER"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.node_id.to_string(),
            self.addr.clone(),
            if self.voter { "yes" } else { "learner" }.to_string(),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CellView {
    pub cell_id: String,
    pub region: String,
    pub zone: String,
    pub tier: String,
    pub state: String,
    pub load: u64,
    pub capacity: u64,
    pub healthy: Option<bool>,
    pub last_heartbeat_ms: Option<u64>,
    pub last_lsn: Option<u64>,
    pub messages: Option<u64>,
    pub endpoint: String,
    /// A standby's primary.
    pub standby_of: Option<String>,
    /// A primary's standbys and protection.
    pub standbys: Vec<String>,
    pub protection: Option<String>,
    /// A primary: the most any of its standbys lags, in LSNs and ms, as last reported.
    pub standby_lag_lsns: Option<u64>,
    pub standby_lag_ms: Option<u64>,
    /// A standby: where it stands in its primary's log, and whether it is bootstrapping.
    pub replica_applied_lsn: Option<u64>,
    pub replica_bootstrapping: Option<bool>,
}

/// `IN_SYNC`, `DEGRADED`, ...; `None` until recorded.
fn protection(value: i32) -> Option<String> {
    match pb::Protection::try_from(value) {
        Ok(pb::Protection::Unspecified) => None,
        Ok(p) => Some(
            p.as_str_name()
                .trim_start_matches("PROTECTION_")
                .to_string(),
        ),
        Err(_) => Some(value.to_string()),
    }
}

impl From<&pb::Cell> for CellView {
    fn from(c: &pb::Cell) -> Self {
        Self {
            cell_id: c.cell_id.clone(),
            region: c.region.clone(),
            zone: c.zone.clone(),
            tier: tier(c.tier),
            state: cell_state(c.state),
            load: c.load,
            capacity: c.capacity,
            healthy: c.health.map(|h| h.healthy),
            last_heartbeat_ms: c.health.map(|h| h.last_heartbeat_ms),
            last_lsn: c.health.map(|h| h.last_lsn),
            messages: c.health.map(|h| h.messages),
            endpoint: c.endpoint.clone(),
            standby_of: (!c.standby_of.is_empty()).then(|| c.standby_of.clone()),
            standbys: c.standbys.clone(),
            protection: protection(c.protection),
            standby_lag_lsns: c
                .replication
                .as_ref()
                .and_then(|r| r.standbys.iter().map(|s| s.lag_lsns).max()),
            standby_lag_ms: c
                .replication
                .as_ref()
                .and_then(|r| r.standbys.iter().map(|s| s.lag_ms).max()),
            replica_applied_lsn: c
                .replication
                .as_ref()
                .and_then(|r| r.replica.map(|r| r.applied_lsn)),
            replica_bootstrapping: c
                .replication
                .as_ref()
                .and_then(|r| r.replica.map(|r| r.bootstrapping)),
        }
    }
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

impl Row for CellView {
    const HEADERS: &'static [&'static str] = &[
        "CELL",
        "REGION",
        "ZONE",
        "TIER",
        "STATE",
        "ROLE",
        "PROTECTION",
        "REPLICATION",
        "TENANTS",
        "CAPACITY",
        "HEALTHY",
        "LSN",
        "MESSAGES",
        "ENDPOINT",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.cell_id.clone(),
            self.region.clone(),
            self.zone.clone(),
            self.tier.clone(),
            self.state.clone(),
            match &self.standby_of {
                Some(primary) => format!("standby of {primary}"),
                None => "primary".into(),
            },
            optional(self.protection.clone()),
            match (
                self.standby_lag_lsns,
                self.standby_lag_ms,
                self.replica_applied_lsn,
                self.replica_bootstrapping,
            ) {
                (_, _, _, Some(true)) => "bootstrapping".into(),
                (_, _, Some(applied), _) => format!("at LSN {applied}"),
                (Some(lsns), Some(ms), _, _) => format!("lag {lsns} LSNs / {ms} ms"),
                _ => "-".into(),
            },
            self.load.to_string(),
            self.capacity.to_string(),
            match self.healthy {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
            optional(self.last_lsn),
            optional(self.messages),
            self.endpoint.clone(),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantView {
    pub tenant_id: String,
    pub tier: String,
    pub home_region: String,
    pub primary_cell: String,
    pub epoch: u64,
    pub state: String,
    pub overrides: u64,
    pub standby_cells: Vec<String>,
    pub protection: Option<String>,
    /// Whether the tier's promise holds now (NORMAL and HIGH: the primary is in sync).
    pub guarantee_holds: bool,
}

impl From<&pb::Tenant> for TenantView {
    fn from(t: &pb::Tenant) -> Self {
        Self {
            tenant_id: t.tenant_id.clone(),
            tier: tier(t.tier),
            home_region: t.home_region.clone(),
            primary_cell: t.primary_cell.clone(),
            epoch: t.epoch,
            state: pb::TenantState::try_from(t.state)
                .map(|s| s.as_str_name().trim_start_matches("TENANT_").to_string())
                .unwrap_or_else(|_| t.state.to_string()),
            overrides: t.override_count,
            standby_cells: t.standby_cells.clone(),
            protection: protection(t.protection),
            guarantee_holds: t.guarantee_holds,
        }
    }
}

impl Row for TenantView {
    const HEADERS: &'static [&'static str] = &[
        "TENANT",
        "TIER",
        "REGION",
        "CELL",
        "EPOCH",
        "STATE",
        "OVERRIDES",
        "STANDBYS",
        "PROTECTION",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.tenant_id.clone(),
            self.tier.clone(),
            self.home_region.clone(),
            self.primary_cell.clone(),
            self.epoch.to_string(),
            self.state.clone(),
            self.overrides.to_string(),
            if self.standby_cells.is_empty() {
                "-".into()
            } else {
                self.standby_cells.join(",")
            },
            match (&self.protection, self.guarantee_holds) {
                (None, _) => "-".into(),
                (Some(p), true) => p.clone(),
                (Some(p), false) => format!("{p} (below its tier)"),
            },
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    pub tenant_id: String,
    pub conversation_id: String,
    pub cell_id: String,
    pub endpoint: String,
    pub epoch: u64,
    pub revision: u64,
    pub is_override: bool,
}

impl From<&Route> for RouteView {
    fn from(r: &Route) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            conversation_id: r.conversation_id.clone(),
            cell_id: r.cell_id.clone(),
            endpoint: r.endpoint.clone(),
            epoch: r.epoch,
            revision: r.revision,
            is_override: r.is_override,
        }
    }
}

impl Row for RouteView {
    const HEADERS: &'static [&'static str] = &[
        "TENANT",
        "CONVERSATION",
        "CELL",
        "EPOCH",
        "OVERRIDE",
        "REVISION",
        "ENDPOINT",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.tenant_id.clone(),
            if self.conversation_id.is_empty() {
                "-".into()
            } else {
                self.conversation_id.clone()
            },
            self.cell_id.clone(),
            self.epoch.to_string(),
            if self.is_override { "yes" } else { "no" }.into(),
            self.revision.to_string(),
            self.endpoint.clone(),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationView {
    pub migration_id: String,
    pub tenant_id: String,
    pub conversation_id: String,
    pub source_cell: String,
    pub target_cell: String,
    pub phase: String,
    pub source_epoch: u64,
    pub copied_lsn: u64,
    pub source_lsn: u64,
    pub lag: u64,
    pub rows_copied: u64,
    pub bytes_copied: u64,
    /// FREEZING → SWITCHING, once switched.
    pub pause_ms: Option<u64>,
    pub error: String,
}

impl From<&pb::Migration> for MigrationView {
    fn from(m: &pb::Migration) -> Self {
        Self {
            migration_id: m.migration_id.clone(),
            tenant_id: m.tenant_id.clone(),
            conversation_id: m.conversation_id.clone(),
            source_cell: m.source_cell.clone(),
            target_cell: m.target_cell.clone(),
            phase: phase(m.phase),
            source_epoch: m.source_epoch,
            copied_lsn: m.copied_lsn,
            source_lsn: m.source_lsn,
            lag: m.source_lsn.saturating_sub(m.copied_lsn),
            rows_copied: m.rows_copied,
            bytes_copied: m.bytes_copied,
            pause_ms: (m.switched_ms > 0).then(|| m.switched_ms.saturating_sub(m.frozen_ms)),
            error: m.error.clone(),
        }
    }
}

impl Row for MigrationView {
    const HEADERS: &'static [&'static str] = &[
        "MIGRATION",
        "KEY",
        "FROM",
        "TO",
        "PHASE",
        "LAG",
        "ROWS",
        "PAUSE_MS",
        "ERROR",
    ];
    fn cells(&self) -> Vec<String> {
        let key = if self.conversation_id.is_empty() {
            self.tenant_id.clone()
        } else {
            format!("{}/{}", self.tenant_id, self.conversation_id)
        };
        vec![
            self.migration_id.clone(),
            key,
            self.source_cell.clone(),
            self.target_cell.clone(),
            self.phase.clone(),
            self.lag.to_string(),
            self.rows_copied.to_string(),
            optional(self.pause_ms),
            self.error.clone(),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainView {
    pub cell_id: String,
    pub state: String,
    pub keys_left: u64,
    pub migrations_running: u64,
    pub last_error: String,
}

impl From<&pb::DrainProgress> for DrainView {
    fn from(d: &pb::DrainProgress) -> Self {
        Self {
            cell_id: d.cell_id.clone(),
            state: cell_state(d.state),
            keys_left: d.keys_left,
            migrations_running: d.migrations_running,
            last_error: d.last_error.clone(),
        }
    }
}

impl Row for DrainView {
    const HEADERS: &'static [&'static str] =
        &["CELL", "STATE", "KEYS_LEFT", "MIGRATING", "LAST_ERROR"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.cell_id.clone(),
            self.state.clone(),
            self.keys_left.to_string(),
            self.migrations_running.to_string(),
            self.last_error.clone(),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverView {
    pub failover_id: String,
    pub cell_id: String,
    pub standby_cell: String,
    pub mode: String,
    pub phase: String,
    pub automatic: bool,
    pub reason: String,
    pub tenants: Vec<String>,
    pub keys_moved: u64,
    /// The RPO ledger: the failed primary's last reported LSN, the standby's, whether it was
    /// in sync, and the LSNs it may lack.
    pub primary_lsn: u64,
    pub standby_lsn: u64,
    pub in_sync: bool,
    pub lsns_behind: u64,
    /// Once the failed cell came back: the exact count of messages only it held, merged into
    /// the keys' owners.
    pub missing_messages: Option<u64>,
    /// From the start to the switch of the keys, and from the switch to the promotion.
    pub detect_to_switch_ms: Option<u64>,
    pub switch_to_done_ms: Option<u64>,
}

impl From<&pb::Failover> for FailoverView {
    fn from(f: &pb::Failover) -> Self {
        let ledger = f.ledger.clone().unwrap_or_default();
        Self {
            failover_id: f.failover_id.clone(),
            cell_id: f.cell_id.clone(),
            standby_cell: f.standby_cell.clone(),
            mode: pb::FailoverMode::try_from(f.mode)
                .map(|m| m.as_str_name().to_string())
                .unwrap_or_else(|_| f.mode.to_string()),
            phase: pb::FailoverPhase::try_from(f.phase)
                .map(|p| {
                    p.as_str_name()
                        .trim_start_matches("FAILOVER_PHASE_")
                        .to_string()
                })
                .unwrap_or_else(|_| f.phase.to_string()),
            automatic: f.automatic,
            reason: f.reason.clone(),
            tenants: f.tenants.clone(),
            keys_moved: f.keys_moved,
            primary_lsn: ledger.primary_lsn,
            standby_lsn: ledger.standby_lsn,
            in_sync: ledger.in_sync,
            lsns_behind: ledger.lsns_behind,
            missing_messages: ledger.merged.then_some(ledger.missing_messages),
            detect_to_switch_ms: (f.switched_ms > 0)
                .then(|| f.switched_ms.saturating_sub(f.created_ms)),
            switch_to_done_ms: (f.done_ms > 0).then(|| f.done_ms.saturating_sub(f.switched_ms)),
        }
    }
}

impl Row for FailoverView {
    const HEADERS: &'static [&'static str] = &[
        "FAILOVER",
        "CELL",
        "TO",
        "MODE",
        "PHASE",
        "BY",
        "KEYS",
        "IN_SYNC",
        "LSNS_BEHIND",
        "MISSING",
        "REASON",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.failover_id.clone(),
            self.cell_id.clone(),
            self.standby_cell.clone(),
            self.mode.clone(),
            self.phase.clone(),
            if self.automatic { "detector" } else { "ops" }.to_string(),
            self.keys_moved.to_string(),
            if self.in_sync { "yes" } else { "no" }.to_string(),
            self.lsns_behind.to_string(),
            self.missing_messages
                .map_or_else(|| "-".to_string(), |m| m.to_string()),
            self.reason.clone(),
        ]
    }
}

/// `2026-11-30T13:45:12.345Z` for milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1_000 % 60,
        ms_of_day % 1_000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// One admin call of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditView {
    pub id: String,
    pub at: String,
    pub at_ms: u64,
    pub identity: String,
    pub peer: String,
    pub method: String,
    /// `OK`, or the refusal's gRPC code.
    pub result: String,
    pub message: String,
    pub request: String,
    pub node_id: u64,
}

impl From<&pb::AuditEntry> for AuditView {
    fn from(e: &pb::AuditEntry) -> Self {
        Self {
            id: e.id.clone(),
            at: utc(e.at_ms),
            at_ms: e.at_ms,
            identity: e.identity.clone(),
            peer: e.peer.clone(),
            method: e.method.clone(),
            result: format!("{:?}", tonic::Code::from_i32(e.code)),
            message: e.message.clone(),
            request: e.request.clone(),
            node_id: e.node_id,
        }
    }
}

impl Row for AuditView {
    const HEADERS: &'static [&'static str] = &["TIME", "WHO", "METHOD", "RESULT", "REQUEST"];
    fn cells(&self) -> Vec<String> {
        let who = if self.identity.is_empty() {
            self.peer.clone()
        } else {
            self.identity.clone()
        };
        let result = if self.message.is_empty() {
            self.result.clone()
        } else {
            format!("{}: {}", self.result, self.message)
        };
        vec![
            self.at.clone(),
            who,
            self.method.clone(),
            result,
            self.request.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_796_046_312_345), "2026-11-30T13:45:12.345Z");
    }

    #[test]
    fn an_audit_entry_shows_who_did_what_and_why_it_was_refused() {
        let view = AuditView::from(&pb::AuditEntry {
            id: "7.0".into(),
            at_ms: 0,
            identity: String::new(),
            peer: "10.0.0.9:5123".into(),
            method: "Control/DeleteTenant".into(),
            request: "{ tenant_id: \"acme\" }".into(),
            code: tonic::Code::PermissionDenied as i32,
            message: "needs role admin".into(),
            node_id: 2,
        });
        let cells = view.cells();
        assert_eq!(cells[1], "10.0.0.9:5123", "no certificate: the address");
        assert_eq!(cells[3], "PermissionDenied: needs role admin");
    }

    #[test]
    fn a_failover_shows_its_cells_phase_and_ledger() {
        let f = pb::Failover {
            failover_id: "fo-9".into(),
            cell_id: "hz-a".into(),
            standby_cell: "hz-b".into(),
            mode: pb::FailoverMode::Forced as i32,
            phase: pb::FailoverPhase::Done as i32,
            automatic: true,
            keys_moved: 3,
            ledger: Some(pb::RpoLedger {
                primary_lsn: 50,
                standby_lsn: 48,
                in_sync: false,
                lsns_behind: 2,
                merged: true,
                missing_messages: 1,
                ..Default::default()
            }),
            created_ms: 1_000,
            switched_ms: 1_000,
            done_ms: 1_090,
            ..Default::default()
        };
        let view = FailoverView::from(&f);
        assert_eq!(
            view.cells(),
            [
                "fo-9", "hz-a", "hz-b", "FORCED", "DONE", "detector", "3", "no", "2", "1", ""
            ]
        );
        assert_eq!(view.switch_to_done_ms, Some(90));
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["lsns_behind"], 2);
    }

    #[test]
    fn a_migration_shows_its_key_phase_and_pause() {
        let m = pb::Migration {
            migration_id: "mig-7".into(),
            tenant_id: "acme".into(),
            conversation_id: "hot".into(),
            source_cell: "a".into(),
            target_cell: "b".into(),
            phase: pb::MigrationPhase::Done as i32,
            copied_lsn: 90,
            source_lsn: 100,
            frozen_ms: 1_000,
            switched_ms: 1_012,
            ..Default::default()
        };
        let view = MigrationView::from(&m);
        assert_eq!(view.phase, "DONE");
        assert_eq!(view.lag, 10);
        assert_eq!(view.pause_ms, Some(12));
        assert_eq!(view.cells()[1], "acme/hot");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["phase"], "DONE");
        assert_eq!(json["pause_ms"], 12);
    }
}
