//! `ModelExecutor`: the model, its device and the page tensors, on a thread of its own.
//!
//! Runs on a `SyncArbiter` because burn calls block; the async arbiters never wait on a kernel.
//! Plain-greedy rows take the device's argmax, plain temperature rows the device's draw when one
//! is set (CUDA); the others are sampled on the host from their logits rows (see `step_output`).
//! With tensor parallel the actor is rank 0 and drives the other ranks' threads with the same
//! plan (see `tp_ranks`). With one rank it may hold a step unread (`ExecuteStep::read_later`)
//! and issue the next one first, fed from the held step's ids on the device, so that the device
//! never waits for the host between steps; replies travel in a [`StepReceipt`] for that reason.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use burn::prelude::Backend;
use rayon::prelude::*;
use tokio::sync::oneshot;

use super::fault::{FaultInjector, FaultKind};
use super::step_output::{StepOutput, UnreadOutput};
use super::tp_ranks::{Rank, RankWorker, StepWork};
use crate::kv::{PageCopy, SeqId};
use crate::model::{FedTokens, Llama, PagedKvCache, SequenceChunk};
use crate::parallel::Communicator;
use crate::sampling::{self, SampledLogprobs, SamplingParams, TokenHistory};
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

/// The model's ranks: rank 0 here, ranks 1.. (tensor parallel) on worker threads.
pub struct ModelExecutor<B: Backend> {
    rank0: Rank<B>,
    workers: Vec<RankWorker>,
    /// Rank 0's communicator, to poison the group when rank 0 fails and to clear it once every
    /// rank has left a failed step.
    comm: Option<Arc<dyn Communicator>>,
    /// Set once a worker thread is gone: the group can no longer run a step.
    broken: Option<String>,
    /// The test-only fault hook (`INFERFLUX_FAULT_INJECTION=1`); dropped once it has failed a
    /// step, since this executor is then being replaced.
    fault: Option<Arc<FaultInjector>>,
    /// The last step read back, if it succeeded, and the tokens it sampled: the inputs of the
    /// next step's fed-back chunks when they are fed from the host (async scheduling).
    last_sampled: Option<(u64, HashMap<SeqId, u32>)>,
    /// A step queued on the device and not read back yet (`ExecuteStep::read_later`): read once
    /// the next step is queued behind it, or on `ReadHeldStep`.
    /// (Boxed: an actor is `Unpin`, burn's tensors need not be.)
    held: Option<Box<HeldStep<B>>>,
    steps_fed_on_device: u64,
}

/// A step queued on the device; its output is read back later.
struct IssuedStep<B: Backend> {
    step: u64,
    /// Per logits row, in row order: its sequence, sampling and generated index (for the rows the
    /// host samples).
    samplers: Vec<(SeqId, SamplingParams, usize)>,
    edits: Arc<[Vec<sampling::LogitEdit>]>,
    /// Per logits row: whether its edits name the fed token (`sampling::logit_edits_fed`), which
    /// the host takes from the step it follows when it samples the row itself.
    fed_edits: Vec<bool>,
    /// The step whose ids fed this one on the device, if any.
    fed_from: Option<u64>,
    output: IssuedOutput<B>,
}

enum IssuedOutput<B: Backend> {
    /// Tensor parallel reads every step back at once.
    Read(StepOutput),
    /// One rank: still on the device (none when the step ran no chunk).
    Unread(Option<UnreadOutput<B>>),
}

/// A step whose reply waits for its output to be read back.
struct HeldStep<B: Backend> {
    issued: IssuedStep<B>,
    reply: oneshot::Sender<StepReply>,
}

/// Copy a preempted sequence's pages to host memory before anything else in the step.
#[derive(Debug, Clone, PartialEq)]
pub struct SwapOut {
    pub seq: SeqId,
    pub pages: Vec<u32>,
}

impl<B: Backend> ModelExecutor<B> {
    /// One rank holding the whole model.
    pub fn new(model: Llama<B>, cache: PagedKvCache<B>) -> Self {
        Self {
            rank0: Rank::new(model, cache),
            workers: Vec::new(),
            comm: None,
            broken: None,
            fault: None,
            last_sampled: None,
            held: None,
            steps_fed_on_device: 0,
        }
    }

