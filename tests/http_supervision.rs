//! Supervision: an executor that fails mid-stream (a step error, or a panic that kills its
//! thread) ends the requests it held with an error, is restarted with the loaded weights and a
//! fresh KV cache, and serves what waited and what comes next exactly as before. Uses the
//! test-only fault hook (`INFERFLUX_FAULT_INJECTION=1`, `POST /admin/fault`). In its own test
//! binary, one test, so that the process-wide restart counter belongs to its servers.

mod common;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use inferflux::config::OverlapSteps;
use serde_json::{json, Value};

const PROMPT: &str = "Once upon a time in a land far away";

fn greedy(max_tokens: u32, stream: bool) -> Value {
    json!({ "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream })
}

async fn post(base: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn arm(base: &str, body: Value) {
    let resp = post(base, "/admin/fault", &body).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
}

async fn greedy_text(base: &str) -> String {
    let resp = post(base, "/v1/completions", &greedy(24, false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

fn restarts(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("inferflux_executor_restarts_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Streams until the server ends the stream: the text before the error, the error event, and
/// whether `[DONE]` came last.
struct Failed {
    text: String,
    error: Option<Value>,
    done: bool,
}

async fn stream_until_end(resp: reqwest::Response) -> Failed {
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    let mut out = Failed {
        text: String::new(),
        error: None,
        done: false,
    };
    while let Some(event) = events.next().await {
        let data = event.unwrap().data;
        assert!(!out.done, "nothing may follow [DONE]");
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        if v.get("error").is_some() {
            assert!(out.error.is_none(), "one error event");
            out.error = Some(v);
            continue;
        }
        assert!(out.error.is_none(), "no text after the error event");
        out.text.push_str(v["choices"][0]["text"].as_str().unwrap());
    }
    out
}

/// One fault of `kind` hits a stream on its 15th step while another request waits (one
/// sequence runs at a time); returns what the stream saw.
async fn fault_mid_stream(base: &str, kind: &str) -> Failed {
    arm(
        base,
        json!({ "kind": kind, "after_steps": 15, "step_delay_ms": 20 }),
    )
    .await;
    let stream = post(base, "/v1/completions", &greedy(200, true)).await;
    let waiter = tokio::spawn({
        let base = base.to_string();
        async move { greedy_text(&base).await }
    });
    // The waiter is queued behind the stream, which runs until the fault (200 tokens > 15 steps).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let q = common::queue_report(base).await;
        if q["running"] == 1 && q["waiting"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second request never queued: {q}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let failed = stream_until_end(stream).await;
    arm(base, json!({ "step_delay_ms": 0 })).await;
    let waited = waiter.await.unwrap();
    assert_eq!(
        waited,
        greedy_text(base).await,
        "{kind}: the request that waited through the restart was served as usual"
    );
    failed
}

/// Once with each step read back before the next is queued, and once with overlapped steps
/// (the executor holding each step until the next one is queued, fed on the device).
#[tokio::test]
async fn supervision_executor_failure_mid_stream_errors_the_client_and_restarts() {
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    for overlap in [OverlapSteps::Off, OverlapSteps::On] {
        let server = common::start(move |s| {
            s.scheduler.max_running = 1;
            s.kv.num_pages = 64;
            s.kv.page_size = 4;
            s.scheduler.overlap_steps = overlap;
        });
        let restarted_before = restarts(&common::metrics_text(&server.base).await);
        supervise(&server.base, restarted_before).await;
    }
}

/// The supervision checks on a fresh server; `restarted_before`: the process's restart counter
/// before it.
async fn supervise(base: &str, restarted_before: u64) {
    let restarts = |metrics: &str| restarts(metrics) - restarted_before;
    let before = greedy_text(base).await;
    assert!(!before.is_empty());
    assert_eq!(restarts(&common::metrics_text(base).await), 0);

    for (n, kind) in ["error", "panic"].into_iter().enumerate() {
        let failed = fault_mid_stream(base, kind).await;
        assert!(
            !failed.text.is_empty(),
            "{kind}: tokens streamed before the fault"
        );
        let error = failed.error.unwrap_or_else(|| panic!("{kind}: no error event"));
        assert_eq!(error["error"]["type"], "server_error", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("executor failed"), "{message}");
        assert!(failed.done, "{kind}: the stream still ends with [DONE]");

        let metrics = common::metrics_text(base).await;
        assert_eq!(restarts(&metrics), n as u64 + 1, "{kind}: one restart counted");
        assert!(metrics.contains("# HELP inferflux_executor_restarts_total"));
        assert_eq!(
            greedy_text(base).await,
            before,
            "{kind}: same greedy text after the restart"
        );
        let kv = common::wait_until_no_page_is_referenced(base).await;
        assert_eq!(kv.free_pages + kv.cached_pages, 64, "{kind}: every page back");
    }

    // A non-streamed request that the fault hits gets a 500 in OpenAI error JSON.
    arm(base, json!({ "kind": "error", "after_steps": 2 })).await;
    let resp = post(base, "/v1/completions", &greedy(24, false)).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert_eq!(restarts(&common::metrics_text(base).await), 3);
    // Not three failures in a row: each restart was followed by successful steps.
    assert_eq!(greedy_text(base).await, before);
    let ready = reqwest::get(format!("{base}/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    common::wait_until_no_page_is_referenced(base).await;

    repeated_failures_stop_admitting_until_resumed(base).await;
}

/// Three failures without a successful step between them: the server stops admitting (503,
/// `/ready` 503) until an operator resumes it.
async fn repeated_failures_stop_admitting_until_resumed(base: &str) {
    for _ in 0..3 {
        arm(base, json!({ "kind": "error", "after_steps": 1 })).await;
        let resp = post(base, "/v1/completions", &greedy(8, false)).await;
        assert_eq!(resp.status(), 500);
    }
    let ready = reqwest::get(format!("{base}/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let refused = post(base, "/v1/completions", &greedy(8, false)).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let resumed = post(base, "/admin/drain", &json!({ "drain": false })).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(
        post(base, "/v1/completions", &greedy(8, false)).await.status(),
        200
    );
    common::wait_until_no_page_is_referenced(base).await;
}
