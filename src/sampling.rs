//! Choosing the next token from a row of logits.
//!
//! The random draw for the `n`-th generated token depends only on `(seed, n)`, never on batch
//! composition or on how often a sequence was preempted, so the same seed gives the same text.
//!
//! `min_tokens` is enforced here, as vLLM does: the stop token ids and EOS cannot be sampled
//! before it, so the detector never has to discard a stop the model wanted.
//!
//! Logprobs are those of the raw model logits (vLLM's default `raw_logprobs`): what the model
//! predicted, not what bias, penalties and temperature made of it.

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

impl SamplingParams {
    /// Whether a penalty needs the sequence's token history.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// The tokens a sequence holds when its next token is sampled: the prompt, then every generated
/// token. Planned only for requests with a penalty on, so the common path copies nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenHistory {
    pub tokens: Arc<[u32]>,
    pub prompt_len: usize,
}

impl TokenHistory {
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len.min(self.tokens.len())..]
    }
}

/// One sampled token, with its logprobs when the request asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<SampledLogprobs>,
}

/// Picks the token for generated index `n` of a sequence. `history` must be given when
/// [`SamplingParams::has_penalties`]; it is ignored otherwise.
///
/// Processors, in vLLM's and transformers' order: `logit_bias`, the `min_tokens` mask,
/// `repetition_penalty`, presence/frequency penalties, then temperature (greedy takes the argmax
/// of the processed logits), `top_k`, `top_p`, `min_p`. Logprobs are of the raw logits.
pub fn sample(logits: &[f32], params: &SamplingParams, n: usize, history: Option<&TokenHistory>) -> Sampled {
    debug_assert!(history.is_some() || !params.has_penalties());
    sample_edited(logits, params, n, &logit_edits(params, n, history), None)
}

/// [`sample`] with the row's [`logit_edits`] already made (the executor makes them once per
/// step, for the device and for the host); `fed` is the token of their `*Fed*` edits
/// ([`logit_edits_fed`]).
pub fn sample_edited(
    logits: &[f32],
    params: &SamplingParams,
    n: usize,
    edits: &[LogitEdit],
    fed: Option<u32>,
) -> Sampled {
    let processed = edited(logits, edits, fed);
    let token = if params.temperature < GREEDY_BELOW {
        argmax(&processed)
    } else {
        draw(&kept_tokens(&processed, params), params.seed, n)
    };
    Sampled {
        token,
        logprobs: params.logprobs.map(|k| raw_logprobs(logits, token, k)),
    }
}

/// Whether sampling generated index `n` needs the row's logits on the host of a backend without
/// device draws nor device logprobs (the CPU). False only for a "plain greedy" row: greedy, and
/// nothing that [`process_logits`] applies (bias, an active `min_tokens` mask, penalties) nor
/// logprobs, so [`sample`] would return the plain [`argmax`] of the raw logits and the device's
/// argmax is the whole answer (the executor then brings back one id instead of a vocabulary of
/// floats). Conservative: a penalty counts even without a history. Keep in step with [`sample`],
/// [`process_logits`] and [`row_sampling`].
pub fn needs_host_logits(params: &SamplingParams, n: usize) -> bool {
    // Written as `sample` tests it, so that a NaN temperature samples on the host too.
    let greedy = params.temperature < GREEDY_BELOW;
    !greedy
        || !params.logit_bias.is_empty()
        || min_tokens_masked(params, n)
        || params.has_penalties()
        || params.logprobs.is_some()
}

/// How a step gets the token of one logits row (see `actors::step_output`). A device row that
/// asks for `logprobs` (the top count) gets them from the device where a hook computes them
/// ([`raw_logprobs`]'s numbers), else goes to the host whole; so does a device row with
/// [`logit_edits`] where the device cannot edit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowSampling {
    /// A greedy row: the device's argmax (of its edited logits, if any) is the token.
    DeviceArgmax { logprobs: Option<usize> },
    /// A temperature draw, cut by top-k, top-p or min-p or not: the device may draw it
    /// ([`device_draw`], from its edited logits, if any), else the host samples it.
    DeviceDraw {
        temperature: f32,
        cuts: DrawCuts,
        key: u64,
        logprobs: Option<usize>,
    },
    /// The host samples the row from its full logits ([`sample`]).
    Host,
}

impl RowSampling {
    /// A greedy row without logprobs.
    pub const GREEDY: Self = Self::DeviceArgmax { logprobs: None };

    /// The top count of the logprobs the row asks for, if any.
    pub fn logprobs(&self) -> Option<usize> {
        match *self {
            Self::DeviceArgmax { logprobs } | Self::DeviceDraw { logprobs, .. } => logprobs,
            Self::Host => None,
        }
    }
}

/// The warpers that cut a draw's vocabulary, as [`kept_tokens`] applies them: `top_k` (0 keeps
/// all), then `top_p` (1 keeps all), then `min_p` (0 keeps all).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawCuts {
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
}

impl DrawCuts {
    /// Nothing cut: the draw is over the whole vocabulary.
    pub const NONE: Self = Self {
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };

    pub fn of(params: &SamplingParams) -> Self {
        Self {
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
        }
    }

    /// Whether the draw keeps every token.
    pub fn keep_all(&self) -> bool {
        self.top_k == 0 && self.top_p >= 1.0 && self.min_p <= 0.0
    }
}

