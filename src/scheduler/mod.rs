//! Scheduling policy as a plain struct: waiting and running queues, and one batch plan per step.
//!
//! Each step spends a token budget: first one decode token (or the next prompt chunk) for every
//! running sequence, oldest first, then prompt chunks of waiting sequences in arrival order while
//! the budget, `max_running` and KV pages last (continuous batching with chunked prefill). Waiting
//! sequences are admitted in weighted-fair order across clients ([`fair`]). When a
//! running sequence cannot get a page, the most recently admitted one is preempted: its pages are
//! released and it waits again at the front with every token it had, to be recomputed; its
//! output does not change.
//!
//! Every operation is O(log n) or O(1) per sequence touched, so one step costs O(batch): running
//! sequences sit in a map keyed by admission order (the newest is the last), waiting ones in a map
//! by id with per-client ordered queues beside it.
//!
//! Sequences carry the keys of their full pages ([`BlockHash`]); a sequence being admitted offers
//! them to the page pool, which hands back the longest cached prefix so those tokens are not
//! computed again. Pages that a step completed are committed back to the cache.

pub mod fair;
pub mod throughput;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::SchedulerConfig;
use crate::kv::{BlockHash, BlockHasher, Grant, NoSpace, PageCopy, PagePool, SeqId};
use crate::sampling::{SamplingParams, TokenHistory};
pub use fair::{ClientId, ClientReport};
use fair::{FairShare, QueueKey};

/// A sequence as the scheduler tracks it.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache once the steps planned so far have run.
    pub computed: usize,
    /// Tokens sampled by a step still running, whose values are not known yet (0 or 1; with
    /// async scheduling the next step is planned before the last one returns).
    pending: usize,
    /// Tokens whose K/V a step that returned has written: pages up to here go to the prefix cache.
    confirmed: usize,
    /// Preempted by a step still running: not admitted again until that step says whether its
    /// K/V were swapped out.
    settling: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keys of every full page of `tokens` (empty when prefix caching is off).
    pub block_hashes: Vec<BlockHash>,
    /// Prompt tokens served from the prefix cache at first admission (`usage.cached_tokens`).
    pub cached_tokens: Option<usize>,
    /// `computed` when last preempted, restored if its K/V were swapped out rather than dropped.
    preempted_computed: usize,
    /// Whose share it is served from.
    pub client: ClientId,
    /// Lower is sooner, among the same client's waiting sequences (vLLM's `priority`).
    pub priority: i64,
    /// Enqueue order, the tie-break after `priority`.
    arrival: u64,
    enqueued_at: Option<Instant>,
}

impl Sequence {
    /// A new sequence of prompt tokens, nothing computed yet.
    pub fn new(id: SeqId, prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            pending: 0,
            confirmed: 0,
            settling: false,
            max_tokens,
            sampling,
            block_hashes: Vec::new(),
            cached_tokens: None,
            preempted_computed: 0,
            client: Arc::from("anonymous"),
            priority: 0,
            arrival: 0,
            enqueued_at: None,
        }
    }

    /// Sets whose share the sequence is served from, and its priority within that share.
    pub fn with_client(mut self, client: ClientId, priority: i64) -> Self {
        self.client = client;
        self.priority = priority;
        self
    }

    fn queue_key(&self) -> QueueKey {
        (self.priority, self.arrival, self.id)
    }

    /// Generated tokens known so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Every token, the pending ones included: where the next chunk ends.
    fn len_with_pending(&self) -> usize {
        self.tokens.len() + self.pending
    }
}

/// One sequence's work in a step, before pages are granted.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub seq: SeqId,
    /// Whether it is running already (must be served, or something preempted).
    pub running: bool,
    /// Tokens in the cache before the step.
    pub computed: usize,
    /// Tokens the step computes (fewer when a prefix hit leaves fewer to do).
    pub chunk: usize,
    /// All tokens of the sequence.
    pub len: usize,
    /// Page keys to look up in the prefix cache (admissions only).
    pub prefix: Vec<BlockHash>,
}

impl Candidate {
    /// A waiting sequence whose K/V wait in host memory (swapped out when preempted).
    pub fn resumes_from_host(&self) -> bool {
        !self.running && self.computed > 0
    }

    /// Gets the candidate's pages from the pool: a running sequence grows its block table, a
    /// waiting one is admitted with whatever prefix the cache holds. All or nothing.
    pub fn reserve(&self, pool: &mut PagePool) -> Result<Grant, NoSpace> {
        if self.running || self.resumes_from_host() {
            let table = pool.reserve(self.seq, self.computed + self.chunk)?;
            return Ok(Grant {
                block_table: table.to_vec(),
                cached_tokens: self.computed,
                copies: Vec::new(),
            });
        }
        pool.admit(self.seq, &self.prefix, self.len, self.chunk)
    }
}

/// Full pages a step completed, for the prefix cache: pages `first..first + hashes.len()` of
/// `seq`'s block table.
#[derive(Debug, Clone, PartialEq)]
pub struct PageCommit {
    pub seq: SeqId,
    pub first: usize,
    pub hashes: Vec<BlockHash>,
}

