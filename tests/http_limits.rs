//! Limits over real HTTP: the per-client rate limit and the full queue (429 with
//! `Retry-After`), prompt and output token caps (400 naming the field), the body cap (413), the
//! connection cap, slow-loris and idle-stream timeouts; and the security defaults (admin routes
//! off, refusing an exposed admin surface).

mod common;

use std::time::{Duration, Instant};

use common::start;
use inferflux::config::Settings;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn addr_of(base: &str) -> std::net::SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

async fn get(base: &str, path: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap()
}

#[actix_web::test]
async fn limits_rate_limit_answers_429_with_retry_after_per_client() {
    // 0.5 per second, burst 2: two pass at once, the third waits about 2 s.
    let server = start(|s| {
        s.limits.rate_limit_rps = 0.5;
        s.limits.rate_limit_burst = 2;
    });
    for _ in 0..2 {
        assert_eq!(get(&server.base, "/v1/models", None).await.status(), 200);
    }
    let resp = get(&server.base, "/v1/models", None).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "2", "computed from the bucket");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    // Probes are never limited.
    for _ in 0..5 {
        assert_eq!(get(&server.base, "/health", None).await.status(), 200);
    }
    let metrics = common::metrics_text(&server.base).await;
    assert!(metrics.contains("inferflux_rate_limited_total"), "{metrics}");
}

#[actix_web::test]
async fn limits_rate_limit_counts_each_api_key_apart() {
    let server = start(|s| {
        s.limits.rate_limit_rps = 0.01;
        s.limits.rate_limit_burst = 1;
        s.auth.api_keys = vec!["sk-a".into(), "sk-b".into()];
    });
    assert_eq!(get(&server.base, "/v1/models", Some("sk-a")).await.status(), 200);
    assert_eq!(get(&server.base, "/v1/models", Some("sk-a")).await.status(), 429);
    // Same address, another key: its own bucket.
    assert_eq!(get(&server.base, "/v1/models", Some("sk-b")).await.status(), 200);
    let resp = get(&server.base, "/v1/models", Some("sk-b")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "100", "1 / 0.01 rps");
    // A wrong key is refused by auth before it can take anyone's token.
    assert_eq!(get(&server.base, "/v1/models", Some("sk-c")).await.status(), 401);
}