/// Where generated index `n` of a sequence with `params` can be sampled: every row but one of a
/// NaN temperature may be chosen on the device; a row whose logits bias, the `min_tokens` mask
/// or penalties change is chosen from an edited copy ([`logit_edits`]) where the device can
/// edit, else on the host. Keep in step with [`sample`] and [`needs_host_logits`].
pub fn row_sampling(params: &SamplingParams, n: usize) -> RowSampling {
    let logprobs = params.logprobs;
    // Written as `sample` tests it, so that a NaN temperature samples on the host.
    let greedy = params.temperature < GREEDY_BELOW;
    match () {
        _ if greedy => RowSampling::DeviceArgmax { logprobs },
        _ if params.temperature.is_finite() && params.temperature >= GREEDY_BELOW => {
            RowSampling::DeviceDraw {
                temperature: params.temperature,
                cuts: DrawCuts::of(params),
                key: mix(params.seed, n as u64),
                logprobs,
            }
        }
        _ => RowSampling::Host,
    }
}

/// The uniform number in (0, 1) of token `id` in the device draw of `key`: a 32-bit hash (a
/// GPU kernel has no 64-bit integers everywhere) of the id and both halves of the key. The
/// kernel (`model::kernels::sample`) computes the same bits.
pub fn device_draw_uniform(key: u64, id: u32) -> f32 {
    let (lo, hi) = (key as u32, (key >> 32) as u32);
    let mut x = (id ^ lo).wrapping_mul(0x9E37_79B1);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x ^= hi;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^= x >> 16;
    ((x >> 8) as f32 + 0.5) / 16_777_216.0
}

/// A draw from `softmax(logits / temperature)` over the tokens `cuts` keep ([`kept_tokens`]) by
/// the Gumbel-max trick: the kept token with the largest `l / temperature - ln(-ln u)`, `u` from
/// [`device_draw_uniform`] (the lowest id on a tie; NaN logits never win). No sort of the row
/// and one pass without cuts, so a GPU draws a row where it is; the same `key` gives the same
/// token whatever the batch. This is the reference of the device kernel: it draws from the same
/// distribution as [`sample`], but not the same token for a seed.
pub fn device_draw(logits: &[f32], temperature: f32, cuts: DrawCuts, key: u64) -> u32 {
    let score = |i: u32| logits[i as usize] / temperature - (-device_draw_uniform(key, i).ln()).ln();
    let mut best = (f32::NEG_INFINITY, 0u32);
    let mut consider = |i: u32| {
        let s = score(i);
        if s > best.0 || (s == best.0 && s > f32::NEG_INFINITY && i < best.1) {
            best = (s, i);
        }
    };
    if cuts.keep_all() {
        (0..logits.len() as u32).for_each(&mut consider);
    } else {
        let params = SamplingParams {
            temperature,
            top_k: cuts.top_k,
            top_p: cuts.top_p,
            min_p: cuts.min_p,
            ..SamplingParams::default()
        };
        kept_tokens(logits, &params)
            .iter()
            .for_each(|&(i, _)| consider(i));
    }
    best.1
}

/// Whether the `min_tokens` mask bans the stop ids at generated index `n`.
fn min_tokens_masked(params: &SamplingParams, n: usize) -> bool {
    n < params.min_tokens && !params.min_tokens_banned.is_empty()
}

/// One change [`process_logits`] makes to one logit; applied in order ([`apply_edits`]), so a
/// device applying the same list gets the same bits. Ids past the vocabulary are ignored.
///
/// The `*Fed*` edits stand for the penalties of the history's last token when the host does not
/// know it yet: the device chose it in the step before and fed it back itself (overlapped
/// steps). [`logit_edits_fed`] makes them; whoever applies them knows the token (the device
/// reads it where the previous step left it, the host once that step is read back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogitEdit {
    /// `logit += value`: a `logit_bias` entry, or minus a presence/frequency penalty.
    Add { id: u32, value: f32 },
    /// `logit = -inf`: a stop id under the `min_tokens` mask.
    Ban { id: u32 },
    /// transformers' repetition penalty: a positive logit divided by `penalty`, any other
    /// multiplied by it.
    Repeat { id: u32, penalty: f32 },
    /// `Add` unless `id` is the fed token: the penalty of a token generated `count` times before it.
    AddUnlessFed { id: u32, value: f32 },
    /// `Add` if `id` is the fed token: the same token's penalty for `count + 1`.
    AddIfFed { id: u32, value: f32 },
    /// `Repeat` of the fed token, unless a `Repeat` before it in the list was of that token.
    RepeatFedUnlessSeen { penalty: f32 },
    /// `Add` to the fed token, unless an `AddIfFed` before it in the list was of that token: its
    /// penalty as a first generated token.
    AddFedUnlessGenerated { value: f32 },
}

/// What [`process_logits`] does to a row, as a list of edits, in its order: `logit_bias` (in the
/// request's order), the `min_tokens` mask, the repetition penalty once per distinct token of
/// the history (prompt and generated), then OpenAI's penalties, `logit -= frequency * count +
/// presence` for every token generated `count > 0` times. Empty when none applies (penalties
/// need the `history`).
pub fn logit_edits(params: &SamplingParams, n: usize, history: Option<&TokenHistory>) -> Vec<LogitEdit> {
    edits_for(params, n, history, false)
}

/// [`logit_edits`] of `history` followed by one generated token that only the device knows yet
/// (the fed token, see [`LogitEdit`]): applied with that token, the same edits in the same order
/// for every logit, so the same bits. `n` counts the fed token, as it would in `logit_edits`.
pub fn logit_edits_fed(params: &SamplingParams, n: usize, history: &TokenHistory) -> Vec<LogitEdit> {
    edits_for(params, n, Some(history), true)
}

/// A presence/frequency penalty as an `Add` value. `l + -(x)` is `l - x` exactly.
fn penalty_value(presence: f32, frequency: f32, count: usize) -> f32 {
    -(frequency * count as f32 + presence)
}

