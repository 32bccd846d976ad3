//! Automatic prefix caching over HTTP: hits are reported in `usage`, `/admin/kv` and the metrics,
//! and never change an output. In its own test binary so that the process-wide metrics belong to
//! the one server with a prefix cache.

mod common;

use serde_json::{json, Value};

const PAGE: usize = 4;

/// Greedy, non-streamed: `(text, cached prompt tokens)`.
async fn complete(base: &str, prompt: Value, max_tokens: usize) -> (String, u64) {
    let body = json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 });
    let resp = common::post_completion(base, &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage reports cached tokens");
    (v["choices"][0]["text"].as_str().unwrap().to_string(), cached)
}

#[tokio::test]
async fn paged_kv_prefix_hits_are_reported_and_change_no_output() {
    let cached = common::start(|s| {
        s.kv.page_size = PAGE;
        s.kv.num_pages = 128;
    });
    let uncached = common::start(|s| {
        s.kv.page_size = PAGE;
        s.kv.num_pages = 128;
        s.kv.enable_prefix_caching = false;
    });
    let (base, cold) = (cached.base.as_str(), uncached.base.as_str());
    let goldens = common::goldens();

    // The same prompt twice: the second reuses every full page and still matches transformers.
    for (i, p) in goldens.prompts.iter().enumerate() {
        let (first, first_hit) = complete(base, json!(p.prompt), 24).await;
        let (second, second_hit) = complete(base, json!(p.prompt), 24).await;
        assert_eq!(first, p.greedy_text, "prompt {i}");
        assert_eq!(second, p.greedy_text, "prompt {i} after a prefix hit");
        if i == 0 {
            assert_eq!(first_hit, 0, "nothing is cached before the first request");
        }
        let len = p.input_ids.len();
        assert_eq!(
            second_hit as usize,
            (len / PAGE * PAGE).min(len - 1),
            "prompt {i}: every full page is reused"
        );
    }

    // A long shared prefix with different endings, compared with the server without a cache.
    let shared: String = goldens
        .prompts
        .iter()
        .map(|p| p.prompt.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let (_, _) = complete(base, json!(format!("{shared} and so it ends.")), 4).await;
    for ending in [" Then another tale began", " What came next?"] {
        let prompt = json!(format!("{shared}{ending}"));
        let (hit_text, hit) = complete(base, prompt.clone(), 16).await;
        let (cold_text, cold_hit) = complete(cold, prompt.clone(), 16).await;
        assert!(
            hit >= (PAGE * 4) as u64,
            "the shared prefix was reused: {hit} tokens"
        );
        assert_eq!(cold_hit, 0, "the cache is off on the cold server");
        assert_eq!(hit_text, cold_text, "a prefix hit changes nothing");
        let streamed = common::stream_completion(
            base,
            json!({ "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": true }),
        )
        .await;
        assert_eq!(streamed.text, cold_text);
    }

    // A prompt made only of full cached pages: its last page is copied before it is written.
    let ids: Vec<u32> = goldens.prompts[0].input_ids[..2 * PAGE].to_vec();
    let (cold_text, _) = complete(cold, json!(ids), 12).await;
    let (first, _) = complete(base, json!(ids), 12).await;
    let copied_before = common::kv_report(base).await.copied_pages;
    let (again, hit) = complete(base, json!(ids), 12).await;
    assert_eq!(
        hit as usize,
        2 * PAGE - 1,
        "all but the last token come from the cache"
    );
    assert_eq!(
        (first.as_str(), again.as_str()),
        (cold_text.as_str(), cold_text.as_str())
    );
    assert!(
        common::kv_report(base).await.copied_pages > copied_before,
        "copy-on-write happened"
    );

    let report = common::wait_until_no_page_is_referenced(base).await;
    assert!(report.prefix_caching);
    assert!(report.prefix_cache_hit_tokens > 0 && report.prefix_cache_hit_rate > 0.0);
    assert!(report.cached_pages > 0);
    let longest = &report.largest_cached_prefixes[0];
    assert!(longest.tokens >= shared.len() / 8, "{longest:?}");
    let metrics = common::metrics_text(base).await;
    let hits: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("inferflux_prefix_cache_hits_total "))
        .expect("hit counter exported")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(hits as u64, report.prefix_cache_hit_tokens);

    // The operator's view through inferctl agrees with /admin/kv.
    let url = base.to_string();
    let table = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_inferctl"))
            .args(["--url", &url, "admin", "kv"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    let hit_line = format!(
        "prefix cache  on ({} of {} tokens hit",
        report.prefix_cache_hit_tokens, report.prefix_cache_queried_tokens
    );
    assert!(table.contains(&hit_line), "{table}");

    // After a reset nothing is reused, and the output is still the same.
    let reset: Value = reqwest::Client::new()
        .post(format!("{base}/admin/kv/reset_prefix_cache"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(reset["dropped_keys"].as_u64().unwrap() > 0);
    let after = common::kv_report(base).await;
    assert_eq!((after.cached_pages, after.free_pages), (0, after.num_pages));
    let p = &goldens.prompts[0];
    assert_eq!(
        complete(base, json!(p.prompt), 24).await,
        (p.greedy_text.clone(), 0)
    );
}
