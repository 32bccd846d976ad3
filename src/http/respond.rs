//! Turns the event streams of an accepted request into OpenAI's answers: one JSON body, or SSE
//! chunks ending in `data: [DONE]`.
//!
//! A request for `n` choices runs as `n` sequences (choice `i` with its own seed); their events
//! are merged by choice index. Dropping the answer (a client that hangs up) drops every
//! sequence's cancel guard, so all of them stop at once.

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use super::error::ApiError;
use super::request_context::{RequestContext, RequestStats};
use super::types::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, PromptTokensDetails, Usage,
};
use super::{stop_reason, unix_now, AppState};
use crate::actors::intake::{SubmitCompletion, Submitted};
use crate::actors::stop_detector::{StreamEvent, TokenLogprob};
use crate::stop::FinishReason;

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: i64 = 16;

/// Which OpenAI object a request's events are shaped into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `text_completion` with `choices[].text`.
    Completion,
    /// `chat.completion` / `chat.completion.chunk` with `message` / `delta`.
    Chat,
}

/// How to shape the answer, beyond the events themselves.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub shape: Shape,
    pub model: String,
    /// `stream_options.include_usage`: a last chunk with `usage` before `[DONE]`.
    pub include_usage: bool,
    /// The request asked for logprobs.
    pub logprobs: bool,
    /// Completions with `echo`: the prompt text every choice starts with.
    pub echo: Option<String>,
    /// Usage and time to first token, for the request's access log line.
    pub stats: Arc<RequestStats>,
    /// `server.stream_idle_timeout_seconds`: cancel a stream its client stopped reading.
    pub idle_timeout: std::time::Duration,
}

/// Submits the `n` choices of `request` to intake, in choice order. Choice 0 keeps the
/// request's seed, so `n` does not change the first choice; choice `i` gets a seed derived from
/// it. All choices share the HTTP request's id (logs, `/admin/requests/{id}/cancel`). If a
/// later choice is refused, the earlier ones are cancelled as their guards drop.
pub(crate) async fn submit_choices(
    state: &AppState,
    mut request: CompletionRequest,
    ctx: &RequestContext,
) -> Result<Vec<Submitted>, ApiError> {
    let n = request.n.take().unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid(
            Some("n".into()),
            format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    let mut submitted = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut choice = request.clone();
        choice.seed = request.seed.map(|s| choice_seed(s, i));
        let sub = state
            .intake
            .send(SubmitCompletion {
                request: choice,
                key_client: ctx.key_client.clone(),
                request_id: Some(ctx.request_id.clone()),
                span: tracing::Span::current(),
                first_choice: i == 0,
            })
            .await
            .map_err(|e| ApiError::internal(format!("intake unreachable: {e}")))??;
        submitted.push(sub);
    }
    Ok(submitted)
}

/// The seed of choice `i`: the request's own for choice 0, a well-mixed neighbour otherwise.
fn choice_seed(seed: i64, i: i64) -> i64 {
    if i == 0 {
        seed
    } else {
        seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) as i64
    }
}

/// The SSE stream or the whole JSON answer of accepted choices.
pub(crate) async fn respond(subs: Vec<Submitted>, answer: Answer) -> Result<HttpResponse, ApiError> {
    let request_id = subs
        .first()
        .map(|s| s.request_id.clone())
        .ok_or_else(|| ApiError::internal("no choice was submitted"))?;
    if subs[0].stream {
        let cancels: Vec<_> = subs.iter().filter_map(|s| s.guard.cancel_handle()).collect();
        let idle_timeout = answer.idle_timeout;
        let span = tracing::Span::current();
        let on_idle = move |unread: std::time::Duration| {
            tracing::info!(
                parent: &span,
                unread_ms = unread.as_millis() as u64,
                "stream cancelled: the client stopped reading"
            );
            metrics::counter!("inferflux_streams_idle_cancelled_total").increment(1);
            for cancel in cancels {
                cancel.cancel();
            }
        };
        let body = super::stream_idle::watch(
            sse_stream(subs, answer, request_id.clone()),
            idle_timeout,
            on_idle,
        );
        Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .streaming(body))
    } else {
        let body = collect(subs, &answer, &request_id).await?;
        Ok(HttpResponse::Ok().json(body))
    }
}

