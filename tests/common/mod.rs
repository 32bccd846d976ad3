//! Starts a real `inferfluxd` stack on port 0 in a background thread, for black-box HTTP tests.
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::mpsc;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use inferflux::config::{DeviceKind, Settings};

pub struct TestServer {
    pub base: String,
}

/// Serves the embedded tiny model on the CPU with `tweak` applied to the default settings.
pub fn start(tweak: impl FnOnce(&mut Settings) + Send + 'static) -> TestServer {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut settings = Settings::default();
        settings.model.device = DeviceKind::Cpu;
        tweak(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        actix_web::rt::System::new().block_on(async move {
            let running =
                inferflux::server::start(&settings, listener, inferflux::telemetry::metrics_handle())
                    .unwrap();
            tx.send(running.addr).unwrap();
            running.server.await.unwrap();
        });
    });
    let addr = rx.recv().expect("server started");
    TestServer {
        base: format!("http://{addr}"),
    }
}

/// [`start`] with every step slowed by `step_delay_ms` (the fault hook's delay): for tests whose
/// requests must still be running when something else happens (a cancel, a disconnect, a wave of
/// requests that must meet in the pool), however fast the machine serves. A fast CI machine
/// streamed 250 tokens of the tiny model in under 0.1 s.
pub async fn start_slowed(
    tweak: impl FnOnce(&mut Settings) + Send + 'static,
    step_delay_ms: u64,
) -> TestServer {
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    let server = start(tweak);
    set_step_delay(&server.base, step_delay_ms).await;
    server
}

/// What a streamed completion delivered.
#[derive(Debug)]
pub struct Streamed {
    /// Choice 0's text.
    pub text: String,
    /// Every choice's text, by `index`.
    pub texts: Vec<String>,
    /// Chunks with choices (the usage chunk is kept apart).
    pub chunks: Vec<serde_json::Value>,
    /// The `usage` of the last chunk (`stream_options.include_usage`).
    pub usage: Option<serde_json::Value>,
    pub done: bool,
}

impl Streamed {
    /// Choice 0's finish reason.
    pub fn finish_reason(&self) -> Option<&str> {
        self.chunks.iter().rev().find_map(|c| {
            c["choices"].as_array()?.iter().find(|ch| ch["index"] == 0)?["finish_reason"].as_str()
        })
    }
}

/// POSTs `body` to `/v1/completions`.
pub async fn post_completion(base: &str, body: &serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

pub async fn stream_completion(base: &str, body: serde_json::Value) -> Streamed {
    let resp = post_completion(base, &body).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut events = resp.bytes_stream().eventsource();
    let mut out = Streamed {
        text: String::new(),
        texts: Vec::new(),
        chunks: Vec::new(),
        usage: None,
        done: false,
    };
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        assert!(!out.done, "nothing may follow [DONE]");
        if event.data == "[DONE]" {
            out.done = true;
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        assert!(v.get("error").is_none(), "error event: {v}");
        assert_eq!(v["object"], "text_completion");
        assert!(out.usage.is_none(), "the usage chunk is the last before [DONE]");
        let choices = v["choices"].as_array().unwrap();
        if choices.is_empty() {
            out.usage = Some(v["usage"].clone());
            continue;
        }
        for c in choices {
            let i = c["index"].as_u64().unwrap() as usize;
            if out.texts.len() <= i {
                out.texts.resize(i + 1, String::new());
            }
            out.texts[i].push_str(c["text"].as_str().unwrap());
        }
        out.chunks.push(v);
    }
    out.text = out.texts.first().cloned().unwrap_or_default();
    out
}

#[derive(serde::Deserialize)]
pub struct Goldens {
    pub prompts: Vec<GoldenPrompt>,
}

#[derive(serde::Deserialize)]
pub struct GoldenPrompt {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
}

pub fn goldens() -> Goldens {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama/goldens.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The Prometheus text of `/metrics`.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `GET /admin/kv`.
pub async fn kv_report(base: &str) -> inferflux::actors::kv_pages::KvReportBody {
    reqwest::get(format!("{base}/admin/kv"))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (up to 10 s) until no block table holds a page, and returns the final report.
pub async fn wait_until_no_page_is_referenced(base: &str) -> inferflux::actors::kv_pages::KvReportBody {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let report = kv_report(base).await;
        if report.used_pages == 0 {
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pages still referenced after every request ended: {report:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Makes every following step sleep `ms` first (the fault hook's delay; the server must have
/// started with `INFERFLUX_FAULT_INJECTION=1`), so that a test's interleaving holds however fast
/// the machine serves.
pub async fn set_step_delay(base: &str, ms: u64) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/admin/fault"))
        .json(&serde_json::json!({ "step_delay_ms": ms }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the fault hook is on");
}

/// The value of the first sample of metric `name` (any labels) in a Prometheus scrape; 0 when
/// absent (a counter appears only once incremented).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `GET /admin/queue`.
pub async fn queue_report(base: &str) -> serde_json::Value {
    reqwest::get(format!("{base}/admin/queue"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The embedded model's tokenizer (the `tiny-llama` fixture), loaded once per test binary.
pub fn tokenizer() -> std::sync::Arc<tokenizers::Tokenizer> {
    static TOKENIZER: std::sync::OnceLock<std::sync::Arc<tokenizers::Tokenizer>> = std::sync::OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tiny-llama/tokenizer.json"
            );
            std::sync::Arc::new(tokenizers::Tokenizer::from_file(path).unwrap())
        })
        .clone()
}
