//! What the writer remembers between batches, so a send does not read back from the LSM tree
//! what the writer itself wrote a moment ago: users' newest pts, conversation and member rows,
//! and member lists.
//!
//! The writer is the only thread that changes these rows, so what it remembers stays true as
//! long as it learns every change. Rows a batch wrote are taken in once the batch is durable
//! ([`Memory::settle`]), a batch that fails to commit makes it forget everything
//! ([`Memory::clear`]), and each part starts over when it grows past its bound. Nothing here is
//! ever the only copy: a forgotten entry is read from the store again.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use super::{Space, keys};

/// Rows remembered at most; past it the rows start over.
const MAX_ROWS: usize = 1 << 18;
/// Member names remembered at most, over all lists.
const MAX_MEMBER_NAMES: usize = 1 << 20;

/// Users' newest pts by user key, as the writer last wrote them. The writer alone assigns pts,
/// so it need not find a user's newest event in the store for every event: a send to a
/// 500-member group would otherwise make 500 reads.
#[derive(Debug, Default)]
pub struct Heads {
    pts: HashMap<Vec<u8>, u64>,
}

impl Heads {
    /// Users remembered at most; past it the cache starts over (and reads the store again).
    const MAX_USERS: usize = 1 << 20;

    pub fn get(&self, key: &[u8]) -> Option<u64> {
        self.pts.get(key).copied()
    }

    pub fn set(&mut self, key: Vec<u8>, pts: u64) {
        if self.pts.len() >= Self::MAX_USERS {
            self.pts.clear();
        }
        self.pts.insert(key, pts);
    }

    pub fn forget(&mut self, key: &[u8]) {
        self.pts.remove(key);
    }
}

/// Rows by key, of one space.
type Rows = HashMap<Vec<u8>, Vec<u8>>;

/// The rows and lists the writer reads on every write to a conversation.
#[derive(Debug, Default)]
pub struct Memory {
    pub heads: Heads,
    /// Committed rows of the remembered spaces, by space and key. Filled as the writer reads
    /// them (hence the cell: reads go through `&Tx`).
    rows: RefCell<HashMap<Space, Rows>>,
    row_count: Cell<usize>,
    /// Committed member lists by members prefix (`tenant\0conversation\0`), in id order.
    members: RefCell<HashMap<Vec<u8>, Arc<Vec<String>>>>,
    member_names: Cell<usize>,
}

impl Memory {
    /// Whether rows of `space` are remembered: the ones every send reads.
    pub fn remembers(space: Space) -> bool {
        matches!(space, Space::Conversations | Space::Members)
    }

    /// `f` of a committed row, if remembered: the row is read in place, not copied.
    pub fn with_row<R>(&self, space: Space, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.rows.borrow().get(&space)?.get(key).map(|row| f(row))
    }

    /// Remembers a committed row read from the store.
    pub fn keep_row(&self, space: Space, key: &[u8], value: &[u8]) {
        let mut rows = self.rows.borrow_mut();
        if self.row_count.get() >= MAX_ROWS {
            rows.clear();
            self.row_count.set(0);
        }
        if rows
            .entry(space)
            .or_default()
            .insert(key.to_vec(), value.to_vec())
            .is_none()
        {
            self.row_count.set(self.row_count.get() + 1);
        }
    }

    /// A committed member list, if remembered.
    pub fn member_list(&self, prefix: &[u8]) -> Option<Arc<Vec<String>>> {
        self.members.borrow().get(prefix).cloned()
    }

    /// Remembers a committed member list read from the store.
    pub fn keep_member_list(&self, prefix: Vec<u8>, list: Arc<Vec<String>>) {
        let mut members = self.members.borrow_mut();
        if self.member_names.get() + list.len() > MAX_MEMBER_NAMES {
            members.clear();
            self.member_names.set(0);
        }
        let mut names = self.member_names.get() + list.len();
        if let Some(previous) = members.insert(prefix, list) {
            names -= previous.len();
        }
        self.member_names.set(names);
    }

    /// Takes in what a durable batch wrote to the remembered spaces (`None`: deleted). A
    /// member row written drops its conversation's list, which is read again when next needed.
    pub fn settle<'a>(
        &mut self,
        written: impl Iterator<Item = (Space, &'a [u8], Option<&'a [u8]>)>,
    ) {
        for (space, key, value) in written {
            if !Self::remembers(space) {
                continue;
            }
            if space == Space::Members
                && let Some((tenant, conversation, _)) = keys::member_parts(key)
            {
                let prefix = keys::members_prefix(tenant, conversation);
                if let Some(list) = self.members.get_mut().remove(&prefix) {
                    self.member_names.set(self.member_names.get() - list.len());
                }
            }
            match value {
                Some(value) => self.keep_row(space, key, value),
                None => {
                    if let Some(rows) = self.rows.get_mut().get_mut(&space)
                        && rows.remove(key).is_some()
                    {
                        self.row_count.set(self.row_count.get() - 1);
                    }
                }
            }
        }
    }

    /// Forgets everything: after a batch that failed to commit, whose rows may be remembered.
    pub fn clear(&mut self) {
        self.heads.pts.clear();
        self.rows.get_mut().clear();
        self.row_count.set(0);
        self.members.get_mut().clear();
        self.member_names.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_batch_replaces_rows_and_drops_changed_member_lists() {
        let mut memory = Memory::default();
        let conversation = keys::conversation("t", "c");
        memory.keep_row(Space::Conversations, &conversation, b"v1");
        memory.keep_member_list(
            keys::members_prefix("t", "c"),
            Arc::new(vec!["alice".into()]),
        );
        memory.keep_member_list(
            keys::members_prefix("t", "other"),
            Arc::new(vec!["bob".into()]),
        );
        let member = keys::member("t", "c", "carol");
        memory.settle(
            [
                (
                    Space::Conversations,
                    conversation.as_slice(),
                    Some(&b"v2"[..]),
                ),
                (Space::Members, member.as_slice(), Some(&b"m"[..])),
                (Space::Messages, b"ignored".as_slice(), Some(&b"x"[..])),
            ]
            .into_iter(),
        );
        assert_eq!(
            memory.with_row(Space::Conversations, &conversation, <[u8]>::to_vec),
            Some(b"v2".to_vec())
        );
        assert_eq!(
            memory.with_row(Space::Members, &member, <[u8]>::to_vec),
            Some(b"m".to_vec())
        );
        assert_eq!(
            memory.with_row(Space::Messages, b"ignored", <[u8]>::to_vec),
            None
        );
        assert!(
            memory
                .member_list(&keys::members_prefix("t", "c"))
                .is_none()
        );
        assert!(
            memory
                .member_list(&keys::members_prefix("t", "other"))
                .is_some()
        );

        memory.settle([(Space::Members, member.as_slice(), None)].into_iter());
        assert_eq!(
            memory.with_row(Space::Members, &member, <[u8]>::to_vec),
            None
        );

        memory.heads.set(b"u".to_vec(), 7);
        memory.clear();
        assert_eq!(memory.heads.get(b"u"), None);
        assert_eq!(
            memory.with_row(Space::Conversations, &conversation, <[u8]>::to_vec),
            None
        );
    }
}
