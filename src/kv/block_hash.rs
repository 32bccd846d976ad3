//! Content keys of full KV pages, for automatic prefix caching.
//!
//! A page's key chains its parent page's key with the page's token ids, so equal keys mean equal
//! prefixes up to and including that page, hence equal K/V. The hasher is SipHash keyed at random
//! once per process: keys cannot be forged by a client to poison another client's prefix, and
//! 64-bit collisions among honest prefixes are negligible (~1e-8 for a million pages).

use std::hash::{BuildHasher, Hash, Hasher};

/// Key of one full page of tokens and everything before it.
pub type BlockHash = u64;

/// Computes page keys; one per served model (the salt keeps models and dtypes apart).
#[derive(Debug, Clone)]
pub struct BlockHasher {
    keys: std::collections::hash_map::RandomState,
    salt: u64,
    page_size: usize,
}

impl BlockHasher {
    /// `salt` names everything besides the tokens that changes K/V: model and dtype.
    pub fn new(salt: &str, page_size: usize) -> Self {
        let keys = std::collections::hash_map::RandomState::new();
        let salt = keys.hash_one(salt);
        Self {
            keys,
            salt,
            page_size,
        }
    }

    /// The same random keys with another salt (another model or dtype).
    pub fn with_salt(&self, salt: &str) -> Self {
        Self {
            keys: self.keys.clone(),
            salt: self.keys.hash_one(salt),
            page_size: self.page_size,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The key of the page holding `tokens` after the page keyed `parent` (`None` for the first).
    pub fn page_hash(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut h = self.keys.build_hasher();
        parent.unwrap_or(self.salt).hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Extends `hashes` to key every full page of `tokens` (hashes of earlier pages are kept).
    pub fn extend(&self, hashes: &mut Vec<BlockHash>, tokens: &[u32]) {
        let full = tokens.len() / self.page_size;
        while hashes.len() < full {
            let i = hashes.len();
            let page = &tokens[i * self.page_size..(i + 1) * self.page_size];
            hashes.push(self.page_hash(hashes.last().copied(), page));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_kv_hash_chain_depends_on_the_whole_prefix() {
        let h = BlockHasher::new("model-a", 2);
        let mut a = Vec::new();
        h.extend(&mut a, &[1, 2, 3, 4, 5]);
        assert_eq!(a.len(), 2, "only full pages are keyed");
        let mut b = Vec::new();
        h.extend(&mut b, &[9, 2, 3, 4]);
        assert_ne!(a[1], b[1], "same page tokens after a different prefix differ");
        let mut c = a.clone();
        h.extend(&mut c, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&c[..2], &a[..], "extending keeps earlier keys");
        assert_eq!(c.len(), 3);
        let other = h.with_salt("model-b");
        assert_eq!(h.with_salt("model-a").page_hash(None, &[1, 2]), a[0]);
        assert_ne!(other.page_hash(None, &[1, 2]), a[0], "the salt separates models");
    }
}
