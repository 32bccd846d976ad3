//! A client that disconnects mid-stream frees its KV pages at once. In its own test binary so
//! that the process-wide metrics belong to this one server.

mod common;

use futures::StreamExt;
use serde_json::json;

/// The cancels counted so far, once they reach `want` (the scheduler counts a cancel just after
/// it frees the pages, so a page report may come first), or after 5 s.
async fn cancelled_once_at(base: &str, want: f64) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = common::metrics_text(base).await;
        let n = common::metric_value(&text, "inferflux_requests_cancelled_total");
        if n >= want || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A 200-token greedy stream of `prompt`, its first chunk read: running when returned.
async fn started_stream(
    base: &str,
    prompt: &str,
) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> {
    let body = json!({ "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": true });
    let mut stream = common::post_completion(base, &body).await.bytes_stream();
    stream.next().await.unwrap().unwrap();
    stream
}

/// Every page is free again, and `cancels` cancels were counted in all, not more.
async fn all_freed_and_cancelled(base: &str, cancels: f64) {
    let report = common::wait_until_no_page_is_referenced(base).await;
    assert_eq!(report.free_pages + report.cached_pages, 64);
    let counted = cancelled_once_at(base, cancels).await;
    assert_eq!(counted, cancels, "each hang-up counted as one cancel");
}

#[tokio::test]
async fn paged_kv_disconnect_frees_pages() {
    // Slowed, so that the streams are surely still running when their clients hang up.
    let server = common::start_slowed(
        |s| {
            s.kv.num_pages = 64;
            s.kv.page_size = 4;
        },
        10,
    )
    .await;
    let base = &server.base;
    let stream = started_stream(base, "Once upon a time in a land far away").await;
    assert!(
        common::kv_report(base).await.used_pages > 0,
        "the running stream holds pages"
    );
    drop(stream);
    all_freed_and_cancelled(base, 1.0).await;
    // Eight at once. Each hang-up is one cancel, whether the request's drop guard or the stop
    // detector (which sees the closed stream) gets to the scheduler first, and never two.
    let mut streams = Vec::new();
    for i in 0..8 {
        streams.push(started_stream(base, &format!("Story {i}:")).await);
    }
    drop(streams);
    all_freed_and_cancelled(base, 9.0).await;
    let text = common::metrics_text(base).await;
    assert_eq!(
        common::metric_value(&text, "inferflux_request_success_total"),
        0.0,
        "no hang-up counted as a success"
    );
}
