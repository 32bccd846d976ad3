//! Every supported architecture served over HTTP from its fixture directory: a plain prompt and
//! every chat conversation give transformers' greedy tokens, streamed and not, and a chat prompt
//! has exactly as many tokens as `apply_chat_template` made.

mod common;

use serde_json::{json, Value};

#[derive(serde::Deserialize)]
struct Goldens {
    prompts: Vec<Golden>,
    chat: Vec<Golden>,
}

#[derive(serde::Deserialize)]
struct Golden {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    add_generation_prompt: bool,
    input_ids: Vec<u32>,
    greedy_text: String,
}

fn fixture(name: &str) -> (std::path::PathBuf, Goldens) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let goldens = serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap()).unwrap();
    (dir, goldens)
}

async fn post(base: &str, path: &str, body: &Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

/// The text of a streamed chat completion, checking OpenAI's chunk shapes on the way.
async fn stream_chat(base: &str, mut body: Value) -> (String, Option<String>) {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    let (mut text, mut finish, mut first, mut done) = (String::new(), None, true, false);
    while let Some(event) = events.next().await {
        let data = event.unwrap().data;
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        let choice = &v["choices"][0];
        if first {
            assert_eq!(
                choice["delta"]["role"], "assistant",
                "the first chunk names the role"
            );
            first = false;
        }
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert!(done, "the stream ends with [DONE]");
    (text, finish)
}

async fn check_architecture(name: &str) {
    let (dir, goldens) = fixture(name);
    let server = common::start(move |s| s.model.path = Some(dir));
    let base = server.base.as_str();
    let p = &goldens.prompts[0];
    let v = post(
        base,
        "/v1/completions",
        &json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 0 }),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        p.greedy_text.as_str(),
        "{name}: completion"
    );
    assert_eq!(
        v["usage"]["prompt_tokens"],
        p.input_ids.len(),
        "{name}: prompt tokens"
    );
    for (i, chat) in goldens.chat.iter().enumerate() {
        let body = json!({
            "messages": chat.messages,
            "add_generation_prompt": chat.add_generation_prompt,
            "max_tokens": 24,
            "temperature": 0,
        });
        let v = post(base, "/v1/chat/completions", &body).await;
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            v["usage"]["prompt_tokens"],
            chat.input_ids.len(),
            "{name} chat {i}: the prompt has apply_chat_template's token count"
        );
        assert_eq!(
            v["choices"][0]["message"]["content"],
            chat.greedy_text.as_str(),
            "{name} chat {i}: greedy answer"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let (streamed, finish) = stream_chat(base, body).await;
        assert_eq!(streamed, chat.greedy_text, "{name} chat {i}: streamed");
        assert_eq!(finish.as_deref(), Some("length"));
    }
}

#[tokio::test]
async fn model_llama3_over_http_matches_transformers() {
    check_architecture("tiny-llama3").await;
}

#[tokio::test]
async fn model_mistral_over_http_matches_transformers() {
    check_architecture("tiny-mistral").await;
}

#[tokio::test]
async fn model_qwen2_chatml_over_http_matches_transformers() {
    check_architecture("tiny-qwen2").await;
}

#[tokio::test]
async fn model_qwen3_over_http_matches_transformers() {
    check_architecture("tiny-qwen3").await;
}

#[tokio::test]
async fn chat_errors_are_openai_json() {
    let (dir, _) = fixture("tiny-mistral");
    let server = common::start(move |s| s.model.path = Some(dir));
    let embedded = common::start(|_| {});
    let cases = [
        // The embedded model has no chat template.
        (
            &embedded.base,
            json!({ "messages": [{ "role": "user", "content": "hi" }] }),
            "messages",
        ),
        // Mistral's template raises on a conversation that does not alternate.
        (
            &server.base,
            json!({ "messages": [{ "role": "user", "content": "a" }, { "role": "user", "content": "b" }] }),
            "messages",
        ),
        (&server.base, json!({ "messages": [] }), "messages"),
        (
            &server.base,
            json!({ "messages": [{ "role": "user", "content": "a" }], "tools": [] }),
            "tools",
        ),
        (
            &server.base,
            json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": {"url": "x"} }] }] }),
            "messages",
        ),
        (
            &server.base,
            json!({ "messages": [{ "role": "user", "content": [{ "type": "text" }] }] }),
            "messages",
        ),
        (
            &server.base,
            json!({ "messages": [{ "role": "user", "content": [{ "type": "text", "text": "hi", "cache_control": {} }] }] }),
            "messages",
        ),
    ];
    for (base, body, param) in cases {
        let resp = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
}
