//! `RequestIntake`: validates a completion request into a [`ValidRequest`], tokenizes it, gives
//! it a `request_id`, and owns its output stream. Only valid, tokenized requests reach the
//! scheduler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::dp_router::DpRouter;
use super::scheduler::{Cancel, Enqueue, EnqueueError};
use super::stop_detector::{StopSequenceDetector, StreamEvent, Track, Untrack};
use crate::http::error::ApiError;
use crate::http::types::{CompletionRequest, Prompt, StopParam};
use crate::kv::SeqId;
use crate::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use crate::scheduler::Sequence;
use crate::stop::StopParams;

/// OpenAI's default `max_tokens` for completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// Limits a request is checked against.
#[derive(Debug, Clone)]
pub struct IntakeLimits {
    pub model_name: String,
    /// Prompt plus `max_tokens` may not exceed this.
    pub max_context: usize,
    /// Tokens the whole KV pool can hold; a longer sequence could never run.
    pub kv_capacity_tokens: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Most `stop` strings per request (`limits.max_stop_strings`).
    pub max_stop_strings: usize,
    /// Longest `stop` string in bytes (`limits.max_stop_bytes`).
    pub max_stop_bytes: usize,
    /// Most prompt tokens (`limits.max_prompt_tokens`); 0: only the context bounds them.
    pub max_prompt_tokens: usize,
    /// Most `max_tokens` (`limits.max_output_tokens`); 0: only the context bounds them.
    pub max_output_tokens: usize,
}

/// A request that passed validation and tokenization.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    pub stream: bool,
    /// Fair-share identity: `key-<hash>` of the API key, else `user`, else "anonymous".
    pub client: String,
    pub priority: i64,
}

/// Parses and checks `req`; every error names the offending field.
pub fn validate(
    req: CompletionRequest,
    tokenizer: &Tokenizer,
    limits: &IntakeLimits,
) -> Result<ValidRequest, ApiError> {
    if let Some(model) = &req.model {
        if model != &limits.model_name {
            return Err(ApiError::model_not_found(model));
        }
    }
    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::invalid(Some("n".into()), "only n = 1 is supported"));
        }
    }
    let prompt_ids = match req.prompt {
        Prompt::Text(text) => tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| ApiError::invalid(Some("prompt".into()), format!("cannot tokenize prompt: {e}")))?
            .get_ids()
            .to_vec(),
        Prompt::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= limits.vocab_size) {
                return Err(ApiError::invalid(
                    Some("prompt".into()),
                    format!(
                        "token id {bad} is outside the vocabulary (size {})",
                        limits.vocab_size
                    ),
                ));
            }
            ids
        }
        Prompt::Batch(_) => {
            return Err(ApiError::invalid(
                Some("prompt".into()),
                "prompt must be a string or a list of token ids (integers from 0); batches of prompts are not supported",
            ))
        }
    };
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(Some("prompt".into()), "prompt is empty"));
    }
    if limits.max_prompt_tokens > 0 && prompt_ids.len() > limits.max_prompt_tokens {
        return Err(ApiError::invalid(
            Some("prompt".into()),
            format!(
                "the prompt has {} tokens; this server accepts at most {} (limits.max_prompt_tokens)",
                prompt_ids.len(),
                limits.max_prompt_tokens
            ),
        ));
    }
    let max_tokens = match req.max_tokens {
        None if limits.max_output_tokens > 0 => DEFAULT_MAX_TOKENS.min(limits.max_output_tokens),
        None => DEFAULT_MAX_TOKENS,
        Some(m) if limits.max_output_tokens > 0 && m > limits.max_output_tokens as i64 => {
            return Err(ApiError::invalid(
                Some("max_tokens".into()),
                format!(
                    "max_tokens is {m}; this server allows at most {} (limits.max_output_tokens)",
                    limits.max_output_tokens
                ),
            ))
        }
        Some(m) if m >= 1 => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                Some("max_tokens".into()),
                format!("max_tokens must be at least 1, got {m}"),
            ))
        }
    };
    let limit = limits.max_context.min(limits.kv_capacity_tokens);
    if prompt_ids.len().saturating_add(max_tokens) > limit {
        return Err(ApiError::invalid(
            Some("max_tokens".into()),
            format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the prompt, {max_tokens} for the completion).",
                prompt_ids.len() + max_tokens,
                prompt_ids.len()
            ),
        ));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            Some("temperature".into()),
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p".into()),
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k >= 1 => usize::try_from(k).unwrap_or(usize::MAX).min(limits.vocab_size),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k".into()),
                format!("top_k must be -1 (off) or at least 1, got {k}"),
            ))
        }
    };
    let min_p = in_range("min_p", req.min_p, 0.0, 0.0..=1.0)?;
    let presence_penalty = in_range("presence_penalty", req.presence_penalty, 0.0, -2.0..=2.0)?;
    let frequency_penalty = in_range("frequency_penalty", req.frequency_penalty, 0.0, -2.0..=2.0)?;
    let repetition_penalty = in_range("repetition_penalty", req.repetition_penalty, 1.0, 0.0..=2.0)?;
    if repetition_penalty <= 0.0 {
        return Err(ApiError::invalid(
            Some("repetition_penalty".into()),
            format!("repetition_penalty must be in (0, 2], got {repetition_penalty}"),
        ));
    }
    let logit_bias = validate_logit_bias(req.logit_bias.unwrap_or_default(), limits)?;
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("logprobs".into()),
                format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
    };
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            Some("stream_options".into()),
            "stream_options is only allowed when stream is true",
        ));
    }
    let stop = validate_stop(req.stop, limits)?;
    let stop_token_ids = validate_stop_token_ids(req.stop_token_ids.unwrap_or_default(), limits)?;
    let min_tokens = match req.min_tokens {
        None => 0,
        Some(m) if (0..=max_tokens as i64).contains(&m) => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                Some("min_tokens".into()),
                format!("min_tokens must be between 0 and max_tokens ({max_tokens}), got {m}"),
            ))
        }
    };
    // As vLLM: EOS is banned before min_tokens even with ignore_eos.
    let banned: Vec<u32> = limits
        .eos_token_ids
        .iter()
        .chain(&stop_token_ids)
        .copied()
        .collect();
    let seed = req.seed.map(|s| s as u64).unwrap_or_else(rand::random);
    Ok(ValidRequest {
        prompt_ids,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
            min_tokens,
            min_tokens_banned: banned.into(),
            top_k,
            min_p: min_p as f32,
            presence_penalty: presence_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            repetition_penalty: repetition_penalty as f32,
            logit_bias,
            logprobs,
        },
        stop: StopParams {
            stop,
            stop_token_ids,
            eos_token_ids: limits.eos_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            min_tokens,
            max_tokens,
            include_stop_str_in_output: req.include_stop_str_in_output,
        },
        stream: req.stream,
        client: req.user.unwrap_or_else(|| "anonymous".into()),
        priority: req.priority.unwrap_or(0),
    })
}

