//! Migrations under concurrent writers: no acknowledged message is lost or duplicated, the
//! route moves with one more epoch, the old owner points writers to the new one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::client::Messenger;
use cellplane_api::detail::wrong_cell;
use cellplane_api::proto::cell::messaging_client::MessagingClient;
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, GetHistoryRequest, Message, SendMessageRequest,
};
use cellplane_api::proto::control::{
    MigrateConversationRequest, MigrateTenantRequest, MigrationPhase, Tier,
};
use cellplane_api::proto::routing::WatchRequest;
use cellplane_tests::measure::{Samples, ms};
use tonic::transport::Channel;

use super::{System, phase_name};

const TENANT: &str = "acme";
const WRITERS: usize = 16;
const CONVERSATIONS: usize = 32;
const MEMBERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

#[derive(Debug, Clone)]
struct Ack {
    conversation: String,
    client_msg_id: String,
    message_id: String,
    seq: u64,
}

fn conversation(i: usize) -> String {
    format!("c{i}")
}

/// Every message of a conversation as `user` sees it, oldest first.
async fn history(client: &mut MessagingClient<Channel>, conversation: &str) -> Vec<Message> {
    let mut all = Vec::new();
    let mut before = 0;
    loop {
        let page = client
            .get_history(GetHistoryRequest {
                tenant_id: TENANT.into(),
                conversation_id: conversation.into(),
                user_id: MEMBERS[0].into(),
                before_seq: before,
                limit: 200,
            })
            .await
            .expect("history")
            .into_inner();
        let done = !page.has_more || page.messages.is_empty();
        before = page.messages.last().map(|m| m.seq).unwrap_or(0);
        all.extend(page.messages);
        if done {
            break;
        }
    }
    all.reverse();
    all
}

struct Writers {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    latencies: Arc<Mutex<Samples>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Writers {
    fn start(messenger: Arc<Messenger>) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let latencies = Arc::new(Mutex::new(Samples::default()));
        let tasks = (0..WRITERS)
            .map(|w| {
                let (messenger, stop, acks, latencies) = (
                    messenger.clone(),
                    stop.clone(),
                    acks.clone(),
                    latencies.clone(),
                );
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let conversation = conversation((w * 2 + n % 2) % CONVERSATIONS);
                        let client_msg_id = format!("w{w}-{n}");
                        let started = Instant::now();
                        let answer = messenger
                            .send_message(SendMessageRequest {
                                tenant_id: TENANT.into(),
                                conversation_id: conversation.clone(),
                                sender_id: MEMBERS[w % MEMBERS.len()].into(),
                                client_msg_id: client_msg_id.clone(),
                                body: format!("message {n} of writer {w}").into_bytes(),
                                receiver_ids: Vec::new(),
                                route_epoch: 0,
                                client_type: "test".into(),
                                app_id: "system-tests".into(),
                            })
                            .await
                            .map_err(|status| {
                                format!("writer {w} send {n} to {conversation}: {status}")
                            })?;
                        latencies
                            .lock()
                            .expect("latencies")
                            .record(started.elapsed());
                        acks.lock().expect("acks").push(Ack {
                            conversation,
                            client_msg_id,
                            message_id: answer.message_id,
                            seq: answer.seq,
                        });
                        n += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        Writers {
            stop,
            acks,
            latencies,
            tasks,
        }
    }

    fn count(&self) -> usize {
        self.acks.lock().expect("acks").len()
    }

    async fn stop(self) -> (Vec<Ack>, Samples) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await
                .expect("writer task")
                .expect("every send is acknowledged");
        }
        let acks = self.acks.lock().expect("acks").clone();
        let latencies = std::mem::take(&mut *self.latencies.lock().expect("latencies"));
        (acks, latencies)
    }
}

