//! `KvPageManager`: owns the page pool, every block table and the prefix cache.

use actix::prelude::*;

use std::sync::Arc;

use crate::kv::{BlockHash, CachedPrefix, Grant, PagePool, PoolStats, SeqId, SwapSpace};
use crate::scheduler::{Candidate, PageCommit};

/// How many of the longest cached prefixes `/admin/kv` lists.
pub(crate) const REPORTED_PREFIXES: usize = 8;

pub struct KvPageManager {
    pool: PagePool,
    prefix_caching: bool,
    swap: SwapSpace,
    /// `replica="i"` on the gauges when the engine has several data-parallel replicas.
    labels: Vec<metrics::Label>,
}

impl KvPageManager {
    /// `swap_pages`: how many pages of K/V host memory may hold for swapped-out sequences.
    pub fn new(num_pages: usize, page_size: usize, prefix_caching: bool, swap_pages: usize) -> Self {
        Self {
            pool: PagePool::new(num_pages, page_size),
            prefix_caching,
            swap: SwapSpace::new(swap_pages),
            labels: Vec::new(),
        }
    }

    /// Labels this pool's series `replica="<replica>"`: one of several data-parallel replicas.
    pub fn with_replica_label(mut self, replica: usize) -> Self {
        self.labels = vec![metrics::Label::new("replica", replica.to_string())];
        self
    }

    fn publish(&self) {
        let (pool, l) = (&self.pool, &self.labels);
        let total = pool.num_pages() as f64;
        metrics::gauge!("inferflux_kv_cache_usage_perc", l.iter()).set(pool.used_pages() as f64 / total);
        metrics::gauge!("inferflux_kv_free_pages", l.iter()).set(pool.free_pages() as f64);
        metrics::gauge!("inferflux_kv_used_pages", l.iter()).set(pool.used_pages() as f64);
        metrics::gauge!("inferflux_kv_cached_pages", l.iter()).set(pool.cached_pages() as f64);
        let stats = pool.stats();
        metrics::counter!("inferflux_prefix_cache_queries_total", l.iter()).absolute(stats.queried_tokens);
        metrics::counter!("inferflux_prefix_cache_hits_total", l.iter()).absolute(stats.hit_tokens);
        metrics::counter!("inferflux_kv_evicted_pages_total", l.iter()).absolute(stats.evicted_pages);
        metrics::counter!("inferflux_kv_copied_pages_total", l.iter()).absolute(stats.copied_pages);
        metrics::gauge!("inferflux_kv_swap_used_pages", l.iter()).set(self.swap.used_pages() as f64);
        metrics::counter!("inferflux_kv_swapped_out_pages_total", l.iter())
            .absolute(self.swap.swapped_out_total());
        metrics::counter!("inferflux_kv_swapped_in_pages_total", l.iter())
            .absolute(self.swap.swapped_in_total());
    }
}

impl Actor for KvPageManager {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.publish();
    }
}

/// Get pages for a step's candidates. Running sequences are each tried; waiting ones in order
/// until the first that does not fit (first come, first served), and none at all once a running
/// one went without.
#[derive(Message)]
#[rtype(result = "Vec<Option<Grant>>")]
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
                let grant = c.reserve(&mut self.pool).ok();
                // A running sequence that starved will preempt someone: admit nobody new.
                admitting &= grant.is_some();
                if grant.is_some() && c.resumes_from_host() {
                    self.swap.swap_in(c.seq);
                }
                grant
            })
            .collect();
        self.publish();
        MessageResult(grants)
    }
}

/// How many leading pages of a prompt (`hashes`: its full pages' keys) this pool holds, for
/// data-parallel placement. Nothing is reserved: the scheduler's admission looks again.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CachedPages {
    pub hashes: Arc<[BlockHash]>,
}

impl Handler<CachedPages> for KvPageManager {
    type Result = usize;

    fn handle(&mut self, msg: CachedPages, _: &mut Context<Self>) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        self.pool.cached_prefix_tokens(&msg.hashes) / self.pool.page_size()
    }
}

/// Pages a finished step filled; they join the prefix cache.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CommitPages {
    pub commits: Vec<PageCommit>,
}

impl Handler<CommitPages> for KvPageManager {
    type Result = ();

    fn handle(&mut self, msg: CommitPages, _: &mut Context<Self>) {
        for c in msg.commits {
            self.pool.commit(c.seq, c.first, &c.hashes);
        }
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
        self.swap.forget(msg.seq);
        let freed = self.pool.release(msg.seq);
        tracing::debug!(seq = %msg.seq, freed, "released KV pages");
        self.publish();
    }
}

