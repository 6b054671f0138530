//! Messages under the nemesis: the production agent and its cells beside the three nodes,
//! writers sending through the `Messenger` (route cache and all) while tenants migrate between
//! cells, history first. After the faults heal and every migration ended, each conversation's
//! history on the cell that owns it must hold every acknowledged message exactly once, at the
//! seq it was acknowledged with, seqs contiguous from 1.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, GetHistoryRequest, SendMessageRequest,
};
use cellplane_api::proto::control::{
    CreateTenantRequest, ListMigrationsRequest, MigrateTenantRequest, MigrationPhase, Tier,
};
use tonic::Code;

use crate::nemesis::Nemesis;
use crate::world::{self, NODES, Progress};

const CELLS: usize = 3;
const TENANTS: [&str; 2] = ["acme", "globex"];
const GROUPS: usize = 2;
const MEMBERS: [&str; 2] = ["alice", "bob"];
const RUN_FOR: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What each writer had acknowledged: conversation → client message id → seq.
type Acked = BTreeMap<(String, String), BTreeMap<String, u64>>;

async fn clients(progress: Arc<Mutex<Progress>>) -> Result<String, String> {
    let phase = |p: &str| world::phase(&progress, p);
    phase("set-up");
    // The agent registers its cells; tenants are placed once they are ACTIVE.
    for tenant in TENANTS {
        world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .create_tenant(CreateTenantRequest {
                    tenant_id: tenant.into(),
                    tier: Tier::Normal as i32,
                    home_region: "hz".into(),
                })
                .await
        })
        .await;
    }
    let endpoints: Vec<String> = (1..=NODES).map(world::endpoint).collect();
    let routes = Arc::new(
        RouteCache::start(
            endpoints,
            RouteCacheOptions {
                tls: crate::net::tls(),
                ..RouteCacheOptions::default()
            },
        )
        .await
        .map_err(|e| format!("route cache: {e}"))?,
    );
    let messenger = Arc::new(Messenger::new(
        routes.clone(),
        MessengerOptions {
            tls: crate::net::tls(),
            ..MessengerOptions::default()
        },
    ));
    for tenant in TENANTS {
        for g in 0..GROUPS {
            loop {
                let created = messenger
                    .create_conversation(CreateConversationRequest {
                        tenant_id: tenant.into(),
                        conversation_id: format!("g{g}"),
                        kind: ConversationKind::Group as i32,
                        member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
                        route_epoch: 0,
                    })
                    .await;
                match created {
                    Ok(_) => break,
                    Err(status) if status.code() == Code::AlreadyExists => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    }
    progress.lock().expect("progress").started = true;
    phase("writers and migrations");
    let watcher = tokio::spawn(world::watch_leader(progress.clone()));
    let until = tokio::time::Instant::now() + RUN_FOR;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for tenant in TENANTS {
        for g in 0..GROUPS {
            let (messenger, acked) = (messenger.clone(), acked.clone());
            tasks.spawn(async move {
                let key = (tenant.to_string(), format!("g{g}"));
                let mut n = 0u64;
                while tokio::time::Instant::now() < until {
                    n += 1;
                    let id = format!("{tenant}-g{g}-{n}");
                    let sent = messenger
                        .send_message(SendMessageRequest {
                            tenant_id: tenant.into(),
                            conversation_id: key.1.clone(),
                            sender_id: MEMBERS[(n % 2) as usize].into(),
                            client_msg_id: id.clone(),
                            body: format!("#{n}").into_bytes(),
                            ..Default::default()
                        })
                        .await;
                    if let Ok(sent) = sent {
                        acked
                            .lock()
                            .expect("acked")
                            .entry(key.clone())
                            .or_default()
                            .insert(id, sent.seq);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    }
    // Tenants move to another cell every few seconds, history first.
    tasks.spawn(async move {
        let mut n = 0usize;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(3)).await;
            n += 1;
            let tenant = TENANTS[n % TENANTS.len()];
            let _ = tokio::time::timeout(
                CALL_TIMEOUT,
                world::control((n as u64) % NODES + 1).migrate_tenant(MigrateTenantRequest {
                    tenant_id: tenant.into(),
                    target_cell: String::new(),
                }),
            )
            .await;
        }
    });
    while tasks.join_next().await.is_some() {}
    watcher.abort();

    phase("waiting for every migration to end");
    let migrations = loop {
        let listed = world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .list_migrations(ListMigrationsRequest {
                    active_only: false,
                    tenant_id: String::new(),
                })
                .await
        })
        .await
        .map(|l| l.migrations)
        .unwrap_or_default();
        let ended = [
            MigrationPhase::Done,
            MigrationPhase::Failed,
            MigrationPhase::RolledBack,
        ]
        .map(|p| p as i32);
        let unfinished: Vec<String> = listed
            .iter()
            .filter(|m| !ended.contains(&m.phase))
            .map(|m| format!("{m:?}"))
            .collect();
        if unfinished.is_empty() {
            break listed;
        }
        phase(&format!(
            "waiting for every migration to end: {}",
            unfinished.join("; ")
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    phase("reading every history");
    let acked = acked.lock().expect("acked").clone();
    let mut checked = 0usize;
    for ((tenant, conversation), ids) in &acked {
        let history = loop {
            match read_history(&messenger, tenant, conversation).await {
                Ok(history) => break history,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let seqs: Vec<u64> = history.iter().map(|(seq, _)| *seq).collect();
        if seqs != (1..=seqs.len() as u64).collect::<Vec<_>>() {
            return Err(format!(
                "{tenant}/{conversation}: seqs are not 1..n: {seqs:?}"
            ));
        }
        let mut found: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (seq, id) in &history {
            found.entry(id.as_str()).or_default().push(*seq);
        }
        for (id, seq) in ids {
            match found.get(id.as_str()).map(Vec::as_slice) {
                Some([at]) if at == seq => {}
                other => {
                    return Err(format!(
                        "{tenant}/{conversation}: {id} acknowledged at seq {seq}, found at {other:?}"
                    ));
                }
            }
        }
        if let Some((id, at)) = found.iter().find(|(_, at)| at.len() > 1) {
            return Err(format!(
                "{tenant}/{conversation}: {id} written twice, at {at:?}"
            ));
        }
        checked += ids.len();
    }
    let done = migrations
        .iter()
        .filter(|m| m.phase == MigrationPhase::Done as i32)
        .count();
    Ok(format!(
        "{checked} acknowledged messages, {} migrations ({done} done)",
        migrations.len()
    ))
}

/// A conversation's whole history on the cell that owns it, oldest first: (seq, client id).
async fn read_history(
    messenger: &Messenger,
    tenant: &str,
    conversation: &str,
) -> Result<Vec<(u64, String)>, tonic::Status> {
    let mut history = Vec::new();
    let mut before_seq = 0;
    loop {
        let (_, mut client) = messenger.owner(tenant, conversation)?;
        let page = tokio::time::timeout(
            CALL_TIMEOUT,
            client.get_history(GetHistoryRequest {
                tenant_id: tenant.into(),
                conversation_id: conversation.into(),
                user_id: MEMBERS[0].into(),
                before_seq,
                limit: 200,
            }),
        )
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("history"))??
        .into_inner();
        history.extend(
            page.messages
                .iter()
                .map(|m| (m.seq, m.client_msg_id.clone())),
        );
        match page.messages.last() {
            Some(oldest) if page.has_more => before_seq = oldest.seq,
            _ => break,
        }
    }
    history.sort();
    Ok(history)
}

fn run(seed: u64) {
    let started = std::time::Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("cellplane-sim-")
        .tempdir()
        .expect("temp dir");
    let mut sim = world::build(seed, dir.path(), RUN_FOR + Duration::from_secs(150));
    world::add_agent(&mut sim, dir.path(), CELLS);
    let progress = Arc::new(Mutex::new(Progress::default()));
    let outcome: Arc<Mutex<Option<Result<String, String>>>> = Arc::default();
    {
        let (progress, outcome) = (progress.clone(), outcome.clone());
        sim.client("clients", async move {
            let result = clients(progress).await;
            *outcome.lock().expect("outcome") = Some(result);
            Ok(())
        });
    }
    // Every server may crash: a node, or the agent's host with its cells, which restart from
    // their disks at the heal.
    let nodes: Vec<String> = (1..=NODES).map(world::host).collect();
    let hosts = nodes.iter().cloned().chain([world::AGENT.into()]).collect();
    let mut nemesis = Nemesis::new(seed, hosts);
    world::drive(seed, &mut sim, &mut nemesis, &progress, RUN_FOR);
    let outcome = outcome.lock().expect("outcome").take();
    match outcome {
        Some(Ok(report)) => eprintln!(
            "seed {seed}: {report}, {} faults, {:.1} s simulated in {:.2} s",
            nemesis.injected.len(),
            sim.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
        Some(Err(violation)) => panic!(
            "seed {seed}: {violation}\nfaults:\n{}",
            nemesis.report().join("\n")
        ),
        None => panic!("seed {seed}: the clients never finished"),
    }
}

const FIXED: [u64; 2] = [1, 2];

#[test]
fn acknowledged_messages_survive_migrations_under_the_nemesis() {
    crate::seeds::for_each(
        "messages::acknowledged_messages_survive_migrations_under_the_nemesis",
        &FIXED,
        run,
    );
}
