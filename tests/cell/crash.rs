//! SIGKILL the cell while many senders write: after a restart from its data directory every
//! acknowledged message is there exactly once, each conversation's seqs run from 1 without a gap,
//! and a resend of an acknowledged message returns the first answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::cell::{GetHistoryRequest, Message};
use cellplane_tests::cell::CellProcess;

use crate::{group, send};

const CONVERSATIONS: usize = 4;
const SENDERS: usize = 8;

/// (conversation, sender, client_msg_id) → (seq, message_id)
type Acks = Arc<Mutex<HashMap<(String, String, String), (u64, String)>>>;

async fn full_history(cell: &CellProcess, conversation: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut before = 0;
    loop {
        let page = cell
            .messaging()
            .get_history(GetHistoryRequest {
                tenant_id: "acme".into(),
                conversation_id: conversation.into(),
                user_id: "s0".into(),
                before_seq: before,
                limit: 200,
            })
            .await
            .expect("history")
            .into_inner();
        let Some(oldest) = page.messages.last() else {
            break;
        };
        before = oldest.seq;
        messages.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    messages.reverse();
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cell_keeps_every_acknowledged_message_exactly_once() {
    let mut cell = CellProcess::start(
        "hz-a-normal-1",
        &[
            "--sends-per-conversation-per-sec",
            "1000000",
            "--sends-per-sender-per-sec",
            "1000000",
        ],
    )
    .await;
    cell.grant("acme", "", 1).await;
    let senders: Vec<String> = (0..SENDERS).map(|s| format!("s{s}")).collect();
    let members: Vec<&str> = senders.iter().map(String::as_str).collect();
    for c in 0..CONVERSATIONS {
        group(&cell, "acme", &format!("g{c}"), &members).await;
    }

    let acks: Acks = Arc::default();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let mut client = cell.messaging();
        let acks = acks.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let conversation = format!("g{}", (s + i) % CONVERSATIONS);
                let sender = format!("s{s}");
                let id = format!("m{i}");
                let body = format!("{sender} says {i}");
                let mut request =
                    tonic::Request::new(send("acme", &conversation, &sender, &id, body.as_bytes()));
                request.set_timeout(Duration::from_secs(2));
                match client.send_message(request).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        acks.lock()
                            .expect("acks")
                            .insert((conversation, sender, id), (answer.seq, answer.message_id));
                    }
                    // The cell is gone: stop this sender.
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cell.kill().await;
    for task in tasks {
        task.await.expect("sender");
    }
    let acks = acks.lock().expect("acks").clone();
    assert!(
        acks.len() > 100,
        "too few acknowledged sends before the kill: {}",
        acks.len()
    );

    cell.restart().await;
    let mut stored: HashMap<(String, String, String), (u64, String)> = HashMap::new();
    for c in 0..CONVERSATIONS {
        let conversation = format!("g{c}");
        let history = full_history(&cell, &conversation).await;
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (1..=history.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "{conversation}: seqs are not contiguous from 1"
        );
        for message in history {
            let key = (
                conversation.clone(),
                message.sender_id.clone(),
                message.client_msg_id.clone(),
            );
            let previous = stored.insert(key.clone(), (message.seq, message.message_id.clone()));
            assert!(previous.is_none(), "{key:?} stored twice");
            let expected_body = format!(
                "{} says {}",
                message.sender_id,
                message.client_msg_id.trim_start_matches('m')
            );
            assert_eq!(
                message.body,
                expected_body.as_bytes(),
                "{key:?}: body changed"
            );
        }
    }
    for (key, answer) in &acks {
        assert_eq!(
            stored.get(key),
            Some(answer),
            "acknowledged {key:?} lost or changed"
        );
    }

    // A resend after the restart returns the first answer.
    let mut client = cell.messaging();
    for ((conversation, sender, id), (seq, message_id)) in acks.iter().take(50) {
        let i: usize = id.trim_start_matches('m').parse().expect("index");
        let body = format!("{sender} says {i}");
        let again = client
            .send_message(send("acme", conversation, sender, id, body.as_bytes()))
            .await
            .expect("resend")
            .into_inner();
        assert_eq!((again.seq, &again.message_id), (*seq, message_id));
    }
}

/// The crash point before a batch is made durable: the cell dies with sends in that batch
/// unanswered, and restarted, holds every send it acknowledged and none of the batch it never
/// committed unless resent; a resent one is answered as new, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_crashed_before_a_commit_keeps_what_it_acknowledged_and_nothing_else() {
    let mut cell = CellProcess::start("hz-a-normal-1", &[]).await;
    cell.grant("acme", "", 1).await;
    group(&cell, "acme", "c0", &["s0", "s1"]).await;
    cell.kill().await;
    // Twenty more commits, then the process ends before the next one is durable.
    cell.set_crash_at(Some("cell-commit=20*off->return"));
    cell.restart().await;
    let mut messaging = cell.messaging();
    let mut acked = Vec::new();
    let mut unanswered = None;
    for n in 0..100 {
        let id = format!("m{n}");
        match messaging
            .send_message(send("acme", "c0", "s0", &id, b"x"))
            .await
        {
            Ok(answer) => acked.push((id, answer.into_inner().seq)),
            Err(_) => {
                unanswered = Some(id);
                break;
            }
        }
    }
    let status = cell
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the cell ended at its crash point");
    assert!(cellplane_api::failpoint::killed(&status), "{status}");
    let unanswered = unanswered.expect("a send the crash left unanswered");
    assert_eq!(acked.len(), 20, "one send per commit before the crash");

    cell.set_crash_at(None);
    cell.restart().await;
    let history = full_history(&cell, "c0").await;
    let found: Vec<(String, u64)> = history
        .iter()
        .map(|m| (m.client_msg_id.clone(), m.seq))
        .collect();
    assert_eq!(found, acked, "exactly what was acknowledged, at its seqs");
    let resent = cell
        .messaging()
        .send_message(send("acme", "c0", "s0", &unanswered, b"x"))
        .await
        .expect("the unanswered send, resent")
        .into_inner();
    assert_eq!(resent.seq, 21);
    assert_eq!(full_history(&cell, "c0").await.len(), 21);
}
