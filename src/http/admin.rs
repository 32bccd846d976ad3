//! `/admin/*`: operator endpoints, JSON in and out, meant for curl and `inferctl admin`.

use actix_web::{web, HttpResponse};

use super::error::ApiError;
use super::{parse_request, read_body, AppState};
use crate::actors::dp_router::PoolsReport;
use crate::actors::fault::FaultKind;
use crate::actors::kv_pages::{KvReportBody, ResetPrefixCache};
use crate::actors::scheduler::{CancelRequest, Drain, QueueReport, QueueReportBody, ThroughputReport};
use crate::scheduler::throughput::Throughput;

/// `GET /admin/kv`: page counts, usage, prefix-cache hit rate and the largest cached prefixes.
pub async fn kv_report(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let report = pools_report(&state).await?;
    Ok(HttpResponse::Ok().json(report))
}

/// `POST /admin/kv/reset_prefix_cache`: forget every cached prefix.
pub async fn reset_prefix_cache(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let dropped = state
        .scheduler
        .send(ResetPrefixCache)
        .await
        .map_err(|e| ApiError::internal(format!("KV page manager unreachable: {e}")))?;
    tracing::info!(dropped_keys = dropped, "prefix cache reset by an operator");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "dropped_keys": dropped })))
}

/// Every replica's KV pool, summed.
async fn pools_report(state: &AppState) -> Result<KvReportBody, ApiError> {
    state
        .scheduler
        .send(PoolsReport)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::internal("KV page manager unreachable"))
}

fn scheduler_gone(e: actix::MailboxError) -> ApiError {
    ApiError::internal(format!("scheduler unreachable: {e}"))
}

/// `GET /admin/queue`: running, waiting, preempted and swapped sequences, the drain flag, and
/// every recent client's depth, virtual time and share.
pub async fn queue_report(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let report = state.scheduler.send(QueueReport).await.map_err(scheduler_gone)?;
    Ok(HttpResponse::Ok().json(report))
}

/// What `GET /admin/metrics` answers: the state an operator checks first, in one JSON object.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    pub model: String,
    /// `cpu` or `cuda`.
    pub backend: String,
    pub uptime_seconds: f64,
    /// Queue depth, running sequences, drain state and per-client fair share.
    pub queue: QueueReportBody,
    /// The page pool and prefix cache (the largest cached prefixes are in `/admin/kv`).
    pub kv: KvReportBody,
    /// Tokens and requests per second over the last minute.
    pub throughput: Throughput,
}

/// `GET /admin/metrics`: one snapshot of queues, fair share, KV pool and last-minute throughput.
pub async fn metrics_snapshot(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let queue = state.scheduler.send(QueueReport).await.map_err(scheduler_gone)?;
    let throughput = state
        .scheduler
        .send(ThroughputReport)
        .await
        .map_err(scheduler_gone)?;
    let mut kv = pools_report(&state).await?;
    kv.largest_cached_prefixes.clear();
    Ok(HttpResponse::Ok().json(MetricsSnapshot {
        model: state.model_name.clone(),
        backend: state.backend.to_string(),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        queue,
        kv,
        throughput,
    }))
}

/// The body of `POST /admin/drain`; no body means `{"drain": true}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    pub drain: bool,
}

/// `POST /admin/drain`: stop admitting new requests (503) while what runs or waits finishes;
/// `{"drain": false}` resumes. Replies with the queue. The body is read as the API's bodies are
/// (`server.max_body_bytes`), so that a large one is a 413 in OpenAI error JSON too.
pub async fn drain(state: web::Data<AppState>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let drain = if body.iter().all(u8::is_ascii_whitespace) {
        true
    } else {
        parse_request::<DrainRequest>(&body)
            .map_err(|e| ApiError {
                param: e.param.or_else(|| Some("drain".into())),
                ..e
            })?
            .drain
    };
    let report = state
        .scheduler
        .send(Drain { drain })
        .await
        .map_err(scheduler_gone)?;
    Ok(HttpResponse::Ok().json(report))
}

/// `POST /admin/requests/{request_id}/cancel`: the request leaves within one step, its pages are
/// freed and its client gets `finish_reason: "abort"`. 404 for an id that is not queued or
/// running.
pub async fn cancel_request(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let request_id = path.into_inner();
    let known = state
        .scheduler
        .send(CancelRequest {
            request_id: request_id.clone(),
        })
        .await
        .map_err(scheduler_gone)?;
    if !known {
        return Err(ApiError::not_found(format!(
            "No queued or running request has the id `{request_id}`."
        )));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "id": request_id, "cancelled": true })))
}

/// The body of `POST /admin/fault`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// `panic` or `error`; absent with `step_delay_ms` only.
    pub kind: Option<FaultKind>,
    /// The fault comes on the `after_steps`-th step from now (default 1: the next one).
    pub after_steps: Option<u64>,
    /// Sleep this long before every step from now on (0 turns it off).
    pub step_delay_ms: Option<u64>,
}

/// `POST /admin/fault` (tests only, see `actors::fault`): arm an executor fault and/or set a
/// per-step delay. 404 unless the server started with `INFERFLUX_FAULT_INJECTION=1`.
pub async fn fault(state: web::Data<AppState>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let Some(injector) = &state.fault else {
        return Err(ApiError::not_found(
            "Fault injection is off; it exists only for tests (start with INFERFLUX_FAULT_INJECTION=1).",
        ));
    };
    let body = read_body(payload, state.max_body_bytes).await?;
    let req: FaultRequest = parse_request(&body)?;
    if let Some(ms) = req.step_delay_ms {
        injector.set_delay(std::time::Duration::from_millis(ms));
    }
    let after_steps = req.after_steps.unwrap_or(1).max(1);
    if let Some(kind) = req.kind {
        injector.arm(kind, after_steps);
    }
    tracing::warn!(
        kind = ?req.kind,
        after_steps = ?req.kind.map(|_| after_steps),
        step_delay_ms = ?req.step_delay_ms,
        "executor fault injection armed"
    );
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "kind": req.kind,
        "after_steps": req.kind.map(|_| after_steps),
        "step_delay_ms": req.step_delay_ms,
    })))
}
