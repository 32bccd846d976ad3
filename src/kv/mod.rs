//! The page pool: which KV pages are free and which sequence holds which, in order.
//!
//! Pure bookkeeping, driven by the `KvPageManager` actor; the page tensors themselves live in the
//! executor. Invariant: a page is either on the free list or held by exactly the block tables that
//! count it in `ref_counts`.

use std::collections::HashMap;

/// A sequence known to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Not enough free pages for the request; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache full: {needed} pages needed, {free} free")]
pub struct NoSpace {
    pub needed: usize,
    pub free: usize,
}

#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    free: Vec<u32>,
    ref_counts: Vec<u32>,
    tables: HashMap<SeqId, Vec<u32>>,
}

impl PagePool {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        Self {
            page_size,
            // Popped from the end: low page ids first.
            free: (0..num_pages as u32).rev().collect(),
            ref_counts: vec![0; num_pages],
            tables: HashMap::new(),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Grows `seq`'s block table to hold `total_tokens`, all or nothing, and returns it.
    pub fn reserve(&mut self, seq: SeqId, total_tokens: usize) -> Result<&[u32], NoSpace> {
        let have = self.tables.get(&seq).map_or(0, Vec::len);
        let needed = self.pages_for(total_tokens).saturating_sub(have);
        if needed > self.free.len() {
            return Err(NoSpace {
                needed,
                free: self.free.len(),
            });
        }
        let table = self.tables.entry(seq).or_default();
        for _ in 0..needed {
            let page = self.free.pop().expect("checked above");
            self.ref_counts[page as usize] += 1;
            table.push(page);
        }
        Ok(table)
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.tables.get(&seq).map(Vec::as_slice)
    }

    /// Returns every page of `seq` whose last holder it was; returns how many pages came back.
    pub fn release(&mut self, seq: SeqId) -> usize {
        let Some(table) = self.tables.remove(&seq) else {
            return 0;
        };
        let mut freed = 0;
        for page in table {
            let rc = &mut self.ref_counts[page as usize];
            *rc -= 1;
            if *rc == 0 {
                self.free.push(page);
                freed += 1;
            }
        }
        freed
    }

    /// Checks the pool invariants; used by tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counted = vec![0u32; self.ref_counts.len()];
        for table in self.tables.values() {
            for &p in table {
                counted[p as usize] += 1;
            }
        }
        if counted != self.ref_counts {
            return Err("ref counts differ from block tables".into());
        }
        for &p in &self.free {
            if self.ref_counts[p as usize] != 0 {
                return Err(format!("page {p} is free and referenced"));
            }
        }
        let used = self.ref_counts.iter().filter(|&&c| c > 0).count();
        if used + self.free.len() != self.ref_counts.len() {
            return Err("a page is neither free nor referenced, or free twice".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        #[test]
        fn paged_kv_pool_invariants_hold(ops in proptest::collection::vec((0u64..6, 0usize..80, any::<bool>()), 1..200)) {
            let mut pool = PagePool::new(12, 8);
            for (seq, tokens, release) in ops {
                if release {
                    pool.release(SeqId(seq));
                } else {
                    let before = pool.free_pages();
                    if pool.reserve(SeqId(seq), tokens).is_err() {
                        prop_assert_eq!(before, pool.free_pages());
                    } else {
                        prop_assert!(pool.block_table(SeqId(seq)).unwrap().len() * 8 >= tokens);
                    }
                }
                prop_assert!(pool.check_invariants().is_ok(), "{:?}", pool.check_invariants());
            }
            for seq in 0..6 { pool.release(SeqId(seq)); }
            prop_assert_eq!(pool.free_pages(), 12);
        }
    }
}
