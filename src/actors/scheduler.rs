//! `Scheduler`: the step loop. Reserve pages for the candidates, plan, execute, hand the sampled
//! tokens to the stop detector, repeat while there is work. With async scheduling the next step
//! is planned and queued at the executor while the current one runs (two steps in flight), so
//! that the executor never waits for the bookkeeping between steps; results are taken in step
//! order.
//! It also knows each sequence's `request_id` (for `/admin/requests/{id}/cancel`) and whether
//! the server is draining (no new requests admitted).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use actix::prelude::*;

use super::dp_router::{ReplicaReport, SequenceLeft};
use super::executor::{
    DiscardSwapped, ExecuteStep, ExecutorAddrs, ExecutorError, ReadHeldStep, RestartExecutor, SampledToken,
    SwapOut,
};
use super::kv_pages::{CommitPages, KvPageManager, Preempt, Release, ReserveStep, ResetAfterExecutorFailure};
use super::stop_detector::{Abort, FailSequence, PrefixCached, StepTokens, StopSequenceDetector, Untrack};
use crate::config::PreemptionMode;
use crate::kv::{Grant, SeqId};
use crate::scheduler::throughput::{Throughput, ThroughputWindow};
use crate::scheduler::{Candidate, ClientId, ClientReport, PlannedChunk, SchedulerCore, Sequence};

pub struct Scheduler {
    core: SchedulerCore,
    kv: Addr<KvPageManager>,
    executor: ExecutorAddrs,
    detector: Addr<StopSequenceDetector>,
    preemption: PreemptionMode,
    /// Steps are queued with `read_later` (async scheduling with overlapped steps): the
    /// executor may hold the last one until another is queued or `ReadHeldStep` comes.
    overlap_steps: bool,
    /// The last step queued went with `read_later`, and nothing has been queued behind it yet.
    executor_may_hold: bool,
    /// A step is being planned (its pages reserved, its preemption settled): one at a time.
    planning: bool,
    /// Steps planned whose results have not been taken yet.
    in_flight: usize,
    /// 2 with async scheduling (one step runs while the next is queued), else 1.
    max_in_flight: usize,
    steps: u64,
    /// Results that came back ahead of an earlier step's, by step number.
    returned: BTreeMap<u64, StepResult>,
    /// The step whose result is taken next.
    next_to_finish: u64,
    /// Bumped when the executor is replaced: results of steps planned before are dropped.
    epoch: u64,
    /// `request_id` -> sequence, and back, for every sequence the core holds.
    /// (The choices of an `n > 1` request share one id.)
    by_request: HashMap<String, Vec<SeqId>>,
    request_of: HashMap<SeqId, String>,
    /// Each sequence's request span, parent of the log lines about it.
    spans: HashMap<SeqId, tracing::Span>,
    /// New requests are refused (503) while set; what runs or waits finishes.
    draining: bool,
    /// Clients with a queue depth gauge, so that one that left is set back to 0.
    gauged_clients: HashSet<ClientId>,
    /// Tokens and requests per second over the last minute, for `/admin/metrics`.
    throughput: ThroughputWindow,
    /// Starts a fresh executor when the current one fails; `None`: failures are not supervised.
    restart: Option<RestartExecutor>,
    /// Executor failures since the last successful step.
    failures_in_a_row: u32,
    /// SIGTERM/SIGINT came: draining for good.
    shutting_down: bool,
    /// Told when a sequence leaves: the data-parallel router in front of this replica.
    router: Option<Recipient<SequenceLeft>>,
    /// `replica="i"` on the gauges when the engine has several data-parallel replicas.
    labels: Vec<metrics::Label>,
}

/// After this many executor failures without a successful step in between, the scheduler
/// stops admitting (as `/admin/drain` does; `/ready` answers 503) instead of trying forever.
pub const MAX_EXECUTOR_FAILURES_IN_A_ROW: u32 = 3;

