//! The `Sync` gRPC service: every event of a user, to each device, in `pts` order.
//!
//! A subscription first joins the hub (so nothing committed from then on is missed), then reads
//! the device's backlog from the store, then follows pushed events, skipping any it already sent.
//! A gap in pushed events (the device fell behind and was dropped from the hub) is filled from the
//! store. A backlog over the rebase threshold is replaced by one REBASE event naming the changed
//! conversations; the device fetches their state and continues from the REBASE's pts.

pub mod hub;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use cellplane_api::ids::validate_id;
use cellplane_api::proto::cell as pb;
use cellplane_api::proto::cell::sync_server::Sync;
use cellplane_api::streams::{Held, StreamSlots};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::CellError;
use crate::limits::Limits;
use crate::messaging::message_to_proto;
use crate::store::Store;
use crate::store::records::{SyncKind, SyncRecord};
use hub::SyncHub;

/// Events read from the store per page while catching up.
const CATCH_UP_PAGE: usize = 256;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SyncEvent, Status>> + Send>>;

pub struct SyncService {
    store: Store,
    hub: SyncHub,
    rebase_backlog_events: u64,
    /// The devices' streams the cell holds.
    subscriptions: Arc<StreamSlots>,
    /// Turns true when the cell stops: open streams end then, so they do not hold the drain.
    closing: watch::Receiver<bool>,
}

impl SyncService {
    pub fn new(
        store: Store,
        hub: SyncHub,
        limits: &Limits,
        closing: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            hub,
            rebase_backlog_events: limits.rebase_backlog_events,
            subscriptions: StreamSlots::new(
                "subscriptions",
                (
                    "limits.max_subscriptions",
                    "limits.max_subscriptions_per_connection",
                ),
                limits.max_subscriptions,
                limits.max_subscriptions_per_connection,
            ),
            closing,
        }
    }
}

pub fn event_to_proto(record: &SyncRecord) -> pb::SyncEvent {
    let kind = match record.kind {
        SyncKind::NewMessage => pb::SyncEventKind::NewMessage,
        SyncKind::Read => pb::SyncEventKind::Read,
        SyncKind::Recall => pb::SyncEventKind::Recall,
        SyncKind::Membership => pb::SyncEventKind::Membership,
        SyncKind::DeleteForMe => pb::SyncEventKind::DeleteForMe,
        SyncKind::Rebase => pb::SyncEventKind::Rebase,
    };
    let changed_conversations = match record.kind {
        SyncKind::Rebase => vec![record.conversation_id.clone()],
        _ => Vec::new(),
    };
    pb::SyncEvent {
        pts: record.pts,
        kind: kind as i32,
        conversation_id: record.conversation_id.clone(),
        message: record.message.as_deref().map(message_to_proto),
        seq: record.seq,
        user_ids: record.user_ids.clone(),
        joined: record.joined,
        changed_conversations,
    }
}

/// One device's stream.
struct DeviceStream {
    store: Store,
    hub: SyncHub,
    tenant: String,
    user: String,
    rebase_backlog_events: u64,
    out: mpsc::Sender<Result<pb::SyncEvent, Status>>,
    /// The pts of the last event sent.
    last: u64,
}

impl DeviceStream {
    async fn send(&mut self, event: pb::SyncEvent) -> bool {
        let pts = event.pts;
        if self.out.send(Ok(event)).await.is_err() {
            return false;
        }
        self.last = pts;
        true
    }

    /// Sends what the store holds after `last`: the events themselves, or one REBASE.
    async fn catch_up(&mut self) -> Result<bool, CellError> {
        let head = self.store.last_pts(&self.tenant, &self.user)?;
        if head.saturating_sub(self.last) > self.rebase_backlog_events {
            return self.rebase(head).await;
        }
        loop {
            let page =
                self.store
                    .sync_events(&self.tenant, &self.user, self.last, CATCH_UP_PAGE)?;
            let Some(first) = page.first() else {
                return Ok(true);
            };
            if first.pts != self.last + 1 {
                // The user's head moved on while the device read, and the events after its
                // cursor were dropped as too old (`store::retention`).
                let head = self.store.last_pts(&self.tenant, &self.user)?;
                return self.rebase(head).await;
            }
            for record in &page {
                if !self.send(event_to_proto(record)).await {
                    return Ok(false);
                }
            }
        }
    }

