//! The decoder forward pass held to transformers' numbers for every supported architecture:
//! last-position logits within 1e-4 (f32) and 24-token greedy continuations token-identical,
//! through the paged cache, whole-prompt, chunked and batched, for plain prompts and for
//! chat-template prompts.

use burn::backend::Flex;
use burn::tensor::DType;
use inferflux::model::{
    ChatMessage, KvStorage, Llama, ModelFiles, PagedKvCache, SequenceChunk, WeightLayout,
};

type B = Flex;

#[path = "common/forward.rs"]
mod forward;
use forward::{argmax, block_table, logits_rows};
#[path = "common/goldens.rs"]
mod goldens;
use goldens::{assert_close, greedy_batched, new_cache, prompt_logits, read_fixture, GoldenPrompt, Goldens};

fn fixture(name: &str) -> (Llama<B>, ModelFiles, Goldens) {
    fixture_in(name, WeightLayout::InOut)
}

/// [`fixture`] with the projection weights kept as `layout` says.
fn fixture_in(name: &str, layout: WeightLayout) -> (Llama<B>, ModelFiles, Goldens) {
    let (files, goldens) = read_fixture(name);
    let index = files.checkpoint.index().unwrap();
    let model = Llama::<B>::load_shard_in(
        &files.config,
        &index,
        (&Default::default(), DType::F32),
        None,
        layout,
    )
    .unwrap();
    drop(index);
    (model, files, goldens)
}

/// Every golden prompt at once, prefilled in 7-token chunks on device K/V storage, then decoded
/// greedily: transformers' tokens.
fn assert_chunked_greedy_on_device(model: &Llama<B>, goldens: &Goldens, name: &str) {
    let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
    assert_eq!(
        greedy_batched(model, &cases, 7, KvStorage::Device),
        want,
        "{name}: greedy"
    );
}

/// The steps of [`greedy_batched`]'s schedule in which no chunk wants logits, and their tokens:
/// such a step stops at the last layer's K/V write (the schedule depends on the prompts'
/// lengths only, not on the tokens).
fn steps_without_logits(cases: &[&GoldenPrompt], chunk: usize) -> (usize, usize) {
    let steps = cases[0].greedy_ids.len();
    let mut lens: Vec<usize> = cases.iter().map(|p| p.input_ids.len()).collect();
    let (mut computed, mut out) = (vec![0usize; cases.len()], vec![0usize; cases.len()]);
    let (mut none_steps, mut none_tokens) = (0, 0);
    while out.iter().any(|&o| o < steps) {
        let live: Vec<usize> = (0..cases.len()).filter(|&i| out[i] < steps).collect();
        let ends: Vec<usize> = live.iter().map(|&i| (computed[i] + chunk).min(lens[i])).collect();
        if live.iter().zip(&ends).all(|(&i, &end)| end < lens[i]) {
            none_steps += 1;
            none_tokens += live
                .iter()
                .zip(&ends)
                .map(|(&i, &end)| end - computed[i])
                .sum::<usize>();
        }
        for (&i, &end) in live.iter().zip(&ends) {
            computed[i] = end;
            if end == lens[i] {
                lens[i] += 1;
                out[i] += 1;
            }
        }
    }
    (none_steps, none_tokens)
}

fn check_fixture(name: &str) {
    check_fixture_through(name, WeightLayout::InOut, |model| model);
}