/// What came back from one step.
struct StepResult {
    /// `Scheduler::epoch` when it was planned.
    epoch: u64,
    progress: Vec<(SeqId, usize)>,
    /// Tokens of prompts (and of recomputed sequences) the step ran, decode tokens excluded.
    prefill_tokens: usize,
    /// The sequence preempted in this step, and whether its K/V went to host memory.
    preempted: Option<(SeqId, bool)>,
    sampled: Result<Vec<SampledToken>, ExecutorError>,
}

/// A step planned, before it is queued at the executor.
#[derive(Default)]
struct PlannedStep {
    plan: Vec<PlannedChunk>,
    progress: Vec<(SeqId, usize)>,
    prefill_tokens: usize,
    /// The preemption to settle with the page manager first.
    preempt: Option<Preempt>,
    preempted: Option<(SeqId, bool)>,
    swap_out: Option<SwapOut>,
}

/// The sampled tokens the core kept (`kept`: those of sequences still running, in order), with
/// their logprobs. A sequence samples at most once per step, so matching in order is exact.
fn accepted(sampled: Vec<SampledToken>, kept: &[(SeqId, u32)]) -> Vec<SampledToken> {
    let mut kept = kept.iter().peekable();
    sampled
        .into_iter()
        .filter(|s| {
            let hit = kept
                .peek()
                .is_some_and(|&&(seq, token)| (seq, token) == (s.seq, s.token));
            if hit {
                kept.next();
            }
            hit
        })
        .collect()
}

impl Scheduler {
    pub fn new(
        core: SchedulerCore,
        kv: Addr<KvPageManager>,
        executor: ExecutorAddrs,
        detector: Addr<StopSequenceDetector>,
        preemption: PreemptionMode,
    ) -> Self {
        Self {
            core,
            kv,
            executor,
            detector,
            preemption,
            overlap_steps: false,
            executor_may_hold: false,
            planning: false,
            in_flight: 0,
            max_in_flight: 1,
            steps: 0,
            returned: BTreeMap::new(),
            next_to_finish: 1,
            epoch: 0,
            by_request: HashMap::new(),
            request_of: HashMap::new(),
            spans: HashMap::new(),
            draining: false,
            gauged_clients: HashSet::new(),
            throughput: ThroughputWindow::new(Instant::now()),
            restart: None,
            failures_in_a_row: 0,
            shutting_down: false,
            router: None,
            labels: Vec::new(),
        }
    }

    /// Plans the next step while the executor runs the current one (`scheduler.async_scheduling`).
    pub fn with_async_scheduling(mut self, on: bool) -> Self {
        self.max_in_flight = if on { 2 } else { 1 };
        self
    }

    /// With async scheduling, lets the executor queue step N+1 on the device before reading
    /// step N back, feeding N+1's decode inputs from N's ids there (`scheduler.overlap_steps`).
    pub fn with_overlapped_steps(mut self, on: bool) -> Self {
        self.overlap_steps = on;
        self
    }

    /// Nothing will be queued behind the last step for now: have the executor read it back.
    fn read_held_step(&mut self) {
        if std::mem::take(&mut self.executor_may_hold) {
            self.executor.read_held.do_send(ReadHeldStep);
        }
    }

    /// Tell `router` of every sequence that leaves this scheduler.
    pub fn with_router(mut self, router: Recipient<SequenceLeft>) -> Self {
        self.router = Some(router);
        self
    }

    /// Labels this scheduler's gauges `replica="<replica>"`: one of several data-parallel replicas.
    pub fn with_replica_label(mut self, replica: usize) -> Self {
        self.labels = vec![metrics::Label::new("replica", replica.to_string())];
        self
    }

    fn set_draining_gauge(&self) {
        let v = if self.draining { 1.0 } else { 0.0 };
        metrics::gauge!("inferflux_draining", self.labels.iter()).set(v);
    }

    /// Supervise the executor: when a step fails, restart it with `restart`.
    pub fn with_supervisor(mut self, restart: RestartExecutor) -> Self {
        self.restart = Some(restart);
        self
    }

