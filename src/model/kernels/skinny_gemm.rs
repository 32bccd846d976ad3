//! A tensor-core GEMM for batched decode: `out [m, n] = x [m, k] · wᵀ`, `w` stored `[n, k]`
//! (`[cuda] weight_layout = "out_in"`), for up to 128 rows (meant for 9-128, above the GEMV's).
//!
//! Why: above the GEMV's 8 rows the projections ran on cuBLAS, which cannot use cubecl's private
//! stream, so each call waits on the host before and after (75-110 µs a call where the GEMM
//! itself takes 15-30 µs; docs/Performance.md). This kernel runs on cubecl's stream like every
//! other kernel of ours, so the host never waits.
//!
//! Shape of the work, for a decode step's few rows and wide weights:
//! - A cube owns `n_warps` strips of 16 output columns, side by side, and every row of `x`
//!   (up to eight row tiles of 16). Each strip's `k` is split over `k_warps` warps; the cube
//!   always has eight warps.
//! - `x` is staged in shared memory a chunk of `k` at a time, zero past the last row, so the row
//!   tiles need no bounds. The weights are read once, straight from global memory into the
//!   warps' B tiles; a chunk's B tiles are loaded before the staging, so they are in flight
//!   while it runs.
//! - Each warp multiplies its B tiles into one f32 accumulator per row tile (CMMA 16x16x16).
//!   At the end the warps of a strip meet in shared memory, summed in a fixed order (so a row's
//!   result does not depend on the batch), and only the rows and columns that exist are written.
//!
//! Without tensor cores (`tensor_cores = false`) each warp computes the same tile products one
//! element per unit; the tests run that path on llvmpipe's GL, which has no CMMA, so the staging,
//! the split of `k` and the epilogue are checked on every machine. The CMMA path is checked by
//! `device_check gemm` on a GPU.

use cubecl::prelude::*;

use super::Refused;

/// Rows one launch takes: eight row tiles.
pub const SKINNY_MAX_ROWS: usize = 128;
/// The CMMA tile's side.
const TILE: usize = 16;
/// Bytes CMMA loads and stores want a tile's first element aligned to (256 bits).
const CMMA_ALIGN: usize = 32;
/// A tile's last row or column, relative to its first.
const TILE_LAST: usize = TILE - 1;
/// Elements added to each staged row of `x`: rows a multiple of 128 bytes apart (every chunk
/// here) would put a tile's 16 rows in the same shared-memory banks; 8 more (16 bytes of half
/// precision) spread them. CMMA needs the pitch to be a multiple of 8 elements, which it stays.
const PAD: usize = 8;
/// Elements of an output tile.
const TILE_ELEMS: usize = TILE * TILE;
/// Warps per cube.
const WARPS: usize = 8;
/// Units per warp (NVIDIA's plane size).
const LANES: usize = 32;
/// Units per cube.
const UNITS: usize = WARPS * LANES;

/// The problem's sizes: `x` is `[rows, k]`, `w` is `[n, k]`, both contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyShape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

/// How a launch divides its cube's eight warps into `n_warps` strips of 16 columns side by side
/// and `k_warps` warps splitting each strip's `k`.
/// - More rows want more strips per cube: every cube re-reads all of `x` (from L2), so
///   `rows / columns per cube` is that traffic against the weight's.
/// - A narrow weight wants fewer strips per cube, so that there are at least `min_cubes`
///   cubes to stream it (o and down of a 1B Llama have 2,048 outputs: 16 cubes of 128 columns
///   would leave most SMs idle).
/// - Shared memory bounds both: the staged chunk of `x` grows with `k_warps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyPlan {
    pub row_tiles: usize,
    /// 16-column strips per cube.
    pub n_warps: usize,
    /// Warps that split each strip's `k`.
    pub k_warps: usize,
    /// 16-wide steps of `k` per warp per staged chunk.
    pub steps: usize,
}

/// The plan's knobs (`[cuda.skinny]` in the server's configuration), so that a lent GPU can
/// try others without a rebuild. The defaults are reasoned, not yet measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SkinnyTuning {
    /// Cubes a launch aims for where the weight is wide enough: about one per SM of an H100
    /// (132). Fewer strips per cube give more cubes, but every cube re-reads `x`.
    pub min_cubes: usize,
    /// Shared memory a plan may use, KiB, even where the device allows more (an H100 has 228
    /// KiB per SM: two cubes' worth, the most its registers allow at eight row tiles anyway).
    pub max_shared_kib: usize,
    /// 16-wide steps of `k` per warp per chunk at most (1, 2, 4 or 8): a warp's B tiles of one
    /// chunk are in flight together (8 of them: 4 KiB per warp), and a chunk of 8 steps by 8
    /// warps (1,024) still divides the model's `k`.
    pub max_steps: usize,
}