/// [`check_fixture`] of the model loaded with `layout`, as `setup` leaves it.
fn check_fixture_through(name: &str, layout: WeightLayout, setup: fn(Llama<B>) -> Llama<B>) {
    let (model, files, goldens) = fixture_in(name, layout);
    let model = setup(model);
    let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().chain(&goldens.chat).collect();
    for p in &cases {
        if let Some(prompt) = &p.prompt {
            let ids = files
                .tokenizer
                .encode(prompt.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(ids, p.input_ids, "tokenization of {prompt:?}");
        }
        let logits = prompt_logits(&model, KvStorage::Host, p);
        assert_close(&logits, &p.last_logits, &format!("{name} {:?}", p.input_ids));
    }
    let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
    assert_eq!(
        greedy_batched(&model, &cases, usize::MAX, KvStorage::Host),
        want,
        "{name}: batched greedy"
    );
    assert_eq!(
        greedy_batched(&model, &cases, 7, KvStorage::Host),
        want,
        "{name}: chunked prefill (7) greedy"
    );
    assert_eq!(
        greedy_batched(&model, &cases, 7, KvStorage::Device),
        want,
        "{name}: chunked prefill (7) greedy, K/V in device tensors written by scatter"
    );
    check_decode_groups(&model, &cases, name);
}

/// One step that decodes every prompt at once (contexts of different lengths, so attention
/// groups and pads them) gives each sequence the logits it gets decoding alone, to 1e-5.
fn check_decode_groups(model: &Llama<B>, cases: &[&GoldenPrompt], name: &str) {
    let n = cases.len();
    let tables: Vec<Vec<u32>> = cases
        .iter()
        .enumerate()
        .map(|(i, p)| block_table(i, n, p.input_ids.len() + 1))
        .collect();
    let prefill = |cache: &mut PagedKvCache<B>, i: usize| {
        let p = cases[i];
        model.forward(
            cache,
            &[SequenceChunk {
                tokens: p.input_ids.clone(),
                start_pos: 0,
                block_table: tables[i].clone(),
                wants_logits: true,
            }],
        );
    };
    let decode = |i: usize| SequenceChunk {
        tokens: vec![cases[i].greedy_ids[0]],
        start_pos: cases[i].input_ids.len(),
        block_table: tables[i].clone(),
        wants_logits: true,
    };
    let mut cache = new_cache(model, KvStorage::Host);
    (0..n).for_each(|i| prefill(&mut cache, i));
    let together = logits_rows(model.forward(&mut cache, &(0..n).map(decode).collect::<Vec<_>>()));
    for (i, row) in together.iter().enumerate() {
        let mut alone_cache = new_cache(model, KvStorage::Device);
        prefill(&mut alone_cache, i);
        let alone = logits_rows(model.forward(&mut alone_cache, &[decode(i)]));
        let worst = alone[0]
            .iter()
            .zip(row)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "{name} prompt {i}: decoded together vs alone differ by {worst}"
        );
    }
}

#[test]
fn paged_kv_llama_f32_matches_transformers() {
    check_fixture("tiny-llama");
}

/// The model as the server runs it on the CPU: weights as the checkpoint's `[out, in]`;
/// `model::cpu_gemm`'s skinny GEMM for them serves the steps that decode the five prompts at
/// once (5 rows), and the later steps of the chunked prefill (one 7-token chunk beside the
/// others' decodes); Flex's `matmul` the single rows and the longer steps. `model::cpu_fused`
/// runs every RoPE, RMSNorm (Qwen3's q/k norms too) and activation. The row-major `[in, out]`
/// kernel is checked the same way.
#[test]
fn model_cpu_server_kernels_match_transformers() {
    fn as_the_server_runs_it(model: Llama<B>) -> Llama<B> {
        model
            .with_projection(Some(inferflux::model::cpu_gemm::projection()))
            .with_fused_ops(Some(inferflux::model::cpu_fused::fused_ops()))
    }
    for name in [
        "tiny-llama",
        "tiny-llama3",
        "tiny-mistral",
        "tiny-qwen2",
        "tiny-qwen3",
    ] {
        check_fixture_through(name, WeightLayout::OutIn, as_the_server_runs_it);
    }
    check_fixture_through("tiny-llama3", WeightLayout::InOut, as_the_server_runs_it);
}

#[test]
fn paged_kv_llama_bf16_sharded_tied_matches_transformers() {
    check_fixture("tiny-llama-tied-bf16");
}

#[test]
fn model_llama3_rope_scaling_head_dim_tied_matches_transformers() {
    check_fixture("tiny-llama3");
}

#[test]
fn model_mistral_sliding_window_matches_transformers() {
    check_fixture("tiny-mistral");
}

#[test]
fn model_qwen2_qkv_bias_matches_transformers() {
    check_fixture("tiny-qwen2");
}

#[test]
fn model_qwen3_qk_norm_matches_transformers() {
    check_fixture("tiny-qwen3");
}

