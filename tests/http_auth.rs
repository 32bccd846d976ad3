//! Bearer auth over real HTTP: API keys for `/v1/*`, the admin token for `/admin/*`, the
//! optional `/metrics` guard, the open probes, and `/ready` following the drain state.

mod common;

use common::start;
use reqwest::header::{HeaderMap, AUTHORIZATION};
use serde_json::json;

const KEY_1: &str = "sk-test-first";
const KEY_2: &str = "sk-test-second-longer";
const ADMIN: &str = "adm-test-token";

/// A reply: status, headers and the body as JSON (`Null` when it is not JSON).
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: serde_json::Value,
    text: String,
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<serde_json::Value>,
) -> Reply {
    let client = reqwest::Client::new();
    let url = format!("{base}{path}");
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

async fn get(base: &str, path: &str, bearer: Option<&str>) -> Reply {
    call(base, "GET", path, bearer, None).await
}

fn completion() -> serde_json::Value {
    json!({ "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "ignore_eos": true })
}

/// The refusal's status, OpenAI error JSON shape, code and type; no secret in it.
fn assert_refused(r: &Reply, status: u16, kind: &str, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    let e = &r.body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.text);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some(kind), Some(code)),
        "{}",
        r.text
    );
    assert!(e.get("param").is_some_and(|p| p.is_null()), "{}", r.text);
    for secret in [KEY_1, KEY_2, ADMIN, "sk-wrong"] {
        assert!(!r.text.contains(secret), "a secret in the body: {}", r.text);
    }
    if status == 401 {
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
}

/// `inferflux_auth_failures_total{route}` (the recorder is shared by the tests of this binary).
async fn auth_failures(base: &str, route: &str) -> f64 {
    let text = get(base, "/metrics", Some(ADMIN)).await.text;
    let prefix = format!("inferflux_auth_failures_total{{route=\"{route}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn auth_api_keys_guard_the_api() {
    let server = start(|s| {
        s.auth.api_keys = vec![KEY_1.into(), KEY_2.into()];
        s.auth.admin_token = ADMIN.into();
    });
    let base = &server.base;
    let failures_before = auth_failures(base, "v1").await;

    let r = get(base, "/v1/models", None).await;
    assert_refused(&r, 401, "invalid_request_error", "invalid_api_key");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("didn't provide an API key"));
    for malformed in [format!("Basic {KEY_1}"), KEY_1.to_string(), "Bearer ".into()] {
        let resp = reqwest::Client::new()
            .get(format!("{base}/v1/models"))
            .header(AUTHORIZATION, malformed.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{malformed}");
    }
    let r = get(base, "/v1/models", Some("sk-wrong")).await;
    assert_refused(&r, 401, "invalid_request_error", "invalid_api_key");
    assert_eq!(r.body["error"]["message"], "Incorrect API key provided.");
    for near_miss in [&KEY_1[..KEY_1.len() - 1], &format!("{KEY_1}x")] {
        assert_eq!(get(base, "/v1/models", Some(near_miss)).await.status, 401);
    }
    // The admin token opens /admin only.
    let r = get(base, "/v1/models", Some(ADMIN)).await;
    assert_refused(&r, 401, "invalid_request_error", "invalid_api_key");
    let r = call(base, "POST", "/v1/completions", None, Some(completion())).await;
    assert_refused(&r, 401, "invalid_request_error", "invalid_api_key");
    // Unknown paths are closed too: a route added later is not open by accident.
    assert_eq!(get(base, "/v1/nothing-here", None).await.status, 401);

    let r = get(base, "/v1/models", Some(KEY_1)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["object"], "list");
    for key in [KEY_1, KEY_2] {
        let r = call(base, "POST", "/v1/completions", Some(key), Some(completion())).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["usage"]["completion_tokens"], 3, "{}", r.text);
    }
    assert_eq!(get(base, "/v1/nothing-here", Some(KEY_1)).await.status, 404);

    let failures = auth_failures(base, "v1").await - failures_before;
    assert!(failures >= 10.0, "each refusal is counted: {failures}");
}

#[tokio::test]
async fn auth_admin_token_guards_admin_routes() {
    let server = start(|s| {
        s.auth.api_keys = vec![KEY_1.into()];
        s.auth.admin_token = ADMIN.into();
    });
    let base = &server.base;
    let r = get(base, "/admin/queue", None).await;
    assert_refused(&r, 401, "invalid_request_error", "missing_admin_token");
    let r = get(base, "/admin/queue", Some("sk-wrong")).await;
    assert_refused(&r, 403, "permission_error", "invalid_admin_token");
    let r = get(base, "/admin/queue", Some(KEY_1)).await;
    assert_refused(&r, 403, "permission_error", "invalid_admin_token");
    // The router decodes `%61` to `a`; the guard sees the same path.
    let r = get(base, "/%61dmin/queue", Some(KEY_1)).await;
    assert_refused(&r, 403, "permission_error", "invalid_admin_token");
    let r = call(
        base,
        "POST",
        "/admin/drain",
        Some(KEY_1),
        Some(json!({ "drain": true })),
    )
    .await;
    assert_refused(&r, 403, "permission_error", "invalid_admin_token");
    assert_eq!(
        get(base, "/ready", None).await.status,
        200,
        "the refused drain did nothing"
    );

    let r = get(base, "/admin/queue", Some(ADMIN)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["draining"], false);
    assert_eq!(get(base, "/admin/kv", Some(ADMIN)).await.status, 200);
    assert_eq!(get(base, "/%61dmin/queue", Some(ADMIN)).await.status, 200);
}

#[tokio::test]
async fn auth_probes_stay_open_and_version_names_the_build() {
    let server = start(|s| {
        s.auth.api_keys = vec![KEY_1.into()];
        s.auth.admin_token = ADMIN.into();
        s.auth.protect_metrics = true;
        s.model.served_name = Some("tiny-test".into());
    });
    let base = &server.base;
    for path in ["/health", "/ready", "/version"] {
        let r = get(base, path, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        // A wrong key on an open route does not close it.
        assert_eq!(get(base, path, Some("sk-wrong")).await.status, 200, "{path}");
    }
    assert_eq!(get(base, "/ready", None).await.body, json!({ "status": "ready" }));
    let v = get(base, "/version", None).await.body;
    assert_eq!(
        v,
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "name": "inferflux",
            "backend": "cpu",
            "model": "tiny-test",
        })
    );
}

