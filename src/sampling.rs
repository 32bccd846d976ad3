//! Choosing the next token from a row of logits.
//!
//! The random draw for the `n`-th generated token depends only on `(seed, n)`, never on batch
//! composition or on how often a sequence was preempted, so the same seed gives the same text.
//!
//! `min_tokens` is enforced here, as vLLM does: the stop token ids and EOS cannot be sampled
//! before it, so the detector never has to discard a stop the model wanted.

use std::borrow::Cow;
use std::sync::Arc;

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sampling settings of one request, validated by intake. Cloned into every step's plan, so the
/// id list is shared rather than copied.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    pub seed: u64,
    /// Generated tokens during which `min_tokens_banned` cannot be sampled.
    pub min_tokens: usize,
    /// EOS ids and `stop_token_ids`.
    pub min_tokens_banned: Arc<[u32]>,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the largest; 0 keeps all.
    pub min_p: f32,
    /// OpenAI's penalties over the generated tokens (0 = off).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// transformers' penalty over prompt and generated tokens (1 = off).
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids before anything else.
    pub logit_bias: Arc<[(u32, f32)]>,
    /// Report the chosen token's log probability and this many alternatives; `None` reports
    /// nothing.
    pub logprobs: Option<usize>,
}

/// Most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log probabilities of one sampled token, by token id; the stop detector adds the text.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledLogprobs {
    /// Log probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens, most likely first, as `(id, logprob)`.
    pub top: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            min_tokens: 0,
            min_tokens_banned: Arc::from([]),
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Arc::from([]),
            logprobs: None,
        }
    }
}

/// Temperatures below this are treated as greedy (as vLLM does).
const GREEDY_BELOW: f32 = 1e-5;

/// Picks the token for generated index `n` of a sequence.
pub fn sample(logits: &[f32], params: &SamplingParams, n: usize) -> u32 {
    let logits = mask_before_min_tokens(logits, params, n);
    let logits = &logits[..];
    if params.temperature < GREEDY_BELOW {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / params.temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if params.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                mass += p.1 / total;
                mass >= params.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let kept: f32 = probs.iter().map(|p| p.1).sum();
    let mut rng = StdRng::seed_from_u64(mix(params.seed, n as u64));
    let mut draw = rng.random::<f32>() * kept;
    for &(id, p) in &probs {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    probs.last().map_or(0, |p| p.0)
}

/// The logits with the banned ids at −inf while `n < min_tokens`; borrowed otherwise.
fn mask_before_min_tokens<'a>(logits: &'a [f32], params: &SamplingParams, n: usize) -> Cow<'a, [f32]> {
    if n >= params.min_tokens || params.min_tokens_banned.is_empty() {
        return Cow::Borrowed(logits);
    }
    let mut masked = logits.to_vec();
    for &id in params.min_tokens_banned.iter() {
        if let Some(l) = masked.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    Cow::Owned(masked)
}

/// Index of the largest logit; the lowest index wins a tie, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// splitmix64 of the pair, so neighbouring indices get unrelated streams.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let p = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&[0.1, 3.0, 3.0, -1.0], &p, 0), 1);
    }

    #[test]
    fn same_seed_same_draws_and_top_p_cuts_the_tail() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = (0..40).map(|n| sample(&logits, &p, n)).collect();
        let b: Vec<u32> = (0..40).map(|n| sample(&logits, &p, n)).collect();
        assert_eq!(a, b);
        let q = SamplingParams { seed: 8, ..p.clone() };
        assert_ne!(a, (0..40).map(|n| sample(&logits, &q, n)).collect::<Vec<_>>());
        let narrow = SamplingParams { top_p: 1e-6, ..p };
        assert!((0..40).all(|n| sample(&logits, &narrow, n) == argmax(&logits)));
    }

    #[test]
    fn stop_sequences_min_tokens_masks_stop_ids_then_lets_them_through() {
        let logits = [0.0, 1.0, 9.0, 8.0, 2.0];
        let p = SamplingParams {
            temperature: 0.0,
            min_tokens: 3,
            min_tokens_banned: Arc::from([2u32, 3]),
            ..Default::default()
        };
        assert_eq!(sample(&logits, &p, 0), 4, "2 and 3 banned before min_tokens");
        assert_eq!(sample(&logits, &p, 2), 4);
        assert_eq!(sample(&logits, &p, 3), 2, "allowed from min_tokens on");
        let hot = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..p
        };
        assert!((0..200).all(|n| n >= 3 || ![2, 3].contains(&sample(&logits, &hot, n))));
    }
}
