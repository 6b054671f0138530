//! Limits shared by every component, named once so each is enforced and tested at the edge.

/// Longest id (tenant, conversation, cell, region, zone), in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Longest cell endpoint, in bytes.
pub const MAX_ENDPOINT_BYTES: usize = 256;

/// Most keys one `BatchLookup` may ask for.
pub const MAX_BATCH_KEYS: usize = 10_000;

/// Largest page of `ListRoutes` / `ListTenants`.
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// Page size when a request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;