    /// The executor failed (a step returned an error, or its thread died): every running
    /// sequence's K/V are lost or suspect, so each ends with an error; waiting ones stay queued
    /// (swapped ones will recompute). The page manager starts over with every page free, and a
    /// fresh executor takes over with the same weights.
    fn recover(&mut self, e: &ExecutorError) {
        let held = self.core.running_ids();
        let message = format!(
            "The model executor failed while running this request and was restarted; retry the request. ({e})"
        );
        for &seq in &held {
            self.core.remove(seq);
            self.forget(seq);
            self.detector.do_send(FailSequence {
                seq,
                message: message.clone(),
            });
        }
        let requeued_swapped = self.core.forget_executor_state();
        self.kv.do_send(ResetAfterExecutorFailure);
        // A step queued behind the failed one ran (or not) on the old executor, with pages the
        // reset just freed: its result means nothing now.
        self.epoch += 1;
        self.failures_in_a_row += 1;
        match &mut self.restart {
            Some(restart) => {
                self.executor = restart();
                self.executor_may_hold = false;
                metrics::counter!("inferflux_executor_restarts_total").increment(1);
                tracing::error!(
                    cause = %e,
                    failed_requests = held.len(),
                    waiting = self.core.num_waiting(),
                    requeued_swapped,
                    failures_in_a_row = self.failures_in_a_row,
                    "executor failed; restarted it with the loaded weights and an empty KV cache"
                );
            }
            None => tracing::error!(cause = %e, failed_requests = held.len(), "executor failed"),
        }
        if self.failures_in_a_row >= MAX_EXECUTOR_FAILURES_IN_A_ROW && !self.draining {
            self.draining = true;
            self.set_draining_gauge();
            tracing::error!(
                failures_in_a_row = self.failures_in_a_row,
                "the executor keeps failing: admitting no new requests (/ready answers 503) until an \
                 operator resumes with POST /admin/drain {{\"drain\": false}} or restarts the process"
            );
        }
    }

    fn publish(&mut self) {
        let l = &self.labels;
        metrics::gauge!("inferflux_num_requests_running", l.iter()).set(self.core.num_running() as f64);
        metrics::gauge!("inferflux_num_requests_waiting", l.iter()).set(self.core.num_waiting() as f64);
        metrics::gauge!("inferflux_num_requests_preempted", l.iter()).set(self.core.num_preempted() as f64);
        metrics::gauge!("inferflux_fairness_jain_index", l.iter()).set(self.core.fairness_index());
        let client_labels = |client: &ClientId| {
            let mut labels = l.clone();
            labels.push(metrics::Label::new("client", client.to_string()));
            labels
        };
        let mut seen = HashSet::new();
        for (client, depth) in self.core.client_depths() {
            metrics::gauge!("inferflux_client_queue_depth", client_labels(client)).set(depth as f64);
            seen.insert(client.clone());
        }
        for gone in self.gauged_clients.difference(&seen) {
            metrics::gauge!("inferflux_client_queue_depth", client_labels(gone)).set(0.0);
        }
        self.gauged_clients = seen;
    }

    /// Forgets the request id of a sequence that left the core.
    fn forget(&mut self, seq: SeqId) {
        if let Some(router) = &self.router {
            router.do_send(SequenceLeft { seq });
        }
        self.spans.remove(&seq);
        if let Some(id) = self.request_of.remove(&seq) {
            if let Some(seqs) = self.by_request.get_mut(&id) {
                seqs.retain(|&s| s != seq);
                if seqs.is_empty() {
                    self.by_request.remove(&id);
                }
            }
        }
    }

    /// The request span of `seq`, or a disabled one once it is gone.
    fn span_of(&self, seq: SeqId) -> tracing::Span {
        self.spans.get(&seq).cloned().unwrap_or_else(tracing::Span::none)
    }

    /// What `/admin/queue` shows.
    fn report(&self) -> QueueReportBody {
        QueueReportBody {
            running: self.core.num_running(),
            waiting: self.core.num_waiting(),
            preempted: self.core.num_preempted(),
            swapped: self.core.num_swapped(),
            draining: self.draining,
            steps: self.steps,
            preemptions_total: self.core.preemptions(),
            fairness_index: self.core.fairness_index(),
            clients: self.core.clients(),
            replicas: Vec::new(),
        }
    }

