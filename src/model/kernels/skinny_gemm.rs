//! A tensor-core GEMM for batched decode: `out [m, n] = x [m, k] · wᵀ`, `w` stored `[n, k]`
//! (`[cuda] weight_layout = "out_in"`), for 9 to 128 rows.
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
/// Elements added to each staged row of `x`: rows a multiple of 1 KiB apart would put a tile's
/// 16 rows in the same shared-memory banks; 8 more (16 bytes) spreads them. CMMA needs the
/// pitch to be a multiple of 8 elements, which it stays.
const PAD: usize = 8;
/// Elements of an output tile.
const TILE_ELEMS: usize = TILE * TILE;
/// Warps per cube.
const WARPS: usize = 8;
/// Units per warp (NVIDIA's plane size).
const LANES: usize = 32;
/// Units per cube.
const UNITS: usize = WARPS * LANES;
/// Bytes of `x` staged per chunk of `k`: small enough for several cubes per SM, and within
/// llvmpipe's 32 KiB with the epilogue's scratch in f32.
const STAGE_BYTES: usize = 16 * 1024;

/// The problem's sizes: `x` is `[rows, k]`, `w` is `[n, k]`, both contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyShape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

/// How a launch divides its cube's eight warps, by the number of row tiles: few rows split `k`
/// over more warps (more cubes' worth of parallelism on narrow weights); many rows put more
/// strips side by side, so each staged row of `x` serves more columns (`x` is re-read by every
/// cube, from L2).
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

impl SkinnyPlan {
    pub fn for_rows(rows: usize, elem_bytes: usize) -> SkinnyPlan {
        let row_tiles = rows.div_ceil(TILE).max(1);
        let n_warps = match row_tiles {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => WARPS,
        };
        let k_warps = WARPS / n_warps;
        let per_step = row_tiles * TILE * k_warps * TILE * elem_bytes.max(1);
        // A power of two, so that a chunk divides the model's k.
        let steps = (STAGE_BYTES / per_step).clamp(1, 4);
        let steps = 1 << steps.ilog2();
        SkinnyPlan {
            row_tiles,
            n_warps,
            k_warps,
            steps,
        }
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
    let SkinnyShape { rows, k, n } = shape;
    let plan = SkinnyPlan::for_rows(rows, elem_bytes);
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
    unsafe {
        if tensor_cores {
            skinny_gemm_kernel::launch_unchecked::<R>(
                client,
                count,
                dim,
                ArrayArg::from_raw_parts(x, rows * k),
                ArrayArg::from_raw_parts(w, n * k),
                ArrayArg::from_raw_parts(out, rows * n),
                rows_u,
                k_u,
                n_u,
                row_tiles,
                n_warps,
                k_warps,
                steps,
                dtype,
            );
        } else {
            skinny_gemm_units_kernel::launch_unchecked::<R>(
                client,
                count,
                dim,
                ArrayArg::from_raw_parts(x, rows * k),
                ArrayArg::from_raw_parts(w, n * k),
                ArrayArg::from_raw_parts(out, rows * n),
                rows_u,
                k_u,
                n_u,
                row_tiles,
                n_warps,
                k_warps,
                steps,
                dtype,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl::{self, values};

    fn reference(x: &[f32], w: &[f32], SkinnyShape { rows, k, n }: SkinnyShape) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * n];
        for r in 0..rows {
            for o in 0..n {
                out[r * n + o] = (0..k)
                    .map(|j| x[r * k + j] as f64 * w[o * k + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn kernels_skinny_gemm_matches_an_f32_product() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        // Every plan (1, 2, 3-4 and 5-8 row tiles), partial last row tiles, a last cube with
        // spare strips (n 48 with 64 columns per cube), and k that is not a whole number of
        // chunks (k 80 against chunks of 64-256).
        for shape in [
            SkinnyShape {
                rows: 9,
                k: 256,
                n: 32,
            },
            SkinnyShape {
                rows: 16,
                k: 80,
                n: 48,
            },
            SkinnyShape {
                rows: 27,
                k: 144,
                n: 64,
            },
            SkinnyShape {
                rows: 50,
                k: 80,
                n: 48,
            },
            SkinnyShape {
                rows: 64,
                k: 64,
                n: 80,
            },
            SkinnyShape {
                rows: 100,
                k: 96,
                n: 144,
            },
            SkinnyShape {
                rows: 128,
                k: 48,
                n: 16,
            },
        ] {
            let SkinnyShape { rows, k, n } = shape;
            let (x, w) = (values(rows * k, 1), values(n * k, 2));
            let out = client.empty(rows * n * 4);
            let handles = [gl::upload(&client, &x), gl::upload(&client, &w), out.clone()];
            launch(&client, handles, shape, (f32_type, 4), false).unwrap();
            let got = gl::download(&client, out);
            let want = reference(&x, &w, shape);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{shape:?}: out[{}][{}] = {g}, want {e}",
                    i / n,
                    i % n
                );
            }
        }
    }

    #[test]
    fn kernels_skinny_gemm_plans_fit_shared_memory_and_cover_k() {
        for rows in 1..=SKINNY_MAX_ROWS {
            for elem_bytes in [2, 4] {
                let plan = SkinnyPlan::for_rows(rows, elem_bytes);
                assert_eq!(plan.n_warps * plan.k_warps, WARPS, "{plan:?}");
                assert!(plan.row_tiles * TILE >= rows && plan.row_tiles <= 8, "{plan:?}");
                let staged = plan.row_tiles * TILE * plan.chunk() * elem_bytes;
                assert!(staged <= STAGE_BYTES, "{rows} rows stage {staged} bytes");
                // With the padding and the epilogue's scratch, within llvmpipe's 32 KiB.
                let shared =
                    plan.row_tiles * TILE * (plan.chunk() + PAD) * elem_bytes + WARPS * TILE_ELEMS * 4;
                assert!(
                    shared <= 32 * 1024,
                    "{rows} rows use {shared} bytes of shared memory"
                );
                // Llama-3.2-1B's k (2048, 8192) is a whole number of chunks.
                assert_eq!(2048 % plan.chunk(), 0, "{plan:?}");
            }
        }
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
