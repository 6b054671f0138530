//! Key encoding. Ids never contain a NUL byte (the id rule allows `[A-Za-z0-9._:-]` only), so NUL
//! separates segments, and numbers are big-endian so keys sort in numeric order: a prefix scan
//! of `tenant\0conversation\0` walks a conversation's messages in seq order.

/// Builds a key from id segments and a trailing number.
#[derive(Debug, Default, Clone)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn new() -> Self {
        Self(Vec::with_capacity(64))
    }

    /// Appends an id segment followed by the separator.
    pub fn id(mut self, id: &str) -> Self {
        debug_assert!(!id.as_bytes().contains(&0), "ids never contain NUL");
        self.0.extend_from_slice(id.as_bytes());
        self.0.push(0);
        self
    }

    /// Appends a big-endian number.
    pub fn num(mut self, n: u64) -> Self {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// The number at the end of a key.
pub fn trailing_num(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    let bytes: [u8; 8] = key.get(start..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// The last id segment of a key that ends in one (`…\0id\0`).
pub fn last_id(key: &[u8]) -> Option<&str> {
    let body = key.strip_suffix(&[0])?;
    let start = body.iter().rposition(|b| *b == 0).map_or(0, |p| p + 1);
    std::str::from_utf8(body.get(start..)?).ok()
}

/// The id segments of a key made only of ids (no trailing number); `None` otherwise.
pub fn segments(key: &[u8]) -> Option<Vec<&str>> {
    let body = key.strip_suffix(&[0])?;
    body.split(|b| *b == 0)
        .map(|part| std::str::from_utf8(part).ok())
        .collect()
}

/// `(tenant, conversation, user)` of a member key.
pub fn member_parts(key: &[u8]) -> Option<(&str, &str, &str)> {
    match segments(key)?.as_slice() {
        [tenant, conversation, user] => Some((tenant, conversation, user)),
        _ => None,
    }
}

pub fn conversation(tenant: &str, conversation: &str) -> Vec<u8> {
    Key::new().id(tenant).id(conversation).into_bytes()
}

pub fn member(tenant: &str, conversation: &str, user: &str) -> Vec<u8> {
    Key::new().id(tenant).id(conversation).id(user).into_bytes()
}

pub fn members_prefix(tenant: &str, conversation: &str) -> Vec<u8> {
    Key::new().id(tenant).id(conversation).into_bytes()
}

pub fn user_conversation(tenant: &str, user: &str, conversation: &str) -> Vec<u8> {
    Key::new().id(tenant).id(user).id(conversation).into_bytes()
}

pub fn user_conversations_prefix(tenant: &str, user: &str) -> Vec<u8> {
    Key::new().id(tenant).id(user).into_bytes()
}

pub fn message(tenant: &str, conversation: &str, seq: u64) -> Vec<u8> {
    Key::new().id(tenant).id(conversation).num(seq).into_bytes()
}

pub fn inbox(tenant: &str, user: &str, conversation: &str, seq: u64) -> Vec<u8> {
    Key::new()
        .id(tenant)
        .id(user)
        .id(conversation)
        .num(seq)
        .into_bytes()
}

pub fn inbox_prefix(tenant: &str, user: &str, conversation: &str) -> Vec<u8> {
    Key::new().id(tenant).id(user).id(conversation).into_bytes()
}

pub fn idempotency(tenant: &str, conversation: &str, sender: &str, client_msg_id: &str) -> Vec<u8> {
    Key::new()
        .id(tenant)
        .id(conversation)
        .id(sender)
        .id(client_msg_id)
        .into_bytes()
}

pub fn user(tenant: &str, user: &str) -> Vec<u8> {
    Key::new().id(tenant).id(user).into_bytes()
}

pub fn sync_event(tenant: &str, user: &str, pts: u64) -> Vec<u8> {
    Key::new().id(tenant).id(user).num(pts).into_bytes()
}

pub fn device(tenant: &str, user: &str, device: &str) -> Vec<u8> {
    Key::new().id(tenant).id(user).id(device).into_bytes()
}

pub fn grant(tenant: &str, conversation: &str) -> Vec<u8> {
    Key::new().id(tenant).id(conversation).into_bytes()
}

/// The `replica` keyspace's row of where a standby stands in its primary's log.
pub const REPLICA_POSITION: &[u8] = b"position";

/// The `replica` keyspace's row written when a standby was promoted.
pub const REPLICA_PROMOTED: &[u8] = b"promoted";

/// The `replica` keyspace's row naming the primary whose log the position is in.
pub const REPLICA_PRIMARY: &[u8] = b"primary";

pub fn lsn(lsn: u64) -> Vec<u8> {
    Key::new().num(lsn).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_sort_by_seq_within_a_conversation() {
        let a = message("t", "c", 2);
        let b = message("t", "c", 10);
        let other = message("t", "c2", 1);
        assert!(a < b);
        assert!(a.starts_with(&members_prefix("t", "c")));
        assert!(!other.starts_with(&members_prefix("t", "c")));
        assert_eq!(trailing_num(&b), Some(10));
    }

    #[test]
    fn segments_split_id_keys() {
        assert_eq!(segments(&member("t", "c", "u")), Some(vec!["t", "c", "u"]));
        assert_eq!(segments(&grant("t", "")), Some(vec!["t", ""]));
        assert_eq!(member_parts(&member("t", "c", "u")), Some(("t", "c", "u")));
    }

    #[test]
    fn the_last_id_is_recovered() {
        assert_eq!(last_id(&member("t", "c", "alice")), Some("alice"));
        assert_eq!(
            last_id(&user_conversation("t", "u", "group-1")),
            Some("group-1")
        );
    }
}
