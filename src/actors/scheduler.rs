//! `Scheduler`: the step loop. One step in flight at a time: reserve pages for the candidates,
//! plan, execute, hand the sampled tokens to the stop detector, repeat while there is work.

use actix::prelude::*;

use super::executor::{DiscardSwapped, ExecuteStep, ExecutorError, SwapOut};
use super::kv_pages::{CommitPages, KvPageManager, Preempt, Release, ReserveStep};
use super::stop_detector::{FailSequence, PrefixCached, StepTokens, StopSequenceDetector, Untrack};
use crate::config::PreemptionMode;
use crate::kv::SeqId;
use crate::scheduler::{PlannedChunk, SchedulerCore, Sequence};

pub struct Scheduler {
    core: SchedulerCore,
    kv: Addr<KvPageManager>,
    executor: Recipient<ExecuteStep>,
    discard_swapped: Recipient<DiscardSwapped>,
    detector: Addr<StopSequenceDetector>,
    preemption: PreemptionMode,
    step_in_flight: bool,
    steps: u64,
}

/// What came back from one step.
struct StepResult {
    progress: Vec<(SeqId, usize)>,
    /// The sequence preempted in this step, and whether its K/V went to host memory.
    preempted: Option<(SeqId, bool)>,
    sampled: Result<Vec<(SeqId, u32)>, ExecutorError>,
}

impl Scheduler {
    pub fn new(
        core: SchedulerCore,
        kv: Addr<KvPageManager>,
        executor: Recipient<ExecuteStep>,
        discard_swapped: Recipient<DiscardSwapped>,
        detector: Addr<StopSequenceDetector>,
        preemption: PreemptionMode,
    ) -> Self {
        Self {
            core,
            kv,
            executor,
            discard_swapped,
            detector,
            preemption,
            step_in_flight: false,
            steps: 0,
        }
    }

    fn publish(&self) {
        metrics::gauge!("inferflux_num_requests_running").set(self.core.num_running() as f64);
        metrics::gauge!("inferflux_num_requests_waiting").set(self.core.num_waiting() as f64);
    }

    /// Starts the next step unless one is running or nothing is left to do: reserve pages,
    /// plan, settle a preemption with the page manager, execute.
    fn maybe_step(&mut self, ctx: &mut Context<Self>) {
        if self.step_in_flight || !self.core.has_work() {
            return;
        }
        let candidates = self.core.candidates();
        if candidates.is_empty() {
            return;
        }
        self.step_in_flight = true;
        self.steps += 1;
        let step = self.steps;
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
                let (plan, victim) = match reserved {
                    Ok((candidates, grants)) => act.core.plan(&candidates, grants),
                    Err(e) => {
                        tracing::error!(error = %e, "KV page manager unreachable");
                        (Vec::new(), None)
                    }
                };
                for (seq, cached_tokens) in act.core.take_admissions() {
                    act.detector.do_send(PrefixCached { seq, cached_tokens });
                }
                let preempt = victim.map(|seq| Preempt {
                    seq,
                    computed_tokens: act.core.preempted_tokens(seq),
                    swap: act.preemption == PreemptionMode::Swap,
                });
                let (kv, executor) = (act.kv.clone(), act.executor.clone());
                let progress: Vec<(SeqId, usize)> = plan.iter().map(PlannedChunk::progress).collect();
                actix::fut::wrap_future(async move {
                    let mut swap_out = None;
                    let mut preempted = None;
                    if let Some(p) = preempt {
                        let seq = p.seq;
                        let pages = kv.send(p).await.ok().flatten();
                        preempted = Some((seq, pages.is_some()));
                        swap_out = pages.map(|pages| SwapOut { seq, pages });
                    }
                    let sampled = if plan.is_empty() && swap_out.is_none() {
                        Ok(Vec::new())
                    } else {
                        executor
                            .send(ExecuteStep { step, swap_out, plan })
                            .await
                            .unwrap_or_else(|e| Err(ExecutorError(format!("executor unreachable: {e}"))))
                    };
                    StepResult {
                        progress,
                        preempted,
                        sampled,
                    }
                })
            })
            .map(|result, act, ctx| {
                act.step_in_flight = false;
                act.finish_step(result);
                act.publish();
                act.maybe_step(ctx);
            });
        ctx.spawn(fut);
    }

    fn finish_step(&mut self, result: StepResult) {
        let StepResult {
            progress,
            preempted,
            sampled,
        } = result;
        if let Some((seq, swapped)) = preempted {
            let swapped = swapped && sampled.is_ok();
            let mode = if swapped { "swap" } else { "recompute" };
            tracing::info!(seq = %seq, mode, "preempted for KV pages");
            metrics::counter!("inferflux_num_preemptions_total", "mode" => mode).increment(1);
            if swapped && self.core.is_waiting(seq) {
                self.core.settle_swapped(seq);
            } else if preempted.is_some_and(|(_, s)| s) {
                // Cancelled while being swapped out, or the swap-out failed: drop the host copy.
                self.kv.do_send(Release { seq });
                self.discard_swapped.do_send(DiscardSwapped { seq });
            }
        }
        match sampled {
            Ok(sampled) => {
                let outcome = self.core.complete(&progress, &sampled);
                if !outcome.commits.is_empty() {
                    self.kv.do_send(CommitPages {
                        commits: outcome.commits,
                    });
                }
                if !outcome.tokens.is_empty() {
                    self.detector.do_send(StepTokens {
                        tokens: outcome.tokens,
                    });
                }
                for seq in outcome.finished {
                    self.kv.do_send(Release { seq });
                }
            }
            Err(e) => {
                for &(seq, _) in &progress {
                    if self.core.remove(seq) {
                        self.kv.do_send(Release { seq });
                        self.detector.do_send(FailSequence {
                            seq,
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
    }

    /// Forgets a sequence that ended early; returns whether it was known.
    fn drop_sequence(&mut self, seq: SeqId) -> bool {
        let swapped = self.core.is_swapped(seq);
        if !self.core.remove(seq) {
            return false;
        }
        self.kv.do_send(Release { seq });
        if swapped {
            self.discard_swapped.do_send(DiscardSwapped { seq });
        }
        self.publish();
        true
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;
}

/// The waiting queue is full; the request is refused (429).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("waiting queue is full")]
pub struct QueueFull;

/// Admit a new, already tokenized sequence.
#[derive(Message)]
#[rtype(result = "Result<(), QueueFull>")]
pub struct Enqueue {
    pub seq: Sequence,
}

impl Handler<Enqueue> for Scheduler {
    type Result = Result<(), QueueFull>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        self.core.enqueue(msg.seq).map_err(|_| QueueFull)?;
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
        if self.drop_sequence(msg.seq) {
            tracing::info!(seq = %msg.seq, "request cancelled");
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
}

impl Handler<SequenceFinished> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: SequenceFinished, _: &mut Context<Self>) {
        self.drop_sequence(msg.seq);
    }
}
