//! One audit entry as the replicated state keeps it, and its wire form.

use std::sync::Arc;

use crate::limits::{MAX_AUDIT_MESSAGE_TEXT, MAX_AUDIT_REQUEST_TEXT};
use cellplane_api::proto::control as pb;
use serde::{Deserialize, Serialize};

/// Orders entries: the revision of the write that recorded it, then its place in that write
/// (one write carries the entries of every call that answered meanwhile).
pub type AuditId = (u64, u32);

/// One admin call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The wall clock of the node that took the call, when it arrived.
    pub at_ms: u64,
    /// The client certificate's common name; empty under plaintext.
    pub identity: Arc<str>,
    /// The caller's address as the node saw it.
    pub peer: Arc<str>,
    /// `Control/CreateTenant`.
    pub method: Arc<str>,
    /// The request as text, at most [`MAX_AUDIT_REQUEST_TEXT`] bytes.
    pub request: String,
    /// The answer's gRPC status code (0 is OK).
    pub code: i32,
    /// A refusal's message, at most [`MAX_AUDIT_MESSAGE_TEXT`] bytes.
    pub message: String,
    /// The node that took the call.
    pub node_id: u64,
}

impl AuditEntry {
    pub fn to_proto(&self, id: AuditId) -> pb::AuditEntry {
        pb::AuditEntry {
            id: format_id(id),
            at_ms: self.at_ms,
            identity: self.identity.to_string(),
            peer: self.peer.to_string(),
            method: self.method.to_string(),
            request: self.request.clone(),
            code: self.code,
            message: self.message.clone(),
            node_id: self.node_id,
        }
    }

    /// An entry a peer hands over, its texts cut to the bounds whatever the peer sent.
    pub fn from_proto(entry: pb::AuditEntry) -> Self {
        Self {
            at_ms: entry.at_ms,
            identity: cut(entry.identity, MAX_AUDIT_REQUEST_TEXT).into(),
            peer: cut(entry.peer, MAX_AUDIT_REQUEST_TEXT).into(),
            method: cut(entry.method, MAX_AUDIT_REQUEST_TEXT).into(),
            request: cut(entry.request, MAX_AUDIT_REQUEST_TEXT),
            code: entry.code,
            message: cut(entry.message, MAX_AUDIT_MESSAGE_TEXT),
            node_id: entry.node_id,
        }
    }
}

/// `revision.index`, as `ListAudit` pages by it.
pub fn format_id((revision, index): AuditId) -> String {
    format!("{revision}.{index}")
}

/// Reads an id back; `None` when it is not one.
pub fn parse_id(text: &str) -> Option<AuditId> {
    let (revision, index) = text.split_once('.')?;
    Some((revision.parse().ok()?, index.parse().ok()?))
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
pub fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_and_junk_is_refused() {
        assert_eq!(parse_id(&format_id((42, 3))), Some((42, 3)));
        for junk in ["", "42", "42.", ".3", "a.b", "1.2.3"] {
            assert_eq!(parse_id(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short".into(), 10), "short");
        let cut_text = cut("é".repeat(600), MAX_AUDIT_MESSAGE_TEXT);
        assert!(
            cut_text.len() <= MAX_AUDIT_MESSAGE_TEXT,
            "{}",
            cut_text.len()
        );
        assert!(cut_text.ends_with('…'));
        let peer = pb::AuditEntry {
            request: "x".repeat(5_000),
            ..Default::default()
        };
        assert!(AuditEntry::from_proto(peer).request.len() <= MAX_AUDIT_REQUEST_TEXT);
    }
}
