//! Decode-shaped products on the CPU backend: `x [m, k] · w [k, n]` for 2 to 16 rows, the
//! weight read once.
//!
//! Why: burn Flex's `matmul` (the `gemm` crate) has a fast path for one row, but from two rows on
//! it packs the weight into panels on every call. A decode step reads each weight once, so the
//! packing is pure cost: on the 110M bench model a batch-8 decode step took 4-5x a batch-1 step
//! (docs/Performance.md, "CPU tokens per second"). Here a tile of up to 4 rows × 16 columns of
//! the output stays in registers while the tile walks down its strip of the weight, one 64-byte
//! line per weight row, fetched ahead in software since the rows are far apart; the other row
//! tiles of the strip then find it in L2. One row stays with Flex, whose GEMV streams whole rows.
//! The server keeps the CPU's weights as the checkpoint's `[out, in]`, for which
//! [`skinny_gemm_t`] reads each output's weights as one run.
//! With AVX-512's 32 registers a tile is up to 8 rows × 32 columns: two lines per weight row, so
//! the walk touches half as many pages per byte, and a batch of 8 reads each line once.
//!
//! Each output element is one in-order sum over `k` (fused multiply-adds where the CPU has them),
//! whatever the number of rows and wherever the row falls: a sequence's logits do not depend on
//! which other 1 to 15 sequences decode beside it.

use std::ops::Range;
use std::sync::Arc;

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::llama::ProjectFn;

/// Rows this kernel takes, from 2; one row and more than this go to Flex's `matmul`.
pub const CPU_SKINNY_MAX_ROWS: usize = 16;
/// Columns of a strip with AVX2 (and elsewhere): two 8-lane f32 vectors, one 64-byte line of each
/// weight row.
const STRIP: usize = 16;
/// Rows of a register tile at most with AVX2: 4 × 2 vector accumulators, the strip's 2 weight
/// vectors and a broadcast of `x` fit its 16 registers.
const TILE_ROWS: usize = 4;
/// Columns of a strip with AVX-512: two 16-lane vectors, two lines of each weight row, so the walk
/// down the weight touches half as many pages per byte.
const WIDE_STRIP: usize = 32;
/// Rows of a register tile at most with AVX-512: 8 × 2 accumulators of its 32 registers, so a
/// batch of 8 reads each weight line once.
const WIDE_TILE_ROWS: usize = 8;
/// Weight rows fetched ahead of the one being multiplied.
const PREFETCH_ROWS: usize = 16;
/// Multiply-adds below which one thread does it all: splitting costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// The projection hook of the CPU backend (`Llama::with_projection`): these kernels for f32
/// products of 2 to [`CPU_SKINNY_MAX_ROWS`] rows with contiguous `x`, the weight row-major
/// `[in, out]` ([`skinny_gemm`]) or the checkpoint's `[out, in]` seen transposed
/// ([`skinny_gemm_t`], the server's CPU layout), Flex's `matmul` for everything else. One row
/// stays with Flex: its GEMV over `[out, in]` weights streams each output's row, and measured
/// 1.24-1.6x faster per 110M decode step than over `[in, out]` (docs/Performance.md).
pub fn projection() -> ProjectFn<Flex> {
    Arc::new(project)
}

/// `x · w` (see [`projection`]).
pub fn project(x: Tensor<Flex, 2>, w: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
    let ([m, k], [k_w, n]) = (x.dims(), w.dims());
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !(2..=CPU_SKINNY_MAX_ROWS).contains(&m) || k != k_w || !f32s {
        return x.matmul(w);
    }
    let device = x.device();
    let (xp, wp) = (
        x.clone().into_primitive().tensor(),
        w.clone().into_primitive().tensor(),
    );
    let Some(xs) = xp.as_slice::<f32>() else {
        return x.matmul(w);
    };
    let out = match (transposed_rows(&wp, [k, n]), wp.as_slice::<f32>()) {
        (Some(w_t), _) => skinny_gemm_t(xs, w_t, [m, k, n]),
        (None, Some(ws)) => skinny_gemm(xs, ws, [m, k, n]),
        (None, None) => return x.matmul(w),
    };
    Tensor::from_data(TensorData::new(out, [m, n]), &device)
}

