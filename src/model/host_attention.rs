//! Softmax attention over the CPU's K/V pages in place (host storage, see
//! [`KvStorage::Host`](super::KvStorage)): no gather of the context's rows, no padding and no
//! mask tensor.
//!
//! Two kernels, both compiled for the CPU's widest instructions ([`Kernel::best`]) and split over
//! rayon:
//! - [`attend_decodes`]: single-token decodes, each KV head's query group in one pass over its
//!   context's rows, each row prefetched ahead (a block table scatters them).
//! - [`attend_chunk`]: a prompt chunk's queries, tiled as flash attention is: blocks of queries
//!   against blocks of keys with an online softmax, so the scores never exist in full, and a
//!   query's keys past its own position (causal) or before its sliding window are never
//!   computed. Burn Flex's masked matmul, which this replaces, computed the whole square of a
//!   chunk's scores, added a `-inf` mask through strided iteration and took several passes over
//!   the scores for the softmax.

use std::ops::Range;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::cpu_gemm::Avx2Fma;
use super::cpu_gemm::{Isa, Kernel, Portable};

/// One layer's K and V pages on the host: slot `s` is `s * kv_dim .. (s + 1) * kv_dim` of each.
#[derive(Clone, Copy)]
pub(crate) struct HostLayer<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_dim: usize,
}

/// Calls `$with::<I: Isa>($args)` compiled for `$kernel`'s instructions, which the CPU must
/// have: each kernel's loops are written once, generic over [`Isa`], and built three times.
macro_rules! compiled_for {
    ($kernel:expr, $with:ident($($arg:ident: $ty:ty),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                $with::<Avx2Fma>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $with::<Avx2Fma>($($arg),*)
            }
            match $kernel {
                // SAFETY: the caller checked that the CPU has `kernel`'s features.
                Kernel::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                Kernel::Avx2Fma => return unsafe { avx2($($arg),*) },
                Kernel::Portable => {}
            }
        }
        $with::<Portable>($($arg),*)
    }};
}

/// Single-token decodes: `q` is `[n, heads, head_dim]`, `contexts[i]` query `i`'s slots in
/// position order; query head `h` reads KV head `h / (heads / kv_heads)`. Returns
/// `[n, heads * head_dim]`. `kernel` must run on this CPU.
pub(crate) fn attend_decodes(
    kernel: Kernel,
    layer: HostLayer,
    q: &[f32],
    contexts: &[Vec<i32>],
    [heads, head_dim]: [usize; 2],
    scale: f32,
) -> Vec<f32> {
    let bands = bands_per_sequence(contexts.len(), layer.kv_dim / head_dim);
    attend_decodes_in_bands(kernel, layer, q, contexts, [heads, head_dim], scale, bands)
}

/// [`attend_decodes`], each sequence's KV heads cut into `bands` bands (a divisor of
/// `kv_heads`).
fn attend_decodes_in_bands(
    kernel: Kernel,
    layer: HostLayer,
    q: &[f32],
    contexts: &[Vec<i32>],
    [heads, head_dim]: [usize; 2],
    scale: f32,
    bands: usize,
) -> Vec<f32> {
    assert!(kernel.runs_here(), "{kernel:?} on this CPU");
    let HostLayer { k, v, kv_dim } = layer;
    let kv_heads = kv_dim / head_dim;
    let group = heads / kv_heads;
    let mut out = vec![0.0f32; q.len()];
    let band = kv_heads / bands;
    // The query heads of a band of KV heads are side by side in `q` and `out`: unit `u` is
    // sequence `u / bands`, KV heads `u % bands * band ..` of it, and their groups' rows.
    let width = band * group * head_dim;
    let attend = |scratch: &mut Vec<f32>, (u, out): (usize, &mut [f32])| {
        let rows = BandRows {
            k,
            v,
            slots: &contexts[u / bands],
            kv_dim,
            column: u % bands * band * head_dim,
            band,
            head_dim,
        };
        attend_band(kernel, &q[u * width..][..width], &rows, scale, scratch, out);
    };
    let work: usize = contexts.iter().map(|c| c.len()).sum::<usize>() * heads * head_dim;
    if work < PARALLEL_MIN_WORK {
        let mut scratch = Vec::new();
        out.chunks_mut(width)
            .enumerate()
            .for_each(|unit| attend(&mut scratch, unit));
    } else {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each_init(Vec::new, attend);
    }
    out
}