fn edits_for(params: &SamplingParams, n: usize, history: Option<&TokenHistory>, fed: bool) -> Vec<LogitEdit> {
    let mut edits: Vec<LogitEdit> = params
        .logit_bias
        .iter()
        .map(|&(id, value)| LogitEdit::Add { id, value })
        .collect();
    if min_tokens_masked(params, n) {
        edits.extend(params.min_tokens_banned.iter().map(|&id| LogitEdit::Ban { id }));
    }
    let Some(h) = history.filter(|_| params.has_penalties()) else {
        return edits;
    };
    let penalty = params.repetition_penalty;
    if penalty != 1.0 {
        let mut seen = h.tokens.to_vec();
        seen.sort_unstable();
        seen.dedup();
        edits.extend(seen.into_iter().map(|id| LogitEdit::Repeat { id, penalty }));
    }
    let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
    let counted = presence != 0.0 || frequency != 0.0;
    if counted {
        let mut sorted = h.generated().to_vec();
        sorted.sort_unstable();
        for run in sorted.chunk_by(|a, b| a == b) {
            let (id, count) = (run[0], run.len());
            let value = penalty_value(presence, frequency, count);
            if fed {
                edits.push(LogitEdit::AddUnlessFed { id, value });
                let value = penalty_value(presence, frequency, count + 1);
                edits.push(LogitEdit::AddIfFed { id, value });
            } else {
                edits.push(LogitEdit::Add { id, value });
            }
        }
    }
    // The fed token's own edits come last: for its logit, after its bias, ban and (if it was
    // seen) repeat, as in the list with the token known.
    if fed && penalty != 1.0 {
        edits.push(LogitEdit::RepeatFedUnlessSeen { penalty });
    }
    if fed && counted {
        let value = penalty_value(presence, frequency, 1);
        edits.push(LogitEdit::AddFedUnlessGenerated { value });
    }
    edits
}

/// Applies `edits` to the row `w` in order (ids past it ignored). `fed` is the fed token of
/// `*Fed*` edits; without one, `AddUnlessFed` adds and the other `*Fed*` edits do nothing.
pub fn apply_edits(w: &mut [f32], edits: &[LogitEdit], fed: Option<u32>) {
    fn add(w: &mut [f32], id: u32, value: f32) {
        if let Some(l) = w.get_mut(id as usize) {
            *l += value;
        }
    }
    fn repeat(w: &mut [f32], id: u32, penalty: f32) {
        if let Some(l) = w.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
    let (mut seen, mut generated) = (false, false);
    for edit in edits {
        match *edit {
            LogitEdit::Add { id, value } => add(w, id, value),
            LogitEdit::Ban { id } => {
                if let Some(l) = w.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            LogitEdit::Repeat { id, penalty } => {
                seen |= fed == Some(id);
                repeat(w, id, penalty)
            }
            LogitEdit::AddUnlessFed { id, value } => {
                if fed != Some(id) {
                    add(w, id, value)
                }
            }
            LogitEdit::AddIfFed { id, value } => {
                if fed == Some(id) {
                    generated = true;
                    add(w, id, value)
                }
            }
            LogitEdit::RepeatFedUnlessSeen { penalty } => {
                if let Some(id) = fed.filter(|_| !seen) {
                    repeat(w, id, penalty)
                }
            }
            LogitEdit::AddFedUnlessGenerated { value } => {
                if let Some(id) = fed.filter(|_| !generated) {
                    add(w, id, value)
                }
            }
        }
    }
}

/// The logits after everything that may change the argmax (bias, `min_tokens`, penalties:
/// [`logit_edits`]); borrowed untouched when none of them applies, so the plain path copies
/// nothing.
pub fn process_logits<'a>(
    logits: &'a [f32],
    params: &SamplingParams,
    n: usize,
    history: Option<&TokenHistory>,
) -> Cow<'a, [f32]> {
    edited(logits, &logit_edits(params, n, history), None)
}

/// `logits` with `edits` applied (see [`apply_edits`]); borrowed untouched when there are none.
fn edited<'a>(logits: &'a [f32], edits: &[LogitEdit], fed: Option<u32>) -> Cow<'a, [f32]> {
    if edits.is_empty() {
        return Cow::Borrowed(logits);
    }
    let mut w = logits.to_vec();
    apply_edits(&mut w, edits, fed);
    Cow::Owned(w)
}

/// The tokens a draw may pick, with unnormalised probabilities `exp((l - max) / temperature)`, in
/// the order the draw walks them: by id, or most likely first (lower id on a tie) once `top_k` or
/// `top_p` sorted them. `top_k` keeps exactly `k` tokens, `top_p` the smallest most-likely-first
/// prefix whose mass reaches `top_p` of what `top_k` kept, `min_p` those at least `min_p` times
/// as likely as the most likely one (transformers' order of warpers). Tokens of probability 0
/// (masked) are dropped.
pub fn kept_tokens(w: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let temperature = params.temperature.max(GREEDY_BELOW);
    let mut probs: Vec<(u32, f32)> = w
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    let top_k = params.top_k > 0 && params.top_k < probs.len();
    if top_k {
        probs.select_nth_unstable_by(params.top_k - 1, likelier);
        probs.truncate(params.top_k);
        probs.sort_by(likelier);
    }
    if params.top_p < 1.0 {
        probs = nucleus(probs, params.top_p, top_k);
    }
    // The most likely token has probability exp(0) = 1 here, and every cut above keeps it.
    probs.retain(|p| p.1 > 0.0 && p.1 >= params.min_p);
    probs
}