/// The fair-share identity of an API key: `key-` and the first 8 hex digits of its SHA-256, so
/// that logs, metrics and `/admin/queue` never show the key itself.
pub fn api_key_client(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

/// `value` (or `default` when absent) if it is a finite number within `range`.
fn in_range(
    param: &str,
    value: Option<f64>,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f64, ApiError> {
    let v = value.unwrap_or(default);
    if v.is_finite() && range.contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            Some(param.into()),
            format!(
                "{param} must be between {} and {}, got {v}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// `logit_bias`: token-id strings inside the vocabulary, biases in [-100, 100].
fn validate_logit_bias(
    bias: std::collections::HashMap<String, f64>,
    limits: &IntakeLimits,
) -> Result<Arc<[(u32, f32)]>, ApiError> {
    let bad = |message: String| ApiError::invalid(Some("logit_bias".into()), message);
    let mut out = bias
        .into_iter()
        .map(|(key, b)| {
            let id = Some(key.as_str())
                .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|k| k.parse::<u32>().ok())
                .filter(|&id| (id as usize) < limits.vocab_size)
                .ok_or_else(|| {
                    bad(format!(
                        "logit_bias keys must be token ids below {}, got `{key}`",
                        limits.vocab_size
                    ))
                })?;
            if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
                return Err(bad(format!("logit_bias values must be in [-100, 100], got {b}")));
            }
            Ok((id, b as f32))
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|p| p.0);
    Ok(out.into())
}

/// `stop`: one string or a list, each nonempty, within the configured count and length.
fn validate_stop(stop: Option<StopParam>, limits: &IntakeLimits) -> Result<Vec<String>, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    let bad = |message: String| Err(ApiError::invalid(Some("stop".into()), message));
    if stop.len() > limits.max_stop_strings {
        return bad(format!(
            "at most {} stop strings are allowed, got {}",
            limits.max_stop_strings,
            stop.len()
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > limits.max_stop_bytes)
    {
        return bad(format!(
            "stop strings must be 1 to {} bytes long, got one of {} bytes",
            limits.max_stop_bytes,
            s.len()
        ));
    }
    Ok(stop)
}

/// `stop_token_ids`: every id inside the vocabulary.
fn validate_stop_token_ids(ids: Vec<i64>, limits: &IntakeLimits) -> Result<Vec<u32>, ApiError> {
    ids.into_iter()
        .map(|id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < limits.vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("stop_token_ids".into()),
                        format!(
                            "token id {id} is outside the vocabulary (size {})",
                            limits.vocab_size
                        ),
                    )
                })
        })
        .collect()
}

/// Cancels the request when dropped before [`CancelOnDrop::disarm`]: a client that goes away
/// drops its response stream, and this frees its sequence at once.
pub struct CancelOnDrop {
    seq: SeqId,
    scheduler: Option<Addr<DpRouter>>,
}

impl CancelOnDrop {
    pub fn disarm(&mut self) {
        self.scheduler = None;
    }