/// Into how many bands of KV heads [`attend_decodes`] cuts each of `sequences` sequences: one,
/// all of a slot's values, when there are sequences enough for a few units per thread; else one
/// per KV head. A slot's values are side by side in the pages and a page's slots follow one
/// another, so a unit of one band reads each page as one run, which the hardware prefetcher
/// follows. A single KV head's rows are `kv_dim` apart, each asked for ahead in software. Bands
/// in between measured slower than either at 2 sequences (docs/Performance.md).
fn bands_per_sequence(sequences: usize, kv_heads: usize) -> usize {
    if sequences >= 4 * rayon::current_num_threads() {
        1
    } else {
        kv_heads
    }
}

/// Multiply-adds of an attention (decodes or a chunk) below which one thread does it all.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// A band of KV heads' K and V rows of a context, where the pages hold them: row `j` is
/// `column .. column + band * head_dim` of slot `slots[j]`'s `kv_dim` values.
struct BandRows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    slots: &'a [i32],
    kv_dim: usize,
    column: usize,
    band: usize,
    head_dim: usize,
}

impl<'a> BandRows<'a> {
    #[inline(always)]
    fn at(&self, j: usize) -> std::ops::Range<usize> {
        let at = self.slots[j] as usize * self.kv_dim + self.column;
        at..at + self.band * self.head_dim
    }

    /// Whether row `j` exists and does not follow row `j - 1` in memory (a new page, or a band
    /// narrower than a slot), so that the hardware prefetcher, which follows runs, does not ask
    /// for it in time.
    #[inline(always)]
    fn jumps_at(&self, j: usize) -> bool {
        j < self.slots.len()
            && (self.band * self.head_dim < self.kv_dim || j == 0 || self.slots[j] != self.slots[j - 1] + 1)
    }
}

/// The query heads of a band of KV heads (`q` and `out`: `[band * group, head_dim]`, each KV
/// head's group side by side) over its context's rows: per head the scores' max, `exp` of each
/// score less it, and the weighted sum of V rows over the weights' sum. Each K and V row is read
/// once for the whole group (GQA), not once per query head. Compiled for `kernel`'s
/// instructions (the server takes [`Kernel::best`]): the default target has neither AVX nor
/// FMA, and the multiply-adds here are most of a long context's decode step.
fn attend_band(
    kernel: Kernel,
    q: &[f32],
    rows: &BandRows,
    scale: f32,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    compiled_for!(
        kernel,
        attend_band_with(q: &[f32], rows: &BandRows, scale: f32, scratch: &mut Vec<f32>, out: &mut [f32])
    )
}

