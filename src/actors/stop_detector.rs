//! `StopSequenceDetector`: turns each sequence's sampled tokens into text deltas for its client,
//! and ends the sequence on a stop string, an EOS token or `max_tokens`.
//!
//! Logprobs (when asked for) are queued per token and ride on the next event: a `Text`, or the
//! `Finished` (also on an abort) for what no text carried, so each generated token's logprobs
//! reach the client exactly once, in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::executor::SampledToken;
use super::scheduler::SequenceFinished;
use crate::kv::SeqId;
use crate::sampling::SampledLogprobs;
use crate::stop::token_text::token_text;
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

impl TokenText {
    pub fn new(tokenizer: &Tokenizer, id: u32) -> Self {
        let (text, bytes) = token_text(tokenizer, id);
        Self { id, text, bytes }
    }
}

impl TokenLogprob {
    /// The sampler's ids with their text.
    pub fn new(tokenizer: &Tokenizer, token: u32, sampled: SampledLogprobs) -> Self {
        Self {
            token: TokenText::new(tokenizer, token),
            logprob: sampled.logprob,
            top: sampled
                .top
                .into_iter()
                .map(|(id, l)| (TokenText::new(tokenizer, id), l))
                .collect(),
        }
    }
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
    /// The request's `request{request_id, client, model}` span: every log line about it.
    span: tracing::Span,
    detector: StopDetector,
    events: UnboundedSender<StreamEvent>,
    prompt_tokens: usize,
    cached_tokens: usize,
    arrival: Instant,
    /// When the scheduler first admitted it (queue time ends, prefill starts).
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    /// The previous token's arrival, for the inter-token latency.
    last_token: Option<Instant>,
    /// Logprobs of tokens no event has carried yet.
    logprobs: Vec<TokenLogprob>,
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

    /// Forgets `seq` and tells the scheduler, which frees its pages (`client_gone`: as a cancel).
    fn end(&mut self, seq: SeqId, client_gone: bool) {
        self.streams.remove(&seq);
        if let Some(s) = &self.scheduler {
            s.do_send(SequenceFinished { seq, client_gone });
        }
    }

    fn on_token(&mut self, seq: SeqId, token: u32, logprobs: Option<SampledLogprobs>) {
        let Some(t) = self.streams.get_mut(&seq) else {
            return;
        };
        if let Some(l) = logprobs {
            t.logprobs.push(TokenLogprob::new(&self.tokenizer, token, l));
        }
        let now = Instant::now();
        if t.first_token.is_none() {
            t.first_token = Some(now);
            tracing::info!(
                parent: &t.span,
                ttft_ms = now.duration_since(t.arrival).as_secs_f64() * 1000.0,
                cached_tokens = t.cached_tokens,
                "first token"
            );
            metrics::histogram!("inferflux_time_to_first_token_seconds")
                .record(now.duration_since(t.arrival).as_secs_f64());
            let scheduled = t.scheduled.unwrap_or(t.arrival);
            metrics::histogram!("inferflux_request_prefill_time_seconds")
                .record(now.duration_since(scheduled).as_secs_f64());
        }
        if let Some(last) = t.last_token {
            metrics::histogram!("inferflux_inter_token_latency_seconds")
                .record(now.duration_since(last).as_secs_f64());
        }
        t.last_token = Some(now);
        metrics::counter!("inferflux_generation_tokens_total").increment(1);
        let delta = match t.detector.push(token) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(parent: &t.span, error = %e, "detokenization failed");
                let _ = t.events.send(StreamEvent::Error(e.to_string()));
                self.end(seq, false);
                return;
            }
        };
        let mut alive = true;
        if !delta.text.is_empty() {
            alive = t
                .events
                .send(StreamEvent::Text {
                    text: delta.text,
                    logprobs: std::mem::take(&mut t.logprobs),
                })
                .is_ok();
        }
        if let Some(reason) = delta.finished {
            let completion_tokens = t.detector.generated_tokens();
            tracing::info!(
                parent: &t.span,
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
            let first = t.first_token.unwrap_or(now);
            metrics::histogram!("inferflux_request_decode_time_seconds")
                .record(now.duration_since(first).as_secs_f64());
            metrics::histogram!("inferflux_request_prompt_tokens").record(t.prompt_tokens as f64);
            metrics::histogram!("inferflux_request_generation_tokens").record(completion_tokens as f64);
            let _ = t.events.send(StreamEvent::Finished {
                reason,
                prompt_tokens: t.prompt_tokens,
                completion_tokens,
                cached_tokens: t.cached_tokens,
                logprobs: std::mem::take(&mut t.logprobs),
            });
            self.end(seq, false);
        } else if !alive || t.events.is_closed() {
            tracing::info!(parent: &t.span, "client gone; cancelling");
            self.end(seq, true);
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
    /// The request's span, parent of every log line about it.
    pub span: tracing::Span,
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
                span: msg.span,
                detector,
                events: msg.events,
                prompt_tokens: msg.prompt_tokens,
                cached_tokens: 0,
                arrival: msg.arrival,
                scheduled: None,
                first_token: None,
                last_token: None,
                logprobs: Vec::new(),
            },
        );
    }
}