    /// Sends one REBASE at `head` naming the conversations changed since `last`: those of the
    /// events after it, or every conversation of the user when some of them are no longer kept.
    async fn rebase(&mut self, head: u64) -> Result<bool, CellError> {
        let mut changed = BTreeSet::new();
        let mut after = self.last;
        let mut complete = true;
        loop {
            // Only the conversations are needed: the events as queued, no message read.
            let page = self
                .store
                .queued_events(&self.tenant, &self.user, after, 4096)?;
            let (Some(first), Some(last)) = (page.first(), page.last()) else {
                break;
            };
            if first.pts != after + 1 {
                complete = false;
                break;
            }
            after = last.pts;
            changed.extend(page.into_iter().map(|e| e.conversation_id));
            if after >= head {
                break;
            }
        }
        if !complete {
            changed = self
                .store
                .user_conversations(&self.tenant, &self.user)?
                .into_iter()
                .collect();
        }
        metrics::counter!("cellplane_cell_rebases_total").increment(1);
        let rebase = pb::SyncEvent {
            pts: head,
            kind: pb::SyncEventKind::Rebase as i32,
            changed_conversations: changed.into_iter().collect(),
            ..Default::default()
        };
        Ok(self.send(rebase).await)
    }

    async fn run(mut self) -> Result<(), CellError> {
        let mut subscription = self.hub.subscribe(&self.tenant, &self.user);
        if !self.catch_up().await? {
            return Ok(());
        }
        loop {
            tokio::select! {
                pushed = subscription.events.recv() => match pushed {
                    Some(record) if record.pts <= self.last => {}
                    Some(record) if record.pts == self.last + 1 => {
                        if !self.send(event_to_proto(&record)).await {
                            return Ok(());
                        }
                    }
                    // A gap: something was not pushed to us; the store has it.
                    Some(_) => {
                        if !self.catch_up().await? {
                            return Ok(());
                        }
                    }
                    // Dropped from the hub for falling behind: rejoin, then catch up.
                    None => {
                        subscription = self.hub.subscribe(&self.tenant, &self.user);
                        if !self.catch_up().await? {
                            return Ok(());
                        }
                    }
                },
                () = self.out.closed() => return Ok(()),
            }
        }
    }
}