    /// Plans the next step unless one is being planned, enough are in flight or nothing is left
    /// to do: reserve pages, plan, settle a preemption with the page manager, queue the step at
    /// the executor. Every step planned ends in exactly one `step_returned`.
    fn maybe_step(&mut self, ctx: &mut Context<Self>) {
        // A step in flight is either the older of two (its reply comes when the executor takes
        // the newer one) or ends in `dispatch`.
        if self.planning || self.in_flight >= self.max_in_flight {
            return;
        }
        let candidates = if self.core.has_work() {
            self.core.candidates()
        } else {
            Vec::new()
        };
        if candidates.is_empty() {
            self.read_held_step();
            return;
        }
        self.planning = true;
        self.in_flight += 1;
        self.steps += 1;
        let (step, epoch) = (self.steps, self.epoch);
        let kv = self.kv.clone();
        let reserve = async move {
            kv.send(ReserveStep {
                candidates: candidates.clone(),
            })
            .await
            .map(|g| (candidates, g))
        };
        let fut = actix::fut::wrap_future::<_, Self>(reserve)
            .then(move |reserved, act, _| {
                let planned = if act.epoch == epoch {
                    Some(act.plan_step(reserved))
                } else {
                    act.release_stale_grants(reserved);
                    None
                };
                let kv = act.kv.clone();
                actix::fut::wrap_future(async move {
                    let mut planned = planned?;
                    if let Some(p) = planned.preempt.take() {
                        let seq = p.seq;
                        let pages = kv.send(p).await.ok().flatten();
                        planned.preempted = Some((seq, pages.is_some()));
                        planned.swap_out = pages.map(|pages| SwapOut { seq, pages });
                    }
                    Some(planned)
                })
            })
            .map(move |planned, act, ctx| {
                act.planning = false;
                act.dispatch(step, epoch, planned, ctx);
                act.maybe_step(ctx);
            });
        ctx.spawn(fut);
    }

    /// The executor failed while this step's pages were being reserved, and every sequence
    /// that ran is gone. The page manager's reset may have come before the reservation: give
    /// back what it granted. (The next reservation is sent after these releases.)
    fn release_stale_grants(&self, reserved: Result<(Vec<Candidate>, Vec<Option<Grant>>), MailboxError>) {
        let Ok((candidates, grants)) = reserved else {
            return;
        };
        for (cand, _) in candidates.iter().zip(grants).filter(|(_, g)| g.is_some()) {
            self.kv.do_send(Release { seq: cand.seq });
        }
    }

    /// Turns the page grants into the step's plan and tells the detector and the metrics of the
    /// admissions it made.
    fn plan_step(
        &mut self,
        reserved: Result<(Vec<Candidate>, Vec<Option<Grant>>), MailboxError>,
    ) -> PlannedStep {
        let (plan, victim) = match reserved {
            Ok((candidates, grants)) => self.core.plan(&candidates, grants),
            Err(e) => {
                tracing::error!(error = %e, "KV page manager unreachable");
                (Vec::new(), None)
            }
        };
        for seq in self.core.take_orphaned_grants() {
            // Cancelled or finished while its grant was on the way.
            tracing::debug!(seq = %seq, "releasing a grant nobody can use");
            self.kv.do_send(Release { seq });
        }
        for a in self.core.take_admissions() {
            metrics::histogram!("inferflux_client_wait_seconds", "client" => a.client.to_string())
                .record(a.waited.as_secs_f64());
            self.detector.do_send(PrefixCached {
                seq: a.seq,
                cached_tokens: a.cached_tokens,
            });
        }
        for (client, tokens) in self.core.take_served() {
            metrics::counter!("inferflux_client_tokens_served_total", "client" => client.to_string())
                .increment(tokens);
        }
        let preempt = victim.map(|seq| Preempt {
            seq,
            computed_tokens: self.core.preempted_tokens(seq),
            swap: self.preemption == PreemptionMode::Swap,
        });
        let progress = plan.iter().map(PlannedChunk::progress).collect();
        let prefill_tokens = plan
            .iter()
            .filter(|c| !(c.tokens.len() == 1 && c.wants_logits && c.generated_index > 0))
            .map(|c| c.tokens.len())
            .sum();
        PlannedStep {
            plan,
            progress,
            prefill_tokens,
            preempt,
            preempted: None,
            swap_out: None,
        }
    }

