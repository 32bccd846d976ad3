//! The HTTP surface: OpenAI-compatible `/v1/completions` (JSON or SSE), `/v1/models`, `/health`
//! and Prometheus `/metrics`. Handlers parse, hand the request to intake, and render its events.

pub mod admin;
pub mod auth;
pub mod chat;
pub mod error;
pub mod probes;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::intake::{api_key_client, RequestIntake, SubmitCompletion, Submitted};
use crate::actors::kv_pages::KvPageManager;
use crate::actors::scheduler::Scheduler;
use crate::actors::stop_detector::StreamEvent;
use crate::stop::FinishReason;
use error::ApiError;
use types::{
    CompletionChoice, CompletionRequest, CompletionResponse, ModelCard, ModelList, PromptTokensDetails, Usage,
};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub intake: Addr<RequestIntake>,
    pub kv: Addr<KvPageManager>,
    pub scheduler: Addr<Scheduler>,
    pub model_name: String,
    /// `cpu` or `cuda`, for `/version`.
    pub backend: &'static str,
    pub max_context: usize,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    /// Renders chat messages into a prompt; `None` when the model has no template.
    pub chat_template: Option<std::sync::Arc<crate::model::ChatTemplate>>,
    pub tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
}

/// Which OpenAI object a request's events are shaped into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `text_completion` with `choices[].text`.
    Completion,
    /// `chat.completion` / `chat.completion.chunk` with `message` / `delta`.
    Chat,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/completions", web::post().to(completions))
        .route("/v1/chat/completions", web::post().to(chat::chat_completions))
        .route("/v1/models", web::get().to(models))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(probes::ready))
        .route("/version", web::get().to(probes::version))
        .route("/metrics", web::get().to(metrics_text))
        .route("/admin/kv", web::get().to(admin::kv_report))
        .route(
            "/admin/kv/reset_prefix_cache",
            web::post().to(admin::reset_prefix_cache),
        )
        .route("/admin/queue", web::get().to(admin::queue_report))
        .route("/admin/drain", web::post().to(admin::drain))
        .route(
            "/admin/requests/{request_id}/cancel",
            web::post().to(admin::cancel_request),
        );
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model".into(),
            created: 0,
            owned_by: "inferflux".into(),
            max_model_len: state.max_context,
        }],
    })
}

async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// Parses the body ourselves so that every JSON mistake becomes OpenAI error JSON with a 400.
pub(crate) fn parse_request<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
            .map(str::to_string);
        ApiError::invalid(param, format!("invalid request body: {msg}"))
    })
}

/// Reads the body up to the configured limit, answering 413 as OpenAI error JSON past it.
pub(crate) async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(None, format!("cannot read request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The client identity of an `Authorization: Bearer <key>` header, if there is one.
pub(crate) fn key_client(req: &HttpRequest) -> Option<String> {
    auth::bearer_token(req.headers()).map(api_key_client)
}

async fn completions(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let result = handle_completion(key_client(&req), state, payload).await;
    if let Err(e) = &result {
        metrics::counter!("inferflux_requests_rejected_total", "status" => e.status.to_string()).increment(1);
    }
    result
}

async fn handle_completion(
    key_client: Option<String>,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let request: CompletionRequest = parse_request(&body)?;
    let submitted = state
        .intake
        .send(SubmitCompletion { request, key_client })
        .await
        .map_err(|e| ApiError::internal(format!("intake unreachable: {e}")))??;
    respond(submitted, state.model_name.clone(), Shape::Completion).await
}

/// The SSE stream or the whole JSON answer of an accepted request.
pub(crate) async fn respond(
    submitted: Submitted,
    model: String,
    shape: Shape,
) -> Result<HttpResponse, ApiError> {
    if submitted.stream {
        Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Request-Id", submitted.request_id.clone()))
            .streaming(sse_stream(submitted, model, shape)))
    } else {
        collect(submitted, model, shape).await
    }
}

pub(crate) fn stop_reason(reason: &FinishReason) -> Option<serde_json::Value> {
    match reason {
        FinishReason::StopString(s) => Some(serde_json::Value::String(s.clone())),
        FinishReason::StopToken(id) => Some(serde_json::Value::from(*id)),
        // vLLM reports EOS as `stop_reason: null`: only requested stops are named.
        FinishReason::Eos(_) | FinishReason::Length | FinishReason::Abort => None,
    }
}

fn chunk(
    id: &str,
    model: &str,
    created: u64,
    text: String,
    finish: Option<&FinishReason>,
) -> CompletionResponse {
    CompletionResponse {
        id: id.to_string(),
        object: "text_completion".into(),
        created,
        model: model.to_string(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: finish.map(|f| f.as_openai().to_string()),
            stop_reason: finish.and_then(stop_reason),
        }],
        usage: None,
    }
}

