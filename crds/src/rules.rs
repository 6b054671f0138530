//! The CEL rules the resources share. Each string field a rule reads has a `maxLength`, so the
//! API server can bound the rule's cost.

/// An id: what every cellplane id obeys (`cellplane_api::ids`).
pub const ID: &str = "self.matches('^[A-Za-z0-9._:-]+$')";
pub const ID_MESSAGE: &str = "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -";

/// A field that never changes once the resource exists.
pub const IMMUTABLE: &str = "self == oldSelf";
pub const IMMUTABLE_MESSAGE: &str = "is immutable";

/// The longest id, as `cellplane_api::limits::MAX_ID_BYTES`.
pub const MAX_ID: u32 = 128;