#[tokio::test]
async fn auth_metrics_open_unless_protected() {
    let open = start(|s| s.auth.api_keys = vec![KEY_1.into()]);
    let r = get(&open.base, "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("inferflux_build_info"), "{}", r.text);

    let server = start(|s| {
        s.auth.api_keys = vec![KEY_1.into()];
        s.auth.admin_token = ADMIN.into();
        s.auth.protect_metrics = true;
    });
    let base = &server.base;
    let r = get(base, "/metrics", None).await;
    assert_refused(&r, 401, "invalid_request_error", "invalid_api_key");
    let r = get(base, "/metrics", Some("sk-wrong")).await;
    assert_refused(&r, 401, "invalid_request_error", "invalid_api_key");
    for token in [KEY_1, ADMIN] {
        let r = get(base, "/metrics", Some(token)).await;
        assert_eq!(r.status, 200);
        assert!(r.text.contains("inferflux_build_info"), "{}", r.text);
    }
    assert!(auth_failures(base, "metrics").await >= 2.0);
}

#[tokio::test]
async fn auth_ready_follows_drain() {
    let server = start(|s| s.auth.admin_token = ADMIN.into());
    let base = &server.base;
    assert_eq!(get(base, "/ready", None).await.status, 200);

    let r = call(base, "POST", "/admin/drain", Some(ADMIN), None).await;
    assert_eq!((r.status, &r.body["draining"]), (200, &json!(true)), "{}", r.text);
    let r = get(base, "/ready", None).await;
    assert_refused(&r, 503, "service_unavailable_error", "draining");
    assert_eq!(r.headers["retry-after"], "5");
    assert_eq!(get(base, "/health", None).await.status, 200, "still alive");
    // New work gets the same 503; no API key is needed here, since none is configured.
    let r = call(base, "POST", "/v1/completions", None, Some(completion())).await;
    assert_refused(&r, 503, "service_unavailable_error", "draining");
    assert_eq!(r.headers["retry-after"], "5");

    let r = call(
        base,
        "POST",
        "/admin/drain",
        Some(ADMIN),
        Some(json!({ "drain": false })),
    )
    .await;
    assert_eq!(
        (r.status, &r.body["draining"]),
        (200, &json!(false)),
        "{}",
        r.text
    );
    assert_eq!(get(base, "/ready", None).await.body, json!({ "status": "ready" }));
    let r = call(base, "POST", "/v1/completions", None, Some(completion())).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn auth_key_names_the_client_for_fair_scheduling() {
    let server = start(|s| s.auth.api_keys = vec![KEY_1.into(), KEY_2.into()]);
    let base = &server.base;
    let r = call(base, "POST", "/v1/completions", Some(KEY_2), Some(completion())).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let expected = inferflux::actors::intake::api_key_client(KEY_2);
    let q = common::queue_report(base).await;
    let clients: Vec<&str> = q["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["client"].as_str())
        .collect();
    assert!(
        clients.contains(&expected.as_str()),
        "{expected} not in {clients:?}"
    );
    assert!(
        !q.to_string().contains(KEY_2),
        "the key itself is never shown: {q}"
    );
}