    /// Tensor parallel: `rank0` runs here, `workers` are ranks 1.. already on their threads,
    /// and `comm` is rank 0's communicator of their group.
    pub fn tensor_parallel(rank0: Rank<B>, workers: Vec<RankWorker>, comm: Arc<dyn Communicator>) -> Self {
        Self {
            rank0,
            workers,
            comm: Some(comm),
            broken: None,
            fault: None,
            last_sampled: None,
            held: None,
            steps_fed_on_device: 0,
        }
    }

    /// Chooses greedy and plain temperature rows' tokens on the device with `sampling`'s hooks
    /// (see `step_output`).
    pub fn with_device_sampling(mut self, sampling: crate::model::draw::DeviceSampling<B>) -> Self {
        self.rank0 = self.rank0.with_device_sampling(sampling);
        self
    }

    /// Arms the test-only fault hook on this executor's steps.
    pub fn with_fault(mut self, fault: Option<Arc<FaultInjector>>) -> Self {
        self.fault = fault;
        self
    }

    /// Queues one planned step on every rank, with the sampling of every chunk that wants a
    /// token (on rank 0), and reads nothing back unless tensor parallel runs it (see
    /// [`Self::finish_step`]). Before the model runs: swap-outs (their pages may be reused from the
    /// next step on), then page copies in grant order, then swap-ins. `fed` gives the last
    /// tokens of fed-back chunks from an earlier step's ids on the device (one rank only).
    fn issue_step(
        &mut self,
        step: u64,
        swap_out: Option<SwapOut>,
        plan: Vec<PlannedChunk>,
        fed: Option<FedTokens<B>>,
    ) -> Result<IssuedStep<B>, ExecutorError> {
        if let Some(why) = &self.broken {
            return Err(ExecutorError(why.clone()));
        }
        let cache_ps = self.rank0.cache_page_size();
        let restores: Vec<(SeqId, Vec<u32>)> = plan
            .iter()
            .filter(|c| c.swap_in)
            .map(|c| (c.seq, c.block_table[..c.start_pos.div_ceil(cache_ps)].to_vec()))
            .collect();
        // The plan's vectors move into the model's chunks; only what sampling needs stays.
        let mut samplers = Vec::new();
        let mut histories = Vec::new();
        // Per logits row: where its chunk's fed token is in `fed`'s ids, if the device feeds it.
        let mut fed_at = Vec::new();
        let fed_at_chunk: HashMap<usize, usize> =
            fed.iter().flat_map(|f| f.last_of_chunk.iter().copied()).collect();
        let copies: Vec<PageCopy> = plan.iter().flat_map(|c| c.page_copies.iter().copied()).collect();
        let chunks: Vec<SequenceChunk> = plan
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if c.wants_logits {
                    samplers.push((c.seq, c.sampling, c.generated_index));
                    fed_at.push(fed_at_chunk.get(&i).copied().filter(|_| c.history.is_some()));
                    histories.push(c.history);
                }
                SequenceChunk {
                    tokens: c.tokens,
                    start_pos: c.start_pos,
                    block_table: c.block_table,
                    wants_logits: c.wants_logits,
                }
            })
            .collect();
        let rows = samplers
            .iter()
            .map(|(_, params, n)| sampling::row_sampling(params, *n))
            .collect();
        // Made once: the device edits its copies with them, the host samples its rows with them.
        // A history whose last token the device feeds back lacks it: its edits name it instead.
        let edits: Arc<[Vec<sampling::LogitEdit>]> = samplers
            .iter()
            .zip(&histories)
            .zip(&fed_at)
            .map(|(((_, params, n), history), at)| match (history, at) {
                (Some(h), Some(_)) => sampling::logit_edits_fed(params, *n, h),
                _ => sampling::logit_edits(params, *n, history.as_ref()),
            })
            .collect();
        let fed_edits = fed_at.iter().map(Option::is_some).collect();
        let work = StepWork {
            swap_out: swap_out.map(|s| (s.seq, s.pages)),
            copies,
            restores,
            chunks,
            rows,
            edits: edits.clone(),
            fed_at: if fed.is_some() { fed_at } else { Vec::new() },
        };
        let output = if self.comm.is_some() {
            IssuedOutput::Read(self.run_ranks(work).map_err(ExecutorError)?)
        } else {
            IssuedOutput::Unread(self.rank0.issue(work, fed.as_ref()).map_err(ExecutorError)?)
        };
        Ok(IssuedStep {
            step,
            samplers,
            edits,
            fed_edits,
            fed_from: None,
            output,
        })
    }

    /// Reads an issued step back (waiting for the device) and samples the rows the device left
    /// to the host: one token per chunk that wanted one, in plan order. `fed` holds the tokens
    /// of the step it follows, for host rows whose edits name their fed token.
    fn finish_step(
        issued: IssuedStep<B>,
        fed: Option<&HashMap<SeqId, u32>>,
    ) -> Result<Vec<SampledToken>, ExecutorError> {
        let IssuedStep {
            samplers,
            edits,
            fed_edits,
            output,
            ..
        } = issued;
        let out = match output {
            IssuedOutput::Read(out) => out,
            IssuedOutput::Unread(unread) => Rank::<B>::read(unread).map_err(ExecutorError)?,
        };
        if out.device.len() != samplers.len() {
            return Err(ExecutorError(format!(
                "step returned {} logits rows for {} sampled chunks",
                out.device.len(),
                samplers.len()
            )));
        }
        // `chunks(0)` panics; a step with no host row never reads this iterator.
        let mut host_rows = out.host_rows.chunks_exact(out.vocab.max(1));
        let mut sampled = Vec::with_capacity(samplers.len());
        // The rows left to the host: (where in `sampled`, row, params, n, edits, fed token).
        let mut on_host = Vec::new();
        let device_logprobs = out.logprobs.into_iter().chain(std::iter::repeat(None));
        for (((((seq, params, n), chosen), logprobs), edits), fed_edits) in samplers
            .into_iter()
            .zip(out.device)
            .zip(device_logprobs)
            .zip(edits.iter())
            .zip(fed_edits.into_iter().chain(std::iter::repeat(false)))
        {
            let token = match chosen {
                Some(token) => token,
                None => {
                    let row = host_rows
                        .next()
                        .ok_or_else(|| ExecutorError("step returned too few host logits rows".into()))?;
                    let fed_token = match fed_edits {
                        false => None,
                        true => Some(*fed.and_then(|f| f.get(&seq)).ok_or_else(|| {
                            ExecutorError(format!("the fed token of sequence {seq} was never read back"))
                        })?),
                    };
                    on_host.push((sampled.len(), row, params, n, edits, fed_token));
                    // Drawn below.
                    0
                }
            };
            sampled.push(SampledToken { seq, token, logprobs });
        }
        // A row takes a millisecond or more with a large vocabulary (a pass for the
        // probabilities, one for `top_p`'s histogram, the draw), so the rows are drawn on
        // rayon's threads. Each draw has its own (seed, n) stream: the order they run in changes
        // no token.
        let drawn: Vec<sampling::Sampled> = on_host
            .par_iter()
            .map(|(_, row, params, n, edits, fed_token)| {
                sampling::sample_edited(row, params, *n, edits, *fed_token)
            })
            .collect();
        for ((at, ..), s) in on_host.iter().zip(drawn) {
            sampled[*at].token = s.token;
            sampled[*at].logprobs = s.logprobs;
        }
        Ok(sampled)
    }

    /// Reads `issued` back and remembers its tokens for the next step's host feed-back.
    fn finish_and_remember(&mut self, issued: IssuedStep<B>) -> StepReply {
        let step = issued.step;
        // A step fed on the device follows the last one read back (see `execute`).
        let fed = match (&self.last_sampled, issued.fed_from) {
            (Some((read, sampled)), Some(from)) if *read == from => Some(sampled),
            _ => None,
        };
        let result = Self::finish_step(issued, fed);
        self.last_sampled = result
            .as_ref()
            .ok()
            .map(|sampled| (step, sampled.iter().map(|s| (s.seq, s.token)).collect()));
        match &result {
            Ok(sampled) => tracing::debug!(step, sampled = sampled.len(), "step read back"),
            Err(e) => tracing::error!(step, error = %e, "step failed"),
        }
        result
    }

    /// Reads the held step back and replies with it; false if it failed (true when none is held).
    fn read_held(&mut self) -> bool {
        let Some(held) = self.held.take() else {
            return true;
        };
        let HeldStep { issued, reply } = *held;
        let result = self.finish_and_remember(issued);
        let ok = result.is_ok();
        // The scheduler may have stopped waiting (its executor was replaced).
        let _ = reply.send(result);
        ok
    }

    /// The fed-back inputs of `plan` as the held step's ids on the device, when that step is
    /// `follows` and the device chose every one of them. `None`: they are fed back from the
    /// host. (A penalty's history then lacks its last token: `issue_step` names it in the edits.)
    fn device_feed(&self, follows: u64, plan: &[PlannedChunk]) -> Option<FedTokens<B>> {
        let held = self.held.as_ref().filter(|h| h.issued.step == follows)?;
        let IssuedOutput::Unread(Some(unread)) = &held.issued.output else {
            return None;
        };
        let ids = unread.device_ids()?;
        let row_of: HashMap<SeqId, usize> = held
            .issued
            .samplers
            .iter()
            .enumerate()
            .map(|(row, (seq, ..))| (*seq, row))
            .collect();
        let last_of_chunk = plan
            .iter()
            .enumerate()
            .filter(|(_, c)| c.fed_back)
            .map(|(i, c)| {
                let at = row_of.get(&c.seq).and_then(|&row| unread.device_id_at(row));
                at.map(|at| (i, at))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FedTokens {
            ids: ids.clone(),
            last_of_chunk,
        })
    }

    /// Runs one planned step and reads it back (no step follows it on the device).
    pub fn run_step(
        &mut self,
        swap_out: Option<SwapOut>,
        plan: Vec<PlannedChunk>,
    ) -> Result<Vec<SampledToken>, ExecutorError> {
        let issued = self.issue_step(0, swap_out, plan, None)?;
        Self::finish_step(issued, None)
    }

    /// Puts the tokens that step `follows` sampled in place of the plan's fed-back ones (and at
    /// the end of their histories). Fails when that step is not the last one that succeeded here.
    fn feed_back(&self, follows: u64, plan: &mut [PlannedChunk]) -> Result<(), ExecutorError> {
        let sampled = match &self.last_sampled {
            Some((step, sampled)) if *step == follows => sampled,
            _ => {
                return Err(ExecutorError(format!(
                    "the step feeds back the tokens of step {follows}, which did not just run here"
                )))
            }
        };
        for chunk in plan.iter_mut().filter(|c| c.fed_back) {
            let token = *sampled.get(&chunk.seq).ok_or_else(|| {
                ExecutorError(format!(
                    "step {follows} sampled no token for sequence {}",
                    chunk.seq
                ))
            })?;
            if let Some(last) = chunk.tokens.last_mut() {
                *last = token;
            }
            if let Some(h) = &mut chunk.history {
                let tokens: Vec<u32> = h.tokens.iter().copied().chain([token]).collect();
                *h = TokenHistory {
                    tokens: Arc::from(tokens),
                    prompt_len: h.prompt_len,
                };
            }
            chunk.fed_back = false;
        }
        Ok(())
    }

    /// Runs `work` on every rank; the step fails if any rank failed.
    fn run_ranks(&mut self, work: StepWork) -> Result<StepOutput, String> {
        let Some(comm) = self.comm.clone() else {
            return self.rank0.run(work);
        };
        let mut started = 0;
        for w in &self.workers {
            if !w.start(work.clone()) {
                break;
            }
            started += 1;
        }
        let mine = if started == self.workers.len() {
            let r = self.rank0.run(work);
            if let Err(e) = &r {
                comm.poison(e);
            }
            r
        } else {
            // A rank is gone: release the ones that started and stop running steps.
            let why = format!("tensor parallel rank {} exited", started + 1);
            comm.poison(&why);
            self.broken = Some(why.clone());
            Err(why)
        };
        let others: Vec<Result<(), String>> = self.workers[..started].iter().map(|w| w.finish()).collect();
        // A worker's own failure explains rank 0's "group poisoned" better than rank 0 does.
        let failure = others.into_iter().find_map(Result::err);
        match (mine, failure) {
            (Ok(out), None) => Ok(out),
            (mine, failure) => {
                if self.broken.is_none() {
                    // Every rank has left the step: the group can run the next one.
                    comm.reset();
                }
                Err(failure.unwrap_or_else(|| mine.err().unwrap_or_default()))
            }
        }
    }
}