/// Every conversation of every chat fixture renders to transformers' text and token ids.
#[test]
fn chat_template_renders_like_transformers_apply_chat_template() {
    for name in ["tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"] {
        let (_, files, goldens) = fixture(name);
        let template = files.chat_template.as_ref().expect("fixture has a chat template");
        assert!(goldens.chat.len() >= 4, "{name}: conversations");
        for (i, chat) in goldens.chat.iter().enumerate() {
            let messages: Vec<ChatMessage> = chat
                .messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            let text = template.render(&messages, chat.add_generation_prompt).unwrap();
            assert_eq!(Some(&text), chat.rendered.as_ref(), "{name} conversation {i}");
            let ids = files
                .tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(ids, chat.input_ids, "{name} conversation {i}: token ids");
        }
    }
}

/// The checkpoint's `[out, in]` weights read through a transposed view (`WeightLayout::OutIn`,
/// what CUDA's GEMV kernels want), with every projection routed through a projection hook (how
/// the server runs a chosen CUDA kernel), give transformers' logits and greedy tokens: the hook
/// sees each layer's seven projections and `lm_head`, and nothing else. With the fused ops, gate
/// and up are one merged `[out, in]` weight: six projections per layer.
/// A step whose chunks want no logits (a prompt's chunks before its last) runs no head: no
/// projection of zero rows, which CUDA refuses to launch (the tiny fixtures' 7-token chunks
/// failed there with `CUDA_ERROR_INVALID_VALUE`). Its K/V is written all the same: the decode
/// after it gives transformers' greedy tokens.
#[test]
fn model_a_step_without_logits_runs_no_head() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (model, _, goldens) = fixture("tiny-llama");
    let (calls, empty) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, empties) = (calls.clone(), empty.clone());
    let hook: inferflux::model::ProjectFn<B> = Arc::new(move |x, w| {
        counted.fetch_add(1, Ordering::Relaxed);
        if x.dims()[0] == 0 {
            empties.fetch_add(1, Ordering::Relaxed);
        }
        x.matmul(w)
    });
    let model = model.with_projection(Some(hook));
    let p = &goldens.prompts[0];
    let split = p.input_ids.len() / 2;
    let table = block_table(0, 1, p.input_ids.len() + p.greedy_ids.len());
    let mut cache = new_cache(&model, KvStorage::Device);
    let chunk = |tokens: &[u32], start_pos: usize, wants_logits: bool| SequenceChunk {
        tokens: tokens.to_vec(),
        start_pos,
        block_table: table.clone(),
        wants_logits,
    };
    let first = chunk(&p.input_ids[..split], 0, false);
    assert!(model.forward_fed(&mut cache, &[first], None).is_none());
    assert!(calls.load(Ordering::Relaxed) > 0, "the layers' projections ran");
    assert_eq!(empty.load(Ordering::Relaxed), 0, "a projection of zero rows");
    let rest = chunk(&p.input_ids[split..], split, true);
    let mut seq = p.input_ids.clone();
    let mut next = argmax(&logits_rows(model.forward(&mut cache, &[rest])).remove(0));
    let mut greedy = vec![next];
    while greedy.len() < p.greedy_ids.len() {
        seq.push(next);
        let decode = chunk(&[next], seq.len() - 1, true);
        next = argmax(&logits_rows(model.forward(&mut cache, &[decode])).remove(0));
        greedy.push(next);
    }
    assert_eq!(greedy, p.greedy_ids);
    // `forward` gives such a step's logits as an empty matrix.
    let mut cache = new_cache(&model, KvStorage::Device);
    let none = model.forward(&mut cache, &[chunk(&p.input_ids[..split], 0, false)]);
    assert_eq!(none.dims(), [0, model.config().vocab_size]);
}

