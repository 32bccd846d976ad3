//! Graceful shutdown of the real `inferfluxd` binary: on SIGTERM new requests get 503 with
//! `Retry-After` while running streams finish (or, past `server.shutdown_grace_seconds`, end
//! with an error event), and the process exits 0. Streams are slowed with the test-only fault
//! hook's per-step delay so that they are still running when the signal comes.

use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Value};

struct Daemon {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on now (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `inferfluxd` on the embedded model and waits until `/health` answers.
async fn spawn(grace_seconds: u64, faults: bool) -> Daemon {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("inferfluxd-shutdown-{port}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferfluxd"));
    cmd.args(["--port", &port.to_string(), "--device", "cpu", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/inferflux.toml"))
        .env(
            "INFERFLUX__SERVER__SHUTDOWN_GRACE_SECONDS",
            grace_seconds.to_string(),
        )
        .env_remove("INFERFLUX_API_KEY")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if faults {
        cmd.env("INFERFLUX_FAULT_INJECTION", "1");
    } else {
        cmd.env_remove("INFERFLUX_FAULT_INJECTION");
    }
    let child = cmd.spawn().unwrap();
    let daemon = Daemon {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/health", daemon.base)).await {
            if r.status() == 200 {
                return daemon;
            }
        }
        assert!(
            Instant::now() < deadline,
            "inferfluxd did not start; see {:?}",
            daemon.log
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Daemon {
    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "inferfluxd still runs; see {:?}",
                self.log
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Waits until `/ready` answers 503 (the signal is handled asynchronously).
    async fn wait_not_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = reqwest::get(format!("{}/ready", self.base)).await.unwrap();
            if r.status() == 503 {
                assert!(r.headers().contains_key("retry-after"));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/ready never went 503; see {:?}",
                self.log
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a stream delivered after its first event.
#[derive(Default)]
struct Rest {
    text: String,
    finish_reason: Option<String>,
    error: Option<Value>,
    done: bool,
}

fn long_stream() -> Value {
    json!({ "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true })
}

/// Starts a slow stream, returns its events once the first has arrived.
async fn started_stream(d: &Daemon, step_delay_ms: u64) -> BoxStream<'static, String> {
    let armed = d
        .post("/admin/fault", &json!({ "step_delay_ms": step_delay_ms }))
        .await;
    assert_eq!(armed.status(), 200);
    let resp = d.post("/v1/completions", &long_stream()).await;
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource().map(|e| e.unwrap().data).boxed();
    let first: Value = serde_json::from_str(&events.next().await.unwrap()).unwrap();
    assert_eq!(first["object"], "text_completion", "{first}");
    events
}

async fn rest_of(mut events: BoxStream<'static, String>) -> Rest {
    let mut rest = Rest::default();
    while let Some(data) = events.next().await {
        assert!(!rest.done, "nothing may follow [DONE]");
        if data == "[DONE]" {
            rest.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        if v.get("error").is_some() {
            rest.error = Some(v);
            continue;
        }
        let choice = &v["choices"][0];
        rest.text.push_str(choice["text"].as_str().unwrap());
        if let Some(r) = choice["finish_reason"].as_str() {
            rest.finish_reason = Some(r.to_string());
        }
    }
    rest
}

#[tokio::test]
async fn shutdown_sigterm_lets_streams_finish_and_refuses_new_requests() {
    let mut d = spawn(30, true).await;
    // 200 tokens at 20 ms a step: about 4 s left when the signal comes, well within 30 s.
    let events = started_stream(&d, 20).await;
    d.sigterm();
    d.wait_not_ready().await;
    let refused = d
        .post("/v1/completions", &json!({ "prompt": "hi", "max_tokens": 2 }))
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "draining", "{body}");

    let rest = rest_of(events).await;
    assert!(rest.error.is_none(), "{:?}", rest.error);
    assert_eq!(rest.finish_reason.as_deref(), Some("length"));
    assert!(!rest.text.is_empty());
    assert!(rest.done, "the stream completed with [DONE]");
    let status = d.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}; see {:?}", d.log);
}

#[tokio::test]
async fn shutdown_grace_over_cancels_streams_with_an_error() {
    let mut d = spawn(1, true).await;
    // 200 tokens at 50 ms a step: about 10 s, far past the 1 s grace.
    let events = started_stream(&d, 50).await;
    let signalled = Instant::now();
    d.sigterm();
    let rest = rest_of(events).await;
    let error = rest.error.expect("an error event ends the cut stream");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("shut down"),
        "{error}"
    );
    assert!(rest.finish_reason.is_none());
    assert!(rest.done, "[DONE] still ends the stream");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "cut at the grace, not at the end"
    );
    let status = d.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}; see {:?}", d.log);
}

#[tokio::test]
async fn shutdown_idle_server_exits_at_once_and_fault_hook_is_off_by_default() {
    let mut d = spawn(30, false).await;
    let resp = d.post("/admin/fault", &json!({ "kind": "panic" })).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("INFERFLUX_FAULT_INJECTION"));
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}; see {:?}", d.log);
}
