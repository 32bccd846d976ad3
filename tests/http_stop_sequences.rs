//! Stop conditions over HTTP against the embedded tiny model: for every edge case the model can
//! be made to hit, `stream: true` and `stream: false` give the same text, `finish_reason` and
//! `stop_reason`, and the text equals transformers' greedy continuation (the goldens), decoded
//! whole and cut at the earliest stop. Bad stop parameters get a 400 naming the field.

mod common;

use std::sync::OnceLock;

use common::{goldens, post_completion, start, stream_completion, tokenizer, GoldenPrompt, TestServer};
use serde_json::{json, Value};

/// One server for this file, with room for every test's sequences at once.
fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        start(|s| {
            s.kv.num_pages = 256;
            s.kv.page_size = 4;
            s.limits.max_stop_strings = 4;
            s.limits.max_stop_bytes = 256;
        })
    })
}

/// The text `tokenizers`' `DecodeStream` releases for each greedy token (empty while held).
fn released(ids: &[u32]) -> Vec<String> {
    let tok = tokenizer();
    let mut stream = tok.decode_stream(true);
    ids.iter()
        .map(|&id| stream.step(id).unwrap().unwrap_or_default())
        .collect()
}

fn decode(ids: &[u32]) -> String {
    tokenizer().decode(ids, true).unwrap()
}

/// `text` cut at the earliest stop starting at or after byte `from` (longer first on a tie):
/// `(text, the stop)`.
fn cut_at_stop(text: &str, stops: &[&str], from: usize, include: bool) -> (String, Option<String>) {
    let hit = stops
        .iter()
        .filter_map(|s| text[from..].find(s).map(|i| (from + i, *s)))
        .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())));
    match hit {
        Some((i, s)) => {
            let end = if include { i + s.len() } else { i };
            (text[..end].to_string(), Some(s.to_string()))
        }
        None => (text.to_string(), None),
    }
}

fn greedy(p: &GoldenPrompt, extra: Value) -> Value {
    let mut body = json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 0 });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// What both modes agreed on.
#[derive(Debug)]
struct Outcome {
    text: String,
    finish_reason: String,
    stop_reason: Value,
    completion_tokens: u64,
}

/// Sends `body` streamed and not, and checks that both give the same result.
async fn both(case: &str, body: Value) -> Outcome {
    let base = &server().base;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let s = stream_completion(base, streamed).await;
    assert!(s.done, "{case}: stream ends with [DONE]");
    let last = &s.chunks.last().unwrap()["choices"][0];
    let mut plain = body;
    plain["stream"] = json!(false);
    let resp = post_completion(base, &plain).await;
    assert_eq!(resp.status(), 200, "{case}");
    let v: Value = resp.json().await.unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["text"].as_str().unwrap(), s.text, "{case}: text");
    assert_eq!(
        choice["finish_reason"], last["finish_reason"],
        "{case}: finish_reason"
    );
    assert_eq!(choice["stop_reason"], last["stop_reason"], "{case}: stop_reason");
    Outcome {
        text: s.text,
        finish_reason: last["finish_reason"].as_str().unwrap().to_string(),
        stop_reason: last["stop_reason"].clone(),
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap(),
    }
}

fn clean(s: &str) -> bool {
    !s.is_empty() && !s.contains('\u{FFFD}')
}

/// A golden prompt whose greedy tokens `k..k + n` all release clean text at once, and `k`.
fn clean_window(n: usize) -> (GoldenPrompt, usize) {
    goldens()
        .prompts
        .into_iter()
        .find_map(|p| {
            let r = released(&p.greedy_ids);
            (1..r.len() - n)
                .find(|&k| r[k..k + n].iter().all(|d| clean(d)))
                .map(|k| (p, k))
        })
        .expect("a golden continuation with clean text")
}