#[test]
fn model_out_in_weights_through_a_projection_hook_match_transformers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for name in ["tiny-llama-tied-bf16", "tiny-qwen2"] {
        let (_, files, goldens) = fixture(name);
        let index = files.checkpoint.index().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let hook: inferflux::model::ProjectFn<B> = Arc::new(move |x, w| {
            counted.fetch_add(1, Ordering::Relaxed);
            x.matmul(w)
        });
        let model = Llama::<B>::load_shard_in(
            &files.config,
            &index,
            (&Default::default(), DType::F32),
            None,
            WeightLayout::OutIn,
        )
        .unwrap()
        .with_projection(Some(hook));
        let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
        for p in &cases {
            let mut cache = new_cache(&model, KvStorage::Host);
            let chunk = SequenceChunk {
                tokens: p.input_ids.clone(),
                start_pos: 0,
                block_table: block_table(0, 1, p.input_ids.len()),
                wants_logits: true,
            };
            let before = calls.load(Ordering::Relaxed);
            let rows = logits_rows(model.forward(&mut cache, &[chunk]));
            assert_eq!(
                calls.load(Ordering::Relaxed) - before,
                7 * model.config().num_layers + 1,
                "{name}: projections through the hook in one step"
            );
            assert_close(
                &rows[0],
                &p.last_logits,
                &format!("{name} out_in {:?}", p.input_ids),
            );
        }
        let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
        assert_eq!(
            greedy_batched(&model, &cases, 7, KvStorage::Host),
            want,
            "{name}: out_in chunked prefill (7) greedy"
        );
        // With the fused ops (as CUDA serves), gate and up merge into one `[out, in]` weight.
        use inferflux::model::llama::{add_rms_norm, rms_norm, rotate_half_rope, silu_mul_halves};
        let model = model.with_fused_ops(Some(inferflux::model::FusedOps {
            rms_norm: Arc::new(rms_norm),
            add_rms_norm: Arc::new(add_rms_norm),
            silu_mul: Arc::new(silu_mul_halves),
            gate_up_act: None,
            norm_project: None,
            norm_qkv_write: None,
            rope: Arc::new(|x, cos, sin| rotate_half_rope(x, &cos, &sin)),
            qkv_write: None,
            embed: None,
        }));
        for p in &cases {
            let before = calls.load(Ordering::Relaxed);
            let logits = prompt_logits(&model, KvStorage::Host, p);
            assert_eq!(
                calls.load(Ordering::Relaxed) - before,
                6 * model.config().num_layers + 1,
                "{name}: projections with gate and up merged"
            );
            assert_close(&logits, &p.last_logits, &format!("{name} out_in merged gate/up"));
        }
        assert_eq!(
            greedy_batched(&model, &cases, 7, KvStorage::Device),
            want,
            "{name}: out_in merged gate/up greedy"
        );
        // With the activation hook (CUDA's fused GEMV at decode-sized batches), the gate/up
        // projection leaves the projection hook: a host twin here, for rows up to 4.
        use burn::tensor::Tensor;
        let acts = Arc::new(AtomicUsize::new(0));
        let counted = acts.clone();
        let model = model.with_fused_ops(Some(inferflux::model::FusedOps {
            rms_norm: Arc::new(rms_norm),
            add_rms_norm: Arc::new(add_rms_norm),
            silu_mul: Arc::new(silu_mul_halves),
            gate_up_act: Some(Arc::new(move |h: Tensor<B, 2>, w: Tensor<B, 2>| {
                (h.dims()[0] <= 4).then(|| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    silu_mul_halves(h.matmul(w))
                })
            })),
            norm_project: None,
            norm_qkv_write: None,
            rope: Arc::new(|x, cos, sin| rotate_half_rope(x, &cos, &sin)),
            qkv_write: None,
            embed: None,
        }));
        let layers = model.config().num_layers;
        for p in &cases {
            let (before, acts_before) = (calls.load(Ordering::Relaxed), acts.load(Ordering::Relaxed));
            let logits = prompt_logits(&model, KvStorage::Host, p);
            let (projected, fused) = (
                calls.load(Ordering::Relaxed) - before,
                acts.load(Ordering::Relaxed) - acts_before,
            );
            // A prompt of more than 4 tokens takes the projection and `silu_mul`, but in the
            // last layer, which carries only the row whose logits are wanted.
            let expect_fused = if p.input_ids.len() <= 4 { layers } else { 1 };
            assert_eq!(fused, expect_fused, "{name}: activations through the hook");
            assert_eq!(
                projected,
                6 * layers + 1 - fused,
                "{name}: projections beside the hook"
            );
            assert_close(
                &logits,
                &p.last_logits,
                &format!("{name} out_in gate/up activation hook"),
            );
        }
        assert_eq!(
            greedy_batched(&model, &cases, 7, KvStorage::Device),
            want,
            "{name}: out_in gate/up activation hook greedy"
        );
        assert!(
            acts.load(Ordering::Relaxed) > 0,
            "{name}: decodes went through the hook"
        );
    }
}