#[inline(always)]
fn attend_band_with<I: Isa>(q: &[f32], rows: &BandRows, scale: f32, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let (head_dim, keys) = (rows.head_dim, rows.slots.len());
    let heads = q.len() / head_dim;
    let group = heads / rows.band;
    // `scratch`: each head's scores `[heads, keys]` (then its weights), then each head's weight
    // sum. Head-major, so that each head's softmax walks its scores in order.
    scratch.clear();
    scratch.resize(heads * keys + heads, 0.0);
    let (weights, totals) = scratch.split_at_mut(heads * keys);
    // The pages are scattered over the pool, so each row's cache lines are asked for a few rows
    // ahead of their use (the hardware prefetcher follows runs in order, not a block table).
    for j in 0..keys {
        if rows.jumps_at(j + PREFETCH_ROWS_AHEAD) {
            prefetch_row::<I>(&rows.k[rows.at(j + PREFETCH_ROWS_AHEAD)]);
        }
        let k = &rows.k[rows.at(j)];
        for (b, kh) in k.chunks_exact(head_dim).enumerate() {
            for h in b * group..(b + 1) * group {
                weights[h * keys + j] = dot::<I>(&q[h * head_dim..][..head_dim], kh) * scale;
            }
        }
    }
    for (scores, total) in weights.chunks_exact_mut(keys.max(1)).zip(totals.iter_mut()) {
        let max = lanes_fold(scores, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
        for s in scores.iter_mut() {
            *s = exp_nonpositive(*s - max);
        }
        *total = lanes_fold(scores, 0.0, |sum, x| sum + x);
    }
    out.fill(0.0);
    for j in 0..keys {
        if rows.jumps_at(j + PREFETCH_ROWS_AHEAD) {
            prefetch_row::<I>(&rows.v[rows.at(j + PREFETCH_ROWS_AHEAD)]);
        }
        let v = &rows.v[rows.at(j)];
        for (b, vh) in v.chunks_exact(head_dim).enumerate() {
            for h in b * group..(b + 1) * group {
                let p = weights[h * keys + j];
                for (o, x) in out[h * head_dim..][..head_dim].iter_mut().zip(vh) {
                    *o = I::mul_add(p, *x, *o);
                }
            }
        }
    }
    for (total, oh) in totals.iter().zip(out.chunks_exact_mut(head_dim)) {
        let inv = 1.0 / total;
        oh.iter_mut().for_each(|o| *o *= inv);
    }
}

/// How many rows ahead [`attend_band_with`] asks for a row's cache lines.
const PREFETCH_ROWS_AHEAD: usize = 8;

/// Asks for every cache line of `row`.
#[inline(always)]
fn prefetch_row<I: Isa>(row: &[f32]) {
    for line in row.chunks(16) {
        I::prefetch(line.as_ptr());
    }
}

/// `a · b` in sixteen interleaved sums, so that the compiler keeps them in vector registers.
#[inline(always)]
fn dot<I: Isa>(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (a16, b16) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0.0f32; LANES];
    for (x, y) in a16.zip(b16) {
        for i in 0..LANES {
            lanes[i] = I::mul_add(x[i], y[i], lanes[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `xs` folded by `f` in sixteen interleaved lanes, then across them: a loop the compiler keeps in
/// vector registers, where one running value is a chain of scalar steps (float folds are not
/// reordered for it).
#[inline(always)]
fn lanes_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    let mut lanes = [init; LANES];
    for chunk in chunks {
        for i in 0..LANES {
            lanes[i] = f(lanes[i], chunk[i]);
        }
    }
    lanes.iter().fold(tail, |a, &x| f(a, x))
}

/// A prompt chunk's queries and the context they attend over.
pub struct ChunkQueries<'a> {
    /// `[queries, heads, head_dim]`.
    pub q: &'a [f32],
    /// The context's slots in position order, up to and including the last query's own.
    pub slots: &'a [i32],
    /// Where in `slots` query 0's own position is; query `i`'s is at `first_query + i`.
    pub first_query: usize,
    /// Position of `slots[0]`: key blocks start at multiples of [`KEY_BLOCK`] positions, so a
    /// query's sums do not depend on how its prompt was cut into chunks.
    pub first_position: usize,
    /// How many positions a query sees at most (itself included); `None`: all before it.
    pub window: Option<usize>,
}

impl ChunkQueries<'_> {
    /// Indices into `slots` of the keys query `i` sees.
    fn keys_of(&self, i: usize) -> Range<usize> {
        let own = self.first_query + i;
        let lo = self.window.map_or(0, |w| (own + 1).saturating_sub(w));
        lo..own + 1
    }
}

/// Keys per block of [`attend_chunk`]: two pages of 16, the width of a block's scores in
/// registers.
const KEY_BLOCK: usize = 32;
/// Query rows (queries × their KV head's query heads) per unit of work of [`attend_chunk`]:
/// each key block is packed once per unit, and a unit's scores, sums and outputs stay in L1.
const UNIT_ROWS: usize = 64;
/// The score of a key a query does not see: far below any real score, yet finite, so that a
/// row that has seen no key yet has a max to subtract and no NaN. Its weight is at most e^-87
/// (`exp_nonpositive`'s floor) once the row has a real max; before that, whatever the row summed
/// is rescaled by at most e^-87 at its first real key, which every row has (its own). Either way
/// it is far below an f32 ulp of the row's sum, which is at least 1.
const HIDDEN: f32 = -1.0e30;
/// Query rows per strip of a unit's transposed queries and scores: two 16-lane vectors.
const QUERY_STRIP: usize = 32;
/// Rows of a register tile of [`attend_chunk`]'s products.
const TILE_ROWS: usize = 4;
/// Output columns of a register tile of the weighted sum of V rows.
const V_STRIP: usize = 16;

/// Softmax attention of a prompt chunk's queries over the K/V rows of `chunk.slots`, causal
/// (and within the sliding window): `[queries, heads * head_dim]`. Query head `h` reads KV head
/// `h / (heads / kv_heads)`. Each query's result is one fixed sequence of sums over its own
/// keys, whichever queries share its chunk, block or thread. `kernel` must run on this CPU.
pub(crate) fn attend_chunk(
    kernel: Kernel,
    layer: HostLayer,
    chunk: &ChunkQueries,
    [heads, head_dim]: [usize; 2],
    scale: f32,
) -> Vec<f32> {
    assert!(kernel.runs_here(), "{kernel:?} on this CPU");
    let kv_heads = layer.kv_dim / head_dim;
    let group = heads / kv_heads;
    let queries = chunk.q.len() / (heads * head_dim);
    let per_unit = (UNIT_ROWS / group).max(1);
    // Unit `u`: KV head `u % kv_heads`, queries `u / kv_heads * per_unit ..` of it.
    let units = queries.div_ceil(per_unit) * kv_heads;
    let unit = |u: usize| {
        let first = u / kv_heads * per_unit;
        (u % kv_heads, first..(first + per_unit).min(queries))
    };
    let pass = ChunkPass {
        layer,
        chunk,
        group,
        head_dim,
        heads,
        scale,
    };
    let run = |scratch: &mut ChunkScratch, u: usize| {
        let (kv_head, qs) = unit(u);
        attend_unit(kernel, &pass, kv_head, qs, scratch);
        std::mem::take(&mut scratch.out)
    };
    let work: usize = (0..queries).map(|i| chunk.keys_of(i).len()).sum::<usize>() * heads * head_dim;
    let outputs: Vec<Vec<f32>> = if work < PARALLEL_MIN_WORK {
        let mut scratch = ChunkScratch::default();
        (0..units).map(|u| run(&mut scratch, u)).collect()
    } else {
        (0..units)
            .into_par_iter()
            .map_init(ChunkScratch::default, run)
            .collect()
    };
    // Each unit's rows are its queries' heads of one group: `[queries, group, head_dim]`.
    let mut out = vec![0.0f32; chunk.q.len()];
    let width = group * head_dim;
    for (u, rows) in outputs.iter().enumerate() {
        let (kv_head, qs) = unit(u);
        for (i, row) in qs.zip(rows.chunks_exact(width)) {
            out[(i * kv_heads + kv_head) * width..][..width].copy_from_slice(row);
        }
    }
    out
}

/// What every unit of one [`attend_chunk`] shares.
struct ChunkPass<'a> {
    layer: HostLayer<'a>,
    chunk: &'a ChunkQueries<'a>,
    group: usize,
    head_dim: usize,
    heads: usize,
    scale: f32,
}

/// Buffers of one unit of [`attend_chunk`], reused by the units a thread runs. A unit's query
/// rows are columns here, padded to whole strips of [`QUERY_STRIP`]: per key, its scores for
/// every row are side by side, so the softmax's per-row steps are vector steps across rows.
#[derive(Default)]
struct ChunkScratch {
    /// The unit's query rows, transposed: `[head_dim, columns]`.
    qt: Vec<f32>,
    /// A key block's scores, then weights, per key: `[KEY_BLOCK, columns]`.
    st: Vec<f32>,
    /// Each row's running max and sum of weights, and the block's max then rescale: `[columns]`.
    max: Vec<f32>,
    sum: Vec<f32>,
    block: Vec<f32>,
    /// Where the rows of a product's operands start in the pages (K or V rows) or the scratch.
    a_rows: Vec<usize>,
    b_rows: Vec<usize>,
    /// The weighted sums of V rows, `[rows, head_dim]`: the unit's output once divided.
    out: Vec<f32>,
}

/// One unit of [`attend_chunk`]: the query heads of `kv_head`'s group for queries `qs`.
fn attend_unit(
    kernel: Kernel,
    pass: &ChunkPass,
    kv_head: usize,
    qs: Range<usize>,
    scratch: &mut ChunkScratch,
) {
    compiled_for!(
        kernel,
        attend_unit_with(pass: &ChunkPass, kv_head: usize, qs: Range<usize>, scratch: &mut ChunkScratch)
    )
}

#[inline(always)]
fn attend_unit_with<I: Isa>(pass: &ChunkPass, kv_head: usize, qs: Range<usize>, scratch: &mut ChunkScratch) {
    let &ChunkPass {
        layer,
        chunk,
        group,
        head_dim: hd,
        heads,
        scale,
    } = pass;
    let rows = qs.len() * group;
    let columns = rows.div_ceil(QUERY_STRIP) * QUERY_STRIP;
    let column = kv_head * hd;
    let ChunkScratch {
        qt,
        st,
        max,
        sum,
        block,
        a_rows,
        b_rows,
        out,
    } = scratch;
    // `qt[d][row]`, row `(i - qs.start) * group + h` for query `i`'s head `h` of the group.
    qt.clear();
    qt.resize(hd * columns, 0.0);
    for (qi, i) in qs.clone().enumerate() {
        let heads_of = &chunk.q[(i * heads + kv_head * group) * hd..][..group * hd];
        for (h, q) in heads_of.chunks_exact(hd).enumerate() {
            for (d, &x) in q.iter().enumerate() {
                qt[d * columns + qi * group + h] = x;
            }
        }
    }
    st.clear();
    st.resize(KEY_BLOCK * columns, 0.0);
    max.clear();
    max.resize(columns, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(columns, 0.0);
    block.clear();
    block.resize(columns, 0.0);
    out.clear();
    out.resize(rows * hd, 0.0);
    let (first, last) = (chunk.keys_of(qs.start), chunk.keys_of(qs.end - 1));
    // Blocks cover whole aligned runs of positions, a key at row `position % KEY_BLOCK` of its
    // block's scores, whatever keys this unit starts or ends with: a row's sums then run over
    // the same keys in the same order in every chunking (see `ChunkQueries::first_position`).
    let align = chunk.first_position % KEY_BLOCK;
    let mut start = first.start;
    while start < last.end {
        let at = (start + align) % KEY_BLOCK;
        let keys = start..(start + KEY_BLOCK - at).min(last.end);
        let st_key = |j: usize| (at + j - keys.start) * columns;
        // Scores: keys (K rows read in place) against strips of query rows.
        a_rows.clear();
        a_rows.extend(
            keys.clone()
                .map(|j| chunk.slots[j] as usize * layer.kv_dim + column),
        );
        b_rows.clear();
        b_rows.extend((0..hd).map(|d| d * columns));
        for c in (0..columns).step_by(QUERY_STRIP) {
            scores::<I, QUERY_STRIP>((layer.k, a_rows, hd), (&qt[c..], b_rows), |r, tile| {
                st[(at + r) * columns + c..][..QUERY_STRIP].copy_from_slice(tile)
            });
        }
        // A query sees every key of the block, or some are past its position (causal) or
        // before its window: those scores are [`HIDDEN`].
        let everyone_sees = keys.start >= last.start && keys.end <= first.end;
        if !everyone_sees {
            for (qi, i) in qs.clone().enumerate() {
                let seen = chunk.keys_of(i);
                let before = keys.start..seen.start.clamp(keys.start, keys.end);
                let after = seen.end.clamp(keys.start, keys.end)..keys.end;
                for j in before.chain(after) {
                    st[st_key(j) + qi * group..][..group].fill(HIDDEN);
                }
            }
        }
        block.fill(f32::NEG_INFINITY);
        for j in keys.clone() {
            for (m, &x) in block.iter_mut().zip(&st[st_key(j)..][..columns]) {
                *m = if x > *m { x } else { *m };
            }
        }
        // `block` becomes each row's rescale of what it has summed so far.
        for ((m, b), s) in max.iter_mut().zip(block.iter_mut()).zip(sum.iter_mut()) {
            let new = if *b * scale > *m { *b * scale } else { *m };
            *b = if new == *m { 1.0 } else { exp_nonpositive(*m - new) };
            *m = new;
            *s *= *b;
        }
        for j in keys.clone() {
            for ((w, m), s) in st[st_key(j)..][..columns]
                .iter_mut()
                .zip(max.iter())
                .zip(sum.iter_mut())
            {
                *w = exp_nonpositive(*w * scale - *m);
                *s += *w;
            }
        }
        for (o, &b) in out.chunks_exact_mut(hd).zip(block.iter()) {
            if b != 1.0 {
                o.iter_mut().for_each(|x| *x *= b);
            }
        }
        // `out[row] += Σ_j weight[j][row] · v[j]`, V rows read where the pages hold them.
        let v_at = |j: usize| chunk.slots[j] as usize * layer.kv_dim + column;
        let mut c = 0;
        while c + V_STRIP <= hd {
            b_rows.clear();
            b_rows.extend(keys.clone().map(|j| v_at(j) + c));
            weighted_rows::<I, V_STRIP>(
                (&st[at * columns..], columns),
                rows,
                (layer.v, b_rows),
                |r, tile| {
                    for (o, &x) in out[r * hd + c..][..V_STRIP].iter_mut().zip(tile) {
                        *o += x;
                    }
                },
            );
            c += V_STRIP;
        }
        // A head size that is not a multiple of the strip: the last columns one by one.
        for row in (0..rows).filter(|_| c < hd) {
            for j in keys.clone() {
                let w = st[st_key(j) + row];
                let v = &layer.v[v_at(j) + c..][..hd - c];
                for (o, &x) in out[row * hd + c..][..hd - c].iter_mut().zip(v) {
                    *o = I::mul_add(w, x, *o);
                }
            }
        }
        start = keys.end;
    }
    for (row, o) in out.chunks_exact_mut(hd).enumerate() {
        let inv = 1.0 / sum[row];
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `e^x` for `x <= 0` within a relative `f32::EPSILON` (a NaN stays one), written so that a loop of it vectorizes (libm's
/// `expf` is a call per element). `x` below -87 gives about 1e-38 rather than less: a weight
/// that small adds nothing to a sum of weights of which the largest is 1.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in few bits, so that `x - n ln 2` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Not `f32::max`: a NaN stays a NaN.
    let x = if x < -87.0 { -87.0 } else { x };
    let n = (x * LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r for |r| <= ln 2 / 2: 1 + r + r^2 P(r), P of degree 5 (Cephes' `expf`).
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    // 2^n, n in [-126, 0]: the exponent field alone.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The scores half of [`attend_chunk`]: for each key `r < a_rows.len()` (its K row
/// `a[a_rows[r]..][..len]`, in place), `Σ_d k[d] · b[b_rows[d]..][..S]` (a strip of the transposed
/// queries), in register tiles of up to [`TILE_ROWS`] keys, handed to `emit(r, row)`.
#[inline(always)]
fn scores<I: Isa, const S: usize>(
    (a, a_rows, len): (&[f32], &[usize], usize),
    (b, b_rows): (&[f32], &[usize]),
    mut emit: impl FnMut(usize, &[f32; S]),
) {
    let mut r = 0;
    while r < a_rows.len() {
        let height = TILE_ROWS.min(a_rows.len() - r);
        let row = |i: usize| &a[a_rows[r + i]..][..len];
        let mut emit_all = |tile: &[[f32; S]]| tile.iter().enumerate().for_each(|(i, t)| emit(r + i, t));
        match height {
            4 => emit_all(&tile::<I, 4, S>(std::array::from_fn(row), b, b_rows)),
            3 => emit_all(&tile::<I, 3, S>(std::array::from_fn(row), b, b_rows)),
            2 => emit_all(&tile::<I, 2, S>(std::array::from_fn(row), b, b_rows)),
            _ => emit_all(&tile::<I, 1, S>(std::array::from_fn(row), b, b_rows)),
        }
        r += height;
    }
}

/// The left operand of a register tile: its `R` values at step `k` of the sum.
trait TileRows<const R: usize> {
    fn at(&self, k: usize) -> [f32; R];
}

/// `R` rows, each a slice read along `k` (the scores' K rows).
impl<const R: usize> TileRows<R> for [&[f32]; R] {
    #[inline(always)]
    fn at(&self, k: usize) -> [f32; R] {
        std::array::from_fn(|i| self[i][k])
    }
}

/// `R` side-by-side columns of a row-major matrix with rows `.1` apart, read down the columns
/// (the outputs' weights: `R` query rows' weights of key `k`).
impl<const R: usize> TileRows<R> for (&[f32], usize) {
    #[inline(always)]
    fn at(&self, k: usize) -> [f32; R] {
        self.0[k * self.1..][..R].try_into().expect("R columns")
    }
}

/// `acc[i][j] = Σ_k a.at(k)[i] · b[b_rows[k] + j]`, in registers.
#[inline(always)]
fn tile<I: Isa, const R: usize, const S: usize>(
    a: impl TileRows<R>,
    b: &[f32],
    b_rows: &[usize],
) -> [[f32; S]; R] {
    let mut acc = [[0.0f32; S]; R];
    for (k, &at) in b_rows.iter().enumerate() {
        let bk: &[f32; S] = b[at..][..S].try_into().expect("S columns");
        let xs = a.at(k);
        for i in 0..R {
            for j in 0..S {
                acc[i][j] = I::mul_add(xs[i], bk[j], acc[i][j]);
            }
        }
    }
    acc
}

/// The outputs half of [`attend_chunk`]: for each query row `r < rows`, `Σ_k a[k · step + r] ·
/// b[b_rows[k]..][..S]` (the block's weights down row `r`'s column, against a strip of each
/// key's V row, in place), in register tiles of up to [`TILE_ROWS`] rows, handed to
/// `emit(r, row)`.
#[inline(always)]
fn weighted_rows<I: Isa, const S: usize>(
    (a, step): (&[f32], usize),
    rows: usize,
    (b, b_rows): (&[f32], &[usize]),
    mut emit: impl FnMut(usize, &[f32; S]),
) {
    let mut r = 0;
    while r < rows {
        let height = TILE_ROWS.min(rows - r);
        let a = &a[r..];
        let mut emit_all = |tile: &[[f32; S]]| tile.iter().enumerate().for_each(|(i, t)| emit(r + i, t));
        match height {
            4 => emit_all(&tile::<I, 4, S>((a, step), b, b_rows)),
            3 => emit_all(&tile::<I, 3, S>((a, step), b, b_rows)),
            2 => emit_all(&tile::<I, 2, S>((a, step), b, b_rows)),
            _ => emit_all(&tile::<I, 1, S>((a, step), b, b_rows)),
        }
        r += height;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1].
    fn value(i: usize, salt: usize) -> f32 {
        ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0
    }

    /// K and V of a pool of `slots` slots, and a context of `len` of them scattered over it (slot
    /// 37 j mod the pool, as a free list hands pages out).
    struct Pool {
        k: Vec<f32>,
        v: Vec<f32>,
        kv_dim: usize,
        slots: Vec<i32>,
    }

    impl Pool {
        fn new(pool: usize, kv_dim: usize, len: usize) -> Self {
            let (k, v) = (0..pool * kv_dim).map(|i| (value(i, 1), value(i, 2))).unzip();
            let slots = (0..len).map(|j| ((37 * j + 11) % pool) as i32).collect();
            Pool { k, v, kv_dim, slots }
        }

        fn layer(&self) -> HostLayer<'_> {
            HostLayer {
                k: &self.k,
                v: &self.v,
                kv_dim: self.kv_dim,
            }
        }
    }

    /// Softmax attention in f64 of one query head's row `q` over the keys at `slots`, reading
    /// KV head `kv_head`'s columns: the reference of both kernels.
    fn reference(pool: &Pool, q: &[f32], slots: &[i32], kv_head: usize, scale: f32) -> Vec<f64> {
        let head_dim = q.len();
        let at = |slot: i32, d: usize| slot as usize * pool.kv_dim + kv_head * head_dim + d;
        let scores: Vec<f64> = slots
            .iter()
            .map(|&s| {
                (0..head_dim)
                    .map(|d| q[d] as f64 * pool.k[at(s, d)] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..head_dim)
            .map(|d| {
                slots
                    .iter()
                    .zip(&weights)
                    .map(|(&s, w)| w * pool.v[at(s, d)] as f64)
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    /// Decode attention over host rows in place equals softmax attention in f64 over the same
    /// rows, with each kernel this CPU runs: GQA (4 query heads per KV head), a head size of
    /// whole 16-lane sums and one with a remainder, contexts of scattered slots of different
    /// lengths (one of a single slot), small enough for one thread and large enough to be split.
    #[test]
    fn paged_kv_host_decode_attention_matches_softmax_attention() {
        let (heads, kv_heads) = (8, 2);
        for head_dim in [64, 24] {
            let pool = Pool::new(1024, kv_heads * head_dim, 0);
            let scale = (head_dim as f32).powf(-0.5) * 4.0;
            for lens in [vec![1, 5, 40], vec![300, 17, 700]] {
                // Slot 37 j mod the pool: scattered over the pages, as a free list hands them out;
                // the last sequence's slots in runs of 16 (a page's), a page's rows one run.
                let contexts: Vec<Vec<i32>> = lens
                    .iter()
                    .enumerate()
                    .map(|(s, &len)| {
                        let step = if s + 1 == lens.len() { 1 } else { 37 };
                        let slot = |j: usize| (step * (j % 16) + 37 * 16 * (j / 16) + 101 * s) % 1024;
                        (0..len).map(|j| slot(j) as i32).collect()
                    })
                    .collect();
                let q: Vec<f32> = (0..lens.len() * heads * head_dim).map(|i| value(i, 3)).collect();
                for (kernel, bands) in Kernel::available()
                    .into_iter()
                    .flat_map(|k| [(k, 1), (k, kv_heads)])
                {
                    let layer = pool.layer();
                    let got = attend_decodes_in_bands(
                        kernel,
                        layer,
                        &q,
                        &contexts,
                        [heads, head_dim],
                        scale,
                        bands,
                    );
                    for (i, out) in got.chunks(head_dim).enumerate() {
                        let (ctx, h) = (&contexts[i / heads], i % heads);
                        let qrow = &q[i * head_dim..][..head_dim];
                        let want = reference(&pool, qrow, ctx, h / (heads / kv_heads), scale);
                        for (d, (g, w)) in out.iter().zip(want).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-5,
                                "{kernel:?}, {bands} bands, lens {lens:?}, query head {i}, {d}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A prompt chunk's attention over host rows equals causal softmax attention in f64 over the
    /// same rows, with each kernel this CPU runs: GQA (4 query heads per KV head) and none, a head
    /// size of whole strips and one with a remainder, a chunk at the start of its prompt and one
    /// deep into it (its context starting off a key block's edge), with and without a sliding
    /// window (narrow enough for a unit's rows to leave whole blocks behind), small enough for
    /// one thread and large enough to be split.
    #[test]
    fn paged_kv_host_chunk_attention_matches_causal_softmax_attention() {
        // GQA, and one query head per KV head: 64 queries per unit, so that a unit spans key
        // blocks that some of its rows' windows have left behind.
        for ((heads, kv_heads), head_dim) in [((8, 2), 64), ((8, 2), 24), ((4, 4), 24)] {
            let group = heads / kv_heads;
            let kv_dim = kv_heads * head_dim;
            let pool = Pool::new(1024, kv_dim, 700);
            let scale = (head_dim as f32).powf(-0.5) * 4.0;
            // (queries, first query's index in the context, position of the context's first key, window)
            for (queries, first_query, first_position, window) in [
                (5, 0, 0, None),
                (130, 0, 0, None),
                (90, 610, 0, None),
                (90, 300, 7, Some(100)),
                (3, 40, 45, Some(9)),
                (100, 200, 3, Some(20)),
            ] {
                let slots = &pool.slots[..first_query + queries];
                let q: Vec<f32> = (0..queries * heads * head_dim).map(|i| value(i, 3)).collect();
                let chunk = ChunkQueries {
                    q: &q,
                    slots,
                    first_query,
                    first_position,
                    window,
                };
                for kernel in Kernel::available() {
                    let got = attend_chunk(kernel, pool.layer(), &chunk, [heads, head_dim], scale);
                    for (row, out) in got.chunks(head_dim).enumerate() {
                        let (i, h) = (row / heads, row % heads);
                        let own = first_query + i;
                        let seen = window.map_or(0, |w| (own + 1).saturating_sub(w))..own + 1;
                        let qrow = &q[row * head_dim..][..head_dim];
                        let want = reference(&pool, qrow, &slots[seen], h / group, scale);
                        for (d, (g, w)) in out.iter().zip(want).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-5,
                                "{kernel:?}, head_dim {head_dim}, chunk ({queries}, {first_query}, \
                                 {first_position}, {window:?}), query {i} head {h}, {d}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A query's output is the same to the bit however its prompt was cut into chunks (key blocks
    /// follow positions, not chunks), so a prompt prefilled again after a preemption, in other
    /// chunks, gets the same K/V and logits. With a sliding window each chunk's context starts at
    /// its first query's reach, as the model plans it.
    #[test]
    fn paged_kv_host_chunk_attention_does_not_depend_on_the_chunking() {
        let (heads, head_dim) = (4, 32);
        let pool = Pool::new(512, 2 * head_dim, 300);
        let q: Vec<f32> = (0..300 * heads * head_dim).map(|i| value(i, 5)).collect();
        let width = heads * head_dim;
        for window in [None, Some(50)] {
            let attend = |cuts: &[usize]| -> Vec<f32> {
                let mut out = Vec::new();
                for pair in cuts.windows(2) {
                    let ctx_start = window.map_or(0, |w| (pair[0] + 1).saturating_sub(w));
                    let chunk = ChunkQueries {
                        q: &q[pair[0] * width..pair[1] * width],
                        slots: &pool.slots[ctx_start..pair[1]],
                        first_query: pair[0] - ctx_start,
                        first_position: ctx_start,
                        window,
                    };
                    out.extend(attend_chunk(
                        Kernel::best(),
                        pool.layer(),
                        &chunk,
                        [heads, head_dim],
                        0.2,
                    ));
                }
                out
            };
            let whole = attend(&[0, 300]);
            assert_eq!(whole, attend(&[0, 7, 100, 161, 300]), "window {window:?}");
            assert_eq!(whole, attend(&[0, 64, 128, 192, 256, 300]), "window {window:?}");
        }
    }

    /// The vectorizable `exp` is within a relative `f32::EPSILON` of `exp` in f64 on [-87, 0]
    /// (measured: 0.67 of it at worst), and about 1e-38 below (no denormals); a NaN stays a NaN.
    #[test]
    fn paged_kv_exp_nonpositive_is_within_an_epsilon() {
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= f32::EPSILON as f64 * want,
                "e^{x}: {got} vs {want}"
            );
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) > 0.0 && exp_nonpositive(-1000.0) < 2e-38);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