/// The `[n, k]` rows of `w` (`[k, n]`, f32) when it is a transposed view of a whole contiguous
/// `[n, k]` matrix (the checkpoint's `[out, in]`: [`WeightLayout::OutIn`](super::llama::WeightLayout)).
fn transposed_rows(w: &burn::backend::flex::FlexTensor, [k, n]: [usize; 2]) -> Option<&[f32]> {
    let layout = w.layout();
    let whole = layout.strides() == [1, k as isize] && layout.start_offset() == 0;
    let rows = (whole && w.dtype() == DType::F32).then(|| w.storage::<f32>())?;
    (rows.len() == n * k).then_some(rows)
}

/// `x [m, k] · w [k, n]`, both row-major, into a new row-major `[m, n]`.
pub fn skinny_gemm(x: &[f32], w: &[f32], [m, k, n]: [usize; 3]) -> Vec<f32> {
    skinny_gemm_with(Kernel::best(), x, w, [m, k, n])
}

/// The instruction sets the kernel is compiled for; [`Kernel::best`] is the one used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// x86-64 with AVX-512F and FMA: strips of [`WIDE_STRIP`], tiles of up to [`WIDE_TILE_ROWS`].
    Avx512,
    /// x86-64 with AVX2 and FMA: strips of [`STRIP`], tiles of up to [`TILE_ROWS`].
    Avx2Fma,
    /// Anything: the AVX2 shapes with a multiply and an add.
    Portable,
}

impl Kernel {
    /// Every kernel this CPU can run, the best first.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Avx512, Kernel::Avx2Fma, Kernel::Portable]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether this CPU has the kernel's instructions (std caches the CPU's features).
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Kernel::Avx512 => has!("avx512f") && has!("fma"),
                Kernel::Avx2Fma => has!("avx2") && has!("fma"),
                Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Portable
        }
    }

    /// The widest kernel this CPU runs (checked once).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Kernel::available()[0])
    }
}

/// [`skinny_gemm`] through `kernel`, which the CPU must run (one of [`Kernel::available`]).
pub fn skinny_gemm_with(kernel: Kernel, x: &[f32], w: &[f32], [m, k, n]: [usize; 3]) -> Vec<f32> {
    assert!(kernel.runs_here(), "{kernel:?} on this CPU");
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(w.len(), k * n, "w is [k, n]");
    let mut out = vec![0.0f32; m * n];
    // Parts split the columns in whole strips of either width.
    let strips = n.div_ceil(WIDE_STRIP);
    let threads = rayon::current_num_threads();
    let parts = if m * k * n < PARALLEL_MIN_WORK || threads == 1 {
        1
    } else {
        // A few parts per thread, so that a thread slowed by other work is caught up.
        (4 * threads).min(strips)
    };
    let per_part = strips.div_ceil(parts);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|part| {
        let first = part * per_part * WIDE_STRIP;
        let end = ((part + 1) * per_part * WIDE_STRIP).min(n);
        if first < end {
            // SAFETY: parts write disjoint column ranges `first..end` of `out`'s rows, and `out`
            // outlives the parallel loop; `kernel` runs on this CPU (asserted above).
            unsafe { columns(kernel, x, w, [m, k, n], first..end, &out_ptr) };
        }
    });
    out
}

/// `out`'s buffer, written by several threads at disjoint columns.
struct SharedOut(*mut f32);
// SAFETY: see `skinny_gemm`: every thread writes only its own columns.
unsafe impl Sync for SharedOut {}