#[test]
fn model_paged_attention_hook_matches_transformers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // tiny-mistral's window (8) makes contexts start after position 0; tiny-qwen3 has GQA.
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen3"] {
        let (model, _, goldens) = fixture(name);
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        let attend: inferflux::model::PagedAttentionFn<B> = Arc::new(move |a| {
            counted.fetch_add(a.q.dims()[0], Ordering::Relaxed);
            inferflux::model::llama::gathered_paged_attention(a)
        });
        let model = model.with_paged_attention(Some(attend));
        let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
        let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
        assert_eq!(
            greedy_batched(&model, &cases, 7, KvStorage::Device),
            want,
            "{name}: greedy with attention through block tables"
        );
        // Every token of the run went through the hook once per layer: the prompts in 7-token
        // chunks (far below PAGED_CHUNK_MAX_WORK), then each fed-back token but the last; in
        // the last layer, not the tokens of steps that want no logits.
        let tokens: usize = cases
            .iter()
            .map(|p| p.input_ids.len() + p.greedy_ids.len() - 1)
            .sum();
        let (_, without_logits) = steps_without_logits(&cases, 7);
        assert!(
            without_logits > 0,
            "{name}: the schedule has steps without logits"
        );
        assert_eq!(
            queries.load(Ordering::Relaxed),
            tokens * model.config().num_layers - without_logits,
            "{name}: queries through the hook"
        );
        // None with host storage (no device pages).
        queries.store(0, Ordering::Relaxed);
        assert_eq!(greedy_batched(&model, &cases, 7, KvStorage::Host), want);
        assert_eq!(queries.load(Ordering::Relaxed), 0, "{name}: host storage gathers");
    }
}

/// A step's integer arrays (positions, write slots, tokens, the block tables and bounds, row
/// orders) uploaded at once, each a view of the one upload, as a GPU takes them
/// (`model::step_indices`): transformers' tokens through block tables, batched decode groups on
/// host pages and prompt chunks, in one upload per step.
#[test]
fn paged_kv_one_upload_of_a_steps_indices_matches_transformers() {
    use inferflux::model::step_indices::{slice_view, IndexViewFn};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen3"] {
        let (model, _, goldens) = fixture(name);
        let views = Arc::new(AtomicUsize::new(0));
        let counted = views.clone();
        let slice = slice_view::<B>();
        let view: IndexViewFn<B> = Arc::new(move |all, range| {
            counted.fetch_add(1, Ordering::Relaxed);
            slice(all, range)
        });
        let attend: inferflux::model::PagedAttentionFn<B> =
            Arc::new(inferflux::model::llama::gathered_paged_attention);
        let model = model
            .with_paged_attention(Some(attend))
            .with_index_view(Some(view));
        let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
        let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
        for storage in [KvStorage::Device, KvStorage::Host] {
            assert_eq!(
                greedy_batched(&model, &cases, 7, storage),
                want,
                "{name}: greedy, {storage:?} storage"
            );
            assert_eq!(model.last_step_index_uploads(), 1, "{name}: {storage:?} storage");
        }
        check_decode_groups(&model, &cases, name);
        assert_eq!(model.last_step_index_uploads(), 1, "{name}: decode groups");
        assert!(views.load(Ordering::Relaxed) > 0, "{name}: no array was viewed");
    }
}

