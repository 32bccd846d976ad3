//! `DpRouter`: the one front of the engine's data-parallel replicas (`parallel.data_parallel_size`).
//! Each replica is a whole engine (scheduler loop, KV pool, executor with its tensor-parallel
//! ranks); intake, the HTTP handlers and the shutdown talk to the router only, as if it were one
//! scheduler. With one replica it forwards.
//!
//! Placement (as SGLang's cache-aware router, but asking the live pools): a new sequence goes to
//! the replica whose KV pool holds the longest leading run of its full pages (the same
//! [`BlockHasher`] keys the pools use), else to the least loaded one (sequences it holds, running
//! or waiting), the lowest index on ties. Asking the pools costs one message per replica per
//! request but is exact: a prefix evicted from a pool no longer attracts requests there. The load
//! is the router's own count (placed, not yet left): every placement counts at once, so a burst
//! of requests spreads out rather than all seeing the same stale loads.
//!
//! Every sequence's replica is remembered until its scheduler reports it left
//! ([`SequenceLeft`]), so that a disconnect or a stop string reaches the replica holding it.
//! Operator messages (cancel by id, drain, shutdown, reports) go to every replica; the reports
//! are summed.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;
use futures::future::{join_all, LocalBoxFuture};

use super::kv_pages::{
    CachedPages, KvPageManager, KvReport, KvReportBody, ResetPrefixCache, REPORTED_PREFIXES,
};
use super::scheduler::{
    BeginShutdown, Cancel, CancelAll, CancelRequest, Drain, Enqueue, EnqueueError, QueueReport,
    QueueReportBody, Scheduler, SequenceFinished, ThroughputReport,
};
use crate::kv::{BlockHash, BlockHasher, SeqId};
use crate::scheduler::throughput::Throughput;
use crate::scheduler::ClientReport;

/// One replica's mailboxes.
#[derive(Clone)]
pub struct Replica {
    pub scheduler: Addr<Scheduler>,
    pub kv: Addr<KvPageManager>,
}

/// Why a sequence went to its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementReason {
    /// It held the longest cached prefix.
    Prefix,
    /// No replica held any of its pages: the one with the fewest sequences.
    LeastLoaded,
}

impl PlacementReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementReason::Prefix => "prefix",
            PlacementReason::LeastLoaded => "least_loaded",
        }
    }
}

/// Where a sequence goes: among the `open` replicas, the one with the most leading cached pages
/// (`matched`) if any holds one, the fewest sequences (`load`) breaking ties; else the least
/// loaded; the lowest index last. `None` when no replica is open.
pub fn place(matched: &[usize], load: &[usize], open: &[bool]) -> Option<(usize, PlacementReason)> {
    let open_replicas = || (0..load.len()).filter(|&r| open[r]);
    let best = open_replicas().map(|r| matched[r]).max()?;
    let reason = if best > 0 {
        PlacementReason::Prefix
    } else {
        PlacementReason::LeastLoaded
    };
    open_replicas()
        .filter(|&r| matched[r] == best)
        .min_by_key(|&r| (load[r], r))
        .map(|r| (r, reason))
}

/// Per-replica numbers in `/admin/queue` (only with more than one replica).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaReport {
    pub replica: usize,
    pub running: usize,
    pub waiting: usize,
    pub draining: bool,
    /// Sequences placed here for their cached prefix, and as the least loaded replica.
    pub placed_prefix: u64,
    pub placed_least_loaded: u64,
}

/// What the router tracks; shared by its in-flight placements (all on the router's thread).
#[derive(Debug, Default)]
struct Placements {
    owner: HashMap<SeqId, usize>,
    load: Vec<usize>,
    /// `[prefix, least_loaded]` placements per replica.
    placed: Vec<[u64; 2]>,
}

impl Placements {
    fn place(&mut self, seq: SeqId, replica: usize) {
        self.owner.insert(seq, replica);
        self.load[replica] += 1;
    }

    fn unplace(&mut self, seq: SeqId) -> Option<usize> {
        let r = self.owner.remove(&seq)?;
        self.load[r] -= 1;
        Some(r)
    }
}

