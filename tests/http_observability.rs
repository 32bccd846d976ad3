//! Request ids, request-scoped JSON logs and the `/admin/metrics` snapshot: what an operator
//! follows one request or one busy minute with.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;

use common::{post_completion, start, stream_completion};
use inferflux::http::admin::MetricsSnapshot;
use serde_json::{json, Value};

async fn post_with_id(base: &str, path: &str, id: Option<&str>, body: Value) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(format!("{base}{path}")).json(&body);
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    req.send().await.unwrap()
}

fn header(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn observability_request_id_is_taken_from_the_client_and_returned() {
    let server = common::start_slowed(|_| {}, 0).await;
    let base = &server.base;
    let body = json!({ "prompt": "hello", "max_tokens": 3, "temperature": 0 });

    // The client's id names the completion and comes back in the header.
    let resp = post_with_id(base, "/v1/completions", Some("trace-abc_1:x"), body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp), "trace-abc_1:x");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "trace-abc_1:x");

    // Without one, a new id in OpenAI's shape, the same in header and body.
    let resp = post_with_id(base, "/v1/completions", None, body.clone()).await;
    let id = header(&resp);
    let v: Value = resp.json().await.unwrap();
    assert!(id.starts_with("cmpl-") && id.len() > 20, "{id}");
    assert_eq!(v["id"], id.as_str());

    // An unusable id (too long) is replaced rather than logged.
    let long = "x".repeat(200);
    let resp = post_with_id(base, "/v1/completions", Some(&long), body.clone()).await;
    assert!(header(&resp).starts_with("cmpl-"));

    // Streams, errors and every other route answer with the header too.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let resp = post_with_id(base, "/v1/completions", Some("stream-7"), stream).await;
    assert_eq!(header(&resp), "stream-7");
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"id\":\"stream-7\""), "{text}");
    let resp = post_with_id(base, "/v1/completions", Some("bad-1"), json!({ "prompt": 5 })).await;
    assert_eq!((resp.status().as_u16(), header(&resp)), (400, "bad-1".into()));
    let resp = reqwest::get(format!("{base}/no/such/route")).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(header(&resp).starts_with("req-"));

    // An operator cancels by the client's id, while the request surely still runs.
    common::set_step_delay(base, 10).await;
    let slow = json!({ "prompt": "hello", "max_tokens": 200, "ignore_eos": true, "stream": true });
    let resp = post_with_id(base, "/v1/completions", Some("cancel-me"), slow).await;
    let mut events = resp.bytes_stream().eventsource();
    let first: Value = serde_json::from_str(&events.next().await.unwrap().unwrap().data).unwrap();
    assert_eq!(first["id"], "cancel-me");
    let resp = reqwest::Client::new()
        .post(format!("{base}/admin/requests/cancel-me/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reasons = Vec::new();
    while let Some(e) = events.next().await {
        let e = e.unwrap();
        if e.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&e.data).unwrap();
        reasons.extend(chunk["choices"][0]["finish_reason"].as_str().map(str::to_string));
    }
    assert_eq!(reasons, ["abort"]);
    common::wait_until_no_page_is_referenced(base).await;
}

