//! The bound on the cell log a cell keeps: the oldest entries go once the log holds more than
//! `max_bytes`, or once they are older than `max_age`. A standby whose position falls below
//! what is kept bootstraps again from a snapshot; an export of a log tail from below it is
//! refused. The newest entry always stays, so LSNs never start over.
//!
//! The writer trims in its own batches, a bounded number of entries at a time, so trimming
//! never races an append and never stalls writes. What the log holds is counted exactly: once
//! when the cell starts, then by what each batch appends and drops. Ages are known from the
//! cell's start on (one mark per second of appends); entries written before it count as
//! written at the start.

use std::collections::VecDeque;
use std::time::Duration;

use super::tx::Tx;
use super::{Space, Store, keys};
use crate::error::CellError;

/// Entries dropped in one writer batch at most.
const TRIM_PER_BATCH: usize = 10_000;

/// How much cell log a cell keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBound {
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// What the writer knows of its log, and the trim staged in the current batch.
pub struct LogTrim {
    bound: LogBound,
    /// Bytes of the entries kept.
    bytes: u64,
    /// The oldest LSN kept.
    first: u64,
    /// One mark per second of appends: (unix ms, the first LSN appended then), oldest first.
    marks: VecDeque<(u64, u64)>,
    /// Staged in the current batch: entries dropped and their bytes.
    staged: (u64, u64),
}

impl LogTrim {
    /// Reads what the log holds at `now_ms` (one pass over it); what it holds counts as
    /// written now.
    pub fn open(store: &Store, bound: LogBound, now_ms: u64) -> Result<Self, CellError> {
        let mut bytes = 0u64;
        for item in store.spaces.log.iter() {
            bytes += item.value()?.len() as u64;
        }
        let first = store.first_lsn()?;
        Ok(Self {
            bound,
            bytes,
            first,
            marks: VecDeque::from([(now_ms, first.max(1))]),
            staged: (0, 0),
        })
    }

    /// Stages, in `tx`, the drop of the oldest durable entries past the bound (`committed` is
    /// the newest durable LSN). The entries `tx` appends stay, and so does the newest durable
    /// one when it appends none: the newest entry is always kept.
    pub fn trim(&mut self, tx: &mut Tx, committed: u64, now_ms: u64) -> Result<(), CellError> {
        let limit = if tx.lsn > committed {
            committed + 1
        } else {
            committed
        };
        let cutoff = now_ms.saturating_sub(self.bound.max_age.as_millis() as u64);
        // Entries below the first LSN appended at or after the cutoff are older than it.
        let age_floor = self
            .marks
            .iter()
            .find(|(ms, _)| *ms >= cutoff)
            .map_or(limit, |(_, lsn)| *lsn);
        let mut first = self.first.max(1) + self.staged.0;
        let mut bytes = (self.bytes + tx.log_bytes).saturating_sub(self.staged.1);
        let mut dropped = 0;
        while dropped < TRIM_PER_BATCH
            && first < limit
            && (first < age_floor || bytes > self.bound.max_bytes)
        {
            let key = keys::lsn(first);
            if let Some(value) = tx.store().spaces.log.get(&key)? {
                bytes = bytes.saturating_sub(value.len() as u64);
                self.staged.1 += value.len() as u64;
                tx.delete(Space::Log, key);
            }
            self.staged.0 += 1;
            first += 1;
            dropped += 1;
        }
        Ok(())
    }

    /// The batch is durable: it appended `appended` bytes from LSN `from` on at `now_ms`.
    pub fn settle(&mut self, from: u64, appended: u64, now_ms: u64) {
        let (dropped, dropped_bytes) = std::mem::take(&mut self.staged);
        self.first = self.first.max(1) + dropped;
        self.bytes = (self.bytes + appended).saturating_sub(dropped_bytes);
        if appended > 0 && self.marks.back().is_none_or(|(ms, _)| now_ms >= ms + 1_000) {
            self.marks.push_back((now_ms, from));
        }
        while self.marks.front().is_some_and(|(_, lsn)| *lsn < self.first) && self.marks.len() > 1 {
            self.marks.pop_front();
        }
        metrics::gauge!("cellplane_cell_log_bytes").set(self.bytes as f64);
        metrics::gauge!("cellplane_cell_log_first_lsn").set(self.first as f64);
    }

    /// The batch failed: nothing staged happened.
    pub fn forget(&mut self) {
        self.staged = (0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::Memory;
    use crate::store::records::Mutation;

    fn append(store: &Store, trim: &mut LogTrim, lsn: &mut u64, n: usize, now_ms: u64) {
        let mut tx = Tx::new(store.clone(), *lsn, Memory::default());
        let from = *lsn + 1;
        for _ in 0..n {
            tx.log(
                "t",
                "c",
                Mutation::Purge {
                    excluded: Vec::new(),
                },
            );
        }
        trim.trim(&mut tx, from - 1, now_ms).expect("trim");
        let appended = tx.log_bytes;
        *lsn = tx.lsn;
        tx.commit_durably().expect("commit");
        trim.settle(from, appended, now_ms);
    }

    #[test]
    fn the_log_keeps_its_bound_in_bytes_and_in_age_and_always_its_newest_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 10).expect("store");
        let bound = LogBound {
            max_bytes: 1_000,
            max_age: Duration::from_secs(60),
        };
        let mut trim = LogTrim::open(&store, bound, 0).expect("open");
        let mut lsn = 0;
        append(&store, &mut trim, &mut lsn, 10, 1_000);
        assert_eq!(store.first_lsn().expect("first"), 1, "within both bounds");
        append(&store, &mut trim, &mut lsn, 200, 2_000);
        assert_eq!(
            store.first_lsn().expect("first"),
            11,
            "a batch's own entries stay"
        );
        append(&store, &mut trim, &mut lsn, 1, 2_500);
        let first = store.first_lsn().expect("first");
        assert!(first > 11, "over the byte bound: the oldest went");
        assert!(
            trim.bytes <= bound.max_bytes + 20,
            "{} bytes kept",
            trim.bytes
        );
        // A minute later one more entry: everything older than the minute goes but it.
        append(&store, &mut trim, &mut lsn, 1, 200_000);
        assert_eq!(store.first_lsn().expect("first"), lsn);
        assert_eq!(
            store.last_lsn().expect("last"),
            lsn,
            "the newest entry stays"
        );

        // Counted from the store on the next start, it is the same.
        let reopened = LogTrim::open(&store, bound, 200_000).expect("reopen");
        assert_eq!((reopened.first, reopened.bytes), (trim.first, trim.bytes));
    }
}
