//! OpenAI error JSON (`{"error": {"message", "type", "param", "code"}}`) with the matching status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An error a client sees. Built by validation and by the actors; mapped to HTTP once, here.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: 404,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: 413,
            message: format!("Request body is larger than {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn queue_full() -> Self {
        Self {
            status: 429,
            message: "The server is at capacity; retry later.".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    pub fn draining() -> Self {
        Self {
            status: 503,
            message: "The server is draining and admits no new requests; retry on another replica.".into(),
            kind: "service_unavailable_error",
            param: None,
            code: Some("draining"),
        }
    }

    /// 503 from `/ready` when the server cannot take traffic for a reason other than draining.
    pub fn not_ready(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: message.into(),
            kind: "service_unavailable_error",
            param: None,
            code: Some("not_ready"),
        }
    }

    /// 401 for `/v1/*` without a usable `Authorization: Bearer` header.
    pub fn missing_api_key() -> Self {
        Self::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_api_key",
        )
    }

    /// 401 for a key that is not configured; the key itself is never echoed.
    pub fn invalid_api_key() -> Self {
        Self::unauthorized("Incorrect API key provided.", "invalid_api_key")
    }

    /// 401 for `/admin/*` without a bearer token.
    pub fn missing_admin_token() -> Self {
        Self::unauthorized(
            "This admin route needs the admin token in an Authorization header (Authorization: Bearer ADMIN_TOKEN).",
            "missing_admin_token",
        )
    }

    /// 403 for `/admin/*` with a token that is not the admin token (an API key included).
    pub fn invalid_admin_token() -> Self {
        Self {
            status: 403,
            message: "The bearer token is not the admin token.".into(),
            kind: "permission_error",
            param: None,
            code: Some("invalid_admin_token"),
        }
    }

    fn unauthorized(message: &str, code: &'static str) -> Self {
        Self {
            status: 401,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: &'a Option<String>,
            code: &'a Option<&'static str>,
        }
        serde_json::json!({ "error": Inner {
            message: &self.message, kind: self.kind, param: &self.param, code: &self.code } })
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        // A full queue clears as requests finish; a draining replica stays so: retry it slower.
        let header = match self.status {
            429 => Some(("Retry-After", "1")),
            503 => Some(("Retry-After", "5")),
            401 => Some(("WWW-Authenticate", "Bearer")),
            _ => None,
        };
        if let Some(header) = header {
            resp.insert_header(header);
        }
        resp.json(self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(e: &ApiError, name: &str) -> Option<String> {
        let resp = e.error_response();
        resp.headers().get(name).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn auth_and_retry_headers_follow_the_status() {
        assert_eq!(
            header(&ApiError::queue_full(), "retry-after").as_deref(),
            Some("1")
        );
        assert_eq!(header(&ApiError::draining(), "retry-after").as_deref(), Some("5"));
        assert_eq!(
            header(&ApiError::not_ready("x"), "retry-after").as_deref(),
            Some("5")
        );
        for e in [
            ApiError::missing_api_key(),
            ApiError::invalid_api_key(),
            ApiError::missing_admin_token(),
        ] {
            assert_eq!(e.status, 401);
            assert_eq!(header(&e, "www-authenticate").as_deref(), Some("Bearer"));
        }
        let forbidden = ApiError::invalid_admin_token();
        assert_eq!((forbidden.status, forbidden.kind), (403, "permission_error"));
        let plain = ApiError::invalid(None, "bad");
        assert_eq!(
            (header(&plain, "retry-after"), header(&plain, "www-authenticate")),
            (None, None)
        );
    }
}
