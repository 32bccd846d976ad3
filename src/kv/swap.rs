//! Host-memory budget for swapped-out sequences (`scheduler.preemption = "swap"`).
//!
//! Bookkeeping only: the executor holds the bytes. A preempted sequence is swapped out only when
//! its pages fit in what is left of the budget; otherwise it is recomputed later.

use std::collections::HashMap;

use super::SeqId;

#[derive(Debug, Default)]
pub struct SwapSpace {
    capacity_pages: usize,
    used_pages: usize,
    swapped: HashMap<SeqId, usize>,
    swapped_out_total: u64,
    swapped_in_total: u64,
}

impl SwapSpace {
    pub fn new(capacity_pages: usize) -> Self {
        Self {
            capacity_pages,
            ..Self::default()
        }
    }

    pub fn capacity_pages(&self) -> usize {
        self.capacity_pages
    }

    pub fn used_pages(&self) -> usize {
        self.used_pages
    }

    /// Pages moved to host memory since start.
    pub fn swapped_out_total(&self) -> u64 {
        self.swapped_out_total
    }

    /// Pages brought back since start.
    pub fn swapped_in_total(&self) -> u64 {
        self.swapped_in_total
    }

    /// Reserves host room for `pages` pages of `seq`; false when they do not fit.
    pub fn swap_out(&mut self, seq: SeqId, pages: usize) -> bool {
        if pages == 0 || self.swapped.contains_key(&seq) || self.used_pages + pages > self.capacity_pages {
            return false;
        }
        self.used_pages += pages;
        self.swapped.insert(seq, pages);
        self.swapped_out_total += pages as u64;
        true
    }

    /// `seq` came back to device pages: frees its host room.
    pub fn swap_in(&mut self, seq: SeqId) -> Option<usize> {
        let pages = self.forget(seq)?;
        self.swapped_in_total += pages as u64;
        Some(pages)
    }

    /// The host copies were dropped (the executor was replaced): frees all host room.
    pub fn forget_all(&mut self) {
        self.swapped.clear();
        self.used_pages = 0;
    }

    /// `seq` ended while swapped out: frees its host room.
    pub fn forget(&mut self, seq: SeqId) -> Option<usize> {
        let pages = self.swapped.remove(&seq)?;
        self.used_pages -= pages;
        Some(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_kv_swap_space_is_bounded() {
        let mut s = SwapSpace::new(5);
        assert!(s.swap_out(SeqId(1), 3));
        assert!(!s.swap_out(SeqId(2), 3), "over the bound: recompute instead");
        assert!(s.swap_out(SeqId(2), 2));
        assert_eq!(s.used_pages(), 5);
        assert_eq!(s.swap_in(SeqId(1)), Some(3));
        assert_eq!(s.forget(SeqId(2)), Some(2));
        assert_eq!(s.forget(SeqId(2)), None);
        assert_eq!(
            (s.used_pages(), s.swapped_out_total(), s.swapped_in_total()),
            (0, 5, 3)
        );
    }
}
