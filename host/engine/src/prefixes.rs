//! Shared prefixes: public text (a system prompt, a shared document) prefilled once
//! in the model's own frame and referenced by every request that starts with it.
//! Their rows can be evicted like a session's when nothing uses them; the tokens
//! stay registered and are prefilled again on demand.

use kframe_core::cache::SharedPrefix;
use std::sync::Arc;

/// A registered shared prefix. Its prefilled rows can be evicted like a session
/// when nothing uses them; the tokens stay, and the next request that starts with
/// them prefills them once again for everyone.
pub(crate) struct PrefixSlot {
    /// The eviction policy's entry id (in a range sessions never reach).
    pub(crate) entry: u64,
    pub(crate) id: [u8; 32],
    pub(crate) tokens: Vec<u32>,
    pub(crate) shared: Option<Arc<SharedPrefix>>,
    pub(crate) bytes: u64,
    /// Whether the eviction policy was last told it is in use.
    pub(crate) pinned: bool,
}

/// Prefix entry ids: far above any session's.
pub(crate) const PREFIX_ENTRY: u64 = 1 << 62;
