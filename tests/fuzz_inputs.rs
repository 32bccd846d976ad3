//! Long-running property tests ("fuzz") of everything that reads client input: request parsing
//! and validation, the stop detector, the chat-template renderer; and a few hostile bodies
//! through the real server. Cases per property: `INFERFLUX_FUZZ_CASES` (default keeps each well
//! under 30 s in CI); e.g. `INFERFLUX_FUZZ_CASES=200000 cargo test --release --test fuzz_inputs`
//! for a long run. Failures are shrunk and printed by proptest.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use inferflux::actors::intake::{validate, IntakeLimits};
use inferflux::http::error::ApiError;
use inferflux::http::parse_request;
use inferflux::http::types::{ChatCompletionRequest, ChatContent, CompletionRequest};
use inferflux::model::{ChatMessage, ChatTemplate};
use inferflux::stop::{FinishReason, StopDetector, StopParams};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

/// Cases per property: `INFERFLUX_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("INFERFLUX_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    })
}

fn limits() -> IntakeLimits {
    IntakeLimits {
        model_name: "inferflux-tiny-llama".into(),
        max_context: 256,
        kv_capacity_tokens: 16384,
        vocab_size: 384,
        eos_token_ids: vec![2],
        max_stop_strings: 4,
        max_stop_bytes: 256,
        max_prompt_tokens: 0,
        max_output_tokens: 0,
    }
}

/// Any JSON value, numbers at their extremes included.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![Just(-1i64), Just(0), Just(1), Just(i64::MAX), Just(i64::MIN)].prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "stream_options",
    "logprobs",
    "echo",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "include_stop_str_in_output",
    "stream",
    "n",
    "user",
    "priority",
];

/// A request object: known fields with arbitrary values (so that validation, not only the
/// parser, sees them), sometimes an unknown one.
fn request_like(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        9 => prop::sample::select(fields).prop_map(str::to_string),
        1 => "[a-z_]{1,12}",
    ];
    let value = prop_oneof![
        any_json(),
        // Plausible values, so that more requests get deep into validation.
        prop::collection::vec(0u32..400, 0..20).prop_map(|v| json!(v)),
        "[a-z ]{0,40}".prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        (-5i64..300).prop_map(Value::from),
    ];
    prop::collection::btree_map(field, value, 0..8).prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn assert_client_error(e: &ApiError, input: &str) {
    assert!(
        (400..500).contains(&e.status),
        "{} for {input}: {}",
        e.status,
        e.message
    );
    assert!(!e.message.is_empty());
}

/// Parses and validates as the completions handler does; every failure must be a 4xx.
fn check_completion(body: &[u8]) {
    let tok = common::tokenizer();
    match parse_request::<CompletionRequest>(body) {
        Err(e) => assert_client_error(&e, &String::from_utf8_lossy(body)),
        Ok(req) => {
            if let Err(e) = validate(req, &tok, &limits()) {
                assert_client_error(&e, &String::from_utf8_lossy(body));
            }
        }
    }
}

