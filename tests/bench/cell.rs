//! The IM cell: durable sends per second and latency at 1, 64 and 512 concurrent senders into
//! single chats and into one 500-member group, send → push latency to an online device, and the
//! raw store's durable group-commit limit measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::proto::cell::messaging_client::MessagingClient;
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, SendMessageRequest, SubscribeRequest,
};
use cellplane_tests::cell::CellProcess;
use cellplane_tests::measure::{Samples, ms};
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use tonic::transport::Channel;

use crate::drive::{Client, Measured, drive};
use crate::report::Report;

const CONCURRENCY: [usize; 3] = [1, 64, 512];
const GROUP_MEMBERS: usize = 500;
const BODY: &[u8] = &[b'x'; 200];
/// Senders share one HTTP/2 connection per this many.
const SENDERS_PER_CHANNEL: usize = 32;

fn send(conversation: &str, sender: &str, id: u64) -> SendMessageRequest {
    SendMessageRequest {
        tenant_id: "bench".into(),
        conversation_id: conversation.into(),
        sender_id: sender.into(),
        client_msg_id: format!("m{id}"),
        body: BODY.to_vec(),
        receiver_ids: Vec::new(),
        route_epoch: 1,
        client_type: "bench".into(),
        app_id: "bench".into(),
        ..Default::default()
    }
}

pub async fn conversation(
    cell: &CellProcess,
    id: &str,
    kind: ConversationKind,
    members: Vec<String>,
) {
    cell.messaging()
        .create_conversation(CreateConversationRequest {
            tenant_id: "bench".into(),
            conversation_id: id.into(),
            kind: kind as i32,
            member_ids: members,
            route_epoch: 1,
        })
        .await
        .expect("create conversation");
}

/// Asks the cell's health service: a call that does no work and touches no disk.
struct HealthCheck(tonic_health::pb::health_client::HealthClient<Channel>);

#[tonic::async_trait]
impl Client for HealthCheck {
    async fn call(&mut self) -> anyhow::Result<()> {
        self.0
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(())
    }
}

/// Sends message after message to one conversation as one sender, each with a new id.
struct Sender {
    client: MessagingClient<Channel>,
    conversation: String,
    sender: String,
    next_id: u64,
}

#[tonic::async_trait]
impl Client for Sender {
    async fn call(&mut self) -> anyhow::Result<()> {
        self.next_id += 1;
        self.client
            .send_message(send(&self.conversation, &self.sender, self.next_id))
            .await?;
        Ok(())
    }
}

/// Closed-loop health checks: the most calls/s this machine's gRPC stack gives the cell.
async fn ceiling(cell: &CellProcess, clients: usize, phase: Duration) -> anyhow::Result<Measured> {
    let channels = channels(cell, clients);
    let checks = (0..clients)
        .map(|c| {
            let client = tonic_health::pb::health_client::HealthClient::new(
                channels[c / SENDERS_PER_CHANNEL].clone(),
            );
            Box::new(HealthCheck(client)) as Box<dyn Client>
        })
        .collect();
    drive(checks, phase).await
}

/// Runs `senders` closed-loop senders for `phase`; sender `i` writes to the conversation
/// `target(i)` names, as the user it names.
pub async fn load(
    cell: &CellProcess,
    senders: usize,
    phase: Duration,
    target: impl Fn(usize) -> (String, String),
) -> anyhow::Result<Measured> {
    let channels = channels(cell, senders);
    let clients = (0..senders)
        .map(|s| {
            let (conversation, sender) = target(s);
            Box::new(Sender {
                client: MessagingClient::new(channels[s / SENDERS_PER_CHANNEL].clone()),
                conversation,
                sender,
                // Ids of different senders never meet.
                next_id: (s as u64) * 1_000_000_000,
            }) as Box<dyn Client>
        })
        .collect();
    drive(clients, phase).await
}

/// One connection per [`SENDERS_PER_CHANNEL`] clients.
fn channels(cell: &CellProcess, clients: usize) -> Vec<Channel> {
    (0..clients.div_ceil(SENDERS_PER_CHANNEL))
        .map(|_| cell.channel())
        .collect()
}

/// The store alone: batches of `batch` single-chat sends' worth of rows, one fsync each.
fn raw_store_limit(batch: usize, phase: Duration) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::builder(dir.path())
        .manual_journal_persist(true)
        .open()
        .expect("open");
    let spaces: Vec<_> = ["conversations", "messages", "idempotency", "sync", "log"]
        .iter()
        .map(|name| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .expect("keyspace")
        })
        .collect();
    let started = Instant::now();
    let mut messages = 0u64;
    while started.elapsed() < phase {
        let mut write = db.batch();
        for _ in 0..batch {
            messages += 1;
            let key = messages.to_be_bytes().to_vec();
            // What a single-chat send writes: conversation, message, idempotency, log, and an
            // event (which names the message, without its body) for each of the two members.
            write.insert(&spaces[0], key.clone(), vec![0u8; 24]);
            write.insert(&spaces[1], key.clone(), BODY.to_vec());
            write.insert(&spaces[2], key.clone(), vec![0u8; 40]);
            write.insert(&spaces[4], key.clone(), BODY.to_vec());
            for member in 0..2u8 {
                let mut member_key = key.clone();
                member_key.push(member);
                write.insert(&spaces[3], member_key, vec![0u8; 40]);
            }
        }
        write.commit().expect("commit");
        db.persist(PersistMode::SyncAll).expect("fsync");
    }
    messages as f64 / started.elapsed().as_secs_f64()
}

