//! `/ready` and `/version`, for load balancers and operators; open even when auth is on.
//! `/health` (liveness) answers 200 while the process serves; `/ready` says whether to send
//! traffic here.

use std::time::Duration;

use actix_web::{web, HttpResponse};

use super::error::ApiError;
use super::AppState;
use crate::actors::scheduler::QueueReport;

/// How long `/ready` waits for the scheduler; a scheduler that does not answer is not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /ready`: 200 `{"status":"ready"}`, or 503 (`Retry-After`) while draining or when the
/// scheduler does not answer. The HTTP server starts only after the model is loaded, so a
/// server that answers has its model.
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let report = state
        .scheduler
        .send(QueueReport)
        .timeout(READY_TIMEOUT)
        .await
        .map_err(|e| ApiError::not_ready(format!("The scheduler does not answer ({e}).")))?;
    if report.draining {
        return Err(ApiError::draining());
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })))
}

/// `GET /version`: vLLM's `{"version"}` plus what an operator wants to know about this replica.
pub async fn version(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "name": "inferflux",
        "backend": state.backend,
        "model": state.model_name,
    }))
}