impl<B: Backend> Actor for ModelExecutor<B> {
    type Context = SyncContext<Self>;
}

/// What a step brings back: one sampled token per sequence whose chunk wanted logits, in plan
/// order.
pub type StepReply = Result<Vec<SampledToken>, ExecutorError>;

/// Where a step's reply comes once it is read back (at once, unless the step was held: see
/// [`ExecuteStep::read_later`]).
pub struct StepReceipt(pub oneshot::Receiver<StepReply>);

impl StepReceipt {
    /// Waits for the step's reply; an executor that stopped first fails the step.
    pub async fn reply(self) -> StepReply {
        self.0.await.unwrap_or_else(|_| {
            Err(ExecutorError(
                "the executor stopped before the step was read back".into(),
            ))
        })
    }
}

/// Compute one step of the batch plan.
#[derive(Message)]
#[rtype(result = "StepReceipt")]
pub struct ExecuteStep {
    pub step: u64,
    /// The step whose sampled tokens the plan's fed-back chunks take (async scheduling).
    pub follows: Option<u64>,
    /// The sender queues another step, or `ReadHeldStep`, behind this one: a single-rank
    /// executor may queue this step on the device and read it back only once the next one is
    /// queued behind it, taking that one's fed-back tokens from this one's ids on the device.
    pub read_later: bool,
    pub swap_out: Option<SwapOut>,
    pub plan: Vec<PlannedChunk>,
}

