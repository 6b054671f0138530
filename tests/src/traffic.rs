//! Writers that follow routes, and the check that what they were told is what is stored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::measure::Samples;
use cellplane_api::client::Messenger;
use cellplane_api::proto::cell::messaging_client::MessagingClient;
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, GetHistoryRequest, Message, SendMessageRequest,
};
use tonic::transport::Channel;

pub const MEMBERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

/// One acknowledged send.
#[derive(Debug, Clone)]
pub struct Ack {
    pub conversation: String,
    pub client_msg_id: String,
    pub message_id: String,
    pub seq: u64,
    /// When the writer sent it (the first try) and when the answer arrived: the cell accepted
    /// it in between.
    pub started: Instant,
    pub answered: Instant,
}

impl Ack {
    /// The cell that accepted the message (it names itself in every message id).
    pub fn cell(&self) -> &str {
        self.message_id.split('/').next().unwrap_or_default()
    }
}

pub fn conversation(i: usize) -> String {
    format!("c{i}")
}

pub fn send_request(
    tenant: &str,
    conversation: &str,
    sender: &str,
    client_msg_id: &str,
    body: Vec<u8>,
) -> SendMessageRequest {
    SendMessageRequest {
        tenant_id: tenant.into(),
        conversation_id: conversation.into(),
        sender_id: sender.into(),
        client_msg_id: client_msg_id.into(),
        body,
        receiver_ids: Vec::new(),
        route_epoch: 0,
        client_type: "test".into(),
        app_id: "system-tests".into(),
        ..Default::default()
    }
}

/// Creates `count` groups `c0..` of [`MEMBERS`] through the messenger, once its route cache
/// knows the tenant (a tenant created a moment ago reaches the cache through its watch).
pub async fn create_groups(messenger: &Messenger, tenant: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while messenger.owner(tenant, "").is_err() {
        assert!(
            Instant::now() < deadline,
            "the route cache never learned of tenant {tenant}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..count {
        messenger
            .create_conversation(CreateConversationRequest {
                tenant_id: tenant.into(),
                conversation_id: conversation(i),
                kind: ConversationKind::Group as i32,
                member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
                route_epoch: 0,
            })
            .await
            .expect("create conversation");
    }
}

/// Every message of a conversation as [`MEMBERS`]`[0]` sees it, oldest first.
pub async fn history(
    client: &mut MessagingClient<Channel>,
    tenant: &str,
    conversation: &str,
) -> Vec<Message> {
    let mut all = Vec::new();
    let mut before = 0;
    // A cell its agent is restarting refuses connections for a moment, and calls on a
    // connection to its previous process fail: wait it out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let request = GetHistoryRequest {
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            user_id: MEMBERS[0].into(),
            before_seq: before,
            limit: 200,
        };
        let page = match client.get_history(request).await {
            Ok(page) => page.into_inner(),
            Err(status)
                if (status.code() == tonic::Code::Unavailable
                    || cellplane_api::client::failed_in_transport(&status))
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(status) => panic!("history: {status:?}"),
        };
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

/// Concurrent writers, each sending to two of the tenant's groups in turn until stopped.
pub struct Writers {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    latencies: Arc<Mutex<Samples>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Writers {
    /// `run` makes the client message ids of this run unique, so a later run's sends are not
    /// taken for retries of an earlier one's.
    pub fn start(
        messenger: Arc<Messenger>,
        tenant: &str,
        run: &str,
        writers: usize,
        conversations: usize,
    ) -> Writers {
        Self::start_paced(
            messenger,
            tenant,
            run,
            writers,
            conversations,
            Duration::ZERO,
        )
    }

    /// Like [`Writers::start`], each writer waiting `pace` after each acknowledged send: a
    /// steady load rather than as much as the cell takes.
    pub fn start_paced(
        messenger: Arc<Messenger>,
        tenant: &str,
        run: &str,
        writers: usize,
        conversations: usize,
        pace: Duration,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let latencies = Arc::new(Mutex::new(Samples::default()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..writers)
            .map(|w| {
                let (messenger, stop, acks, latencies, errors) = (
                    messenger.clone(),
                    stop.clone(),
                    acks.clone(),
                    latencies.clone(),
                    errors.clone(),
                );
                let tenant = tenant.to_string();
                let run = run.to_string();
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let conversation = conversation((w * 2 + n % 2) % conversations);
                        let client_msg_id = format!("{run}-w{w}-{n}");
                        let started = Instant::now();
                        let answer = messenger
                            .send_message(send_request(
                                &tenant,
                                &conversation,
                                MEMBERS[w % MEMBERS.len()],
                                &client_msg_id,
                                format!("message {n} of writer {w}").into_bytes(),
                            ))
                            .await
                            .map_err(|status| {
                                let error =
                                    format!("writer {w} send {n} to {conversation}: {status}");
                                errors.lock().expect("errors").push(error.clone());
                                error
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
                            started,
                            answered: Instant::now(),
                        });
                        n += 1;
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Writers {
            stop,
            acks,
            latencies,
            errors,
            tasks,
        }
    }

    /// The latencies recorded since the last call, to measure one window of time.
    pub fn take_latencies(&self) -> Samples {
        std::mem::take(&mut *self.latencies.lock().expect("latencies"))
    }

    pub fn count(&self) -> usize {
        self.acks.lock().expect("acks").len()
    }

    /// Waits until `more` further messages are acknowledged.
    pub async fn let_write(&self, more: usize) {
        let target = self.count() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count() < target {
            let errors = self.errors.lock().expect("errors").clone();
            assert!(errors.is_empty(), "sends failed: {errors:?}");
            assert!(
                Instant::now() < deadline,
                "writers stalled at {}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the writers; every send must have been acknowledged.
    pub async fn stop(self) -> (Vec<Ack>, Samples) {
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

/// Every acknowledged message is in its owner's history exactly once, at the seq it was
/// acknowledged with; seqs are contiguous from 1. `preloaded` messages per conversation were
/// written before the writers started.
pub async fn verify(
    messenger: &Messenger,
    tenant: &str,
    acks: &[Ack],
    preloaded: &BTreeMap<String, u64>,
) {
    let mut by_conversation: BTreeMap<String, Vec<&Ack>> = BTreeMap::new();
    for ack in acks {
        by_conversation
            .entry(ack.conversation.clone())
            .or_default()
            .push(ack);
    }
    for (conversation, acks) in &by_conversation {
        let (_, mut owner) = messenger.owner(tenant, conversation).expect("owner");
        let messages = history(&mut owner, tenant, conversation).await;
        let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (1..=messages.len() as u64).collect();
        assert_eq!(seqs, expected, "{conversation}: seqs are contiguous from 1");
        let before = preloaded.get(conversation).copied().unwrap_or(0);
        let mut by_seq: BTreeMap<u64, &Ack> = BTreeMap::new();
        for ack in acks {
            if let Some(other) = by_seq.insert(ack.seq, ack) {
                panic!(
                    "{conversation}: seq {} acknowledged twice: {other:?} and {ack:?}",
                    ack.seq
                );
            }
        }
        if let Some(missing) = acks.iter().find(|a| a.seq > messages.len() as u64) {
            panic!(
                "{conversation}: acknowledged {missing:?} is not in the history of its owner, which ends at seq {} ({:?})",
                messages.len(),
                messages.last().map(|m| &m.message_id)
            );
        }
        assert_eq!(
            messages.len() as u64,
            before + acks.len() as u64,
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
}
