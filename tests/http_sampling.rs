//! The sampler's processors over HTTP against the embedded tiny model: `logit_bias` forces and
//! bans, penalties see the prompt (repetition) or only the output (presence/frequency) and leave
//! a greedy continuation alone until it repeats, `top_k = 1` and `min_p = 1` are greedy, and
//! penalised seeded sampling stays the same under batching and preemption (recompute and swap).
//! Logprobs in both OpenAI shapes match transformers' log-softmax of the golden logits, and
//! streamed logprobs equal non-streamed ones.

mod common;

use std::sync::OnceLock;

use common::{goldens, post_completion, start, stream_completion, TestServer};
use inferflux::config::{PreemptionMode, Settings};
use serde_json::{json, Value};

/// 40 pages of 4 tokens and 32 tokens per step: eight golden-length streams at once preempt.
fn small_pool(s: &mut Settings) {
    s.kv.num_pages = 40;
    s.kv.page_size = 4;
    s.scheduler.max_batched_tokens = 32;
}

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(small_pool))
}

/// A greedy request of `max_tokens` that only `max_tokens` ends.
fn greedy(prompt: impl Into<Value>, max_tokens: usize) -> Value {
    json!({ "prompt": prompt.into(), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true })
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The text of a non-streamed completion (asserting 200).
async fn text(base: &str, body: &Value) -> String {
    let resp = post_completion(base, body).await;
    assert_eq!(resp.status(), 200, "{body}");
    let v: Value = resp.json().await.unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The decode of `ids`, without a trailing incomplete character (a prefix of any longer decode).
fn decoded_prefix(ids: &[u32]) -> String {
    let text = common::tokenizer().decode(ids, true).unwrap();
    text.trim_end_matches('\u{FFFD}').to_string()
}

/// The golden prompts' last-position logits (transformers, float32).
fn last_logits() -> Vec<Vec<f32>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama/goldens.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Largest logit's id (lowest on a tie) and its lead over the runner-up.
fn argmax_margin(w: &[f32]) -> (u32, f32) {
    let mut best = 0;
    for (i, &x) in w.iter().enumerate() {
        if x > w[best] {
            best = i;
        }
    }
    let second = w
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    (best as u32, w[best] - second)
}

#[tokio::test]
async fn sampling_http_logit_bias_forces_and_bans() {
    let base = &server().base;
    let the = common::tokenizer().token_to_id("Ġthe").unwrap();
    for p in goldens().prompts {
        let forced = with(
            greedy(p.prompt.as_str(), 6),
            json!({ "logit_bias": { the.to_string(): 100 } }),
        );
        assert_eq!(
            text(base, &forced).await,
            " the".repeat(6),
            "+100 forces every token"
        );
    }
    // -100 on the greedy first token: the runner-up of transformers' logits comes instead.
    for (p, logits) in goldens().prompts.iter().zip(last_logits()) {
        let (best, _) = argmax_margin(&logits);
        assert_eq!(best, p.greedy_ids[0]);
        let mut banned = logits.clone();
        banned[best as usize] -= 100.0;
        let (runner_up, margin) = argmax_margin(&banned);
        assert!(margin > 1e-3, "{margin}");
        let body = with(
            greedy(p.input_ids.clone(), 1),
            json!({ "logit_bias": { best.to_string(): -100 } }),
        );
        assert_eq!(
            text(base, &body).await,
            common::tokenizer().decode(&[runner_up], true).unwrap()
        );
    }
}

/// transformers' rule on the first token, from the golden logits and the prompt ids: the server
/// must penalise the prompt's tokens (at 0.5 they are favoured), and the lead of the chosen
/// token must be clear of numeric noise.
#[tokio::test]
async fn sampling_http_repetition_penalty_counts_the_prompt() {
    let base = &server().base;
    let mut changed = 0;
    for (p, logits) in goldens().prompts.iter().zip(last_logits()) {
        for penalty in [2.0f32, 0.5] {
            let mut w = logits.clone();
            let mut seen = p.input_ids.clone();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                let l = &mut w[id as usize];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
            let (want, margin) = argmax_margin(&w);
            assert!(margin > 1e-3, "{:?} at {penalty}: margin {margin}", p.prompt);
            changed += usize::from(want != p.greedy_ids[0]);
            let body = with(
                greedy(p.input_ids.clone(), 1),
                json!({ "repetition_penalty": penalty }),
            );
            assert_eq!(
                text(base, &body).await,
                common::tokenizer().decode(&[want], true).unwrap(),
                "{:?} at {penalty}",
                p.prompt
            );
        }
    }
    assert!(changed > 0, "some penalty changes a first token");
}

/// A penalty only lowers tokens already seen, so a greedy continuation is unchanged up to the
/// first token that was seen before (in the prompt, for `repetition_penalty`; in the output, for
/// presence/frequency), and the whole continuation then differs.
#[tokio::test]
async fn sampling_http_penalties_leave_greedy_alone_until_a_repeat() {
    let base = &server().base;
    for p in goldens().prompts {
        let gen = &p.greedy_ids;
        let first = |seen_in_prompt: bool| {
            (0..gen.len())
                .find(|&i| gen[..i].contains(&gen[i]) || (seen_in_prompt && p.input_ids.contains(&gen[i])))
                .unwrap()
        };
        let cases = [
            (json!({ "repetition_penalty": 1.8 }), first(true)),
            (
                json!({ "presence_penalty": 2.0, "frequency_penalty": 2.0 }),
                first(false),
            ),
        ];
        for (params, repeat) in cases {
            let got = text(
                base,
                &with(greedy(p.input_ids.clone(), gen.len()), params.clone()),
            )
            .await;
            let same = decoded_prefix(&gen[..repeat]);
            assert!(
                got.starts_with(&same),
                "{params} on {:?}: {got:?} vs {same:?}",
                p.prompt
            );
            assert_ne!(got, p.greedy_text, "{params} on {:?} changed nothing", p.prompt);
        }
        // Off is off: the neutral values give the goldens.
        let neutral = json!({ "repetition_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0,
                              "top_k": -1, "min_p": 0, "logit_bias": {} });
        let got = text(base, &with(greedy(p.input_ids.clone(), gen.len()), neutral)).await;
        assert_eq!(got, p.greedy_text);
    }
}

#[tokio::test]
async fn sampling_http_top_k_1_and_min_p_1_are_greedy_and_logprobs_change_no_text() {
    let base = &server().base;
    for p in goldens().prompts {
        for (seed, extra) in [(1, json!({ "top_k": 1 })), (2, json!({ "min_p": 1.0 }))] {
            let hot = json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 1.5, "seed": seed,
                              "ignore_eos": true });
            assert_eq!(
                text(base, &with(hot, extra.clone())).await,
                p.greedy_text,
                "{extra}"
            );
        }
        let asked = with(greedy(p.prompt.as_str(), 24), json!({ "logprobs": 5 }));
        assert_eq!(text(base, &asked).await, p.greedy_text);
    }
}

