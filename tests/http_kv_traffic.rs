//! 200 requests with random prompts over shared stems, random lengths, and clients that hang up
//! or time out, against a small pool: afterwards no page is referenced, checked through
//! `/admin/kv`.

mod common;

use std::time::Duration;

use futures::StreamExt;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

const PAGE: usize = 4;

/// How one random request behaves on the client side.
#[derive(Debug, Clone, Copy)]
enum Client {
    Streams,
    Waits,
    /// Streams, then hangs up after this many events.
    HangsUpAfter(usize),
    /// Gives up (and disconnects) after this many milliseconds.
    TimesOutAfter(u64),
}

async fn run_one(base: String, prompt: Vec<u32>, max_tokens: usize, client: Client) {
    let stream = matches!(client, Client::Streams | Client::HangsUpAfter(_));
    let body = json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream });
    let mut http = reqwest::Client::builder();
    if let Client::TimesOutAfter(ms) = client {
        http = http.timeout(Duration::from_millis(ms));
    }
    let sent = http
        .build()
        .unwrap()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await;
    let Ok(resp) = sent else {
        return; // Timed out before the headers: the client is gone.
    };
    assert_eq!(resp.status(), 200);
    let mut bytes = resp.bytes_stream();
    let mut events = 0;
    while let Some(chunk) = bytes.next().await {
        if chunk.is_err() {
            return;
        }
        events += 1;
        if matches!(client, Client::HangsUpAfter(n) if events >= n) {
            return; // Dropping the stream closes the connection.
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paged_kv_random_traffic_leaves_no_page_referenced() {
    const PAGES: usize = 40;
    // Slowed, so that hang-ups and timeouts cut requests short however fast the machine serves.
    let server = common::start_slowed(
        |s| {
            s.kv.page_size = PAGE;
            s.kv.num_pages = PAGES;
            s.scheduler.max_batched_tokens = 32;
        },
        2,
    )
    .await;
    let mut rng = StdRng::seed_from_u64(20261126);
    let stems: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..12).map(|_| rng.random_range(3..384)).collect())
        .collect();
    let requests: Vec<(Vec<u32>, usize, Client)> = (0..200)
        .map(|_| {
            let stem = &stems[rng.random_range(0..stems.len())];
            let mut prompt = stem[..rng.random_range(0..=stem.len())].to_vec();
            let tail = rng.random_range(usize::from(prompt.is_empty())..20);
            prompt.extend((0..tail).map(|_| rng.random_range(3..384u32)));
            let client = match rng.random_range(0..4) {
                0 => Client::Streams,
                1 => Client::Waits,
                2 => Client::HangsUpAfter(rng.random_range(1..6)),
                _ => Client::TimesOutAfter(rng.random_range(5..60)),
            };
            (prompt, rng.random_range(1..16), client)
        })
        .collect();
    futures::stream::iter(requests)
        .map(|(prompt, max_tokens, client)| run_one(server.base.clone(), prompt, max_tokens, client))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let report = common::wait_until_no_page_is_referenced(&server.base).await;
    assert_eq!(report.free_pages + report.cached_pages, PAGES);
    assert!(
        report.prefix_cache_hit_tokens > 0,
        "shared stems were reused: {report:?}"
    );
    assert!(
        report.evicted_pages > 0,
        "the small pool had to evict: {report:?}"
    );
    let metrics = common::metrics_text(&server.base).await;
    let cancelled = common::metric_value(&metrics, "inferflux_requests_cancelled_total");
    assert!(cancelled > 0.0, "clients that hung up cut requests short");
}
