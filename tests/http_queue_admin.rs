//! Operator controls of the queue over HTTP: cancel by request id, drain, `/admin/queue`, and a
//! stream that keeps decoding while another client's long prompt is prefilled.

mod common;

use std::time::Duration;

use common::{goldens, post_completion, start};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::json;

async fn post(base: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().post(format!("{base}{path}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn unified_batch_http_cancel_by_request_id_aborts_and_frees_pages() {
    // Slowed, so that the request surely still runs when the cancel comes.
    let server = common::start_slowed(
        |s| {
            s.kv.num_pages = 64;
            s.kv.page_size = 4;
        },
        5,
    )
    .await;
    let base = &server.base;
    // Two choices share the request id; cancelling it aborts both.
    let body = json!({ "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": true,
                       "ignore_eos": true, "n": 2 });
    let resp = post_completion(base, &body).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut events = resp.bytes_stream().eventsource();
    let first: serde_json::Value = serde_json::from_str(&events.next().await.unwrap().unwrap().data).unwrap();
    assert_eq!(first["id"], id.as_str());
    assert!(common::kv_report(base).await.used_pages > 0);

    let (status, v) = post(base, &format!("/admin/requests/{id}/cancel"), None).await;
    assert_eq!((status, v["cancelled"].as_bool()), (200, Some(true)), "{v}");
    let mut finished = [None, None];
    let mut done = false;
    while let Some(e) = events.next().await {
        let e = e.unwrap();
        if e.data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            finished[choice["index"].as_u64().unwrap() as usize] = Some(reason.to_string());
        }
    }
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(finished, [Some("abort".into()), Some("abort".into())]);
    common::wait_until_no_page_is_referenced(base).await;
    let q = common::queue_report(base).await;
    assert_eq!(
        (q["running"].as_u64(), q["waiting"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );

    // Gone now, and never known: OpenAI-style 404s.
    for unknown in [id.as_str(), "cmpl-nope"] {
        let (status, v) = post(base, &format!("/admin/requests/{unknown}/cancel"), None).await;
        assert_eq!(status, 404, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(unknown), "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn unified_batch_http_drain_refuses_new_requests_and_finishes_running_ones() {
    let server = start(|_| {});
    let base = server.base.clone();
    let p = goldens().prompts.swap_remove(0);
    let running = {
        let base = base.clone();
        let body = json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 0, "stream": true, "ignore_eos": true });
        tokio::spawn(async move { common::stream_completion(&base, body).await })
    };
    // Wait until it is admitted. (Its 24 tokens may all come between two polls on a fast
    // machine: then the drain below comes after it, which the assertions allow.)
    while common::queue_report(&base).await["running"].as_u64() == Some(0) && !running.is_finished() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (status, v) = post(&base, "/admin/drain", None).await;
    assert_eq!((status, v["draining"].as_bool()), (200, Some(true)), "{v}");
    let refused = post_completion(&base, &json!({ "prompt": "hello", "max_tokens": 4 })).await;
    assert_eq!(refused.status(), 503);
    let v: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "draining", "{v}");
    assert_eq!(v["error"]["type"], "service_unavailable_error");
    let got = running.await.unwrap();
    assert_eq!(
        got.text, p.greedy_text,
        "what ran before the drain finished unchanged"
    );
    assert_eq!(got.finish_reason(), Some("length"));
    assert_eq!(common::queue_report(&base).await["draining"], true);

    let (status, _) = post(&base, "/admin/drain", Some(json!({ "drain": false }))).await;
    assert_eq!(status, 200);
    assert_eq!(common::queue_report(&base).await["draining"], false);
    let ok = post_completion(&base, &json!({ "prompt": "hello", "max_tokens": 4 })).await;
    assert_eq!(ok.status(), 200);
    let (status, v) = post(&base, "/admin/drain", Some(json!({ "drian": true }))).await;
    assert_eq!(status, 400, "{v}");

    // inferctl shows the queue and the per-client table.
    for (args, expect) in [
        (vec!["admin", "queue"], "draining      no"),
        (
            vec!["admin", "metrics", "--prometheus"],
            "fairness (Jain's index)",
        ),
        (vec!["admin", "metrics", "--prometheus"], "anonymous"),
        (vec!["admin", "metrics"], "fairness      "),
    ] {
        let base = base.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_inferctl"))
                .args(["--url", &base])
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains(expect), "{stdout}");
    }
}

#[tokio::test]
async fn unified_batch_http_stream_keeps_decoding_during_a_long_prefill() {
    // 16 tokens per step: after the stream's decode token, 15 are left for the 220-token prompt,
    // which takes 15 steps. The stream must get a token in (nearly) every step meanwhile.
    // The long prompt's submission races the stream's steps, so every step is slowed (the fault
    // hook's delay, whose routes no other assertion here uses): without it, a fast run finished
    // the stream's 250 steps in 0.1 s, before the submission arrived.
    let server = common::start_slowed(|s| s.scheduler.max_batched_tokens = 16, 3).await;
    let base = server.base.clone();
    // The stream runs as long as the fixture's 256 positions allow (at least 0.75 s), so that
    // the long prompt is prefilled well inside it: its 15 steps leave about 230 for the submission.
    const STREAM_PROMPT: [u32; 4] = [10, 23, 36, 49];
    const STREAM_TOKENS: u64 = 250;
    let stream_body = json!({ "prompt": STREAM_PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": true, "ignore_eos": true, "user": "streamer" });
    let resp = post_completion(&base, &stream_body).await;
    let mut events = resp.bytes_stream().eventsource();
    events.next().await.unwrap().unwrap();
    let stream_start = common::queue_report(&base).await["steps"].as_u64().unwrap();
    let long: Vec<u32> = (0..220).map(|i| (i * 13 % 370 + 10) as u32).collect();
    let long_req = {
        let base = base.clone();
        let body =
            json!({ "prompt": long, "max_tokens": 2, "temperature": 0, "stream": true, "user": "bulk" });
        tokio::spawn(async move {
            let submitted = common::queue_report(&base).await["steps"].as_u64().unwrap();
            let resp = post_completion(&base, &body).await;
            let mut events = resp.bytes_stream().eventsource();
            events.next().await.unwrap().unwrap();
            (
                submitted,
                common::queue_report(&base).await["steps"].as_u64().unwrap(),
            )
        })
    };
    let mut last = serde_json::Value::Null;
    while let Some(e) = events.next().await {
        let e = e.unwrap();
        if e.data == "[DONE]" {
            break;
        }
        last = serde_json::from_str(&e.data).unwrap();
    }
    let stream_end = common::queue_report(&base).await["steps"].as_u64().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let (submitted, first_token) = long_req.await.unwrap();
    assert!(
        first_token <= stream_end,
        "the long prompt was prefilled while the stream ran"
    );
    assert!(
        first_token - submitted >= 220 / 15,
        "the prompt was chunked: first token {} steps after submission",
        first_token - submitted
    );
    // The stream's remaining STREAM_TOKENS - 1 tokens took about as many steps: one per step,
    // the long prefill's steps included (a few steps of slack for reading the counter late).
    let steps = stream_end - stream_start;
    assert!(
        steps <= STREAM_TOKENS - 1 + 3,
        "{} tokens took {steps} steps",
        STREAM_TOKENS - 1
    );
}
