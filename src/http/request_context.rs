//! Every HTTP request gets a `request_id` before anything else sees it: the client's
//! `X-Request-Id` when it sent a usable one, else a new one. The id goes back in the response's
//! `X-Request-Id` header, names the completion (`id` of the OpenAI object,
//! `/admin/requests/{id}/cancel`), and is a field of every log line about the request. When the
//! response body ends (or the client hangs up mid-stream) one access log line says what
//! happened: status, tokens in and out, time to first token, duration.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest};
use bytes::Bytes;
use tracing::Instrument;

use super::{key_client, AppState};

/// The header a request id is read from and written to.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied id kept; a longer one is replaced (ids end up in logs and labels).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Log target of the access lines, so that operators can filter them
/// (`INFERFLUX_LOG=info,inferflux::access=warn`).
pub const ACCESS_TARGET: &str = "inferflux::access";

/// What a request's handler learns that the access line reports. Shared between the handler
/// (which fills it as events arrive) and the response body (which logs it when it ends).
#[derive(Debug)]
pub struct RequestStats {
    started: Instant,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    /// Microseconds from arrival to the first generated text; `u64::MAX` until then.
    first_token_us: AtomicU64,
}

impl RequestStats {
    fn new(started: Instant) -> Self {
        Self {
            started,
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            first_token_us: AtomicU64::new(u64::MAX),
        }
    }

    /// Marks the first generated text; later calls keep the first time.
    pub fn first_token(&self) {
        let us = self.started.elapsed().as_micros() as u64;
        let _ = self
            .first_token_us
            .compare_exchange(u64::MAX, us, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Adds one choice's usage.
    pub fn add_usage(&self, prompt: usize, completion: usize, cached: usize) {
        self.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        self.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
    }

    fn ttft_ms(&self) -> Option<f64> {
        let us = self.first_token_us.load(Ordering::Relaxed);
        (us != u64::MAX).then(|| us as f64 / 1000.0)
    }
}

/// The request's identity, in the request's extensions for handlers to take.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    /// The client identity of the request's API key, when it sent one.
    pub key_client: Option<String>,
    pub stats: Arc<RequestStats>,
}

impl RequestContext {
    /// The context the middleware stored; a fresh one where it did not run (unit tests that
    /// call handlers directly).
    pub fn of(req: &HttpRequest) -> Self {
        req.extensions()
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(|| RequestContext {
                request_id: new_request_id(req.path()),
                key_client: key_client(req),
                stats: Arc::new(RequestStats::new(Instant::now())),
            })
    }
}

/// A client id is kept if it is 1 to 128 visible ASCII characters; anything else (control
/// characters, spaces, non-ASCII) would corrupt log lines, so a new id replaces it.
pub fn usable_client_id(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= MAX_REQUEST_ID_LEN && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(s)
}

/// A new id, prefixed as OpenAI prefixes the object it names.
pub fn new_request_id(path: &str) -> String {
    let prefix = match path {
        "/v1/completions" => "cmpl",
        "/v1/chat/completions" => "chatcmpl",
        _ => "req",
    };
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// Probes and scrapes repeat every few seconds; their access lines are debug, others info.
fn is_routine(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// The middleware (`App::wrap(from_fn(request_context))`, outermost): gives the request its id
/// and a `request` span, answers with `X-Request-Id`, and logs the access line as the body ends.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<AccessLogged>, actix_web::Error> {
    let started = Instant::now();
    let path = req.path().to_string();
    let request_id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(usable_client_id)
        .map(str::to_string)
        .unwrap_or_else(|| new_request_id(&path));
    let model = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.model_name.clone())
        .unwrap_or_default();
    let ctx = RequestContext {
        request_id: request_id.clone(),
        key_client: key_client(req.request()),
        stats: Arc::new(RequestStats::new(started)),
    };
    let peer = req
        .peer_addr()
        .map_or_else(|| "unknown".into(), |a| a.ip().to_string());
    let method = req.method().to_string();
    let stats = ctx.stats.clone();
    // `client` is the fair-share identity: the API key's now, else intake records the `user`
    // field or "anonymous" once it has read the body (recorded once, so text logs show it once).
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        client = tracing::field::Empty,
        model = %model,
    );
    if let Some(client) = &ctx.key_client {
        span.record("client", client.as_str());
    }
    req.extensions_mut().insert(ctx);
    let res = next.call(req).instrument(span.clone()).await?;
    let endpoint = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    let status = res.status().as_u16();
    let mut res = res.map_body(|_, body| AccessLogged {
        body: body.boxed(),
        line: Some(AccessLine {
            span,
            peer,
            method,
            endpoint,
            routine: is_routine(&path),
            status,
            stats,
        }),
    });
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    Ok(res)
}

