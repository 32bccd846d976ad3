//! A temperature draw of a logits row where the logits are: one cube per drawn row walks its
//! vocabulary once and keeps the token with the largest `l / temperature - ln(-ln u)` (the
//! Gumbel-max trick, `sampling::device_draw`, whose hash of `(key, id)` it computes bit for bit).
//!
//! Why: a temperature request otherwise brings its whole row back to the host, 0.5 MB per row
//! with a 128,256-token vocabulary (65 MB per step at 128 sequences), and the host walks it.
//! Here only the token id comes back, as for greedy rows. Greedy rows' argmax runs the same
//! walk and reduction without the noise ([`launch_argmax`]).

use cubecl::prelude::*;

use super::Refused;

/// Units per drawn row (a power of two, for the tree reduction).
const UNITS: usize = 256;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn draw_kernel(
    logits: &Array<f32>,
    rows: &Array<u32>,
    params: &Array<f32>,
    keys: &Array<u32>,
    ids: &mut Array<i32>,
    vocab: u32,
    #[comptime] any_cuts: bool,
) {
    let (d, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let vocab = vocab as usize;
    let base = rows[d] as usize * vocab;
    let temperature = params[4 * d];
    let (lo, hi) = (keys[2 * d], keys[2 * d + 1]);
    // With cuts, a token is kept when its probability relative to the row's most likely,
    // `exp((l - max) / temperature)`, is at least `floor` (0 keeps every token).
    let mut row_max = f32::new(0.0);
    let mut floor = f32::new(0.0);
    if comptime!(any_cuts) {
        row_max = cube_reduce(row_local_max(logits, base, vocab), true);
        floor = kept_floor(logits, base, vocab, temperature, row_max, params, d);
    }
    // f32::MIN stands for minus infinity (WGSL cannot spell it); a -inf logit never wins.
    let mut best_score = f32::new(-3.402_823_5e38);
    let mut best_id = 0u32;
    let mut i = u;
    while i < vocab {
        let mut x = (i as u32 ^ lo) * 0x9E37_79B1u32;
        x ^= x >> 16u32;
        x *= 0x85EB_CA6Bu32;
        x ^= x >> 13u32;
        x ^= hi;
        x *= 0xC2B2_AE35u32;
        x ^= x >> 16u32;
        let uniform = (f32::cast_from(x >> 8u32) + 0.5) / 16_777_216.0;
        let l = logits[base + i];
        let score = l / temperature - (-uniform.ln()).ln();
        let mut kept = true;
        if comptime!(any_cuts) {
            kept = ((l - row_max) / temperature).exp() >= floor;
        }
        // Ids grow along a unit's walk: a strict `>` keeps the lowest id of a tie (and skips NaN).
        if kept && score > best_score {
            best_score = score;
            best_id = i as u32;
        }
        i += UNITS;
    }
    let best = cube_best(best_score, best_id);
    if u == 0 {
        ids[d] = best as i32;
    }
}

/// The largest logit a unit sees on its walk of the row.
#[cube]
fn row_local_max(logits: &Array<f32>, base: usize, vocab: usize) -> f32 {
    let mut local = f32::new(-3.402_823_5e38);
    let mut i = UNIT_POS_X as usize;
    while i < vocab {
        local = max(local, logits[base + i]);
        i += UNITS;
    }
    local
}

/// The smallest relative probability `p = exp((l - row_max) / temperature)` draw `d` keeps
/// (`params[4d + 1..4d + 4]`: top-k as a float, top-p, min-p), as `sampling::kept_tokens` cuts:
/// - top-k: the k-th largest `p`, the largest `v` with `count(p >= v) >= k`;
/// - top-p: the largest `v` (at least top-k's) with `Σ(p >= v) p >= top_p · Σ(kept by top-k) p`;
/// - min-p: `min_p` itself, the most likely token having `p = 1`.
///
/// Both searches bisect the bits of `v` ([`bisect_floor`]): 30 passes over the row each, a sort
/// of it never. Tokens tied at the boundary are all kept (the host keeps the lower ids of a tie
/// up to the count).
#[cube]
fn kept_floor(
    logits: &Array<f32>,
    base: usize,
    vocab: usize,
    temperature: f32,
    row_max: f32,
    params: &Array<f32>,
    d: usize,
) -> f32 {
    let (top_k, top_p, min_p) = (params[4 * d + 1], params[4 * d + 2], params[4 * d + 3]);
    let mut floor = f32::new(0.0);
    // Every unit gets the same sums, so the bisections' branches and barriers are uniform.
    if top_k >= 1.0 && top_k < f32::cast_from(vocab) {
        floor = bisect_floor(logits, base, vocab, temperature, row_max, 0u32, top_k, false);
    }
    if top_p < 1.0 {
        let kept = row_total(logits, base, vocab, temperature, row_max, floor, true);
        let low = u32::reinterpret::<f32>(floor);
        floor = bisect_floor(logits, base, vocab, temperature, row_max, low, top_p * kept, true);
    }
    max(floor, min_p)
}

/// The largest `v` from the bits `low` up (where the condition holds) with
/// `Σ(p >= v) weight(p) >= target`, `weight` being `p` itself (`mass`) or 1: the bits of floats in
/// `[0, 1]` order as their values do, and just above 1.0 no token is left.
#[cube]
#[allow(clippy::too_many_arguments)]
fn bisect_floor(
    logits: &Array<f32>,
    base: usize,
    vocab: usize,
    temperature: f32,
    row_max: f32,
    low: u32,
    target: f32,
    #[comptime] mass: bool,
) -> f32 {
    let mut low = low;
    let mut high = 0x3F80_0001u32;
    while low + 1 < high {
        let mid = low + (high - low) / 2;
        let v = f32::reinterpret::<u32>(mid);
        if row_total(logits, base, vocab, temperature, row_max, v, mass) >= target {
            low = mid;
        } else {
            high = mid;
        }
    }
    f32::reinterpret::<u32>(low)
}

/// `Σ(p >= v) weight(p)` over the row, `weight` being `p` itself (`mass`) or 1, for every unit.
#[cube]
fn row_total(
    logits: &Array<f32>,
    base: usize,
    vocab: usize,
    temperature: f32,
    row_max: f32,
    v: f32,
    #[comptime] mass: bool,
) -> f32 {
    let mut total = 0.0f32;
    let mut i = UNIT_POS_X as usize;
    while i < vocab {
        let p = ((logits[base + i] - row_max) / temperature).exp();
        if p >= v {
            if comptime!(mass) {
                total += p;
            } else {
                total += 1.0;
            }
        }
        i += UNITS;
    }
    cube_reduce(total, false)
}

/// The sum (or with `largest`, the largest) of every unit's `x`, for every unit, by a tree in
/// shared memory (in a fixed order).
#[cube]
fn cube_reduce(x: f32, #[comptime] largest: bool) -> f32 {
    let u = UNIT_POS_X as usize;
    let mut partial = SharedMemory::<f32>::new(UNITS);
    partial[u] = x;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if u < stride {
            if comptime!(largest) {
                partial[u] = max(partial[u], partial[u + stride]);
            } else {
                partial[u] += partial[u + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = partial[0];
    // Everyone has read the total before a next call writes over it.
    sync_cube();
    total
}

/// The cube's best of its units' `(score, id)`: the largest score, the lowest id of a tie, by a
/// tree reduction in shared memory. Every unit gets the winner's id.
#[cube]
fn cube_best(score: f32, id: u32) -> u32 {
    let u = UNIT_POS_X as usize;
    let mut scores = SharedMemory::<f32>::new(UNITS);
    let mut best = SharedMemory::<u32>::new(UNITS);
    scores[u] = score;
    best[u] = id;
    sync_cube();
    // `CUBE_DIM_X`, not the constant: a loop variable must be a runtime value.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if u < stride {
            let (s, i) = (scores[u + stride], best[u + stride]);
            if s > scores[u] || (s == scores[u] && i < best[u]) {
                scores[u] = s;
                best[u] = i;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let winner = best[0];
    // Everyone has read the winner before a next call writes over it.
    sync_cube();
    winner
}

/// The raw logprobs of a row, as `sampling::raw_logprobs` computes them on the host: the chosen
/// token's `l - lse` (`lse` = max + ln Σ exp(l - max), in f32 here, f64 there) and the `top`
/// largest logits' ids and logprobs, most likely first, the lower id of a tie first. Draw `d`
/// reads row `rows[d]` and its chosen id `ids[id_at[d]]` (the step's argmax and draw ids, where
/// they are), and writes `1 + 2 * top` floats at `out[d * (1 + 2 * top)]`: the logprob, then
/// `(id, logprob)` pairs (ids are exact as f32 below 2^24). One pass for the max, one for the
/// sum, one per top entry (at most 20, OpenAI's limit); a row needs at least `top` finite logits.
#[cube(launch_unchecked)]
fn logprobs_kernel(
    logits: &Array<f32>,
    rows: &Array<u32>,
    ids: &Array<i32>,
    id_at: &Array<u32>,
    out: &mut Array<f32>,
    vocab: u32,
    #[comptime] top: usize,
) {
    let (d, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let vocab = vocab as usize;
    let base = rows[d] as usize * vocab;
    let at = d * (1 + 2 * top);
    let row_max = cube_reduce(row_local_max(logits, base, vocab), true);
    let mut sum = 0.0f32;
    let mut i = u;
    while i < vocab {
        sum += (logits[base + i] - row_max).exp();
        i += UNITS;
    }
    let lse = row_max + cube_reduce(sum, false).ln();
    if u == 0 {
        let token = ids[id_at[d] as usize] as usize;
        out[at] = logits[base + token] - lse;
    }
    // Each entry is the best of what comes after the previous one in (logit down, id up) order.
    let mut previous = f32::new(3.402_823_5e38);
    let mut previous_id = 0u32;
    for j in 0..top {
        let mut best_score = f32::new(-3.402_823_5e38);
        let mut best_id = 0u32;
        let mut i = u;
        while i < vocab {
            let l = logits[base + i];
            let after = l < previous || (l == previous && i as u32 > previous_id);
            if after && l > best_score {
                best_score = l;
                best_id = i as u32;
            }
            i += UNITS;
        }
        let id = cube_best(best_score, best_id);
        previous = logits[base + id as usize];
        previous_id = id;
        if u == 0 {
            out[at + 1 + 2 * j] = f32::cast_from(id);
            out[at + 2 + 2 * j] = previous - lse;
        }
    }
}

/// Queues the logprobs of `n` rows (see `logprobs_kernel`): `logits` holds `logits_rows`
/// contiguous f32 rows of `vocab`, `rows` and `id_at` (u32) one entry per row, `ids` (i32) the
/// step's chosen ids (`ids_len` of them), `out` `n * (1 + 2 * top)` f32.
pub fn launch_logprobs<R: Runtime>(
    client: &ComputeClient<R>,
    [logits, rows, ids, id_at, out]: [cubecl::server::Handle; 5],
    (n, logits_rows, vocab, ids_len): (usize, usize, usize, usize),
    top: usize,
) -> Result<(), Refused> {
    if n == 0 {
        return Ok(());
    }
    if top > crate::sampling::MAX_TOP_LOGPROBS || top >= vocab {
        return Err(Refused(format!("{top} top logprobs of a vocabulary of {vocab}")));
    }
    let cubes = cube_per_row(n, logits_rows, vocab)
        .ok_or_else(|| Refused(format!("logprobs of {n} rows of {vocab}")))?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract: every `rows[d]` is
    // below `logits_rows`, every `id_at[d]` below `ids_len` and every id below `vocab`).
    unsafe {
        queue_kernel!(
            logprobs_kernel::LogprobsKernel<R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(UNITS as u32),
            ),
            args [
                Array<f32> = ArrayArg::from_raw_parts(logits, logits_rows * vocab),
                Array<u32> = ArrayArg::from_raw_parts(rows, n),
                Array<i32> = ArrayArg::from_raw_parts(ids, ids_len),
                Array<u32> = ArrayArg::from_raw_parts(id_at, n),
                Array<f32> = ArrayArg::from_raw_parts(out, n * (1 + 2 * top)),
                u32 = vocab as u32,
            ],
            comptime [top],
        );
    }
    Ok(())
}

/// `sampling::LogitEdit` kinds as the edit kernel reads them.
pub const EDIT_ADD: u32 = 0;
pub const EDIT_BAN: u32 = 1;
pub const EDIT_REPEAT: u32 = 2;
pub const EDIT_ADD_UNLESS_FED: u32 = 3;
pub const EDIT_ADD_IF_FED: u32 = 4;
pub const EDIT_REPEAT_FED_UNLESS_SEEN: u32 = 5;
pub const EDIT_ADD_FED_UNLESS_GENERATED: u32 = 6;

/// `fed_at` of a row without a fed token.
pub const NO_FED: u32 = u32::MAX;

/// An edit as the kernel reads it: its kind, its id (none for the fed token's own) and its value.
pub fn edit_parts(edit: &crate::sampling::LogitEdit) -> (u32, u32, f32) {
    use crate::sampling::LogitEdit;
    match *edit {
        LogitEdit::Add { id, value } => (EDIT_ADD, id, value),
        LogitEdit::Ban { id } => (EDIT_BAN, id, 0.0),
        LogitEdit::Repeat { id, penalty } => (EDIT_REPEAT, id, penalty),
        LogitEdit::AddUnlessFed { id, value } => (EDIT_ADD_UNLESS_FED, id, value),
        LogitEdit::AddIfFed { id, value } => (EDIT_ADD_IF_FED, id, value),
        LogitEdit::RepeatFedUnlessSeen { penalty } => (EDIT_REPEAT_FED_UNLESS_SEEN, u32::MAX, penalty),
        LogitEdit::AddFedUnlessGenerated { value } => (EDIT_ADD_FED_UNLESS_GENERATED, u32::MAX, value),
    }
}

/// Row `d` of `out` is row `rows[d]` of `logits` with its edits applied in order, as
/// `sampling::apply_edits` does: edits `starts[d] .. starts[d + 1]`, each a kind and an id in
/// `ops` and a value in `values`; the row's fed token is `fed_ids[fed_at[d]]` (none where
/// `fed_at[d]` is [`NO_FED`]). The cube copies the row, then one unit walks the edits (a
/// request's list is short beside the row, and its order is the host's).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn edit_kernel(
    logits: &Array<f32>,
    rows: &Array<u32>,
    starts: &Array<u32>,
    ops: &Array<u32>,
    values: &Array<f32>,
    fed_ids: &Array<i32>,
    fed_at: &Array<u32>,
    out: &mut Array<f32>,
    vocab: u32,
) {
    let (d, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let (src, dst) = (rows[d] as usize * vocab as usize, d * vocab as usize);
    let mut i = u;
    while i < vocab as usize {
        out[dst + i] = logits[src + i];
        i += UNITS;
    }
    // The block's writes are visible to its units past the barrier.
    sync_cube();
    if u == 0 {
        // Minus infinity, made at run time: WGSL cannot spell it.
        let banned = f32::new(-1.0) / (f32::cast_from(vocab) * 0.0);
        // No fed token: `vocab`, an id that no edit applies to.
        let mut fed = vocab;
        if fed_at[d] != NO_FED {
            fed = u32::cast_from(fed_ids[fed_at[d] as usize]);
        }
        // Whether a `Repeat` of the fed token, or an `AddIfFed` of it, came before.
        let mut seen = false;
        let mut generated = false;
        for e in starts[d]..starts[d + 1] {
            let (kind, listed, value) = (ops[2 * e as usize], ops[2 * e as usize + 1], values[e as usize]);
            let mut id = listed;
            let mut applies = true;
            if kind == EDIT_REPEAT {
                seen = seen || listed == fed;
            } else if kind == EDIT_ADD_UNLESS_FED {
                applies = listed != fed;
            } else if kind == EDIT_ADD_IF_FED {
                applies = listed == fed;
                generated = generated || applies;
            } else if kind == EDIT_REPEAT_FED_UNLESS_SEEN {
                id = fed;
                applies = !seen;
            } else if kind == EDIT_ADD_FED_UNLESS_GENERATED {
                id = fed;
                applies = !generated;
            }
            if applies && id < vocab {
                let at = dst + id as usize;
                let l = out[at];
                if kind == EDIT_BAN {
                    out[at] = banned;
                } else if kind == EDIT_REPEAT || kind == EDIT_REPEAT_FED_UNLESS_SEEN {
                    if l < 0.0 {
                        out[at] = l * value;
                    } else {
                        out[at] = l / value;
                    }
                } else {
                    out[at] = l + value;
                }
            }
        }
    }
}

/// Queues the edited copies of `n` rows (see `edit_kernel`): `logits` holds `logits_rows`
/// contiguous f32 rows of `vocab`, `rows` (u32) `n` row indices, `starts` (u32) `n + 1` offsets
/// into the `edits` edits (`ops`: u32 pairs, `values`: f32), `fed_ids` (i32) `fed_len` ids and
/// `fed_at` (u32) `n` indices into them or [`NO_FED`], `out` `n * vocab` f32.
pub fn launch_edits<R: Runtime>(
    client: &ComputeClient<R>,
    [logits, rows, starts, ops, values, fed_ids, fed_at, out]: [cubecl::server::Handle; 8],
    (n, logits_rows, vocab, edits, fed_len): (usize, usize, usize, usize, usize),
) -> Result<(), Refused> {
    if n == 0 {
        return Ok(());
    }
    let cubes = cube_per_row(n, logits_rows.max(n), vocab)
        .ok_or_else(|| Refused(format!("edits of {n} rows of {vocab}")))?;
    if u32::try_from(edits).is_err() || vocab as u64 >= NO_FED as u64 {
        return Err(Refused(format!("{edits} logit edits over {vocab} ids")));
    }
    // SAFETY: the arrays' lengths are the handles' (the caller's contract: every `rows[d]` below
    // `logits_rows`, `starts` ascending up to `edits`, every `fed_at[d]` below `fed_len` or
    // `NO_FED`); ids past the vocabulary are skipped.
    unsafe {
        queue_kernel!(
            edit_kernel::EditKernel<R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(UNITS as u32),
            ),
            args [
                Array<f32> = ArrayArg::from_raw_parts(logits, logits_rows * vocab),
                Array<u32> = ArrayArg::from_raw_parts(rows, n),
                Array<u32> = ArrayArg::from_raw_parts(starts, n + 1),
                Array<u32> = ArrayArg::from_raw_parts(ops, 2 * edits.max(1)),
                Array<f32> = ArrayArg::from_raw_parts(values, edits.max(1)),
                Array<i32> = ArrayArg::from_raw_parts(fed_ids, fed_len.max(1)),
                Array<u32> = ArrayArg::from_raw_parts(fed_at, n),
                Array<f32> = ArrayArg::from_raw_parts(out, n * vocab),
                u32 = vocab as u32,
            ],
        );
    }
    Ok(())
}

/// The argmax of each logits row, one cube per row: what greedy rows need, with the same
/// tie-break as the host's sampler (the lowest id). It reads the logits in the model's type, so
/// that a greedy step needs no launch to cast them to f32 first; the cast is exact, so the
/// choice is the same.
#[cube(launch_unchecked)]
fn argmax_kernel<F: Float>(
    logits: &Array<F>,
    ids: &mut Array<i32>,
    vocab: u32,
    #[define(F)] _dtype: StorageType,
) {
    let (r, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let vocab = vocab as usize;
    let base = r * vocab;
    let mut best_score = f32::new(-3.402_823_5e38);
    let mut best_id = 0u32;
    let mut i = u;
    while i < vocab {
        // Coalesced: the cube's units read 256 neighbouring logits per pass.
        let score = f32::cast_from(logits[base + i]);
        if score > best_score {
            best_score = score;
            best_id = i as u32;
        }
        i += UNITS;
    }
    let best = cube_best(best_score, best_id);
    if u == 0 {
        ids[r] = best as i32;
    }
}

/// Queues the argmax of each of `rows` contiguous rows of `vocab` in `logits` (of `dtype`, a
/// float), into `ids` (i32, one per row).
///
/// Why: burn 0.21's `argmax`, without autotune, reduces each row with a single unit (cubek's
/// `Unit` routine): one thread walks 128,256 logits, a serial pass of milliseconds per step.
pub fn launch_argmax<R: Runtime>(
    client: &ComputeClient<R>,
    [logits, ids]: [cubecl::server::Handle; 2],
    (rows, vocab): (usize, usize),
    dtype: StorageType,
) -> Result<(), Refused> {
    if rows == 0 {
        return Ok(());
    }
    let cubes = cube_per_row(rows, rows, vocab)
        .ok_or_else(|| Refused(format!("the argmax of {rows} rows of {vocab}")))?;
    // SAFETY: `logits` holds `rows * vocab` of `dtype` and `ids` `rows` i32 (the caller's contract);
    // cube `r` reads row `r` below `vocab` and writes `ids[r]`.
    unsafe {
        queue_kernel!(
            argmax_kernel::ArgmaxKernel<R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(UNITS as u32),
            ),
            define [F = dtype],
            args [
                Array<F> = ArrayArg::from_raw_parts(logits, rows * vocab),
                Array<i32> = ArrayArg::from_raw_parts(ids, rows),
                u32 = vocab as u32,
            ],
            comptime [dtype],
        );
    }
    Ok(())
}

/// The cube count of a launch with one cube per row, each reading a row of `vocab` logits out of
/// `logits_rows`; `None` when the vocabulary is empty or the indices would not fit 32 bits.
fn cube_per_row(rows: usize, logits_rows: usize, vocab: usize) -> Option<u32> {
    let cubes = u32::try_from(rows).ok()?;
    let fits = vocab > 0 && i32::try_from(vocab).is_ok() && u32::try_from(logits_rows * vocab).is_ok();
    (fits && cubes <= super::MAX_CUBES_PER_DIM).then_some(cubes)
}

/// Queues the draws: `logits` holds contiguous f32 rows of `vocab`; draw `d` takes row `rows[d]`
/// (u32) with the parameters `params[4d..4d + 4]` (f32: the temperature, above 0; top-k, 0 for
/// none; top-p, 1 for none; min-p, 0 for none: one upload for all) and the key halves `keys[2d]`
/// (low) and `keys[2d + 1]` (high), and writes its token id to `ids[d]` (i32). Without
/// `any_cuts` the cuts are never read and every draw is over its whole row: one pass, where a
/// cut costs up to 61.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [logits, rows, params, keys, ids]: [cubecl::server::Handle; 5],
    (draws, logits_rows, vocab): (usize, usize, usize),
    any_cuts: bool,
) -> Result<(), Refused> {
    if draws == 0 {
        return Ok(());
    }
    let cubes = cube_per_row(draws, logits_rows, vocab)
        .ok_or_else(|| Refused(format!("{draws} draws from {logits_rows} rows of {vocab}")))?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract: every `rows[d]` is
    // below `logits_rows`); the kernel reads row `rows[d]` below `vocab` and writes `ids[d]`.
    unsafe {
        queue_kernel!(
            draw_kernel::DrawKernel<R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(UNITS as u32),
            ),
            args [
                Array<f32> = ArrayArg::from_raw_parts(logits, logits_rows * vocab),
                Array<u32> = ArrayArg::from_raw_parts(rows, draws),
                Array<f32> = ArrayArg::from_raw_parts(params, 4 * draws),
                Array<u32> = ArrayArg::from_raw_parts(keys, 2 * draws),
                Array<i32> = ArrayArg::from_raw_parts(ids, draws),
                u32 = vocab as u32,
            ],
            comptime [any_cuts],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;
    use crate::sampling::{device_draw, DrawCuts};

    /// One draw: its row, temperature, cuts and key.
    type Draw = (u32, f32, DrawCuts, u64);

    /// The kernel's tokens for `draws` of `logits` (rows of `vocab`).
    fn draw_on_gl(logits: &[f32], vocab: usize, draws: &[Draw], any_cuts: bool) -> Vec<i32> {
        let client = gl::client();
        let rows: Vec<u32> = draws.iter().map(|d| d.0).collect();
        let params: Vec<f32> = draws
            .iter()
            .flat_map(|d| [d.1, d.2.top_k as f32, d.2.top_p, d.2.min_p])
            .collect();
        let keys: Vec<u32> = draws
            .iter()
            .flat_map(|d| [d.3 as u32, (d.3 >> 32) as u32])
            .collect();
        let ids = client.empty(draws.len() * 4);
        let handles = [
            gl::upload(&client, logits),
            client.create_from_slice(u32::as_bytes(&rows)),
            gl::upload(&client, &params),
            client.create_from_slice(u32::as_bytes(&keys)),
            ids.clone(),
        ];
        let shape = (draws.len(), logits.len() / vocab, vocab);
        launch(&client, handles, shape, any_cuts).unwrap();
        i32::from_bytes(&client.read_one(ids).expect("read back the ids")).to_vec()
    }

    /// The host reference's tokens (`sampling::device_draw`).
    fn draw_on_host(logits: &[f32], vocab: usize, draws: &[Draw]) -> Vec<i32> {
        draws
            .iter()
            .map(|&(row, t, cuts, key)| {
                let row = &logits[row as usize * vocab..(row as usize + 1) * vocab];
                device_draw(row, t, cuts, key) as i32
            })
            .collect()
    }

    #[test]
    fn kernels_sample_draws_the_token_of_the_host_reference() {
        // A vocabulary that is not a multiple of the cube, a -inf logit, rows drawn twice with
        // other keys and temperatures.
        let (logits_rows, vocab) = (3, 1000);
        let mut logits: Vec<f32> = gl::values(logits_rows * vocab, 5)
            .iter()
            .map(|v| v * 4.0)
            .collect();
        logits[vocab + 17] = f32::NEG_INFINITY;
        let draws: Vec<Draw> = (0..24u64)
            .map(|d| {
                (
                    (d % 3) as u32,
                    [0.5f32, 1.0, 1.7][(d / 3 % 3) as usize],
                    DrawCuts::NONE,
                    d * 0x1234_5678_9ABC + 11,
                )
            })
            .collect();
        let got = draw_on_gl(&logits, vocab, &draws, false);
        assert_eq!(got, draw_on_host(&logits, vocab, &draws));
        // The launch that can cut draws the uncut ones the same.
        assert_eq!(draw_on_gl(&logits, vocab, &draws, true), got);
        // Different keys really draw different tokens.
        let distinct: std::collections::HashSet<i32> = got.iter().copied().collect();
        assert!(distinct.len() > 3, "{got:?}");
    }

    #[test]
    fn kernels_sample_draws_within_top_k_top_p_and_min_p_as_the_host() {
        // Distinct logits in [-4, 4) (1,000 of the 2,001 values `gl::values` takes), one -inf.
        let (logits_rows, vocab) = (2, 1000);
        let mut logits: Vec<f32> = gl::values(logits_rows * vocab, 3)
            .iter()
            .map(|v| v * 4.0)
            .collect();
        logits[vocab + 5] = f32::NEG_INFINITY;
        let cut = |top_k, top_p, min_p| DrawCuts { top_k, top_p, min_p };
        let cuts = [
            cut(1, 1.0, 0.0),
            cut(7, 1.0, 0.0),
            cut(999, 1.0, 0.0),
            cut(0, 0.05, 0.0),
            cut(0, 0.5, 0.0),
            cut(0, 0.9, 0.0),
            cut(0, 1.0, 0.2),
            cut(50, 0.6, 0.0),
            cut(200, 0.9, 0.1),
            DrawCuts::NONE,
        ];
        // The likeliest-first running mass of a row's tokens that top-k keeps, in f64.
        let running_mass = |row: u32, t: f32, top_k: usize| {
            let row = &logits[row as usize * vocab..(row as usize + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut p: Vec<f64> = row.iter().map(|&l| ((l as f64 - max) / t as f64).exp()).collect();
            p.sort_by(|a, b| b.total_cmp(a));
            if top_k > 0 {
                p.truncate(top_k);
            }
            let total: f64 = p.iter().sum();
            p.iter()
                .scan(0.0, |mass, q| {
                    *mass += q / total;
                    Some(*mass)
                })
                .collect::<Vec<f64>>()
        };
        let mut draws: Vec<Draw> = Vec::new();
        for (c, &cuts) in cuts.iter().enumerate() {
            for (r, t) in [(0u32, 1.0f32), (1, 0.5), (0, 1.7)] {
                let mut cuts = cuts;
                if cuts.top_p < 1.0 {
                    // Halfway between the running masses around the asked top-p, so that f32's
                    // rounding of the host's running sum and the kernel's sums (in another
                    // order) cut at the same token.
                    let mass = running_mass(r, t, cuts.top_k);
                    let j = mass.iter().position(|&m| m >= cuts.top_p as f64).unwrap();
                    let below = if j == 0 { 0.0 } else { mass[j - 1] };
                    cuts.top_p = ((below + mass[j]) / 2.0) as f32;
                    assert!(
                        mass[j] - below > 1e-5,
                        "{cuts:?} at T {t}: steps of {}",
                        mass[j] - below
                    );
                }
                for k in 0..3u64 {
                    draws.push((r, t, cuts, (c as u64 * 31 + k) * 0x9E37_79B9_7F4A + 5));
                }
            }
        }
        let got = draw_on_gl(&logits, vocab, &draws, true);
        assert_eq!(got, draw_on_host(&logits, vocab, &draws));
        // The cuts changed draws: top-k 1 is the argmax, and many draws are not the uncut one (the
        // mild cuts, top-k 999 and top-p 0.9, and the uncut draws change few or none).
        let uncut: Vec<Draw> = draws
            .iter()
            .map(|&(r, t, _, k)| (r, t, DrawCuts::NONE, k))
            .collect();
        let free = draw_on_host(&logits, vocab, &uncut);
        for (i, d) in draws.iter().enumerate().filter(|(_, d)| d.2.top_k == 1) {
            let row = &logits[d.0 as usize * vocab..(d.0 as usize + 1) * vocab];
            assert_eq!(got[i], crate::sampling::argmax(row) as i32);
        }
        let changed = got.iter().zip(&free).filter(|(a, b)| a != b).count();
        assert!(
            changed > draws.len() / 4,
            "{changed} of {} draws changed",
            draws.len()
        );
    }

    #[test]
    fn kernels_sample_argmax_is_the_host_argmax() {
        let client = gl::client();
        // A vocabulary that is not a multiple of the cube; ties (the lowest id wins), a -inf
        // logit, a row whose maximum is its last logit, and a row of equal logits.
        let (rows, vocab) = (5, 1003);
        let mut logits: Vec<f32> = gl::values(rows * vocab, 9).iter().map(|v| v * 4.0).collect();
        logits[17] = 9.0;
        logits[700] = 9.0;
        logits[vocab + 3] = f32::NEG_INFINITY;
        logits[3 * vocab - 1] = 50.0;
        logits[3 * vocab..4 * vocab].fill(0.25);
        let ids = client.empty(rows * 4);
        let handles = [gl::upload(&client, &logits), ids.clone()];
        launch_argmax(
            &client,
            handles,
            (rows, vocab),
            f32::as_type_native_unchecked().storage_type(),
        )
        .unwrap();
        let got = i32::from_bytes(&client.read_one(ids).expect("read back the ids")).to_vec();
        let want: Vec<i32> = logits
            .chunks(vocab)
            .map(|row| crate::sampling::argmax(row) as i32)
            .collect();
        assert_eq!(got, want);
        assert_eq!((got[0], got[2], got[3]), (17, vocab as i32 - 1, 0));
    }

    #[test]
    fn kernels_sample_logprobs_are_the_host_raw_logprobs() {
        let client = gl::client();
        // A vocabulary that is not a multiple of the cube; ties across the top (the lower id
        // first), a -inf logit; the chosen ids come from anywhere in an ids array.
        let (logits_rows, vocab) = (3, 1003);
        let mut logits: Vec<f32> = gl::values(logits_rows * vocab, 11)
            .iter()
            .map(|v| v * 6.0)
            .collect();
        logits[40] = 7.0;
        logits[900] = 7.0;
        logits[2] = 7.0;
        logits[vocab + 10] = f32::NEG_INFINITY;
        logits[2 * vocab + 1002] = 9.5;
        let ids: Vec<i32> = vec![5, 900, 1002, 10, 0, 333];
        // (row, index in `ids`)
        let draws: [(u32, u32); 5] = [(0, 1), (1, 3), (2, 2), (0, 0), (2, 5)];
        for top in [0usize, 1, 5, 20] {
            let out = client.empty(draws.len() * (1 + 2 * top) * 4);
            let rows: Vec<u32> = draws.iter().map(|d| d.0).collect();
            let id_at: Vec<u32> = draws.iter().map(|d| d.1).collect();
            let handles = [
                gl::upload(&client, &logits),
                client.create_from_slice(u32::as_bytes(&rows)),
                client.create_from_slice(i32::as_bytes(&ids)),
                client.create_from_slice(u32::as_bytes(&id_at)),
                out.clone(),
            ];
            launch_logprobs(
                &client,
                handles,
                (draws.len(), logits_rows, vocab, ids.len()),
                top,
            )
            .unwrap();
            let got = gl::download(&client, out);
            for (d, &(row, at)) in draws.iter().enumerate() {
                let row = &logits[row as usize * vocab..(row as usize + 1) * vocab];
                let want = crate::sampling::raw_logprobs(row, ids[at as usize] as u32, top);
                let got = &got[d * (1 + 2 * top)..(d + 1) * (1 + 2 * top)];
                // Draw 1 chose the -inf logit: its logprob is -inf on both sides.
                let close = got[0] == want.logprob || (got[0] - want.logprob).abs() < 1e-4;
                assert!(close, "top {top} draw {d}: {} vs {}", got[0], want.logprob);
                for (j, &(id, lp)) in want.top.iter().enumerate() {
                    assert_eq!(got[1 + 2 * j] as u32, id, "top {top} draw {d} entry {j}");
                    assert!((got[2 + 2 * j] - lp).abs() < 1e-4, "top {top} draw {d} entry {j}");
                }
            }
            if top >= 5 {
                // Row 0's three tied 7.0s, lower ids first.
                assert_eq!([got[1], got[3], got[5]], [2.0, 40.0, 900.0]);
            }
        }
        let handles = std::array::from_fn(|_| gl::upload(&client, &[0.0; 4]));
        assert!(
            launch_logprobs(&client, handles, (1, 1, 4, 1), 21).is_err(),
            "more than OpenAI's 20"
        );
    }

    #[test]
    fn kernels_sample_edits_are_the_host_process_logits() {
        use crate::sampling::{apply_edits, logit_edits_fed, LogitEdit, SamplingParams, TokenHistory};
        use std::sync::Arc;
        let client = gl::client();
        let (logits_rows, vocab) = (3, 700);
        let logits: Vec<f32> = gl::values(logits_rows * vocab, 13)
            .iter()
            .map(|v| v * 5.0)
            .collect();
        // Penalties of a history whose last token the device fed back (overlapped steps):
        // 11 was generated twice, 40 once, 7 is in the prompt only; a bias and a ban on 11.
        let fed_list = logit_edits_fed(
            &SamplingParams {
                repetition_penalty: 1.3,
                presence_penalty: 0.25,
                frequency_penalty: 0.5,
                logit_bias: Arc::from([(11u32, 0.5f32)]),
                ..SamplingParams::default()
            },
            4,
            &TokenHistory {
                tokens: Arc::from([7u32, 11, 40, 11]),
                prompt_len: 1,
            },
        );
        // Bias twice on one id (in order), a ban, repetition on a negative and a positive logit
        // (the sign picks the operation), a penalty after a repetition on the same id, ids past
        // the vocabulary, and a row without edits; then the fed list with a fed token generated
        // before, one in the prompt only, a new one, and none.
        let fed_ids: [i32; 4] = [123, 11, 7, 512];
        let edit_rows: [(u32, Vec<LogitEdit>, u32); 7] = [
            (
                2,
                vec![
                    LogitEdit::Add { id: 5, value: 1.25 },
                    LogitEdit::Add { id: 5, value: -0.5 },
                    LogitEdit::Ban { id: 9 },
                    LogitEdit::Repeat { id: 11, penalty: 1.3 },
                    LogitEdit::Repeat { id: 12, penalty: 1.3 },
                    LogitEdit::Add { id: 11, value: -0.75 },
                    LogitEdit::Add { id: 900, value: 3.0 },
                    LogitEdit::Ban { id: 700 },
                ],
                NO_FED,
            ),
            (0, Vec::new(), NO_FED),
            (
                2,
                vec![LogitEdit::Repeat {
                    id: 699,
                    penalty: 0.7,
                }],
                NO_FED,
            ),
            (1, fed_list.clone(), 1),
            (1, fed_list.clone(), 2),
            (0, fed_list.clone(), 3),
            (2, fed_list, NO_FED),
        ];
        let mut starts = vec![0u32];
        let (mut ops, mut values) = (Vec::new(), Vec::new());
        for (_, edits, _) in &edit_rows {
            for e in edits {
                let (kind, id, value) = edit_parts(e);
                ops.extend([kind, id]);
                values.push(value);
            }
            starts.push(values.len() as u32);
        }
        let rows: Vec<u32> = edit_rows.iter().map(|r| r.0).collect();
        let fed_at: Vec<u32> = edit_rows.iter().map(|r| r.2).collect();
        let out = client.empty(rows.len() * vocab * 4);
        let handles = [
            gl::upload(&client, &logits),
            client.create_from_slice(u32::as_bytes(&rows)),
            client.create_from_slice(u32::as_bytes(&starts)),
            client.create_from_slice(u32::as_bytes(&ops)),
            gl::upload(&client, &values),
            client.create_from_slice(i32::as_bytes(&fed_ids)),
            client.create_from_slice(u32::as_bytes(&fed_at)),
            out.clone(),
        ];
        let sizes = (rows.len(), logits_rows, vocab, values.len(), fed_ids.len());
        launch_edits(&client, handles, sizes).unwrap();
        let got = gl::download(&client, out);
        for (d, (row, edits, at)) in edit_rows.iter().enumerate() {
            let fed = (*at != NO_FED).then(|| fed_ids[*at as usize] as u32);
            let mut want = logits[*row as usize * vocab..(*row as usize + 1) * vocab].to_vec();
            apply_edits(&mut want, edits, fed);
            let got = &got[d * vocab..(d + 1) * vocab];
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "row {d} id {i}: kernel {g}, host {w}");
            }
        }
        assert_eq!(got[9], f32::NEG_INFINITY, "a ban is minus infinity");
    }

    #[test]
    fn kernels_sample_refuses_an_empty_vocabulary() {
        let client = gl::client();
        let handles = std::array::from_fn(|_| gl::upload(&client, &[0.0; 4]));
        assert!(launch(&client, handles, (1, 1, 0), false).is_err());
        let handles = std::array::from_fn(|_| gl::upload(&client, &[0.0; 4]));
        assert!(launch_argmax(
            &client,
            handles,
            (1, 0),
            f32::as_type_native_unchecked().storage_type()
        )
        .is_err());
    }
}