/// Placeholder of a token that the previous step samples (see [`PlannedChunk::fed_back`]); out
/// of every vocabulary, so that one left in place fails loudly.
pub const FED_BACK: u32 = u32::MAX;

/// One sequence's work in a step, with its pages.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedChunk {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: Vec<u32>,
    pub wants_logits: bool,
    /// The last of `tokens` is [`FED_BACK`]: the token the previous step samples for this
    /// sequence, which the executor puts in its place (and at the end of `history`).
    pub fed_back: bool,
    pub sampling: SamplingParams,
    /// Index of the token this chunk samples among the generated ones.
    pub generated_index: usize,
    /// Every token of the sequence, for the penalties: only on a chunk that samples with a
    /// penalty on, so other chunks copy nothing.
    pub history: Option<TokenHistory>,
    /// Pages to copy before the step writes (copy-on-write of a shared prefix page).
    pub page_copies: Vec<PageCopy>,
    /// The sequence resumes from host memory: restore its first `start_pos` tokens' K/V into
    /// its block table before the step.
    pub swap_in: bool,
}

impl PlannedChunk {
    /// `(seq, tokens in the cache once the step ran)`: all `complete` needs, so the plan itself
    /// can move to the executor without a copy.
    pub fn progress(&self) -> (SeqId, usize) {
        (self.seq, self.start_pos + self.tokens.len())
    }
}

/// What the scheduler decided after a step's tokens came back.
#[derive(Debug, Default, PartialEq)]
pub struct StepOutcome {
    /// `(seq, token)` for every sampled token, in plan order.
    pub tokens: Vec<(SeqId, u32)>,
    /// Sequences that reached `max_tokens` and left the running set.
    pub finished: Vec<SeqId>,
    /// Pages the step filled, to offer to the prefix cache.
    pub commits: Vec<PageCommit>,
}

/// A first admission: how long it waited and how much of its prompt the prefix cache held.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub seq: SeqId,
    pub client: ClientId,
    pub cached_tokens: usize,
    pub waited: Duration,
}

#[derive(Debug)]
pub struct SchedulerCore {
    config: SchedulerConfig,
    /// Keys pages for prefix caching; `None` turns it off.
    hasher: Option<BlockHasher>,
    /// Every waiting sequence, preempted ones included.
    waiting: HashMap<SeqId, Sequence>,
    /// Preempted sequences, next to resume first; they go ahead of the fair queues.
    preempted: VecDeque<SeqId>,
    /// Keyed by admission order: the last one is preempted first.
    running: BTreeMap<u64, Sequence>,
    running_index: HashMap<SeqId, u64>,
    next_admission: u64,
    next_arrival: u64,
    fair: FairShare,
    preemptions: u64,
    /// First admissions since the last `take_admissions`.
    admissions: Vec<Admission>,
    /// Sequences granted pages in the last plan but gone by then (cancelled or finished while
    /// the grant was on its way): their pages must be released, or they would leak.
    orphaned_grants: Vec<SeqId>,
}

impl SchedulerCore {
    pub fn new(config: SchedulerConfig, hasher: Option<BlockHasher>) -> Self {
        let fair = FairShare::new(
            config.client_weights.clone(),
            config.fairness_half_life_steps as f64,
        );
        Self {
            config,
            hasher,
            waiting: HashMap::new(),
            preempted: VecDeque::new(),
            running: BTreeMap::new(),
            running_index: HashMap::new(),
            next_admission: 0,
            next_arrival: 0,
            fair,
            preemptions: 0,
            admissions: Vec::new(),
            orphaned_grants: Vec::new(),
        }
    }

    /// First admissions of the last plan, their prefix-cache hits and waits.
    /// Grants of the last plan that no known sequence can use; release their pages.
    pub fn take_orphaned_grants(&mut self) -> Vec<SeqId> {
        std::mem::take(&mut self.orphaned_grants)
    }