/// The tokens sampled in one step, in plan order, with their logprobs when asked for.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StepTokens {
    pub tokens: Vec<SampledToken>,
}

impl Handler<StepTokens> for StopSequenceDetector {
    type Result = ();
    fn handle(&mut self, msg: StepTokens, _: &mut Context<Self>) {
        for s in msg.tokens {
            self.on_token(s.seq, s.token, s.logprobs);
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
/// the scheduler before the sequence's first tokens, so the final usage can report it; its
/// first arrival also ends the request's queue time.
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
            // A preempted sequence is admitted again; queue time and prompt tokens count once.
            if t.scheduled.is_none() {
                let now = Instant::now();
                t.scheduled = Some(now);
                metrics::histogram!("inferflux_request_queue_time_seconds")
                    .record(now.duration_since(t.arrival).as_secs_f64());
                metrics::counter!("inferflux_prompt_tokens_total").increment(t.prompt_tokens as u64);
            }
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
            tracing::info!(parent: &t.span, completion_tokens, "request aborted");
            let _ = t.events.send(StreamEvent::Finished {
                reason: FinishReason::Abort,
                prompt_tokens: t.prompt_tokens,
                completion_tokens,
                cached_tokens: t.cached_tokens,
                logprobs: t.logprobs,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn tokenizer() -> Arc<Tokenizer> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama/tokenizer.json"
        );
        Arc::new(Tokenizer::from_file(path).unwrap())
    }

    fn track(
        det: &Addr<StopSequenceDetector>,
        seq: u64,
        params: StopParams,
    ) -> UnboundedReceiver<StreamEvent> {
        let (tx, rx) = unbounded_channel();
        det.do_send(Track {
            seq: SeqId(seq),
            span: tracing::Span::none(),
            params,
            events: tx,
            prompt_tokens: 3,
            arrival: Instant::now(),
        });
        rx
    }

    /// The sampler's logprobs of the `i`-th token: recognisable values.
    fn fake(i: usize, id: u32) -> SampledLogprobs {
        SampledLogprobs {
            logprob: -(i as f32),
            top: vec![(id, -(i as f32)), (2, -9.5)],
        }
    }

    fn send(det: &Addr<StopSequenceDetector>, seq: u64, ids: &[u32], with_logprobs: bool) {
        det.do_send(StepTokens {
            tokens: ids
                .iter()
                .enumerate()
                .map(|(i, &token)| SampledToken {
                    seq: SeqId(seq),
                    token,
                    logprobs: with_logprobs.then(|| fake(i, token)),
                })
                .collect(),
        });
    }

    /// Events up to and including the last one; `(text, logprob counts per event, all logprobs)`.
    async fn drain(
        rx: &mut UnboundedReceiver<StreamEvent>,
    ) -> (String, Vec<usize>, Vec<TokenLogprob>, usize) {
        let (mut text, mut counts, mut all) = (String::new(), Vec::new(), Vec::new());
        loop {
            match rx.recv().await.expect("a last event") {
                StreamEvent::Text { text: t, logprobs } => {
                    text.push_str(&t);
                    counts.push(logprobs.len());
                    all.extend(logprobs);
                }
                StreamEvent::Finished {
                    completion_tokens,
                    logprobs,
                    ..
                } => {
                    counts.push(logprobs.len());
                    all.extend(logprobs);
                    return (text, counts, all, completion_tokens);
                }
                StreamEvent::Error(e) => panic!("{e}"),
            }
        }
    }

    #[actix_web::test]
    async fn sampling_logprobs_reach_the_client_once_each_in_order() {
        let tok = tokenizer();
        let det = StopSequenceDetector::new(tok.clone()).start();
        // " naïve über": "aÃ" + "¯" and "Ã" + "¼" are characters split over two tokens.
        let ids = tok.encode(" naïve über", false).unwrap().get_ids().to_vec();
        let params = StopParams {
            max_tokens: ids.len(),
            eos_token_ids: vec![2],
            ..Default::default()
        };
        let mut rx = track(&det, 1, params.clone());
        send(&det, 1, &ids, true);
        let (text, counts, all, completion_tokens) = drain(&mut rx).await;
        assert_eq!(text, " naïve über");
        assert_eq!(all.len(), completion_tokens, "every generated token once");
        assert_eq!(completion_tokens, ids.len());
        assert!(
            counts.contains(&2),
            "a held character carries both tokens: {counts:?}"
        );
        for (i, (lp, &id)) in all.iter().zip(&ids).enumerate() {
            assert_eq!(lp.token, TokenText::new(&tok, id), "token {i}");
            assert_eq!(lp.logprob, -(i as f32), "in order");
            assert_eq!(lp.top[0], (lp.token.clone(), -(i as f32)));
            assert_eq!(lp.top[1].0.text, "</s>");
        }
        assert_eq!(all[1].token.text, "a\u{FFFD}");
        assert_eq!(all[1].token.bytes, vec![b'a', 0xC3]);

        // Not asked for: no logprobs anywhere.
        let mut rx = track(&det, 2, params.clone());
        send(&det, 2, &ids, false);
        let (text, counts, _, _) = drain(&mut rx).await;
        assert_eq!(text, " naïve über");
        assert!(counts.iter().all(|&c| c == 0));

        // A stop string holds the text; an abort hands over the logprobs nothing carried.
        let stop = StopParams {
            stop: vec![" naïve!".into()],
            max_tokens: 20,
            ..params
        };
        let mut rx = track(&det, 3, stop);
        send(&det, 3, &ids[..4], true);
        det.send(Abort { seq: SeqId(3) }).await.unwrap();
        let (text, counts, all, completion_tokens) = drain(&mut rx).await;
        assert_eq!(text, "");
        assert_eq!(counts, vec![4]);
        assert_eq!(completion_tokens, 4);
        assert_eq!(all.iter().map(|l| l.token.id).collect::<Vec<_>>(), ids[..4]);
    }

    /// Stands in for the scheduler: hands on what the detector reports.
    struct Finished(tokio::sync::mpsc::UnboundedSender<(u64, bool)>);

    impl Actor for Finished {
        type Context = Context<Self>;
    }

    impl Handler<SequenceFinished> for Finished {
        type Result = ();
        fn handle(&mut self, msg: SequenceFinished, _: &mut Context<Self>) {
            let _ = self.0.send((msg.seq.0, msg.client_gone));
        }
    }

    /// A sequence that ends (here at `max_tokens`) is reported as finished; one whose client hung
    /// up is reported as gone, so that the scheduler counts a cancel even when the detector sees
    /// the closed stream before the request's drop guard's `Cancel` arrives.
    #[actix_web::test]
    async fn stop_sequences_report_a_hang_up_apart_from_a_finish() {
        let det = StopSequenceDetector::new(tokenizer()).start();
        let (tx, mut reported) = unbounded_channel();
        det.do_send(ConnectScheduler(Finished(tx).start().recipient()));
        let params = StopParams {
            max_tokens: 2,
            ..Default::default()
        };
        let mut finishes = track(&det, 1, params.clone());
        let hangs_up = track(&det, 2, params);
        drop(hangs_up);
        send(&det, 2, &[300], false);
        assert_eq!(reported.recv().await, Some((2, true)), "the hang-up");
        send(&det, 1, &[300, 301], false);
        drain(&mut finishes).await;
        assert_eq!(reported.recv().await, Some((1, false)), "the finish");
    }
}