impl SkinnyTuning {
    pub const DEFAULT: SkinnyTuning = SkinnyTuning {
        min_cubes: 128,
        max_shared_kib: 100,
        max_steps: 8,
    };

    /// Why these knobs cannot plan a launch; `None` when they can.
    pub fn refusal(&self) -> Option<String> {
        if self.min_cubes == 0 {
            return Some("min_cubes must be at least 1".into());
        }
        if !(16..=227).contains(&self.max_shared_kib) {
            return Some(format!(
                "max_shared_kib must be 16 to 227, not {}",
                self.max_shared_kib
            ));
        }
        if !matches!(self.max_steps, 1 | 2 | 4 | 8) {
            return Some(format!("max_steps must be 1, 2, 4 or 8, not {}", self.max_steps));
        }
        None
    }
}

impl Default for SkinnyTuning {
    fn default() -> Self {
        SkinnyTuning::DEFAULT
    }
}

/// The knobs [`launch`] plans with: one set per process, as the server's configuration says.
static TUNING: std::sync::RwLock<SkinnyTuning> = std::sync::RwLock::new(SkinnyTuning::DEFAULT);

/// Sets the knobs of every later [`launch`] in this process (the server does at start); knobs
/// with a [`SkinnyTuning::refusal`] are refused and the old ones kept.
pub fn set_tuning(tuning: SkinnyTuning) -> Result<(), Refused> {
    if let Some(why) = tuning.refusal() {
        return Err(Refused(why));
    }
    *TUNING.write().unwrap_or_else(|e| e.into_inner()) = tuning;
    Ok(())
}

fn tuning() -> SkinnyTuning {
    *TUNING.read().unwrap_or_else(|e| e.into_inner())
}

impl SkinnyPlan {
    /// The plan for `rows` rows of `n` outputs of `elem_bytes`-byte elements, in at most
    /// `max_shared` bytes of shared memory (capped at the tuning's).
    pub fn for_problem(
        rows: usize,
        n: usize,
        elem_bytes: usize,
        max_shared: usize,
        tuning: SkinnyTuning,
    ) -> SkinnyPlan {
        let row_tiles = rows.div_ceil(TILE).max(1);
        let mut n_warps = match row_tiles {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => WARPS,
        };
        while n_warps > 1 && n.div_ceil(n_warps * TILE) < tuning.min_cubes {
            n_warps /= 2;
        }
        let budget = max_shared.min(tuning.max_shared_kib * 1024);
        loop {
            let plan = SkinnyPlan::with_strips(row_tiles, n_warps, elem_bytes, budget, tuning.max_steps);
            if n_warps == WARPS || plan.shared_bytes(elem_bytes) <= budget {
                return plan;
            }
            n_warps *= 2;
        }
    }

    /// `n_warps` strips per cube, and as many 16-wide steps of `k` per chunk as fit `budget`
    /// bytes of shared memory (a power of two up to `max_steps`, so that a chunk divides the
    /// model's `k`; at least one). Each chunk costs a round trip to memory and two cube
    /// barriers, so fewer, longer chunks hide more of the latency.
    pub fn with_strips(
        row_tiles: usize,
        n_warps: usize,
        elem_bytes: usize,
        budget: usize,
        max_steps: usize,
    ) -> SkinnyPlan {
        let k_warps = WARPS / n_warps;
        let plan = |steps| SkinnyPlan {
            row_tiles,
            n_warps,
            k_warps,
            steps,
        };
        let mut steps = max_steps.max(1);
        while steps > 1 && plan(steps).shared_bytes(elem_bytes) > budget {
            steps /= 2;
        }
        plan(steps)
    }

    /// Shared memory the kernels declare: the staged chunk and the epilogue's f32 tiles.
    pub fn shared_bytes(&self, elem_bytes: usize) -> usize {
        self.row_tiles * TILE * (self.chunk() + PAD) * elem_bytes + WARPS * TILE_ELEMS * 4
    }

    /// Columns of `k` staged at a time.
    pub fn chunk(&self) -> usize {
        self.k_warps * self.steps * TILE
    }

    /// Output columns one cube owns.
    pub fn columns(&self) -> usize {
        self.n_warps * TILE
    }
}

