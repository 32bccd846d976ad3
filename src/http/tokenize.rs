//! vLLM's `POST /tokenize` and `POST /detokenize`: the served model's tokenizer over HTTP, so that
//! clients can count and inspect tokens exactly as the server will (chat messages included).

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::types::ChatMessageIn;
use super::{chat, parse_request, read_body, AppState};

/// `/tokenize` with a plain prompt, encoded as `/v1/completions` encodes a string prompt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizePrompt {
    model: Option<String>,
    prompt: String,
    /// Add the tokenizer's special tokens (BOS for Llama), as a completion prompt does.
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default)]
    return_token_strs: bool,
}

/// `/tokenize` with chat messages, rendered by the chat template as `/v1/chat/completions` does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeChat {
    model: Option<String>,
    messages: Vec<ChatMessageIn>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
    /// Off by default: the template already writes the special tokens it wants.
    #[serde(default)]
    add_special_tokens: bool,
    #[serde(default)]
    return_token_strs: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize)]
struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    /// The vocabulary entry of each id (`null` unless `return_token_strs`).
    token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    /// Signed, so that a negative id is answered "not in the vocabulary" naming `tokens`.
    tokens: Vec<i64>,
}

#[derive(Debug, Serialize)]
struct DetokenizeResponse {
    prompt: String,
}

pub async fn tokenize(state: web::Data<AppState>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    counted(handle_tokenize(&state, payload).await)
}

pub async fn detokenize(state: web::Data<AppState>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    counted(handle_detokenize(&state, payload).await)
}

/// Rejections count in `inferflux_requests_rejected_total`, as the completions endpoints' do.
fn counted(result: Result<HttpResponse, ApiError>) -> Result<HttpResponse, ApiError> {
    if let Err(e) = &result {
        metrics::counter!("inferflux_requests_rejected_total", "status" => e.status.to_string()).increment(1);
    }
    result
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.model_name => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

async fn handle_tokenize(state: &AppState, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    // Which form is decided by the `messages` key; each form is then parsed strictly, so that an
    // unknown field is named (an untagged enum would only say "did not match any variant").
    let fields: serde_json::Map<String, serde_json::Value> = parse_request(&body)?;
    let (text, add_special_tokens, return_token_strs, param) = if fields.contains_key("messages") {
        let req: TokenizeChat = parse_request(&body)?;
        check_model(state, req.model.as_deref())?;
        let text = chat::render_chat_text(state, &req.messages, req.add_generation_prompt)?;
        (text, req.add_special_tokens, req.return_token_strs, "messages")
    } else {
        let req: TokenizePrompt = parse_request(&body)?;
        check_model(state, req.model.as_deref())?;
        (
            req.prompt,
            req.add_special_tokens,
            req.return_token_strs,
            "prompt",
        )
    };
    let encoding = state
        .tokenizer
        .encode(text.as_str(), add_special_tokens)
        .map_err(|e| ApiError::invalid(Some(param.to_string()), format!("cannot tokenize: {e}")))?;
    let tokens = encoding.get_ids().to_vec();
    let token_strs = return_token_strs.then(|| encoding.get_tokens().to_vec());
    Ok(HttpResponse::Ok().json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.max_context,
        tokens,
        token_strs,
    }))
}

async fn handle_detokenize(state: &AppState, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let req: DetokenizeRequest = parse_request(&body)?;
    check_model(state, req.model.as_deref())?;
    let ids = req
        .tokens
        .iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| state.tokenizer.id_to_token(id).is_some())
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("tokens".into()),
                        format!(
                            "token id {id} is not in the vocabulary (0..{})",
                            state.tokenizer.get_vocab_size(true)
                        ),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    // Special tokens are kept, as vLLM's /detokenize keeps them.
    let prompt = state
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::invalid(Some("tokens".into()), format!("cannot decode: {e}")))?;
    Ok(HttpResponse::Ok().json(DetokenizeResponse { prompt }))
}
