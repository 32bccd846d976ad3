//! Serving with `parallel.data_parallel_size = 2` on the CPU: requests spread over both replicas,
//! a repeated prefix goes back to the replica whose pool holds it (even when that one is busier),
//! greedy outputs equal transformers' (alone, concurrently, and with tensor parallel 2 inside each
//! replica), and disconnects and operator cancels free every page of the replica holding them.
//! The executors' per-step delay (`INFERFLUX_FAULT_INJECTION=1`, `POST /admin/fault`) keeps
//! requests running long enough to overlap.

mod common;

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::stream::BoxStream;
use futures::StreamExt;
use inferflux::config::Settings;
use serde_json::{json, Value};

const PAGE: usize = 4;

fn dp2(s: &mut Settings) {
    s.parallel.data_parallel_size = 2;
    s.kv.page_size = PAGE;
    s.kv.num_pages = 96;
}

fn greedy(prompt: &str) -> Value {
    json!({ "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true })
}

/// A token-id prompt of `len` tokens starting at id `first` (distinct first pages for distinct `first`).
fn tokens(first: u32, len: u32) -> Value {
    json!((first..first + len).map(|t| t % 380 + 3).collect::<Vec<u32>>())
}

/// Per replica: `(placed for a prefix, placed as the least loaded)`, from `/admin/queue`.
async fn placements(base: &str) -> Vec<(u64, u64)> {
    let q = common::queue_report(base).await;
    q["replicas"]
        .as_array()
        .expect("/admin/queue lists the replicas")
        .iter()
        .map(|r| {
            (
                r["placed_prefix"].as_u64().unwrap(),
                r["placed_least_loaded"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Starts a streamed completion and returns its events once the first token arrived (so it is
/// placed and running), with its request id.
async fn started_stream(base: &str, body: Value) -> (String, BoxStream<'static, Value>) {
    let resp = common::post_completion(base, &body).await;
    assert_eq!(resp.status(), 200);
    let mut events = resp
        .bytes_stream()
        .eventsource()
        .filter_map(|e| async move {
            let e = e.ok()?;
            (e.data != "[DONE]").then(|| serde_json::from_str::<Value>(&e.data).unwrap())
        })
        .boxed();
    let first = events.next().await.expect("a first chunk");
    (first["id"].as_str().unwrap().to_string(), events)
}

/// Waits until no request runs or waits and every page of both pools is free or cached; fails
/// after `within`.
async fn wait_idle(base: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let q = common::queue_report(base).await;
        let kv = common::kv_report(base).await;
        if q["running"] == 0 && q["waiting"] == 0 && kv.used_pages == 0 {
            return q;
        }
        assert!(Instant::now() < deadline, "still busy: {q} {kv:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn parallel_data_spreads_requests_and_sends_a_prefix_back_to_its_replica() {
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    let server = common::start(dp2);
    let base = server.base.as_str();
    let kv = common::kv_report(base).await;
    assert_eq!(kv.num_pages, 2 * 96, "each replica has the configured pool");
    common::set_step_delay(base, 15).await;

    // Four distinct prompts at once: two per replica.
    let handles: Vec<_> = (0..4u32)
        .map(|i| {
            let body = json!({ "prompt": tokens(40 * i, 9), "max_tokens": 8, "temperature": 0 });
            let base = base.to_string();
            tokio::spawn(async move { common::post_completion(&base, &body).await.status() })
        })
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
    wait_idle(base, Duration::from_secs(10)).await;
    assert_eq!(placements(base).await, vec![(0, 2), (0, 2)]);
    let text = common::metrics_text(base).await;
    for replica in ["0", "1"] {
        assert!(
            text.contains(&format!(
                "inferflux_dp_placements_total{{replica=\"{replica}\",reason=\"least_loaded\"}}"
            )) || text.contains(&format!(
                "inferflux_dp_placements_total{{reason=\"least_loaded\",replica=\"{replica}\"}}"
            )),
            "{text}"
        );
        assert!(text.contains(&format!("inferflux_kv_used_pages{{replica=\"{replica}\"}}")));
    }

    // A prompt of five full pages lands on replica 0 (both idle: the lower index) ...
    let shared = tokens(200, 5 * PAGE as u32 + 2);
    let body = json!({ "prompt": shared, "max_tokens": 2, "temperature": 0 });
    let resp: Value = common::post_completion(base, &body).await.json().await.unwrap();
    let first_text = resp["choices"][0]["text"].clone();
    assert_eq!(placements(base).await, vec![(0, 3), (0, 2)]);
    // ... then replica 0 gets busier with a long request (also the lower index) ...
    let long = json!({ "prompt": tokens(300, 6), "max_tokens": 60, "temperature": 0, "stream": true, "ignore_eos": true });
    let (_, long_events) = started_stream(base, long).await;
    assert_eq!(placements(base).await, vec![(0, 4), (0, 2)]);
    // ... and the repeated prompt still goes to replica 0, which holds its pages.
    let resp: Value = common::post_completion(base, &body).await.json().await.unwrap();
    assert_eq!(placements(base).await, vec![(1, 4), (0, 2)]);
    let cached = resp["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage reports cached tokens");
    assert!(cached >= 4 * PAGE as u64, "the prefix was reused: {resp}");
    assert_eq!(
        resp["choices"][0]["text"], first_text,
        "a cache hit changes no output"
    );
    let text = common::metrics_text(base).await;
    assert!(
        text.contains(r#"inferflux_dp_placements_total{replica="0",reason="prefix"}"#)
            || text.contains(r#"inferflux_dp_placements_total{reason="prefix",replica="0"}"#),
        "{text}"
    );
    drop(long_events);
    common::set_step_delay(base, 0).await;
    wait_idle(base, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn parallel_data_greedy_outputs_equal_one_replica_and_transformers() {
    let server = common::start(dp2);
    let goldens = common::goldens();
    for p in &goldens.prompts {
        let got = common::stream_completion(&server.base, greedy(&p.prompt)).await;
        assert_eq!(got.text, p.greedy_text, "prompt {:?}", p.prompt);
    }
    // Every prompt three times at once, the prefix caches emptied first (else the prompts would
    // all go back to replica 0, which served them): spread over both replicas, batched within
    // each; the repeats may hit either replica's prefix cache.
    let reset = reqwest::Client::new()
        .post(format!("{}/admin/kv/reset_prefix_cache", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    let all: Vec<_> = (0..3).flat_map(|_| goldens.prompts.iter()).collect();
    let handles: Vec<_> = all
        .iter()
        .map(|p| {
            let (base, body) = (server.base.clone(), greedy(&p.prompt));
            tokio::spawn(async move { common::stream_completion(&base, body).await })
        })
        .collect();
    for (h, p) in handles.into_iter().zip(&all) {
        assert_eq!(h.await.unwrap().text, p.greedy_text, "concurrent {:?}", p.prompt);
    }
    let q = wait_idle(&server.base, Duration::from_secs(10)).await;
    let placed: Vec<u64> = q["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["placed_prefix"].as_u64().unwrap() + r["placed_least_loaded"].as_u64().unwrap())
        .collect();
    assert_eq!(placed.iter().sum::<u64>(), 4 * goldens.prompts.len() as u64);
    assert!(placed.iter().all(|&n| n > 0), "both replicas served: {placed:?}");
}

#[tokio::test]
async fn parallel_data_cancel_and_disconnect_free_pages_on_the_replica_holding_them() {
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    let server = common::start(dp2);
    let base = server.base.as_str();
    common::set_step_delay(base, 40).await;
    // Two long streams, one per replica; left alone each would run for about 6 s.
    let body =
        |first| json!({ "prompt": tokens(first, 7), "max_tokens": 150, "ignore_eos": true, "stream": true });
    let (_, dropped) = started_stream(base, body(10)).await;
    let (id, mut cancelled) = started_stream(base, body(90)).await;
    assert_eq!(placements(base).await, vec![(0, 1), (0, 1)]);
    assert!(common::kv_report(base).await.used_pages > 0);
    // The client of the first goes away; an operator cancels the second.
    drop(dropped);
    let resp = reqwest::Client::new()
        .post(format!("{base}/admin/requests/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut finish = None;
    while let Some(chunk) = cancelled.next().await {
        if let Some(r) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(r.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("abort"));
    // Both replicas' pages are back well before either request could have finished.
    wait_idle(base, Duration::from_secs(3)).await;
    common::set_step_delay(base, 0).await;
}

#[tokio::test]
async fn parallel_data_with_tensor_parallel_inside_each_replica() {
    let server = common::start(|s| {
        dp2(s);
        s.parallel.tensor_parallel_size = 2;
    });
    let goldens = common::goldens();
    let handles: Vec<_> = goldens
        .prompts
        .iter()
        .map(|p| {
            let (base, body) = (server.base.clone(), greedy(&p.prompt));
            tokio::spawn(async move { common::stream_completion(&base, body).await })
        })
        .collect();
    for (h, p) in handles.into_iter().zip(&goldens.prompts) {
        assert_eq!(h.await.unwrap().text, p.greedy_text, "{:?}", p.prompt);
    }
    wait_idle(&server.base, Duration::from_secs(10)).await;
}

/// Each replica's executor is supervised on its own: a panic injected mid-stream fails that
/// stream, its replica restarts, and both replicas serve transformers' greedy text after it. A
/// drain reaches every replica (`/ready` 503, completions 503) and a resume every replica again.
#[tokio::test]
async fn parallel_data_restart_and_drain_reach_every_replica() {
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    let server = common::start(dp2);
    let base = server.base.as_str();
    let client = reqwest::Client::new();
    let armed = client
        .post(format!("{base}/admin/fault"))
        .json(&json!({ "kind": "panic", "after_steps": 3 }))
        .send()
        .await
        .unwrap();
    assert_eq!(armed.status(), 200);
    let body = json!({ "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true, "stream": true });
    let sse = common::post_completion(base, &body).await.text().await.unwrap();
    assert!(sse.contains("executor failed"), "{sse}");
    let goldens = common::goldens();
    let handles: Vec<_> = goldens
        .prompts
        .iter()
        .map(|p| {
            let (base, body) = (base.to_string(), greedy(&p.prompt));
            tokio::spawn(async move { common::stream_completion(&base, body).await })
        })
        .collect();
    for (h, p) in handles.into_iter().zip(&goldens.prompts) {
        assert_eq!(
            h.await.unwrap().text,
            p.greedy_text,
            "after the restart: {:?}",
            p.prompt
        );
    }
    let q = wait_idle(base, Duration::from_secs(10)).await;
    assert!(
        q["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["draining"] == false),
        "{q}"
    );
    assert!(common::metrics_text(base)
        .await
        .contains("inferflux_executor_restarts_total"));

    let drain = |on: bool| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("{base}/admin/drain"))
                .json(&json!({ "drain": on }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let q = drain(true).await;
    assert_eq!(q["draining"], true);
    assert!(
        q["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["draining"] == true),
        "{q}"
    );
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let refused = common::post_completion(base, &greedy("Hello")).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(drain(false).await["draining"], false);
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let p = &goldens.prompts[0];
    assert_eq!(
        common::stream_completion(base, greedy(&p.prompt)).await.text,
        p.greedy_text
    );
}
