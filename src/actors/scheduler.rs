//! `Scheduler`: the step loop. One step in flight at a time: reserve pages for the candidates,
//! plan, execute, hand the sampled tokens to the stop detector, repeat while there is work.

use actix::prelude::*;

use super::executor::{ExecuteStep, ExecutorError};
use super::kv_pages::{CommitPages, KvPageManager, Release, ReserveStep};
use super::stop_detector::{FailSequence, PrefixCached, StepTokens, StopSequenceDetector, Untrack};
use crate::kv::SeqId;
use crate::scheduler::{PlannedChunk, SchedulerCore, Sequence};

pub struct Scheduler {
    core: SchedulerCore,
    kv: Addr<KvPageManager>,
    executor: Recipient<ExecuteStep>,
    detector: Addr<StopSequenceDetector>,
    step_in_flight: bool,
    steps: u64,
}

impl Scheduler {
    pub fn new(
        core: SchedulerCore,
        kv: Addr<KvPageManager>,
        executor: Recipient<ExecuteStep>,
        detector: Addr<StopSequenceDetector>,
    ) -> Self {
        Self {
            core,
            kv,
            executor,
            detector,
            step_in_flight: false,
            steps: 0,
        }
    }

    fn publish(&self) {
        metrics::gauge!("inferflux_num_requests_running").set(self.core.num_running() as f64);
        metrics::gauge!("inferflux_num_requests_waiting").set(self.core.num_waiting() as f64);
    }

    /// Starts the next step unless one is running or nothing is left to do.
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
                let plan = match reserved {
                    Ok((candidates, grants)) => {
                        let (plan, victim) = act.core.plan(&candidates, grants);
                        for (seq, cached_tokens) in act.core.take_admissions() {
                            act.detector.do_send(PrefixCached { seq, cached_tokens });
                        }
                        if let Some(seq) = victim {
                            tracing::info!(seq = %seq, "preempted for KV pages (recompute)");
                            metrics::counter!("inferflux_num_preemptions_total").increment(1);
                            act.kv.do_send(Release { seq });
                        }
                        plan
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "KV page manager unreachable");
                        Vec::new()
                    }
                };
                let executor = act.executor.clone();
                let progress: Vec<(SeqId, usize)> = plan.iter().map(PlannedChunk::progress).collect();
                actix::fut::wrap_future(async move {
                    if plan.is_empty() {
                        return (progress, Ok(Vec::new()));
                    }
                    let result = executor
                        .send(ExecuteStep { step, plan })
                        .await
                        .unwrap_or_else(|e| Err(ExecutorError(format!("executor unreachable: {e}"))));
                    (progress, result)
                })
            })
            .map(|(progress, result), act, ctx| {
                act.step_in_flight = false;
                act.finish_step(&progress, result);
                act.publish();
                act.maybe_step(ctx);
            });
        ctx.spawn(fut);
    }

    fn finish_step(&mut self, progress: &[(SeqId, usize)], result: Result<Vec<(SeqId, u32)>, ExecutorError>) {
        match result {
            Ok(sampled) => {
                let outcome = self.core.complete(progress, &sampled);
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
                for &(seq, _) in progress {
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
        if self.core.remove(msg.seq) {
            tracing::info!(seq = %msg.seq, "request cancelled");
            metrics::counter!("inferflux_requests_cancelled_total").increment(1);
            self.kv.do_send(Release { seq: msg.seq });
            self.detector.do_send(Untrack { seq: msg.seq });
            self.publish();
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
        if self.core.remove(msg.seq) {
            self.kv.do_send(Release { seq: msg.seq });
            self.publish();
        }
    }
}
