//! Incremental detokenization with the `tokenizers` crate's `DecodeStream` semantics.
//!
//! Invariant: the concatenation of every [`IncrementalDecoder::step`] output is a prefix of the
//! full decode of the ids pushed so far, and never ends in U+FFFD (a character still forming over
//! several byte tokens is held). [`IncrementalDecoder::flush`] releases what is held exactly as
//! the full decode renders it, so all outputs together equal `tokenizer.decode(ids, true)`.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// The tokenizer failed, or decoding from the window start stopped agreeing with the text
/// already released (never seen with byte-level BPE; `DecodeStream` fails the same way).
#[derive(Debug, thiserror::Error)]
pub enum DetokenizeError {
    #[error("detokenization failed: {0}")]
    Tokenizer(String),
    #[error(
        "detokenization failed: the decode of token {token} no longer starts with the text already sent"
    )]
    InvalidPrefix { token: u32 },
}

/// Turns token ids into final text, one id at a time.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Decode window, as TGI, vLLM and `DecodeStream` keep it: `ids[prefix_offset..read_offset]`
    /// is text already released; decoding from `prefix_offset` rather than from `read_offset`
    /// keeps word-boundary effects of the decoder (leading spaces) as the full decode has them.
    prefix_offset: usize,
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`, kept so each step decodes once.
    prefix: String,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            prefix: String::new(),
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, DetokenizeError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| DetokenizeError::Tokenizer(e.to_string()))
    }

    /// Adds one id; returns the text that became final, or `None` while nothing did (a character
    /// is incomplete, or the token decodes to nothing, like a skipped special token).
    pub fn step(&mut self, id: u32) -> Result<Option<String>, DetokenizeError> {
        self.ids.push(id);
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= self.prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        if !full.starts_with(&self.prefix) {
            return Err(DetokenizeError::InvalidPrefix { token: id });
        }
        let new_text = full[self.prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        Ok(Some(new_text))
    }

    /// Releases everything held, rendered as the full decode renders it (an incomplete character
    /// becomes U+FFFD). Called once, when the sequence ends.
    pub fn flush(&mut self) -> Result<String, DetokenizeError> {
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= self.prefix.len() {
            return Ok(String::new());
        }
        if !full.starts_with(&self.prefix) {
            let token = self.ids.last().copied().unwrap_or_default();
            return Err(DetokenizeError::InvalidPrefix { token });
        }
        let held = full[self.prefix.len()..].to_string();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.prefix.clear();
        Ok(held)
    }
}
