//! Counts every HTTP answer as `inferflux_http_requests_total{endpoint,status}`.
//!
//! `endpoint` is the matched route pattern (`/admin/requests/{request_id}/cancel`), never the raw
//! path, and `unmatched` for paths no route serves, so the label set stays bounded whatever
//! clients send.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::Error;

/// `actix_web::middleware::from_fn` middleware; errors a handler returns are already responses
/// here, so they are counted with their status too.
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let endpoint = req.match_pattern().unwrap_or_else(|| "unmatched".to_string());
    let res = next.call(req).await;
    let status = match &res {
        Ok(r) => r.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    metrics::counter!(
        "inferflux_http_requests_total",
        "endpoint" => endpoint,
        "status" => status.as_u16().to_string()
    )
    .increment(1);
    res
}