/// Send → push: one online device, a sender at a moderate rate; from the send call to the
/// pushed event at the device.
async fn push_latency(cell: &CellProcess, run: &str, phase: Duration) -> anyhow::Result<Samples> {
    let mut device = cell
        .sync()
        .subscribe(SubscribeRequest {
            tenant_id: "bench".into(),
            user_id: "peer0".into(),
            device_id: "phone".into(),
            cursor: 0,
        })
        .await?
        .into_inner();
    // Drain the backlog the load left in peer0's queue (a REBASE or the events themselves).
    let drain_until = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_millis(300), device.message()).await {
            Ok(Ok(Some(_))) if Instant::now() < drain_until => continue,
            _ => break,
        }
    }
    let sent_at = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        Instant,
    >::new()));
    let mut push = Samples::default();
    let mut client = cell.messaging();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < phase {
        n += 1;
        let id = format!("push-{run}-{n}");
        sent_at
            .lock()
            .expect("lock")
            .insert(id.clone(), Instant::now());
        let mut request = send("dm-0", "u0", 0);
        request.client_msg_id = id.clone();
        client.send_message(request).await?;
        loop {
            let event = device
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("push stream ended"))?;
            let Some(message) = event.message else {
                continue;
            };
            if let Some(at) = sent_at.lock().expect("lock").remove(&message.client_msg_id) {
                push.record(at.elapsed());
                if message.client_msg_id == id {
                    break;
                }
            }
        }
        // Moderate load: about 200 sends per second.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(push)
}

pub async fn run(report: &mut Report, phase: Duration) -> anyhow::Result<()> {
    let cell = CellProcess::start(
        "bench-cell",
        &[
            "--sends-per-conversation-per-sec",
            "100000000",
            "--sends-per-sender-per-sec",
            "100000000",
        ],
    )
    .await;
    cell.grant("bench", "", 1).await;
    let max = *CONCURRENCY.iter().max().unwrap_or(&1);
    for s in 0..max {
        conversation(
            &cell,
            &format!("dm-{s}"),
            ConversationKind::Single,
            vec![format!("u{s}"), format!("peer{s}")],
        )
        .await;
    }
    let members: Vec<String> = (0..GROUP_MEMBERS).map(|m| format!("u{m}")).collect();
    conversation(&cell, "big-group", ConversationKind::Group, members).await;

    let mut push_quiet = push_latency(&cell, "quiet", phase).await?;

    let mut table = format!(
        "## IM cell: durable sends\n\n\
         Closed-loop senders over gRPC to one `im-cell` process (release build), {}-byte bodies; a \
         send is answered only after its batch is fsynced. A group send also appends one sync event \
         per member ({GROUP_MEMBERS} small rows naming the message; a user's newest pts is the key \
         of the newest one).\n\n\
         | senders | conversation | sends/s | p50 ms | p99 ms |\n|---:|---|---:|---:|---:|\n",
        BODY.len()
    );
    let mut single_at_max = 0.0;
    let mut single_at_64 = 0.0;
    for senders in CONCURRENCY {
        let measured = load(&cell, senders, phase, |s| {
            (format!("dm-{s}"), format!("u{s}"))
        })
        .await?;
        if senders == max {
            single_at_max = measured.rate;
        }
        if senders == 64 {
            single_at_64 = measured.rate;
        }
        table.push_str(&format!(
            "| {senders} | single chats | {:.0} | {} | {} |\n",
            measured.rate,
            ms(measured.p50),
            ms(measured.p99)
        ));
    }
    for senders in CONCURRENCY {
        let measured = load(&cell, senders, phase, |s| {
            ("big-group".to_string(), format!("u{}", s % GROUP_MEMBERS))
        })
        .await?;
        table.push_str(&format!(
            "| {senders} | {GROUP_MEMBERS}-member group | {:.0} | {} | {} |\n",
            measured.rate,
            ms(measured.p50),
            ms(measured.p99)
        ));
    }

    let mut push_after_load = push_latency(&cell, "loaded", phase).await?;
    table.push_str(&format!(
        "\n### Send → push\n\nOne sender at about 200 sends/s in a single chat, the peer's device online; \
         from the send call to the pushed event at the device. Measured on the fresh cell before the \
         load above, and again right after it, while the cell still flushes and compacts what the \
         load wrote.\n\n\
         | when | pushes | p50 ms | p99 ms |\n|---|---:|---:|---:|\n\
         | before the load | {} | {} | {} |\n| after the load | {} | {} | {} |\n",
        push_quiet.len(),
        ms(push_quiet.percentile(50.0)),
        ms(push_quiet.percentile(99.0)),
        push_after_load.len(),
        ms(push_after_load.percentile(50.0)),
        ms(push_after_load.percentile(99.0))
    ));

    // What any call costs here: the cell's own gRPC server answering health checks, from the
    // same load generator over the same connections.
    let calls = ceiling(&cell, 64, phase).await?.rate;
    table.push_str(&format!(
        "\n### Against an empty call\n\n64 clients calling the cell's gRPC health check (no \
         work, no disk) over the same connections: **{calls:.0} calls/s**. The cell's durable \
         single-chat sends at 64 senders reach **{:.0}%** of it.\n",
        100.0 * single_at_64 / calls
    ));

    let raw = tokio::task::spawn_blocking(move || raw_store_limit(max, phase)).await?;
    table.push_str(&format!(
        "\n### Against the raw store\n\nThe same rows as a single-chat send, written straight to fjall \
         in batches of {max} with one fsync each, no gRPC: **{raw:.0} sends/s**. The cell at {max} \
         senders reaches **{:.0}%** of it.\n",
        100.0 * single_at_max / raw
    ));
    report.section(table);
    Ok(())
}
