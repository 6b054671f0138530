//! Every Messaging and Sync request a cell takes from IM front ends, decoded from arbitrary
//! bytes and served by the real services over a real store (a key granted, as a cell serving
//! it holds): each is answered or refused with a status; nothing panics. Writes are durable,
//! so this target runs hundreds of inputs a second, not millions.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use cellplane_api::proto::cell as pb;
use cellplane_api::proto::cell::messaging_server::Messaging;
use cellplane_api::proto::cell::sync_server::Sync;
use cellplane_im_cell::lease::Lease;
use cellplane_im_cell::limits::Limits;
use cellplane_im_cell::messaging::MessagingService;
use cellplane_im_cell::replication::gate::SyncGate;
use cellplane_im_cell::replication::role::Role;
use cellplane_im_cell::store::Store;
use cellplane_im_cell::store::fencing::GrantChange;
use cellplane_im_cell::store::log_trim::LogBound;
use cellplane_im_cell::store::writer::{Op, Writer};
use cellplane_im_cell::sync::SyncService;
use cellplane_im_cell::sync::hub::SyncHub;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Request;

struct Cell {
    runtime: tokio::runtime::Runtime,
    messaging: MessagingService,
    sync: SyncService,
    _dir: tempfile::TempDir,
    _closing: tokio::sync::watch::Sender<bool>,
}

/// One cell for the whole run: tenant `t` granted at epoch 1, a group `g` of a and b.
static CELL: LazyLock<Cell> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (messaging, sync, closing) = runtime.block_on(async {
        let limits = Limits::default();
        let store = Store::open(dir.path(), 1_000).expect("store");
        let hub = SyncHub::default();
        let gate = SyncGate::new(&[], Duration::from_secs(1), 0, hub.clone());
        let writer = Writer::start(
            store.clone(),
            "fuzz".into(),
            Role::new(None),
            Lease::new(false, cellplane_api::clock::Monotonic::default()),
            limits.clone(),
            LogBound {
                max_bytes: 64 << 20,
                max_age: Duration::from_secs(3_600),
            },
            gate,
        )
        .expect("writer");
        writer
            .submit(Op::Change {
                tenant: "t".into(),
                conversation: String::new(),
                change: GrantChange::Grant { epoch: 1 },
            })
            .await
            .expect("grant");
        let (closing, closed) = tokio::sync::watch::channel(false);
        let messaging = MessagingService::new(store.clone(), writer, limits.clone());
        let _ = messaging
            .create_conversation(Request::new(pb::CreateConversationRequest {
                tenant_id: "t".into(),
                conversation_id: "g".into(),
                kind: pb::ConversationKind::Group as i32,
                member_ids: vec!["a".into(), "b".into()],
                route_epoch: 1,
            }))
            .await;
        let sync = SyncService::new(store, hub, &limits, closed);
        (messaging, sync, closing)
    });
    Cell {
        runtime,
        messaging,
        sync,
        _dir: dir,
        _closing: closing,
    }
});

fn decoded<T: Message + Default>(bytes: &[u8]) -> Option<Request<T>> {
    T::decode(bytes).ok().map(Request::new)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let cell = &*CELL;
    let (m, s) = (&cell.messaging, &cell.sync);
    cell.runtime.block_on(async {
        match which % 11 {
            0 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.create_conversation(r).await;
                }
            }
            1 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.add_members(r).await;
                }
            }
            2 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.remove_members(r).await;
                }
            }
            3 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.send_message(r).await;
                }
            }
            4 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.get_history(r).await;
                }
            }
            5 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.mark_read(r).await;
                }
            }
            6 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.recall_message(r).await;
                }
            }
            7 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.delete_for_me(r).await;
                }
            }
            8 => {
                if let Some(r) = decoded(bytes) {
                    let _ = m.get_conversations(r).await;
                }
            }
            9 => {
                if let Some(r) = decoded(bytes) {
                    let _ = s.ack(r).await;
                }
            }
            _ => {
                if let Some(r) = decoded(bytes) {
                    // Opened and dropped: the stream's task ends when it finds no reader.
                    let _ = s.subscribe(r).await;
                }
            }
        }
    });
});
