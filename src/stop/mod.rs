//! Incremental detokenization and stop conditions for one sequence.
//!
//! Text is released only when it is final: a UTF-8 character still forming over several tokens is
//! held (the decode ends in U+FFFD), and so is any tail that could still grow into a stop string.
//! Concatenating every released delta gives exactly the full decode of the generated tokens, cut
//! before the first stop string.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string matched (reported as vLLM's `stop_reason`).
    StopString(String),
    /// An end-of-sequence token id was sampled.
    StopToken(u32),
    /// `max_tokens` were generated.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::StopString(_) | FinishReason::StopToken(_) => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Stop settings of one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopParams {
    pub stop: Vec<String>,
    pub eos_token_ids: Vec<u32>,
    pub max_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("detokenization failed: {0}")]
pub struct DetokenizeError(String);

/// What one token changed.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// Text that is now final (may be empty).
    pub text: String,
    pub finished: Option<FinishReason>,
}

pub struct StopDetector {
    tokenizer: Arc<Tokenizer>,
    params: StopParams,
    ids: Vec<u32>,
    /// Decode window, as TGI and vLLM keep it: `ids[prefix_offset..read_offset]` is text already
    /// decoded; decoding from `prefix_offset` keeps word-boundary effects of the decoder stable.
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded text not yet released because it may start a stop string.
    pending: String,
    finished: bool,
}

impl StopDetector {
    pub fn new(tokenizer: Arc<Tokenizer>, params: StopParams) -> Self {
        Self {
            tokenizer,
            params,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            pending: String::new(),
            finished: false,
        }
    }

    pub fn generated_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn decode(&self, ids: &[u32]) -> Result<String, DetokenizeError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| DetokenizeError(e.to_string()))
    }

    /// Newly final text from the decode window, or `None` while a character is incomplete.
    fn decode_step(&mut self, flush: bool) -> Result<Option<String>, DetokenizeError> {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || !full.starts_with(&prefix) {
            return Ok(None);
        }
        if full.ends_with('\u{FFFD}') && !flush {
            return Ok(None);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(full[prefix.len()..].to_string()))
    }

    /// Feeds one sampled token.
    pub fn push(&mut self, token: u32) -> Result<Delta, DetokenizeError> {
        if self.finished {
            return Ok(Delta::default());
        }
        self.ids.push(token);
        let token_stop = self
            .params
            .eos_token_ids
            .contains(&token)
            .then_some(FinishReason::StopToken(token));
        let at_limit = self.ids.len() >= self.params.max_tokens;
        let ending = token_stop.is_some() || at_limit;
        if let Some(text) = self.decode_step(ending)? {
            self.pending.push_str(&text);
        }
        if let Some((cut, stop)) = self.find_stop() {
            self.pending.truncate(cut);
            self.finished = true;
            return Ok(Delta {
                text: std::mem::take(&mut self.pending),
                finished: Some(FinishReason::StopString(stop)),
            });
        }
        if ending {
            self.finished = true;
            let reason = token_stop.unwrap_or(FinishReason::Length);
            return Ok(Delta {
                text: std::mem::take(&mut self.pending),
                finished: Some(reason),
            });
        }
        let keep = self.longest_stop_prefix_suffix();
        let release = self.pending.len() - keep;
        let text: String = self.pending.drain(..release).collect();
        Ok(Delta { text, finished: None })
    }

    /// Earliest stop string in the pending text: (byte offset, the stop).
    fn find_stop(&self) -> Option<(usize, String)> {
        self.params
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s.clone())))
            .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())))
    }

    /// Length of the longest pending suffix that is a proper prefix of some stop string, at a
    /// char boundary: that much must wait for more text.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut keep = 0;
        for stop in &self.params.stop {
            for (len, _) in stop.char_indices().skip(1) {
                if len > keep && self.pending.ends_with(&stop[..len]) {
                    keep = len;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Arc<Tokenizer> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama/tokenizer.json"
        );
        Arc::new(Tokenizer::from_file(path).unwrap())
    }

    fn run(text: &str, stop: &[&str], max_tokens: usize) -> (Vec<String>, Option<FinishReason>) {
        let tok = tokenizer();
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let params = StopParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            eos_token_ids: vec![2],
            max_tokens,
        };
        let mut det = StopDetector::new(tok, params);
        let mut deltas = Vec::new();
        for id in ids {
            let d = det.push(id).unwrap();
            deltas.push(d.text);
            if d.finished.is_some() {
                return (deltas, d.finished);
            }
        }
        (deltas, None)
    }

    #[test]
    fn stop_sequences_deltas_concatenate_to_full_decode() {
        let text = "Café ☕ au lait 🍰 and crème brûlée";
        let (deltas, finish) = run(text, &[], 1000);
        assert_eq!(deltas.concat(), text);
        assert_eq!(finish, None);
        assert!(
            deltas.iter().all(|d| !d.contains('\u{FFFD}')),
            "no half characters: {deltas:?}"
        );
    }

    #[test]
    fn stop_sequences_cut_before_the_stop_and_never_leak_it() {
        let (deltas, finish) = run("The quick brown fox jumps over the lazy dog", &["fox j"], 1000);
        assert_eq!(deltas.concat(), "The quick brown ");
        assert_eq!(finish, Some(FinishReason::StopString("fox j".into())));
        let (deltas, _) = run("The quick brown fox jumps", &["brown fox", "quick"], 1000);
        assert_eq!(deltas.concat(), "The ");
    }

    #[test]
    fn stop_sequences_partial_match_is_released_when_it_fails() {
        let (deltas, finish) = run("Hello, my name is Ada", &["name was"], 1000);
        assert_eq!(
            deltas.concat(),
            "Hello, my name is Ada",
            "a held tail comes out once it cannot match"
        );
        assert_eq!(finish, None);
    }

    #[test]
    fn stop_sequences_length_flushes_held_text() {
        let tok = tokenizer();
        let n = tok.encode("Hello, my name", false).unwrap().get_ids().len();
        let (deltas, finish) = run("Hello, my name is Ada", &["name was"], n);
        assert_eq!(deltas.concat(), "Hello, my name");
        assert_eq!(finish, Some(FinishReason::Length));
    }
}
