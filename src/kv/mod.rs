//! KV-cache bookkeeping: which pages hold which tokens, shared prefixes and their keys.
//!
//! Pure data structures, driven by the `KvPageManager` actor; the page tensors themselves live in
//! the executor.

pub mod block_hash;
pub mod pool;
pub mod swap;

pub use block_hash::{BlockHash, BlockHasher};
pub use pool::{CachedPrefix, Grant, NoSpace, PageCopy, PagePool, PoolStats};
pub use swap::SwapSpace;

/// A sequence known to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
