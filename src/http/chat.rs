//! `POST /v1/chat/completions`: the model's chat template renders the messages into prompt
//! tokens, then the request runs exactly as a completion and is answered in OpenAI's chat shapes.

use actix_web::{web, HttpRequest, HttpResponse};

use super::error::ApiError;
use super::request_context::RequestContext;
use super::respond::{respond, submit_choices, Answer, Shape};
use super::types::{ChatCompletionRequest, ChatContent, ChatMessageIn, CompletionRequest, Prompt};
use super::{parse_request, read_body, AppState};
use crate::model::ChatMessage;

pub async fn chat_completions(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let result = handle(RequestContext::of(&req), state, payload).await;
    if let Err(e) = &result {
        metrics::counter!("inferflux_requests_rejected_total", "status" => e.status.to_string()).increment(1);
    }
    result
}

async fn handle(
    ctx: RequestContext,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let chat: ChatCompletionRequest = parse_request(&body)?;
    let prompt_ids = render_prompt(&state, &chat)?;
    // OpenAI's default is "until the context is full"; intake still checks the sum.
    let max_tokens = chat.max_completion_tokens.or(chat.max_tokens).unwrap_or_else(|| {
        let room = state.max_context.saturating_sub(prompt_ids.len()).max(1);
        match state.max_output_tokens {
            0 => room as i64,
            cap => room.min(cap) as i64,
        }
    });
    if chat.top_logprobs.is_some() && !chat.logprobs {
        return Err(ApiError::invalid(
            Some("top_logprobs".into()),
            "top_logprobs needs logprobs: true",
        ));
    }
    let request = CompletionRequest {
        model: chat.model,
        prompt: Prompt::Tokens(prompt_ids),
        max_tokens: Some(max_tokens),
        temperature: chat.temperature,
        top_p: chat.top_p,
        top_k: chat.top_k,
        min_p: chat.min_p,
        presence_penalty: chat.presence_penalty,
        frequency_penalty: chat.frequency_penalty,
        repetition_penalty: chat.repetition_penalty,
        logit_bias: chat.logit_bias,
        stream_options: chat.stream_options,
        logprobs: chat.logprobs.then(|| chat.top_logprobs.unwrap_or(0)),
        echo: false,
        seed: chat.seed,
        stop: chat.stop,
        stop_token_ids: chat.stop_token_ids,
        ignore_eos: chat.ignore_eos,
        min_tokens: chat.min_tokens,
        include_stop_str_in_output: chat.include_stop_str_in_output,
        stream: chat.stream,
        n: chat.n,
        user: chat.user,
        priority: chat.priority,
    };
    let answer = Answer {
        shape: Shape::Chat,
        model: state.model_name.clone(),
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: request.logprobs.is_some(),
        echo: None,
        stats: ctx.stats.clone(),
        idle_timeout: state.stream_idle_timeout,
    };
    let submitted = submit_choices(&state, request, &ctx).await?;
    respond(submitted, answer).await
}

/// The prompt token ids of the conversation, as transformers' `apply_chat_template(tokenize=True)`
/// makes them: the rendered text encoded without adding special tokens (the template has them).
fn render_prompt(state: &AppState, chat: &ChatCompletionRequest) -> Result<Vec<u32>, ApiError> {
    let text = render_chat_text(state, &chat.messages, chat.add_generation_prompt.unwrap_or(true))?;
    let encoding = state.tokenizer.encode(text.as_str(), false).map_err(|e| {
        ApiError::invalid(
            Some("messages".into()),
            format!("cannot tokenize the rendered chat: {e}"),
        )
    })?;
    Ok(encoding.get_ids().to_vec())
}

/// The conversation rendered by the model's chat template (shared with `/tokenize`, so that its
/// ids are the ones a chat request uses).
pub(crate) fn render_chat_text(
    state: &AppState,
    messages: &[ChatMessageIn],
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let template = state.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            Some("messages".into()),
            "this model has no chat template (chat_template.jinja or tokenizer_config.json); use /v1/completions",
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages".into()),
            "messages must not be empty",
        ));
    }
    let messages = messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(ChatContent::Text(t)) => t.clone(),
                Some(ChatContent::Parts(parts)) => parts
                    .iter()
                    .map(|p| match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) if p.other.is_empty() => Ok(t.as_str()),
                        ("text", None) => Err(ApiError::invalid(
                            Some("messages".into()),
                            "a content part of type `text` needs a `text` string",
                        )),
                        ("text", Some(_)) => Err(ApiError::invalid(
                            Some("messages".into()),
                            format!(
                                "unknown field `{}` in a content part (only `type` and `text`)",
                                p.other.keys().next().map_or("", String::as_str)
                            ),
                        )),
                        (kind, _) => Err(ApiError::invalid(
                            Some("messages".into()),
                            format!("content parts of type `{kind}` are not supported (only `text`)"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join("\n"),
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    template
        .render(&messages, add_generation_prompt)
        .map_err(|e| ApiError::invalid(Some("messages".into()), e.to_string()))
}
