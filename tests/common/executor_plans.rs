//! The executor tests' sequences and plans (`executor_sampling` on the CPU, `model_device_kernels`
//! with the GPU's sampling kernels): the fixture's prompts, one sampling setting of each kind, and
//! steps planned with every token known or fed back from a held step. Included with `#[path]`
//! beside `forward.rs`, whose block tables it uses.
#![allow(dead_code)]

use std::sync::Arc;

use burn::prelude::Backend;
use inferflux::actors::executor::{ExecuteStep, ModelExecutor, SampledToken};
use inferflux::kv::SeqId;
use inferflux::sampling::{SamplingParams, TokenHistory};
use inferflux::scheduler::PlannedChunk;

use super::forward::block_table;

/// Decode steps after the prompts' step.
pub const STEPS: usize = 2;

pub fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..Default::default()
    }
}

/// One sampling setting per sequence; `best` is the plain argmax the sequence's first row has,
/// so that bias and `min_tokens` can ban exactly the token greedy would pick.
pub fn settings(best: &[u32]) -> Vec<SamplingParams> {
    let ban = |i: usize| Arc::from([best[i]]);
    vec![
        greedy(),
        // Warpers do not change a greedy pick.
        SamplingParams {
            top_k: 5,
            top_p: 0.5,
            ..greedy()
        },
        SamplingParams {
            temperature: 1e-6,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.8,
            seed: 3,
            ..Default::default()
        },
        SamplingParams {
            logprobs: Some(3),
            ..greedy()
        },
        SamplingParams {
            temperature: 0.7,
            seed: 9,
            logprobs: Some(2),
            ..Default::default()
        },
        SamplingParams {
            logit_bias: Arc::from([(best[6], -100.0)]),
            ..greedy()
        },
        SamplingParams {
            repetition_penalty: 1.3,
            ..greedy()
        },
        SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            ..greedy()
        },
        // Banned at index 0, plain greedy from index 1 on.
        SamplingParams {
            min_tokens: 1,
            min_tokens_banned: ban(9),
            ..greedy()
        },
    ]
}

/// Sequence `i`'s prompt: the fixture's prompts, cut to different lengths.
pub fn prompts(n: usize) -> Vec<Vec<u32>> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/goldens.json");
    let goldens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = goldens["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    (0..n)
        .map(|i| {
            let p = &ids[i % ids.len()];
            p[..p.len().min(3 + i)].to_vec()
        })
        .collect()
}

pub fn history(seq: &[u32], prompt_len: usize) -> TokenHistory {
    TokenHistory {
        tokens: seq.iter().copied().collect(),
        prompt_len,
    }
}

/// The steps of `prompts` (three: the prompts, then two decodes) with every token known when
/// the step is planned, read back one at a time.
pub fn with_tokens_known<B: Backend>(
    mut executor: ModelExecutor<B>,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
) -> Vec<Vec<SampledToken>> {
    let mut seqs = prompts.to_vec();
    let mut steps = Vec::new();
    for step in 0..=STEPS {
        let plan = decode_plan(prompts, params, step, &seqs);
        let sampled = executor.run_step(None, plan).unwrap();
        for (s, seq) in sampled.iter().zip(&mut seqs) {
            seq.push(s.token);
        }
        steps.push(sampled);
    }
    steps
}

/// Step `step` of `prompts`: every prompt whole at step 0, then one decode each. `known[i]` is
/// what the planner knows of sequence `i` (its prompt and generated tokens): its last token is
/// the decode's input when the previous step's is known, else the input is `FED_BACK`; with a
/// penalty, it is the row's history. (The block tables cover `STEPS + 1` steps.)
pub fn decode_plan(
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    step: usize,
    known: &[Vec<u32>],
) -> Vec<PlannedChunk> {
    let n = prompts.len();
    (0..n)
        .map(|i| {
            let p = prompts[i].len();
            let fed_back = step > 0 && known[i].len() < p + step;
            let (tokens, start_pos) = match step {
                0 => (prompts[i].clone(), 0),
                _ if fed_back => (vec![inferflux::scheduler::FED_BACK], p + step - 1),
                _ => (vec![known[i][p + step - 1]], p + step - 1),
            };
            PlannedChunk {
                seq: SeqId(i as u64),
                tokens,
                start_pos,
                block_table: block_table(i, n, p + STEPS),
                wants_logits: true,
                fed_back,
                sampling: params[i].clone(),
                generated_index: step,
                history: params[i].has_penalties().then(|| history(&known[i], p)),
                page_copies: Vec::new(),
                swap_in: false,
            }
        })
        .collect()
}

/// The steps of [`with_tokens_known`] queued as the scheduler overlaps them: each with
/// `read_later`, read back only once the next is queued behind it (its fed-back inputs then come
/// from the held step's ids), the last on `read_held_step`.
pub fn held_steps<B: Backend>(
    executor: &mut ModelExecutor<B>,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
) -> Vec<Vec<SampledToken>> {
    let mut known = prompts.to_vec();
    let mut got: Vec<Vec<SampledToken>> = Vec::new();
    let mut held = None;
    for step in 0..=STEPS {
        let mut receipt = executor.execute(ExecuteStep {
            step: step as u64 + 1,
            follows: (step > 0).then_some(step as u64),
            read_later: true,
            swap_out: None,
            plan: decode_plan(prompts, params, step, &known),
        });
        assert!(
            receipt.0.try_recv().is_err(),
            "step {step} was read back before another was queued behind it"
        );
        // The step before is read back now: the planner knows its tokens for the next plan.
        if let Some(mut before) = held.replace(receipt) {
            let sampled: Vec<SampledToken> = before.0.try_recv().expect("read back").unwrap();
            for (s, seq) in sampled.iter().zip(&mut known) {
                seq.push(s.token);
            }
            got.push(sampled);
        }
    }
    executor.read_held_step();
    got.push(held.unwrap().0.try_recv().expect("read back").unwrap());
    got
}
