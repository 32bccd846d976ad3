//! Attention over host pages, alone, at the attention shapes of Llama-3.2-1B (32 query heads over
//! 8 KV heads, head_dim 64: GQA groups of 4) and of a model without GQA (12 over 12), on scattered
//! pages:
//! - decodes (`PagedKvCache::attend_decodes`, the CPU path of a step with two or more decodes):
//!   32 at context 1,024, and 2 at context 8,192 (too few sequences for a unit per sequence and
//!   thread: bands of KV heads); compare the shapes' time per K/V byte within one run;
//! - a prompt chunk (`PagedKvCache::attend_chunk`): the last 512 tokens of a 2,048-token prompt,
//!   as the CPU's default token budget cuts it; its throughput counts the (query head, key)
//!   pairs it scores, causal.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use inferflux::model::host_attention::ChunkQueries;
use inferflux::model::{KvStorage, PagedKvCache};

const PAGE_SIZE: usize = 16;
/// Decode steps measured: (sequences, context of each). The pool holds the larger.
const DECODES: [(usize, usize); 2] = [(32, 1024), (2, 8192)];
const HEAD_DIM: usize = 64;
/// The measured chunk: the last `CHUNK` of a `CHUNK_CONTEXT`-token prompt.
const CHUNK: usize = 512;
const CHUNK_CONTEXT: usize = 2048;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_attention");
    for (heads, kv_heads) in [(32usize, 8usize), (12, 12)] {
        let kv_dim = kv_heads * HEAD_DIM;
        let pages = DECODES.iter().map(|(n, context)| n * context).max().unwrap_or(0) / PAGE_SIZE;
        let slots = pages * PAGE_SIZE;
        let device = Default::default();
        let mut cache =
            PagedKvCache::<Flex>::new(1, pages, PAGE_SIZE, kv_dim, &device, DType::F32, KvStorage::Host);
        let value = |i: usize| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0;
        let rows: Vec<f32> = (0..slots * kv_dim).map(value).collect();
        let rows = Tensor::<Flex, 2>::from_data(TensorData::new(rows, [slots, kv_dim]), &device);
        cache.write(
            0,
            &cache.write_slots((0..slots as i32).collect()),
            rows.clone(),
            rows,
        );
        // Each sequence's pages scattered over the pool, as a free list hands them out.
        let contexts_of = |n: usize, context: usize| -> Vec<Vec<i32>> {
            (0..n)
                .map(|s| {
                    (0..context)
                        .map(|p| {
                            let page = (p / PAGE_SIZE * n + s) * 7 % pages;
                            (page * PAGE_SIZE + p % PAGE_SIZE) as i32
                        })
                        .collect()
                })
                .collect()
        };
        for (n, context) in DECODES {
            let contexts = contexts_of(n, context);
            let q: Vec<f32> = (0..n * heads * HEAD_DIM).map(|i| value(i + 13) * 0.1).collect();
            // K and V bytes read by the step's attention, once per KV head.
            group.throughput(Throughput::Bytes((n * context * kv_dim * 2 * 4) as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("heads{heads}_kv{kv_heads}"), format!("{n}x{context}")),
                &q,
                |b, q| b.iter(|| cache.attend_decodes(0, q, &contexts, [heads, HEAD_DIM], 0.125)),
            );
        }
        // The chunk: one sequence's scattered pages, its first CHUNK_CONTEXT slots.
        let slots: Vec<i32> = contexts_of(1, CHUNK_CONTEXT).concat();
        let q: Vec<f32> = (0..CHUNK * heads * HEAD_DIM)
            .map(|i| value(i + 13) * 0.1)
            .collect();
        let chunk = ChunkQueries {
            q: &q,
            slots: &slots,
            first_query: CHUNK_CONTEXT - CHUNK,
            first_position: 0,
            window: None,
        };
        let pairs = (CHUNK_CONTEXT - CHUNK..CHUNK_CONTEXT)
            .map(|p| p + 1)
            .sum::<usize>()
            * heads;
        group.throughput(Throughput::Elements(pairs as u64));
        group.bench_function(
            BenchmarkId::new(format!("chunk_heads{heads}_kv{kv_heads}"), CHUNK),
            |b| b.iter(|| cache.attend_chunk(0, &chunk, [heads, HEAD_DIM], 0.125)),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
