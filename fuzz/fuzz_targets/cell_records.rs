//! What a cell decodes from its peers and its own store: cell-log records as a standby
//! receives them from its primary (or an import from another cell), and every stored record.
//! A record that decodes is then replayed into a real store, uncommitted, as a standby would
//! apply it: any record is applied or refused, and nothing panics.

#![no_main]

use std::sync::LazyLock;

use cellplane_im_cell::store::Store;
use cellplane_im_cell::store::memory::Memory;
use cellplane_im_cell::store::mutate::replay;
use cellplane_im_cell::store::records::{
    ConversationRecord, GrantRecord, IdempotencyRecord, InboxRecord, LogRecord, MemberRecord,
    MessageRecord, PromotionRecord, ReplicaRecord, SyncRecord, decode,
};
use cellplane_im_cell::store::tx::Tx;
use libfuzzer_sys::fuzz_target;

/// One store for the whole run, in a directory removed at exit; nothing is ever committed
/// to it.
static STORE: LazyLock<(tempfile::TempDir, Store)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), 10).expect("store");
    (dir, store)
});

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            let _ = decode::<ConversationRecord>(bytes);
        }
        1 => {
            let _ = decode::<MemberRecord>(bytes);
        }
        2 => {
            let _ = decode::<MessageRecord>(bytes);
        }
        3 => {
            let _ = decode::<InboxRecord>(bytes);
        }
        4 => {
            let _ = decode::<IdempotencyRecord>(bytes);
        }
        5 => {
            let _ = decode::<SyncRecord>(bytes);
        }
        6 => {
            let _ = decode::<GrantRecord>(bytes);
        }
        7 => {
            let _ = decode::<ReplicaRecord>(bytes);
        }
        8 => {
            let _ = decode::<PromotionRecord>(bytes);
        }
        _ => {
            if let Ok(record) = decode::<LogRecord>(bytes) {
                let store = STORE.1.clone();
                let mut tx = Tx::new(store, record.lsn, Memory::default());
                let _ = replay(&mut tx, record);
            }
        }
    }
});