    pub fn take_admissions(&mut self) -> Vec<Admission> {
        std::mem::take(&mut self.admissions)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting sequences that were preempted (a subset of the waiting ones).
    pub fn num_preempted(&self) -> usize {
        self.preempted.len()
    }

    /// Preempted sequences whose K/V wait in host memory.
    pub fn num_swapped(&self) -> usize {
        self.preempted
            .iter()
            .filter(|id| self.waiting.get(id).is_some_and(|s| s.computed > 0))
            .count()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Jain's fairness index after the last step (see [`fair`]).
    pub fn fairness_index(&self) -> f64 {
        self.fair.jain()
    }

    /// Clients active recently, for `/admin/queue`.
    pub fn clients(&self) -> Vec<ClientReport> {
        self.fair.report()
    }

    /// `(client, waiting sequences)` of every client the fair share tracks.
    pub fn client_depths(&self) -> impl Iterator<Item = (&ClientId, usize)> {
        self.fair.clients().map(|(id, c)| (id, c.waiting))
    }

    /// Tokens computed per client since the last call.
    pub fn take_served(&mut self) -> HashMap<ClientId, u64> {
        self.fair.take_served()
    }

    /// Queues a new sequence; hands it back when the waiting queue is full.
    pub fn enqueue(&mut self, mut seq: Sequence) -> Result<(), Box<Sequence>> {
        if self.waiting.len() >= self.config.max_waiting {
            return Err(Box::new(seq));
        }
        if let Some(h) = &self.hasher {
            h.extend(&mut seq.block_hashes, &seq.tokens);
        }
        seq.arrival = self.next_arrival;
        self.next_arrival += 1;
        seq.enqueued_at = Some(Instant::now());
        self.fair.enqueue(&seq.client, seq.queue_key());
        self.waiting.insert(seq.id, seq);
        Ok(())
    }

    /// Takes `id` out of the preempted queue; whether it was there. The resuming sequence is
    /// almost always at the front, so this is O(1) in practice.
    fn unpreempt(&mut self, id: SeqId) -> bool {
        match self.preempted.iter().position(|&p| p == id) {
            Some(pos) => {
                self.preempted.remove(pos);
                true
            }
            None => false,
        }
    }

    /// Forgets a sequence (finished, cancelled or failed). Returns whether it was known.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(order) = self.running_index.remove(&id) {
            if let Some(seq) = self.running.remove(&order) {
                self.fair.remove(&seq.client, None, true);
            }
            return true;
        }
        let Some(seq) = self.waiting.remove(&id) else {
            return false;
        };
        let key = (!self.unpreempt(id)).then(|| seq.queue_key());
        self.fair.remove(&seq.client, key, false);
        true
    }

    fn chunk_len(seq: &Sequence, budget: usize) -> usize {
        (seq.len_with_pending() - seq.computed).min(budget)
    }