/// Columns `cols` of every row of the product, through `kernel`.
///
/// # Safety
/// The CPU runs `kernel`; `out` points to `m * n` floats, and no other thread writes columns
/// `cols`.
unsafe fn columns(
    kernel: Kernel,
    x: &[f32],
    w: &[f32],
    mkn: [usize; 3],
    cols: std::ops::Range<usize>,
    out: &SharedOut,
) {
    match kernel {
        // SAFETY (all three): the caller's contract.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { columns_avx512(x, w, mkn, cols, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { columns_avx2_fma(x, w, mkn, cols, out) },
        _ => unsafe { columns_with::<Portable, STRIP>(x, w, mkn, cols, TILE_ROWS, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn columns_avx512(
    x: &[f32],
    w: &[f32],
    mkn: [usize; 3],
    cols: std::ops::Range<usize>,
    out: &SharedOut,
) {
    // SAFETY: the caller's contract.
    unsafe { columns_with::<Avx2Fma, WIDE_STRIP>(x, w, mkn, cols, WIDE_TILE_ROWS, out) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2_fma(
    x: &[f32],
    w: &[f32],
    mkn: [usize; 3],
    cols: std::ops::Range<usize>,
    out: &SharedOut,
) {
    // SAFETY: the caller's contract.
    unsafe { columns_with::<Avx2Fma, STRIP>(x, w, mkn, cols, TILE_ROWS, out) };
}

/// What the tile loop compiles to on one kind of CPU (also the host attention's, in
/// `paged_cache`).
pub(crate) trait Isa {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
    fn prefetch(at: *const f32);
}

/// x86-64 with FMA (AVX2 or AVX-512, as the caller's target features say): one rounding per
/// multiply-add, and software prefetch.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2Fma;
#[cfg(target_arch = "x86_64")]
impl Isa for Avx2Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn prefetch(at: *const f32) {
        // SAFETY: a prefetch is a hint that never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast()) };
    }
}

/// Anything else: a multiply and an add (`mul_add` without an FMA instruction would call libm).
pub(crate) struct Portable;
impl Isa for Portable {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }

    #[inline(always)]
    fn prefetch(_: *const f32) {}
}

/// Strips of `S` columns, tiles of at most `max_rows` rows (at most [`WIDE_TILE_ROWS`]).
///
/// # Safety
/// As [`columns`].
#[inline(always)]
unsafe fn columns_with<I: Isa, const S: usize>(
    x: &[f32],
    w: &[f32],
    [m, k, n]: [usize; 3],
    cols: std::ops::Range<usize>,
    max_rows: usize,
    out: &SharedOut,
) {
    // Row tiles as even as they can be (9 rows are 3 + 3 + 3, not 4 + 4 + 1): a tile's time is
    // that of its loop over `k`, whatever its height.
    let tile_rows = m.div_ceil(m.div_ceil(max_rows));
    let mut c = cols.start;
    while c < cols.end {
        let width = S.min(cols.end - c);
        let mut r = 0;
        while r < m {
            let rows = tile_rows.min(m - r);
            let whole = width == S;
            let tile = match rows {
                8 if whole => tile::<I, 8, S>(x, w, [k, n], r, c),
                7 if whole => tile::<I, 7, S>(x, w, [k, n], r, c),
                6 if whole => tile::<I, 6, S>(x, w, [k, n], r, c),
                5 if whole => tile::<I, 5, S>(x, w, [k, n], r, c),
                4 if whole => tile::<I, 4, S>(x, w, [k, n], r, c),
                3 if whole => tile::<I, 3, S>(x, w, [k, n], r, c),
                2 if whole => tile::<I, 2, S>(x, w, [k, n], r, c),
                1 if whole => tile::<I, 1, S>(x, w, [k, n], r, c),
                _ => narrow_tile::<I, S>(x, w, [k, n], (r, rows), (c, width)),
            };
            for (i, row) in tile.iter().take(rows).enumerate() {
                // SAFETY: row `r + i < m`, columns `c..c + width` within `cols` (the caller's).
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.0.add((r + i) * n + c), width) };
            }
            r += rows;
        }
        c += width;
    }
}

/// Rows `r..r + R` × columns `c..c + S` of the product, accumulated in registers.
#[inline(always)]
fn tile<I: Isa, const R: usize, const S: usize>(
    x: &[f32],
    w: &[f32],
    [k, n]: [usize; 2],
    r: usize,
    c: usize,
) -> [[f32; S]; WIDE_TILE_ROWS] {
    let mut acc = [[0.0f32; S]; R];
    let xs: [&[f32]; R] = std::array::from_fn(|i| &x[(r + i) * k..][..k]);
    for kk in 0..k {
        // One prefetch per 64-byte line of the strip's row.
        for line in (0..S).step_by(16) {
            I::prefetch(w.as_ptr().wrapping_add((kk + PREFETCH_ROWS) * n + c + line));
        }
        let wv: &[f32; S] = w[kk * n + c..][..S].try_into().expect("a strip's row");
        for i in 0..R {
            let xv = xs[i][kk];
            for j in 0..S {
                acc[i][j] = I::mul_add(xv, wv[j], acc[i][j]);
            }
        }
    }
    let mut tile = [[0.0f32; S]; WIDE_TILE_ROWS];
    tile[..R].copy_from_slice(&acc);
    tile
}

/// The last strip's few columns (`n` not a multiple of the strip), summed as [`tile`] sums.
#[inline(always)]
fn narrow_tile<I: Isa, const S: usize>(
    x: &[f32],
    w: &[f32],
    [k, n]: [usize; 2],
    (r, rows): (usize, usize),
    (c, width): (usize, usize),
) -> [[f32; S]; WIDE_TILE_ROWS] {
    let mut acc = [[0.0f32; S]; WIDE_TILE_ROWS];
    for kk in 0..k {
        let wv = &w[kk * n + c..][..width];
        for (i, row) in acc.iter_mut().enumerate().take(rows) {
            let xv = x[(r + i) * k + kk];
            for (a, &wj) in row.iter_mut().zip(wv) {
                *a = I::mul_add(xv, wj, *a);
            }
        }
    }
    acc
}

/// Lanes of [`skinny_gemm_t`]'s sums with AVX-512: one 16-lane vector.
const WIDE_LANES: usize = 16;
/// Lanes of its sums elsewhere: one 8-lane AVX2 vector.
const LANES: usize = 8;
/// Weight rows (output columns) of its register tile: two, so that each load of `x` feeds two
/// multiply-adds. Its rows are at most [`TILE_ROWS`] with either instruction set: 8 rows × 2
/// columns of 16 lanes spilled AVX-512's registers (ten times slower per batch-8 step).
const ROW_TILE_COLUMNS: usize = 2;

/// `x [m, k] · w`, `w` given as its transpose `w_t [n, k]` (the checkpoint's `[out, in]`,
/// [`WeightLayout::OutIn`](super::llama::WeightLayout)), into a new row-major `[m, n]`.
///
/// Why: each output column's weights are one contiguous run of `k` values, so the kernel reads
/// the weight front to back and the hardware prefetcher streams it; [`skinny_gemm`] walks a
/// row-major `[k, n]` weight down strips `n` values apart, one software prefetch per line. The
/// price is a sum across lanes per output, once per `k` values.
pub fn skinny_gemm_t(x: &[f32], w_t: &[f32], mkn: [usize; 3]) -> Vec<f32> {
    skinny_gemm_t_with(Kernel::best(), x, w_t, mkn)
}

/// [`skinny_gemm_t`] through `kernel`, which the CPU must run. Each output is one fixed sequence
/// of sums over `k` (lanes in order, then across them), whatever `m` and the row's place.
pub fn skinny_gemm_t_with(kernel: Kernel, x: &[f32], w_t: &[f32], [m, k, n]: [usize; 3]) -> Vec<f32> {
    assert!(kernel.runs_here(), "{kernel:?} on this CPU");
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(w_t.len(), n * k, "w_t is [n, k]");
    let threads = rayon::current_num_threads();
    let parts = if m * k * n < PARALLEL_MIN_WORK || threads == 1 {
        1
    } else {
        // A few parts per thread, so that a thread slowed by other work is caught up.
        4 * threads
    };
    let per_part = n
        .div_ceil(parts)
        .next_multiple_of(ROW_TILE_COLUMNS)
        .max(ROW_TILE_COLUMNS);
    // Each part writes its columns' outputs, `[columns, m]`: contiguous per part.
    let mut out_t = vec![0.0f32; n * m];
    let part = |(p, out_t): (usize, &mut [f32])| {
        let first = p * per_part;
        let columns = first..first + out_t.len() / m.max(1);
        column_rows(kernel, x, w_t, [m, k], columns, out_t);
    };
    if parts == 1 {
        out_t.chunks_mut(per_part * m.max(1)).enumerate().for_each(part);
    } else {
        out_t
            .par_chunks_mut(per_part * m.max(1))
            .enumerate()
            .for_each(part);
    }
    let mut out = vec![0.0f32; m * n];
    for (j, column) in out_t.chunks_exact(m.max(1)).enumerate() {
        for (r, &v) in column.iter().enumerate() {
            out[r * n + j] = v;
        }
    }
    out
}

/// Output columns `columns` of every row, into `out_t` (`[columns, m]`), through `kernel`.
fn column_rows(
    kernel: Kernel,
    x: &[f32],
    w_t: &[f32],
    mk: [usize; 2],
    columns: Range<usize>,
    out_t: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn avx512(x: &[f32], w_t: &[f32], mk: [usize; 2], columns: Range<usize>, out_t: &mut [f32]) {
            column_rows_with::<Avx2Fma, WIDE_LANES>(x, w_t, mk, columns, TILE_ROWS, out_t)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], w_t: &[f32], mk: [usize; 2], columns: Range<usize>, out_t: &mut [f32]) {
            column_rows_with::<Avx2Fma, LANES>(x, w_t, mk, columns, TILE_ROWS, out_t)
        }
        match kernel {
            // SAFETY: the caller checked that the CPU runs `kernel`.
            Kernel::Avx512 => return unsafe { avx512(x, w_t, mk, columns, out_t) },
            // SAFETY: as above.
            Kernel::Avx2Fma => return unsafe { avx2(x, w_t, mk, columns, out_t) },
            Kernel::Portable => {}
        }
    }
    column_rows_with::<Portable, LANES>(x, w_t, mk, columns, TILE_ROWS, out_t)
}