/// Most likely first, the lower id on a tie: the order in which the cuts keep tokens.
fn likelier(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The smallest most-likely-first prefix of `probs` whose mass reaches `top_p` of the whole
/// (sums in f64), in that order; `sorted`: `probs` is already all in order. Sorting a
/// 128,256-token row (Llama 3's vocabulary) took 4.5 ms, for each sampled row of a step, one after
/// another, so only the candidates are sorted: a histogram of the probabilities by their top 16
/// bits (exponent and 7 bits of mantissa, in value order for the non-negative floats) finds the
/// bin where the mass crosses `top_p`, and the tokens of that bin and above are the candidates.
/// They are the first of the whole row's order, so the cut is the one a full sort makes; should
/// rounding put it past them, or a probability be NaN, the whole row is sorted.
fn nucleus(mut probs: Vec<(u32, f32)>, top_p: f32, sorted: bool) -> Vec<(u32, f32)> {
    let total: f64 = probs.iter().map(|p| p.1 as f64).sum();
    let target = top_p as f64 * total;
    let cut = |front: &[(u32, f32)]| {
        let mut mass = 0.0f64;
        front.iter().position(|p| {
            mass += p.1 as f64;
            mass >= target
        })
    };
    const BINS: usize = (1.0f32.to_bits() >> 16) as usize + 1;
    let bin = |p: f32| (p.to_bits() >> 16) as usize;
    if !sorted && probs.iter().all(|p| (0.0..=1.0).contains(&p.1)) {
        let mut mass = vec![0.0f64; BINS];
        for p in &probs {
            mass[bin(p.1)] += p.1 as f64;
        }
        let (mut above, mut lowest) = (0.0f64, 0);
        for b in (0..BINS).rev() {
            above += mass[b];
            if above >= target {
                lowest = b;
                break;
            }
        }
        let mut candidates: Vec<(u32, f32)> = probs.iter().copied().filter(|p| bin(p.1) >= lowest).collect();
        candidates.sort_by(likelier);
        if let Some(i) = cut(&candidates) {
            candidates.truncate(i + 1);
            return candidates;
        }
    }
    if !sorted {
        probs.sort_by(likelier);
    }
    let keep = cut(&probs).map_or(probs.len(), |i| i + 1);
    probs.truncate(keep);
    probs
}

/// Draws from `kept` with the RNG of `(seed, n)`.
fn draw(kept: &[(u32, f32)], seed: u64, n: usize) -> u32 {
    let total: f32 = kept.iter().map(|p| p.1).sum();
    let mut rng = StdRng::seed_from_u64(mix(seed, n as u64));
    let mut draw = rng.random::<f32>() * total;
    for &(id, p) in kept {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    // Rounding left the draw past the end.
    kept.last().map_or(0, |p| p.0)
}

/// Log-softmax of the raw logits (before bias, penalties and temperature: vLLM's default
/// `raw_logprobs`) for `token` and the `k` most likely ids (lower id on a tie), computed in f64
/// as `l - max - ln Σ exp(l - max)`.
pub fn raw_logprobs(logits: &[f32], token: u32, k: usize) -> SampledLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let logprob = |l: f32| (l as f64 - lse) as f32;
    // Most likely first; ids arrive ascending, so an equal logit already held keeps its place.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if top.len() == k && top.last().is_none_or(|&(_, worst)| l <= worst) {
            continue;
        }
        let at = top.partition_point(|&(_, held)| held >= l);
        top.insert(at, (i as u32, l));
        top.truncate(k);
    }
    SampledLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
        top: top.into_iter().map(|(id, l)| (id, logprob(l))).collect(),
    }
}