/// Every processor on, seeded: eight streams at once on a pool too small for them (recompute,
/// then swap preemption) give what each gives alone.
#[tokio::test]
async fn sampling_http_penalised_sampling_is_batch_and_preemption_invariant() {
    let mut prompts: Vec<Value> = goldens().prompts.iter().map(|p| json!(p.prompt)).collect();
    prompts.extend(
        [
            "InferFlux is an inference server.",
            "def main():",
            "What is two plus two?",
        ]
        .map(Value::from),
    );
    let body = |i: usize, prompt: &Value| {
        json!({ "prompt": prompt, "max_tokens": 24, "temperature": 0.9, "seed": 100 + i, "top_k": 40,
                "top_p": 0.95, "min_p": 0.02, "repetition_penalty": 1.3, "presence_penalty": 0.5,
                "frequency_penalty": 0.25, "logit_bias": { "125": -5, "273": 2.5 }, "logprobs": 2,
                "ignore_eos": true, "stream": true })
    };
    let alone = start(|_| {});
    let mut solo = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        solo.push(stream_completion(&alone.base, body(i, p)).await.text);
    }
    for mode in [PreemptionMode::Recompute, PreemptionMode::Swap] {
        // Slowed, so that the streams meet in the pool and preempt however fast the machine serves.
        let server = common::start_slowed(
            move |s| {
                small_pool(s);
                s.scheduler.preemption = mode;
            },
            2,
        )
        .await;
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (base, body) = (server.base.clone(), body(i, p));
                tokio::spawn(async move { stream_completion(&base, body).await })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(
                h.await.unwrap().text,
                solo[i],
                "{mode:?}: stream {i} ({})",
                prompts[i]
            );
        }
        let queue = common::queue_report(&server.base).await;
        assert!(
            queue["preemptions_total"].as_u64().unwrap() > 0,
            "{mode:?}: {queue}"
        );
    }
}

/// log-softmax of `logits` at every index, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits.iter().map(|&l| l as f64 - max - sum.ln()).collect()
}

#[tokio::test]
async fn sampling_logprobs_match_transformers_and_streams_agree() {
    let base = &server().base;
    for (p, logits) in goldens().prompts.iter().zip(last_logits()) {
        let want = log_softmax(&logits);
        let body = with(greedy(json!(p.input_ids), 6), json!({ "logprobs": 3 }));
        let resp = post_completion(base, &body).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        let lp = &v["choices"][0]["logprobs"];
        let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            assert_eq!(lp[key].as_array().unwrap().len(), n, "{key}: {lp}");
        }
        // The first token is transformers' greedy one, with its log-softmax.
        let first = lp["token_logprobs"][0].as_f64().unwrap();
        let greedy_id = p.greedy_ids[0] as usize;
        assert!(
            (first - want[greedy_id]).abs() < 1e-3,
            "{first} vs {}",
            want[greedy_id]
        );
        // Its alternatives: the 3 best of transformers' distribution (plus the chosen one, which
        // is among them under greedy).
        let mut best: Vec<f64> = want.clone();
        best.sort_by(|a, b| b.total_cmp(a));
        let mut got: Vec<f64> = lp["top_logprobs"][0]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .collect();
        got.sort_by(|a, b| b.total_cmp(a));
        assert!(got.len() <= 3, "{got:?}");
        for (g, w) in got.iter().zip(&best) {
            assert!((g - w).abs() < 1e-3, "{got:?} vs {:?}", &best[..3]);
        }
        for x in lp["token_logprobs"].as_array().unwrap() {
            assert!(x.as_f64().unwrap() <= 0.0);
        }
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");

        // Streamed: the same entries, each exactly once, in order (within float noise: the
        // second run reads its prompt from the prefix cache, in other chunk shapes).
        let streamed = stream_completion(base, with(body.clone(), json!({ "stream": true }))).await;
        let streamed_lps: Vec<Value> = streamed
            .chunks
            .iter()
            .filter(|c| !c["choices"][0]["logprobs"].is_null())
            .flat_map(|c| {
                c["choices"][0]["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .collect();
        let whole: Vec<f64> = lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(streamed_lps.len(), whole.len());
        for (s, w) in streamed_lps.iter().zip(&whole) {
            assert!((s.as_f64().unwrap() - w).abs() < 1e-4, "{s} vs {w}");
        }
    }
    // Not asked: null.
    let v: Value = post_completion(base, &greedy("Hi", 2))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["choices"][0]["logprobs"].is_null());
}
