//! Per-client rate limit on the API routes: a token bucket per client (`limits.rate_limit_rps`
//! refilled continuously, `limits.rate_limit_burst` deep). A request takes one token; with none
//! left it gets 429 `code: rate_limited` and a `Retry-After` of the whole seconds until the next
//! token. The client is the API key's identity (`key-<8 hex>`) when API keys are enforced (the
//! auth guard has checked the key by then), else the peer's IP address: where keys are not
//! checked a client could pick a fresh key per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};

use super::auth::{bearer_token, classify, Guarded};
use super::error::ApiError;
use crate::actors::intake::api_key_client;

/// One client's bucket. Time comes in as an argument, so that tests drive the clock.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now.max(self.last);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether the bucket is full again at `now` (then forgetting it changes nothing).
    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate >= burst
    }
}

/// Buckets of every client seen recently.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    /// Identify clients by API key (keys are enforced) rather than by address.
    by_key: bool,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

/// Above this many buckets, full ones are forgotten (they hold no state worth keeping).
const PRUNE_ABOVE: usize = 10_000;

impl RateLimiter {
    /// `rps = 0` turns the limit off; `burst = 0` takes `ceil(rps)` (at least 1).
    pub fn new(rps: f64, burst: usize, by_key: bool) -> Self {
        let burst = if burst == 0 {
            rps.ceil().max(1.0)
        } else {
            burst as f64
        };
        Self {
            rate: rps,
            burst,
            by_key,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes a token from `client`'s bucket at `now`; `Err` is the wait until the next one.
    pub fn check(&self, client: &str, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| !b.is_full(rate, burst, now));
        }
        buckets
            .entry(client.to_string())
            .or_insert_with(|| TokenBucket::new(self.burst, now))
            .take(self.rate, self.burst, now)
    }

    /// Who `req` counts as.
    fn client_of(&self, req: &ServiceRequest) -> String {
        if self.by_key {
            if let Some(key) = bearer_token(req.headers()) {
                return api_key_client(key);
            }
        }
        req.peer_addr()
            .map_or_else(|| "unknown".into(), |a| a.ip().to_string())
    }
}

/// 429 for a client over its rate.
pub fn rate_limited(wait: Duration) -> ApiError {
    ApiError {
        status: 429,
        message: format!(
            "Rate limit reached for this client; retry in {:.1} s.",
            wait.as_secs_f64()
        ),
        kind: "rate_limit_error",
        param: None,
        code: Some("rate_limited"),
    }
}

/// Whole seconds to put in `Retry-After` (rounded up, at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// The middleware (inside the auth guard): the API routes pass while the client has tokens.
pub async fn limit(
    limiter: web::Data<RateLimiter>,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if !limiter.enabled() || classify(req.match_info().as_str()) != Guarded::Api {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let client = limiter.client_of(&req);
    match limiter.check(&client, Instant::now()) {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(wait) => {
            metrics::counter!("inferflux_requests_rejected_total", "status" => "429").increment(1);
            metrics::counter!("inferflux_rate_limited_total").increment(1);
            tracing::info!(client = %client, path = req.path(), retry_ms = wait.as_millis() as u64, "rate limited");
            let mut resp = rate_limited(wait).error_response();
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
            Ok(req.into_response(resp).map_into_right_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_token_bucket_with_an_injected_clock() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 2 per second, burst 3.
        let limiter = RateLimiter::new(2.0, 3, false);
        for _ in 0..3 {
            assert_eq!(limiter.check("a", at(0)), Ok(()), "the burst passes at once");
        }
        let wait = limiter.check("a", at(0)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500), "one token comes every 1/rate s");
        assert_eq!(retry_after_secs(wait), 1);
        // Another client has its own bucket.
        assert_eq!(limiter.check("b", at(0)), Ok(()));
        // 250 ms refill half a token: still refused, and the wait shrinks accordingly.
        let wait = limiter.check("a", at(250)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(250));
        assert_eq!(limiter.check("a", at(500)), Ok(()));
        assert!(limiter.check("a", at(500)).is_err());
        // A long pause refills to the burst, never beyond.
        for _ in 0..3 {
            assert_eq!(limiter.check("a", at(60_000)), Ok(()));
        }
        assert!(limiter.check("a", at(60_000)).is_err());
        // A clock that steps back takes nothing and gives nothing.
        assert!(limiter.check("a", at(59_000)).is_err());
    }

    #[test]
    fn limits_rate_limit_off_and_slow_rates() {
        let off = RateLimiter::new(0.0, 0, false);
        let now = Instant::now();
        assert!((0..10_000).all(|_| off.check("x", now).is_ok()));
        // 0.1 rps: burst defaults to 1, the next token is 10 s away.
        let slow = RateLimiter::new(0.1, 0, false);
        assert_eq!(slow.check("x", now), Ok(()));
        let wait = slow.check("x", now).unwrap_err();
        assert_eq!(retry_after_secs(wait), 10);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1, "never 0");
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2, "rounded up");
    }

    #[test]
    fn limits_idle_buckets_are_pruned() {
        let limiter = RateLimiter::new(1000.0, 1, false);
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            limiter.check(&i.to_string(), t0).unwrap();
        }
        // A second later every bucket is full again: the next check forgets them.
        limiter.check("new", t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }
}
