//! Offline notifications: a new message for a member with no device online reaches the
//! notification webhook, batched; online members and the sender are not notified; what the
//! sink refuses is recorded and counted by the cell.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::proto::cell::{CellStatusRequest, SubscribeRequest};
use cellplane_tests::cell::CellProcess;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{group, send};

/// A webhook on loopback that answers every POST with `status` and keeps the JSON bodies.
struct Sink {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Sink {
    async fn start(status: u16) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let url = format!("http://{}/notify", listener.local_addr().expect("addr"));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 8192];
                    let body_start = loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&request[..body_start]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while request.len() < body_start + length {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    if let Ok(body) =
                        serde_json::from_slice(&request[body_start..body_start + length])
                    {
                        kept.lock().expect("bodies").push(body);
                    }
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        Sink { url, bodies }
    }

    /// `(user_id, seq)` of every notification received so far, and how many POSTs carried them.
    fn received(&self) -> (Vec<(String, u64)>, usize) {
        let bodies = self.bodies.lock().expect("bodies");
        let notifications = bodies
            .iter()
            .flat_map(|b| b["notifications"].as_array().cloned().unwrap_or_default())
            .map(|n| {
                (
                    n["user_id"].as_str().unwrap_or_default().to_string(),
                    n["seq"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        (notifications, bodies.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_are_notified_in_batches_and_refusals_are_recorded() {
    let sink = Sink::start(200).await;
    let cell = CellProcess::start("hz-a-normal-1", &["--pns-webhook", &sink.url]).await;
    cell.grant("acme", "", 1).await;
    group(&cell, "acme", "team", &["alice", "bob", "carol"]).await;
    // Bob is online; carol is not.
    let mut online = cell
        .sync()
        .subscribe(SubscribeRequest {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            device_id: "phone".into(),
            cursor: 0,
        })
        .await
        .expect("subscribe")
        .into_inner();
    online
        .message()
        .await
        .expect("stream")
        .expect("the membership event");
    let mut m = cell.messaging();
    for i in 0..5 {
        m.send_message(send("acme", "team", "alice", &format!("m{i}"), b"hi"))
            .await
            .expect("send");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (notifications, posts) = loop {
        let (notifications, posts) = sink.received();
        if notifications.len() >= 5 {
            break (notifications, posts);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "got only {notifications:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let expected: Vec<(String, u64)> = (1..=5).map(|seq| ("carol".to_string(), seq)).collect();
    let mut sorted = notifications.clone();
    sorted.sort();
    assert_eq!(
        sorted, expected,
        "only the offline member, once per message"
    );
    assert!(posts < 5, "notifications are batched: {posts} POSTs for 5");
    let status = cell
        .admin()
        .cell_status(CellStatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.undelivered_notifications, 0);

    // A sink that refuses: the cell retries, then records what it could not deliver.
    let refusing = Sink::start(500).await;
    let cell = CellProcess::start("hz-b-normal-2", &["--pns-webhook", &refusing.url]).await;
    cell.grant("acme", "", 1).await;
    group(&cell, "acme", "team", &["alice", "carol", "dave"]).await;
    cell.messaging()
        .send_message(send("acme", "team", "alice", "lost", b"hi"))
        .await
        .expect("the send itself succeeds");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let undelivered = cell
            .admin()
            .cell_status(CellStatusRequest::default())
            .await
            .expect("status")
            .into_inner()
            .undelivered_notifications;
        if undelivered == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{undelivered} undelivered recorded, expected carol's and dave's"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refusing.received().1 >= 3,
        "the batch was tried three times before it was recorded"
    );
}