    /// Queues a planned step at the executor (at once, so that steps reach it in order) and
    /// arranges for its result. A step planned before the executor was replaced is dropped.
    fn dispatch(&mut self, step: u64, epoch: u64, planned: Option<PlannedStep>, ctx: &mut Context<Self>) {
        let planned = planned.filter(|_| self.epoch == epoch).unwrap_or_default();
        let PlannedStep {
            plan,
            progress,
            prefill_tokens,
            preempted,
            swap_out,
            ..
        } = planned;
        let request = if plan.is_empty() && swap_out.is_none() {
            self.read_held_step();
            None
        } else {
            // A fed-back token comes from the step queued just before this one.
            let follows = plan.iter().any(|c| c.fed_back).then(|| step - 1);
            let read_later = self.overlap_steps && self.max_in_flight > 1;
            self.executor_may_hold = read_later;
            Some(self.executor.step.send(ExecuteStep {
                step,
                follows,
                read_later,
                swap_out,
                plan,
            }))
        };
        let result = async move {
            let sampled = match request {
                None => Ok(Vec::new()),
                Some(request) => match request.await {
                    Ok(receipt) => receipt.reply().await,
                    Err(e) => Err(ExecutorError(format!("executor unreachable: {e}"))),
                },
            };
            StepResult {
                epoch,
                progress,
                prefill_tokens,
                preempted,
                sampled,
            }
        };
        let fut = actix::fut::wrap_future::<_, Self>(result).map(move |result, act, ctx| {
            act.step_returned(step, result, ctx);
        });
        ctx.spawn(fut);
    }

    /// Takes the results that are due, in step order, then plans what can be planned.
    fn step_returned(&mut self, step: u64, result: StepResult, ctx: &mut Context<Self>) {
        self.returned.insert(step, result);
        while let Some(result) = self.returned.remove(&self.next_to_finish) {
            self.next_to_finish += 1;
            self.in_flight -= 1;
            if result.epoch == self.epoch {
                self.finish_step(result);
            } else {
                tracing::debug!(
                    step,
                    "dropped the result of a step planned before the executor was replaced"
                );
            }
        }
        self.publish();
        self.maybe_step(ctx);
    }

    fn finish_step(&mut self, result: StepResult) {
        let StepResult {
            progress,
            prefill_tokens,
            preempted,
            sampled,
            ..
        } = result;
        if let Some((seq, swapped)) = preempted {
            let swapped = swapped && sampled.is_ok();
            let mode = if swapped { "swap" } else { "recompute" };
            tracing::info!(parent: &self.span_of(seq), seq = %seq, mode, "preempted for KV pages");
            metrics::counter!("inferflux_num_preemptions_total", "mode" => mode).increment(1);
            if self.core.is_waiting(seq) {
                self.core.settle_preemption(seq, swapped);
            } else if swapped {
                // Cancelled while being swapped out: drop the host copy. (A failed step resets
                // every page and replaces the executor, host copies included: see `recover`.)
                self.kv.do_send(Release { seq });
                self.executor.discard.do_send(DiscardSwapped { seq });
            }
        }
        match sampled {
            Ok(sampled) => {
                self.failures_in_a_row = 0;
                let pairs: Vec<(SeqId, u32)> = sampled.iter().map(|s| (s.seq, s.token)).collect();
                let outcome = self.core.complete(&progress, &pairs);
                self.throughput.record_step(
                    Instant::now(),
                    prefill_tokens as u64,
                    outcome.tokens.len() as u64,
                    outcome.finished.len() as u64,
                );
                if !outcome.commits.is_empty() {
                    self.kv.do_send(CommitPages {
                        commits: outcome.commits,
                    });
                }
                if !outcome.tokens.is_empty() {
                    self.detector.do_send(StepTokens {
                        tokens: accepted(sampled, &outcome.tokens),
                    });
                }
                for seq in outcome.finished {
                    self.forget(seq);
                    self.kv.do_send(Release { seq });
                }
            }
            Err(e) => self.recover(&e),
        }
    }