/// Stages `x[.., k_begin .. k_begin + chunk]` as `[row_tiles * 16, chunk]` rows `chunk + PAD`
/// apart, zero past the last row and past `k`.
#[cube]
fn stage_x<F: Float>(
    x: &Array<F>,
    staged: &mut SharedMemory<F>,
    rows: usize,
    k: usize,
    k_begin: usize,
    #[comptime] chunk: usize,
    #[comptime] row_tiles: usize,
) {
    let mut i = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < comptime!(row_tiles * TILE * chunk) {
        let (r, c) = (i / chunk, i % chunk);
        let g = k_begin + c;
        let mut v = F::from_int(0);
        if r < rows && g < k {
            v = x[r * k + g];
        }
        staged[r * comptime!(chunk + PAD) + c] = v;
        i += UNITS;
    }
}

/// Writes row tile `t` of the cube's strips from the warps' f32 tiles in `scratch` (warp
/// `kw * n_warps + nw` at `warp * 256`, row-major): the `k_warps` partial sums of a strip added
/// in warp order, only rows below `rows` and columns below `n`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_tile<F: Float>(
    scratch: &SharedMemory<f32>,
    out: &mut Array<F>,
    t: usize,
    rows: usize,
    n: usize,
    n_begin: usize,
    #[comptime] n_warps: usize,
    #[comptime] k_warps: usize,
) {
    let mut i = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < comptime!(n_warps * TILE_ELEMS) {
        let (nw, e) = (i / TILE_ELEMS, i % TILE_ELEMS);
        let row = t * TILE + e / TILE;
        let col = n_begin + nw * TILE + e % TILE;
        if row < rows && col < n {
            let mut s = 0.0f32;
            #[unroll]
            for kw in 0..k_warps {
                s += scratch[(kw * n_warps + nw) * TILE_ELEMS + e];
            }
            out[row * n + col] = F::cast_from(s);
        }
        i += UNITS;
    }
}

/// The tensor-core kernel: CMMA 16x16x16, f32 accumulators. `k` and `n` are multiples of 16 and
/// `w` starts on a 32-byte boundary (the launcher checks), as CMMA loads ask.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn skinny_gemm_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    rows: u32,
    k: u32,
    n: u32,
    #[comptime] row_tiles: usize,
    #[comptime] n_warps: usize,
    #[comptime] k_warps: usize,
    #[comptime] steps: usize,
    #[define(F)] _dtype: StorageType,
) {
    let warp = UNIT_POS_Y as usize;
    let (nw, kw) = (warp % n_warps, warp / n_warps);
    let (rows, k, n) = (rows as usize, k as usize, n as usize);
    let chunk = comptime!(k_warps * steps * TILE);
    let n_begin = CUBE_POS_X as usize * comptime!(n_warps * TILE);
    // This warp's strip; past `n` (the last cube's spare warps) it only helps stage and write.
    let n0 = n_begin + nw * TILE;
    let mut staged = SharedMemory::<F>::new_aligned(comptime!(row_tiles * TILE * (chunk + PAD)), CMMA_ALIGN);
    let mut scratch = SharedMemory::<f32>::new_aligned(comptime!(WARPS * TILE_ELEMS), CMMA_ALIGN);

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..row_tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            TILE,
            TILE,
            TILE,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        ));
    }

    let mut k_begin = 0usize;
    while k_begin < k {
        // The chunk's B tiles first: `wᵀ[kg .. kg + 16, n0 .. n0 + 16]` is column-major in `w`.
        let mut b = Sequence::<cmma::Matrix<F>>::new();
        #[unroll]
        for s in 0..steps {
            let tile = unsafe {
                cmma::Matrix::<F>::uninitialized(
                    cmma::MatrixIdent::B,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::ColMajor,
                )
            };
            let kg = k_begin + (kw * steps + s) * TILE;
            if n0 < n && kg < k {
                let start = n0 * k + kg;
                cmma::load(&tile, &w.slice(start, start + TILE_LAST * k + TILE), k as u32);
            }
            b.push(tile);
        }
        stage_x::<F>(x, &mut staged, rows, k, k_begin, chunk, row_tiles);
        sync_cube();
        #[unroll]
        for s in 0..steps {
            let k_local = (kw * steps + s) * TILE;
            if n0 < n && k_begin + k_local < k {
                #[unroll]
                for t in 0..row_tiles {
                    let start = t * comptime!(TILE * (chunk + PAD)) + k_local;
                    let a = cmma::Matrix::<F>::from_slice(
                        cmma::MatrixIdent::A,
                        TILE,
                        TILE,
                        TILE,
                        cmma::MatrixLayout::RowMajor,
                        &staged.slice(start, start + comptime!(TILE_LAST * (chunk + PAD) + TILE)),
                        comptime!((chunk + PAD) as u32),
                    );
                    cmma::execute::<F, F, f32, f32>(&a, b.index(s), acc.index(t), acc.index(t));
                }
            }
        }
        // The next chunk's staging overwrites what the warps read.
        sync_cube();
        k_begin += chunk;
    }

    #[unroll]
    for t in 0..row_tiles {
        let at = warp * TILE_ELEMS;
        cmma::store(
            &mut scratch.slice_mut(at, at + TILE_ELEMS),
            acc.index(t),
            TILE as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_cube();
        write_tile::<F>(&scratch, out, t, rows, n, n_begin, n_warps, k_warps);
        sync_cube();
    }
}

