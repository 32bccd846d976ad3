//! The fixtures' transformers goldens and the forward-pass drivers that hold a model to them
//! (`model_goldens` on the CPU, `model_device_kernels` with the GPU's kernels). Included with
//! `#[path]` beside `forward.rs`, whose helpers it uses.
#![allow(dead_code)]

use burn::prelude::Backend;
use burn::tensor::Tensor;
use inferflux::model::{KvStorage, Llama, ModelFiles, ModelSource, PagedKvCache, SequenceChunk};
use serde::Deserialize;

use super::forward::{argmax, block_table, logits_rows, NUM_PAGES, PAGE_SIZE};

/// A fixture's checkpoint files and its goldens.
pub fn read_fixture(name: &str) -> (ModelFiles, Goldens) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let files = ModelFiles::open(&ModelSource::Dir(dir.clone())).unwrap();
    let goldens: Goldens =
        serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap()).unwrap();
    (files, goldens)
}

#[derive(Deserialize)]
pub struct Goldens {
    pub prompts: Vec<GoldenPrompt>,
    /// Conversations rendered by `apply_chat_template` (fixtures with a chat template).
    #[serde(default)]
    pub chat: Vec<GoldenPrompt>,
}

#[derive(Deserialize)]
pub struct GoldenPrompt {
    /// Plain prompts only; chat entries are held to their token ids.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Chat entries only: the conversation and what `apply_chat_template` made of it.
    #[serde(default)]
    pub messages: Vec<GoldenMessage>,
    #[serde(default)]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub rendered: Option<String>,
    pub input_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
pub struct GoldenMessage {
    pub role: String,
    pub content: String,
}

/// The last position's logits of `p`'s whole prompt in one chunk, on a fresh cache.
pub fn prompt_logits<B: Backend>(model: &Llama<B>, storage: KvStorage, p: &GoldenPrompt) -> Vec<f32> {
    let mut cache = new_cache(model, storage);
    let chunk = SequenceChunk {
        tokens: p.input_ids.clone(),
        start_pos: 0,
        block_table: block_table(0, 1, p.input_ids.len()),
        wants_logits: true,
    };
    logits_rows(model.forward(&mut cache, &[chunk])).remove(0)
}

/// A page pool in `storage` (the server's CPU path uses host storage, CUDA device storage), of
/// the model's dtype.
pub fn new_cache<B: Backend>(model: &Llama<B>, storage: KvStorage) -> PagedKvCache<B> {
    let c = model.config();
    PagedKvCache::new(
        c.num_layers,
        NUM_PAGES,
        PAGE_SIZE,
        c.num_kv_heads * c.head_dim,
        &Default::default(),
        model.dtype(),
        storage,
    )
}

/// `got` within 1e-4 of transformers' logits `want` (f32).
pub fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_close_within(got, want, 1e-4, what);
}

pub fn assert_close_within(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: vocab size");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tolerance, "{what}: max |logit - transformers| = {worst}");
}

/// Greedy decoding of every prompt at once: one batched prefill (each prompt cut into chunks of
/// `chunk` tokens), then batched decode steps.
pub fn greedy_batched<B: Backend>(
    model: &Llama<B>,
    cases: &[&GoldenPrompt],
    chunk: usize,
    storage: KvStorage,
) -> Vec<Vec<u32>> {
    let host_argmax = |logits: Tensor<B, 2>| logits_rows(logits).iter().map(|r| argmax(r)).collect();
    greedy_batched_by(model, cases, chunk, storage, host_argmax)
}

/// [`greedy_batched`], each step's tokens chosen by `pick` from its `[rows, vocab]` logits.
pub fn greedy_batched_by<B: Backend>(
    model: &Llama<B>,
    cases: &[&GoldenPrompt],
    chunk: usize,
    storage: KvStorage,
    pick: impl FnMut(Tensor<B, 2>) -> Vec<u32>,
) -> Vec<Vec<u32>> {
    let mut cache = new_cache(model, storage);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|p| p.input_ids.clone()).collect();
    let steps = cases[0].greedy_ids.len();
    greedy_chunked(model, &mut cache, &prompts, (steps, chunk), pick)
}

/// Greedy decoding of every prompt at once on `cache`: one batched prefill (each prompt cut into
/// chunks of `chunk` tokens, so a step may want no logits), then batched decode steps until each
/// has `steps` tokens; `pick` chooses a step's tokens from its `[rows, vocab]` logits (the
/// model's dtype), a row per chunk that ends its prompt or decodes.
pub fn greedy_chunked<B: Backend>(
    model: &Llama<B>,
    cache: &mut PagedKvCache<B>,
    prompts: &[Vec<u32>],
    (steps, chunk): (usize, usize),
    mut pick: impl FnMut(Tensor<B, 2>) -> Vec<u32>,
) -> Vec<Vec<u32>> {
    let n = prompts.len();
    let mut seqs = prompts.to_vec();
    let total_max = seqs.iter().map(|s| s.len()).max().unwrap() + steps;
    let tables: Vec<Vec<u32>> = (0..n).map(|i| block_table(i, n, total_max)).collect();
    let mut computed = vec![0usize; n];
    let mut out = vec![Vec::new(); n];
    while out.iter().any(|o| o.len() < steps) {
        let mut chunks = Vec::new();
        let mut owners = Vec::new();
        for i in (0..n).filter(|&i| out[i].len() < steps) {
            let end = computed[i].saturating_add(chunk).min(seqs[i].len());
            chunks.push(SequenceChunk {
                tokens: seqs[i][computed[i]..end].to_vec(),
                start_pos: computed[i],
                block_table: tables[i].clone(),
                wants_logits: end == seqs[i].len(),
            });
            owners.push((i, end));
        }
        // As the executor runs a step: the head's logits in the model's type, none for a step
        // that wants none.
        let picked = model
            .forward_fed(cache, &chunks, None)
            .map_or_else(Vec::new, &mut pick);
        let mut next_of = picked.into_iter();
        for (chunk, (i, end)) in chunks.iter().zip(owners) {
            computed[i] = end;
            if chunk.wants_logits {
                let next = next_of.next().unwrap();
                seqs[i].push(next);
                out[i].push(next);
            }
        }
    }
    out
}