/// What one choice's events add up to.
struct ChoiceResult {
    text: String,
    reason: FinishReason,
    logprobs: Vec<TokenLogprob>,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

async fn collect_choice(mut sub: Submitted, stats: &RequestStats) -> Result<ChoiceResult, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = sub.events.recv().await {
        match event {
            StreamEvent::Text { text: t, logprobs: l } => {
                stats.first_token();
                text.push_str(&t);
                logprobs.extend(l);
            }
            StreamEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                logprobs: l,
            } => {
                sub.guard.disarm();
                logprobs.extend(l);
                return Ok(ChoiceResult {
                    text,
                    reason,
                    logprobs,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                });
            }
            StreamEvent::Error(message) => {
                sub.guard.disarm();
                return Err(ApiError::internal(message));
            }
        }
    }
    Err(ApiError::internal("request ended without a result"))
}

/// Waits for every choice; the first failure fails the request (and cancels the rest).
async fn collect(subs: Vec<Submitted>, answer: &Answer, id: &str) -> Result<serde_json::Value, ApiError> {
    let results =
        futures::future::try_join_all(subs.into_iter().map(|s| collect_choice(s, &answer.stats))).await?;
    let mut usage = UsageSum::default();
    for r in &results {
        usage.add(r.prompt_tokens, r.completion_tokens, r.cached_tokens);
        answer
            .stats
            .add_usage(r.prompt_tokens, r.completion_tokens, r.cached_tokens);
    }
    let created = unix_now();
    let body = match answer.shape {
        Shape::Completion => {
            let echo = answer.echo.clone().unwrap_or_default();
            let choices = results
                .into_iter()
                .enumerate()
                .map(|(i, r)| CompletionChoice {
                    index: i as u32,
                    logprobs: answer
                        .logprobs
                        .then(|| completion_logprobs(&r.logprobs, echo.chars().count())),
                    text: format!("{echo}{}", r.text),
                    finish_reason: Some(r.reason.as_openai().to_string()),
                    stop_reason: stop_reason(&r.reason),
                })
                .collect();
            serde_json::to_value(CompletionResponse {
                id: id.to_string(),
                object: "text_completion".into(),
                created,
                model: answer.model.clone(),
                choices,
                usage: Some(usage.usage()),
            })
        }
        Shape::Chat => {
            let choices = results
                .into_iter()
                .enumerate()
                .map(|(i, r)| ChatChoice {
                    index: i as u32,
                    logprobs: answer.logprobs.then(|| chat_logprobs(&r.logprobs)),
                    message: ChatMessageOut {
                        role: "assistant".into(),
                        content: r.text,
                    },
                    finish_reason: Some(r.reason.as_openai().to_string()),
                    stop_reason: stop_reason(&r.reason),
                })
                .collect();
            serde_json::to_value(ChatCompletionResponse {
                id: id.to_string(),
                object: "chat.completion".into(),
                created,
                model: answer.model.clone(),
                choices,
                usage: usage.usage(),
            })
        }
    };
    body.map_err(|e| ApiError::internal(format!("cannot encode the answer: {e}")))
}

/// Token counts over all choices: the prompt counts once, as OpenAI counts it.
#[derive(Default)]
struct UsageSum {
    prompt_tokens: Option<usize>,
    cached_tokens: usize,
    completion_tokens: usize,
}

impl UsageSum {
    fn add(&mut self, prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) {
        if self.prompt_tokens.is_none() {
            self.prompt_tokens = Some(prompt_tokens);
            self.cached_tokens = cached_tokens;
        }
        self.completion_tokens += completion_tokens;
    }