    /// Forgets a sequence that ended early; returns whether it was known.
    fn drop_sequence(&mut self, seq: SeqId) -> bool {
        let swapped = self.core.is_swapped(seq);
        if !self.core.remove(seq) {
            return false;
        }
        self.forget(seq);
        self.kv.do_send(Release { seq });
        if swapped {
            self.executor.discard.do_send(DiscardSwapped { seq });
        }
        self.publish();
        true
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// The waiting queue is full (429).
    #[error("waiting queue is full")]
    QueueFull,
    /// An operator drains the server (503).
    #[error("the server is draining")]
    Draining,
}

/// Admit a new, already tokenized sequence.
#[derive(Message)]
#[rtype(result = "Result<(), EnqueueError>")]
pub struct Enqueue {
    pub seq: Sequence,
    /// The id the client was given, for `/admin/requests/{id}/cancel`.
    pub request_id: String,
    /// The request's span, parent of the log lines about this sequence.
    pub span: tracing::Span,
}

impl Handler<Enqueue> for Scheduler {
    type Result = Result<(), EnqueueError>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        if self.draining {
            return Err(EnqueueError::Draining);
        }
        let seq = msg.seq.id;
        self.core.enqueue(msg.seq).map_err(|_| EnqueueError::QueueFull)?;
        self.request_of.insert(seq, msg.request_id.clone());
        self.spans.insert(seq, msg.span);
        self.by_request.entry(msg.request_id).or_default().push(seq);
        self.publish();
        self.maybe_step(ctx);
        Ok(())
    }
}

/// The client went away: drop the sequence and free its pages now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel {
    pub seq: SeqId,
}

impl Handler<Cancel> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: Cancel, _: &mut Context<Self>) {
        let span = self.span_of(msg.seq);
        if self.drop_sequence(msg.seq) {
            tracing::info!(parent: &span, seq = %msg.seq, "request cancelled");
            metrics::counter!("inferflux_requests_cancelled_total").increment(1);
            self.detector.do_send(Untrack { seq: msg.seq });
        }
    }
}

/// The stop detector ended a sequence (stop string, EOS, length) or its client is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SequenceFinished {
    pub seq: SeqId,
    /// The client hung up: a cancel, counted as one. The detector may notice the closed stream
    /// before the request's drop guard's `Cancel` arrives, which then finds nothing to cancel.
    pub client_gone: bool,
}

impl Handler<SequenceFinished> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: SequenceFinished, _: &mut Context<Self>) {
        let span = self.span_of(msg.seq);
        if !self.drop_sequence(msg.seq) {
            return;
        }
        match msg.client_gone {
            true => {
                tracing::info!(parent: &span, seq = %msg.seq, "request cancelled: client gone");
                metrics::counter!("inferflux_requests_cancelled_total").increment(1);
            }
            false => self.throughput.record_finished(Instant::now()),
        }
    }
}

/// An operator cancels a request by its id: its sequences (one per choice) leave at once, their
/// pages are freed, and the client gets `finish_reason: "abort"`. Replies whether the id was known.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CancelRequest {
    pub request_id: String,
}

impl Handler<CancelRequest> for Scheduler {
    type Result = bool;

    fn handle(&mut self, msg: CancelRequest, _: &mut Context<Self>) -> bool {
        let seqs = self.by_request.get(&msg.request_id).cloned().unwrap_or_default();
        let mut cancelled = false;
        for seq in seqs {
            let span = self.span_of(seq);
            if !self.drop_sequence(seq) {
                continue;
            }
            tracing::info!(parent: &span, seq = %seq, "request cancelled by an operator");
            metrics::counter!("inferflux_requests_cancelled_total").increment(1);
            self.detector.do_send(Abort { seq });
            cancelled = true;
        }
        cancelled
    }
}

