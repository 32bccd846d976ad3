//! One unified step of the embedded tiny model on the CPU backend: decode at batch 1 and 8, and
//! a 64-token prefill chunk. Compare per-token cost across batch sizes within one run.

use burn::backend::Flex;
use burn::tensor::DType;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use inferflux::model::{KvStorage, Llama, ModelFiles, ModelSource, PagedKvCache, SequenceChunk};

const PAGE_SIZE: usize = 16;

fn bench(c: &mut Criterion) {
    let files = ModelFiles::open(&ModelSource::Embedded).unwrap();
    let index = files.checkpoint.index().unwrap();
    let model = Llama::<Flex>::load(&files.config, &index, &Default::default(), DType::F32).unwrap();
    let cfg = model.config().clone();
    let mut cache = PagedKvCache::<Flex>::new(
        cfg.num_layers,
        256,
        PAGE_SIZE,
        cfg.num_kv_heads * cfg.head_dim,
        &Default::default(),
        DType::F32,
        KvStorage::Host,
    );
    let context = 128;
    let mut group = c.benchmark_group("step");
    for batch in [1usize, 8] {
        let chunks: Vec<SequenceChunk> = (0..batch)
            .map(|s| SequenceChunk {
                tokens: vec![42],
                start_pos: context,
                block_table: (0..=context / PAGE_SIZE).map(|p| (s * 16 + p) as u32).collect(),
                wants_logits: true,
            })
            .collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("decode", batch), &chunks, |b, chunks| {
            b.iter(|| model.forward(&mut cache, chunks).into_data())
        });
    }
    let prefill = vec![SequenceChunk {
        tokens: (0..64).map(|i| (i % 300) as u32).collect(),
        start_pos: 0,
        block_table: (0..4).collect(),
        wants_logits: true,
    }];
    group.throughput(Throughput::Elements(64));
    group.bench_function("prefill_chunk_64", |b| {
        b.iter(|| model.forward(&mut cache, &prefill).into_data())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