/// Lets the writers make progress: waits until `more` further messages are acknowledged.
async fn let_write(writers: &Writers, more: usize) {
    let target = writers.count() + more;
    let deadline = Instant::now() + Duration::from_secs(20);
    while writers.count() < target {
        assert!(
            Instant::now() < deadline,
            "writers stalled at {}",
            writers.count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_lose_nothing_while_a_tenant_and_then_one_conversation_move() {
    let system = System::start(&[(
        "hz",
        &[
            ("hz-a-normal-1", "a", "NORMAL"),
            ("hz-b-normal-2", "b", "NORMAL"),
        ],
    )])
    .await;
    let source = system.create_tenant(TENANT, Tier::Normal, "hz").await;
    assert_eq!(source, "hz-a-normal-1", "placement breaks ties by cell id");
    let target = "hz-b-normal-2";
    let (routes, messenger) = system.messenger().await;
    for i in 0..CONVERSATIONS {
        messenger
            .create_conversation(CreateConversationRequest {
                tenant_id: TENANT.into(),
                conversation_id: conversation(i),
                kind: ConversationKind::Group as i32,
                member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
                route_epoch: 0,
            })
            .await
            .expect("create conversation");
    }

    // A watch from before the migrations, to see the switches as every IM service would.
    let leader = system.cluster.wait_for_leader().await;
    let mut watch = system
        .cluster
        .routing(leader)
        .watch(WatchRequest { from_revision: 0 })
        .await
        .expect("watch")
        .into_inner();

    let writers = Writers::start(messenger.clone());
    let_write(&writers, 500).await;

    let migration = system
        .cluster
        .control(leader)
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: TENANT.into(),
            target_cell: target.into(),
        })
        .await
        .expect("migrate tenant")
        .into_inner();
    assert_eq!(migration.source_cell, source);
    assert_eq!(migration.source_epoch, 1);
    let done = system
        .wait_for_migration(&migration.migration_id, Duration::from_secs(60))
        .await;
    assert_eq!(phase_name(&done), "MIGRATION_PHASE_DONE", "{done:?}");
    let tenant_pause = done.switched_ms.saturating_sub(done.frozen_ms);
    let_write(&writers, 500).await;

    // The hottest conversation moves back to the first cell on its own.
    let hot = conversation(0);
    let leader = system.cluster.wait_for_leader().await;
    let back = system
        .cluster
        .control(leader)
        .migrate_conversation(MigrateConversationRequest {
            tenant_id: TENANT.into(),
            conversation_id: hot.clone(),
            target_cell: source.clone(),
        })
        .await
        .expect("migrate conversation")
        .into_inner();
    assert_eq!((back.source_cell.as_str(), back.source_epoch), (target, 2));
    let back_done = system
        .wait_for_migration(&back.migration_id, Duration::from_secs(60))
        .await;
    assert_eq!(
        phase_name(&back_done),
        "MIGRATION_PHASE_DONE",
        "{back_done:?}"
    );
    let_write(&writers, 500).await;
    let (acks, mut latencies) = writers.stop().await;

    // Routes: the tenant on the target at epoch 2, the hot group back on the source at 3.
    let tenant_route = routes.lookup(TENANT, "c1").expect("tenant route");
    assert_eq!(
        (tenant_route.cell_id.as_str(), tenant_route.epoch),
        (target, 2)
    );
    let hot_route = routes.lookup(TENANT, &hot).expect("hot route");
    assert_eq!(
        (
            hot_route.cell_id.as_str(),
            hot_route.epoch,
            hot_route.is_override
        ),
        (source.as_str(), 3, true)
    );

    // Every acknowledged message is in its owner's history exactly once, in seq order, and
    // the history holds nothing else.
    let mut by_conversation: BTreeMap<String, Vec<Ack>> = BTreeMap::new();
    for ack in &acks {
        by_conversation
            .entry(ack.conversation.clone())
            .or_default()
            .push(ack.clone());
    }
    for (conversation, acks) in &by_conversation {
        let (_, mut owner) = messenger.owner(TENANT, conversation).expect("owner");
        let messages = history(&mut owner, conversation).await;
        let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (1..=messages.len() as u64).collect();
        assert_eq!(seqs, expected, "{conversation}: seqs are contiguous from 1");
        assert_eq!(
            messages.len(),
            acks.len(),
            "{conversation}: history holds exactly the acknowledged messages"
        );
        for ack in acks {
            let message = &messages[(ack.seq - 1) as usize];
            assert_eq!(
                (&message.message_id, &message.client_msg_id),
                (&ack.message_id, &ack.client_msg_id),
                "{conversation}: seq {} is the acknowledged message",
                ack.seq
            );
        }
    }

    // What the source kept equals the start of what the target holds: history was copied, not
    // rewritten.
    let agent = system.agent("hz");
    let mut old = agent.cell(&source).messaging();
    let mut new = agent.cell(target).messaging();
    let before_switch = history(&mut old, "c5").await;
    let after_switch = history(&mut new, "c5").await;
    assert!(!before_switch.is_empty());
    assert_eq!(
        before_switch[..],
        after_switch[..before_switch.len()],
        "the target's history begins with the source's"
    );

    // The old owner refuses later writes and names the new one.
    let refused = old
        .send_message(SendMessageRequest {
            tenant_id: TENANT.into(),
            conversation_id: "c5".into(),
            sender_id: MEMBERS[0].into(),
            client_msg_id: "late".into(),
            body: b"too late".to_vec(),
            receiver_ids: Vec::new(),
            route_epoch: 1,
            client_type: "test".into(),
            app_id: "system-tests".into(),
        })
        .await
        .expect_err("the source no longer owns the tenant");
    let detail = wrong_cell(&refused).expect("WRONG_CELL detail");
    assert_eq!(
        (detail.current_cell_id.as_str(), detail.current_epoch),
        (target, 2)
    );

    // The watch announced both switches.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("watch keeps up")
            .expect("watch stream")
            .expect("watch open");
        for event in message.events {
            let route = event.route.expect("route");
            if route.tenant_id == TENANT && route.epoch > 1 {
                seen.push((route.conversation_id, route.cell_id, route.epoch));
            }
        }
    }
    assert_eq!(
        seen,
        vec![
            (String::new(), target.to_string(), 2),
            (hot.clone(), source.clone(), 3)
        ]
    );
    assert_eq!(
        MigrationPhase::try_from(done.phase),
        Ok(MigrationPhase::Done)
    );
    println!(
        "{} acknowledged sends; send latency p50 {} p99 {} max {}; write pause (FREEZING → SWITCHING) tenant {} ms, conversation {} ms",
        acks.len(),
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.percentile(100.0)),
        tenant_pause,
        back_done.switched_ms.saturating_sub(back_done.frozen_ms)
    );
}
