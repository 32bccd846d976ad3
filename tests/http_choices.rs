//! OpenAI's `n`, `echo` and `stream_options.include_usage` over HTTP against the embedded model:
//! several choices run as several sequences and are merged by index, streamed and not.

mod common;

use std::sync::OnceLock;

use common::{post_completion, start, stream_completion, wait_until_no_page_is_referenced, TestServer};
use serde_json::{json, Value};

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(|_| {}))
}

async fn complete(body: Value) -> Value {
    let resp = post_completion(&server().base, &body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn sampled(n: u32, stream: bool) -> Value {
    json!({ "prompt": "The capital of France", "max_tokens": 12, "temperature": 1.0,
            "seed": 1234, "n": n, "stream": stream, "ignore_eos": true })
}

#[tokio::test]
async fn openai_params_n_two_choices_merge_by_index_and_keep_choice_zero() {
    let two = complete(sampled(2, false)).await;
    let choices = two["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_ne!(
        choices[0]["text"], choices[1]["text"],
        "each choice has its own seed"
    );
    // Choice 0 keeps the request's seed: it equals the n = 1 answer.
    let one = complete(sampled(1, false)).await;
    assert_eq!(one["choices"][0]["text"], choices[0]["text"]);
    // The prompt counts once, completions add up.
    assert_eq!(two["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    assert_eq!(two["usage"]["completion_tokens"], 24);
    assert_eq!(
        two["usage"]["total_tokens"],
        json!(24 + one["usage"]["prompt_tokens"].as_u64().unwrap())
    );

    // Streamed: the same texts per index, each choice finished, usage last when asked.
    let mut body = sampled(2, true);
    body["stream_options"] = json!({ "include_usage": true });
    let streamed = stream_completion(&server().base, body).await;
    assert!(streamed.done);
    assert_eq!(streamed.texts.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(streamed.texts[i], c["text"].as_str().unwrap(), "choice {i}");
        let finished = streamed
            .chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|ch| ch["index"] == i && ch["finish_reason"] == "length")
            .count();
        assert_eq!(finished, 1, "choice {i} ends once");
    }
    assert_eq!(streamed.usage.unwrap(), two["usage"]);
}

#[tokio::test]
async fn openai_params_usage_chunk_only_when_asked() {
    let streamed = stream_completion(&server().base, sampled(1, true)).await;
    assert!(streamed.usage.is_none());
    assert!(streamed.chunks.iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test]
async fn openai_params_echo_starts_with_the_prompt() {
    let mut body = sampled(1, false);
    body["echo"] = json!(true);
    let echoed = complete(body.clone()).await;
    let plain = complete(sampled(1, false)).await;
    let text = echoed["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        format!(
            "The capital of France{}",
            plain["choices"][0]["text"].as_str().unwrap()
        )
    );
    // Token-id prompts echo their decoded text; streams open with the prompt.
    body["stream"] = json!(true);
    let streamed = stream_completion(&server().base, body).await;
    assert_eq!(streamed.text, text);
    assert_eq!(streamed.chunks[0]["choices"][0]["text"], "The capital of France");
}

#[tokio::test]
async fn openai_params_bad_combinations_are_400_naming_the_field() {
    for (body, param) in [
        (json!({ "prompt": "a", "n": 0 }), "n"),
        (json!({ "prompt": "a", "n": 17 }), "n"),
        (
            json!({ "prompt": "a", "stream_options": { "include_usage": true } }),
            "stream_options",
        ),
        (
            json!({ "prompt": "a", "stream": true, "stream_options": { "continuous": true } }),
            "continuous",
        ),
        (json!({ "prompt": "a", "echo": true, "logprobs": 1 }), "echo"),
        (json!({ "prompt": "a", "logprobs": 21 }), "logprobs"),
        (json!({ "prompt": "a", "top_k": -2 }), "top_k"),
        (json!({ "prompt": "a", "min_p": 1.5 }), "min_p"),
        (
            json!({ "prompt": "a", "presence_penalty": 2.5 }),
            "presence_penalty",
        ),
        (
            json!({ "prompt": "a", "frequency_penalty": -3 }),
            "frequency_penalty",
        ),
        (
            json!({ "prompt": "a", "repetition_penalty": 0 }),
            "repetition_penalty",
        ),
        (json!({ "prompt": "a", "logit_bias": { "abc": 1 } }), "logit_bias"),
        (json!({ "prompt": "a", "logit_bias": { "5": 101 } }), "logit_bias"),
        (
            json!({ "prompt": "a", "logit_bias": { "99999999": 1 } }),
            "logit_bias",
        ),
        (json!({ "prompt": "a", "best_of": 2 }), "best_of"),
        (json!({ "prompt": "a", "suffix": "x" }), "suffix"),
    ] {
        let resp = post_completion(&server().base, &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn openai_params_hanging_up_on_two_choices_frees_both() {
    use futures::StreamExt;
    // Its own server, slowed, so that both choices surely still run when the client hangs up.
    let server = common::start_slowed(|_| {}, 5).await;
    let mut body = sampled(2, true);
    body["max_tokens"] = json!(200);
    let resp = post_completion(&server.base, &body).await;
    let mut bytes = resp.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let held = common::queue_report(&server.base).await;
    assert_eq!(held["running"], 2, "both choices run: {held}");
    drop(bytes);
    let kv = wait_until_no_page_is_referenced(&server.base).await;
    assert_eq!(kv.used_pages, 0);
    let q = common::queue_report(&server.base).await;
    assert_eq!(
        (q["running"].as_u64(), q["waiting"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
}
