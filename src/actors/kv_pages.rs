//! `KvPageManager`: owns the page pool and every block table.

use actix::prelude::*;

use crate::kv::{PagePool, SeqId};
use crate::scheduler::Candidate;

pub struct KvPageManager {
    pool: PagePool,
}

impl KvPageManager {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        Self {
            pool: PagePool::new(num_pages, page_size),
        }
    }

    fn publish(&self) {
        let total = self.pool.num_pages() as f64;
        let free = self.pool.free_pages() as f64;
        metrics::gauge!("inferflux_kv_cache_usage_perc").set((total - free) / total);
        metrics::gauge!("inferflux_kv_free_pages").set(free);
    }
}

impl Actor for KvPageManager {
    type Context = Context<Self>;
}

/// Grow the block tables of a step's candidates. Running sequences are each tried; waiting ones
/// in order until the first that does not fit (first come, first served), and none at all once
/// a running one went without.
#[derive(Message)]
#[rtype(result = "Vec<Option<Vec<u32>>>")]
pub struct ReserveStep {
    pub candidates: Vec<Candidate>,
}

impl Handler<ReserveStep> for KvPageManager {
    type Result = MessageResult<ReserveStep>;

    fn handle(&mut self, msg: ReserveStep, _: &mut Context<Self>) -> Self::Result {
        let mut admitting = true;
        let grants = msg
            .candidates
            .iter()
            .map(|c| {
                if !c.running && !admitting {
                    return None;
                }
                let grant = self.pool.reserve(c.seq, c.total_tokens).ok().map(<[u32]>::to_vec);
                // A running sequence that starved will preempt someone: admit nobody new.
                admitting &= grant.is_some();
                grant
            })
            .collect();
        self.publish();
        MessageResult(grants)
    }
}

/// Return a sequence's pages (finished, cancelled, failed or preempted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    pub seq: SeqId,
}

impl Handler<Release> for KvPageManager {
    type Result = ();

    fn handle(&mut self, msg: Release, _: &mut Context<Self>) {
        let freed = self.pool.release(msg.seq);
        tracing::debug!(seq = %msg.seq, freed, "released KV pages");
        self.publish();
    }
}

/// Pool occupancy, for tests and admin views.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct PoolUsage;

impl Handler<PoolUsage> for KvPageManager {
    type Result = MessageResult<PoolUsage>;

    fn handle(&mut self, _: PoolUsage, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.pool.free_pages(), self.pool.num_pages()))
    }
}
