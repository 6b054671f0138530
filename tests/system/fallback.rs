//! A LOW cell has no standby: when it fails, its keys go to another LOW primary of its region
//! for new messages, and when it comes back, what only it held is merged into them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::client::Messenger;
use cellplane_api::proto::cell::sync_client::SyncClient;
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, ExportRequest, SubscribeRequest, SyncEventKind,
};
use cellplane_api::proto::control::{CellState, Failover, FailoverPhase, Tier};
use cellplane_tests::system::wait_until;
use cellplane_tests::traffic::{MEMBERS, conversation, create_groups, history, send_request};
use nix::sys::signal::Signal;
use tonic::Code;

use super::System;

const LOW_A: &str = "hz-a-low-1";
const LOW_B: &str = "hz-b-low-2";
const TENANT: &str = "lowco";
const CONVERSATIONS: usize = 4;
const WRITERS: usize = 8;

/// One acknowledged send: its conversation, client message id and the cell that took it.
type Acked = (String, String, String);

/// Writers that, as an IM front end of a LOW tenant would, create a conversation again when
/// its new owner does not know it (a fallback starts without the history).
struct LowWriters {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Acked>>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl LowWriters {
    fn start(messenger: Arc<Messenger>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..WRITERS)
            .map(|w| {
                let (messenger, stop, acks) = (messenger.clone(), stop.clone(), acks.clone());
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let conversation = conversation(w % CONVERSATIONS);
                        let client_msg_id = format!("w{w}-{n}");
                        let request = send_request(
                            TENANT,
                            &conversation,
                            MEMBERS[w % MEMBERS.len()],
                            &client_msg_id,
                            format!("message {n} of writer {w}").into_bytes(),
                        );
                        match messenger.send_message(request).await {
                            Ok(answer) => {
                                let cell = answer.message_id.split('/').next().unwrap_or_default();
                                acks.lock().expect("acks").push((
                                    conversation,
                                    client_msg_id,
                                    cell.to_string(),
                                ));
                                n += 1;
                            }
                            Err(status) if status.code() == Code::NotFound => {
                                let created = messenger
                                    .create_conversation(CreateConversationRequest {
                                        tenant_id: TENANT.into(),
                                        conversation_id: conversation.clone(),
                                        kind: ConversationKind::Group as i32,
                                        member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
                                        route_epoch: 0,
                                    })
                                    .await;
                                match created {
                                    Ok(_) => {}
                                    Err(s) if s.code() == Code::AlreadyExists => {}
                                    Err(s) => return Err(format!("writer {w} create: {s}")),
                                }
                            }
                            Err(status) => return Err(format!("writer {w} send {n}: {status}")),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(())
                })
            })
            .collect();
        Self { stop, acks, tasks }
    }

    fn on(&self, cell: &str) -> usize {
        let acks = self.acks.lock().expect("acks");
        acks.iter().filter(|(_, _, c)| c == cell).count()
    }

    async fn let_write_on(&self, cell: &str, more: usize, limit: Duration) -> Duration {
        let started = Instant::now();
        let target = self.on(cell) + more;
        while self.on(cell) < target {
            assert!(
                started.elapsed() < limit,
                "{more} more writes on {cell} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    async fn stop(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await
                .expect("writer task")
                .expect("every send is acknowledged");
        }
        self.acks.lock().expect("acks").clone()
    }
}

