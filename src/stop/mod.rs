//! Incremental detokenization and stop conditions for one sequence.
//!
//! Text is released only when it is final: a UTF-8 character still forming over several tokens is
//! held ([`decode`]), and so is any tail that could still grow into a stop string ([`matcher`]).
//! Concatenating every released delta gives exactly the full decode of the generated tokens
//! (`skip_special_tokens`), cut at the earliest stop string.
//!
//! Order of checks for each token: within the first `min_tokens` tokens nothing stops the
//! sequence and their text can never begin a stop string. After that, a token in
//! `stop_token_ids` or an EOS id (unless `ignore_eos`) ends it; its own text is left out unless
//! `include_stop_str_in_output`, and a stop string found in the text before it still wins. The
//! token that reaches `max_tokens` ends it with `Length`, after the held text was flushed (a
//! stop string completed by the flush wins).

pub mod decode;
pub mod matcher;
pub mod token_text;

use std::sync::Arc;

use tokenizers::Tokenizer;

pub use decode::{DetokenizeError, IncrementalDecoder};
pub use matcher::{Scan, StopMatcher};

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string matched (reported as vLLM's `stop_reason`).
    StopString(String),
    /// A token id from the request's `stop_token_ids` was sampled (reported as `stop_reason`).
    StopToken(u32),
    /// The model's EOS token was sampled; vLLM reports `stop_reason: null` for it.
    Eos(u32),
    /// `max_tokens` were generated.
    Length,
    /// An operator cancelled the request (`POST /admin/requests/{id}/cancel`); vLLM reports
    /// aborted requests as `finish_reason: "abort"`.
    Abort,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::StopString(_) | FinishReason::StopToken(_) | FinishReason::Eos(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Stop settings of one request, validated by intake.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopParams {
    pub stop: Vec<String>,
    /// Ids that end the sequence and are reported as `stop_reason` (vLLM's `stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// The model's EOS ids (`generation_config.json`, one or several).
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// No stop of any kind during the first `min_tokens` tokens.
    pub min_tokens: usize,
    pub max_tokens: usize,
    /// Keep the matched stop string (or the stop token's text) at the end of the output.
    pub include_stop_str_in_output: bool,
}

/// What one token changed.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// Text that is now final (may be empty).
    pub text: String,
    pub finished: Option<FinishReason>,
}

pub struct StopDetector {
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
    params: StopParams,
    generated: usize,
    finished: bool,
}

impl StopDetector {
    pub fn new(tokenizer: Arc<Tokenizer>, params: StopParams) -> Self {
        Self {
            decoder: IncrementalDecoder::new(tokenizer),
            matcher: StopMatcher::new(params.stop.clone(), params.include_stop_str_in_output),
            params,
            generated: 0,
            finished: false,
        }
    }

    pub fn generated_tokens(&self) -> usize {
        self.generated
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The token-level stop this token triggers, if any.
    fn token_stop(&self, token: u32) -> Option<FinishReason> {
        if self.generated <= self.params.min_tokens {
            None
        } else if self.params.stop_token_ids.contains(&token) {
            Some(FinishReason::StopToken(token))
        } else if !self.params.ignore_eos && self.params.eos_token_ids.contains(&token) {
            Some(FinishReason::Eos(token))
        } else {
            None
        }
    }

    fn end(&mut self, text: String, reason: FinishReason) -> Delta {
        self.finished = true;
        Delta {
            text,
            finished: Some(reason),
        }
    }

    /// Feeds one sampled token.
    pub fn push(&mut self, token: u32) -> Result<Delta, DetokenizeError> {
        if self.finished {
            return Ok(Delta::default());
        }
        self.generated += 1;
        if let Some(reason) = self.token_stop(token) {
            let mut text = String::new();
            if self.params.include_stop_str_in_output {
                text.extend(self.decoder.step(token)?);
            }
            text.push_str(&self.decoder.flush()?);
            return Ok(match self.matcher.push(&text, false, true) {
                Scan::Stop { text, stop } => self.end(text, FinishReason::StopString(stop)),
                Scan::Release(text) => self.end(text, reason),
            });
        }
        let protected = self.generated <= self.params.min_tokens;
        let at_limit = self.generated >= self.params.max_tokens;
        let new_text = self.decoder.step(token)?.unwrap_or_default();
        let mut out = match self.matcher.push(&new_text, protected, false) {
            Scan::Stop { text, stop } => return Ok(self.end(text, FinishReason::StopString(stop))),
            Scan::Release(text) => text,
        };
        if !at_limit {
            return Ok(Delta {
                text: out,
                finished: None,
            });
        }
        let held = self.decoder.flush()?;
        Ok(match self.matcher.push(&held, false, true) {
            Scan::Stop { text, stop } => {
                out.push_str(&text);
                self.end(out, FinishReason::StopString(stop))
            }
            Scan::Release(text) => {
                out.push_str(&text);
                self.end(out, FinishReason::Length)
            }
        })
    }
}

#[cfg(test)]
mod tests;