#[inline(always)]
fn column_rows_with<I: Isa, const L: usize>(
    x: &[f32],
    w_t: &[f32],
    [m, k]: [usize; 2],
    columns: Range<usize>,
    max_rows: usize,
    out_t: &mut [f32],
) {
    // Row tiles as even as they can be, as in `columns_with` (`max_rows` is at most 4).
    let tile_rows = m.div_ceil(m.div_ceil(max_rows).max(1)).max(1);
    let mut j = columns.start;
    while j < columns.end {
        let width = ROW_TILE_COLUMNS.min(columns.end - j);
        let out_t = &mut out_t[(j - columns.start) * m..];
        let mut r = 0;
        while r < m {
            let rows = tile_rows.min(m - r);
            let at = (x, w_t, k, r, j, m);
            match (rows, width) {
                (4, 2) => row_tile::<I, L, 4, 2>(at, out_t),
                (3, 2) => row_tile::<I, L, 3, 2>(at, out_t),
                (2, 2) => row_tile::<I, L, 2, 2>(at, out_t),
                (1, 2) => row_tile::<I, L, 1, 2>(at, out_t),
                // The last column of an odd `n`, a row at a time: the same sums.
                _ => (r..r + rows).for_each(|row| row_tile::<I, L, 1, 1>((x, w_t, k, row, j, m), out_t)),
            }
            r += rows;
        }
        j += width;
    }
}

