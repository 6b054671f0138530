//! Read receipts, merged before they fan out. Every member of a conversation learns who read up
//! to where, but not once per MarkRead: receipts of one conversation collect for a short window
//! and go out as one READ event per member naming every reader of the window. In a busy group
//! that turns hundreds of receipts into one event per member per window.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::writer::{Op, Writer};

/// How long receipts of one conversation collect before they fan out.
pub const RECEIPT_WINDOW: Duration = Duration::from_millis(200);

/// One reader's new read position.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub tenant: String,
    pub conversation: String,
    pub user: String,
    pub seq: u64,
}

/// Hands receipts to the merging task; cheap to clone.
#[derive(Clone)]
pub struct ReceiptMerger {
    queue: mpsc::UnboundedSender<Receipt>,
}

impl ReceiptMerger {
    /// Starts the merging task; it stops when every handle is gone.
    pub fn start(writer: Writer) -> Self {
        let (queue, receipts) = mpsc::unbounded_channel();
        tokio::spawn(run(writer, receipts));
        Self { queue }
    }

    pub fn add(&self, receipt: Receipt) {
        // The task only stops with the server; a receipt lost then is a notification, not data.
        let _ = self.queue.send(receipt);
    }
}

async fn run(writer: Writer, mut receipts: mpsc::UnboundedReceiver<Receipt>) {
    while let Some(first) = receipts.recv().await {
        // Collect for one window from the first receipt.
        let mut windows: HashMap<(String, String), BTreeMap<String, u64>> = HashMap::new();
        let mut add = |receipt: Receipt| {
            let readers = windows
                .entry((receipt.tenant, receipt.conversation))
                .or_default();
            let seq = readers.entry(receipt.user).or_default();
            *seq = (*seq).max(receipt.seq);
        };
        add(first);
        let deadline = tokio::time::Instant::now() + RECEIPT_WINDOW;
        while let Ok(Some(receipt)) = tokio::time::timeout_at(deadline, receipts.recv()).await {
            add(receipt);
        }
        for ((tenant, conversation), readers) in windows {
            let count = readers.len();
            let op = Op::Receipts {
                tenant,
                conversation,
                readers: readers.into_iter().collect(),
            };
            if let Err(err) = writer.submit(op).await {
                tracing::warn!(error = %err, readers = count, "read receipts not fanned out");
            }
        }
    }
}