/// The same work without tensor cores, for runtimes without CMMA (the tests' GL): each unit of
/// a warp holds 8 of a 16x16 tile's elements, `e = lane + 32 j`, and computes them from the
/// same staged `x` and the same `w` addresses as the CMMA tiles would load.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn skinny_gemm_units_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    rows: u32,
    k: u32,
    n: u32,
    #[comptime] row_tiles: usize,
    #[comptime] n_warps: usize,
    #[comptime] k_warps: usize,
    #[comptime] steps: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (warp, lane) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let (nw, kw) = (warp % n_warps, warp / n_warps);
    let (rows, k, n) = (rows as usize, k as usize, n as usize);
    let chunk = comptime!(k_warps * steps * TILE);
    let n_begin = CUBE_POS_X as usize * comptime!(n_warps * TILE);
    let n0 = n_begin + nw * TILE;
    let per_lane = comptime!(TILE_ELEMS / LANES);
    let mut staged = SharedMemory::<F>::new(comptime!(row_tiles * TILE * (chunk + PAD)));
    let mut scratch = SharedMemory::<f32>::new(comptime!(WARPS * TILE_ELEMS));

    let mut acc = Array::<f32>::new(comptime!(row_tiles * TILE_ELEMS / LANES));
    for i in 0..comptime!(row_tiles * TILE_ELEMS / LANES) {
        acc[i] = 0.0;
    }

    let mut k_begin = 0usize;
    while k_begin < k {
        stage_x::<F>(x, &mut staged, rows, k, k_begin, chunk, row_tiles);
        sync_cube();
        // Loops, not unrolled: llvmpipe compiles an unrolled shader of this size for minutes.
        for s in 0..steps {
            let k_local = (kw * steps + s) * TILE;
            let kg = k_begin + k_local;
            if n0 < n && kg < k {
                for t in 0..row_tiles {
                    for j in 0..per_lane {
                        let e = lane + j * LANES;
                        let (r, c) = (e / TILE, e % TILE);
                        let mut sum = 0.0f32;
                        for kk in 0..TILE {
                            let a = f32::cast_from(
                                staged[(t * TILE + r) * comptime!(chunk + PAD) + k_local + kk],
                            );
                            let b = f32::cast_from(w[(n0 + c) * k + kg + kk]);
                            sum += a * b;
                        }
                        acc[t * per_lane + j] += sum;
                    }
                }
            }
        }
        sync_cube();
        k_begin += chunk;
    }

    for t in 0..row_tiles {
        for j in 0..per_lane {
            scratch[warp * TILE_ELEMS + lane + j * LANES] = acc[t * per_lane + j];
        }
        sync_cube();
        write_tile::<F>(&scratch, out, t, rows, n, n_begin, n_warps, k_warps);
        sync_cube();
    }
}

/// Why `shape` cannot run here; `None` when it can. `k` and `n` must be multiples of 16 (a
/// CMMA tile never crosses a row of `w`), `rows` 1 to [`SKINNY_MAX_ROWS`].
pub fn refusal(shape: SkinnyShape) -> Option<Refused> {
    let SkinnyShape { rows, k, n } = shape;
    if rows == 0 || rows > SKINNY_MAX_ROWS {
        return Some(Refused(format!(
            "the skinny GEMM takes 1 to {SKINNY_MAX_ROWS} rows, not {rows}"
        )));
    }
    if k == 0 || n == 0 || !k.is_multiple_of(TILE) || !n.is_multiple_of(TILE) {
        return Some(Refused(format!(
            "the skinny GEMM needs k and n multiples of {TILE}, not k {k}, n {n}"
        )));
    }
    if u32::try_from(rows * k.max(n)).is_err() || u32::try_from(n * k).is_err() {
        return Some(Refused(format!("a GEMM of k {k}, n {n} is too large")));
    }
    None
}

