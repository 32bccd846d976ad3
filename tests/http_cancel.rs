//! A client that disconnects mid-stream frees its KV pages at once. In its own test binary so
//! that the process-wide metrics belong to this one server.

mod common;

use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn paged_kv_disconnect_frees_pages() {
    // Slowed, so that the stream is surely still running when the client hangs up.
    let server = common::start_slowed(
        |s| {
            s.kv.num_pages = 64;
            s.kv.page_size = 4;
        },
        10,
    )
    .await;
    let base = &server.base;
    let body = json!({ "prompt": "Once upon a time in a land far away", "max_tokens": 200, "temperature": 0, "stream": true });
    let resp = common::post_completion(base, &body).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert!(
        common::kv_report(base).await.used_pages > 0,
        "the running stream holds pages"
    );
    drop(stream);
    let report = common::wait_until_no_page_is_referenced(base).await;
    assert_eq!(report.free_pages + report.cached_pages, 64);
    let metrics = common::metrics_text(base).await;
    assert!(
        metrics.contains("inferflux_requests_cancelled_total"),
        "the cancel was counted"
    );
}
