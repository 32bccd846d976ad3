//! `/v1/completions` black-box over HTTP against the embedded tiny model: greedy streams equal
//! transformers' continuations, concurrent streams equal solo ones (with chunked prefill and
//! KV preemption forced by a small pool), and bad input gets OpenAI error JSON.

mod common;

use std::sync::OnceLock;

use common::{goldens, start, stream_completion, TestServer};
use serde_json::json;

/// One server for this file: 40 pages of 4 tokens (160 tokens: the longest golden sequence
/// fits, 8 at once do not) and 32 tokens per step (long prompts are chunked).
fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        // The fault hook, so that the concurrent test can slow the steps.
        std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
        start(|s| {
            s.kv.num_pages = 40;
            s.kv.page_size = 4;
            s.scheduler.max_batched_tokens = 32;
        })
    })
}

fn greedy(prompt: &str) -> serde_json::Value {
    json!({ "model": "inferflux-tiny-llama", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true })
}

#[tokio::test]
async fn http_stream_equals_transformers_greedy_continuation() {
    let base = &server().base;
    for p in goldens().prompts {
        let got = stream_completion(base, greedy(&p.prompt)).await;
        assert_eq!(got.text, p.greedy_text, "prompt {:?}", p.prompt);
        assert!(got.done, "stream ends with [DONE]");
        assert_eq!(got.finish_reason(), Some("length"));
        assert!(got.chunks.len() > 2, "tokens arrive as several chunks");
        // The same through token ids instead of text.
        let mut by_ids = greedy("");
        by_ids["prompt"] = json!(p.input_ids);
        assert_eq!(stream_completion(base, by_ids).await.text, p.greedy_text);
    }
}

#[tokio::test]
async fn http_eight_concurrent_streams_match_solo() {
    let base = server().base.clone();
    let mut prompts: Vec<String> = goldens().prompts.into_iter().map(|p| p.prompt).collect();
    prompts.extend(
        [
            "InferFlux is an inference server.",
            "What is two plus two?",
            "def main():",
        ]
        .map(String::from),
    );
    assert_eq!(prompts.len(), 8);
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(stream_completion(&base, greedy(p)).await.text);
    }
    // Slowed while the streams run, so that they meet in the pool and preempt however fast the
    // machine serves (the other tests here share the server).
    common::set_step_delay(&base, 2).await;
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (base, body) = (base.clone(), greedy(p));
            tokio::spawn(async move { stream_completion(&base, body).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.unwrap();
        assert_eq!(got.text, solo[i], "concurrent stream {i} ({:?})", prompts[i]);
        assert_eq!(got.finish_reason(), Some("length"));
    }
    common::set_step_delay(&base, 0).await;
    let metrics = common::metrics_text(&base).await;
    assert!(
        metrics.contains("inferflux_num_preemptions_total"),
        "the small pool forced preemption"
    );
}

#[tokio::test]
async fn http_non_streaming_response_has_usage_and_same_text() {
    let base = &server().base;
    let p = &goldens().prompts[0];
    let mut body = greedy(&p.prompt);
    body["stream"] = json!(false);
    let v: serde_json::Value = common::post_completion(base, &body).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], p.greedy_text.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], p.input_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["object"], "text_completion");
}

#[tokio::test]
async fn http_stop_string_ends_the_stream_without_leaking_it() {
    let base = &server().base;
    let p = &goldens().prompts[2];
    // A stop string taken from the middle of the known continuation.
    let chars: Vec<char> = p.greedy_text.chars().collect();
    let stop: String = chars[8..11].iter().collect();
    let mut body = greedy(&p.prompt);
    body["stop"] = json!([stop]);
    let got = stream_completion(base, body).await;
    let cut = p.greedy_text.find(&stop).unwrap();
    assert_eq!(got.text, p.greedy_text[..cut]);
    assert_eq!(got.finish_reason(), Some("stop"));
    assert_eq!(
        got.chunks.last().unwrap()["choices"][0]["stop_reason"],
        stop.as_str()
    );
}