/// Start (`drain: true`) or stop draining; replies with the queue afterwards.
#[derive(Message)]
#[rtype(result = "QueueReportBody")]
pub struct Drain {
    pub drain: bool,
}

impl Handler<Drain> for Scheduler {
    type Result = MessageResult<Drain>;

    fn handle(&mut self, msg: Drain, _: &mut Context<Self>) -> Self::Result {
        // A shutting-down server cannot be resumed.
        let drain = msg.drain || self.shutting_down;
        if self.draining != drain {
            tracing::info!(draining = drain, "drain state changed by an operator");
        }
        self.draining = drain;
        if !drain {
            self.failures_in_a_row = 0;
        }
        self.set_draining_gauge();
        MessageResult(self.report())
    }
}

/// Rates over the last minute, for `/admin/metrics`.
#[derive(Message)]
#[rtype(result = "Throughput")]
pub struct ThroughputReport;

impl Handler<ThroughputReport> for Scheduler {
    type Result = MessageResult<ThroughputReport>;

    fn handle(&mut self, _: ThroughputReport, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.throughput.snapshot(Instant::now()))
    }
}

/// SIGTERM/SIGINT: admit nothing new from now on (503); what runs or waits may finish. Replies
/// with the queue.
#[derive(Message)]
#[rtype(result = "QueueReportBody")]
pub struct BeginShutdown;

impl Handler<BeginShutdown> for Scheduler {
    type Result = MessageResult<BeginShutdown>;

    fn handle(&mut self, _: BeginShutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        self.draining = true;
        self.set_draining_gauge();
        MessageResult(self.report())
    }
}

/// The shutdown grace period is over: every sequence still running or waiting leaves now, its
/// pages are freed and its client gets an error with `message`. Replies with how many requests
/// were cancelled.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CancelAll {
    pub message: String,
}

impl Handler<CancelAll> for Scheduler {
    type Result = usize;

    fn handle(&mut self, msg: CancelAll, _: &mut Context<Self>) -> usize {
        let requests = self.by_request.len();
        for seq in self.core.all_ids() {
            if self.drop_sequence(seq) {
                self.detector.do_send(FailSequence {
                    seq,
                    message: msg.message.clone(),
                });
            }
        }
        requests
    }
}

/// The queues as `/admin/queue` shows them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueReportBody {
    pub running: usize,
    /// Waiting sequences, preempted ones included.
    pub waiting: usize,
    /// Waiting sequences that were preempted and resume first.
    pub preempted: usize,
    /// Preempted sequences whose K/V wait in host memory.
    pub swapped: usize,
    pub draining: bool,
    /// Steps started since the server started.
    pub steps: u64,
    pub preemptions_total: u64,
    /// Jain's index over the recent clients' served tokens divided by their weights.
    pub fairness_index: f64,
    pub clients: Vec<ClientReport>,
    /// Each data-parallel replica's share (only with `parallel.data_parallel_size > 1`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaReport>,
}

/// A snapshot of the queues.
#[derive(Message)]
#[rtype(result = "QueueReportBody")]
pub struct QueueReport;

impl Handler<QueueReport> for Scheduler {
    type Result = MessageResult<QueueReport>;

    fn handle(&mut self, _: QueueReport, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.report())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SampledLogprobs;

    #[test]
    fn sampling_logprobs_follow_the_tokens_the_core_kept() {
        let tok = |seq: u64, token: u32| SampledToken {
            seq: SeqId(seq),
            token,
            logprobs: Some(SampledLogprobs {
                logprob: -(seq as f32),
                top: Vec::new(),
            }),
        };
        let sampled = vec![tok(1, 5), tok(2, 5), tok(3, 9), tok(4, 1)];
        // Sequences 2 and 4 were cancelled while the step ran.
        let kept = [(SeqId(1), 5), (SeqId(3), 9)];
        assert_eq!(accepted(sampled.clone(), &kept), vec![tok(1, 5), tok(3, 9)]);
        assert_eq!(accepted(sampled, &[]), vec![]);
    }
}