    /// A way to cancel the sequence from elsewhere (the idle-stream watchdog), while armed.
    pub fn cancel_handle(&self) -> Option<CancelHandle> {
        self.scheduler.clone().map(|scheduler| CancelHandle {
            seq: self.seq,
            scheduler,
        })
    }
}

/// Cancels one sequence on demand; cancelling one that already ended does nothing.
pub struct CancelHandle {
    seq: SeqId,
    scheduler: Addr<DpRouter>,
}

impl CancelHandle {
    pub fn cancel(self) {
        self.scheduler.do_send(Cancel { seq: self.seq });
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.scheduler.take() {
            s.do_send(Cancel { seq: self.seq });
        }
    }
}

/// An accepted request: its id, its events, and the guard that cancels it if dropped.
pub struct Submitted {
    pub request_id: String,
    pub prompt_tokens: usize,
    pub stream: bool,
    pub events: UnboundedReceiver<StreamEvent>,
    pub guard: CancelOnDrop,
}

pub struct RequestIntake {
    tokenizer: Arc<Tokenizer>,
    limits: IntakeLimits,
    scheduler: Addr<DpRouter>,
    detector: Addr<StopSequenceDetector>,
    next_seq: Arc<AtomicU64>,
}

impl RequestIntake {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        limits: IntakeLimits,
        scheduler: Addr<DpRouter>,
        detector: Addr<StopSequenceDetector>,
    ) -> Self {
        Self {
            tokenizer,
            limits,
            scheduler,
            detector,
            next_seq: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl Actor for RequestIntake {
    type Context = Context<Self>;
}

/// A completion request as the HTTP layer parsed it.
#[derive(Message)]
#[rtype(result = "Result<Submitted, ApiError>")]
pub struct SubmitCompletion {
    pub request: CompletionRequest,
    /// The client identity of the request's API key ([`api_key_client`]), when it sent one.
    pub key_client: Option<String>,
    /// The id to use instead of a new one: the HTTP request's id, shared by the choices of an
    /// `n > 1` request.
    pub request_id: Option<String>,
    /// The HTTP request's `request{request_id, client, model}` span; intake records the client
    /// it settles on, and every actor logs about the request under it.
    pub span: tracing::Span,
    /// Choice 0 of its request: records the client in the span (once, so text logs show it once).
    pub first_choice: bool,
}

impl Handler<SubmitCompletion> for RequestIntake {
    type Result = ResponseFuture<Result<Submitted, ApiError>>;

    fn handle(&mut self, msg: SubmitCompletion, _: &mut Context<Self>) -> Self::Result {
        let arrival = Instant::now();
        let record_client = msg.key_client.is_none() && msg.first_choice;
        let valid = validate(msg.request, &self.tokenizer, &self.limits).map(|mut v| {
            if let Some(client) = msg.key_client {
                v.client = client;
            }
            v
        });
        let seq = SeqId(self.next_seq.fetch_add(1, Ordering::Relaxed));
        let request_id = msg
            .request_id
            .unwrap_or_else(|| format!("cmpl-{:016x}{:08x}", rand::random::<u64>(), seq.0));
        let (scheduler, detector) = (self.scheduler.clone(), self.detector.clone());
        Box::pin(async move {
            let valid = valid?;
            let (tx, rx) = unbounded_channel();
            let prompt_tokens = valid.prompt_ids.len();
            let span = msg.span;
            // With an API key the HTTP layer already recorded it (it is the client); the later
            // choices of an `n > 1` request share the first one's.
            if record_client {
                span.record("client", valid.client.as_str());
            }
            tracing::info!(
                parent: &span,
                seq = %seq,
                prompt_tokens, max_tokens = valid.max_tokens, stream = valid.stream,
                priority = valid.priority, "request accepted"
            );
            detector
                .send(Track {
                    seq,
                    span: span.clone(),
                    params: valid.stop.clone(),
                    events: tx,
                    prompt_tokens,
                    arrival,
                })
                .await
                .map_err(|e| ApiError::internal(format!("stop detector unreachable: {e}")))?;
            let sequence = Sequence::new(seq, valid.prompt_ids, valid.max_tokens, valid.sampling)
                .with_client(Arc::from(valid.client.as_str()), valid.priority);
            let enqueue = Enqueue {
                seq: sequence,
                request_id: request_id.clone(),
                span: span.clone(),
            };
            match scheduler.send(enqueue).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    detector.do_send(Untrack { seq });
                    tracing::info!(parent: &span, reason = %e, "request refused");
                    return Err(match e {
                        EnqueueError::QueueFull => ApiError::queue_full(),
                        EnqueueError::Draining => ApiError::draining(),
                    });
                }
                Err(e) => return Err(ApiError::internal(format!("scheduler unreachable: {e}"))),
            }
            metrics::counter!("inferflux_requests_total").increment(1);
            Ok(Submitted {
                request_id,
                prompt_tokens,
                stream: valid.stream,
                events: rx,
                guard: CancelOnDrop {
                    seq,
                    scheduler: Some(scheduler),
                },
            })
        })
    }
}
