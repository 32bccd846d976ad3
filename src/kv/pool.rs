//! The page pool: block tables, reference counts and the prefix cache (vLLM's automatic prefix
//! caching).
//!
//! Every page is in exactly one of three states:
//! - **referenced**: held by one or more block tables (`ref_counts[p] > 0`);
//! - **cached**: unreferenced, but its K/V are complete and keyed by a [`BlockHash`], so a new
//!   sequence with the same prefix can take it back without recomputing; evicted least recently
//!   used first when pages run out;
//! - **free**: unreferenced and holding nothing reusable.
//!
//! Only full, computed pages are keyed, and a keyed page is never written again: a sequence only
//! writes at positions past its computed tokens. The one exception is a prompt whose every page
//! is cached: its last token must still be computed to get logits, so that page is copied first
//! (copy-on-write) and the copy is written.

use std::collections::{BTreeSet, HashMap};

use super::{BlockHash, SeqId};

/// Not enough pages for the request; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache full: {needed} pages needed, {free} available")]
pub struct NoSpace {
    pub needed: usize,
    pub free: usize,
}

/// Copy page `src` into page `dst` before the step runs (copy-on-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCopy {
    pub src: u32,
    pub dst: u32,
}

/// The pages a newly admitted sequence got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub block_table: Vec<u32>,
    /// Leading tokens whose K/V came from the prefix cache: the step starts there.
    pub cached_tokens: usize,
    /// Page copies the executor must make before it writes.
    pub copies: Vec<PageCopy>,
}

/// Cumulative prefix-cache counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Tokens of admitted sequences looked up in the prefix cache.
    pub queried_tokens: u64,
    /// Of those, tokens whose K/V were reused rather than computed.
    pub hit_tokens: u64,
    /// Cached pages dropped to make room.
    pub evicted_pages: u64,
    /// Pages copied before a write (copy-on-write).
    pub copied_pages: u64,
}

/// One cached prefix, for the admin view.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachedPrefix {
    /// Key of the prefix's last page, in hex.
    pub hash: String,
    pub tokens: usize,
    /// Block tables holding its last page now.
    pub ref_count: u32,
}

#[derive(Debug, Default)]
struct BlockTable {
    pages: Vec<u32>,
    /// Leading pages already offered to the prefix cache.
    committed: usize,
}

#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    ref_counts: Vec<u32>,
    /// Free pages, popped from the end (low ids first).
    free: Vec<u32>,
    /// Key of every cached or referenced page whose K/V are complete and reusable.
    page_hash: Vec<Option<BlockHash>>,
    /// Length in pages of the prefix a keyed page ends.
    depth: Vec<u32>,
    by_hash: HashMap<BlockHash, u32>,
    /// Unreferenced keyed pages as `(released at tick, page)`: the first is evicted first.
    evictable: BTreeSet<(u64, u32)>,
    released_at: Vec<u64>,
    tick: u64,
    tables: HashMap<SeqId, BlockTable>,
    stats: PoolStats,
}

impl PagePool {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        Self {
            page_size,
            ref_counts: vec![0; num_pages],
            free: (0..num_pages as u32).rev().collect(),
            page_hash: vec![None; num_pages],
            depth: vec![0; num_pages],
            by_hash: HashMap::new(),
            evictable: BTreeSet::new(),
            released_at: vec![0; num_pages],
            tick: 0,
            tables: HashMap::new(),
            stats: PoolStats::default(),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.ref_counts.len()
    }

    /// Pages holding nothing reusable.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Unreferenced pages kept for prefix reuse (evictable).
    pub fn cached_pages(&self) -> usize {
        self.evictable.len()
    }

    /// Pages held by at least one block table.
    pub fn used_pages(&self) -> usize {
        self.num_pages() - self.free.len() - self.evictable.len()
    }

    /// Pages an allocation can take: free ones, then cached ones by eviction.
    pub fn available_pages(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.tables.get(&seq).map(|t| t.pages.as_slice())
    }

