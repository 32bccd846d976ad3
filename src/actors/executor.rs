//! `ModelExecutor`: the model, its device and the page tensors, on a thread of its own.
//!
//! Runs on a `SyncArbiter` because burn calls block; the async arbiters never wait on a kernel.
//! Samples on the host from the returned logits rows.

use std::panic::AssertUnwindSafe;

use actix::prelude::*;
use burn::prelude::Backend;

use std::collections::HashMap;
use std::sync::Arc;

use super::fault::{FaultInjector, FaultKind};
use crate::kv::{PageCopy, SeqId};
use crate::model::{HostPages, Llama, PagedKvCache, SequenceChunk};
use crate::sampling::{self, SampledLogprobs};
use crate::scheduler::PlannedChunk;

/// A token sampled for a sequence in a step, with its logprobs when the request asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub seq: SeqId,
    pub token: u32,
    pub logprobs: Option<SampledLogprobs>,
}

/// A step failed on the device; every sequence in it is failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("model step failed: {0}")]
pub struct ExecutorError(pub String);

/// Fields are boxed because actors must be `Unpin` and burn's tensor types need not be.
pub struct ModelExecutor<B: Backend> {
    model: Box<Llama<B>>,
    cache: Box<PagedKvCache<B>>,
    /// K/V of preempted sequences swapped out to host memory, until they resume or end.
    swapped: HashMap<SeqId, HostPages>,
    /// The test-only fault hook (`INFERFLUX_FAULT_INJECTION=1`).
    fault: Option<Arc<FaultInjector>>,
}

/// Copy a preempted sequence's pages to host memory before anything else in the step.
#[derive(Debug, Clone, PartialEq)]
pub struct SwapOut {
    pub seq: SeqId,
    pub pages: Vec<u32>,
}

impl<B: Backend> ModelExecutor<B> {
    pub fn new(model: Llama<B>, cache: PagedKvCache<B>, fault: Option<Arc<FaultInjector>>) -> Self {
        Self {
            model: Box::new(model),
            cache: Box::new(cache),
            swapped: HashMap::new(),
            fault,
        }
    }

    /// Runs one planned step and samples a token for every chunk that wants one. Before the
    /// model runs: swap-outs (their pages may be reused from the next step on), then page copies
    /// in grant order, then swap-ins.
    pub fn run_step(
        &mut self,
        swap_out: Option<SwapOut>,
        plan: Vec<PlannedChunk>,
    ) -> Result<Vec<SampledToken>, ExecutorError> {
        let cache_ps = self.cache.page_size();
        let restores: Vec<(SeqId, Vec<u32>)> = plan
            .iter()
            .filter(|c| c.swap_in)
            .map(|c| (c.seq, c.block_table[..c.start_pos.div_ceil(cache_ps)].to_vec()))
            .collect();
        // The plan's vectors move into the model's chunks; only what sampling needs stays.
        let mut samplers = Vec::new();
        let copies: Vec<PageCopy> = plan.iter().flat_map(|c| c.page_copies.iter().copied()).collect();
        let chunks: Vec<SequenceChunk> = plan
            .into_iter()
            .map(|c| {
                if c.wants_logits {
                    samplers.push((c.seq, c.sampling, c.generated_index, c.history));
                }
                SequenceChunk {
                    tokens: c.tokens,
                    start_pos: c.start_pos,
                    block_table: c.block_table,
                    wants_logits: c.wants_logits,
                }
            })
            .collect();
        let (model, cache, swapped) = (&*self.model, &mut *self.cache, &mut self.swapped);
        let logits = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if let Some(out) = swap_out {
                swapped.insert(out.seq, cache.read_pages(&out.pages));
            }
            // In grant order: a page freed by one copy's source can only be the destination of
            // a later one.
            for c in &copies {
                cache.copy_page(c.src, c.dst);
            }
            for (seq, pages) in restores {
                let host = swapped
                    .remove(&seq)
                    .ok_or_else(|| format!("no swapped K/V for sequence {seq}"))?;
                cache.write_pages(&pages, host);
            }
            if chunks.is_empty() {
                return Ok((0, 1, Vec::new()));
            }
            let t = model.forward(cache, &chunks);
            let [rows, vocab] = t.dims();
            t.into_data()
                .to_vec::<f32>()
                .map(|v| (rows, vocab, v))
                .map_err(|e| format!("{e:?}"))
        }))
        .map_err(|p| ExecutorError(panic_message(p)))?
        .map_err(ExecutorError)?;
        let (_, vocab, values) = logits;
        Ok(samplers
            .into_iter()
            .zip(values.chunks_exact(vocab))
            .map(|((seq, params, n, history), row)| {
                let s = sampling::sample(row, &params, n, history.as_ref());
                SampledToken {
                    seq,
                    token: s.token,
                    logprobs: s.logprobs,
                }
            })
            .collect())
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

