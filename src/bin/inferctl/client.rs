//! The HTTP side of `inferctl`: one bearer token per role, and every answer sorted into the
//! error kinds that pick the exit code.

use reqwest::{RequestBuilder, Response};
use serde_json::Value;

use crate::error::{chain, CliError, Result};

/// A server base URL and the `Authorization: Bearer` token sent with every request.
pub struct Api {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

impl Api {
    pub fn new(base: &str, bearer: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            bearer: bearer.filter(|b| !b.is_empty()),
        }
    }

    /// The server's base URL, as given (no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Result<Response> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), &url).await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.post(&url);
        if let Some(body) = body {
            req = req.json(body);
        }
        self.send(req, &url).await
    }

    /// POSTs `body` and reads the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        json(self.post(path, Some(body)).await?).await
    }

    /// GETs `path` and reads the JSON answer.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        json(self.get(path).await?).await
    }

    async fn send(&self, req: RequestBuilder, url: &str) -> Result<Response> {
        let req = match &self.bearer {
            Some(token) => req.bearer_auth(token),
            None => req,
        };
        let resp = req.send().await.map_err(|e| {
            if e.is_builder() {
                CliError::Local(anyhow::anyhow!("bad URL {url}: {}", chain(&e)))
            } else {
                CliError::Connect {
                    url: url.to_string(),
                    reason: chain(&e),
                }
            }
        })?;
        check(resp).await
    }
}

/// Passes a 2xx answer through; otherwise the server's `error.message` as a refusal (4xx) or a
/// server error (anything else).
async fn check(resp: Response) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    let message = match serde_json::from_str::<Value>(&body) {
        Ok(v) if v["error"]["message"].is_string() => {
            let mut m = v["error"]["message"].as_str().unwrap_or_default().to_string();
            if let Some(param) = v["error"]["param"].as_str() {
                m.push_str(&format!(" (param: {param})"));
            }
            m
        }
        _ if body.trim().is_empty() => status.canonical_reason().unwrap_or("no message").to_string(),
        _ => body.trim().to_string(),
    };
    Err(if status.is_client_error() {
        CliError::Refused {
            status: status.as_u16(),
            message,
        }
    } else {
        CliError::Server {
            status: Some(status.as_u16()),
            message,
        }
    })
}

/// The body of a 2xx answer as JSON; a body that is not JSON is the server's fault.
pub async fn json(resp: Response) -> Result<Value> {
    let text = resp
        .text()
        .await
        .map_err(|e| CliError::server(format!("reading the answer: {}", chain(&e))))?;
    serde_json::from_str(&text).map_err(|e| CliError::server(format!("the answer is not JSON: {e}")))
}
