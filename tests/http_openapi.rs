//! `/openapi.json` against the running server: it documents exactly the routes listed here, every
//! documented route answers with a documented status and content type (no bare 404), and the
//! request fields it documents are exactly the ones the server's strict parsers know.

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use common::{start, TestServer};
use serde_json::{json, Value};

/// Every route the server serves, as the document must list them.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("get", "/v1/models"),
    ("post", "/tokenize"),
    ("post", "/detokenize"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/version"),
    ("get", "/openapi.json"),
    ("get", "/metrics"),
    ("get", "/admin/kv"),
    ("post", "/admin/kv/reset_prefix_cache"),
    ("get", "/admin/queue"),
    ("get", "/admin/metrics"),
    ("post", "/admin/drain"),
    ("post", "/admin/requests/{request_id}/cancel"),
];

/// Bodies above this are refused (413); small, so that the test of that is cheap.
const MAX_BODY_BYTES: usize = 4096;

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(|s| s.server.max_body_bytes = MAX_BODY_BYTES))
}

async fn document(base: &str) -> Value {
    let resp = reqwest::get(format!("{base}/openapi.json")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    serde_json::from_str(&resp.text().await.unwrap()).expect("/openapi.json is JSON")
}

/// Follows a local `$ref` (one level is all the document uses for responses).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(target) => doc
            .pointer(target.trim_start_matches('#'))
            .expect("resolvable $ref"),
        None => v,
    }
}

#[tokio::test]
async fn openapi_document_lists_exactly_the_served_routes() {
    let doc = document(&server().base).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);
}

