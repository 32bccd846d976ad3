//! `POST /tokenize` and `POST /detokenize`: the ids are the tokenizer's (prompt form) and exactly
//! the ones a chat request uses (messages form), decoding round-trips, and mistakes are OpenAI
//! error JSON naming the field.

mod common;

use std::sync::OnceLock;

use common::{start, TestServer};
use serde_json::{json, Value};

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(|_| {}))
}

/// POSTs `body` to `path`; the status and the JSON answer.
async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn max_model_len(base: &str) -> Value {
    let v: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"][0]["max_model_len"].clone()
}

#[tokio::test]
async fn tokenize_prompt_gives_the_tokenizers_ids() {
    let base = &server().base;
    let tokenizer = common::tokenizer();
    let max_len = max_model_len(base).await;
    for golden in common::goldens().prompts {
        let p = golden.prompt.as_str();
        let (status, v) = post(base, "/tokenize", &json!({ "prompt": p })).await;
        assert_eq!(status, 200, "{v}");
        let with_special = tokenizer.encode(p, true).unwrap();
        assert_eq!(v["tokens"], json!(with_special.get_ids()), "{p:?}");
        assert_eq!(
            v["tokens"],
            json!(golden.input_ids),
            "{p:?}: the ids a completion uses"
        );
        assert_eq!(v["count"], with_special.get_ids().len());
        assert_eq!(v["max_model_len"], max_len);
        assert_eq!(v["token_strs"], Value::Null);

        let body = json!({ "model": "inferflux-tiny-llama", "prompt": p, "add_special_tokens": false,
                           "return_token_strs": true });
        let (status, v) = post(base, "/tokenize", &body).await;
        assert_eq!(status, 200, "{v}");
        let plain = tokenizer.encode(p, false).unwrap();
        assert_eq!(
            v["tokens"],
            json!(plain.get_ids()),
            "{p:?} without special tokens"
        );
        assert_ne!(
            v["tokens"],
            json!(with_special.get_ids()),
            "the flag changes the ids (BOS)"
        );
        assert_eq!(v["token_strs"], json!(plain.get_tokens()));
        assert_eq!(v["count"], plain.get_ids().len());
    }
}

#[derive(serde::Deserialize)]
struct ChatGoldens {
    chat: Vec<ChatGolden>,
}

#[derive(serde::Deserialize)]
struct ChatGolden {
    messages: Vec<Value>,
    add_generation_prompt: bool,
    input_ids: Vec<u32>,
}

/// For every chat fixture: the messages form gives `apply_chat_template`'s ids, which are also
/// the ones `/v1/chat/completions` counts as its prompt.
#[tokio::test]
async fn tokenize_messages_give_the_chat_request_ids() {
    for name in ["tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let goldens: ChatGoldens =
            serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap()).unwrap();
        let server = start(move |s| s.model.path = Some(dir));
        let base = server.base.as_str();
        for (i, chat) in goldens.chat.iter().enumerate() {
            let body =
                json!({ "messages": chat.messages, "add_generation_prompt": chat.add_generation_prompt });
            let (status, v) = post(base, "/tokenize", &body).await;
            assert_eq!(status, 200, "{name} chat {i}: {v}");
            assert_eq!(
                v["tokens"],
                json!(chat.input_ids),
                "{name} chat {i}: apply_chat_template's ids"
            );
            assert_eq!(v["count"], chat.input_ids.len());

            let request = json!({ "messages": chat.messages, "add_generation_prompt": chat.add_generation_prompt,
                                  "max_tokens": 1 });
            let (status, answer) = post(base, "/v1/chat/completions", &request).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(
                answer["usage"]["prompt_tokens"], v["count"],
                "{name} chat {i}: the chat request's prompt"
            );

            if chat.add_generation_prompt {
                let (_, default) = post(base, "/tokenize", &json!({ "messages": chat.messages })).await;
                assert_eq!(
                    default["tokens"], v["tokens"],
                    "add_generation_prompt defaults to true"
                );
            }
        }
    }
}

#[tokio::test]
async fn tokenize_detokenize_round_trips() {
    let base = &server().base;
    let tokenizer = common::tokenizer();
    for golden in common::goldens().prompts {
        let p = golden.prompt.as_str();
        for special in [false, true] {
            let (_, v) = post(
                base,
                "/tokenize",
                &json!({ "prompt": p, "add_special_tokens": special }),
            )
            .await;
            let (status, back) = post(base, "/detokenize", &json!({ "tokens": v["tokens"] })).await;
            assert_eq!(status, 200, "{back}");
            let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
            assert_eq!(
                back["prompt"],
                tokenizer.decode(&ids, false).unwrap(),
                "special tokens are kept"
            );
            if !special {
                assert_eq!(back["prompt"], p, "decoding the ids gives the prompt back");
            }
        }
    }
    let (status, v) = post(base, "/detokenize", &json!({ "tokens": [] })).await;
    assert_eq!((status, v), (200, json!({ "prompt": "" })));
}

#[tokio::test]
async fn tokenize_errors_name_the_field() {
    let base = &server().base;
    let vocab = common::tokenizer().get_vocab_size(true);
    let rejected = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("inferflux_requests_rejected_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = rejected(&common::metrics_text(base).await);
    let cases = [
        ("/detokenize", json!({ "tokens": [1, vocab] }), 400, "tokens"),
        ("/detokenize", json!({ "tokens": [-1] }), 400, "tokens"),
        (
            "/detokenize",
            json!({ "tokens": [1], "skip_special_tokens": true }),
            400,
            "skip_special_tokens",
        ),
        ("/detokenize", json!({}), 400, "tokens"),
        (
            "/detokenize",
            json!({ "model": "nope", "tokens": [1] }),
            404,
            "model",
        ),
        ("/tokenize", json!({ "prompt": "hi", "bogus": 1 }), 400, "bogus"),
        ("/tokenize", json!({}), 400, "prompt"),
        (
            "/tokenize",
            json!({ "messages": [{ "role": "user", "content": "hi" }], "chat_template": "x" }),
            400,
            "chat_template",
        ),
        (
            "/tokenize",
            json!({ "messages": [{ "role": "user", "content": "hi" }], "prompt": "x" }),
            400,
            "prompt",
        ),
        // The embedded model has no chat template.
        (
            "/tokenize",
            json!({ "messages": [{ "role": "user", "content": "hi" }] }),
            400,
            "messages",
        ),
        (
            "/tokenize",
            json!({ "model": "nope", "prompt": "hi" }),
            404,
            "model",
        ),
    ];
    let n = cases.len() as f64;
    for (path, body, status, param) in cases {
        let (got, v) = post(base, path, &body).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        assert_eq!(v["error"]["param"], param, "{path} {body}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        if status == 404 {
            assert_eq!(v["error"]["code"], "model_not_found");
        }
    }
    let resp = reqwest::Client::new()
        .post(format!("{base}/tokenize"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let after = rejected(&common::metrics_text(base).await);
    assert!(
        after >= before + n + 1.0,
        "every rejection is counted: {before} -> {after}"
    );
}

#[tokio::test]
async fn tokenize_body_over_the_limit_is_413() {
    let server = start(|s| s.server.max_body_bytes = 64);
    let prompt = "x".repeat(100);
    for (path, body) in [
        ("/tokenize", json!({ "prompt": prompt })),
        ("/detokenize", json!({ "tokens": vec![1; 40] })),
    ] {
        let (status, v) = post(&server.base, path, &body).await;
        assert_eq!(status, 413, "{path}: {v}");
        assert_eq!(v["error"]["code"], "request_too_large");
    }
}