    fn usage(&self) -> Usage {
        let prompt_tokens = self.prompt_tokens.unwrap_or(0);
        Usage {
            prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: prompt_tokens + self.completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: self.cached_tokens,
            }),
        }
    }
}

/// One choice's events, tagged with its index; the last is `Finished` or `Error`.
fn choice_events(index: usize, sub: Submitted) -> BoxStream<'static, (usize, StreamEvent)> {
    futures::stream::unfold(Some(sub), move |state| async move {
        let mut sub = state?;
        match sub.events.recv().await {
            Some(event @ StreamEvent::Text { .. }) => Some(((index, event), Some(sub))),
            Some(last) => {
                sub.guard.disarm();
                Some(((index, last), None))
            }
            None => {
                sub.guard.disarm();
                let lost = StreamEvent::Error("request ended without a result".into());
                Some(((index, lost), None))
            }
        }
    })
    .boxed()
}

/// The chunk encoder of one streamed answer: what every chunk shares, and per-choice state.
struct SseWriter {
    answer: Answer,
    id: String,
    created: u64,
    /// Characters of text each choice has streamed (completions' `text_offset`).
    offsets: Vec<usize>,
    unfinished: usize,
    usage: UsageSum,
}

impl SseWriter {
    /// The chunks that open every choice: chat's assistant role, or the echoed prompt.
    fn opening(&mut self) -> Vec<Bytes> {
        (0..self.offsets.len())
            .filter_map(|i| match self.answer.shape {
                Shape::Chat => Some(self.chunk(
                    i,
                    ChatDelta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    },
                    &[],
                    None,
                )),
                Shape::Completion => {
                    let echo = self.answer.echo.clone()?;
                    self.offsets[i] = echo.chars().count();
                    Some(sse_event(&self.completion_chunk(i, echo, None, None)))
                }
            })
            .collect()
    }

    /// The bytes for one event, and whether the stream ends after them.
    fn on_event(&mut self, index: usize, event: StreamEvent) -> (Bytes, bool) {
        match event {
            StreamEvent::Text { text, logprobs } => {
                self.answer.stats.first_token();
                let delta = ChatDelta {
                    role: None,
                    content: Some(text),
                };
                (self.chunk(index, delta, &logprobs, None), false)
            }
            StreamEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                logprobs,
            } => {
                self.usage.add(prompt_tokens, completion_tokens, cached_tokens);
                self.answer
                    .stats
                    .add_usage(prompt_tokens, completion_tokens, cached_tokens);
                let mut out = vec![self.chunk(index, ChatDelta::default(), &logprobs, Some(&reason))];
                self.unfinished -= 1;
                let done = self.unfinished == 0;
                if done {
                    if self.answer.include_usage {
                        out.push(self.usage_chunk());
                    }
                    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                }
                (Bytes::from(out.concat()), done)
            }
            StreamEvent::Error(message) => {
                let err = ApiError::internal(message);
                let bytes = [sse_event(&err.body()), Bytes::from_static(b"data: [DONE]\n\n")].concat();
                (Bytes::from(bytes), true)
            }
        }
    }

    /// A text delta or a choice's last chunk (`finish` set), in the answer's shape.
    fn chunk(
        &mut self,
        index: usize,
        delta: ChatDelta,
        logprobs: &[TokenLogprob],
        finish: Option<&FinishReason>,
    ) -> Bytes {
        // A chunk without tokens (chat's opening, a last chunk with nothing left) has `null`.
        let asked = self.answer.logprobs && !logprobs.is_empty();
        match self.answer.shape {
            Shape::Chat => sse_event(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.answer.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: index as u32,
                    delta,
                    logprobs: asked.then(|| chat_logprobs(logprobs)),
                    finish_reason: finish.map(|f| f.as_openai().to_string()),
                    stop_reason: finish.and_then(stop_reason),
                }],
                usage: None,
            }),
            Shape::Completion => {
                let text = delta.content.unwrap_or_default();
                let lp = asked.then(|| completion_logprobs(logprobs, self.offsets[index]));
                self.offsets[index] += text.chars().count();
                sse_event(&self.completion_chunk(index, text, lp, finish))
            }
        }
    }

    fn completion_chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&FinishReason>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.answer.model.clone(),
            choices: vec![CompletionChoice {
                index: index as u32,
                text,
                logprobs,
                finish_reason: finish.map(|f| f.as_openai().to_string()),
                stop_reason: finish.and_then(stop_reason),
            }],
            usage: None,
        }
    }

    /// `stream_options.include_usage`: empty `choices` and the whole request's usage.
    fn usage_chunk(&self) -> Bytes {
        let usage = Some(self.usage.usage());
        match self.answer.shape {
            Shape::Chat => sse_event(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.answer.model.clone(),
                choices: Vec::new(),
                usage,
            }),
            Shape::Completion => sse_event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.answer.model.clone(),
                choices: Vec::new(),
                usage,
            }),
        }
    }
}