pub struct DpRouter {
    replicas: Rc<[Replica]>,
    /// Keys the pages of a prompt as every replica's pool does; `None` with prefix caching off.
    hasher: Option<BlockHasher>,
    state: Rc<RefCell<Placements>>,
}

impl DpRouter {
    pub fn new(replicas: Vec<Replica>, hasher: Option<BlockHasher>) -> Self {
        let n = replicas.len();
        assert!(n > 0, "a router needs a replica");
        Self {
            replicas: replicas.into(),
            hasher,
            state: Rc::new(RefCell::new(Placements {
                owner: HashMap::new(),
                load: vec![0; n],
                placed: vec![[0; 2]; n],
            })),
        }
    }

    /// Sends `msg()` to every replica's scheduler and collects the answers (a replica that does
    /// not answer is left out).
    fn ask_all<M>(&self, msg: impl Fn() -> M) -> LocalBoxFuture<'static, Vec<M::Result>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Scheduler: Handler<M>,
    {
        let sends: Vec<_> = self.replicas.iter().map(|r| r.scheduler.send(msg())).collect();
        Box::pin(async move { join_all(sends).await.into_iter().filter_map(Result::ok).collect() })
    }

    /// The queue reports of every replica summed, with the per-replica view when there are several.
    fn merge_queues(&self, reports: Vec<QueueReportBody>) -> QueueReportBody {
        let state = self.state.borrow();
        merge_queue_reports(&reports, (self.replicas.len() > 1).then_some(&state.placed[..]))
    }
}

impl Actor for DpRouter {
    type Context = Context<Self>;
}

/// Sums replicas' queue reports: counts add up, the server drains when every replica does,
/// the fairness index is the worst replica's, clients are merged by name.
fn merge_queue_reports(reports: &[QueueReportBody], placed: Option<&[[u64; 2]]>) -> QueueReportBody {
    if let [one] = reports {
        if placed.is_none() {
            return one.clone();
        }
    }
    let mut clients: BTreeMap<String, ClientReport> = BTreeMap::new();
    for c in reports.iter().flat_map(|r| &r.clients) {
        clients
            .entry(c.client.clone())
            .and_modify(|m| {
                m.waiting += c.waiting;
                m.running += c.running;
                m.recent_tokens += c.recent_tokens;
                m.virtual_time = m.virtual_time.max(c.virtual_time);
            })
            .or_insert_with(|| c.clone());
    }
    let replicas = placed.map_or_else(Vec::new, |placed| {
        reports
            .iter()
            .zip(placed)
            .enumerate()
            .map(|(replica, (r, p))| ReplicaReport {
                replica,
                running: r.running,
                waiting: r.waiting,
                draining: r.draining,
                placed_prefix: p[0],
                placed_least_loaded: p[1],
            })
            .collect()
    });
    QueueReportBody {
        running: reports.iter().map(|r| r.running).sum(),
        waiting: reports.iter().map(|r| r.waiting).sum(),
        preempted: reports.iter().map(|r| r.preempted).sum(),
        swapped: reports.iter().map(|r| r.swapped).sum(),
        draining: !reports.is_empty() && reports.iter().all(|r| r.draining),
        steps: reports.iter().map(|r| r.steps).sum(),
        preemptions_total: reports.iter().map(|r| r.preemptions_total).sum(),
        fairness_index: reports.iter().map(|r| r.fairness_index).fold(1.0, f64::min),
        clients: clients.into_values().collect(),
        replicas,
    }
}