/// What the access line needs once the body is done.
struct AccessLine {
    /// The `request{request_id, client, model}` span; the client intake chose is recorded in it.
    span: tracing::Span,
    peer: String,
    method: String,
    endpoint: String,
    routine: bool,
    status: u16,
    stats: Arc<RequestStats>,
}

impl AccessLine {
    /// `completed` is false when the body was dropped before its end: the client hung up.
    fn log(self, completed: bool) {
        let s = &self.stats;
        let duration_ms = s.started.elapsed().as_secs_f64() * 1000.0;
        let (prompt_tokens, completion_tokens, cached_tokens) = (
            s.prompt_tokens.load(Ordering::Relaxed),
            s.completion_tokens.load(Ordering::Relaxed),
            s.cached_tokens.load(Ordering::Relaxed),
        );
        let ttft_ms = s.ttft_ms();
        macro_rules! access {
            ($level:expr) => {
                tracing::event!(
                    target: ACCESS_TARGET,
                    parent: &self.span,
                    $level,
                    peer = %self.peer,
                    method = %self.method,
                    endpoint = %self.endpoint,
                    status = self.status,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    ttft_ms,
                    duration_ms,
                    completed,
                    "access"
                )
            };
        }
        if self.routine {
            access!(tracing::Level::DEBUG);
        } else {
            access!(tracing::Level::INFO);
        }
    }
}

/// A response body that logs the access line when it ends or is dropped. Boxed, so that any
/// inner body fits and no pin projection is needed.
pub struct AccessLogged {
    body: BoxBody,
    line: Option<AccessLine>,
}

impl MessageBody for AccessLogged {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_next(cx);
        if let Poll::Ready(None) = polled {
            if let Some(line) = self.line.take() {
                line.log(true);
            }
        }
        polled
    }
}

impl Drop for AccessLogged {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // An empty body may never be polled; it ended as it was written. Any other body
            // dropped before its end lost its client.
            let empty = matches!(self.body.size(), BodySize::None | BodySize::Sized(0));
            line.log(empty);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_from_the_client_is_kept_when_printable() {
        let ok = HeaderValue::from_static("trace-01:abc/DEF_9");
        assert_eq!(usable_client_id(&ok), Some("trace-01:abc/DEF_9"));
        for bad in ["", "has space", "tab\there"] {
            let v = HeaderValue::from_str(bad).unwrap();
            assert_eq!(usable_client_id(&v), None, "{bad:?}");
        }
        let long = HeaderValue::from_str(&"x".repeat(MAX_REQUEST_ID_LEN + 1)).unwrap();
        assert_eq!(usable_client_id(&long), None);
        let max = HeaderValue::from_str(&"x".repeat(MAX_REQUEST_ID_LEN)).unwrap();
        assert!(usable_client_id(&max).is_some());
        let non_ascii = HeaderValue::from_bytes("é".as_bytes()).unwrap();
        assert_eq!(usable_client_id(&non_ascii), None);
    }

    #[test]
    fn request_id_new_ids_are_prefixed_by_what_they_name() {
        assert!(new_request_id("/v1/completions").starts_with("cmpl-"));
        assert!(new_request_id("/v1/chat/completions").starts_with("chatcmpl-"));
        assert!(new_request_id("/admin/kv").starts_with("req-"));
        assert_ne!(new_request_id("/x"), new_request_id("/x"));
    }

    #[test]
    fn request_stats_keep_the_first_token_time() {
        let stats = RequestStats::new(Instant::now() - std::time::Duration::from_millis(50));
        assert_eq!(stats.ttft_ms(), None);
        stats.first_token();
        let first = stats.ttft_ms().unwrap();
        assert!(first >= 50.0, "{first}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        stats.first_token();
        assert_eq!(stats.ttft_ms(), Some(first));
        stats.add_usage(3, 4, 1);
        stats.add_usage(3, 5, 0);
        assert_eq!(stats.completion_tokens.load(Ordering::Relaxed), 9);
        assert_eq!(stats.prompt_tokens.load(Ordering::Relaxed), 6);
    }
}
