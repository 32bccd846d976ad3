//! `/metrics` after a small workload: the vLLM-named series count what the responses reported,
//! and `promtool check metrics` accepts the scrape. Its own test binary because the Prometheus
//! recorder is process-global: no other test's requests may add to the counters read here.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{metrics_text, post_completion, stream_completion};
use serde_json::json;

/// The value of the series whose line starts with `series ` (name plus labels, as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool not runnable ({e}): install the `prometheus` Debian package \
             (apt-get install -y prometheus) to check the /metrics format"
        ),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\nscrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn http_metrics_count_the_workload_and_pass_promtool() {
    let base = &common::start(|_| {}).base;
    let bodies = [
        json!({"model": "inferflux-tiny-llama", "prompt": "Hello", "max_tokens": 6, "temperature": 0}),
        json!({"model": "inferflux-tiny-llama", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "stop": ["e"]}),
        json!({"model": "inferflux-tiny-llama", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
        json!({"model": "inferflux-tiny-llama", "prompt": "One two three", "max_tokens": 7, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}, "stop": [" "]}),
    ];
    let (mut prompt_tokens, mut completion_tokens) = (0.0, 0.0);
    for body in bodies {
        let usage = if body["stream"] == true {
            let s = stream_completion(base, body).await;
            s.usage.expect("usage chunk")
        } else {
            let resp = post_completion(base, &body).await;
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value = resp.json().await.unwrap();
            v["usage"].clone()
        };
        prompt_tokens += usage["prompt_tokens"].as_f64().unwrap();
        completion_tokens += usage["completion_tokens"].as_f64().unwrap();
    }
    assert!(
        completion_tokens >= 4.0,
        "every request generated at least one token"
    );
    let missing = reqwest::get(format!("{base}/no/such/path")).await.unwrap();
    assert_eq!(missing.status(), 404);

    // The scheduler publishes its gauges after the last sequence finishes; poll for that.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = metrics_text(base).await;
        let idle = value(&text, "inferflux_num_requests_running") == Some(0.0)
            && value(&text, "inferflux_num_requests_waiting") == Some(0.0);
        if idle || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(must(&text, "inferflux_num_requests_running"), 0.0);
    assert_eq!(must(&text, "inferflux_num_requests_waiting"), 0.0);

    assert_eq!(
        must(&text, "inferflux_generation_tokens_total"),
        completion_tokens
    );
    assert_eq!(must(&text, "inferflux_prompt_tokens_total"), prompt_tokens);
    assert_eq!(must(&text, "inferflux_request_prompt_tokens_sum"), prompt_tokens);
    assert_eq!(
        must(&text, "inferflux_request_generation_tokens_sum"),
        completion_tokens
    );
    for h in [
        "inferflux_time_to_first_token_seconds",
        "inferflux_e2e_request_latency_seconds",
        "inferflux_request_queue_time_seconds",
        "inferflux_request_prefill_time_seconds",
        "inferflux_request_decode_time_seconds",
        "inferflux_request_prompt_tokens",
        "inferflux_request_generation_tokens",
    ] {
        assert_eq!(must(&text, &format!("{h}_count")), 4.0, "{h}: one per request");
        assert!(
            text.contains(&format!("# TYPE {h} histogram")),
            "{h} is a histogram"
        );
    }
    // Every token after a request's first is one inter-token gap.
    assert_eq!(
        must(&text, "inferflux_inter_token_latency_seconds_count"),
        completion_tokens - 4.0
    );
    assert!(must(&text, "inferflux_batch_size_count") > 0.0);
    assert!(
        !text.contains(" summary"),
        "every histogram has buckets (no summaries):\n{text}"
    );
    assert_eq!(
        must(
            &text,
            r#"inferflux_http_requests_total{endpoint="/v1/completions",status="200"}"#
        ),
        4.0
    );
    assert_eq!(
        must(
            &text,
            r#"inferflux_http_requests_total{endpoint="unmatched",status="404"}"#
        ),
        1.0
    );
    let version = format!(
        r#"inferflux_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(must(&text, &version), 1.0);
    assert!(text.contains(r#"inferflux_model_info{model="inferflux-tiny-llama""#));
    promtool_check(&text);
}