/// Sums replicas' pools: `/admin/kv` shows the engine's pages as one pool.
fn merge_kv_reports(mut reports: Vec<KvReportBody>) -> Option<KvReportBody> {
    if reports.len() <= 1 {
        return reports.pop();
    }
    let mut out = reports[0].clone();
    for r in &reports[1..] {
        out.num_pages += r.num_pages;
        out.used_pages += r.used_pages;
        out.cached_pages += r.cached_pages;
        out.free_pages += r.free_pages;
        out.prefix_cache_queried_tokens += r.prefix_cache_queried_tokens;
        out.prefix_cache_hit_tokens += r.prefix_cache_hit_tokens;
        out.evicted_pages += r.evicted_pages;
        out.copied_pages += r.copied_pages;
        out.swap_capacity_pages += r.swap_capacity_pages;
        out.swap_used_pages += r.swap_used_pages;
        out.swapped_out_pages += r.swapped_out_pages;
        out.swapped_in_pages += r.swapped_in_pages;
        out.largest_cached_prefixes
            .extend(r.largest_cached_prefixes.iter().cloned());
    }
    out.usage = out.used_pages as f64 / out.num_pages.max(1) as f64;
    out.prefix_cache_hit_rate = if out.prefix_cache_queried_tokens == 0 {
        0.0
    } else {
        out.prefix_cache_hit_tokens as f64 / out.prefix_cache_queried_tokens as f64
    };
    out.largest_cached_prefixes
        .sort_by_key(|p| std::cmp::Reverse(p.tokens));
    out.largest_cached_prefixes.truncate(REPORTED_PREFIXES);
    Some(out)
}

impl Handler<Enqueue> for DpRouter {
    type Result = ResponseFuture<Result<(), EnqueueError>>;

    fn handle(&mut self, mut msg: Enqueue, _: &mut Context<Self>) -> Self::Result {
        let (replicas, state) = (self.replicas.clone(), self.state.clone());
        let n = replicas.len();
        let seq = msg.seq.id;
        if n == 1 {
            state.borrow_mut().place(seq, 0);
            return Box::pin(async move {
                let result = replicas[0]
                    .scheduler
                    .send(msg)
                    .await
                    .unwrap_or(Err(EnqueueError::Draining));
                if result.is_err() {
                    state.borrow_mut().unplace(seq);
                }
                result
            });
        }
        // The scheduler's core keys the pages the same way; keyed here, it does not again.
        if let Some(h) = &self.hasher {
            h.extend(&mut msg.seq.block_hashes, &msg.seq.tokens);
        }
        let hashes: Arc<[BlockHash]> = msg.seq.block_hashes.as_slice().into();
        Box::pin(async move {
            let matched: Vec<usize> = if hashes.is_empty() {
                vec![0; n]
            } else {
                let asks = replicas.iter().map(|r| {
                    r.kv.send(CachedPages {
                        hashes: hashes.clone(),
                    })
                });
                join_all(asks).await.into_iter().map(|m| m.unwrap_or(0)).collect()
            };
            let mut open = vec![true; n];
            let mut refusal = EnqueueError::Draining;
            loop {
                // Decided and counted in one go on the router's thread: no other placement
                // sees the load without this one.
                let (r, reason) = {
                    let mut s = state.borrow_mut();
                    let Some(choice) = place(&matched, &s.load, &open) else {
                        return Err(refusal);
                    };
                    s.place(seq, choice.0);
                    choice
                };
                let attempt = Enqueue {
                    seq: msg.seq.clone(),
                    request_id: msg.request_id.clone(),
                    span: msg.span.clone(),
                };
                match replicas[r].scheduler.send(attempt).await {
                    Ok(Ok(())) => {
                        state.borrow_mut().placed[r][(reason == PlacementReason::LeastLoaded) as usize] += 1;
                        metrics::counter!(
                            "inferflux_dp_placements_total",
                            "replica" => r.to_string(),
                            "reason" => reason.as_str()
                        )
                        .increment(1);
                        tracing::info!(
                            parent: &msg.span,
                            seq = %seq,
                            replica = r,
                            reason = reason.as_str(),
                            cached_pages = matched[r],
                            "placed on a data-parallel replica"
                        );
                        return Ok(());
                    }
                    // Full or draining (or gone): another replica may take it.
                    Ok(Err(e)) => {
                        if e == EnqueueError::QueueFull {
                            refusal = e;
                        }
                    }
                    Err(e) => tracing::error!(replica = r, error = %e, "replica scheduler unreachable"),
                }
                state.borrow_mut().unplace(seq);
                open[r] = false;
            }
        })
    }
}

/// A replica's scheduler no longer holds `seq` (finished, cancelled or failed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SequenceLeft {
    pub seq: SeqId,
}

impl Handler<SequenceLeft> for DpRouter {
    type Result = ();

    fn handle(&mut self, msg: SequenceLeft, _: &mut Context<Self>) {
        self.state.borrow_mut().unplace(msg.seq);
    }
}