async fn check_stops(case: &str, p: &GoldenPrompt, stops: &[&str], include: bool, min_tokens: usize) {
    let protected: usize = released(&p.greedy_ids[..min_tokens])
        .iter()
        .map(String::len)
        .sum();
    let (want, stop) = cut_at_stop(&p.greedy_text, stops, protected, include);
    let got = both(
        case,
        greedy(
            p,
            json!({ "stop": stops, "include_stop_str_in_output": include, "min_tokens": min_tokens }),
        ),
    )
    .await;
    assert_eq!(got.text, want, "{case}");
    match stop {
        Some(s) => {
            assert_eq!(got.finish_reason, "stop", "{case}");
            assert_eq!(got.stop_reason, json!(s), "{case}");
        }
        None => {
            assert_eq!(got.finish_reason, "length", "{case}");
            assert_eq!(got.stop_reason, Value::Null, "{case}");
        }
    }
}

#[tokio::test]
async fn stop_sequences_http_stop_strings_match_goldens_in_both_modes() {
    let (p, k) = clean_window(3);
    let r = released(&p.greedy_ids);
    let first = r.iter().find(|d| !d.is_empty()).unwrap().clone();
    let span = r[k..k + 3].concat();
    let span_prefix: String = span.chars().take(span.chars().count() - 1).collect();
    assert!(!span_prefix.is_empty());
    check_stops("stop at the first token", &p, &[first.as_str()], false, 0).await;
    check_stops("stop spanning three tokens", &p, &[span.as_str()], false, 0).await;
    check_stops(
        "overlapping pair",
        &p,
        &[span_prefix.as_str(), span.as_str()],
        false,
        0,
    )
    .await;
    check_stops(
        "overlapping pair, longer first",
        &p,
        &[span.as_str(), span_prefix.as_str()],
        false,
        0,
    )
    .await;
    check_stops("include_stop_str_in_output", &p, &[span.as_str()], true, 0).await;
    check_stops("stop never matching", &p, &["never in gibberish"], false, 0).await;
    check_stops("whole output", &p, &[p.greedy_text.as_str()], false, 0).await;
    check_stops(
        "min_tokens protects the first tokens",
        &p,
        &[first.as_str()],
        false,
        k + 1,
    )
    .await;
    check_stops(
        "min_tokens with a spanning stop",
        &p,
        &[span.as_str(), first.as_str()],
        false,
        k,
    )
    .await;
}

#[tokio::test]
async fn stop_sequences_http_stop_completed_at_max_tokens_and_length_flush() {
    let (p, k) = clean_window(2);
    let r = released(&p.greedy_ids);
    let stop = r[k + 1].clone();
    let (want, _) = cut_at_stop(&decode(&p.greedy_ids[..k + 2]), &[stop.as_str()], 0, false);
    let got = both(
        "stop at max_tokens",
        greedy(&p, json!({ "stop": [stop], "max_tokens": k + 2 })),
    )
    .await;
    assert_eq!((got.text, got.finish_reason), (want, "stop".to_string()));
    assert_eq!(got.stop_reason, json!(stop));
    // max_tokens ending on every prefix: the held bytes come out as the full decode has them.
    for p in goldens().prompts {
        for n in [1, 2, 3, 5, 8] {
            let got = both("length", greedy(&p, json!({ "max_tokens": n }))).await;
            assert_eq!(got.text, decode(&p.greedy_ids[..n]), "max_tokens {n}");
            assert_eq!(
                (got.finish_reason.as_str(), got.completion_tokens),
                ("length", n as u64)
            );
        }
    }
}

