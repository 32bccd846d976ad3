//! `/admin/*`: operator endpoints, JSON in and out, meant for curl and `inferctl admin`.

use actix_web::{web, HttpResponse};

use super::error::ApiError;
use super::AppState;
use crate::actors::kv_pages::{KvReport, ResetPrefixCache};

/// `GET /admin/kv`: page counts, usage, prefix-cache hit rate and the largest cached prefixes.
pub async fn kv_report(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let report = state
        .kv
        .send(KvReport)
        .await
        .map_err(|e| ApiError::internal(format!("KV page manager unreachable: {e}")))?;
    Ok(HttpResponse::Ok().json(report))
}

/// `POST /admin/kv/reset_prefix_cache`: forget every cached prefix.
pub async fn reset_prefix_cache(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let dropped = state
        .kv
        .send(ResetPrefixCache)
        .await
        .map_err(|e| ApiError::internal(format!("KV page manager unreachable: {e}")))?;
    tracing::info!(dropped_keys = dropped, "prefix cache reset by an operator");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "dropped_keys": dropped })))
}