/// Index of the largest logit; the lowest index wins a tie, as `torch.argmax`. The device path
/// (`actors::step_output`) must agree: burn's Flex argmax and cubek-reduce's `ArgMax` (CUDA)
/// both keep the lowest index of equal maxima. A NaN is never larger here, while Flex returns
/// the first NaN; a NaN row is a broken model step either way.
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
    use proptest::prelude::*;

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    fn token(logits: &[f32], params: &SamplingParams, n: usize) -> u32 {
        sample(logits, params, n, None).token
    }

    fn history(prompt: &[u32], generated: &[u32]) -> TokenHistory {
        TokenHistory {
            tokens: prompt.iter().chain(generated).copied().collect(),
            prompt_len: prompt.len(),
        }
    }

    #[test]
    fn sampling_device_draw_follows_the_softmax_of_logits_over_temperature() {
        let logits = [1.0f32, 0.0, 2.5, -1.0, 0.5, f32::NEG_INFINITY, 1.5, -3.0];
        for temperature in [0.7f32, 1.0, 2.0] {
            let weights: Vec<f64> = logits.iter().map(|&l| ((l / temperature) as f64).exp()).collect();
            let total: f64 = weights.iter().sum();
            let draws = 20_000;
            let mut counts = [0usize; 8];
            for n in 0..draws {
                counts[device_draw(&logits, temperature, DrawCuts::NONE, mix(42, n as u64)) as usize] += 1;
            }
            assert_eq!(counts[5], 0, "a -inf logit is never drawn");
            for (id, (&c, w)) in counts.iter().zip(&weights).enumerate() {
                let p = w / total;
                let sd = (p * (1.0 - p) / draws as f64).sqrt();
                let got = c as f64 / draws as f64;
                assert!(
                    (got - p).abs() <= 5.0 * sd + 1e-9,
                    "T {temperature}: token {id} drawn {got:.4}, softmax {p:.4}"
                );
            }
        }
        // The same key draws the same token; the uniforms stay inside (0, 1).
        assert_eq!(
            device_draw(&logits, 1.0, DrawCuts::NONE, 7),
            device_draw(&logits, 1.0, DrawCuts::NONE, 7)
        );
        for id in [0u32, 1, 77, u32::MAX] {
            for key in [0u64, 1, u64::MAX, mix(3, 9)] {
                let u = device_draw_uniform(key, id);
                assert!(u > 0.0 && u < 1.0, "u({key}, {id}) = {u}");
            }
        }
    }

    #[test]
    fn sampling_device_draw_with_cuts_follows_what_the_warpers_keep() {
        // Distinct logits, so that every cut has one answer; -inf is never kept.
        let logits = [
            1.0f32,
            0.0,
            2.5,
            -1.0,
            0.5,
            f32::NEG_INFINITY,
            1.5,
            -3.0,
            2.0,
            -0.5,
        ];
        let cases = [
            (
                1.0f32,
                DrawCuts {
                    top_k: 3,
                    ..DrawCuts::NONE
                },
            ),
            (
                0.8,
                DrawCuts {
                    top_p: 0.7,
                    ..DrawCuts::NONE
                },
            ),
            (
                1.3,
                DrawCuts {
                    min_p: 0.2,
                    ..DrawCuts::NONE
                },
            ),
            (
                1.0,
                DrawCuts {
                    top_k: 5,
                    top_p: 0.8,
                    min_p: 0.3,
                },
            ),
        ];
        for (temperature, cuts) in cases {
            let params = SamplingParams {
                temperature,
                top_k: cuts.top_k,
                top_p: cuts.top_p,
                min_p: cuts.min_p,
                ..Default::default()
            };
            let kept = kept_tokens(&logits, &params);
            let total: f64 = kept.iter().map(|p| p.1 as f64).sum();
            let draws = 20_000;
            let mut counts = [0usize; 10];
            for n in 0..draws {
                counts[device_draw(&logits, temperature, cuts, mix(9, n as u64)) as usize] += 1;
            }
            for id in 0..logits.len() as u32 {
                let p = kept
                    .iter()
                    .find(|k| k.0 == id)
                    .map_or(0.0, |k| k.1 as f64 / total);
                let sd = (p * (1.0 - p) / draws as f64).sqrt();
                let got = counts[id as usize] as f64 / draws as f64;
                assert!(
                    (got - p).abs() <= 5.0 * sd + 1e-9,
                    "T {temperature}, {cuts:?}: token {id} drawn {got:.4}, kept with {p:.4}"
                );
            }
            assert!(kept.len() < 9, "{cuts:?} cut something");
        }
    }

    #[test]
    fn sampling_rows_go_to_the_device_but_a_nan_temperature() {
        let plain = SamplingParams {
            temperature: 0.8,
            seed: 5,
            ..Default::default()
        };
        assert_eq!(row_sampling(&greedy(), 0), RowSampling::GREEDY);
        assert_eq!(
            row_sampling(&plain, 3),
            RowSampling::DeviceDraw {
                temperature: 0.8,
                cuts: DrawCuts::NONE,
                key: mix(5, 3),
                logprobs: None,
            }
        );
        // Logprobs are of the raw row: they travel with the device's choice.
        let greedy_logprobs = SamplingParams {
            logprobs: Some(0),
            ..greedy()
        };
        assert_eq!(
            row_sampling(&greedy_logprobs, 0),
            RowSampling::DeviceArgmax { logprobs: Some(0) }
        );
        let drawn_logprobs = SamplingParams {
            logprobs: Some(2),
            ..plain.clone()
        };
        assert_eq!(row_sampling(&drawn_logprobs, 0).logprobs(), Some(2));
        assert!(matches!(
            row_sampling(&drawn_logprobs, 0),
            RowSampling::DeviceDraw { .. }
        ));
        // The warpers travel with the draw.
        let cut = SamplingParams {
            top_k: 40,
            top_p: 0.9,
            min_p: 0.1,
            ..plain.clone()
        };
        let cuts = DrawCuts {
            top_k: 40,
            top_p: 0.9,
            min_p: 0.1,
        };
        assert_eq!(
            row_sampling(&cut, 0),
            RowSampling::DeviceDraw {
                temperature: 0.8,
                cuts,
                key: mix(5, 0),
                logprobs: None,
            }
        );
        assert!(!cuts.keep_all() && DrawCuts::NONE.keep_all());
        // Rows whose logits are processed stay device rows: the step output edits them there
        // when it can (`logit_edits`), else sends them to the host.
        let processed = [
            SamplingParams {
                presence_penalty: 0.5,
                ..plain.clone()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..greedy()
            },
            SamplingParams {
                logit_bias: Arc::from([(1u32, 2.0f32)]),
                ..plain.clone()
            },
            SamplingParams {
                min_tokens: 4,
                min_tokens_banned: Arc::from([2u32]),
                ..greedy()
            },
        ];
        for params in processed {
            assert_ne!(row_sampling(&params, 0), RowSampling::Host, "{params:?}");
        }
        let nan = SamplingParams {
            temperature: f32::NAN,
            ..plain
        };
        assert_eq!(row_sampling(&nan, 0), RowSampling::Host);
    }

    #[test]
    fn sampling_logit_edits_are_process_logits_in_order() {
        let h = TokenHistory {
            tokens: Arc::from([3u32, 5, 3, 7, 5, 5]),
            prompt_len: 2,
        };
        let p = SamplingParams {
            logit_bias: Arc::from([(4u32, 1.5f32), (4, -0.5)]),
            min_tokens: 3,
            min_tokens_banned: Arc::from([2u32]),
            repetition_penalty: 1.2,
            presence_penalty: 0.25,
            frequency_penalty: 0.5,
            ..greedy()
        };
        assert_eq!(
            logit_edits(&p, 2, Some(&h)),
            vec![
                LogitEdit::Add { id: 4, value: 1.5 },
                LogitEdit::Add { id: 4, value: -0.5 },
                LogitEdit::Ban { id: 2 },
                LogitEdit::Repeat { id: 3, penalty: 1.2 },
                LogitEdit::Repeat { id: 5, penalty: 1.2 },
                LogitEdit::Repeat { id: 7, penalty: 1.2 },
                // Generated: 3 once, 5 twice, 7 once.
                LogitEdit::Add { id: 3, value: -0.75 },
                LogitEdit::Add { id: 5, value: -1.25 },
                LogitEdit::Add { id: 7, value: -0.75 },
            ]
        );
        // Past `min_tokens` no ban; without a history no penalty; nothing set, nothing to do.
        assert!(!logit_edits(&p, 3, Some(&h)).contains(&LogitEdit::Ban { id: 2 }));
        assert_eq!(logit_edits(&p, 3, None).len(), 2);
        assert!(logit_edits(&greedy(), 0, Some(&h)).is_empty());
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(token(&[0.1, 3.0, 3.0, -1.0], &greedy(), 0), 1);
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
        let a: Vec<u32> = (0..40).map(|n| token(&logits, &p, n)).collect();
        let b: Vec<u32> = (0..40).map(|n| token(&logits, &p, n)).collect();
        assert_eq!(a, b);
        let q = SamplingParams { seed: 8, ..p.clone() };
        assert_ne!(a, (0..40).map(|n| token(&logits, &q, n)).collect::<Vec<_>>());
        let narrow = SamplingParams { top_p: 1e-6, ..p };
        assert!((0..40).all(|n| token(&logits, &narrow, n) == argmax(&logits)));
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
        assert_eq!(token(&logits, &p, 0), 4, "2 and 3 banned before min_tokens");
        assert_eq!(token(&logits, &p, 2), 4);
        assert_eq!(token(&logits, &p, 3), 2, "allowed from min_tokens on");
        let hot = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..p
        };
        assert!((0..200).all(|n| n >= 3 || ![2, 3].contains(&token(&logits, &hot, n))));
    }

    /// `tests/fixtures/sampling_goldens.json`, written by `scripts/make_sampling_goldens.py`.
    fn goldens() -> Vec<serde_json::Value> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sampling_goldens.json"
        );
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        doc["cases"].as_array().unwrap().clone()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn kept_ids(w: &[f32], params: &SamplingParams) -> Vec<u32> {
        let mut ids: Vec<u32> = kept_tokens(w, params).into_iter().map(|p| p.0).collect();
        ids.sort_unstable();
        ids
    }

    fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!((a - b).abs() <= 1e-5, "{what}[{i}]: ours {a}, transformers {b}");
        }
    }

    #[test]
    fn sampling_repetition_penalty_matches_transformers() {
        let mut saw_repeat = false;
        for case in goldens() {
            let logits = floats(&case["logits"]);
            let (prompt, generated) = (ids(&case["prompt"]), ids(&case["generated"]));
            let h = history(&prompt, &generated);
            let mut distinct = h.tokens.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            saw_repeat |= distinct.len() < h.tokens.len();
            let p = SamplingParams {
                repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
                ..greedy()
            };
            let ours = process_logits(&logits, &p, 0, Some(&h));
            assert_close(
                &ours,
                &floats(&case["repetition_penalized"]),
                "repetition_penalized",
            );
        }
        assert!(saw_repeat, "the goldens test a token seen twice");
    }

    #[test]
    fn sampling_warpers_keep_what_transformers_keeps() {
        for (i, case) in goldens().iter().enumerate() {
            let logits = floats(&case["logits"]);
            let temperature = case["temperature"].as_f64().unwrap() as f32;
            let warm = SamplingParams {
                temperature,
                ..Default::default()
            };
            // Temperature: our unnormalised probabilities against exp(scaled - max) of transformers'.
            let scaled = floats(&case["temperature_scaled"]);
            let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let theirs: Vec<f32> = scaled.iter().map(|l| (l - max).exp()).collect();
            let mut ours = kept_tokens(&logits, &warm);
            ours.sort_by_key(|p| p.0);
            assert_close(
                &ours.iter().map(|p| p.1).collect::<Vec<_>>(),
                &theirs,
                "temperature",
            );
            let f = |k: &str| case[k].as_f64().unwrap() as f32;
            let top_k = SamplingParams {
                top_k: case["top_k"].as_u64().unwrap() as usize,
                ..warm.clone()
            };
            assert_eq!(
                kept_ids(&logits, &top_k),
                ids(&case["top_k_kept"]),
                "case {i} top_k"
            );
            let top_p = SamplingParams {
                top_p: f("top_p"),
                ..warm.clone()
            };
            assert_eq!(
                kept_ids(&logits, &top_p),
                ids(&case["top_p_kept"]),
                "case {i} top_p"
            );
            let min_p = SamplingParams {
                min_p: f("min_p"),
                ..warm.clone()
            };
            assert_eq!(
                kept_ids(&logits, &min_p),
                ids(&case["min_p_kept"]),
                "case {i} min_p"
            );
            let c = &case["chain"];
            let chain = SamplingParams {
                top_k: c["top_k"].as_u64().unwrap() as usize,
                top_p: c["top_p"].as_f64().unwrap() as f32,
                min_p: c["min_p"].as_f64().unwrap() as f32,
                ..warm
            };
            assert_eq!(kept_ids(&logits, &chain), ids(&c["kept"]), "case {i} chain");
        }
    }

    #[test]
    fn sampling_raw_logprobs_match_torch_log_softmax() {
        for case in goldens() {
            let logits = floats(&case["logits"]);
            let theirs = floats(&case["log_softmax"]);
            let mut order: Vec<u32> = (0..theirs.len() as u32).collect();
            order.sort_by(|&a, &b| theirs[b as usize].total_cmp(&theirs[a as usize]).then(a.cmp(&b)));
            for k in [0, 1, 5, MAX_TOP_LOGPROBS] {
                let lp = raw_logprobs(&logits, 7, k);
                assert!((lp.logprob - theirs[7]).abs() <= 1e-5);
                let top_ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
                assert_eq!(top_ids, order[..k]);
                for &(id, l) in &lp.top {
                    assert!(
                        (l - theirs[id as usize]).abs() <= 1e-5,
                        "{id}: {l} vs {}",
                        theirs[id as usize]
                    );
                }
            }
            // Raw means raw: bias, penalties and temperature leave the logprobs alone.
            let p = SamplingParams {
                temperature: 0.3,
                repetition_penalty: 1.5,
                logit_bias: Arc::from([(3u32, 50.0)]),
                logprobs: Some(2),
                ..Default::default()
            };
            let h = history(&ids(&case["prompt"]), &ids(&case["generated"]));
            let s = sample(&logits, &p, 0, Some(&h));
            assert_eq!(s.token, 3, "+50 forces token 3");
            let lp = s.logprobs.unwrap();
            assert!((lp.logprob - theirs[3]).abs() <= 1e-5);
            assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), order[..2]);
        }
    }

    #[test]
    fn sampling_presence_and_frequency_penalties_by_hand() {
        let logits = [1.0, 2.0, 3.0, -1.0, 0.5];
        // Prompt tokens (4, 4) are not penalised; generated: 1 once, 2 three times.
        let h = history(&[4, 4], &[2, 1, 2, 2]);
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..greedy()
        };
        let w = process_logits(&logits, &p, 4, Some(&h));
        assert_eq!(&w[..], &[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, -1.0, 0.5]);
        // Negative values reward repeats.
        let p = SamplingParams {
            presence_penalty: -2.0,
            frequency_penalty: -1.0,
            ..greedy()
        };
        let w = process_logits(&logits, &p, 4, Some(&h));
        assert_eq!(&w[..], &[1.0, 2.0 + 1.0 + 2.0, 3.0 + 3.0 + 2.0, -1.0, 0.5]);
        assert_eq!(sample(&logits, &p, 4, Some(&h)).token, 2);
        // Repetition counts the prompt too, once per distinct token, whatever the sign.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy()
        };
        let w = process_logits(&logits, &p, 4, Some(&h));
        assert_eq!(&w[..], &[1.0, 1.0, 1.5, -1.0, 0.25]);
        // Order: bias first, then the penalty sees the biased logit.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            logit_bias: Arc::from([(3u32, 3.0)]),
            ..greedy()
        };
        let h = history(&[3], &[]);
        assert_eq!(
            &process_logits(&logits, &p, 0, Some(&h))[..],
            &[1.0, 2.0, 3.0, 1.0, 0.5]
        );
    }

    #[test]
    fn sampling_everything_off_borrows_the_row() {
        let logits = [0.5, 2.0, -1.0];
        let h = history(&[1, 1], &[1]);
        for p in [greedy(), SamplingParams::default()] {
            assert!(matches!(process_logits(&logits, &p, 0, None), Cow::Borrowed(_)));
            assert!(matches!(
                process_logits(&logits, &p, 0, Some(&h)),
                Cow::Borrowed(_)
            ));
            assert_eq!(sample(&logits, &p, 0, None).logprobs, None);
        }
    }

    #[test]
    fn sampling_table_of_forced_and_trivial_cases() {
        let logits: Vec<f32> = (0..40).map(|i| ((i * 7919) % 113) as f32 / 10.0 - 5.0).collect();
        let best = argmax(&logits);
        let hot = |seed| SamplingParams {
            temperature: 1.5,
            seed,
            ..Default::default()
        };
        for seed in 0..50 {
            for n in 0..4 {
                let case = |p: SamplingParams| token(&logits, &p, n);
                assert_eq!(
                    case(SamplingParams {
                        top_k: 1,
                        ..hot(seed)
                    }),
                    best,
                    "top_k 1 is greedy"
                );
                assert_eq!(
                    case(SamplingParams {
                        min_p: 1.0,
                        ..hot(seed)
                    }),
                    best,
                    "min_p 1 keeps the max"
                );
                let bias = |b: f32| SamplingParams {
                    logit_bias: Arc::from([(17u32, b)]),
                    ..hot(seed)
                };
                assert_eq!(case(bias(100.0)), 17, "+100 forces");
                assert_ne!(case(bias(-100.0)), 17, "-100 bans");
                let banned = SamplingParams {
                    logit_bias: Arc::from([(best, -100.0)]),
                    ..greedy()
                };
                assert_ne!(case(banned), best);
            }
        }
        // Something other than the max is drawn when nothing cuts the tail.
        assert!((0..50).any(|seed| token(&logits, &hot(seed), 0) != best));
    }

    fn any_logits() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![-20.0f32..20.0, (-3i32..3).prop_map(|i| i as f32)],
            1..200,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// `top_p` sorts only the candidates its histogram finds and keeps exactly what sorting
        /// the whole row keeps: rows of 1 to 3,000 logits, flat or peaked (low temperatures),
        /// with ties, with and without `top_k`.
        #[test]
        fn sampling_top_p_keeps_what_a_full_sort_keeps(
            logits in prop::collection::vec(prop_oneof![-8.0f32..8.0, (-2i32..2).prop_map(|i| i as f32)], 1..3000),
            temperature in prop_oneof![0.05f32..0.5, 0.5f32..3.0], top_p in 0.0f32..1.0,
            top_k in prop_oneof![Just(0usize), 1usize..400],
        ) {
            let p = SamplingParams { temperature, top_p, top_k, ..Default::default() };
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut whole: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
                .collect();
            if top_k > 0 && top_k < whole.len() {
                whole.sort_by(likelier);
                whole.truncate(top_k);
            }
            let total: f64 = whole.iter().map(|q| q.1 as f64).sum();
            whole.sort_by(likelier);
            let mut mass = 0.0f64;
            let keep = whole
                .iter()
                .position(|q| {
                    mass += q.1 as f64;
                    mass >= top_p as f64 * total
                })
                .map_or(whole.len(), |i| i + 1);
            whole.truncate(keep);
            whole.retain(|q| q.1 > 0.0);
            prop_assert_eq!(kept_tokens(&logits, &p), whole);
        }

        /// Greedy with every processor off is the plain argmax (lowest id on a tie), and so is
        /// `top_k = 1` at any temperature; `min_p = 1` keeps only maxima.
        #[test]
        fn sampling_trivial_settings_are_greedy(logits in any_logits(), seed in any::<u64>(), n in 0usize..1000,
                                                temperature in 0.05f32..2.0) {
            let best = argmax(&logits);
            prop_assert_eq!(token(&logits, &greedy(), n), best);
            let hot = SamplingParams { temperature, seed, ..Default::default() };
            prop_assert_eq!(token(&logits, &SamplingParams { top_k: 1, ..hot.clone() }, n), best);
            let max = logits[best as usize];
            let kept = kept_tokens(&logits, &SamplingParams { min_p: 1.0, ..hot.clone() });
            prop_assert!(kept.iter().all(|p| logits[p.0 as usize] == max));
            let lp = raw_logprobs(&logits, best, MAX_TOP_LOGPROBS);
            prop_assert_eq!(lp.top.len(), logits.len().min(MAX_TOP_LOGPROBS));
            prop_assert_eq!(lp.top[0].0, best);
            prop_assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            let all = raw_logprobs(&logits, best, logits.len());
            let mass: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
            prop_assert!((mass - 1.0).abs() < 1e-4, "{}", mass);
        }

        /// A row that `needs_host_logits` leaves on the device samples exactly its plain argmax
        /// with no logprobs, whatever else is set; and every setting that changes the token or
        /// reports logprobs sends the row to the host.
        #[test]
        fn sampling_plain_greedy_rows_are_the_device_argmax(
            logits in any_logits(), n in 0usize..8, temperature in prop_oneof![Just(0.0f32), Just(1e-6f32), 0.0f32..2.0],
            min_tokens in 0usize..8, banned in any::<bool>(), bias in any::<bool>(), penalty in 0usize..4,
            logprobs in prop::option::of(0usize..5), top_k in 0usize..4, top_p in 0.1f32..1.0, seed in any::<u64>(),
        ) {
            let best = argmax(&logits);
            let p = SamplingParams {
                temperature, seed, min_tokens, top_k, top_p, logprobs,
                min_tokens_banned: if banned { Arc::from([best]) } else { Arc::from([]) },
                logit_bias: if bias { Arc::from([(best, -100.0f32)]) } else { Arc::from([]) },
                presence_penalty: if penalty == 1 { 2.0 } else { 0.0 },
                frequency_penalty: if penalty == 2 { 2.0 } else { 0.0 },
                repetition_penalty: if penalty == 3 { 2.0 } else { 1.0 },
                ..Default::default()
            };
            let h = history(&[], &[best]);
            let s = sample(&logits, &p, n, Some(&h));
            if !needs_host_logits(&p, n) {
                prop_assert_eq!(s.token, best);
                prop_assert_eq!(s.logprobs, None);
            }
            let changes = temperature >= GREEDY_BELOW || bias || (banned && n < min_tokens) || penalty > 0
                || logprobs.is_some();
            prop_assert_eq!(needs_host_logits(&p, n), changes);
        }

        /// The edits of a history whose last token only the device knows, applied with that
        /// token, are bit for bit those of the whole history (overlapped steps feed penalised
        /// rows on the device): whether the token was seen in the prompt, generated before or
        /// new, with any mix of bias, ban and penalties.
        #[test]
        fn sampling_fed_token_edits_are_the_whole_history_edits(
            logits in prop::collection::vec(-20.0f32..20.0, 12), prompt in prop::collection::vec(0u32..12, 0..5),
            generated in prop::collection::vec(0u32..12, 0..6), fed in 0u32..14, n in 0usize..6,
            repetition in prop_oneof![Just(1.0f32), 0.5f32..2.0], presence in prop_oneof![Just(0.0f32), -2.0f32..2.0],
            frequency in prop_oneof![Just(0.0f32), -2.0f32..2.0], bias in prop::option::of((0u32..12, -3.0f32..3.0)),
            banned in prop::option::of(0u32..12),
        ) {
            let p = SamplingParams {
                repetition_penalty: repetition, presence_penalty: presence, frequency_penalty: frequency,
                logit_bias: bias.map_or_else(|| Arc::from([]), |b| Arc::from([b])),
                min_tokens: 3, min_tokens_banned: banned.map_or_else(|| Arc::from([]), |b| Arc::from([b])),
                ..greedy()
            };
            let before = history(&prompt, &generated);
            let whole = history(&prompt, &[&generated[..], &[fed]].concat());
            let mut want = logits.clone();
            apply_edits(&mut want, &logit_edits(&p, n, Some(&whole)), None);
            let mut got = logits.clone();
            apply_edits(&mut got, &logit_edits_fed(&p, n, &before), Some(fed));
            let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got), bits(&want));
        }
    }
}