#[tokio::test]
async fn stop_sequences_http_stop_token_ids() {
    let p = &goldens().prompts[0];
    let k = 5;
    let id = p.greedy_ids[k];
    let first = p.greedy_ids.iter().position(|&x| x == id).unwrap();
    for include in [false, true] {
        let case = format!("stop_token_ids, include {include}");
        let got = both(
            &case,
            greedy(
                p,
                json!({ "stop_token_ids": [id], "include_stop_str_in_output": include }),
            ),
        )
        .await;
        let kept = if include { first + 1 } else { first };
        assert_eq!(got.text, decode(&p.greedy_ids[..kept]), "{case}");
        assert_eq!(got.finish_reason, "stop", "{case}");
        assert_eq!(got.stop_reason, json!(id), "{case}");
        assert_eq!(got.completion_tokens, first as u64 + 1, "{case}");
    }
    // min_tokens masks the id until it is reached: the model must pick something else there.
    let got = both(
        "stop_token_ids with min_tokens",
        greedy(p, json!({ "stop_token_ids": [id], "min_tokens": first + 2 })),
    )
    .await;
    assert!(got.completion_tokens >= first as u64 + 2, "{got:?}");
    assert!(
        got.text.starts_with(&released(&p.greedy_ids[..first]).concat()),
        "the tokens before the masked one are unchanged: {got:?}"
    );
}

/// Finds a seed for which sampling at temperature 2 hits EOS within 24 tokens; the draws depend
/// only on (seed, token index), so `ignore_eos` and `min_tokens` runs with it are comparable.
async fn seed_hitting_eos(prompt: &str) -> Option<(u64, Outcome)> {
    for seed in 0..200u64 {
        let body = json!({ "prompt": prompt, "max_tokens": 24, "temperature": 2.0, "seed": seed });
        let got = both("seed search", body).await;
        if got.finish_reason == "stop" {
            assert_eq!(
                got.stop_reason,
                Value::Null,
                "EOS is reported as stop_reason null"
            );
            return Some((seed, got));
        }
    }
    None
}

#[tokio::test]
async fn stop_sequences_http_eos_ignore_eos_and_min_tokens() {
    let prompt = "Once upon a time";
    let (seed, eos) = seed_hitting_eos(prompt).await.expect("some seed samples EOS");
    let body = |extra: Value| {
        let mut b = json!({ "prompt": prompt, "max_tokens": 24, "temperature": 2.0, "seed": seed });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let ignored = both("ignore_eos", body(json!({ "ignore_eos": true }))).await;
    assert_eq!(
        (ignored.finish_reason.as_str(), ignored.completion_tokens),
        ("length", 24)
    );
    assert!(ignored.text.starts_with(&eos.text), "{ignored:?} vs {eos:?}");
    let n = eos.completion_tokens as usize;
    let min = both("min_tokens past EOS", body(json!({ "min_tokens": n + 1 }))).await;
    assert!(
        min.completion_tokens > n as u64,
        "EOS masked before min_tokens: {min:?}"
    );
}

#[tokio::test]
async fn stop_sequences_http_bad_stop_parameters_name_the_field() {
    let long = "x".repeat(257);
    let cases = [
        (json!({ "prompt": "hi", "stop": "" }), "stop"),
        (json!({ "prompt": "hi", "stop": ["a", ""] }), "stop"),
        (
            json!({ "prompt": "hi", "stop": ["a", "b", "c", "d", "e"] }),
            "stop",
        ),
        (json!({ "prompt": "hi", "stop": [long] }), "stop"),
        (
            json!({ "prompt": "hi", "max_tokens": 4, "min_tokens": 5 }),
            "min_tokens",
        ),
        (json!({ "prompt": "hi", "min_tokens": -1 }), "min_tokens"),
        (
            json!({ "prompt": "hi", "stop_token_ids": [384] }),
            "stop_token_ids",
        ),
        (
            json!({ "prompt": "hi", "stop_token_ids": [-1] }),
            "stop_token_ids",
        ),
    ];
    for (body, param) in cases {
        let resp = post_completion(&server().base, &body).await;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}: {v}");
    }
    let ok = both(
        "limits are inclusive",
        json!({ "prompt": "hi", "max_tokens": 4, "min_tokens": 4, "seed": 1,
        "stop": ["a", "b", "c", "é".repeat(128)], "stop_token_ids": [383] }),
    )
    .await;
    assert_eq!(ok.completion_tokens, 4);
}
