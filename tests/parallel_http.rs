//! Serving with `parallel.tensor_parallel_size = 2` on the CPU: greedy streams equal
//! transformers' continuations, also when a small pool forces preemption by swapping K/V to host
//! memory (each rank swaps its own KV heads); sizes the server cannot serve are refused at start.

mod common;

use inferflux::config::{DeviceKind, PreemptionMode, Settings};
use inferflux::server::StartError;
use serde_json::json;

fn tp2_small_pool(s: &mut Settings) {
    s.parallel.tensor_parallel_size = 2;
    s.kv.num_pages = 40;
    s.kv.page_size = 4;
    s.kv.enable_prefix_caching = false;
    s.scheduler.max_batched_tokens = 32;
    s.scheduler.preemption = PreemptionMode::Swap;
}

fn greedy(prompt: &str) -> serde_json::Value {
    json!({ "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true })
}

#[tokio::test]
async fn parallel_tp2_http_streams_equal_transformers_greedy() {
    // Slowed, so that the wave below meets in the pool and swaps however fast the machine serves.
    let server = common::start_slowed(tp2_small_pool, 2).await;
    let goldens = common::goldens();
    for p in &goldens.prompts {
        let got = common::stream_completion(&server.base, greedy(&p.prompt)).await;
        assert_eq!(got.text, p.greedy_text, "prompt {:?}", p.prompt);
    }
    // Every prompt twice at once: chunked prefill, batching and swap preemption on both ranks.
    let handles: Vec<_> = goldens
        .prompts
        .iter()
        .chain(goldens.prompts.iter())
        .map(|p| {
            let (base, body) = (server.base.clone(), greedy(&p.prompt));
            tokio::spawn(async move { common::stream_completion(&base, body).await })
        })
        .collect();
    let expected = goldens.prompts.iter().chain(goldens.prompts.iter());
    for (h, p) in handles.into_iter().zip(expected) {
        assert_eq!(h.await.unwrap().text, p.greedy_text, "concurrent {:?}", p.prompt);
    }
    let report = common::wait_until_no_page_is_referenced(&server.base).await;
    assert!(
        report.swapped_out_pages > 0,
        "the small pool forced a swap: {report:?}"
    );
    assert_eq!(report.swapped_in_pages, report.swapped_out_pages);
}

/// Starts a server with `tweak` and returns why it refused to start.
fn start_error(tweak: impl FnOnce(&mut Settings)) -> StartError {
    let mut settings = Settings::default();
    settings.model.device = DeviceKind::Cpu;
    tweak(&mut settings);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    actix_web::rt::System::new().block_on(async move {
        match inferflux::server::start(&settings, listener, inferflux::telemetry::metrics_handle()) {
            Ok(_) => panic!("the server started"),
            Err(e) => e,
        }
    })
}

#[test]
fn parallel_sizes_the_server_cannot_serve_are_refused_at_start() {
    // The tiny model has 4 query heads: 3 ranks cannot split them.
    let e = start_error(|s| s.parallel.tensor_parallel_size = 3);
    assert!(matches!(e, StartError::TensorParallel { size: 3, .. }), "{e}");
    assert!(e.to_string().contains("num_attention_heads = 4"), "{e}");
}

/// The supervisor's restart with tensor parallel: a panic kills rank 0's thread mid-stream and an
/// injected error fails a step; each time the stream ends with an error event, every rank is
/// rebuilt from the loaded shards (new worker threads, fresh caches, the group's communicators
/// reset), and the next requests give transformers' greedy text again.
#[tokio::test]
async fn parallel_tp2_executor_restart_rebuilds_every_rank() {
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    let server = common::start(|s| {
        s.parallel.tensor_parallel_size = 2;
        s.kv.num_pages = 64;
        s.kv.page_size = 4;
    });
    let base = &server.base;
    let client = reqwest::Client::new();
    let golden = &common::goldens().prompts[0];
    for kind in ["panic", "error"] {
        let armed = client
            .post(format!("{base}/admin/fault"))
            .json(&json!({ "kind": kind, "after_steps": 3 }))
            .send()
            .await
            .unwrap();
        assert_eq!(armed.status(), 200, "the hook is on");
        let body =
            json!({ "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true, "stream": true });
        let sse = client
            .post(format!("{base}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(sse.contains("executor failed"), "{kind}: {sse}");
        assert!(sse.ends_with("data: [DONE]\n\n"), "{kind}: {sse}");
        for _ in 0..2 {
            let got = common::stream_completion(base, greedy(&golden.prompt)).await;
            assert_eq!(
                got.text, golden.greedy_text,
                "{kind}: served as before after the restart"
            );
        }
        common::wait_until_no_page_is_referenced(base).await;
    }
}
