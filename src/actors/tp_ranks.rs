//! The executor's ranks: one model shard, its KV pages and its swapped-out K/V each. Rank 0
//! runs on the `ModelExecutor` actor's thread; with tensor parallel, ranks 1.. run on threads of
//! their own and get every step's work over a channel, so that all of them run the same plan.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use burn::prelude::Backend;

use super::step_output::{FedEdits, StepOutput, UnreadOutput};
use crate::kv::{PageCopy, SeqId};
use crate::model::draw::DeviceSampling;
use crate::model::{FedTokens, HostPages, Llama, PagedKvCache, SequenceChunk};
use crate::parallel::Communicator;
use crate::sampling::{LogitEdit, RowSampling};

/// What every rank does in one step, in this order: swap-out, page copies, swap-ins, forward.
#[derive(Debug, Clone, Default)]
pub struct StepWork {
    pub swap_out: Option<(SeqId, Vec<u32>)>,
    pub copies: Vec<PageCopy>,
    pub restores: Vec<(SeqId, Vec<u32>)>,
    pub chunks: Vec<SequenceChunk>,
    /// How each logits row (per chunk that wants logits, in order) gets its token
    /// (`sampling::row_sampling`). Only rank 0 reads anything back.
    pub rows: Vec<RowSampling>,
    /// Per logits row, what bias, the `min_tokens` mask and penalties change in its logits
    /// (`sampling::logit_edits`), for a device that chooses from edited copies; shared with the
    /// executor, which samples the host rows with them.
    pub edits: Arc<[Vec<LogitEdit>]>,
    /// Per logits row whose edits have `*Fed*` edits (`sampling::logit_edits_fed`): where its
    /// fed token is in the fed ids (`FedTokens::ids`). Empty when nothing is fed on the device.
    pub fed_at: Vec<Option<usize>>,
}

/// One rank's shard and state.
pub struct Rank<B: Backend> {
    model: Box<Llama<B>>,
    cache: Box<PagedKvCache<B>>,
    /// K/V of preempted sequences swapped out to host memory (this rank's KV heads).
    swapped: HashMap<SeqId, HostPages>,
    /// Chooses greedy and temperature rows' tokens on the device; none: burn's argmax and the
    /// host.
    sampling: DeviceSampling<B>,
}

impl<B: Backend> Rank<B> {
    pub fn new(model: Llama<B>, cache: PagedKvCache<B>) -> Self {
        Self {
            model: Box::new(model),
            cache: Box::new(cache),
            swapped: HashMap::new(),
            sampling: DeviceSampling::default(),
        }
    }

    /// Chooses tokens with `sampling`'s hooks (rank 0 only reads anything back).
    pub fn with_device_sampling(mut self, sampling: DeviceSampling<B>) -> Self {
        self.sampling = sampling;
        self
    }

    pub fn cache_page_size(&self) -> usize {
        self.cache.page_size()
    }

    pub fn discard(&mut self, seq: SeqId) {
        self.swapped.remove(&seq);
    }

    /// Runs `work` and reads back what rank 0 samples from (see [`StepOutput`]); a panic (a
    /// device error, or a failed collective) becomes an error.
    pub fn run(&mut self, work: StepWork) -> Result<StepOutput, String> {
        let unread = self.step(work, true, None)?;
        Self::read(unread)
    }

    /// Queues `work` (the last tokens of `fed`'s chunks taken from its ids on the device) and
    /// its sampling, reading nothing back; [`Self::read`] reads it. One rank only.
    pub fn issue(
        &mut self,
        work: StepWork,
        fed: Option<&FedTokens<B>>,
    ) -> Result<Option<UnreadOutput<B>>, String> {
        self.step(work, true, fed)
    }