async fn newest_failover(system: &System) -> Failover {
    system
        .list_failovers()
        .await
        .failovers
        .pop()
        .expect("a failover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_low_cell_sends_new_messages_to_a_fallback_and_merges_its_history_back() {
    let mut system =
        System::start(&[("hz", &[(LOW_A, "a", "LOW"), (LOW_B, "b", "LOW")][..])]).await;
    let owner = system.create_tenant(TENANT, Tier::Low, "hz").await;
    assert_eq!(owner, LOW_A, "placement breaks the tie by id");
    let (_routes, messenger) = system.messenger().await;
    create_groups(&messenger, TENANT, CONVERSATIONS).await;
    let writers = LowWriters::start(messenger.clone());
    writers
        .let_write_on(LOW_A, 200, Duration::from_secs(30))
        .await;

    // The cell hangs: its lease runs out, and its keys go to the other LOW cell, which has
    // none of their history: writers create the conversations again there.
    system.agents[0].signal_cell(LOW_A, Signal::SIGSTOP);
    let rto = writers
        .let_write_on(LOW_B, 1, Duration::from_secs(20))
        .await;
    writers
        .let_write_on(LOW_B, 200, Duration::from_secs(30))
        .await;
    println!("new messages went to the fallback {rto:?} after the LOW cell hung");
    let failover = newest_failover(&system).await;
    assert!(failover.fallback && failover.automatic, "{failover:?}");
    assert_eq!(failover.standby_cell, LOW_B);
    assert_eq!(failover.phase, FailoverPhase::Done as i32, "{failover:?}");
    assert_eq!(system.cell(LOW_A).await.state, CellState::Failed as i32);

    // It comes back (killed while hung, restarted by its agent): it merges what only it held
    // into the fallback, then serves again as an empty LOW primary.
    system.agents[0].signal_cell(LOW_A, Signal::SIGKILL);
    wait_until(
        "the LOW cell's history is merged back and it serves again",
        Duration::from_secs(60),
        || async { system.cell(LOW_A).await.state == CellState::Active as i32 },
    )
    .await;
    writers
        .let_write_on(LOW_B, 100, Duration::from_secs(30))
        .await;
    let acks = writers.stop().await;

    let failover = newest_failover(&system).await;
    assert_eq!(failover.phase, FailoverPhase::Merged as i32, "{failover:?}");
    let ledger = failover.ledger.expect("ledger");
    assert!(ledger.merged && !ledger.in_sync, "{ledger:?}");

    // Every acknowledged message is in the fallback's history exactly once; what the failed
    // cell held follows what the fallback took, at new seqs; the ledger counts it exactly.
    let mut client = system.agents[0].cell(LOW_B).messaging();
    let mut merged = 0u64;
    let mut acked: BTreeMap<&str, Vec<&Acked>> = BTreeMap::new();
    for ack in &acks {
        acked.entry(ack.0.as_str()).or_default().push(ack);
    }
    for (conversation, acks) in &acked {
        let messages = history(&mut client, TENANT, conversation).await;
        let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=messages.len() as u64).collect::<Vec<_>>(),
            "{conversation}: seqs are contiguous"
        );
        let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
        for message in &messages {
            *ids.entry(message.client_msg_id.as_str()).or_default() += 1;
        }
        assert!(
            ids.values().all(|n| *n == 1),
            "{conversation}: no message twice"
        );
        for (_, id, cell) in acks {
            assert!(
                ids.contains_key(id.as_str()),
                "{conversation}: {id} acknowledged by {cell} is lost"
            );
        }
        merged += messages
            .iter()
            .filter(|m| m.message_id.starts_with(&format!("{LOW_A}/")))
            .count() as u64;
    }
    let acked_on_a = acks.iter().filter(|(_, _, c)| c == LOW_A).count() as u64;
    assert!(merged >= acked_on_a, "{merged} merged, {acked_on_a} acked");
    assert_eq!(ledger.missing_messages, merged, "{ledger:?}");
    println!(
        "{acked_on_a} messages acknowledged by the failed LOW cell; {merged} merged back; {} after it by the fallback",
        acks.len() as u64 - acked_on_a
    );

    // Devices of the fallback were told to fetch the merged conversations again.
    let mut events = SyncClient::new(system.agents[0].cell(LOW_B).channel())
        .subscribe(SubscribeRequest {
            tenant_id: TENANT.into(),
            user_id: MEMBERS[0].into(),
            device_id: "phone".into(),
            cursor: 0,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let rebased = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.message().await.expect("event") {
            if event.kind == SyncEventKind::Rebase as i32
                && event.changed_conversations.contains(&conversation(0))
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(rebased, Ok(true), "a REBASE names the merged conversation");

    // The failed cell kept nothing of the keys it gave up.
    let mut export = system.agents[0]
        .cell(LOW_A)
        .admin()
        .export(ExportRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut rows = 0;
    while let Some(chunk) = export.message().await.expect("chunk") {
        rows += chunk.rows.len();
    }
    assert_eq!(
        rows, 0,
        "the tenant's rows were purged from the failed cell"
    );
    system.agents[0].kill().await;
}