impl DpRouter {
    /// The scheduler of the replica holding `seq`, if it still does.
    fn owner(&self, seq: SeqId) -> Option<&Addr<Scheduler>> {
        let r = *self.state.borrow().owner.get(&seq)?;
        Some(&self.replicas[r].scheduler)
    }
}

impl Handler<Cancel> for DpRouter {
    type Result = ();

    fn handle(&mut self, msg: Cancel, _: &mut Context<Self>) {
        if let Some(s) = self.owner(msg.seq) {
            s.do_send(msg);
        }
    }
}

impl Handler<SequenceFinished> for DpRouter {
    type Result = ();

    fn handle(&mut self, msg: SequenceFinished, _: &mut Context<Self>) {
        if let Some(s) = self.owner(msg.seq) {
            s.do_send(msg);
        }
    }
}

impl Handler<CancelRequest> for DpRouter {
    type Result = ResponseFuture<bool>;

    /// The choices of an `n > 1` request may sit on several replicas: every replica is asked.
    fn handle(&mut self, msg: CancelRequest, _: &mut Context<Self>) -> Self::Result {
        let asks = self.ask_all(|| CancelRequest {
            request_id: msg.request_id.clone(),
        });
        Box::pin(async move { asks.await.into_iter().any(|known| known) })
    }
}

impl Handler<QueueReport> for DpRouter {
    type Result = ResponseActFuture<Self, QueueReportBody>;

    fn handle(&mut self, _: QueueReport, _: &mut Context<Self>) -> Self::Result {
        let asks = self.ask_all(|| QueueReport);
        Box::pin(actix::fut::wrap_future(asks).map(|reports, act: &mut Self, _| act.merge_queues(reports)))
    }
}

impl Handler<Drain> for DpRouter {
    type Result = ResponseActFuture<Self, QueueReportBody>;

    fn handle(&mut self, msg: Drain, _: &mut Context<Self>) -> Self::Result {
        let asks = self.ask_all(|| Drain { drain: msg.drain });
        Box::pin(actix::fut::wrap_future(asks).map(|reports, act: &mut Self, _| act.merge_queues(reports)))
    }
}

impl Handler<BeginShutdown> for DpRouter {
    type Result = ResponseActFuture<Self, QueueReportBody>;

    fn handle(&mut self, _: BeginShutdown, _: &mut Context<Self>) -> Self::Result {
        let asks = self.ask_all(|| BeginShutdown);
        Box::pin(actix::fut::wrap_future(asks).map(|reports, act: &mut Self, _| act.merge_queues(reports)))
    }
}

impl Handler<CancelAll> for DpRouter {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, msg: CancelAll, _: &mut Context<Self>) -> Self::Result {
        let asks = self.ask_all(|| CancelAll {
            message: msg.message.clone(),
        });
        Box::pin(async move { asks.await.into_iter().sum() })
    }
}

impl Handler<ThroughputReport> for DpRouter {
    type Result = ResponseFuture<Throughput>;

    fn handle(&mut self, _: ThroughputReport, _: &mut Context<Self>) -> Self::Result {
        let asks = self.ask_all(|| ThroughputReport);
        Box::pin(async move {
            let all = asks.await;
            let mut out = all.first().copied().unwrap_or(Throughput {
                window_seconds: 0.0,
                prompt_tokens_per_second: 0.0,
                generation_tokens_per_second: 0.0,
                finished_requests_per_second: 0.0,
                steps_per_second: 0.0,
            });
            for t in all.iter().skip(1) {
                out.window_seconds = out.window_seconds.max(t.window_seconds);
                out.prompt_tokens_per_second += t.prompt_tokens_per_second;
                out.generation_tokens_per_second += t.generation_tokens_per_second;
                out.finished_requests_per_second += t.finished_requests_per_second;
                out.steps_per_second += t.steps_per_second;
            }
            out
        })
    }
}

/// Every replica's pool summed as one, for `/admin/kv`; `None` when no page manager answered.
#[derive(Message)]
#[rtype(result = "Option<KvReportBody>")]
pub struct PoolsReport;