#[tokio::test]
async fn observability_admin_metrics_snapshot_counts_the_last_minute() {
    let server = start(|_| {});
    let base = &server.base;
    let mut generated = 0;
    for i in 0..3 {
        let body = json!({ "prompt": format!("count {i}"), "max_tokens": 5 + i, "temperature": 0, "ignore_eos": true });
        let v: Value = post_completion(base, &body).await.json().await.unwrap();
        generated += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let streamed = stream_completion(
        base,
        json!({ "prompt": "stream", "max_tokens": 7, "ignore_eos": true, "stream": true,
                "stream_options": { "include_usage": true } }),
    )
    .await;
    generated += streamed.usage.unwrap()["completion_tokens"].as_u64().unwrap();
    // The current second is left out of the rates: wait for the workload's seconds to close.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let snap: MetricsSnapshot = reqwest::get(format!("{base}/admin/metrics"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(snap.backend, "cpu");
    assert_eq!(snap.model, "inferflux-tiny-llama");
    assert!(snap.uptime_seconds >= 1.0);
    assert_eq!((snap.queue.running, snap.queue.waiting), (0, 0));
    assert_eq!(snap.kv.used_pages, 0, "nothing runs, so no page is held");
    assert!(snap.kv.largest_cached_prefixes.is_empty(), "kept for /admin/kv");
    let t = snap.throughput;
    assert!(t.window_seconds >= 1.0 && t.window_seconds <= 60.0, "{t:?}");
    let seen = t.generation_tokens_per_second * t.window_seconds;
    assert!(
        (seen - generated as f64).abs() < 1e-6,
        "rate x window = {seen} tokens, the responses carried {generated}"
    );
    let finished = t.finished_requests_per_second * t.window_seconds;
    assert!((finished - 4.0).abs() < 1e-6, "{t:?}");
    assert!(
        t.prompt_tokens_per_second > 0.0 && t.steps_per_second > 0.0,
        "{t:?}"
    );

    // inferctl renders it, and --watch redraws it --count times.
    let url = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        let table = Command::new(env!("CARGO_BIN_EXE_inferctl"))
            .args(["--url", &url, "admin", "metrics"])
            .output()
            .unwrap();
        let watch = Command::new(env!("CARGO_BIN_EXE_inferctl"))
            .args([
                "--url", &url, "admin", "metrics", "--watch", "0.1", "--count", "3", "--json",
            ])
            .output()
            .unwrap();
        let bad = Command::new(env!("CARGO_BIN_EXE_inferctl"))
            .args(["--url", &url, "admin", "metrics", "--watch", "0"])
            .output()
            .unwrap();
        (table, watch, bad)
    })
    .await
    .unwrap();
    let (table, watch, bad) = out;
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{table_text}");
    for expect in [
        "throughput",
        "generated tok/s",
        "requests      0 running",
        "pages",
    ] {
        assert!(
            table_text.contains(expect),
            "{expect:?} missing from:\n{table_text}"
        );
    }
    let watch_text = String::from_utf8_lossy(&watch.stdout);
    assert!(watch.status.success(), "{watch_text}");
    assert_eq!(watch_text.matches("every 0.1s").count(), 3, "{watch_text}");
    assert_eq!(watch_text.matches("\"throughput\"").count(), 3, "{watch_text}");
    assert_eq!(bad.status.code(), Some(2), "a zero interval is a usage error");
}

/// `inferfluxd` with JSON logs on a free port; its stdout lines arrive on the channel.
struct LoggingServer {
    child: Child,
    base: String,
    lines: mpsc::Receiver<String>,
}

impl Drop for LoggingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_with_json_logs() -> LoggingServer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferfluxd"))
        .args(["--port", "0", "--device", "cpu"])
        .env("INFERFLUX_LOG_FORMAT", "json")
        .env("INFERFLUX_LOG", "info")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("inferfluxd logged nothing before starting to listen");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().to_string();
        }
    };
    LoggingServer {
        child,
        base: format!("http://{addr}"),
        lines: rx,
    }
}

#[tokio::test]
async fn observability_json_logs_follow_one_request_id() {
    let server = start_with_json_logs();
    let id = "follow-me-42";
    let body =
        json!({ "prompt": "hello", "max_tokens": 6, "ignore_eos": true, "stream": true, "user": "alice" });
    let resp = post_with_id(&server.base, "/v1/completions", Some(id), body).await;
    assert_eq!(resp.status(), 200);
    let sse = resp.text().await.unwrap();
    assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");
    // A second request in between must not show up under the first one's id.
    let other = post_with_id(
        &server.base,
        "/v1/completions",
        Some("someone-else"),
        json!({ "prompt": "hi", "max_tokens": 2 }),
    )
    .await;
    assert_eq!(other.status(), 200);

    // Read until the first request's access line; every line must be JSON.
    let mut mine = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mine.iter().any(|v: &Value| v["message"] == "access") {
        let line = server
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("no access line for the request");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["span"]["request_id"] == id {
            mine.push(v);
        }
    }
    let messages: Vec<&str> = mine.iter().map(|v| v["message"].as_str().unwrap()).collect();
    let position = |m: &str| {
        messages
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("no {m:?} line for {id}: {messages:?}"))
    };
    let (accepted, first, finished, access) = (
        position("request accepted"),
        position("first token"),
        position("request finished"),
        position("access"),
    );
    assert!(
        accepted < first && first < finished && finished < access,
        "{messages:?}"
    );
    for v in &mine {
        assert_eq!(v["span"]["client"], "alice", "{v}");
        assert_eq!(v["span"]["model"], "inferflux-tiny-llama", "{v}");
    }
    let a = &mine[access];
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(a["endpoint"], "/v1/completions", "{a}");
    assert_eq!(a["completion_tokens"], 6, "{a}");
    assert!(a["prompt_tokens"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["completed"], true, "{a}");
    let (ttft, duration) = (a["ttft_ms"].as_f64().unwrap(), a["duration_ms"].as_f64().unwrap());
    assert!(ttft > 0.0 && ttft <= duration, "{a}");
    assert_eq!(mine[finished]["completion_tokens"], 6);
}