impl<B: Backend> Handler<ExecuteStep> for ModelExecutor<B> {
    type Result = MessageResult<ExecuteStep>;

    fn handle(&mut self, msg: ExecuteStep, _: &mut SyncContext<Self>) -> Self::Result {
        MessageResult(self.execute(msg))
    }
}

impl<B: Backend> ModelExecutor<B> {
    /// Runs `msg` (see [`ExecuteStep`]): the actor's handler, callable without a mailbox.
    pub fn execute(&mut self, msg: ExecuteStep) -> StepReceipt {
        let (reply, receipt) = oneshot::channel();
        let receipt = StepReceipt(receipt);
        if let Some(fault) = &self.fault {
            let (delay, due) = fault.on_step();
            std::thread::sleep(delay);
            match due {
                // Outside the step's catch_unwind: the thread dies and no reply ever comes.
                Some(FaultKind::Panic) => panic!("injected executor panic (step {})", msg.step),
                Some(FaultKind::Error) => {
                    // The scheduler replaces an executor whose step failed. A step queued behind
                    // this one still runs here, and must not take a fault armed for the
                    // replacement: this executor consults the hook no more.
                    self.fault = None;
                    self.read_held();
                    let e = ExecutorError(format!("injected executor error (step {})", msg.step));
                    tracing::error!(error = %e, "step failed");
                    self.last_sampled = None;
                    let _ = reply.send(Err(e));
                    return receipt;
                }
                None => {}
            }
        }
        let tokens: usize = msg.plan.iter().map(|c| c.tokens.len()).sum();
        let seqs = msg.plan.len();
        let span = tracing::debug_span!("step", step = msg.step, seqs = seqs, tokens);
        let _enter = span.enter();
        let started = std::time::Instant::now();
        let mut plan = msg.plan;
        // Fed from the held step's ids on the device when it can be; else that step is read
        // back first and its tokens go in from the host. (A step that feeds nothing back is
        // issued before the held one is read, too.)
        let fed = msg.follows.and_then(|follows| self.device_feed(follows, &plan));
        let fed_from_held = fed.is_some();
        if fed_from_held {
            self.steps_fed_on_device += 1;
            metrics::counter!("inferflux_steps_fed_on_device_total").increment(1);
        } else if msg.follows.is_some() {
            self.read_held();
        }
        let issued = match (msg.follows, fed_from_held) {
            (Some(follows), false) => self.feed_back(follows, &mut plan),
            _ => Ok(()),
        }
        .and_then(|()| self.issue_step(msg.step, msg.swap_out, plan, fed))
        .map(|issued| IssuedStep {
            fed_from: msg.follows.filter(|_| fed_from_held),
            ..issued
        });
        // The held step runs ahead of this one on the device: read it while this one runs.
        let held_ok = self.read_held();
        match issued {
            Ok(issued) if held_ok && msg.read_later && self.comm.is_none() => {
                self.held = Some(Box::new(HeldStep { issued, reply }))
            }
            Ok(issued) => {
                let result = if held_ok || !fed_from_held {
                    self.finish_and_remember(issued)
                } else {
                    self.last_sampled = None;
                    Err(ExecutorError(format!(
                        "step {} took its inputs from step {:?}, which failed",
                        msg.step, msg.follows
                    )))
                };
                let _ = reply.send(result);
            }
            Err(e) => {
                tracing::error!(error = %e, "step failed");
                self.last_sampled = None;
                let _ = reply.send(Err(e));
            }
        }
        metrics::histogram!("inferflux_step_duration_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("inferflux_batched_tokens_per_step").record(tokens as f64);
        metrics::histogram!("inferflux_batch_size").record(seqs as f64);
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "step handled");
        receipt
    }
}