    /// Reads back a step that [`Self::issue`] queued: waits for the device to run it.
    pub fn read(unread: Option<UnreadOutput<B>>) -> Result<StepOutput, String> {
        let Some(unread) = unread else {
            return Ok(StepOutput::default());
        };
        let read = Instant::now();
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| unread.read())).map_err(panic_message)?;
        metrics::histogram!("inferflux_step_read_seconds").record(read.elapsed().as_secs_f64());
        out
    }

    /// Runs `work` without reading the logits back: ranks 1.. take part in the collectives of
    /// the forward pass but sample nothing.
    pub fn run_without_output(&mut self, work: StepWork) -> Result<(), String> {
        self.step(work, false, None).map(drop)
    }

    fn step(
        &mut self,
        work: StepWork,
        sample: bool,
        fed: Option<&FedTokens<B>>,
    ) -> Result<Option<UnreadOutput<B>>, String> {
        let (model, cache, swapped) = (&*self.model, &mut *self.cache, &mut self.swapped);
        let sampling = &self.sampling;
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            if let Some((seq, pages)) = work.swap_out {
                swapped.insert(seq, cache.read_pages(&pages));
            }
            // In grant order: a page freed by one copy's source can only be the destination of
            // a later one.
            for c in &work.copies {
                cache.copy_page(c.src, c.dst);
            }
            for (seq, pages) in work.restores {
                let host = swapped
                    .remove(&seq)
                    .ok_or_else(|| format!("no swapped K/V for sequence {seq}"))?;
                cache.write_pages(&pages, host);
            }
            if work.chunks.is_empty() {
                return Ok(None);
            }
            let issue = Instant::now();
            // `None`: no chunk wants logits, so there is nothing to sample.
            let logits = model.forward_fed(cache, &work.chunks, fed);
            let Some(logits) = logits.filter(|_| sample) else {
                return Ok(None);
            };
            // On a GPU `forward` returns once its kernels are queued; the read waits for them.
            let fed = fed.map(|f| FedEdits {
                ids: &f.ids,
                at: &work.fed_at,
            });
            let out = UnreadOutput::issue(logits, &work.rows, &work.edits, fed, sampling);
            metrics::histogram!("inferflux_step_issue_seconds").record(issue.elapsed().as_secs_f64());
            out.map(Some)
        }))
        .map_err(panic_message)?
    }
}

pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

enum Job {
    Step(StepWork),
    Discard(SeqId),
}

/// A rank > 0 on its own thread. Dropping it closes the channel and ends the thread.
pub struct RankWorker {
    rank: usize,
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Result<(), String>>,
}

impl RankWorker {
    /// Moves `rank` onto a new thread. `comm` is that rank's communicator: the worker poisons it
    /// when its step fails, so that no other rank waits for it.
    pub fn spawn<B: Backend>(
        index: usize,
        mut rank: Rank<B>,
        comm: Arc<dyn Communicator>,
    ) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (reply, done) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("inferflux-tp-rank-{index}"))
            .spawn(move || {
                for job in inbox {
                    match job {
                        Job::Step(work) => {
                            let result = rank.run_without_output(work);
                            if let Err(e) = &result {
                                comm.poison(e);
                            }
                            if reply.send(result).is_err() {
                                break;
                            }
                        }
                        Job::Discard(seq) => rank.discard(seq),
                    }
                }
            })?;
        Ok(Self {
            rank: index,
            jobs,
            done,
        })
    }

    /// Hands the worker a step; false if its thread is gone.
    pub fn start(&self, work: StepWork) -> bool {
        self.jobs.send(Job::Step(work)).is_ok()
    }

    /// Waits for the step handed over by `start`.
    pub fn finish(&self) -> Result<(), String> {
        match self.done.recv() {
            Ok(r) => r.map_err(|e| format!("rank {}: {e}", self.rank)),
            Err(_) => Err(format!("rank {} exited", self.rank)),
        }
    }

    pub fn discard(&self, seq: SeqId) {
        // A gone worker fails the next step; nothing to do here.
        let _ = self.jobs.send(Job::Discard(seq));
    }
}
