//! Preemption by swapping K/V to host memory: outputs do not change, every swapped page comes
//! back, and a full swap space falls back to recompute. In its own test binary so that the
//! process-wide metrics belong to these servers.

mod common;

use inferflux::config::{PreemptionMode, Settings};
use serde_json::json;

/// 40 pages of 4 tokens: the longest golden sequence fits, ten at once do not. Prefix caching
/// is off so that a resumed sequence really reads what came back from host memory.
fn small_pool(s: &mut Settings) {
    s.kv.num_pages = 40;
    s.kv.page_size = 4;
    s.kv.enable_prefix_caching = false;
    s.scheduler.max_batched_tokens = 32;
    s.scheduler.preemption = PreemptionMode::Swap;
}

/// Every golden prompt twice, all at once; each must equal transformers' continuation. The
/// servers' steps are slowed (`start_slowed`), so that the wave meets in the pool and preempts
/// however fast the machine serves.
async fn run_goldens_concurrently(base: &str) {
    let goldens = common::goldens();
    let handles: Vec<_> = goldens
        .prompts
        .iter()
        .chain(goldens.prompts.iter())
        .map(|p| {
            let body = json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 0, "stream": true });
            let base = base.to_string();
            tokio::spawn(async move { common::stream_completion(&base, body).await })
        })
        .collect();
    let expected = goldens.prompts.iter().chain(goldens.prompts.iter());
    for (h, p) in handles.into_iter().zip(expected) {
        assert_eq!(h.await.unwrap().text, p.greedy_text, "prompt {:?}", p.prompt);
    }
}

#[tokio::test]
async fn paged_kv_swap_preemption_keeps_outputs_and_returns_every_page() {
    let server = common::start_slowed(small_pool, 2).await;
    run_goldens_concurrently(&server.base).await;
    let report = common::wait_until_no_page_is_referenced(&server.base).await;
    assert!(
        report.swapped_out_pages > 0,
        "the small pool forced a swap: {report:?}"
    );
    assert_eq!(
        report.swapped_in_pages, report.swapped_out_pages,
        "every swapped sequence resumed"
    );
    assert_eq!(report.swap_used_pages, 0);
    let metrics = common::metrics_text(&server.base).await;
    assert!(
        metrics.contains("inferflux_num_preemptions_total{mode=\"swap\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn paged_kv_full_swap_space_falls_back_to_recompute() {
    let server = common::start_slowed(
        |s| {
            small_pool(s);
            s.kv.swap_space_mib = 0;
        },
        2,
    )
    .await;
    run_goldens_concurrently(&server.base).await;
    let report = common::wait_until_no_page_is_referenced(&server.base).await;
    assert_eq!(report.swap_capacity_pages, 0);
    assert_eq!(report.swapped_out_pages, 0);
    let metrics = common::metrics_text(&server.base).await;
    assert!(
        metrics.contains("inferflux_num_preemptions_total{mode=\"recompute\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn paged_kv_pool_sized_from_free_memory() {
    let server = common::start(|s| {
        s.kv.num_pages = 0;
        // A sliver of this machine's free memory: a few hundred pages of the tiny model.
        s.kv.memory_fraction = 1e-4;
    });
    let report = common::kv_report(&server.base).await;
    assert!(report.num_pages > 0, "{report:?}");
    let free = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: usize = free
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // 2 layers x (K + V) x 16 tokens x 32 values x 4 bytes per page.
    let page_bytes = 2 * 2 * 16 * 32 * 4;
    let expected = (kib * 1024) as f64 * 1e-4 / page_bytes as f64;
    let ratio = report.num_pages as f64 / expected;
    assert!(
        (0.5..2.0).contains(&ratio),
        "{} pages, about {expected:.0} expected",
        report.num_pages
    );
    let p = &common::goldens().prompts[0];
    let body = serde_json::json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 0, "stream": true });
    assert_eq!(
        common::stream_completion(&server.base, body).await.text,
        p.greedy_text
    );
}