/// Queues `out = x · wᵀ` on `client`. The handles hold contiguous `[rows, k]`, `[n, k]` and
/// `[rows, n]` elements of `dtype`, `elem_bytes` each; with `tensor_cores`, `dtype` is f16 or
/// bf16 and `w` starts on a 32-byte boundary (CMMA's loads).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [x, w, out]: [cubecl::server::Handle; 3],
    shape: SkinnyShape,
    (dtype, elem_bytes): (StorageType, usize),
    tensor_cores: bool,
) -> Result<(), Refused> {
    if let Some(why) = refusal(shape) {
        return Err(why);
    }
    let max_shared = client.properties().hardware.max_shared_memory_size;
    let (rows, n) = (shape.rows, shape.n);
    let plan = SkinnyPlan::for_problem(rows, n, elem_bytes, max_shared, tuning());
    launch_planned(client, [x, w, out], shape, plan, dtype, tensor_cores)
}

/// [`launch`] with a plan of the caller's (the tests run every kind).
fn launch_planned<R: Runtime>(
    client: &ComputeClient<R>,
    [x, w, out]: [cubecl::server::Handle; 3],
    shape: SkinnyShape,
    plan: SkinnyPlan,
    dtype: StorageType,
    tensor_cores: bool,
) -> Result<(), Refused> {
    let SkinnyShape { rows, k, n } = shape;
    let cubes = u32::try_from(n.div_ceil(plan.columns()))
        .ok()
        .filter(|&c| c <= super::MAX_CUBES_PER_DIM)
        .ok_or_else(|| Refused(format!("{n} outputs need more than one grid row of cubes")))?;
    let (count, dim) = (
        CubeCount::Static(cubes, 1, 1),
        CubeDim::new_2d(LANES as u32, WARPS as u32),
    );
    let (rows_u, k_u, n_u) = (rows as u32, k as u32, n as u32);
    let SkinnyPlan {
        row_tiles,
        n_warps,
        k_warps,
        steps,
    } = plan;
    // SAFETY: the arrays' lengths are those of the handles' buffers (the caller's contract).
    // Every index the kernels make is below them: staged reads of `x` check `r < rows` and
    // `g < k`; a strip reads `w` only when `n0 < n` and `kg < k`, and `n0 + 16 <= n`,
    // `kg + 16 <= k` since both are multiples of 16; writes check `row < rows`, `col < n`.
    macro_rules! launch_with {
        ($kernel:ident :: $Struct:ident) => {
            queue_kernel!(
                $kernel::$Struct<R>(client, count, dim),
                define [F = dtype],
                args [
                    Array<F> = ArrayArg::from_raw_parts(x, rows * k),
                    Array<F> = ArrayArg::from_raw_parts(w, n * k),
                    Array<F> = ArrayArg::from_raw_parts(out, rows * n),
                    u32 = rows_u,
                    u32 = k_u,
                    u32 = n_u,
                ],
                comptime [row_tiles, n_warps, k_warps, steps, dtype],
            )
        };
    }
    unsafe {
        if tensor_cores {
            launch_with!(skinny_gemm_kernel::SkinnyGemmKernel);
        } else {
            launch_with!(skinny_gemm_units_kernel::SkinnyGemmUnitsKernel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl::{self, values};

    fn reference(x: &[f32], w: &[f32], SkinnyShape { rows, k, n }: SkinnyShape) -> Vec<f32> {
        gl::product(x, w, [rows, k, n])
    }

    #[test]
    fn kernels_skinny_gemm_matches_an_f32_product() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let max_shared = client.properties().hardware.max_shared_memory_size;
        // Every row-tile count class (1, 2, 3-4, 5-8), partial last row tiles, a last cube with
        // spare strips (n 48 or 144 against 64 or 128 columns per cube), and k that is not a whole
        // number of chunks (k 80, 144 against chunks of 64-256); each with the plan `launch`
        // picks and with every strip count that fits GL's shared memory.
        let shapes = [
            (9, 256, 32),
            (16, 80, 48),
            (27, 144, 64),
            (50, 80, 48),
            (100, 96, 144),
            (128, 48, 16),
        ];
        let mut runs = 0;
        for (rows, k, n) in shapes {
            let shape = SkinnyShape { rows, k, n };
            let (x, w) = (values(rows * k, 1), values(n * k, 2));
            let want = reference(&x, &w, shape);
            let row_tiles = rows.div_ceil(TILE);
            let plans = [1, 2, 4, 8]
                .map(|strips| Some(SkinnyPlan::with_strips(row_tiles, strips, 4, max_shared, 8)))
                .into_iter()
                .chain([None]);
            for plan in plans {
                if plan.is_some_and(|p| p.shared_bytes(4) > max_shared) {
                    continue;
                }
                let out = client.empty(rows * n * 4);
                let handles = [gl::upload(&client, &x), gl::upload(&client, &w), out.clone()];
                match plan {
                    Some(plan) => launch_planned(&client, handles, shape, plan, f32_type, false),
                    None => launch(&client, handles, shape, (f32_type, 4), false),
                }
                .unwrap();
                let got = gl::download(&client, out);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{shape:?} {plan:?}: out[{}][{}] = {g}, want {e}",
                        i / n,
                        i % n
                    );
                }
                runs += 1;
            }
        }
        assert!(
            runs >= 20,
            "only {runs} plans fit GL's {max_shared} bytes of shared memory"
        );
    }

    #[test]
    fn kernels_skinny_gemm_plans_fit_shared_memory_and_cover_k() {
        // Llama-3.2-1B's outputs (o and down, q/k/v, gate/up, lm_head) and a narrow one.
        for n in [2048, 3072, 16384, 128_256, 48] {
            for rows in 1..=SKINNY_MAX_ROWS {
                for (elem_bytes, max_shared) in [(2, 227 * 1024), (4, 32 * 1024)] {
                    let tuning = SkinnyTuning::DEFAULT;
                    let plan = SkinnyPlan::for_problem(rows, n, elem_bytes, max_shared, tuning);
                    let cubes = n.div_ceil(plan.columns());
                    assert_eq!(plan.n_warps * plan.k_warps, WARPS, "{plan:?}");
                    assert!(plan.row_tiles * TILE >= rows && plan.row_tiles <= 8, "{plan:?}");
                    let shared = plan.shared_bytes(elem_bytes);
                    assert!(
                        shared <= max_shared.min(tuning.max_shared_kib * 1024),
                        "{rows} rows of {n}: {plan:?} uses {shared} bytes"
                    );
                    // Enough cubes to stream the weight, where it is wide enough.
                    if elem_bytes == 2 && n >= tuning.min_cubes * TILE {
                        assert!(cubes >= tuning.min_cubes, "{rows} rows of {n}: {cubes} cubes");
                    }
                    // The model's k (2048, 8192) is a whole number of chunks.
                    assert_eq!(2048 % plan.chunk(), 0, "{plan:?}");
                }
            }
        }
        // Knobs from the configuration: more cubes where asked, and only usable knobs.
        let many = SkinnyTuning {
            min_cubes: 512,
            ..SkinnyTuning::DEFAULT
        };
        let plan = SkinnyPlan::for_problem(128, 16384, 2, 227 * 1024, many);
        assert!(16384usize.div_ceil(plan.columns()) >= 512, "{plan:?}");
        let few_steps = SkinnyTuning {
            max_steps: 2,
            ..SkinnyTuning::DEFAULT
        };
        assert_eq!(
            SkinnyPlan::for_problem(9, 2048, 2, 227 * 1024, few_steps).steps,
            2
        );
        for bad in [(0, 100, 8), (128, 8, 8), (128, 100, 3), (128, 100, 16)] {
            let (min_cubes, max_shared_kib, max_steps) = bad;
            let t = SkinnyTuning {
                min_cubes,
                max_shared_kib,
                max_steps,
            };
            assert!(t.refusal().is_some(), "{t:?}");
        }
        assert!(SkinnyTuning::DEFAULT.refusal().is_none());
        assert!(refusal(SkinnyShape {
            rows: 129,
            k: 16,
            n: 16
        })
        .is_some());
        assert!(refusal(SkinnyShape {
            rows: 9,
            k: 40,
            n: 16
        })
        .is_some());
        assert!(refusal(SkinnyShape {
            rows: 9,
            k: 48,
            n: 24
        })
        .is_some());
        assert!(refusal(SkinnyShape {
            rows: 9,
            k: 48,
            n: 32
        })
        .is_none());
    }
}