#[test]
fn fuzz_completion_bodies_of_arbitrary_bytes_are_4xx_never_a_panic() {
    runner(20_000)
        .run(&prop::collection::vec(any::<u8>(), 0..200), |bytes| {
            check_completion(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_completion_json_values_validate_or_are_4xx() {
    runner(20_000)
        .run(&request_like(COMPLETION_FIELDS), |v| {
            check_completion(v.to_string().as_bytes());
            Ok(())
        })
        .unwrap();
}

fn qwen_template() -> ChatTemplate {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    ChatTemplate::from_checkpoint(Some(&config), None, &dir)
        .unwrap()
        .expect("the fixture has a template")
}

#[test]
fn fuzz_chat_bodies_parse_or_are_4xx_and_render_without_panic() {
    let template = qwen_template();
    let message = (
        prop_oneof![
            Just("user".to_string()),
            Just("system".to_string()),
            Just("assistant".to_string()),
            ".{0,8}"
        ],
        prop_oneof![
            any_json(),
            ".{0,60}".prop_map(Value::from),
            // Text that looks like template code: data, never evaluated.
            Just(Value::from(
                "{{ raise_exception('x') }}{% for i in range(99999) %}{% endfor %}"
            )),
        ],
    )
        .prop_map(|(role, content)| json!({ "role": role, "content": content }));
    let body = (
        prop::collection::vec(message, 0..6),
        request_like(&[
            "model",
            "max_tokens",
            "temperature",
            "stream",
            "n",
            "logprobs",
            "stop",
        ]),
    )
        .prop_map(|(messages, mut rest)| {
            rest["messages"] = Value::Array(messages);
            rest
        });
    runner(10_000)
        .run(&body, |v| {
            let bytes = v.to_string();
            match parse_request::<ChatCompletionRequest>(bytes.as_bytes()) {
                Err(e) => assert_client_error(&e, &bytes),
                Ok(chat) => {
                    let messages: Vec<ChatMessage> = chat
                        .messages
                        .iter()
                        .map(|m| ChatMessage {
                            role: m.role.clone(),
                            content: match &m.content {
                                Some(ChatContent::Text(t)) => t.clone(),
                                _ => String::new(),
                            },
                        })
                        .collect();
                    // An error (a template's raise_exception) is fine; a panic or hang is not.
                    if let Ok(text) = template.render(&messages, true) {
                        let known = ["user", "system", "assistant"];
                        for m in messages.iter().filter(|m| known.contains(&m.role.as_str())) {
                            assert!(text.contains(&m.content), "content is passed through as data");
                        }
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_chat_templates_that_loop_or_read_files_end_as_errors() {
    let hostile = [
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% include '/etc/passwd' %}",
        "{% import '/etc/hostname' as h %}",
        "{% extends '../Cargo.toml' %}",
    ];
    let user = [ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    for source in hostile {
        let started = Instant::now();
        let config = json!({ "chat_template": source });
        let result = ChatTemplate::from_checkpoint(Some(&config), None, Path::new("hostile"))
            .map_err(|e| e.to_string())
            .and_then(|t| {
                t.expect("a template")
                    .render(&user, true)
                    .map_err(|e| e.to_string())
            });
        let took = started.elapsed();
        assert!(
            result.is_err(),
            "{source}: rendered {:?}",
            result.map(|t| t.len())
        );
        assert!(took < Duration::from_secs(10), "{source}: took {took:?}");
        let err = result.unwrap_err();
        assert!(!err.contains("root:"), "no file was read: {err}");
    }
}

/// "Full decode, then cut at the earliest stop (the longest at the same start)".
fn reference_cut(text: &str, stops: &[String]) -> (String, Option<String>) {
    let hit = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|i| (i, s)))
        .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())));
    match hit {
        Some((i, s)) => (text[..i].to_string(), Some(s.clone())),
        None => (text.to_string(), None),
    }
}

#[test]
fn fuzz_stop_detector_output_is_the_reference_cut() {
    let tok = common::tokenizer();
    // Stop strings drawn from the vocabulary's own text, so that they do occur, plus arbitrary ones.
    let pieces: Vec<String> = (0..384u32)
        .filter_map(|id| tok.decode(&[id], true).ok())
        .filter(|s| !s.is_empty())
        .collect();
    let stop = prop_oneof![
        prop::collection::vec(prop::sample::select(pieces.clone()), 1..3).prop_map(|v| v.concat()),
        ".{1,6}",
    ];
    let case = (
        prop::collection::vec(0u32..384, 1..60),
        prop::collection::vec(stop, 0..4),
    );
    runner(5_000)
        .run(&case, |(ids, stops)| {
            let params = StopParams {
                stop: stops.clone(),
                max_tokens: ids.len(),
                ..StopParams::default()
            };
            let mut det = StopDetector::new(tok.clone(), params);
            let mut out = String::new();
            let mut used = 0;
            let mut reason = None;
            for &id in &ids {
                used += 1;
                let d = det.push(id).map_err(|e| TestCaseError::fail(format!("{e}")))?;
                out.push_str(&d.text);
                if let Some(r) = d.finished {
                    reason = Some(r);
                    break;
                }
            }
            let full = tok.decode(&ids[..used], true).unwrap();
            let (want, stop) = reference_cut(&full, &stops);
            prop_assert_eq!(&out, &want, "ids {:?} stops {:?}", ids, stops);
            for s in &stops {
                prop_assert!(!out.contains(s.as_str()), "a stop string was emitted");
            }
            match stop {
                Some(s) => prop_assert_eq!(reason, Some(FinishReason::StopString(s))),
                None => prop_assert_eq!(reason, Some(FinishReason::Length)),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_deeply_nested_json_is_400_not_a_stack_overflow() {
    for depth in [129, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let mut body = String::from("{\"prompt\":");
            body.push_str(&open.repeat(depth));
            body.push('1');
            body.push_str(&close.repeat(depth));
            body.push('}');
            let e = parse_request::<CompletionRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{depth}: {}", e.message);
        }
    }
}

/// Hostile bodies through the real server: each gets a 4xx with OpenAI error JSON.
#[actix_web::test]
async fn fuzz_http_hostile_bodies_are_4xx() {
    let server = common::start(|_| {});
    let nested = format!("{{\"prompt\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("invalid utf-8", b"{\"prompt\": \"\xff\xfe\xc3\x28\"}".to_vec()),
        ("nan", br#"{"prompt": "a", "temperature": NaN}"#.to_vec()),
        ("infinity", br#"{"prompt": "a", "top_p": Infinity}"#.to_vec()),
        ("huge float", br#"{"prompt": "a", "temperature": 1e400}"#.to_vec()),
        (
            "huge integer",
            br#"{"prompt": "a", "max_tokens": 99999999999999999999999}"#.to_vec(),
        ),
        (
            "negative max_tokens",
            br#"{"prompt": "a", "max_tokens": -5}"#.to_vec(),
        ),
        ("absurd n", br#"{"prompt": "a", "n": 1000000}"#.to_vec()),
        (
            "absurd logprobs",
            br#"{"prompt": "a", "logprobs": 4000000000}"#.to_vec(),
        ),
        (
            "token id past the vocabulary",
            br#"{"prompt": [4294967295]}"#.to_vec(),
        ),
        ("nested 100k", nested.into_bytes()),
        ("not an object", b"[1, 2, 3]".to_vec()),
        ("empty", Vec::new()),
    ];
    let client = reqwest::Client::new();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for (what, body) in &bodies {
            let resp = client
                .post(format!("{}{path}", server.base))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert!((400..500).contains(&status), "{path} {what}: {status} {v}");
            assert!(v["error"]["message"].is_string(), "{path} {what}: {v}");
        }
    }
    // Still serving.
    let ok = common::post_completion(&server.base, &json!({ "prompt": "a", "max_tokens": 1 })).await;
    assert_eq!(ok.status(), 200);
}