impl<B: Backend> Actor for ModelExecutor<B> {
    type Context = SyncContext<Self>;
}

/// Compute one step of the batch plan; the reply holds one sampled token per sequence whose
/// chunk wanted logits, in plan order.
#[derive(Message)]
#[rtype(result = "Result<Vec<SampledToken>, ExecutorError>")]
pub struct ExecuteStep {
    pub step: u64,
    pub swap_out: Option<SwapOut>,
    pub plan: Vec<PlannedChunk>,
}

impl<B: Backend> Handler<ExecuteStep> for ModelExecutor<B> {
    type Result = Result<Vec<SampledToken>, ExecutorError>;

    fn handle(&mut self, msg: ExecuteStep, _: &mut SyncContext<Self>) -> Self::Result {
        if let Some(fault) = &self.fault {
            let (delay, due) = fault.on_step();
            std::thread::sleep(delay);
            match due {
                // Outside the step's catch_unwind: the thread dies and the reply never comes.
                Some(FaultKind::Panic) => panic!("injected executor panic (step {})", msg.step),
                Some(FaultKind::Error) => {
                    let e = ExecutorError(format!("injected executor error (step {})", msg.step));
                    tracing::error!(error = %e, "step failed");
                    return Err(e);
                }
                None => {}
            }
        }
        let tokens: usize = msg.plan.iter().map(|c| c.tokens.len()).sum();
        let seqs = msg.plan.len();
        let span = tracing::debug_span!("step", step = msg.step, seqs = seqs, tokens);
        let _enter = span.enter();
        let started = std::time::Instant::now();
        let result = self.run_step(msg.swap_out, msg.plan);
        metrics::histogram!("inferflux_step_duration_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("inferflux_batched_tokens_per_step").record(tokens as f64);
        metrics::histogram!("inferflux_batch_size").record(seqs as f64);
        match &result {
            Ok(sampled) => tracing::debug!(
                sampled = sampled.len(),
                ms = started.elapsed().as_millis() as u64,
                "step done"
            ),
            Err(e) => tracing::error!(error = %e, "step failed"),
        }
        result
    }
}

/// A swapped-out sequence ended before resuming: drop its host copy.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DiscardSwapped {
    pub seq: SeqId,
}

impl<B: Backend> Handler<DiscardSwapped> for ModelExecutor<B> {
    type Result = ();

    fn handle(&mut self, msg: DiscardSwapped, _: &mut SyncContext<Self>) {
        self.swapped.remove(&msg.seq);
    }
}

/// A running executor's mailboxes.
pub struct ExecutorAddrs {
    pub step: Recipient<ExecuteStep>,
    pub discard: Recipient<DiscardSwapped>,
}

/// Starts a fresh executor after a failure: the loaded weights (burn tensors are shared, so
/// nothing is read again) with a new, empty K/V cache. Held by the scheduler, its supervisor.
pub type RestartExecutor = Box<dyn FnMut() -> ExecutorAddrs>;

/// Starts an executor on a thread of its own. `make` runs on that thread, so a large cache is
/// allocated there rather than on an async arbiter.
pub fn spawn_executor<B: Backend>(make: impl FnOnce() -> ModelExecutor<B> + Send + 'static) -> ExecutorAddrs {
    // The SyncArbiter's factory is a `Fn`; the slot hands `make` over to its one call.
    let slot = std::sync::Mutex::new(Some(make));
    let addr = SyncArbiter::start(1, move || {
        let make = slot
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .expect("the executor is created once");
        make()
    });
    ExecutorAddrs {
        step: addr.clone().recipient(),
        discard: addr.recipient(),
    }
}