#[actix_web::test]
async fn limits_full_queue_is_429_with_retry_after() {
    let server = start(|s| {
        s.scheduler.max_running = 1;
        s.scheduler.max_waiting = 1;
    });
    let long = json!({ "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true,
                       "stream": true, "logprobs": 20 });
    // One runs, one waits: both are accepted (a stream answers 200 once enqueued).
    let running = common::post_completion(&server.base, &long).await;
    assert_eq!(running.status(), 200);
    let waiting = common::post_completion(&server.base, &long).await;
    assert_eq!(waiting.status(), 200);
    let refused = common::post_completion(&server.base, &long).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    // Both accepted streams still complete.
    for resp in [running, waiting] {
        let text = resp.text().await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
}

#[actix_web::test]
async fn limits_prompt_and_output_tokens_get_400_naming_the_field() {
    let server = start(|s| {
        s.limits.max_prompt_tokens = 8;
        s.limits.max_output_tokens = 4;
    });
    let post = |body: serde_json::Value| {
        let base = server.base.clone();
        async move {
            let resp = common::post_completion(&base, &body).await;
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, v) = post(json!({ "prompt": vec![5u32; 9], "max_tokens": 1 })).await;
    assert_eq!((status, &v["error"]["param"]), (400, &json!("prompt")), "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("limits.max_prompt_tokens"));
    let (status, v) = post(json!({ "prompt": vec![5u32; 8], "max_tokens": 5 })).await;
    assert_eq!((status, &v["error"]["param"]), (400, &json!("max_tokens")), "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("limits.max_output_tokens"));
    let (status, v) = post(json!({ "prompt": vec![5u32; 8], "max_tokens": 4, "ignore_eos": true })).await;
    assert_eq!(
        (status, &v["usage"]["completion_tokens"]),
        (200, &json!(4)),
        "{v}"
    );
    // Without max_tokens the default (16) is capped, not refused.
    let (status, v) = post(json!({ "prompt": vec![5u32; 8], "ignore_eos": true })).await;
    assert_eq!(
        (status, &v["usage"]["completion_tokens"]),
        (200, &json!(4)),
        "{v}"
    );
}

#[actix_web::test]
async fn limits_body_over_the_cap_is_413() {
    let server = start(|s| s.server.max_body_bytes = 1000);
    let big = json!({ "prompt": "x".repeat(2000) });
    let resp = common::post_completion(&server.base, &big).await;
    assert_eq!(resp.status(), 413);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
}

/// Reads until the server closes the connection; what it sent, or `None` past `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

#[actix_web::test]
async fn limits_slow_loris_half_a_header_is_closed_within_the_timeout() {
    let server = start(|s| s.server.client_request_timeout_ms = 500);
    let mut conn = TcpStream::connect(addr_of(&server.base)).await.unwrap();
    conn.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut conn, Duration::from_secs(10))
        .await
        .expect("the connection stays open");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    // A client that finishes its head in time is served.
    assert_eq!(get(&server.base, "/health", None).await.status(), 200);
}

#[actix_web::test]
async fn limits_max_connections_holds_the_next_one_back() {
    let server = start(|s| s.server.max_connections = 1);
    let addr = addr_of(&server.base);
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    // The first connection is served and kept open (keep-alive).
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The second is accepted by the kernel (backlog) but not served while the first is open.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(700), second.read(&mut buf)).await;
    assert!(early.is_err(), "served past max_connections: {early:?}");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
        .await
        .expect("served once the first connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// As `common::start`, on a listener whose accepted sockets have a small send buffer (they
/// inherit it), so that a client that stops reading blocks the server within kilobytes rather
/// than the 4 MiB that loopback autotuning allows.
fn start_with_small_send_buffer(tweak: impl FnOnce(&mut Settings) + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut settings = Settings::default();
        settings.model.device = inferflux::config::DeviceKind::Cpu;
        tweak(&mut settings);
        actix_web::rt::System::new().block_on(async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(4096).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = socket.listen(64).unwrap().into_std().unwrap();
            listener.set_nonblocking(false).unwrap();
            let running =
                inferflux::server::start(&settings, listener, inferflux::telemetry::metrics_handle())
                    .unwrap();
            tx.send(running.addr).unwrap();
            running.server.await.unwrap();
        });
    });
    format!("http://{}", rx.recv().expect("server started"))
}

#[actix_web::test]
async fn limits_idle_stream_is_cancelled_and_its_pages_freed() {
    // One sequence at a time, so the 16 choices run one after another, and each step slowed
    // (the fault hook's delay) so that the stream is surely still generating after the 1 s idle
    // timeout, however fast the machine. The hook only adds routes other tests do not use.
    std::env::set_var("INFERFLUX_FAULT_INJECTION", "1");
    let base = start_with_small_send_buffer(|s| {
        s.server.stream_idle_timeout_seconds = 1;
        s.scheduler.max_running = 1;
    });
    let server = common::TestServer { base };
    common::set_step_delay(&server.base, 5).await;
    let before = common::metrics_text(&server.base).await;
    let cancelled_before = common::metric_value(&before, "inferflux_requests_cancelled_total");
    // A client with a tiny receive window that never reads what it asked for.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr_of(&server.base)).await.unwrap();
    let body = json!({ "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": true,
                       "stream": true, "logprobs": 20, "n": 16 })
    .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = common::metrics_text(&server.base).await;
        if common::metric_value(&text, "inferflux_streams_idle_cancelled_total") >= 1.0 {
            assert!(
                common::metric_value(&text, "inferflux_requests_cancelled_total") > cancelled_before,
                "the stream was still generating when it was cancelled"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the unread stream was never cancelled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its pages are freed while the client still holds the connection, unread.
    common::wait_until_no_page_is_referenced(&server.base).await;
    let queue = common::queue_report(&server.base).await;
    assert_eq!(
        (queue["running"].as_u64(), queue["waiting"].as_u64()),
        (Some(0), Some(0)),
        "{queue}"
    );
    drop(conn);
}

#[actix_web::test]
async fn security_admin_routes_can_be_turned_off() {
    let server = start(|s| s.server.enable_admin = false);
    for path in ["/admin/kv", "/admin/queue"] {
        let resp = get(&server.base, path, None).await;
        assert_eq!(resp.status(), 404, "{path}");
    }
    assert_eq!(get(&server.base, "/health", None).await.status(), 200);
}

#[test]
fn security_refuses_an_exposed_admin_surface() {
    use inferflux::server::check_exposure;
    let public: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
    let loopback: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let v6_loopback: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
    let open = Settings::default();
    let err = check_exposure(&open, public).unwrap_err().to_string();
    for fix in [
        "auth.admin_token",
        "server.enable_admin",
        "127.0.0.1",
        "0.0.0.0:8080",
    ] {
        assert!(err.contains(fix), "{err}");
    }
    assert!(check_exposure(&open, loopback).is_ok());
    assert!(check_exposure(&open, v6_loopback).is_ok());
    let mut with_token = Settings::default();
    with_token.auth.admin_token = "adm".into();
    assert!(check_exposure(&with_token, public).is_ok());
    let mut no_admin = Settings::default();
    no_admin.server.enable_admin = false;
    assert!(check_exposure(&no_admin, public).is_ok());
    assert_eq!(
        Settings::default().server.host,
        "127.0.0.1",
        "loopback by default"
    );
}

#[test]
fn security_start_refuses_a_public_bind_without_admin_token() {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let settings = inferflux::config::Settings::default();
    let err = actix_web::rt::System::new().block_on(async move {
        inferflux::server::start(&settings, listener, inferflux::telemetry::metrics_handle())
            .err()
            .expect("refused")
            .to_string()
    });
    assert!(err.contains("auth.admin_token"), "{err}");
}