/// Rows `r..r + R` of `x` against weight rows `j..j + C` of `w_t`: `R × C` sums of `L` lanes
/// in registers, then each across its lanes, into `out_t[c * m + r + i]`.
#[inline(always)]
fn row_tile<I: Isa, const L: usize, const R: usize, const C: usize>(
    (x, w_t, k, r, j, m): (&[f32], &[f32], usize, usize, usize, usize),
    out_t: &mut [f32],
) {
    let mut acc = [[[0.0f32; L]; C]; R];
    let ws: [&[f32]; C] = std::array::from_fn(|c| &w_t[(j + c) * k..][..k]);
    let xs: [&[f32]; R] = std::array::from_fn(|i| &x[(r + i) * k..][..k]);
    let steps = k / L;
    for s in 0..steps {
        let wv: [[f32; L]; C] = std::array::from_fn(|c| ws[c][s * L..][..L].try_into().expect("L lanes"));
        let xv: [[f32; L]; R] = std::array::from_fn(|i| xs[i][s * L..][..L].try_into().expect("L lanes"));
        for (acc, xv) in acc.iter_mut().zip(&xv) {
            for (acc, wv) in acc.iter_mut().zip(&wv) {
                for l in 0..L {
                    acc[l] = I::mul_add(xv[l], wv[l], acc[l]);
                }
            }
        }
    }
    for i in 0..R {
        for c in 0..C {
            let tail: f32 = (steps * L..k).map(|t| xs[i][t] * ws[c][t]).sum();
            out_t[c * m + r + i] = acc[i][c].iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::kernels::gl::{product, values};

    /// `w [k, n]` of `w_t [n, k]`: the kernels' tests' f64 reference takes the weight `[n, k]`.
    fn transposed(w_t: &[f32], [k, n]: [usize; 2]) -> Vec<f32> {
        (0..k * n).map(|i| w_t[(i % n) * k + i / n]).collect()
    }

    /// Every kernel this CPU runs.
    #[test]
    fn cpu_gemm_skinny_matches_an_f64_product() {
        // Whole strips and a narrow last one; tiles of 1 to 8 rows; one thread's work and parts
        // over threads (768 × 2048 at 8 rows passes PARALLEL_MIN_WORK).
        for (kernel, mkn) in Kernel::available().into_iter().flat_map(|kernel| {
            [
                [1, 64, 64],
                [3, 7, 5],
                [5, 36, 33],
                [8, 768, 2048],
                [16, 100, 50],
                [9, 2048, 130],
                [7, 40, 96],
            ]
            .map(|mkn| (kernel, mkn))
        }) {
            let [m, k, n] = mkn;
            let (x, w_t) = (values(m * k, 1), values(n * k, 2));
            let got = skinny_gemm_with(kernel, &x, &transposed(&w_t, [k, n]), mkn);
            let want = product(&x, &w_t, mkn);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * k as f32,
                    "{kernel:?} {mkn:?} output {i}: kernel {g}, f64 product {e}"
                );
            }
        }
    }

    /// The kernel for `[out, in]` weights, every kernel this CPU runs: `k` a whole number of
    /// lanes and not, an odd `n` (a last column alone), tiles of 1 to 8 rows, one thread's work
    /// and parts over threads.
    #[test]
    fn cpu_gemm_skinny_out_in_matches_an_f64_product() {
        for kernel in Kernel::available() {
            for mkn in [
                [1, 64, 64],
                [3, 7, 5],
                [5, 36, 33],
                [8, 768, 2048],
                [16, 100, 51],
                [9, 2048, 130],
                [1, 768, 4099],
                [12, 40, 1],
            ] {
                let [m, k, n] = mkn;
                let (x, w_t) = (values(m * k, 1), values(n * k, 2));
                let got = skinny_gemm_t_with(kernel, &x, &w_t, mkn);
                let want = product(&x, &w_t, mkn);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * k as f32,
                        "{kernel:?} {mkn:?} output {i}: kernel {g}, f64 product {e}"
                    );
                }
            }
        }
    }

    /// A row's products are the same bits alone or among 15 others, at any place in its tile:
    /// a sequence's logits do not depend on its batch. Every kernel this CPU runs, both weight
    /// layouts.
    #[test]
    fn cpu_gemm_skinny_rows_do_not_depend_on_the_batch() {
        let (k, n) = (300, 70);
        let w = values(k * n, 3);
        let x = values(16 * k, 4);
        type Gemm = fn(Kernel, &[f32], &[f32], [usize; 3]) -> Vec<f32>;
        let layouts: [(&str, Gemm); 2] = [("[in, out]", skinny_gemm_with), ("[out, in]", skinny_gemm_t_with)];
        for (kernel, (layout, product)) in Kernel::available()
            .into_iter()
            .flat_map(|kernel| layouts.map(|l| (kernel, l)))
        {
            let gemm = |x: &[f32], rows: usize| product(kernel, x, &w, [rows, k, n]);
            let kernel = format!("{kernel:?} {layout}");
            let all = gemm(&x, 16);
            for r in [0, 1, 5, 14, 15] {
                assert_eq!(
                    gemm(&x[r * k..(r + 1) * k], 1),
                    all[r * n..(r + 1) * n],
                    "{kernel} row {r}"
                );
            }
            for (first, rows) in [(2, 5), (9, 7), (3, 2), (4, 8)] {
                let some = gemm(&x[first * k..(first + rows) * k], rows);
                assert_eq!(
                    some,
                    all[first * n..(first + rows) * n],
                    "{kernel} rows {first}..+{rows}"
                );
            }
        }
    }

    /// The hook takes f32 products of 2 to 16 contiguous rows (1 to 16 with `[out, in]`
    /// weights) and hands the rest to Flex's `matmul`; both agree with it.
    #[test]
    fn cpu_gemm_projection_agrees_with_flex_matmul() {
        let device = Default::default();
        let (k, n) = (96, 40);
        let tensor =
            |v: Vec<f32>, shape: [usize; 2]| Tensor::<Flex, 2>::from_data(TensorData::new(v, shape), &device);
        let w = tensor(values(k * n, 5), [k, n]);
        let tolerance = burn::tensor::Tolerance::absolute(1e-4);
        // The same weight as the checkpoint's `[out, in]` seen through a transposed view.
        let w_out_in = tensor(transposed(&values(k * n, 5), [n, k]), [n, k]).transpose();
        for m in [1, 2, 8, 16, 17] {
            let x = tensor(values(m * k, 6), [m, k]);
            let want = x.clone().matmul(w.clone()).into_data();
            for w in [&w, &w_out_in] {
                project(x.clone(), w.clone())
                    .into_data()
                    .assert_approx_eq::<f32>(&want, tolerance);
            }
        }
        assert!(transposed_rows(&w_out_in.clone().into_primitive().tensor(), [k, n]).is_some());
        assert!(transposed_rows(&w.clone().into_primitive().tensor(), [k, n]).is_none());
        // A transposed view of part of a matrix is not a whole `[n, k]`: `matmul` serves it.
        let part = tensor(values(2 * n * k, 8), [2 * n, k])
            .slice([n..2 * n, 0..k])
            .transpose();
        assert!(transposed_rows(&part.clone().into_primitive().tensor(), [k, n]).is_none());
        let x = tensor(values(4 * k, 6), [4, k]);
        let want = x.clone().matmul(part.clone()).into_data();
        project(x, part)
            .into_data()
            .assert_approx_eq::<f32>(&want, tolerance);
        // A transposed (strided) x falls back to `matmul`.
        let xt = tensor(values(k * 4, 7), [k, 4]).transpose();
        let want = xt.clone().matmul(w.clone()).into_data();
        project(xt, w)
            .into_data()
            .assert_approx_eq::<f32>(&want, tolerance);
    }
}
