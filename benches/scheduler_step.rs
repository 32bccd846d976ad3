//! Scheduler cost of one step with a stub executor: `SchedulerCore` and a `PagePool` (prefix
//! caching on), fake sampled tokens, at 16, 256 and 1024 running sequences from 8 clients. A
//! finished sequence is replaced by a new one, so every step also admits and prefills a little.
//! Per-sequence cost (criterion's "elements" throughput) should stay flat across sizes: the
//! scheduling work is linear in the running sequences.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use inferflux::config::SchedulerConfig;
use inferflux::kv::{BlockHasher, PagePool, SeqId};
use inferflux::sampling::SamplingParams;
use inferflux::scheduler::{PlannedChunk, SchedulerCore, Sequence};

const PAGE_SIZE: usize = 16;
const PROMPT: usize = 48;
const MAX_TOKENS: usize = 64;
const CLIENTS: u64 = 8;

struct Harness {
    core: SchedulerCore,
    pool: PagePool,
    next_id: u64,
    clients: Vec<Arc<str>>,
}

impl Harness {
    fn new(running: usize) -> Self {
        let config = SchedulerConfig {
            // About running / 48 finish per step; their replacements need about `running` prompt tokens.
            max_batched_tokens: 2 * running + 4 * PROMPT,
            max_running: running,
            max_waiting: 4 * running,
            ..Default::default()
        };
        let pages = running * (PROMPT + MAX_TOKENS).div_ceil(PAGE_SIZE) * 5 / 4 + 64;
        let mut h = Self {
            core: SchedulerCore::new(config, Some(BlockHasher::new("bench", PAGE_SIZE))),
            pool: PagePool::new(pages, PAGE_SIZE),
            next_id: 0,
            clients: (0..CLIENTS).map(|c| Arc::from(format!("client-{c}"))).collect(),
        };
        for _ in 0..running {
            h.add();
        }
        // Until everything runs, and past the first wave of finishes (staggered by admission).
        for _ in 0..(MAX_TOKENS * 2) {
            h.step();
        }
        h
    }

    fn add(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let prompt: Vec<u32> = (0..PROMPT as u32).map(|t| t + (id as u32 % 1000) * 7).collect();
        // Staggered lengths, so that some finish every step.
        let max_tokens = MAX_TOKENS / 2 + (id as usize % (MAX_TOKENS / 2));
        let client = self.clients[(id % CLIENTS) as usize].clone();
        let seq = Sequence::new(SeqId(id), prompt, max_tokens, SamplingParams::default())
            .with_client(client, (id % 3) as i64);
        self.core.enqueue(seq).expect("the waiting queue has room");
    }

    /// One step: candidates, pages, plan, fake tokens, completion; finished ones are replaced.
    fn step(&mut self) -> usize {
        let cands = self.core.candidates();
        let grants = cands.iter().map(|c| c.reserve(&mut self.pool).ok()).collect();
        let (plan, victim) = self.core.plan(&cands, grants);
        if let Some(v) = victim {
            self.pool.release(v);
        }
        let sampled: Vec<(SeqId, u32)> = plan
            .iter()
            .filter(|c| c.wants_logits)
            .map(|c| (c.seq, 7 + c.generated_index as u32))
            .collect();
        let progress: Vec<_> = plan.iter().map(PlannedChunk::progress).collect();
        let outcome = self.core.complete(&progress, &sampled);
        if let Some(v) = victim {
            self.core.settle_preemption(v, false);
        }
        for c in &outcome.commits {
            self.pool.commit(c.seq, c.first, &c.hashes);
        }
        for &id in &outcome.finished {
            self.pool.release(id);
            self.add();
        }
        self.core.take_admissions();
        self.core.take_served();
        plan.len()
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler_step");
    group.sample_size(30);
    let mut summary = Vec::new();
    for running in [16usize, 256, 1024] {
        let mut h = Harness::new(running);
        // Steady state: those that finished last step are replaced and wait for the next one.
        assert_eq!(h.core.num_running() + h.core.num_waiting(), running);
        assert!(h.core.num_running() >= running * 3 / 4, "steady state reached");
        // A plain timing first, for the per-sequence summary below.
        let steps = 200_000 / running;
        let t = Instant::now();
        for _ in 0..steps {
            h.step();
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;
        summary.push((running, us));
        group.throughput(Throughput::Elements(running as u64));
        group.bench_function(BenchmarkId::from_parameter(running), |b| b.iter(|| h.step()));
    }
    group.finish();
    println!("\nscheduler cost per step (stub executor):");
    println!("{:>8}  {:>12}  {:>14}", "running", "µs/step", "ns/sequence");
    for (running, us) in &summary {
        println!(
            "{running:>8}  {us:>12.1}  {:>14.0}",
            us * 1000.0 / *running as f64
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