#[test]
fn model_fused_ops_hooks_match_transformers() {
    use inferflux::model::llama::{add_rms_norm, rms_norm, rotate_half_rope, silu_mul_halves};
    use inferflux::model::FusedOps;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // tiny-qwen3 normalises q and k per head as well.
    for (name, qk_norms_per_layer) in [("tiny-llama", 0), ("tiny-qwen3", 2)] {
        let (model, _, goldens) = fixture(name);
        let counters: [Arc<AtomicUsize>; 4] = Default::default();
        let [norms, add_norms, acts, ropes] = counters.clone();
        let [n, an, a, r] = counters;
        let fused = FusedOps::<B> {
            embed: None,
            rms_norm: Arc::new(move |x, w, eps| {
                n.fetch_add(1, Ordering::Relaxed);
                rms_norm(x, w, eps)
            }),
            add_rms_norm: Arc::new(move |x, delta, w, eps| {
                an.fetch_add(1, Ordering::Relaxed);
                add_rms_norm(x, delta, w, eps)
            }),
            silu_mul: Arc::new(move |gate_up| {
                a.fetch_add(1, Ordering::Relaxed);
                silu_mul_halves(gate_up)
            }),
            gate_up_act: None,
            norm_project: None,
            norm_qkv_write: None,
            rope: Arc::new(move |x, cos, sin| {
                r.fetch_add(1, Ordering::Relaxed);
                rotate_half_rope(x, &cos, &sin)
            }),
            qkv_write: None,
        };
        // With the fused ops, gate and up are one projection: 6 per layer plus lm_head.
        let projections = Arc::new(AtomicUsize::new(0));
        let counted = projections.clone();
        let model = model.with_fused_ops(Some(fused)).with_projection(Some(Arc::new(
            move |x: burn::Tensor<B, 2>, w: burn::Tensor<B, 2>| {
                counted.fetch_add(1, Ordering::Relaxed);
                x.matmul(w)
            },
        )));
        let layers = model.config().num_layers;
        let p = &goldens.prompts[0];
        let logits = prompt_logits(&model, KvStorage::Host, p);
        assert_close(&logits, &p.last_logits, &format!("{name} fused ops"));
        // The first layer's norm alone; every later one (the final norm too) with its residual.
        assert_eq!(
            norms.load(Ordering::Relaxed),
            1 + qk_norms_per_layer * layers,
            "{name}: RMSNorms without a residual per step"
        );
        assert_eq!(
            add_norms.load(Ordering::Relaxed),
            2 * layers,
            "{name}: residual adds with their RMSNorm per step"
        );
        assert_eq!(
            acts.load(Ordering::Relaxed),
            layers,
            "{name}: MLP activations per step"
        );
        assert_eq!(
            ropes.load(Ordering::Relaxed),
            2 * layers,
            "{name}: RoPE of q and k per layer"
        );
        assert_eq!(
            projections.load(Ordering::Relaxed),
            6 * layers + 1,
            "{name}: projections per step, gate and up merged"
        );
        assert_chunked_greedy_on_device(&model, &goldens, name);
    }
}