    /// The sequences that would run this step within the token budget: every running one
    /// first (a decode token or its next prompt chunk), then preempted ones, then waiting ones
    /// in weighted-fair order across clients.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut budget = self.config.max_batched_tokens;
        let mut out = Vec::new();
        let push = |out: &mut Vec<Candidate>, budget: &mut usize, seq: &Sequence, running: bool| {
            let n = Self::chunk_len(seq, *budget);
            if n == 0 {
                return false;
            }
            *budget -= n;
            out.push(Candidate {
                seq: seq.id,
                running,
                computed: seq.computed,
                chunk: n,
                len: seq.len_with_pending(),
                prefix: if running || seq.computed > 0 {
                    Vec::new()
                } else {
                    seq.block_hashes.clone()
                },
            });
            true
        };
        for seq in self.running.values() {
            // Its last token is being sampled: nothing left to do.
            if seq.generated() + seq.pending >= seq.max_tokens {
                continue;
            }
            if !push(&mut out, &mut budget, seq, true) {
                return out;
            }
        }
        let slots = self.config.max_running.saturating_sub(self.running.len());
        let resuming = self.preempted.len().min(slots);
        let fresh = self.fair.order(slots - resuming, |id| {
            self.waiting.get(&id).map_or(0, |s| s.tokens.len() - s.computed)
        });
        for id in self.preempted.iter().take(resuming).chain(&fresh) {
            let Some(seq) = self.waiting.get(id) else {
                continue;
            };
            // Preempted while a step ran: its token or its swap-out is not settled yet.
            if seq.pending > 0 || seq.settling {
                continue;
            }
            if !push(&mut out, &mut budget, seq, false) {
                break;
            }
        }
        out
    }

    /// Turns granted candidates into the step's plan. `grants[i]` holds the pages of
    /// `candidates[i]`, or `None` when they could not be had. Waiting sequences with pages
    /// are admitted, starting after their cached prefix. If a running sequence went without,
    /// the newest running sequence is preempted and returned, so that its pages can be released.
    /// The planned tokens are charged to their clients' fair shares.
    pub fn plan(
        &mut self,
        candidates: &[Candidate],
        grants: Vec<Option<Grant>>,
    ) -> (Vec<PlannedChunk>, Option<SeqId>) {
        let mut plan = Vec::new();
        let mut starved = false;
        for (cand, grant) in candidates.iter().zip(grants) {
            let Some(grant) = grant else {
                starved |= cand.running;
                continue;
            };
            let mut swap_in = false;
            if !cand.running {
                let Some(mut seq) = self.waiting.remove(&cand.seq) else {
                    self.orphaned_grants.push(cand.seq);
                    continue;
                };
                let key = (!self.unpreempt(seq.id)).then(|| seq.queue_key());
                self.fair.admit(&seq.client, key);
                swap_in = seq.computed > 0;
                seq.computed = grant.cached_tokens;
                seq.confirmed = grant.cached_tokens;
                if seq.cached_tokens.is_none() {
                    seq.cached_tokens = Some(grant.cached_tokens);
                    self.admissions.push(Admission {
                        seq: seq.id,
                        client: seq.client.clone(),
                        cached_tokens: grant.cached_tokens,
                        waited: seq.enqueued_at.map_or(Duration::ZERO, |t| t.elapsed()),
                    });
                }
                let order = self.next_admission;
                self.next_admission += 1;
                self.running_index.insert(seq.id, order);
                self.running.insert(order, seq);
            }
            let Some(seq) = self
                .running_index
                .get(&cand.seq)
                .and_then(|o| self.running.get(o))
            else {
                self.orphaned_grants.push(cand.seq);
                continue;
            };
            let end = (seq.computed + cand.chunk).min(seq.len_with_pending());
            let wants_logits = end == seq.len_with_pending();
            // A pending token is the last one, and only a running decode has one.
            let fed_back = end > seq.tokens.len();
            let mut tokens = seq.tokens[seq.computed..end.min(seq.tokens.len())].to_vec();
            if fed_back {
                tokens.push(FED_BACK);
            }
            // The token sampled next follows all of `tokens` (and the fed-back one, which the
            // executor appends): they are its whole history.
            let history = (wants_logits && seq.sampling.has_penalties()).then(|| TokenHistory {
                tokens: Arc::from(&seq.tokens[..]),
                prompt_len: seq.prompt_len,
            });
            plan.push(PlannedChunk {
                seq: seq.id,
                tokens,
                start_pos: seq.computed,
                block_table: grant.block_table,
                wants_logits,
                fed_back,
                sampling: seq.sampling.clone(),
                generated_index: seq.generated() + seq.pending,
                history,
                page_copies: grant.copies,
                swap_in,
            });
        }
        let victim = if starved { self.preempt_newest() } else { None };
        if let Some(v) = victim {
            plan.retain(|c| c.seq != v);
        }
        // The plan will run: the next plan starts where this one ends, and each sampling chunk
        // leaves a token pending until its step returns.
        for chunk in &plan {
            if let Some(seq) = self.running_mut(chunk.seq) {
                seq.computed = chunk.start_pos + chunk.tokens.len();
                seq.pending += usize::from(chunk.wants_logits);
                let client = seq.client.clone();
                self.fair.charge(&client, chunk.tokens.len());
            }
        }
        self.fair.end_step();
        (plan, victim)
    }

    /// Moves the newest running sequence to the front of the queue, to be recomputed unless
    /// `settle_preemption` says its K/V were swapped out.
    fn preempt_newest(&mut self) -> Option<SeqId> {
        let (_, mut seq) = self.running.pop_last()?;
        self.running_index.remove(&seq.id);
        seq.preempted_computed = seq.computed;
        seq.computed = 0;
        seq.settling = true;
        self.preemptions += 1;
        self.fair.preempt(&seq.client);
        let id = seq.id;
        self.preempted.push_front(id);
        self.waiting.insert(id, seq);
        Some(id)
    }

    /// Tokens whose K/V a just-preempted sequence had.
    pub fn preempted_tokens(&self, id: SeqId) -> usize {
        self.waiting.get(&id).map_or(0, |s| s.preempted_computed)
    }

    /// The step that preempted `id` returned; `swapped`: its K/V went to host memory, so it
    /// resumes where it stopped instead of from zero. Until then it is not admitted again.
    pub fn settle_preemption(&mut self, id: SeqId, swapped: bool) {
        if let Some(s) = self.waiting.get_mut(&id) {
            s.settling = false;
            if swapped {
                s.computed = s.preempted_computed;
            }
        }
    }

    /// Every running sequence: those whose K/V live in the device's cache.
    pub fn running_ids(&self) -> Vec<SeqId> {
        self.running.values().map(|s| s.id).collect()
    }

    /// Every sequence, running or waiting.
    pub fn all_ids(&self) -> Vec<SeqId> {
        self.running
            .values()
            .map(|s| s.id)
            .chain(self.waiting.keys().copied())
            .collect()
    }

    /// The executor was replaced: the host copies of swapped-out K/V are gone, and so are the
    /// tokens its steps were sampling. Waiting sequences recompute from their known tokens.
    /// Returns how many were swapped.
    pub fn forget_executor_state(&mut self) -> usize {
        let mut n = 0;
        for s in self.waiting.values_mut() {
            s.pending = 0;
            s.settling = false;
            if s.computed > 0 {
                s.computed = 0;
                n += 1;
            }
        }
        n
    }

    /// Whether `id` is in the waiting queue.
    pub fn is_waiting(&self, id: SeqId) -> bool {
        self.waiting.contains_key(&id)
    }

    /// Whether `id` waits with its K/V in host memory.
    pub fn is_swapped(&self, id: SeqId) -> bool {
        self.waiting.get(&id).is_some_and(|s| s.computed > 0)
    }

    fn running_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        let order = self.running_index.get(&id)?;
        self.running.get_mut(order)
    }

    /// Records a step that returned, in plan order: confirms each planned chunk's K/V (full
    /// pages go to the prefix cache) and appends the sampled tokens. Sequences removed while the
    /// step ran are skipped; one preempted meanwhile keeps its token.
    pub fn complete(&mut self, progress: &[(SeqId, usize)], sampled: &[(SeqId, u32)]) -> StepOutcome {
        let mut outcome = StepOutcome::default();
        let page_size = self.hasher.as_ref().map_or(1, BlockHasher::page_size);
        for &(id, computed) in progress {
            let Some(seq) = self.running_mut(id) else {
                continue;
            };
            let (was, now) = (seq.confirmed / page_size, computed / page_size);
            seq.confirmed = computed;
            let now = now.min(seq.block_hashes.len());
            if now > was {
                let hashes = seq.block_hashes[was..now].to_vec();
                outcome.commits.push(PageCommit {
                    seq: id,
                    first: was,
                    hashes,
                });
            }
        }
        for &(id, token) in sampled {
            let seq = match self.running_index.get(&id) {
                Some(order) => self.running.get_mut(order),
                None => self.waiting.get_mut(&id),
            };
            let Some(seq) = seq else {
                continue;
            };
            seq.pending = seq.pending.saturating_sub(1);
            seq.tokens.push(token);
            if let Some(h) = &self.hasher {
                h.extend(&mut seq.block_hashes, &seq.tokens);
            }
            let done = seq.generated() >= seq.max_tokens;
            outcome.tokens.push((id, token));
            if done {
                outcome.finished.push(id);
            }
        }
        for &id in &outcome.finished {
            self.remove(id);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::kv::PagePool;

    /// A scheduler without prefix caching and with these limits.
    fn core_with(max_batched_tokens: usize, max_running: usize, max_waiting: usize) -> SchedulerCore {
        let cfg = SchedulerConfig {
            max_batched_tokens,
            max_running,
            max_waiting,
            ..Default::default()
        };
        SchedulerCore::new(cfg, None)
    }

    fn seq(id: u64, prompt: usize, max_tokens: usize) -> Sequence {
        Sequence::new(
            SeqId(id),
            (0..prompt as u32).collect(),
            max_tokens,
            SamplingParams::default(),
        )
    }

    /// Runs steps against a real page pool with a fake model that samples `1000 + generated`.
    fn run(core: &mut SchedulerCore, pool: &mut PagePool, steps: usize) -> Vec<Vec<PlannedChunk>> {
        let mut plans = Vec::new();
        for _ in 0..steps {
            if !core.has_work() {
                break;
            }
            let cands = core.candidates();
            let grants = cands.iter().map(|c| c.reserve(pool).ok()).collect();
            let (plan, victim) = core.plan(&cands, grants);
            for seq in victim.into_iter().chain(core.take_orphaned_grants()) {
                pool.release(seq);
            }
            if let Some(seq) = victim {
                core.settle_preemption(seq, false);
            }
            let sampled: Vec<(SeqId, u32)> = plan
                .iter()
                .filter(|c| c.wants_logits)
                .map(|c| (c.seq, 1000 + c.generated_index as u32))
                .collect();
            let progress: Vec<_> = plan.iter().map(PlannedChunk::progress).collect();
            let outcome = core.complete(&progress, &sampled);
            for c in &outcome.commits {
                pool.commit(c.seq, c.first, &c.hashes);
            }
            for id in outcome.finished {
                pool.release(id);
            }
            pool.check_invariants().unwrap();
            plans.push(plan);
        }
        plans
    }

    #[test]
    fn unified_batch_chunks_long_prompts_and_keeps_decoding() {
        let mut core = core_with(8, 4, 8);
        let mut pool = PagePool::new(64, 4);
        core.enqueue(seq(1, 3, 10)).unwrap();
        let first = run(&mut core, &mut pool, 1);
        assert_eq!(first[0][0].tokens.len(), 3);
        core.enqueue(seq(2, 20, 2)).unwrap();
        let plans = run(&mut core, &mut pool, 4);
        for plan in &plans {
            assert_eq!(plan[0].seq, SeqId(1), "the running stream decodes every step");
            assert_eq!(plan[0].tokens.len(), 1);
            assert!(plan.iter().map(|c| c.tokens.len()).sum::<usize>() <= 8);
        }
        // 20 prompt tokens at 7 per step: chunks of 7, 7, 6, the last one samples.
        let chunks: Vec<(usize, bool)> = plans
            .iter()
            .filter_map(|p| p.get(1))
            .map(|c| (c.tokens.len(), c.wants_logits))
            .collect();
        assert_eq!(&chunks[..3], &[(7, false), (7, false), (6, true)]);
    }

    /// The executor as the async harness needs it: one token per page slot, written and read
    /// through the chunks' block tables; host copies of swapped-out sequences; and the tokens
    /// the last step sampled, which the next one feeds back.
    #[derive(Default)]
    struct FakeExecutor {
        slots: HashMap<usize, u32>,
        tables: HashMap<SeqId, Vec<u32>>,
        host: HashMap<SeqId, Vec<u32>>,
        last: HashMap<SeqId, u32>,
        fed_back: usize,
    }

    const FAKE_PAGE: usize = 2;

    impl FakeExecutor {
        fn slot(table: &[u32], pos: usize) -> usize {
            table[pos / FAKE_PAGE] as usize * FAKE_PAGE + pos % FAKE_PAGE
        }

        /// The tokens at positions `0..n` of `seq`, read through its block table.
        fn read(&self, table: &[u32], n: usize) -> Vec<u32> {
            (0..n).map(|p| self.slots[&Self::slot(table, p)]).collect()
        }

        /// Copies the first `n` tokens of a preempted sequence to host memory, before anything
        /// else in the step (its pages may be someone else's from then on).
        fn swap_out(&mut self, seq: SeqId, n: usize) {
            let table = self.tables[&seq].clone();
            self.host.insert(seq, self.read(&table, n));
        }

        /// Runs a step. A sample depends on every token before it, read back from the pages, so
        /// a wrong fed-back token, position, history or page changes everything after it.
        fn run(&mut self, plan: &[PlannedChunk]) -> Vec<(SeqId, u32)> {
            let mut sampled = Vec::new();
            for c in plan {
                if c.swap_in {
                    let host = self.host.remove(&c.seq).expect("a host copy to swap in");
                    assert_eq!(
                        host.len(),
                        c.start_pos,
                        "{} resumes where it was swapped out",
                        c.seq
                    );
                    for (p, t) in host.into_iter().enumerate() {
                        self.slots.insert(Self::slot(&c.block_table, p), t);
                    }
                }
                for (j, &t) in c.tokens.iter().enumerate() {
                    let last = c.fed_back && j + 1 == c.tokens.len();
                    let t = if last { self.last[&c.seq] } else { t };
                    assert_ne!(t, FED_BACK, "{}: a placeholder not fed back", c.seq);
                    self.slots.insert(Self::slot(&c.block_table, c.start_pos + j), t);
                }
                self.tables.insert(c.seq, c.block_table.clone());
                self.fed_back += usize::from(c.fed_back);
                let context = self.read(&c.block_table, c.start_pos + c.tokens.len());
                if let Some(h) = &c.history {
                    let mut full = h.tokens.to_vec();
                    if c.fed_back {
                        full.push(self.last[&c.seq]);
                    }
                    assert_eq!(full, context, "{}: the history is every token", c.seq);
                }
                if c.wants_logits {
                    let h = context
                        .iter()
                        .fold(0u64, |h, &t| (h * 31 + u64::from(t)) % 1_000_003);
                    sampled.push((c.seq, 1000 + (h % 97) as u32));
                }
            }
            self.last = sampled.iter().copied().collect();
            sampled
        }
    }

    /// Runs every sequence to its end with up to `depth` steps planned ahead of their results
    /// (2 is async scheduling: the next plan is made before the last step returned), preempting
    /// by swap or recompute. Returns each sequence's tokens, the steps planned while another was
    /// in flight, and the fed-back chunks.
    fn run_in_flight(
        core: &mut SchedulerCore,
        pool: &mut PagePool,
        depth: usize,
        swap: bool,
    ) -> (BTreeMap<SeqId, Vec<u32>>, usize, usize) {
        let mut exec = FakeExecutor::default();
        let mut in_flight: VecDeque<(Vec<PlannedChunk>, Option<SeqId>)> = VecDeque::new();
        let mut out: BTreeMap<SeqId, Vec<u32>> = BTreeMap::new();
        let mut overlapped = 0;
        for _ in 0..10_000 {
            if in_flight.len() < depth {
                let cands = core.candidates();
                if !cands.is_empty() {
                    let grants = cands.iter().map(|c| c.reserve(pool).ok()).collect();
                    let (plan, victim) = core.plan(&cands, grants);
                    for seq in victim.into_iter().chain(core.take_orphaned_grants()) {
                        pool.release(seq);
                    }
                    overlapped += usize::from(!in_flight.is_empty());
                    in_flight.push_back((plan, victim));
                    continue;
                }
            }
            let Some((plan, victim)) = in_flight.pop_front() else {
                break;
            };
            // The step that preempts by swap copies its victim's K/V out first.
            if let Some((v, n)) = victim.filter(|_| swap).map(|v| (v, core.preempted_tokens(v))) {
                exec.swap_out(v, n);
            }
            let sampled = exec.run(&plan);
            let progress: Vec<_> = plan.iter().map(PlannedChunk::progress).collect();
            let outcome = core.complete(&progress, &sampled);
            // As the scheduler actor does: a swapped victim that is no longer waiting was
            // cancelled meanwhile, and its pages go.
            if let Some(v) = victim {
                if core.is_waiting(v) {
                    core.settle_preemption(v, swap);
                } else if swap {
                    pool.release(v);
                }
            }
            for &(seq, t) in &outcome.tokens {
                out.entry(seq).or_default().push(t);
            }
            for id in outcome.finished {
                pool.release(id);
            }
            pool.check_invariants().unwrap();
        }
        assert!(!core.has_work() && in_flight.is_empty(), "everything finished");
        (out, overlapped, exec.fed_back)
    }

    /// Async scheduling plans step N+1 before step N's tokens are known: the decodes of N+1 take
    /// the tokens N samples from the executor. Outputs, histories and pages must be exactly those
    /// of planning one step at a time, through chunked prefill and preemption by swap and by
    /// recompute.
    #[test]
    fn unified_batch_async_scheduling_matches_one_step_at_a_time() {
        let penalised = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        };
        for swap in [false, true] {
            let mut outputs = Vec::new();
            for depth in [1, 2] {
                let mut core = core_with(8, 4, 16);
                // 12 pages of 2 tokens: not enough for all five at once, so some are preempted.
                let mut pool = PagePool::new(12, FAKE_PAGE);
                for id in 1..=5u64 {
                    let prompt: Vec<u32> = (0..(3 + 2 * id as u32)).map(|t| t * 7 + id as u32).collect();
                    let sampling = if id == 2 {
                        penalised.clone()
                    } else {
                        SamplingParams::default()
                    };
                    core.enqueue(Sequence::new(SeqId(id), prompt, 5 + id as usize, sampling))
                        .unwrap();
                }
                let (out, overlapped, fed_back) = run_in_flight(&mut core, &mut pool, depth, swap);
                assert!(
                    core.preemptions() > 0,
                    "swap {swap}, depth {depth}: something was preempted"
                );
                assert_eq!(
                    pool.free_pages(),
                    12,
                    "swap {swap}, depth {depth}: every page came back"
                );
                for id in 1..=5u64 {
                    assert_eq!(
                        out[&SeqId(id)].len(),
                        5 + id as usize,
                        "seq {id}: max_tokens tokens"
                    );
                }
                if depth == 2 {
                    assert!(
                        overlapped > 10 && fed_back > 10,
                        "planned ahead {overlapped}, fed back {fed_back}"
                    );
                } else {
                    assert_eq!((overlapped, fed_back), (0, 0));
                }
                outputs.push(out);
            }
            assert_eq!(outputs[0], outputs[1], "swap {swap}: the same tokens either way");
        }
    }

    #[test]
    fn unified_batch_preemption_keeps_outputs_and_frees_pages() {
        let mut core = core_with(64, 4, 8);
        // 6 pages of 2 tokens: three sequences of 3 + 6 tokens cannot all fit.
        let mut pool = PagePool::new(6, 2);
        for id in 1..=3 {
            core.enqueue(seq(id, 3, 6)).unwrap();
        }
        let plans = run(&mut core, &mut pool, 200);
        assert!(!core.has_work(), "everything finished");
        assert!(
            core.preemptions() > 0,
            "the pool was too small, something was preempted"
        );
        assert_eq!(pool.free_pages(), 6);
        // Every sequence sampled generated indices 0..6 exactly once each.
        for id in 1..=3 {
            let mut idx: Vec<usize> = plans
                .iter()
                .flatten()
                .filter(|c| c.seq == SeqId(id) && c.wants_logits)
                .map(|c| c.generated_index)
                .collect();
            idx.dedup();
            assert_eq!(idx, (0..6).collect::<Vec<_>>());
        }
    }

    #[test]
    fn unified_batch_2000_token_prompt_is_chunked_while_streams_decode_every_step() {
        let mut core = core_with(64, 8, 8);
        let mut pool = PagePool::new(1024, 16);
        for id in 1..=3 {
            core.enqueue(seq(id, 5, 200)).unwrap();
        }
        run(&mut core, &mut pool, 2);
        core.enqueue(seq(9, 2000, 4).with_client(Arc::from("other"), 0))
            .unwrap();
        let mut prefill_steps = 0;
        loop {
            let plan = &run(&mut core, &mut pool, 1)[0];
            // Each stream decodes one token in every step, ahead of the prompt chunk.
            let streams: Vec<_> = plan[..3].iter().map(|c| (c.seq.0, c.tokens.len())).collect();
            assert_eq!(streams, vec![(1, 1), (2, 1), (3, 1)]);
            let long = plan
                .iter()
                .find(|c| c.seq == SeqId(9))
                .expect("the prompt gets a chunk");
            assert_eq!(long.tokens.len(), (2000 - long.start_pos).min(61));
            prefill_steps += 1;
            if long.wants_logits {
                break;
            }
        }
        assert_eq!(prefill_steps, 2000usize.div_ceil(61));
    }

    #[test]
    fn unified_batch_late_client_is_served_before_the_backlog() {
        let mut core = core_with(64, 2, 100);
        let mut pool = PagePool::new(256, 4);
        let (a, b): (ClientId, ClientId) = (Arc::from("a"), Arc::from("b"));
        for id in 0..50 {
            core.enqueue(seq(id, 6, 4).with_client(a.clone(), 0)).unwrap();
        }
        run(&mut core, &mut pool, 3);
        for id in 100..105 {
            core.enqueue(seq(id, 6, 4).with_client(b.clone(), 0)).unwrap();
        }
        let mut finished = Vec::new();
        let mut jain_when_b_done = None;
        while core.has_work() {
            let before: Vec<SeqId> = core.running_index.keys().copied().collect();
            run(&mut core, &mut pool, 1);
            finished.extend(before.into_iter().filter(|s| !core.running_index.contains_key(s)));
            let b_busy = core
                .clients()
                .iter()
                .any(|c| c.client == "b" && c.waiting + c.running > 0);
            if !b_busy && jain_when_b_done.is_none() {
                jain_when_b_done = Some(core.fairness_index());
            }
        }
        let last_b = finished.iter().rposition(|s| s.0 >= 100).unwrap();
        let a_after_b = finished.len() - 1 - last_b;
        assert!(
            a_after_b >= 35,
            "B's requests were interleaved early: {finished:?}"
        );
        // B was served about as much as A while both had work (FIFO would give about 0.5).
        let jain = jain_when_b_done.unwrap();
        assert!(jain > 0.9, "{jain}");
    }

    /// The race the random-traffic HTTP test found: a sequence is cancelled after its candidate
    /// was listed but before the page manager granted it. The grant must come back as orphaned
    /// so its pages are released, for a waiting and for a running sequence.
    #[test]
    fn paged_kv_grant_for_a_sequence_cancelled_meanwhile_is_released() {
        let mut core = core_with(64, 4, 8);
        let mut pool = PagePool::new(16, 2);
        core.enqueue(seq(1, 3, 8)).unwrap();
        core.enqueue(seq(2, 3, 8)).unwrap();
        run(&mut core, &mut pool, 1);
        core.enqueue(seq(3, 5, 8)).unwrap();
        let cands = core.candidates();
        assert!(
            core.remove(SeqId(1)) && core.remove(SeqId(3)),
            "cancelled: one running, one waiting"
        );
        // The releases of the cancel reached the pool before the grants were made.
        pool.release(SeqId(1));
        pool.release(SeqId(3));
        let grants = cands.iter().map(|c| c.reserve(&mut pool).ok()).collect();
        let (plan, _) = core.plan(&cands, grants);
        assert_eq!(plan.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![SeqId(2)]);
        let mut orphans = core.take_orphaned_grants();
        orphans.sort();
        assert_eq!(orphans, vec![SeqId(1), SeqId(3)]);
        for o in orphans {
            pool.release(o);
        }
        pool.release(SeqId(2));
        assert_eq!(pool.used_pages(), 0, "no page is left to a forgotten sequence");
        pool.check_invariants().unwrap();
    }

    #[test]
    fn unified_batch_remove_works_in_every_state() {
        let mut core = core_with(64, 4, 8);
        // 4 pages of 2: two sequences of 3 prompt tokens fit, growing ones preempt.
        let mut pool = PagePool::new(4, 2);
        for id in 1..=3 {
            core.enqueue(seq(id, 3, 8)).unwrap();
        }
        let mut saw_preempted = false;
        for _ in 0..6 {
            run(&mut core, &mut pool, 1);
            saw_preempted |= core.num_preempted() > 0;
        }
        assert!(saw_preempted);
        for id in 1..=3 {
            let waiting = core.is_waiting(SeqId(id));
            assert!(core.remove(SeqId(id)), "seq {id} (waiting: {waiting})");
            if !waiting {
                pool.release(SeqId(id));
            }
            assert!(!core.remove(SeqId(id)));
        }
        assert!(!core.has_work());
        assert_eq!((core.num_waiting(), core.num_preempted()), (0, 0));
        assert!(core.clients().iter().all(|c| c.waiting + c.running == 0));
        pool.check_invariants().unwrap();
    }

    /// Penalties need the token history: planned only for a chunk that samples with a penalty
    /// on, and then it is the prompt plus every token generated so far, also after a preemption.
    #[test]
    fn sampling_history_is_planned_only_for_penalised_sampling_chunks() {
        let mut core = core_with(4, 4, 8);
        let mut pool = PagePool::new(6, 2);
        let penalised = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        };
        core.enqueue(Sequence::new(SeqId(1), vec![7, 8, 9, 10, 11, 12], 6, penalised))
            .unwrap();
        core.enqueue(seq(2, 3, 6)).unwrap();
        let plans = run(&mut core, &mut pool, 60);
        assert!(
            core.preemptions() > 0,
            "the pool was too small, something was preempted"
        );
        let chunks: Vec<&PlannedChunk> = plans.iter().flatten().collect();
        assert!(
            chunks.iter().any(|c| c.seq == SeqId(1) && !c.wants_logits),
            "a prefill chunk"
        );
        let mut sampled = 0;
        for c in chunks {
            match (c.seq, c.wants_logits) {
                (SeqId(1), true) => {
                    let h = c
                        .history
                        .as_ref()
                        .expect("a penalised sampling chunk has its history");
                    let generated: Vec<u32> = (0..c.generated_index as u32).map(|i| 1000 + i).collect();
                    assert_eq!(h.prompt_len, 6);
                    assert_eq!(&h.tokens[..6], &[7, 8, 9, 10, 11, 12]);
                    assert_eq!(h.generated(), &generated[..]);
                    sampled += 1;
                }
                _ => assert_eq!(c.history, None, "{:?}", (c.seq, c.wants_logits)),
            }
        }
        assert!(sampled >= 6);
    }

    #[test]
    fn full_waiting_queue_hands_the_request_back() {
        let mut core = core_with(8, 1, 1);
        core.enqueue(seq(1, 3, 1)).unwrap();
        assert_eq!(core.enqueue(seq(2, 3, 1)).unwrap_err().id, SeqId(2));
    }
}