/// A request to `path` that changes nothing: `{}` bodies (400), a drain that resumes, a cancel of
/// an id that does not exist (404).
fn probe(method: &str, path: &str) -> (String, Option<&'static str>) {
    let path = path.replace("{request_id}", "cmpl-openapi-probe");
    let body = match (method, path.as_str()) {
        ("get", _) => None,
        (_, "/admin/drain") => Some(r#"{"drain": false}"#),
        (_, "/admin/kv/reset_prefix_cache") | (_, "/admin/requests/cmpl-openapi-probe/cancel") => None,
        _ => Some("{}"),
    };
    (path, body)
}

#[tokio::test]
async fn openapi_every_documented_route_answers_as_documented() {
    let base = &server().base;
    let doc = document(base).await;
    let client = reqwest::Client::new();
    let mut wrong = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let (url_path, body) = probe(method, path);
            let mut req = match method.as_str() {
                "get" => client.get(format!("{base}{url_path}")),
                _ => client.post(format!("{base}{url_path}")),
            };
            if let Some(body) = body {
                req = req.header("content-type", "application/json").body(body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16().to_string();
            let content_type = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let text = resp.text().await.unwrap();
            if serde_json::from_str::<Value>(&text).is_ok_and(|v| v["error"]["code"] == "unknown_route") {
                wrong.push(format!("{method} {path}: the server has no such route"));
                continue;
            }
            let Some(documented) = op["responses"].get(&status).map(|r| resolve(&doc, r)) else {
                wrong.push(format!(
                    "{method} {path}: status {status} is not documented ({text})"
                ));
                continue;
            };
            let media_ok = documented["content"]
                .as_object()
                .unwrap()
                .keys()
                .any(|media| content_type.split(';').next() == Some(media.as_str()));
            if !media_ok {
                let why = if status == "404" && text.is_empty() {
                    "actix's bare 404: the server has no such route".to_string()
                } else {
                    format!("content type {content_type:?} is not documented for {status}")
                };
                wrong.push(format!("{method} {path}: {why}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "routes answering otherwise than documented:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn openapi_unknown_routes_and_methods_get_openai_errors() {
    let base = &server().base;
    let client = reqwest::Client::new();
    for (method, path, status, allow) in [
        (reqwest::Method::GET, "/v2/completions", 404, None),
        (reqwest::Method::GET, "/admin/requests//cancel", 404, None),
        (reqwest::Method::GET, "/v1/completions", 405, Some("POST")),
        (reqwest::Method::DELETE, "/v1/chat/completions", 405, Some("POST")),
        (reqwest::Method::POST, "/v1/models", 405, Some("GET")),
        (
            reqwest::Method::PUT,
            "/admin/requests/cmpl-1/cancel",
            405,
            Some("POST"),
        ),
    ] {
        let resp = client
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        assert_eq!(
            resp.headers().get("allow").map(|v| v.to_str().unwrap()),
            allow,
            "{method} {path}"
        );
        let v: Value = resp.json().await.unwrap();
        let code = if status == 404 {
            "unknown_route"
        } else {
            "method_not_allowed"
        };
        assert_eq!(v["error"]["code"], code, "{method} {path}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(path), "{v}");
    }
}

#[tokio::test]
async fn openapi_oversized_bodies_get_a_documented_413() {
    let base = &server().base;
    let doc = document(base).await;
    // Valid JSON, so that a server that did not enforce the limit would answer something else.
    let body = format!(r#"{{"pad": "{}"}}"#, "x".repeat(MAX_BODY_BYTES));
    let client = reqwest::Client::new();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if op.get("requestBody").is_none() {
                continue;
            }
            checked += 1;
            if op["responses"].get("413").is_none() {
                wrong.push(format!("{method} {path}: 413 is not documented"));
            }
            let resp = client
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap_or_default();
            if (status, &v["error"]["code"]) != (413, &json!("request_too_large")) {
                wrong.push(format!("{method} {path}: {status} {v}"));
            }
        }
    }
    assert!(
        checked >= 5,
        "every body-taking route is documented with its body"
    );
    assert!(
        wrong.is_empty(),
        "oversized bodies answered otherwise:\n{}",
        wrong.join("\n")
    );
}

/// The field names a strict (`deny_unknown_fields`) parser lists in its "unknown field `__probe__`,
/// expected one of `a`, `b`" error, or why there is no such list.
async fn known_fields(base: &str, path: &str, body: &str) -> Result<BTreeSet<String>, String> {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .ok_or_else(|| format!("{status} without OpenAI error JSON: {text:?}"))?;
    let Some(expected) = message.split_once("unknown field `__probe__`, expected") else {
        return Err(format!("{status}, not the probe field's error: {message}"));
    };
    Ok(expected
        .1
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect())
}

fn documented_fields(doc: &Value, schema: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{schema} has properties"))
        .keys()
        .cloned()
        .collect()
}

#[tokio::test]
async fn openapi_request_fields_are_the_ones_the_server_knows() {
    let base = &server().base;
    let doc = document(base).await;
    let chat = r#""messages": [{"role": "user", "content": "hi"}]"#;
    let cases = [
        (
            "/v1/completions",
            r#"{"__probe__": 1, "prompt": "hi"}"#.to_string(),
            "CompletionRequest",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "stream": true, "stream_options": {"__probe__": 1}}"#.to_string(),
            "StreamOptions",
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"__probe__": 1, {chat}}}"#),
            "ChatCompletionRequest",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "__probe__": 1}]}"#.to_string(),
            "ChatMessage",
        ),
        (
            "/tokenize",
            r#"{"prompt": "hi", "__probe__": 1}"#.to_string(),
            "TokenizePromptRequest",
        ),
        (
            "/tokenize",
            format!(r#"{{{chat}, "__probe__": 1}}"#),
            "TokenizeChatRequest",
        ),
        (
            "/detokenize",
            r#"{"__probe__": 1}"#.to_string(),
            "DetokenizeRequest",
        ),
        ("/admin/drain", r#"{"__probe__": 1}"#.to_string(), "DrainRequest"),
    ];
    let mut wrong = Vec::new();
    for (path, body, schema) in cases {
        let documented = documented_fields(&doc, schema);
        match known_fields(base, path, &body).await {
            Err(why) => wrong.push(format!("{schema} ({path}): {why}")),
            Ok(known) if known != documented => wrong.push(format!(
                "{schema} ({path}): documented but unknown to the server {:?}; known but undocumented {:?}",
                documented.difference(&known).collect::<Vec<_>>(),
                known.difference(&documented).collect::<Vec<_>>()
            )),
            Ok(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "the document and the server disagree:\n{}",
        wrong.join("\n")
    );
}