#[test]
fn model_fused_qkv_write_hook_matches_transformers() {
    use inferflux::model::llama::{
        add_rms_norm, rms_norm, rope_qk_and_write_kv, rotate_half_rope, silu_mul_halves,
    };
    use inferflux::model::FusedOps;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // tiny-qwen3 normalises q and k per head before their RoPE; tiny-mistral has a sliding
    // window; tiny-qwen2 has q/k/v biases (merged with the weights).
    for name in ["tiny-llama", "tiny-qwen3", "tiny-mistral", "tiny-qwen2"] {
        let (model, _, goldens) = fixture(name);
        let counters: [Arc<AtomicUsize>; 3] = Default::default();
        let [writes, ropes, projections] = counters.clone();
        let [w, r, pr] = counters;
        let fused = FusedOps::<B> {
            embed: None,
            rms_norm: Arc::new(rms_norm),
            add_rms_norm: Arc::new(add_rms_norm),
            silu_mul: Arc::new(silu_mul_halves),
            gate_up_act: None,
            norm_project: None,
            norm_qkv_write: None,
            rope: Arc::new(move |x, cos, sin| {
                r.fetch_add(1, Ordering::Relaxed);
                rotate_half_rope(x, &cos, &sin)
            }),
            qkv_write: Some(Arc::new(move |a| {
                w.fetch_add(1, Ordering::Relaxed);
                // q, k and v are column views of the one merged projection.
                let [t, q_dim] = a.q.dims();
                let kv_dim = a.k.dims()[1];
                assert_eq!(a.v.dims(), [t, kv_dim]);
                assert_eq!(q_dim, a.write.heads * kv_dim / a.write.kv_heads);
                rope_qk_and_write_kv(a)
            })),
        };
        // q/k/v and gate/up merged: 4 projections per layer plus lm_head.
        let model = model.with_fused_ops(Some(fused)).with_projection(Some(Arc::new(
            move |x: burn::Tensor<B, 2>, w: burn::Tensor<B, 2>| {
                pr.fetch_add(1, Ordering::Relaxed);
                x.matmul(w)
            },
        )));
        let layers = model.config().num_layers;
        let p = &goldens.prompts[0];
        let logits = prompt_logits(&model, KvStorage::Device, p);
        assert_close(
            &logits,
            &p.last_logits,
            &format!("{name} fused RoPE and K/V write"),
        );
        assert_eq!(
            writes.load(Ordering::Relaxed),
            layers,
            "{name}: one fused write per layer"
        );
        assert_eq!(ropes.load(Ordering::Relaxed), 0, "{name}: no RoPE apart");
        assert_eq!(
            projections.load(Ordering::Relaxed),
            4 * layers + 1,
            "{name}: projections per step, q/k/v and gate/up merged"
        );
        // Host storage ropes q and k, then writes itself.
        let logits = prompt_logits(&model, KvStorage::Host, p);
        assert_close(
            &logits,
            &p.last_logits,
            &format!("{name} merged q/k/v, host storage"),
        );
        assert_eq!(
            writes.load(Ordering::Relaxed),
            layers,
            "{name}: host storage writes itself"
        );
        assert_eq!(
            ropes.load(Ordering::Relaxed),
            2 * layers,
            "{name}: RoPE of q and k apart"
        );
        assert_chunked_greedy_on_device(&model, &goldens, name);
    }
}