/// A running sequence was preempted for pages. With `swap`, and room in the swap space, its
/// pages holding `computed_tokens` are lent to the executor to copy out (the reply lists them)
/// before they go back to the pool; otherwise they are just released, to be recomputed.
#[derive(Message)]
#[rtype(result = "Option<Vec<u32>>")]
pub struct Preempt {
    pub seq: SeqId,
    pub computed_tokens: usize,
    pub swap: bool,
}

impl Handler<Preempt> for KvPageManager {
    type Result = Option<Vec<u32>>;

    fn handle(&mut self, msg: Preempt, _: &mut Context<Self>) -> Self::Result {
        let pages = self.pool.pages_for(msg.computed_tokens);
        let swapped = msg.swap
            && self.pool.block_table(msg.seq).is_some_and(|t| t.len() >= pages)
            && self.swap.swap_out(msg.seq, pages);
        let out = swapped.then(|| self.pool.block_table(msg.seq).map(|t| t[..pages].to_vec()));
        self.pool.release(msg.seq);
        self.publish();
        out.flatten()
    }
}

/// The pool as `/admin/kv` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct KvReportBody {
    pub page_size: usize,
    pub num_pages: usize,
    /// Pages held by running sequences.
    pub used_pages: usize,
    /// Unreferenced pages kept for prefix reuse.
    pub cached_pages: usize,
    pub free_pages: usize,
    /// `used_pages / num_pages`.
    pub usage: f64,
    pub prefix_caching: bool,
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    /// `hit / queried` tokens since start (0 before any query).
    pub prefix_cache_hit_rate: f64,
    pub evicted_pages: u64,
    pub copied_pages: u64,
    /// Host-memory budget for swapped-out sequences, in pages.
    pub swap_capacity_pages: usize,
    pub swap_used_pages: usize,
    pub swapped_out_pages: u64,
    pub swapped_in_pages: u64,
    pub largest_cached_prefixes: Vec<CachedPrefix>,
}

/// Snapshot of the pool for operators.
#[derive(Message)]
#[rtype(result = "KvReportBody")]
pub struct KvReport;

impl Handler<KvReport> for KvPageManager {
    type Result = MessageResult<KvReport>;

    fn handle(&mut self, _: KvReport, _: &mut Context<Self>) -> Self::Result {
        let pool = &self.pool;
        let PoolStats {
            queried_tokens,
            hit_tokens,
            evicted_pages,
            copied_pages,
        } = pool.stats();
        MessageResult(KvReportBody {
            page_size: pool.page_size(),
            num_pages: pool.num_pages(),
            used_pages: pool.used_pages(),
            cached_pages: pool.cached_pages(),
            free_pages: pool.free_pages(),
            usage: pool.used_pages() as f64 / pool.num_pages() as f64,
            prefix_caching: self.prefix_caching,
            prefix_cache_queried_tokens: queried_tokens,
            prefix_cache_hit_tokens: hit_tokens,
            prefix_cache_hit_rate: if queried_tokens == 0 {
                0.0
            } else {
                hit_tokens as f64 / queried_tokens as f64
            },
            evicted_pages,
            copied_pages,
            swap_capacity_pages: self.swap.capacity_pages(),
            swap_used_pages: self.swap.used_pages(),
            swapped_out_pages: self.swap.swapped_out_total(),
            swapped_in_pages: self.swap.swapped_in_total(),
            largest_cached_prefixes: pool.largest_prefixes(REPORTED_PREFIXES),
        })
    }
}

/// Forget every cached prefix; replies with the number of keys dropped.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ResetPrefixCache;

impl Handler<ResetPrefixCache> for KvPageManager {
    type Result = usize;

    fn handle(&mut self, _: ResetPrefixCache, _: &mut Context<Self>) -> usize {
        let dropped = self.pool.reset_prefix_cache();
        self.publish();
        dropped
    }
}

/// The executor failed and is replaced with a fresh, empty cache: every page becomes free,
/// the prefix cache (whose K/V lived in the old cache) is forgotten and so are swapped-out
/// sequences' host copies. Replies with how many block tables were dropped.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ResetAfterExecutorFailure;

impl Handler<ResetAfterExecutorFailure> for KvPageManager {
    type Result = usize;

    fn handle(&mut self, _: ResetAfterExecutorFailure, _: &mut Context<Self>) -> usize {
        let tables = self.pool.release_all();
        let keys = self.pool.reset_prefix_cache();
        self.swap.forget_all();
        tracing::info!(
            block_tables = tables,
            prefix_keys = keys,
            "KV pages reset after an executor failure"
        );
        self.publish();
        tables
    }
}
