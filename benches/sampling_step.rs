//! The executor's host cost of one step's sampling at 128 sequences and a 128,256-token
//! vocabulary (Llama 3), on the CPU backend: the old all-host path (every logits row read back,
//! `sampling::sample` per row) against the device path (`StepOutput::read`: argmax on the
//! device, ids back), for all-greedy rows and for a batch with 8 logprobs rows. The logits
//! tensor is made fresh for each iteration, outside the timing, as the model step hands it over.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use inferflux::actors::step_output::StepOutput;
use inferflux::model::draw::DeviceSampling;
use inferflux::sampling::{self, SamplingParams};

const ROWS: usize = 128;
const VOCAB: usize = 128_256;

fn logits() -> Vec<f32> {
    // A fixed pseudo-random spread, so that the maximum sits anywhere in a row.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..ROWS * VOCAB)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
        })
        .collect()
}

/// The pre-change executor: every row to the host, each sampled there.
fn all_host(t: Tensor<Flex, 2>, params: &[SamplingParams]) -> Vec<u32> {
    let values = t.into_data().to_vec::<f32>().unwrap();
    values
        .chunks_exact(VOCAB)
        .zip(params)
        .map(|(row, p)| sampling::sample(row, p, 0, None).token)
        .collect()
}

/// The device path as `run_step` drives it: plain-greedy ids from the device, the rest sampled.
fn split(t: Tensor<Flex, 2>, params: &[SamplingParams]) -> Vec<u32> {
    let plan: Vec<_> = params.iter().map(|p| sampling::row_sampling(p, 0)).collect();
    let edits: Vec<_> = params.iter().map(|p| sampling::logit_edits(p, 0, None)).collect();
    let out = StepOutput::read(t, &plan, &edits, &DeviceSampling::default()).unwrap();
    let mut rows = out.host_rows.chunks_exact(VOCAB);
    out.device
        .iter()
        .zip(params)
        .map(|(g, p)| g.unwrap_or_else(|| sampling::sample(rows.next().unwrap(), p, 0, None).token))
        .collect()
}

fn bench(c: &mut Criterion) {
    let values = logits();
    let fresh = || {
        Tensor::<Flex, 2>::from_data(
            TensorData::new(values.clone(), [ROWS, VOCAB]),
            &Default::default(),
        )
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let all_greedy = vec![greedy.clone(); ROWS];
    let mut some_logprobs = all_greedy.clone();
    for p in some_logprobs.iter_mut().step_by(ROWS / 8) {
        p.logprobs = Some(5);
    }
    assert_eq!(all_host(fresh(), &all_greedy), split(fresh(), &all_greedy));
    assert_eq!(all_host(fresh(), &some_logprobs), split(fresh(), &some_logprobs));

    let mut group = c.benchmark_group("sampling_step_128x128256");
    group.sample_size(20);
    group.throughput(Throughput::Elements(ROWS as u64));
    for (name, params) in [("greedy", &all_greedy), ("greedy_8_logprobs", &some_logprobs)] {
        group.bench_function(format!("all_host/{name}"), |b| {
            b.iter_batched(fresh, |t| all_host(t, params), BatchSize::PerIteration)
        });
        group.bench_function(format!("device_argmax/{name}"), |b| {
            b.iter_batched(fresh, |t| split(t, params), BatchSize::PerIteration)
        });
    }
    group.finish();
}

/// The pre-change `top_p`: every token sorted, most likely first, then the nucleus cut.
fn kept_by_full_sort(row: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|q| q.1 as f64).sum();
    let mut mass = 0.0f64;
    let keep = probs
        .iter()
        .position(|q| {
            mass += q.1 as f64;
            mass >= p.top_p as f64 * total
        })
        .map_or(probs.len(), |i| i + 1);
    probs.truncate(keep);
    probs
}

/// One sampled row's `top_p` on the host (the executor samples a step's rows one after another):
/// sorting only the nucleus against sorting the whole 128,256-token row, at a temperature that
/// keeps many tokens (1.0) and one that keeps few (0.3), `top_p` 0.95.
fn bench_top_p(c: &mut Criterion) {
    let values = logits();
    let row = &values[..VOCAB];
    let mut group = c.benchmark_group("sampling_top_p_row_128256");
    group.sample_size(20);
    for temperature in [1.0f32, 0.3] {
        let p = SamplingParams {
            temperature,
            top_p: 0.95,
            ..Default::default()
        };
        let kept = sampling::kept_tokens(row, &p);
        assert_eq!(kept, kept_by_full_sort(row, &p));
        eprintln!(
            "temperature {temperature}: the nucleus holds {} tokens",
            kept.len()
        );
        group.bench_function(format!("full_sort/t{temperature}"), |b| {
            b.iter(|| kept_by_full_sort(row, &p))
        });
        group.bench_function(format!("nucleus_only/t{temperature}"), |b| {
            b.iter(|| sampling::kept_tokens(row, &p))
        });
    }
    group.finish();
}

/// A step's 128 `top_p` rows as the executor draws them (`finish_step`: on rayon's threads)
/// against one after another, as it drew them before.
fn bench_rows_in_parallel(c: &mut Criterion) {
    use rayon::prelude::*;
    let values = logits();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: 7,
        ..Default::default()
    };
    let draw = |(n, row): (usize, &[f32])| sampling::sample(row, &p, n, None).token;
    let rows = || values.chunks_exact(VOCAB).enumerate();
    let in_turn: Vec<u32> = rows().map(draw).collect();
    let parallel: Vec<u32> = rows().collect::<Vec<_>>().into_par_iter().map(draw).collect();
    assert_eq!(
        in_turn, parallel,
        "the same tokens whatever the order of the draws"
    );
    let mut group = c.benchmark_group("sampling_step_top_p_128x128256");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("one_after_another", |b| {
        b.iter(|| rows().map(draw).collect::<Vec<_>>())
    });
    group.bench_function("rayon", |b| {
        b.iter(|| {
            rows()
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(draw)
                .collect::<Vec<_>>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_top_p, bench_rows_in_parallel);
criterion_main!(benches);
