//! Time to first token with and without a prefix-cache hit, in one run: a request whose
//! 512-token system prompt is new (miss) against the same system prompt with another question
//! (hit). Served over HTTP by a real server on the CPU backend, with the embedded tiny model's
//! context stretched to 2,048 positions (random weights; only the timing matters).
//!
//! `cargo bench --bench prefix_cache_ttft`; results go to docs/Performance.md as a ratio.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use inferflux::config::{DeviceKind, Settings};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};

const SYSTEM_TOKENS: usize = 512;
const QUESTION_TOKENS: usize = 32;
const ROUNDS: usize = 20;

/// A copy of the tiny fixture whose config allows 2,048 positions.
fn stretched_model() -> PathBuf {
    let src = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama"));
    let dir = std::env::temp_dir().join(format!("inferflux-ttft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["model.safetensors", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(name), dir.join(name)).unwrap();
    }
    for name in ["config.json", "tokenizer_config.json"] {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(src.join(name)).unwrap()).unwrap();
        for key in ["max_position_embeddings", "model_max_length"] {
            if v.get(key).is_some() {
                v[key] = json!(2048);
            }
        }
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }
    dir
}

fn start_server(model: PathBuf) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = Settings::default();
        s.model.path = Some(model);
        s.model.device = DeviceKind::Cpu;
        s.kv.page_size = 16;
        s.kv.num_pages = 1024;
        // The whole prompt in one step: a miss costs one full prefill.
        s.scheduler.max_batched_tokens = 1024;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        actix_web::rt::System::new().block_on(async move {
            let running =
                inferflux::server::start(&s, listener, inferflux::telemetry::metrics_handle()).unwrap();
            tx.send(running.addr).unwrap();
            running.server.await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

/// One greedy token, not streamed: its latency is the time to first token. Returns it and the
/// cached prompt tokens the server reported.
async fn first_token(client: &reqwest::Client, base: &str, prompt: &[u32]) -> (Duration, u64) {
    let body = json!({ "prompt": prompt, "max_tokens": 1, "temperature": 0 });
    let started = Instant::now();
    let v: Value = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let took = started.elapsed();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    (took, cached)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let model = stretched_model();
    let base = start_server(model.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let mut rng = StdRng::seed_from_u64(512);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..384)).collect() };
    let (mut misses, mut hits) = (Vec::new(), Vec::new());
    let mut hit_cached = Vec::new();
    for round in 0..ROUNDS + 2 {
        // A new system prompt each round, so the first request really misses.
        let system = tokens(SYSTEM_TOKENS);
        let miss: Vec<u32> = system.iter().copied().chain(tokens(QUESTION_TOKENS)).collect();
        let hit: Vec<u32> = system.iter().copied().chain(tokens(QUESTION_TOKENS)).collect();
        let (miss_t, miss_cached) = rt.block_on(first_token(&client, &base, &miss));
        let (hit_t, cached) = rt.block_on(first_token(&client, &base, &hit));
        assert_eq!(miss_cached, 0, "a new system prompt cannot hit");
        if round >= 2 {
            // The first rounds warm up allocators and caches.
            misses.push(miss_t);
            hits.push(hit_t);
            hit_cached.push(cached);
        }
    }
    let (miss, hit) = (median(misses), median(hits));
    println!("prefix_cache_ttft: {SYSTEM_TOKENS}-token shared system prompt + {QUESTION_TOKENS}-token question, {ROUNDS} rounds, CPU backend");
    println!("| request | median TTFT | cached prompt tokens |");
    println!("|---|---|---|");
    println!(
        "| miss (new system prompt) | {:.2} ms | 0 |",
        miss.as_secs_f64() * 1e3
    );
    println!(
        "| hit (same system prompt) | {:.2} ms | {} |",
        hit.as_secs_f64() * 1e3,
        hit_cached.iter().min().unwrap()
    );
    println!(
        "miss / hit TTFT ratio: {:.1}x",
        miss.as_secs_f64() / hit.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(model);
}
