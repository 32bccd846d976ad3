//! Tokens per second of the f32 CPU backend (burn Flex), so that regressions show: prefill and
//! decode at batch 1, 2 and 8 as the server runs them, and at batch 8 with burn Flex's `matmul`
//! for every projection (the baseline of `model::cpu_gemm`), for the embedded tiny model and for
//! a ~110M-parameter Llama whose random weights are built here (seeded; nothing is downloaded). Times the model step alone
//! (forward and the logits back on the host), not sampling or serving. Compare the batch-8 against
//! the batch-1 decode throughput, and the skinny GEMM against Flex's `matmul`, within one run;
//! absolute numbers depend on the machine. The 110M model also prefills a 2,048-token prompt in
//! chunks and runs a batch-8 decode step at context about 2,048: their attention over the host
//! pages is what the short runs barely show.
//!
//! `cargo bench --bench cpu_throughput` (about two minutes on 2 cores).

use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::DType;
use half::bf16;
use inferflux::model::{cpu_fused, cpu_gemm};
use inferflux::model::{
    CheckpointBytes, KvStorage, Llama, LlamaConfig, ModelFiles, ModelSource, PagedKvCache, SequenceChunk,
    WeightLayout,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Small blocks from mimalloc, large ones from glibc (see `inferflux::heap`).
#[global_allocator]
static HEAP: inferflux::heap::ServerHeap = inferflux::heap::ServerHeap;

const PAGE_SIZE: usize = 16;

/// One model to measure, and the sizes of its runs.
struct Case {
    name: &'static str,
    config: LlamaConfig,
    checkpoint: CheckpointBytes,
    /// Prompt tokens per sequence.
    prompt_len: usize,
    /// Decode steps timed per batch size (each alone; the median is reported).
    decode_steps: usize,
    /// Timed repeats of the prefill; the median is reported.
    prefill_repeats: usize,
}

/// A Llama the size of the small GPT-2/Llama configurations (768 wide, 12 layers, 32000 vocab,
/// tied embeddings): about 110M parameters.
const RANDOM_CONFIG: &str = r#"{
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": true,
    "bos_token_id": 1,
    "eos_token_id": 2
}"#;

/// Every tensor of a Llama checkpoint of `c`'s shape, by name (tied: no `lm_head.weight`).
fn tensor_shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    shapes
}

