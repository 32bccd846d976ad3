//! Stop strings found in text that arrives in pieces.
//!
//! The earliest match in the text wins; at the same start the longer stop wins. Text is held
//! only while it could still begin a stop string, and a complete match is held back while a stop
//! starting earlier (or longer at the same start) could still complete, so the result never
//! depends on how the text was split into pieces: it equals searching the whole text at once.
//! Each push scans the held tail plus the new text only, never the whole completion.

/// What a push decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Text that is now final (may be empty); the sequence goes on.
    Release(String),
    /// A stop string matched: the final text before it (or through it, with
    /// `include_stop_str_in_output`), and the stop.
    Stop { text: String, stop: String },
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    /// Text that may still begin a stop string; no stop can start in text released before it.
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include_stop,
            pending: String::new(),
        }
    }

    /// Adds `text`. `protected` text can never begin a stop (the first `min_tokens` tokens'
    /// text) and is released at once; it always comes before unprotected text. `last`: no more
    /// text will come, so nothing is held.
    pub fn push(&mut self, text: &str, protected: bool, last: bool) -> Scan {
        if protected {
            debug_assert!(self.pending.is_empty(), "protected text comes first");
            let mut out = std::mem::take(&mut self.pending);
            out.push_str(text);
            return Scan::Release(out);
        }
        self.pending.push_str(text);
        if let Some((at, stop)) = self.earliest_match() {
            if last || !self.may_still_beat(at, stop.len()) {
                let end = if self.include_stop { at + stop.len() } else { at };
                self.pending.truncate(end);
                return Scan::Stop {
                    text: std::mem::take(&mut self.pending),
                    stop,
                };
            }
        }
        let keep_from = if last {
            self.pending.len()
        } else {
            self.first_partial_start().unwrap_or(self.pending.len())
        };
        let rest = self.pending.split_off(keep_from);
        Scan::Release(std::mem::replace(&mut self.pending, rest))
    }

    /// Earliest complete stop in the held text: (byte offset, stop); longer first on a tie.
    fn earliest_match(&self) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())))
            .map(|(i, s)| (i, s.clone()))
    }

    /// Start offsets (char boundaries) of held-text tails that are a nonempty proper prefix of
    /// some stop, with that stop's length: matches that more text could complete.
    fn partial_starts(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = self.pending.len().saturating_sub(longest);
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .filter(move |&i| i >= from)
            .flat_map(move |i| {
                let tail = &self.pending[i..];
                self.stops
                    .iter()
                    .filter(move |s| s.len() > tail.len() && s.starts_with(tail))
                    .map(move |s| (i, s.len()))
            })
    }

    fn first_partial_start(&self) -> Option<usize> {
        self.partial_starts().map(|(i, _)| i).min()
    }

    /// Whether a stop that could still complete would win over a match at `at` of length `len`.
    fn may_still_beat(&self, at: usize, len: usize) -> bool {
        self.partial_starts().any(|(i, l)| i < at || (i == at && l > len))
    }
}