#[tokio::test]
async fn http_seeded_sampling_is_reproducible() {
    let base = &server().base;
    let body = json!({ "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 1234, "stream": true });
    let a = stream_completion(base, body.clone()).await.text;
    let b = stream_completion(base, body).await.text;
    assert_eq!(a, b);
}

async fn post_raw(body: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", server().base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn http_bad_input_gets_openai_error_json() {
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{not json".into(), 400, None),
        (r#"{"prompt": 5}"#.into(), 400, None),
        (
            r#"{"prompt": "hi", "max_tokens": 0}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"prompt": "hi", "temperature": 3}"#.into(),
            400,
            Some("temperature"),
        ),
        (r#"{"prompt": "hi", "top_p": 0}"#.into(), 400, Some("top_p")),
        (
            r#"{"prompt": "hi", "stop": ["a","b","c","d","e"]}"#.into(),
            400,
            Some("stop"),
        ),
        (r#"{"prompt": "hi", "stop": ""}"#.into(), 400, Some("stop")),
        (
            r#"{"prompt": "hi", "frequency_penalty": 3}"#.into(),
            400,
            Some("frequency_penalty"),
        ),
        (r#"{"prompt": [1, 2, 99999]}"#.into(), 400, Some("prompt")),
        (r#"{"prompt": []}"#.into(), 400, Some("prompt")),
        (r#"{"prompt": "hi", "model": "gpt-4"}"#.into(), 404, Some("model")),
        (
            r#"{"prompt": "hi", "max_tokens": 100000}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (format!(r#"{{"prompt": "{}"}}"#, "x".repeat(2 << 20)), 413, None),
    ];
    for (body, status, param) in cases {
        let (got, v) = post_raw(&body).await;
        let shown = &body[..body.len().min(60)];
        assert_eq!(got, status, "{shown}: {v}");
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{shown}: {v}"
        );
        assert!(v["error"]["type"].is_string(), "{shown}: {v}");
        if let Some(param) = param {
            assert_eq!(v["error"]["param"], param, "{shown}: {v}");
        }
    }
    let (_, v) = post_raw(r#"{"prompt": "hi", "max_tokens": 100000}"#).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("100000") && msg.contains("160"),
        "both numbers named: {msg}"
    );
}

#[tokio::test]
async fn http_health_models_and_metrics() {
    let base = &server().base;
    let health: serde_json::Value = reqwest::get(format!("{base}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let models: serde_json::Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "inferflux-tiny-llama");
    stream_completion(base, greedy("Hello")).await;
    let metrics = common::metrics_text(base).await;
    for name in [
        "inferflux_requests_total",
        "inferflux_num_requests_running",
        "inferflux_num_requests_waiting",
        "inferflux_generation_tokens_total",
        "inferflux_time_to_first_token_seconds_bucket",
        "inferflux_kv_cache_usage_perc",
    ] {
        assert!(metrics.contains(name), "missing {name} in /metrics");
    }
}

#[tokio::test]
async fn http_inferctl_streams_and_dumps_sse() {
    let base = server().base.clone();
    let p = &goldens().prompts[1];
    let dump = std::env::temp_dir().join(format!("inferctl-sse-{}.txt", std::process::id()));
    let (prompt, dump_arg) = (p.prompt.clone(), dump.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_inferctl"))
            .args([
                "--url",
                &base,
                "completion",
                &prompt,
                "--stream",
                "--max-tokens",
                "24",
                "--temperature",
                "0",
            ])
            .arg("--dump-sse")
            .arg(&dump_arg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", p.greedy_text)
    );
    let sse = std::fs::read_to_string(&dump).unwrap();
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    assert!(sse.matches("data: {").count() > 2);
    let _ = std::fs::remove_file(dump);
}