/// With `norm_project` (CUDA's GEMV with a norm prologue, here a host twin for batches of up to
/// 5 rows), each layer's two norms run inside the merged q/k/v and gate/up projections at decode
/// steps, the residual stream passing through the hook; with `norm_qkv_write` too, the
/// attention's norm, projection, RoPE and K/V write are one hook where q/k/v have no bias and no
/// q/k norms. Greedy continuations stay transformers', and a decode's logits are those of the
/// norms run apart.
#[test]
fn model_norms_inside_the_projections_match_transformers() {
    use burn::tensor::Tensor;
    use inferflux::model::llama::{
        add_rms_norm, rms_norm, rope_qk_and_write_kv, rotate_half_rope, silu_mul_halves, GateUpActFn,
        NormProject, NormProjectFn, NormQkvWrite, NormQkvWriteFn, NormQkvWritten,
    };
    use inferflux::model::FusedOps;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const MAX_ROWS: usize = 5;
    /// `(x + delta, rms_norm(x + delta) · w)` as the CUDA GEMV computes it.
    fn norm_product(a: NormProject<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (x, h) = match a.delta {
            Some(delta) => add_rms_norm(a.x, delta, a.gain, a.eps),
            None => {
                let h = rms_norm(a.x.clone(), a.gain, a.eps);
                (a.x, h)
            }
        };
        (x, h.matmul(a.w))
    }
    // tiny-qwen3 normalises q and k per head after the projection, tiny-qwen2 has q/k/v biases:
    // neither takes `norm_qkv_write`.
    for (name, takes_qkv_write) in [("tiny-llama", true), ("tiny-qwen3", false), ("tiny-qwen2", false)] {
        let (model, _, goldens) = fixture(name);
        let layers = model.config().num_layers;
        // With the fused activation (the product is the activation) and the attention's input in
        // one hook, and with neither (the product is gate/up, then `silu_mul`).
        for both in [true, false] {
            let what = format!("{name}, fused activation and q/k/v write {both}");
            let counters: [Arc<AtomicUsize>; 2] = Default::default();
            let [normed, written] = counters.clone();
            let [count_norm, count_write] = counters;
            let fused = |norm_project, norm_qkv_write| FusedOps::<B> {
                embed: None,
                rms_norm: Arc::new(rms_norm),
                add_rms_norm: Arc::new(add_rms_norm),
                silu_mul: Arc::new(silu_mul_halves),
                gate_up_act: both.then(|| {
                    Arc::new(|h: Tensor<B, 2>, w: Tensor<B, 2>| Some(silu_mul_halves(h.matmul(w))))
                        as GateUpActFn<B>
                }),
                norm_project,
                norm_qkv_write,
                rope: Arc::new(|x, cos, sin| rotate_half_rope(x, &cos, &sin)),
                qkv_write: Some(Arc::new(rope_qk_and_write_kv)),
            };
            let project: NormProjectFn<B> = Arc::new(move |a: NormProject<B>| {
                (a.x.dims()[0] <= MAX_ROWS).then(|| {
                    count_norm.fetch_add(1, Ordering::Relaxed);
                    let swiglu = a.swiglu;
                    let (x, product) = norm_product(a);
                    (x, if swiglu { silu_mul_halves(product) } else { product })
                })
            });
            let write: NormQkvWriteFn<B> = Arc::new(move |a: NormQkvWrite<B>| {
                if a.input.x.dims()[0] > MAX_ROWS {
                    return Err(Box::new([a.write.k_cache, a.write.v_cache]));
                }
                count_write.fetch_add(1, Ordering::Relaxed);
                let (x, qkv) = norm_product(a.input);
                let [t, width] = qkv.dims();
                let kv_dim = a.write.k_cache.dims()[1];
                let q_dim = width - 2 * kv_dim;
                let (q, k_cache, v_cache) = rope_qk_and_write_kv(a.write.with_rows([
                    qkv.clone().slice([0..t, 0..q_dim]),
                    qkv.clone().slice([0..t, q_dim..q_dim + kv_dim]),
                    qkv.slice([0..t, q_dim + kv_dim..width]),
                ]));
                Ok(NormQkvWritten {
                    x,
                    q,
                    k_cache,
                    v_cache,
                })
            });
            let apart = model.clone().with_fused_ops(Some(fused(None, None)));
            let inside = model
                .clone()
                .with_fused_ops(Some(fused(Some(project), both.then_some(write))));
            assert_chunked_greedy_on_device(&inside, &goldens, &what);
            let (norms, writes) = (normed.load(Ordering::Relaxed), written.load(Ordering::Relaxed));
            // A step that wants no logits skips the last layer's MLP, and its norm.
            let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
            let (without_logits, _) = steps_without_logits(&cases, 7);
            assert!(
                norms > 0 && (norms + writes + without_logits).is_multiple_of(2 * layers),
                "{what}: {norms} norms and {writes} q/k/v writes through the hooks, two per layer of a step"
            );
            assert_eq!(
                writes > 0,
                both && takes_qkv_write,
                "{what}: q/k/v writes through the hook"
            );
            // A decode after the prompt: one row, through the hooks in every layer.
            let p = &goldens.prompts[0];
            let decode_logits = |m: &Llama<B>| {
                let mut cache = new_cache(m, KvStorage::Device);
                let table = block_table(0, 1, p.input_ids.len() + 1);
                let prompt = SequenceChunk {
                    tokens: p.input_ids.clone(),
                    start_pos: 0,
                    block_table: table.clone(),
                    wants_logits: false,
                };
                m.forward(&mut cache, &[prompt]);
                let decode = SequenceChunk {
                    tokens: vec![p.greedy_ids[0]],
                    start_pos: p.input_ids.len(),
                    block_table: table,
                    wants_logits: true,
                };
                logits_rows(m.forward(&mut cache, &[decode])).remove(0)
            };
            let before = [normed.load(Ordering::Relaxed), written.load(Ordering::Relaxed)];
            let (got, want) = (decode_logits(&inside), decode_logits(&apart));
            let writes = written.load(Ordering::Relaxed) - before[1];
            assert_eq!(
                (normed.load(Ordering::Relaxed) - before[0], writes),
                if both && takes_qkv_write {
                    (layers, layers)
                } else {
                    (2 * layers, 0)
                },
                "{what}: one decode's norms and q/k/v writes through the hooks"
            );
            assert_close(&got, &want, &format!("{what}: a decode's logits"));
        }
    }
}
