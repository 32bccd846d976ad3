//! `GET /openapi.json`: the OpenAPI 3.1 description of every route. It is hand-written
//! (`openapi.json` next to this file) so that it says what clients may rely on, not what the
//! structs happen to derive; `tests/http_openapi.rs` checks it against the running server and
//! schemathesis fuzzes the server with it. It also answers requests that match no route: 405
//! with `Allow` when the document lists the path under other methods, else 404, both as OpenAI
//! error JSON instead of actix's empty 404.

use std::sync::OnceLock;

use actix_web::http::header::{HeaderValue, ALLOW};
use actix_web::{HttpRequest, HttpResponse, ResponseError};

use super::error::ApiError;

const SOURCE: &str = include_str!("openapi.json");

/// Where `openapi.json` has `info.version`, filled in from `Cargo.toml`.
const VERSION_PLACEHOLDER: &str = r#""version": "CARGO_PKG_VERSION""#;

/// The document as served: `openapi.json` with `info.version` set to the crate's version (a text
/// substitution, so that the served document keeps the file's order and layout).
pub fn text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        SOURCE.replacen(
            VERSION_PLACEHOLDER,
            &format!(r#""version": "{}""#, env!("CARGO_PKG_VERSION")),
            1,
        )
    })
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(text())
}

/// A documented path: its segments (`None` for a `{parameter}`) and its methods, upper case.
struct Route {
    segments: Vec<Option<String>>,
    methods: Vec<String>,
}

/// The documented routes; empty if the document did not parse (a unit test makes sure it does).
fn documented_routes() -> &'static [Route] {
    static ROUTES: OnceLock<Vec<Route>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let doc: serde_json::Value = serde_json::from_str(text()).unwrap_or_default();
        let Some(paths) = doc["paths"].as_object() else {
            tracing::error!("src/http/openapi.json does not parse; unknown routes get plain 404s");
            return Vec::new();
        };
        paths
            .iter()
            .map(|(path, item)| Route {
                segments: path
                    .split('/')
                    .map(|s| (!s.starts_with('{')).then(|| s.to_string()))
                    .collect(),
                methods: item
                    .as_object()
                    .map(|ops| ops.keys().map(|m| m.to_uppercase()).collect())
                    .unwrap_or_default(),
            })
            .collect()
    })
}

/// The methods the document gives for `path` (empty when it does not list the path).
fn documented_methods(path: &str) -> Vec<String> {
    let segments: Vec<&str> = path.split('/').collect();
    documented_routes()
        .iter()
        .filter(|r| {
            r.segments.len() == segments.len()
                && r.segments.iter().zip(&segments).all(|(want, got)| match want {
                    Some(fixed) => fixed == got,
                    None => !got.is_empty(),
                })
        })
        .flat_map(|r| r.methods.iter().cloned())
        .collect()
}

/// The app's default service: what a request that matched no route gets.
pub async fn no_route(req: HttpRequest) -> HttpResponse {
    let (method, path) = (req.method().as_str(), req.path());
    let allowed = documented_methods(path);
    if allowed.is_empty() || allowed.iter().any(|m| m == method) {
        return ApiError {
            status: 404,
            message: format!("There is no route {method} {path}; the API is described at GET /openapi.json."),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_route"),
        }
        .error_response();
    }
    let allow = allowed.join(", ");
    let mut resp = ApiError {
        status: 405,
        message: format!("{method} is not allowed on {path}; use {allow}."),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
    .error_response();
    if let Ok(value) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(ALLOW, value);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> serde_json::Value {
        serde_json::from_str(text()).expect("src/http/openapi.json parses")
    }

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v.as_str()) {
                        ("$ref", Some(target)) => out.push(target),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn openapi_document_parses_with_the_crate_version_and_resolvable_refs() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 50, "the document uses shared components");
        for target in all {
            let pointer = target.strip_prefix('#').expect("local refs only");
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {target}");
        }
    }

    #[test]
    fn openapi_request_bodies_refuse_unknown_fields_and_errors_share_one_schema() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "CompletionRequest",
            "ChatCompletionRequest",
            "ChatMessage",
            "StreamOptions",
            "TokenizePromptRequest",
            "TokenizeChatRequest",
            "DetokenizeRequest",
            "DrainRequest",
        ] {
            assert_eq!(
                schemas[name]["additionalProperties"], false,
                "{name}: the server uses deny_unknown_fields"
            );
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, response) in op["responses"].as_object().unwrap() {
                    if !status.starts_with('2') {
                        let target = response["$ref"].as_str().unwrap_or_default();
                        let shared = doc
                            .pointer(target.trim_start_matches('#'))
                            .map(|r| &r["content"]["application/json"]["schema"]["$ref"]);
                        assert_eq!(
                            shared.and_then(|s| s.as_str()),
                            Some("#/components/schemas/ErrorResponse"),
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn openapi_documented_methods_match_templates_segment_by_segment() {
        assert_eq!(documented_methods("/v1/completions"), ["POST"]);
        assert_eq!(documented_methods("/admin/requests/cmpl-1/cancel"), ["POST"]);
        assert!(documented_methods("/admin/requests//cancel").is_empty());
        assert!(documented_methods("/admin/requests/a/b/cancel").is_empty());
        assert!(documented_methods("/v1/completions/").is_empty());
        assert!(documented_methods("/nope").is_empty());
    }
}