fn sse_event(value: &impl serde::Serialize) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("data: {json}\n\n"))
}

/// `data: {chunk}` per text delta of any choice, each choice's finish reason on its last chunk,
/// the usage chunk when asked, then `data: [DONE]`. An error ends the stream after an error
/// event; the remaining choices are cancelled as the stream drops.
fn sse_stream(
    subs: Vec<Submitted>,
    answer: Answer,
    id: String,
) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> {
    let mut writer = SseWriter {
        answer,
        id,
        created: unix_now(),
        offsets: vec![0; subs.len()],
        unfinished: subs.len(),
        usage: UsageSum::default(),
    };
    let opening = writer.opening();
    let merged =
        futures::stream::select_all(subs.into_iter().enumerate().map(|(i, sub)| choice_events(i, sub)));
    let events = futures::stream::unfold(Some((merged, writer)), |state| async move {
        let (mut merged, mut writer) = state?;
        let (index, event) = merged.next().await?;
        let (bytes, done) = writer.on_event(index, event);
        Some((bytes, (!done).then_some((merged, writer))))
    });
    futures::stream::iter(opening)
        .chain(events)
        .map(Ok::<_, actix_web::Error>)
}

/// Completions' legacy `logprobs`; offsets count characters from `offset`.
fn completion_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        out.tokens.push(t.token.text.clone());
        out.token_logprobs.push(t.logprob);
        let mut top = serde_json::Map::new();
        for (alt, lp) in t.top.iter().chain(std::iter::once(&(t.token.clone(), t.logprob))) {
            top.entry(alt.text.clone())
                .or_insert_with(|| serde_json::json!(lp));
        }
        out.top_logprobs.push(top);
        out.text_offset.push(offset);
        offset += t.token.text.chars().count();
    }
    out
}

/// Chat's `logprobs.content`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.text.clone(),
                logprob: t.logprob,
                bytes: Some(t.token.bytes.clone()),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(alt, lp)| ChatTopLogprob {
                        token: alt.text.clone(),
                        logprob: *lp,
                        bytes: Some(alt.bytes.clone()),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The prompt text `echo` repeats: the string as sent, or token ids decoded.
pub(crate) fn echo_text(
    state: &web::Data<AppState>,
    request: &CompletionRequest,
) -> Result<String, ApiError> {
    use super::types::Prompt;
    match &request.prompt {
        Prompt::Text(t) => Ok(t.clone()),
        Prompt::Tokens(ids) => state
            .tokenizer
            .decode(ids, false)
            .map_err(|e| ApiError::invalid(Some("prompt".into()), format!("cannot decode prompt: {e}"))),
        Prompt::Batch(_) => Ok(String::new()),
    }
}