impl Handler<PoolsReport> for DpRouter {
    type Result = ResponseFuture<Option<KvReportBody>>;

    fn handle(&mut self, _: PoolsReport, _: &mut Context<Self>) -> Self::Result {
        let asks: Vec<_> = self.replicas.iter().map(|r| r.kv.send(KvReport)).collect();
        Box::pin(async move {
            let reports = join_all(asks).await.into_iter().filter_map(Result::ok).collect();
            merge_kv_reports(reports)
        })
    }
}

impl Handler<ResetPrefixCache> for DpRouter {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _: ResetPrefixCache, _: &mut Context<Self>) -> Self::Result {
        let asks: Vec<_> = self
            .replicas
            .iter()
            .map(|r| r.kv.send(ResetPrefixCache))
            .collect();
        Box::pin(async move { join_all(asks).await.into_iter().filter_map(Result::ok).sum() })
    }
}

#[cfg(test)]
mod tests {
    use super::PlacementReason::{LeastLoaded, Prefix};
    use super::*;

    #[test]
    fn parallel_data_placement_prefers_the_longest_cached_prefix_even_when_busier() {
        let open = [true; 3];
        assert_eq!(place(&[0, 3, 1], &[0, 9, 0], &open), Some((1, Prefix)));
        // Equal matches: the less loaded, then the lower index.
        assert_eq!(place(&[2, 2, 0], &[5, 4, 0], &open), Some((1, Prefix)));
        assert_eq!(place(&[2, 2, 0], &[4, 4, 0], &open), Some((0, Prefix)));
    }

    #[test]
    fn parallel_data_placement_without_a_match_takes_the_least_loaded_lowest_index() {
        let open = [true; 3];
        assert_eq!(place(&[0, 0, 0], &[2, 1, 1], &open), Some((1, LeastLoaded)));
        assert_eq!(place(&[0, 0, 0], &[0, 0, 0], &open), Some((0, LeastLoaded)));
        assert_eq!(place(&[0], &[7], &[true]), Some((0, LeastLoaded)));
    }

    #[test]
    fn parallel_data_placement_skips_replicas_that_refused() {
        // Replica 1 holds the prefix but is full: the best of the others.
        assert_eq!(
            place(&[0, 4, 1], &[0, 0, 3], &[true, false, true]),
            Some((2, Prefix))
        );
        assert_eq!(
            place(&[0, 4, 0], &[3, 0, 1], &[true, false, true]),
            Some((2, LeastLoaded))
        );
        assert_eq!(place(&[1, 1], &[0, 0], &[false, false]), None);
    }

    #[test]
    fn parallel_data_reports_sum_over_replicas() {
        let client = |name: &str, waiting, vt| ClientReport {
            client: name.into(),
            weight: 1.0,
            waiting,
            running: 1,
            virtual_time: vt,
            recent_tokens: 10.0,
        };
        let q = |running, draining, clients| QueueReportBody {
            running,
            waiting: 1,
            preempted: 0,
            swapped: 0,
            draining,
            steps: 5,
            preemptions_total: 1,
            fairness_index: if running == 2 { 0.5 } else { 1.0 },
            clients,
            replicas: Vec::new(),
        };
        let a = q(2, true, vec![client("a", 1, 3.0), client("b", 0, 1.0)]);
        let b = q(1, false, vec![client("a", 2, 5.0)]);
        let m = merge_queue_reports(&[a.clone(), b], Some(&[[1, 2], [3, 4]]));
        assert_eq!(
            (m.running, m.waiting, m.steps, m.preemptions_total),
            (3, 2, 10, 2)
        );
        assert!(!m.draining, "one replica still admits");
        assert_eq!(m.fairness_index, 0.5);
        assert_eq!(m.clients.len(), 2);
        assert_eq!((m.clients[0].waiting, m.clients[0].running), (3, 2));
        assert_eq!(m.clients[0].virtual_time, 5.0);
        assert_eq!(m.replicas.len(), 2);
        assert_eq!(
            (m.replicas[1].placed_prefix, m.replicas[1].placed_least_loaded),
            (3, 4)
        );
        // One replica: its report as it is.
        assert_eq!(merge_queue_reports(std::slice::from_ref(&a), None), a);
    }
}
