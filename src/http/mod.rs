//! The HTTP surface: OpenAI-compatible `/v1/completions` (JSON or SSE), `/v1/models`, `/health`
//! and Prometheus `/metrics`. Handlers parse, hand the request to intake, and render its events.

pub mod admin;
pub mod auth;
pub mod chat;
pub mod error;
pub mod metrics_mw;
pub mod openapi;
pub mod probes;
pub mod rate_limit;
pub mod request_context;
pub mod respond;
pub mod stream_idle;
pub mod tokenize;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::dp_router::DpRouter;
use crate::actors::intake::{api_key_client, RequestIntake};
use crate::stop::FinishReason;
use error::ApiError;
use respond::{echo_text, respond, submit_choices, Answer, Shape};
use types::{CompletionRequest, ModelCard, ModelList};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub intake: Addr<RequestIntake>,
    /// The engine's front: the data-parallel router over every replica's scheduler and pool.
    pub scheduler: Addr<DpRouter>,
    pub model_name: String,
    /// `cpu` or `cuda`, for `/version`.
    pub backend: &'static str,
    pub max_context: usize,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    /// Renders chat messages into a prompt; `None` when the model has no template.
    pub chat_template: Option<std::sync::Arc<crate::model::ChatTemplate>>,
    pub tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    /// When the server started, for `/admin/metrics`' uptime.
    pub started: std::time::Instant,
    /// The test-only fault hook; `None` unless `INFERFLUX_FAULT_INJECTION=1` (then `/admin/fault`).
    pub fault: Option<std::sync::Arc<crate::actors::fault::FaultInjector>>,
    /// `limits.max_output_tokens` (0: none): caps chat's default `max_tokens` too.
    pub max_output_tokens: usize,
    /// `server.stream_idle_timeout_seconds` (zero: never).
    pub stream_idle_timeout: std::time::Duration,
}

/// Every route; `/admin/*` only with `admin` (`server.enable_admin`).
pub fn routes(cfg: &mut web::ServiceConfig, admin: bool) {
    cfg.route("/v1/completions", web::post().to(completions))
        .route("/v1/chat/completions", web::post().to(chat::chat_completions))
        .route("/v1/models", web::get().to(models))
        .route("/tokenize", web::post().to(tokenize::tokenize))
        .route("/detokenize", web::post().to(tokenize::detokenize))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(probes::ready))
        .route("/version", web::get().to(probes::version))
        .route("/metrics", web::get().to(metrics_text))
        .route("/openapi.json", web::get().to(openapi::openapi));
    if admin {
        admin_routes(cfg);
    }
    cfg.default_service(web::to(openapi::no_route));
}

fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/kv", web::get().to(admin::kv_report))
        .route(
            "/admin/kv/reset_prefix_cache",
            web::post().to(admin::reset_prefix_cache),
        )
        .route("/admin/queue", web::get().to(admin::queue_report))
        .route("/admin/metrics", web::get().to(admin::metrics_snapshot))
        .route("/admin/drain", web::post().to(admin::drain))
        .route(
            "/admin/requests/{request_id}/cancel",
            web::post().to(admin::cancel_request),
        )
        // Test-only, kept out of the OpenAPI document: 404 unless INFERFLUX_FAULT_INJECTION=1.
        .route("/admin/fault", web::post().to(admin::fault));
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

/// Parses the body ourselves so that every JSON mistake becomes OpenAI error JSON with a 400
/// (nesting deeper than serde_json's recursion limit of 128 included: no stack overflow).
pub fn parse_request<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
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
    let ctx = request_context::RequestContext::of(&req);
    let result = handle_completion(ctx, state, payload).await;
    if let Err(e) = &result {
        metrics::counter!("inferflux_requests_rejected_total", "status" => e.status.to_string()).increment(1);
    }
    result
}

async fn handle_completion(
    ctx: request_context::RequestContext,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let request: CompletionRequest = parse_request(&body)?;
    if request.echo && request.logprobs.is_some() {
        return Err(ApiError::invalid(
            Some("echo".into()),
            "echo with logprobs is not supported (it would need the prompt's logprobs)",
        ));
    }
    let answer = Answer {
        shape: Shape::Completion,
        model: state.model_name.clone(),
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: request.logprobs.is_some(),
        echo: request.echo.then(|| echo_text(&state, &request)).transpose()?,
        stats: ctx.stats.clone(),
        idle_timeout: state.stream_idle_timeout,
    };
    let submitted = submit_choices(&state, request, &ctx).await?;
    respond(submitted, answer).await
}

pub(crate) fn stop_reason(reason: &FinishReason) -> Option<serde_json::Value> {
    match reason {
        FinishReason::StopString(s) => Some(serde_json::Value::String(s.clone())),
        FinishReason::StopToken(id) => Some(serde_json::Value::from(*id)),
        // vLLM reports EOS as `stop_reason: null`: only requested stops are named.
        FinishReason::Eos(_) | FinishReason::Length | FinishReason::Abort => None,
    }
}