fn sse_event(value: &impl serde::Serialize) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("data: {json}\n\n"))
}

/// `data: {chunk}` per text delta, the finish reason on the last chunk, then `data: [DONE]`.
/// The stream owns the cancel guard: if the client disconnects, actix drops the stream and the
/// request is cancelled.
fn sse_stream(
    submitted: Submitted,
    model: String,
    shape: Shape,
) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> {
    let created = unix_now();
    // A chat stream opens with the assistant's role, as OpenAI's does.
    let opening = (shape == Shape::Chat).then(|| {
        Ok(sse_event(&chat::chunk(
            &submitted.request_id,
            &model,
            created,
            chat::opening_delta(),
            None,
        )))
    });
    let events = futures::stream::unfold(Some(submitted), move |state| {
        let model = model.clone();
        async move {
            let mut sub = state?;
            let bytes = match sub.events.recv().await {
                Some(StreamEvent::Text(text)) => {
                    let b = shaped_chunk(shape, &sub.request_id, &model, created, Some(text), None);
                    return Some((Ok(b), Some(sub)));
                }
                Some(StreamEvent::Finished { reason, .. }) => {
                    let last = shaped_chunk(shape, &sub.request_id, &model, created, None, Some(&reason));
                    [last, Bytes::from_static(b"data: [DONE]\n\n")].concat()
                }
                Some(StreamEvent::Error(message)) => {
                    let err = ApiError::internal(message);
                    [sse_event(&err.body()), Bytes::from_static(b"data: [DONE]\n\n")].concat()
                }
                None => {
                    let err = ApiError::internal("request ended without a result");
                    [sse_event(&err.body()), Bytes::from_static(b"data: [DONE]\n\n")].concat()
                }
            };
            sub.guard.disarm();
            Some((Ok(Bytes::from(bytes)), None))
        }
    });
    futures::stream::iter(opening).chain(events)
}

/// One SSE event: a text delta (`text`), or the last chunk with the finish reason.
fn shaped_chunk(
    shape: Shape,
    id: &str,
    model: &str,
    created: u64,
    text: Option<String>,
    finish: Option<&FinishReason>,
) -> Bytes {
    match shape {
        Shape::Completion => sse_event(&chunk(id, model, created, text.unwrap_or_default(), finish)),
        Shape::Chat => {
            let delta = crate::http::types::ChatDelta {
                role: None,
                content: text,
            };
            sse_event(&chat::chunk(id, model, created, delta, finish))
        }
    }
}

async fn collect(mut sub: Submitted, model: String, shape: Shape) -> Result<HttpResponse, ApiError> {
    let mut text = String::new();
    while let Some(event) = sub.events.recv().await {
        match event {
            StreamEvent::Text(t) => text.push_str(&t),
            StreamEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                sub.guard.disarm();
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                    prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
                };
                let mut ok = HttpResponse::Ok();
                ok.insert_header(("X-Request-Id", sub.request_id.clone()));
                return Ok(match shape {
                    Shape::Completion => {
                        let mut resp = chunk(&sub.request_id, &model, unix_now(), text, Some(&reason));
                        resp.usage = Some(usage);
                        ok.json(resp)
                    }
                    Shape::Chat => ok.json(chat::whole(&sub.request_id, &model, text, &reason, usage)),
                });
            }
            StreamEvent::Error(message) => {
                sub.guard.disarm();
                return Err(ApiError::internal(message));
            }
        }
    }
    Err(ApiError::internal("request ended without a result"))
}
