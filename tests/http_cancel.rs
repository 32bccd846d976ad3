//! A client that disconnects mid-stream frees its KV pages at once. In its own test binary so
//! that the process-wide metrics belong to this one server.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

async fn free_pages(base: &str) -> f64 {
    let text = common::metrics_text(base).await;
    text.lines()
        .find_map(|l| l.strip_prefix("inferflux_kv_free_pages "))
        .map_or(-1.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn paged_kv_disconnect_frees_pages() {
    let server = common::start(|s| {
        s.kv.num_pages = 64;
        s.kv.page_size = 4;
    });
    let base = &server.base;
    let body = json!({ "prompt": "Once upon a time in a land far away", "max_tokens": 200, "temperature": 0, "stream": true });
    let resp = common::post_completion(base, &body).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert!(free_pages(base).await < 64.0, "the running stream holds pages");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if free_pages(base).await == 64.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pages were not freed after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = common::metrics_text(base).await;
    assert!(
        metrics.contains("inferflux_requests_cancelled_total"),
        "the cancel was counted"
    );
}
