//! `StopSequenceDetector`: turns each sequence's sampled tokens into text deltas for its client,
//! and ends the sequence on a stop string, an EOS token or `max_tokens`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::scheduler::SequenceFinished;
use crate::kv::SeqId;
use crate::stop::{FinishReason, StopDetector, StopParams};

/// A token as a client sees it in `logprobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    pub id: u32,
    /// The token decoded on its own (lossy where it is part of a UTF-8 character).
    pub text: String,
    /// The token's own bytes (a byte-fallback token is its one byte).
    pub bytes: Vec<u8>,
}

/// One generated token's log probability and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(TokenText, f32)>,
}

/// What a request's stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Final text, in order, with the logprobs (when asked for) of the tokens sampled since the
    /// previous event. Every generated token's logprobs arrive exactly once, in order.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The last event of a successful request.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: usize,
        /// Logprobs of the tokens not yet reported by a `Text` event.
        logprobs: Vec<TokenLogprob>,
    },
    /// The request failed after it was accepted; the stream ends.
    Error(String),
}

struct Tracked {
    request_id: String,
    detector: StopDetector,
    events: UnboundedSender<StreamEvent>,
    prompt_tokens: usize,
    cached_tokens: usize,
    arrival: Instant,
    first_token: Option<Instant>,
}

pub struct StopSequenceDetector {
    tokenizer: Arc<Tokenizer>,
    scheduler: Option<Recipient<SequenceFinished>>,
    streams: HashMap<SeqId, Tracked>,
}

impl StopSequenceDetector {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            scheduler: None,
            streams: HashMap::new(),
        }
    }

    fn end(&mut self, seq: SeqId) {
        self.streams.remove(&seq);
        if let Some(s) = &self.scheduler {
            s.do_send(SequenceFinished { seq });
        }
    }

    fn on_token(&mut self, seq: SeqId, token: u32) {
        let Some(t) = self.streams.get_mut(&seq) else {
            return;
        };
        let now = Instant::now();
        if t.first_token.is_none() {
            t.first_token = Some(now);
            metrics::histogram!("inferflux_time_to_first_token_seconds")
                .record(now.duration_since(t.arrival).as_secs_f64());
        }
        metrics::counter!("inferflux_generation_tokens_total").increment(1);
        let delta = match t.detector.push(token) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(request_id = %t.request_id, error = %e, "detokenization failed");
                let _ = t.events.send(StreamEvent::Error(e.to_string()));
                self.end(seq);
                return;
            }
        };
        let mut alive = true;
        if !delta.text.is_empty() {
            alive = t
                .events
                .send(StreamEvent::Text {
                    text: delta.text,
                    logprobs: Vec::new(),
                })
                .is_ok();
        }
        if let Some(reason) = delta.finished {
            let completion_tokens = t.detector.generated_tokens();
            tracing::info!(
                request_id = %t.request_id,
                finish_reason = reason.as_openai(),
                prompt_tokens = t.prompt_tokens,
                cached_tokens = t.cached_tokens,
                completion_tokens,
                e2e_ms = now.duration_since(t.arrival).as_millis() as u64,
                "request finished"
            );
            metrics::counter!("inferflux_request_success_total", "finished_reason" => reason.as_openai())
                .increment(1);
            metrics::histogram!("inferflux_e2e_request_latency_seconds")
                .record(now.duration_since(t.arrival).as_secs_f64());
            let _ = t.events.send(StreamEvent::Finished {
                reason,
                prompt_tokens: t.prompt_tokens,
                completion_tokens,
                cached_tokens: t.cached_tokens,
                logprobs: Vec::new(),
            });
            self.end(seq);
        } else if !alive || t.events.is_closed() {
            tracing::info!(request_id = %t.request_id, "client gone; cancelling");
            self.end(seq);
        }
    }
}

impl Actor for StopSequenceDetector {
    type Context = Context<Self>;
}

/// Tells the detector where to report finished sequences (wired once at start).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectScheduler(pub Recipient<SequenceFinished>);

impl Handler<ConnectScheduler> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: ConnectScheduler, _: &mut Context<Self>) {
        self.scheduler = Some(msg.0);
    }
}

/// Start following a new sequence; sent by intake before the scheduler hears of it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track {
    pub seq: SeqId,
    pub request_id: String,
    pub params: StopParams,
    pub events: UnboundedSender<StreamEvent>,
    pub prompt_tokens: usize,
    pub arrival: Instant,
}

impl Handler<Track> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: Track, _: &mut Context<Self>) {
        let detector = StopDetector::new(self.tokenizer.clone(), msg.params);
        self.streams.insert(
            msg.seq,
            Tracked {
                request_id: msg.request_id,
                detector,
                events: msg.events,
                prompt_tokens: msg.prompt_tokens,
                cached_tokens: 0,
                arrival: msg.arrival,
                first_token: None,
            },
        );
    }
}

/// The tokens sampled in one step, in plan order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StepTokens {
    pub tokens: Vec<(SeqId, u32)>,
}

impl Handler<StepTokens> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: StepTokens, _: &mut Context<Self>) {
        for (seq, token) in msg.tokens {
            self.on_token(seq, token);
        }
    }
}

/// Forget a sequence the scheduler dropped (cancelled).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Untrack {
    pub seq: SeqId,
}

impl Handler<Untrack> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: Untrack, _: &mut Context<Self>) {
        self.streams.remove(&msg.seq);
    }
}

/// The sequence failed in the executor: its client gets an error event.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FailSequence {
    pub seq: SeqId,
    pub message: String,
}

impl Handler<FailSequence> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: FailSequence, _: &mut Context<Self>) {
        if let Some(t) = self.streams.remove(&msg.seq) {
            metrics::counter!("inferflux_request_failure_total").increment(1);
            let _ = t.events.send(StreamEvent::Error(msg.message));
        }
    }
}

/// A sequence was admitted; `cached_tokens` of its prompt came from the prefix cache. Sent by
/// the scheduler before the sequence's first tokens, so the final usage can report it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PrefixCached {
    pub seq: SeqId,
    pub cached_tokens: usize,
}

impl Handler<PrefixCached> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: PrefixCached, _: &mut Context<Self>) {
        if let Some(t) = self.streams.get_mut(&msg.seq) {
            t.cached_tokens = msg.cached_tokens.min(t.prompt_tokens);
        }
    }
}

/// An operator cancelled the sequence (the scheduler already dropped it): its client gets the
/// text so far and a last event with `finish_reason: "abort"`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abort {
    pub seq: SeqId,
}

impl Handler<Abort> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: Abort, _: &mut Context<Self>) {
        if let Some(t) = self.streams.remove(&msg.seq) {
            let completion_tokens = t.detector.generated_tokens();
            tracing::info!(request_id = %t.request_id, completion_tokens, "request aborted");
            let _ = t.events.send(StreamEvent::Finished {
                reason: FinishReason::Abort,
                prompt_tokens: t.prompt_tokens,
                completion_tokens,
                cached_tokens: t.cached_tokens,
                logprobs: Vec::new(),
            });
        }
    }
}