/// A bf16 safetensors checkpoint of `c`'s shape: norms 1, every other weight uniform in
/// ±0.035 (std 0.02, as `initializer_range` gives), from a fixed seed. Leaked: the bench keeps it
/// for its whole run, as the server keeps its mapped checkpoint.
fn random_checkpoint(c: &LlamaConfig) -> CheckpointBytes {
    let mut rng = StdRng::seed_from_u64(0);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = tensor_shapes(c)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let bytes = (0..n)
                .flat_map(|_| {
                    let x = if norm {
                        1.0
                    } else {
                        rng.random_range(-0.035f32..0.035)
                    };
                    bf16::from_f32(x).to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views = tensors.iter().map(|(name, shape, bytes)| {
        let view = TensorView::new(Dtype::BF16, shape.clone(), bytes).expect("consistent tensor");
        (name.as_str(), view)
    });
    let bytes = safetensors::serialize(views, None).expect("serialize the random checkpoint");
    CheckpointBytes::Static(vec![(
        "random:model.safetensors",
        Box::leak(bytes.into_boxed_slice()),
    )])
}

/// Parameters, counting tied embeddings once.
fn parameters(c: &LlamaConfig) -> usize {
    tensor_shapes(c)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Prefill and decode throughput of one batch size.
struct Row {
    batch: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_step_ms: f64,
}

fn tok_per_s(tokens: usize, t: Duration) -> f64 {
    tokens as f64 / t.as_secs_f64()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// `batch` sequences: a prefill of `prompt_len` tokens each in one step (timed
/// `prefill_repeats` times over the same pages), then `decode_steps` decode steps of one token
/// each; the median of each.
fn measure(model: &Llama<Flex>, case: &Case, batch: usize) -> Row {
    let cfg = model.config();
    let pages_per_seq = (case.prompt_len + case.decode_steps + 1).div_ceil(PAGE_SIZE);
    let mut cache = PagedKvCache::<Flex>::new(
        cfg.num_layers,
        batch * pages_per_seq,
        PAGE_SIZE,
        cfg.num_kv_heads * cfg.head_dim,
        &Default::default(),
        DType::F32,
        KvStorage::Host,
    );
    let table = |s: usize| -> Vec<u32> {
        ((s * pages_per_seq)..((s + 1) * pages_per_seq))
            .map(|p| p as u32)
            .collect()
    };
    let mut rng = StdRng::seed_from_u64(batch as u64);
    let vocab = cfg.vocab_size as u32;
    let prefill: Vec<SequenceChunk> = (0..batch)
        .map(|s| SequenceChunk {
            tokens: (0..case.prompt_len).map(|_| rng.random_range(0..vocab)).collect(),
            start_pos: 0,
            block_table: table(s),
            wants_logits: true,
        })
        .collect();
    // One untimed step first: the allocator and the backend's first-use costs.
    model.forward(&mut cache, &prefill).into_data();
    let prefill_time = median(
        (0..case.prefill_repeats)
            .map(|_| {
                let t = Instant::now();
                model.forward(&mut cache, &prefill).into_data();
                t.elapsed()
            })
            .collect(),
    );
    let decode = |pos: usize, rng: &mut StdRng| decode_step(batch, pos, &table, vocab, rng);
    model
        .forward(&mut cache, &decode(case.prompt_len, &mut rng))
        .into_data();
    let steps: Vec<Vec<SequenceChunk>> = (0..case.decode_steps)
        .map(|k| decode(case.prompt_len + 1 + k, &mut rng))
        .collect();
    // The median step, not the mean: other work on a shared machine shows as spikes.
    let decode_step = median(
        steps
            .iter()
            .map(|chunks| {
                let t = Instant::now();
                model.forward(&mut cache, chunks).into_data();
                t.elapsed()
            })
            .collect(),
    );
    Row {
        batch,
        prefill_tok_s: tok_per_s(batch * case.prompt_len, prefill_time),
        decode_tok_s: tok_per_s(batch, decode_step),
        decode_step_ms: decode_step.as_secs_f64() * 1000.0,
    }
}

/// One decode step's chunks: a random token for each of `batch` sequences at position `pos`,
/// sequence `s` on the pages `table(s)`.
fn decode_step(
    batch: usize,
    pos: usize,
    table: &dyn Fn(usize) -> Vec<u32>,
    vocab: u32,
    rng: &mut StdRng,
) -> Vec<SequenceChunk> {
    (0..batch)
        .map(|s| SequenceChunk {
            tokens: vec![rng.random_range(0..vocab)],
            start_pos: pos,
            block_table: table(s),
            wants_logits: true,
        })
        .collect()
}

/// Tokens of the long prompt that [`long_prefill`] feeds in chunks of [`LONG_PROMPT_CHUNK`].
const LONG_PROMPT: usize = 2048;
/// The CPU's default token budget of one step (`scheduler.max_batched_tokens`).
const LONG_PROMPT_CHUNK: usize = 512;

/// One sequence's [`LONG_PROMPT`]-token prompt, prefilled in chunks of [`LONG_PROMPT_CHUNK`] as
/// the server's scheduler feeds it: the time of each chunk's step (median of `repeats` passes
/// over the same pages). Later chunks attend over a longer context, so their steps show what
/// prefill attention costs against the projections.
fn long_prefill(model: &Llama<Flex>, repeats: usize) -> Vec<Duration> {
    let cfg = model.config();
    let pages = LONG_PROMPT.div_ceil(PAGE_SIZE);
    let mut cache = PagedKvCache::<Flex>::new(
        cfg.num_layers,
        pages,
        PAGE_SIZE,
        cfg.num_kv_heads * cfg.head_dim,
        &Default::default(),
        DType::F32,
        KvStorage::Host,
    );
    let mut rng = StdRng::seed_from_u64(7);
    let vocab = cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..LONG_PROMPT).map(|_| rng.random_range(0..vocab)).collect();
    let chunks: Vec<SequenceChunk> = prompt
        .chunks(LONG_PROMPT_CHUNK)
        .enumerate()
        .map(|(i, tokens)| SequenceChunk {
            tokens: tokens.to_vec(),
            start_pos: i * LONG_PROMPT_CHUNK,
            block_table: (0..pages as u32).collect(),
            wants_logits: (i + 1) * LONG_PROMPT_CHUNK >= LONG_PROMPT,
        })
        .collect();
    let pass = |cache: &mut PagedKvCache<Flex>| -> Vec<Duration> {
        chunks
            .iter()
            .map(|chunk| {
                let t = Instant::now();
                if let Some(logits) = model.forward_fed(cache, std::slice::from_ref(chunk), None) {
                    logits.into_data();
                }
                t.elapsed()
            })
            .collect()
    };
    // One untimed pass first: the allocator and the backend's first-use costs.
    pass(&mut cache);
    let passes: Vec<Vec<Duration>> = (0..repeats).map(|_| pass(&mut cache)).collect();
    (0..chunks.len())
        .map(|c| median(passes.iter().map(|p| p[c]).collect()))
        .collect()
}

/// Sequences of [`long_decode`]'s batch.
const LONG_DECODE_BATCH: usize = 8;

/// A decode step of [`LONG_DECODE_BATCH`] sequences whose contexts hold about [`LONG_PROMPT`]
/// positions each (the median of `steps`): against the batch-8 step at a short context, what
/// decode attention over the host pages costs. The contexts' K/V rows are written straight into
/// the cache (seeded values, no prefill: attention's cost does not depend on them), each
/// sequence's pages interleaved with the others' as a free list hands them out.
fn long_decode(model: &Llama<Flex>, steps: usize) -> Duration {
    let cfg = model.config();
    let batch = LONG_DECODE_BATCH;
    let filled = LONG_PROMPT - steps - 2;
    let pages_per_seq = LONG_PROMPT.div_ceil(PAGE_SIZE);
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    let mut cache = PagedKvCache::<Flex>::new(
        cfg.num_layers,
        batch * pages_per_seq,
        PAGE_SIZE,
        kv_dim,
        &Default::default(),
        DType::F32,
        KvStorage::Host,
    );
    let table = |s: usize| -> Vec<u32> { (0..pages_per_seq).map(|p| (p * batch + s) as u32).collect() };
    let slots: Vec<i32> = (0..batch)
        .flat_map(|s| {
            let table = table(s);
            (0..filled).map(move |pos| (table[pos / PAGE_SIZE] as usize * PAGE_SIZE + pos % PAGE_SIZE) as i32)
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(11);
    let device = Default::default();
    for layer in 0..cfg.num_layers {
        let mut rows = || {
            let values: Vec<f32> = (0..slots.len() * kv_dim)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            burn::tensor::Tensor::<Flex, 2>::from_data(
                burn::tensor::TensorData::new(values, [slots.len(), kv_dim]),
                &device,
            )
        };
        let (k, v) = (rows(), rows());
        cache.write(layer, &cache.write_slots(slots.clone()), k, v);
    }
    let vocab = cfg.vocab_size as u32;
    let decode = |pos: usize, rng: &mut StdRng| decode_step(batch, pos, &table, vocab, rng);
    // One untimed step first: the allocator's first-use costs.
    model.forward(&mut cache, &decode(filled, &mut rng)).into_data();
    median(
        (0..steps)
            .map(|k| {
                let chunks = decode(filled + 1 + k, &mut rng);
                let t = Instant::now();
                model.forward(&mut cache, &chunks).into_data();
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: nothing to time there.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // As the server runs (see `inferflux::heap`).
    inferflux::heap::keep_freed_memory();
    let embedded = ModelFiles::open(&ModelSource::Embedded).expect("the embedded model");
    let random = LlamaConfig::from_json(RANDOM_CONFIG).expect("the random model's config");
    let cases = [
        Case {
            name: "embedded tiny",
            config: embedded.config.clone(),
            checkpoint: embedded.checkpoint,
            prompt_len: 128,
            decode_steps: 64,
            prefill_repeats: 5,
        },
        Case {
            name: "random 110M",
            checkpoint: random_checkpoint(&random),
            config: random,
            prompt_len: 128,
            decode_steps: 16,
            prefill_repeats: 3,
        },
    ];
    println!(
        "{:<14} {:>7} {:>11} {:>5} {:>7} {:>14} {:>13} {:>14}",
        "model",
        "params",
        "projections",
        "batch",
        "prompt",
        "prefill tok/s",
        "decode tok/s",
        "decode ms/step"
    );
    for case in &cases {
        let index = case.checkpoint.index().expect("checkpoint index");
        let load = |layout| {
            Llama::<Flex>::load_shard_in(
                &case.config,
                &index,
                (&Default::default(), DType::F32),
                None,
                layout,
            )
            .expect("load")
            .with_fused_ops(Some(cpu_fused::fused_ops()))
        };
        // The skinny GEMM's baseline: RoPE, RMSNorm and the activation over host rows as in the
        // server (`model::cpu_fused`), and Flex's `matmul` for every projection, weights `[in, out]`.
        let flex = load(WeightLayout::InOut);
        // As the server runs it: weights as the checkpoint's `[out, in]`, and the skinny GEMM for
        // 1 to 16 rows (`model::cpu_gemm`).
        let server = load(WeightLayout::OutIn).with_projection(Some(cpu_gemm::projection()));
        let runs = [
            ("server", &server, 1),
            ("server", &server, 2),
            ("server", &server, 8),
            ("flex", &flex, 8),
        ];
        let rows: Vec<Row> = runs
            .iter()
            .map(|&(_, model, b)| measure(model, case, b))
            .collect();
        for ((projections, _, _), r) in runs.iter().zip(&rows) {
            println!(
                "{:<14} {:>6.1}M {:>11} {:>5} {:>7} {:>14.1} {:>13.1} {:>14.2}",
                case.name,
                parameters(&case.config) as f64 / 1e6,
                projections,
                r.batch,
                case.prompt_len,
                r.prefill_tok_s,
                r.decode_tok_s,
                r.decode_step_ms
            );
        }
        println!(
            "{:<14} decode tok/s batch 8 / batch 1: {:.2}x; batch 8, skinny GEMM / Flex matmul: {:.2}x",
            case.name,
            rows[2].decode_tok_s / rows[0].decode_tok_s,
            rows[2].decode_tok_s / rows[3].decode_tok_s
        );
        if case.config.max_position_embeddings < LONG_PROMPT {
            continue;
        }
        let steps = long_prefill(&server, case.prefill_repeats);
        let total: Duration = steps.iter().sum();
        println!(
            "{:<14} prompt {LONG_PROMPT} in chunks of {LONG_PROMPT_CHUNK}: {:.1} tok/s; ms per chunk: {}",
            case.name,
            tok_per_s(LONG_PROMPT, total),
            steps
                .iter()
                .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let step = long_decode(&server, case.decode_steps);
        println!(
            "{:<14} decode batch {LONG_DECODE_BATCH} at context {LONG_PROMPT}: {:.1} tok/s, {:.2} ms/step \
             ({:.2}x the step at context {})",
            case.name,
            tok_per_s(LONG_DECODE_BATCH, step),
            step.as_secs_f64() * 1000.0,
            step.as_secs_f64() * 1000.0 / rows[2].decode_step_ms,
            case.prompt_len
        );
    }
}