    /// How many leading tokens of a sequence with these page keys the cache holds now.
    pub fn cached_prefix_tokens(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.by_hash.contains_key(h)).count() * self.page_size
    }

    /// Admits a sequence that holds no pages: takes every cached page of its longest cached
    /// prefix (`hashes` keys its full pages), then allocates pages for the first `chunk` tokens
    /// after them, all or nothing. `len` is the sequence's token count; at least its last token
    /// is always computed, because the step must produce its logits.
    pub fn admit(
        &mut self,
        seq: SeqId,
        hashes: &[BlockHash],
        len: usize,
        chunk: usize,
    ) -> Result<Grant, NoSpace> {
        debug_assert!(!self.tables.contains_key(&seq), "admit of a sequence with pages");
        debug_assert!(len > 0 && chunk > 0);
        let ps = self.page_size;
        let hits: Vec<u32> = hashes
            .iter()
            .take(len / ps)
            .map_while(|h| self.by_hash.get(h).copied())
            .collect();
        let start = (hits.len() * ps).min(len - 1);
        let total = (start + chunk).min(len);
        // The last cached page is written when the whole sequence was cached: copy it first.
        let copy_last = start < hits.len() * ps;
        let needed = self.pages_for(total) - hits.len() + usize::from(copy_last);
        let reviving = hits.iter().filter(|&&p| self.ref_counts[p as usize] == 0).count();
        let available = self.available_pages() - reviving;
        if needed > available {
            return Err(NoSpace {
                needed,
                free: available,
            });
        }
        for &p in &hits {
            self.take_ref(p);
        }
        let committed = hits.len() - usize::from(copy_last);
        let mut pages = hits;
        let mut copies = Vec::new();
        if copy_last {
            let src = pages.pop().expect("copy_last implies a hit");
            // Allocated before `src` is let go, so the copy never lands on its own source.
            let dst = self.allocate();
            self.drop_ref(src);
            copies.push(PageCopy { src, dst });
            pages.push(dst);
            self.stats.copied_pages += 1;
        }
        while pages.len() < self.pages_for(total) {
            pages.push(self.allocate());
        }
        self.stats.queried_tokens += len as u64;
        self.stats.hit_tokens += start as u64;
        self.tables.insert(
            seq,
            BlockTable {
                pages: pages.clone(),
                committed,
            },
        );
        Ok(Grant {
            block_table: pages,
            cached_tokens: start,
            copies,
        })
    }

    /// Grows a running sequence's block table to hold `total_tokens`, all or nothing.
    pub fn reserve(&mut self, seq: SeqId, total_tokens: usize) -> Result<&[u32], NoSpace> {
        let have = self.tables.get(&seq).map_or(0, |t| t.pages.len());
        let needed = self.pages_for(total_tokens).saturating_sub(have);
        if needed > self.available_pages() {
            return Err(NoSpace {
                needed,
                free: self.available_pages(),
            });
        }
        let new: Vec<u32> = (0..needed).map(|_| self.allocate()).collect();
        let table = self.tables.entry(seq).or_default();
        table.pages.extend(new);
        Ok(&table.pages)
    }

    /// Offers pages `first..first + hashes.len()` of `seq`'s block table to the prefix cache;
    /// they must be full and computed, `hashes` their keys. A key already cached elsewhere is
    /// left alone (two equal prompts computed side by side): the duplicate page is simply freed
    /// with its sequence.
    pub fn commit(&mut self, seq: SeqId, first: usize, hashes: &[BlockHash]) {
        let Some(table) = self.tables.get_mut(&seq) else {
            return;
        };
        let end = (first + hashes.len()).min(table.pages.len());
        for i in first.max(table.committed)..end {
            let (page, hash) = (table.pages[i], hashes[i - first]);
            let p = page as usize;
            if self.page_hash[p].is_none() && !self.by_hash.contains_key(&hash) {
                self.page_hash[p] = Some(hash);
                self.depth[p] = i as u32 + 1;
                self.by_hash.insert(hash, page);
            }
        }
        table.committed = table.committed.max(end);
    }

    /// Drops `seq`'s block table; its pages become cached (if keyed) or free once no other table
    /// holds them. Returns how many pages it was the last holder of.
    pub fn release(&mut self, seq: SeqId) -> usize {
        let Some(table) = self.tables.remove(&seq) else {
            return 0;
        };
        // Last page first: with equal recency, a prefix's tail is evicted before its head.
        table.pages.iter().rev().filter(|&&p| self.drop_ref(p)).count()
    }

    /// Drops every block table (their sequences are gone with the executor that held their
    /// K/V); returns how many there were.
    pub fn release_all(&mut self) -> usize {
        let seqs: Vec<SeqId> = self.tables.keys().copied().collect();
        for &seq in &seqs {
            self.release(seq);
        }
        seqs.len()
    }

    /// Forgets every cached prefix (e.g. after changing weights or to measure cold starts).
    /// Pages in use stay with their sequences but are no longer offered to new ones. Returns how
    /// many keys were dropped.
    pub fn reset_prefix_cache(&mut self) -> usize {
        let dropped = self.by_hash.len();
        self.by_hash.clear();
        self.page_hash.iter_mut().for_each(|h| *h = None);
        self.free.extend(self.evictable.iter().map(|&(_, p)| p));
        self.evictable.clear();
        // Keep the free list popping low ids first.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        dropped
    }

    /// The `n` longest cached prefixes (by the page that ends each).
    pub fn largest_prefixes(&self, n: usize) -> Vec<CachedPrefix> {
        let mut ends: Vec<(u32, u32)> = self
            .page_hash
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .map(|(p, _)| (self.depth[p], p as u32))
            .collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        ends.into_iter()
            .take(n)
            .map(|(depth, p)| CachedPrefix {
                hash: format!("{:016x}", self.page_hash[p as usize].unwrap_or_default()),
                tokens: depth as usize * self.page_size,
                ref_count: self.ref_counts[p as usize],
            })
            .collect()
    }

    /// A page for writing, with one reference: a free one, else the least recently used cached
    /// one. Callers check `available_pages` first.
    fn allocate(&mut self) -> u32 {
        let page = match self.free.pop() {
            Some(p) => p,
            None => {
                let (_, p) = self
                    .evictable
                    .pop_first()
                    .expect("caller checked available pages");
                if let Some(h) = self.page_hash[p as usize].take() {
                    self.by_hash.remove(&h);
                }
                self.stats.evicted_pages += 1;
                p
            }
        };
        self.ref_counts[page as usize] = 1;
        page
    }

    fn take_ref(&mut self, page: u32) {
        let p = page as usize;
        if self.ref_counts[p] == 0 {
            self.evictable.remove(&(self.released_at[p], page));
        }
        self.ref_counts[p] += 1;
    }

    /// Returns whether this was the last reference.
    fn drop_ref(&mut self, page: u32) -> bool {
        let p = page as usize;
        self.ref_counts[p] -= 1;
        if self.ref_counts[p] > 0 {
            return false;
        }
        if self.page_hash[p].is_some() {
            self.tick += 1;
            self.released_at[p] = self.tick;
            self.evictable.insert((self.tick, page));
        } else {
            self.free.push(page);
        }
        true
    }

    /// Checks every pool invariant; used by tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.num_pages();
        let mut counted = vec![0u32; n];
        for table in self.tables.values() {
            for &p in &table.pages {
                counted[p as usize] += 1;
            }
        }
        if counted != self.ref_counts {
            return Err("a ref count differs from the block tables holding the page".into());
        }
        let mut state = vec![0u8; n];
        for &p in &self.free {
            if self.ref_counts[p as usize] != 0 || self.page_hash[p as usize].is_some() {
                return Err(format!("free page {p} is referenced or keyed"));
            }
            state[p as usize] += 1;
        }
        for &(tick, p) in &self.evictable {
            if self.ref_counts[p as usize] != 0 || self.page_hash[p as usize].is_none() {
                return Err(format!("cached page {p} is referenced or unkeyed"));
            }
            if self.released_at[p as usize] != tick {
                return Err(format!("cached page {p} has a stale LRU tick"));
            }
            state[p as usize] += 1;
        }
        for (p, &s) in state.iter().enumerate() {
            let referenced = u8::from(self.ref_counts[p] > 0);
            if s + referenced != 1 {
                return Err(format!(
                    "page {p} is not in exactly one of free/cached/referenced"
                ));
            }
        }
        for (&h, &p) in &self.by_hash {
            if self.page_hash[p as usize] != Some(h) {
                return Err(format!("key {h:x} points at page {p}, which has another key"));
            }
        }
        if self.page_hash.iter().flatten().count() != self.by_hash.len() {
            return Err("a keyed page is missing from the key map".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockHasher;
    use proptest::prelude::*;

    fn keys(hasher: &BlockHasher, tokens: &[u32]) -> Vec<BlockHash> {
        let mut h = Vec::new();
        hasher.extend(&mut h, tokens);
        h
    }

    /// Commits every full page among the first `computed` tokens, as the scheduler does.
    fn commit(pool: &mut PagePool, seq: SeqId, hashes: &[BlockHash], computed: usize) {
        let full = (computed / pool.page_size()).min(hashes.len());
        pool.commit(seq, 0, &hashes[..full]);
    }

    #[test]
    fn paged_kv_reserve_is_all_or_nothing() {
        let mut pool = PagePool::new(4, 16);
        assert_eq!(pool.reserve(SeqId(1), 33).unwrap().len(), 3);
        assert_eq!(pool.reserve(SeqId(2), 17), Err(NoSpace { needed: 2, free: 1 }));
        assert_eq!(pool.free_pages(), 1);
        assert_eq!(
            pool.reserve(SeqId(1), 48).unwrap().len(),
            3,
            "no page needed within the last one"
        );
        assert_eq!(pool.release(SeqId(1)), 3);
        assert_eq!(pool.free_pages(), 4);
    }

    #[test]
    fn paged_kv_prefix_hit_reuses_committed_pages() {
        let hasher = BlockHasher::new("m", 4);
        let mut pool = PagePool::new(8, 4);
        let a: Vec<u32> = (0..10).collect();
        let g = pool.admit(SeqId(1), &keys(&hasher, &a), a.len(), 10).unwrap();
        assert_eq!((g.cached_tokens, g.block_table.len()), (0, 3));
        commit(&mut pool, SeqId(1), &keys(&hasher, &a), 10);
        // Same first 8 tokens, then different: two pages shared, read-only.
        let b: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
        let gb = pool.admit(SeqId(2), &keys(&hasher, &b), b.len(), 11).unwrap();
        assert_eq!(gb.cached_tokens, 8);
        assert_eq!(&gb.block_table[..2], &g.block_table[..2]);
        assert_ne!(gb.block_table[2], g.block_table[2]);
        assert!(gb.copies.is_empty());
        assert_eq!(pool.stats().hit_tokens, 8);
        assert_eq!(pool.used_pages(), 4);
        pool.check_invariants().unwrap();
        pool.release(SeqId(1));
        pool.release(SeqId(2));
        assert_eq!(pool.used_pages(), 0);
        assert_eq!(pool.cached_pages(), 2, "the keyed pages stay cached");
        pool.check_invariants().unwrap();
    }

    #[test]
    fn paged_kv_fully_cached_prompt_copies_its_last_page() {
        let hasher = BlockHasher::new("m", 4);
        let mut pool = PagePool::new(4, 4);
        let a: Vec<u32> = (0..8).collect();
        let first = pool.admit(SeqId(1), &keys(&hasher, &a), 8, 8).unwrap();
        commit(&mut pool, SeqId(1), &keys(&hasher, &a), 8);
        let g = pool.admit(SeqId(2), &keys(&hasher, &a), 8, 8).unwrap();
        assert_eq!(g.cached_tokens, 7, "the last token is recomputed for its logits");
        assert_eq!(g.block_table[0], first.block_table[0]);
        assert_eq!(
            g.copies,
            vec![PageCopy {
                src: first.block_table[1],
                dst: g.block_table[1]
            }]
        );
        assert_ne!(
            g.block_table[1], first.block_table[1],
            "the shared page is not written"
        );
        pool.check_invariants().unwrap();
    }

    #[test]
    fn paged_kv_eviction_is_least_recently_used_and_tail_first() {
        let hasher = BlockHasher::new("m", 2);
        let mut pool = PagePool::new(4, 2);
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8];
        for (id, t) in [(1, &a), (2, &b)] {
            pool.admit(SeqId(id), &keys(&hasher, t), 4, 4).unwrap();
            commit(&mut pool, SeqId(id), &keys(&hasher, t), 4);
        }
        pool.release(SeqId(1));
        pool.release(SeqId(2));
        assert_eq!(pool.cached_pages(), 4);
        // One new page evicts a's tail (released first, tail before head).
        pool.reserve(SeqId(3), 1).unwrap();
        assert_eq!(pool.stats().evicted_pages, 1);
        assert_eq!(pool.cached_prefix_tokens(&keys(&hasher, &a)), 2);
        assert_eq!(pool.cached_prefix_tokens(&keys(&hasher, &b)), 4);
        // More than is available fails without touching anything.
        assert!(pool.reserve(SeqId(4), 9).is_err());
        assert_eq!(pool.cached_pages(), 3);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn paged_kv_reset_prefix_cache_frees_cached_pages() {
        let hasher = BlockHasher::new("m", 2);
        let mut pool = PagePool::new(4, 2);
        pool.admit(SeqId(1), &keys(&hasher, &[1, 2, 3]), 3, 3).unwrap();
        commit(&mut pool, SeqId(1), &keys(&hasher, &[1, 2, 3]), 3);
        assert_eq!(pool.largest_prefixes(5)[0].tokens, 2);
        pool.release(SeqId(1));
        assert_eq!(pool.cached_pages(), 1);
        assert_eq!(pool.reset_prefix_cache(), 1);
        assert_eq!((pool.cached_pages(), pool.free_pages()), (0, 4));
        assert_eq!(pool.cached_prefix_tokens(&keys(&hasher, &[1, 2, 3])), 0);
        pool.check_invariants().unwrap();
    }

    /// A fake device: slot contents are a digest of the token and everything before it, which
    /// is what real K/V depend on. Reading a sequence's computed slots through its block table
    /// must give its own prefix digests, whatever was shared, copied or evicted.
    struct FakeDevice {
        page_size: usize,
        slots: Vec<Option<u64>>,
    }

    impl FakeDevice {
        fn digest(tokens: &[u32]) -> Vec<u64> {
            tokens
                .iter()
                .scan(7u64, |acc, &t| {
                    *acc = acc.wrapping_mul(1_000_003).wrapping_add(u64::from(t) + 1);
                    Some(*acc)
                })
                .collect()
        }

        fn slot(&self, table: &[u32], pos: usize) -> usize {
            table[pos / self.page_size] as usize * self.page_size + pos % self.page_size
        }

        /// Checks `[0, start)` and writes `[start, end)`, as one model step would.
        fn step(&mut self, table: &[u32], tokens: &[u32], start: usize, end: usize) -> Result<(), String> {
            let want = Self::digest(&tokens[..end]);
            for (pos, &w) in want.iter().enumerate().take(start) {
                let got = self.slots[self.slot(table, pos)];
                if got != Some(w) {
                    return Err(format!("position {pos} reads {got:?}, expected {w}"));
                }
            }
            for (pos, &w) in want.iter().enumerate().take(end).skip(start) {
                let s = self.slot(table, pos);
                self.slots[s] = Some(w);
            }
            Ok(())
        }

        fn copy(&mut self, c: PageCopy) {
            for i in 0..self.page_size {
                self.slots[c.dst as usize * self.page_size + i] =
                    self.slots[c.src as usize * self.page_size + i];
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Admit sequence `seq` with a prompt built from a shared stem and a tail.
        Admit {
            seq: u64,
            stem: usize,
            tail: Vec<u32>,
            chunk: usize,
        },
        /// Compute the next `n` tokens of `seq` (appending generated ones past its prompt).
        Step {
            seq: u64,
            n: usize,
        },
        Release {
            seq: u64,
        },
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Few distinct prompts, so that whole prompts repeat and pages get shared and copied.
            2 => (0u64..6, prop_oneof![Just(2usize), Just(5), Just(8), 0usize..14], proptest::collection::vec(0u32..2, 0..4), 1usize..8)
                .prop_map(|(seq, stem, tail, chunk)| Op::Admit { seq, stem, tail, chunk }),
            3 => (0u64..6, 1usize..5).prop_map(|(seq, n)| Op::Step { seq, n }),
            1 => (0u64..6).prop_map(|seq| Op::Release { seq }),
            1 => Just(Op::Reset),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random admissions over shared prefixes, chunked steps, releases and resets against a
        /// small pool: every invariant holds after every operation, no sequence ever reads K/V
        /// other than its own prefix's (so a prefix hit cannot change an output), and once every
        /// sequence is gone, no page is referenced.
        #[test]
        fn paged_kv_pool_invariants_and_prefix_reuse(ops in proptest::collection::vec(op(), 1..120)) {
            let page_size = 3;
            let hasher = BlockHasher::new("m", page_size);
            let mut pool = PagePool::new(10, page_size);
            let mut device = FakeDevice { page_size, slots: vec![None; 10 * page_size] };
            let stem: Vec<u32> = (10..24).collect();
            // seq -> (tokens, computed)
            let mut live: HashMap<u64, (Vec<u32>, usize)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Admit { seq, stem: s, tail, chunk } => {
                        if live.contains_key(&seq) { continue; }
                        let tokens: Vec<u32> = stem[..s].iter().copied().chain(tail).chain([5]).collect();
                        let k = keys(&hasher, &tokens);
                        let before = pool.available_pages();
                        match pool.admit(SeqId(seq), &k, tokens.len(), chunk) {
                            Ok(g) => {
                                prop_assert!(g.cached_tokens < tokens.len());
                                prop_assert_eq!(g.cached_tokens % page_size == 0, g.copies.is_empty());
                                for c in &g.copies { device.copy(*c); }
                                let end = (g.cached_tokens + chunk).min(tokens.len());
                                device.step(&g.block_table, &tokens, g.cached_tokens, end).map_err(TestCaseError::fail)?;
                                commit(&mut pool, SeqId(seq), &k, end);
                                live.insert(seq, (tokens, end));
                            }
                            Err(_) => prop_assert_eq!(before, pool.available_pages()),
                        }
                    }
                    Op::Step { seq, n } => {
                        let Some((tokens, computed)) = live.get_mut(&seq) else { continue };
                        // Generated tokens extend the sequence; its K/V follow.
                        while tokens.len() < *computed + n { tokens.push((tokens.len() % 4) as u32); }
                        if pool.reserve(SeqId(seq), *computed + n).is_err() { continue; }
                        let table = pool.block_table(SeqId(seq)).unwrap().to_vec();
                        device.step(&table, tokens, *computed, *computed + n).map_err(TestCaseError::fail)?;
                        *computed += n;
                        commit(&mut pool, SeqId(seq), &keys(&hasher, tokens), *computed);
                    }
                    Op::Release { seq } => {
                        live.remove(&seq);
                        pool.release(SeqId(seq));
                    }
                    Op::Reset => { pool.reset_prefix_cache(); }
                }
                prop_assert!(pool.check_invariants().is_ok(), "{:?}", pool.check_invariants());
                prop_assert!(pool.stats().hit_tokens <= pool.stats().queried_tokens);
            }
            for seq in live.keys() { pool.release(SeqId(*seq)); }
            prop_assert_eq!(pool.used_pages(), 0);
            prop_assert_eq!(pool.free_pages() + pool.cached_pages(), 10);
            pool.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}