#[tonic::async_trait]
impl Sync for SyncService {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let slot = self
            .subscriptions
            .take(cellplane_api::streams::connection(&request))?;
        let message = request.into_inner();
        validate_id("tenant_id", &message.tenant_id)?;
        validate_id("user_id", &message.user_id)?;
        validate_id("device_id", &message.device_id)?;
        let head = self.store.last_pts(&message.tenant_id, &message.user_id)?;
        if message.cursor > head {
            return Err(CellError::invalid(
                "cursor",
                format!("must be at most the user's newest pts {head}"),
            )
            .into());
        }
        let start = if message.cursor == 0 {
            self.store
                .device_cursor(&message.tenant_id, &message.user_id, &message.device_id)?
        } else {
            message.cursor
        };
        let (out, events) = mpsc::channel(256);
        let stream = DeviceStream {
            store: self.store.clone(),
            hub: self.hub.clone(),
            tenant: message.tenant_id,
            user: message.user_id,
            rebase_backlog_events: self.rebase_backlog_events,
            out: out.clone(),
            last: start,
        };
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            let ended = tokio::select! {
                ran = stream.run() => ran.map_err(Status::from),
                _ = closing.wait_for(|closing| *closing) => Err(Status::unavailable(
                    "the cell is stopping; subscribe again from the acknowledged cursor",
                )),
            };
            if let Err(status) = ended {
                let _ = out.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(Held::new(
            ReceiverStream::new(events),
            slot,
        ))))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let message = request.into_inner();
        validate_id("tenant_id", &message.tenant_id)?;
        validate_id("user_id", &message.user_id)?;
        validate_id("device_id", &message.device_id)?;
        let head = self.store.last_pts(&message.tenant_id, &message.user_id)?;
        if message.pts > head {
            return Err(CellError::invalid(
                "pts",
                format!("must be at most the user's newest pts {head}"),
            )
            .into());
        }
        let cursor = self.store.set_device_cursor(
            &message.tenant_id,
            &message.user_id,
            &message.device_id,
            message.pts,
        )?;
        Ok(Response::new(pb::AckResponse { cursor }))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::memory::Memory;

    fn backlog_of(events: u64) -> Limits {
        Limits {
            rebase_backlog_events: events,
            ..Limits::default()
        }
    }
    use crate::store::records::MemberRecord;
    use crate::store::tx::Tx;

    /// Appends `count` events of `conversation` to alice's queue, in one batch.
    fn events(store: &Store, conversation: &str, count: usize) {
        let mut tx = Tx::new(store.clone(), 0, Memory::default());
        let member = MemberRecord {
            joined_ms: 0,
            read_seq: 0,
        };
        tx.set_member("t", conversation, "alice", Some(&member));
        for _ in 0..count {
            tx.event("t", "alice", |pts| SyncRecord {
                pts,
                kind: SyncKind::Read,
                conversation_id: conversation.into(),
                seq: 0,
                message: None,
                user_ids: Vec::new(),
                joined: false,
            })
            .expect("event");
        }
        tx.commit_durably().expect("commit");
    }

    async fn first_event(service: &SyncService, cursor: u64) -> pb::SyncEvent {
        let request = Request::new(pb::SubscribeRequest {
            tenant_id: "t".into(),
            user_id: "alice".into(),
            device_id: format!("d{cursor}"),
            cursor,
        });
        let mut stream = service
            .subscribe(request)
            .await
            .expect("subscribe")
            .into_inner();
        stream
            .next()
            .await
            .expect("an event")
            .expect("not an error")
    }

    /// Events far enough behind the head are dropped by compaction, and a device whose cursor
    /// points into what was dropped gets a REBASE naming every conversation, not a silent gap.
    #[tokio::test]
    async fn old_events_are_dropped_and_a_device_behind_them_rebases() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 10).expect("store");
        events(&store, "c1", 30);
        events(&store, "c2", 20);
        let sync = &store.spaces.sync;
        sync.rotate_memtable_and_wait().expect("flush");
        sync.major_compact().expect("compact");

        let kept = store.sync_events("t", "alice", 0, 100).expect("read");
        let kept: Vec<u64> = kept.iter().map(|e| e.pts).collect();
        assert_eq!(kept, (41..=50).collect::<Vec<_>>(), "the newest 10 stay");

        // A backlog of 15 is under the threshold of 20, but its first 5 events are gone.
        let (_open, closing) = watch::channel(false);
        let service = SyncService::new(store.clone(), SyncHub::default(), &backlog_of(20), closing);
        let rebase = first_event(&service, 35).await;
        assert_eq!(rebase.kind, pb::SyncEventKind::Rebase as i32);
        assert_eq!(rebase.pts, 50);
        assert_eq!(rebase.changed_conversations, vec!["c1", "c2"]);

        // A device whose backlog is all kept reads it.
        let next = first_event(&service, 42).await;
        assert_eq!(next.kind, pb::SyncEventKind::Read as i32);
        assert_eq!(next.pts, 43);

        // Over the threshold with its events gone: one REBASE too.
        let rebase = first_event(&service, 2).await;
        assert_eq!(rebase.kind, pb::SyncEventKind::Rebase as i32);
        assert_eq!(rebase.changed_conversations, vec!["c1", "c2"]);
    }

    /// A device's stream that has caught up waits for pushes; when the cell stops, it ends with
    /// UNAVAILABLE at once instead of holding the server's drain.
    #[tokio::test]
    async fn an_open_stream_ends_with_unavailable_when_the_cell_stops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 10).expect("store");
        events(&store, "c1", 3);
        let (stop, closing) = watch::channel(false);
        let service = SyncService::new(store, SyncHub::default(), &backlog_of(20), closing);
        let mut stream = service
            .subscribe(Request::new(pb::SubscribeRequest {
                tenant_id: "t".into(),
                user_id: "alice".into(),
                device_id: "phone".into(),
                cursor: 0,
            }))
            .await
            .expect("subscribe")
            .into_inner();
        for pts in 1..=3 {
            let event = stream.next().await.expect("event").expect("not an error");
            assert_eq!(event.pts, pts);
        }
        stop.send(true).expect("stop");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("ends at once")
            .expect("a last item");
        let status = ended.expect_err("a status, not an event");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}