/// Read back the step the executor holds, if any: the scheduler queues nothing behind it for
/// now and waits for its tokens.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReadHeldStep;

impl<B: Backend> Handler<ReadHeldStep> for ModelExecutor<B> {
    type Result = ();

    fn handle(&mut self, _: ReadHeldStep, _: &mut SyncContext<Self>) {
        self.read_held();
    }
}

impl<B: Backend> ModelExecutor<B> {
    /// [`ReadHeldStep`] without a mailbox.
    pub fn read_held_step(&mut self) {
        self.read_held();
    }

    /// Steps whose fed-back inputs came from the previous step's ids on the device.
    pub fn steps_fed_on_device(&self) -> u64 {
        self.steps_fed_on_device
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
        self.rank0.discard(msg.seq);
        for w in &self.workers {
            w.discard(msg.seq);
        }
    }
}

/// A running executor's mailboxes.
pub struct ExecutorAddrs {
    pub step: Recipient<ExecuteStep>,
    pub read_held: Recipient<ReadHeldStep>,
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
        read_held: addr.clone().recipient(),
        discard: addr.recipient(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KvStorage, ModelFiles, ModelSource};
    use burn::backend::Flex;
    use burn::tensor::DType;

    fn fixture_executor(fault: &Arc<FaultInjector>) -> ModelExecutor<Flex> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let files = ModelFiles::open(&ModelSource::Dir(dir)).unwrap();
        let index = files.checkpoint.index().unwrap();
        let model =
            Llama::<Flex>::load_shard(&files.config, &index, &Default::default(), DType::F32, None).unwrap();
        let c = model.config();
        let cache = PagedKvCache::new(
            c.num_layers,
            4,
            16,
            model.kv_dim(),
            &Default::default(),
            DType::F32,
            KvStorage::Host,
        );
        ModelExecutor::new(model, cache).with_fault(Some(fault.clone()))
    }

    fn run_empty_step(executor: &mut ModelExecutor<Flex>, step: u64) -> StepReply {
        let msg = ExecuteStep {
            step,
            follows: None,
            read_later: false,
            swap_out: None,
            plan: Vec::new(),
        };
        futures::executor::block_on(executor.execute(msg).reply())
    }

    /// A step queued behind a failed one runs on the executor being replaced; a fault armed in
    /// the meantime is the replacement's (the race behind a flaky `http_supervision` run).
    #[test]
    fn supervision_an_executor_whose_step_failed_leaves_later_faults_to_its_replacement() {
        let fault = Arc::new(FaultInjector::default());
        let mut failed = fixture_executor(&fault);
        assert!(run_empty_step(&mut failed, 1).is_ok());
        fault.arm(FaultKind::Error, 1);
        assert!(
            run_empty_step(&mut failed, 2).is_err(),
            "the armed fault fails the step"
        );
        fault.arm(FaultKind::Error, 1);
        assert!(
            run_empty_step(&mut failed, 3).is_ok(),
            "the stray step took the replacement's fault"
        );
        let mut replacement = fixture_executor(&fault);
        assert!(
            run_empty_step(&mut replacement, 4).is_err(),
            "the replacement's fault was lost"
        );
    }
}
