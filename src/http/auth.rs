//! Bearer-token checks in front of every route, applied once as an App middleware: API keys for
//! the API, the admin token for `/admin/*`, either of them for `/metrics` when it is protected.
//! Secrets are kept only as SHA-256 digests and compared in constant time; no key, token or
//! digest is ever logged or echoed.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::config::AuthConfig;

type KeyDigest = [u8; 32];

fn digest(secret: &str) -> KeyDigest {
    Sha256::digest(secret.as_bytes()).into()
}

/// Configured secrets, as digests computed once at startup.
#[derive(Clone, Default)]
pub struct KeySet {
    digests: Vec<KeyDigest>,
}

impl KeySet {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            digests: secrets.into_iter().map(digest).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the secrets. Digests have one length, so the time taken
    /// says nothing about a secret's length or common prefix; every digest is compared (no exit
    /// on a match), so it does not say which secret matched either.
    pub fn contains(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&presented);
        }
        found.into()
    }
}

/// Which rule a path falls under. Anything not listed needs an API key, so that a route added
/// later is closed until someone opens it on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// Probes and the API description: `/health`, `/ready`, `/version`, `/openapi.json`.
    Open,
    /// `/admin` and below: the admin token.
    Admin,
    /// `/metrics`: an API key or the admin token, when `auth.protect_metrics` is set.
    Metrics,
    /// Everything else (`/v1/*`, `/tokenize`, `/detokenize`): an API key.
    Api,
}

/// Classifies the path the router matches on (percent-decoded, so `/%61dmin/kv` is `/admin/kv`).
pub fn classify(path: &str) -> Guarded {
    match path {
        "/health" | "/ready" | "/version" | "/openapi.json" => Guarded::Open,
        "/metrics" => Guarded::Metrics,
        p if p == "/admin" || p.starts_with("/admin/") => Guarded::Admin,
        _ => Guarded::Api,
    }
}

/// The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive);
/// `None` when the header is missing, not `Bearer`, or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A refusal: the error the client gets and the `route` label it is counted under.
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub route: &'static str,
}

/// The auth rules of one server.
pub struct Auth {
    api_keys: KeySet,
    admin: KeySet,
    protect_metrics: bool,
}

/// Shows what is configured, never the digests.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api_keys", &self.api_keys.digests.len())
            .field("admin_token", &!self.admin.is_empty())
            .field("protect_metrics", &self.protect_metrics)
            .finish()
    }
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Self {
        let admin = if config.admin_token.is_empty() {
            KeySet::default()
        } else {
            KeySet::new([config.admin_token.as_str()])
        };
        Self {
            api_keys: KeySet::new(config.api_keys.iter().map(String::as_str)),
            admin,
            protect_metrics: config.protect_metrics,
        }
    }

    /// Whether a request to `path` with these headers may pass.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let token = bearer_token(headers);
        let refuse = |error, route| Err(Refusal { error, route });
        match classify(path) {
            Guarded::Open => Ok(()),
            Guarded::Api if self.api_keys.is_empty() => Ok(()),
            Guarded::Api => match token {
                None => refuse(ApiError::missing_api_key(), "v1"),
                Some(t) if self.api_keys.contains(t) => Ok(()),
                Some(_) => refuse(ApiError::invalid_api_key(), "v1"),
            },
            Guarded::Admin if self.admin.is_empty() => Ok(()),
            Guarded::Admin => match token {
                None => refuse(ApiError::missing_admin_token(), "admin"),
                Some(t) if self.admin.contains(t) => Ok(()),
                Some(_) => refuse(ApiError::invalid_admin_token(), "admin"),
            },
            Guarded::Metrics if !self.protect_metrics => Ok(()),
            Guarded::Metrics => match token {
                None => refuse(ApiError::missing_api_key(), "metrics"),
                Some(t) => {
                    // Both sets are checked whatever the first says.
                    let (api, admin) = (self.api_keys.contains(t), self.admin.contains(t));
                    if api | admin {
                        Ok(())
                    } else {
                        refuse(ApiError::invalid_api_key(), "metrics")
                    }
                }
            },
        }
    }
}

/// The middleware (`App::wrap(from_fn(guard))`): passes the request on, or answers the refusal
/// as OpenAI error JSON, counts it in `inferflux_auth_failures_total{route}` and logs the path
/// and the peer.
pub async fn guard(
    auth: web::Data<Auth>,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    match auth.check(req.match_info().as_str(), req.headers()) {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(Refusal { error, route }) => {
            metrics::counter!("inferflux_auth_failures_total", "route" => route).increment(1);
            tracing::info!(
                path = req.path(),
                peer = %req.peer_addr().map_or_else(|| "unknown".into(), |a| a.to_string()),
                status = error.status,
                code = error.code,
                "request refused by auth"
            );
            Ok(req.into_response(error.error_response()).map_into_right_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    #[test]
    fn auth_key_set_compares_whole_keys() {
        let set = KeySet::new(["sk-first", "sk-second-longer"]);
        assert!(set.contains("sk-first"));
        assert!(
            set.contains("sk-second-longer"),
            "every key is checked, not only the first"
        );
        for wrong in [
            "sk-firsT",
            "sk-firs",
            "sk-first-",
            "",
            "sk-second",
            "sk-first sk-second-longer",
        ] {
            assert!(!set.contains(wrong), "{wrong:?}");
        }
        assert!(!KeySet::default().contains(""), "an empty set holds nothing");
    }

    #[test]
    fn auth_bearer_header_parsing() {
        let parse = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer_token(&h).map(str::to_string)
        };
        assert_eq!(parse("Bearer sk-1").as_deref(), Some("sk-1"));
        assert_eq!(parse("bearer   sk-1 ").as_deref(), Some("sk-1"));
        assert_eq!(parse("BEARER sk-1").as_deref(), Some("sk-1"));
        for bad in ["Bearer", "Bearer   ", "Basic c2s6", "sk-1", "Bearersk-1"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn auth_paths_fall_under_their_rules() {
        for (path, rule) in [
            ("/health", Guarded::Open),
            ("/ready", Guarded::Open),
            ("/version", Guarded::Open),
            ("/openapi.json", Guarded::Open),
            ("/metrics", Guarded::Metrics),
            ("/admin", Guarded::Admin),
            ("/admin/kv", Guarded::Admin),
            ("/v1/models", Guarded::Api),
            ("/tokenize", Guarded::Api),
            ("/detokenize", Guarded::Api),
            ("/administrator", Guarded::Api),
            ("/health/x", Guarded::Api),
            ("/", Guarded::Api),
        ] {
            assert_eq!(classify(path), rule, "{path}");
        }
    }
}
