//! A GEMV for decode: `out [m, n] = x [m, k] · wᵀ`, `w` stored `[n, k]` (the checkpoint's
//! layout, `[cuda] weight_layout = "out_in"`), for a few rows `m`.
//!
//! Why: decode reads every weight once per step, so a projection is memory-bound and its floor
//! is the weight's bytes over the memory bandwidth. Each plane (warp) of a cube owns one output
//! column `o`: its lanes walk row `o` of `w` in 16-byte vectors, side by side, so a plane reads
//! 512 contiguous bytes per step of the loop, and every weight vector read is used for all `m`
//! rows of `x` (kept hot in L1). The lanes' partial sums meet in a plane sum. Nothing waits on
//! the host, unlike cuBLAS here (see `cuda_gemm`).
//!
//! [`launch_swiglu`] is the MLP's first half in one launch: `silu(x · gateᵀ) · (x · upᵀ)` from
//! the merged `[gate; up]` weight. A cube's four warps take the gate and up rows of two outputs,
//! meet in shared memory and write the activation, rounded as the GEMV and `kernels::silu_mul`
//! would round it apart (each product to the model's type, SiLU in f32 to that type, then the
//! product in that type), so it is bit for bit the two launches it replaces.

use cubecl::prelude::*;

use super::Refused;

/// Rows of `x` one launch takes: each lane keeps a vector accumulator per row, so registers
/// bound it. Larger batches go to a tiling kernel.
pub const GEMV_MAX_ROWS: usize = 8;
/// Lanes per output: NVIDIA's plane (warp) size.
const LANES: u32 = 32;
/// Outputs per cube (a cube of 128 units).
const OUTPUTS_PER_CUBE: u32 = 4;

/// The problem's sizes: `x` is `[rows, k]`, `w` is `[n, k]`, both contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvShape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

#[cube(launch_unchecked)]
fn gemv_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    k_vectors: u32,
    outputs: u32,
    #[comptime] rows: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] swiglu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = LANES as usize;
    let (kv, n) = (k_vectors as usize, outputs as usize);
    // This warp's output and its row of `w`. With `swiglu`, `n` is the activation's width, `w`
    // has `2 n` rows (gate, then up), and the cube's warps 0-1 take the gate rows of outputs
    // `2 c`, `2 c + 1`, warps 2-3 their up rows.
    let mut o = (CUBE_POS_X * OUTPUTS_PER_CUBE + UNIT_POS_Y) as usize;
    let mut w_row = o;
    if swiglu {
        o = (CUBE_POS_X * 2 + UNIT_POS_Y % 2) as usize;
        w_row = o + (UNIT_POS_Y / 2) as usize * n;
    }
    // f32 accumulators whatever the weights' type, as cuBLAS computes bf16 GEMMs.
    let mut acc = Array::<Vector<f32, N>>::new(rows);
    #[unroll]
    for r in 0..rows {
        acc[r] = Vector::new(0.0);
    }
    if o < n {
        let row = w_row * kv;
        let mut i = UNIT_POS_X as usize;
        while i < kv {
            let wv = Vector::<f32, N>::cast_from(w[row + i]);
            #[unroll]
            for r in 0..rows {
                acc[r] += wv * Vector::<f32, N>::cast_from(x[r * kv + i]);
            }
            i += lanes;
        }
    }
    let mut sums = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        let v = acc[r];
        let mut s = 0.0f32;
        #[unroll]
        for j in 0..v.vector_size() {
            s += v[j];
        }
        sums[r] = s;
    }
    if comptime!(plane_reduce) {
        #[unroll]
        for r in 0..rows {
            sums[r] = plane_sum(sums[r]);
        }
    } else {
        // Every unit reaches the barrier, including those past the last output.
        let mut partial = SharedMemory::<f32>::new(rows * (LANES * OUTPUTS_PER_CUBE) as usize);
        let base = UNIT_POS_Y as usize * lanes * rows;
        #[unroll]
        for r in 0..rows {
            partial[base + r * lanes + UNIT_POS_X as usize] = sums[r];
        }
        sync_cube();
        if UNIT_POS_X == 0 {
            #[unroll]
            for r in 0..rows {
                let mut s = 0.0f32;
                for l in 0..lanes {
                    s += partial[base + r * lanes + l];
                }
                sums[r] = s;
            }
        }
    }
    if swiglu {
        // Every unit reaches the barrier; lane 0 of each warp holds its sums.
        let mut pair = SharedMemory::<f32>::new(rows * OUTPUTS_PER_CUBE as usize);
        if UNIT_POS_X == 0 {
            #[unroll]
            for r in 0..rows {
                pair[UNIT_POS_Y as usize * rows + r] = sums[r];
            }
        }
        sync_cube();
        if UNIT_POS_X == 0 && UNIT_POS_Y < 2 && o < n {
            #[unroll]
            for r in 0..rows {
                let gate = F::cast_from(pair[UNIT_POS_Y as usize * rows + r]);
                let up = F::cast_from(pair[(UNIT_POS_Y as usize + 2) * rows + r]);
                let g = f32::cast_from(gate);
                out[r * n + o] = F::cast_from(g / (1.0f32 + (-g).exp())) * up;
            }
        }
    } else if UNIT_POS_X == 0 && o < n {
        #[unroll]
        for r in 0..rows {
            out[r * n + o] = F::cast_from(sums[r]);
        }
    }
}

/// Queues `out = x · wᵀ` on `client`. The handles hold contiguous `[rows, k]`, `[n, k]` and
/// `[rows, n]` elements of `dtype`, `elem_bytes` each. `plane_reduce` sums a plane's lanes
/// with a plane operation (CUDA); without it, through shared memory (any runtime).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    handles: [cubecl::server::Handle; 3],
    shape: GemvShape,
    dtype: (StorageType, usize),
    plane_reduce: bool,
) -> Result<(), Refused> {
    launch_kernel(client, handles, shape, dtype, plane_reduce, false)
}

/// Queues `out = silu(x · gateᵀ) · (x · upᵀ)` on `client`, `w` holding `[2 n, k]` elements
/// (`n` gate rows, then `n` up rows) and `out` `[rows, n]`; otherwise as [`launch`].
pub fn launch_swiglu<R: Runtime>(
    client: &ComputeClient<R>,
    handles: [cubecl::server::Handle; 3],
    shape: GemvShape,
    dtype: (StorageType, usize),
    plane_reduce: bool,
) -> Result<(), Refused> {
    launch_kernel(client, handles, shape, dtype, plane_reduce, true)
}

fn launch_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    [x, w, out]: [cubecl::server::Handle; 3],
    shape: GemvShape,
    (dtype, elem_bytes): (StorageType, usize),
    plane_reduce: bool,
    swiglu: bool,
) -> Result<(), Refused> {
    let GemvShape { rows, k, n } = shape;
    if rows == 0 || rows > GEMV_MAX_ROWS {
        return Err(Refused(format!(
            "the GEMV takes 1 to {GEMV_MAX_ROWS} rows, not {rows}"
        )));
    }
    if k == 0 || n == 0 {
        return Err(Refused("an empty GEMV".into()));
    }
    let max_vector = client.properties().hardware.max_vector_size;
    let width = super::vector_width(k, elem_bytes, max_vector);
    let kv = k / width;
    let (k_vectors, n_out) = match (u32::try_from(kv), u32::try_from(n)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(Refused(format!("a GEMV of k {k}, n {n} is too large"))),
    };
    let outputs_per_cube = if swiglu { 2 } else { OUTPUTS_PER_CUBE };
    let cubes = n_out.div_ceil(outputs_per_cube);
    let w_rows = if swiglu { 2 * n } else { n };
    if cubes > super::MAX_CUBES_PER_DIM {
        return Err(Refused(format!(
            "{n} outputs need more than one grid row of cubes"
        )));
    }
    // SAFETY: the arrays' lengths are those of the handles' buffers (the caller's contract) and
    // every index the kernel makes is below them: `o < n` (so the row of `w` is below `w_rows`),
    // `i < kv`, `r < rows`.
    unsafe {
        gemv_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(LANES, OUTPUTS_PER_CUBE),
            width,
            ArrayArg::from_raw_parts(x, rows * kv),
            ArrayArg::from_raw_parts(w, w_rows * kv),
            ArrayArg::from_raw_parts(out, rows * n),
            k_vectors,
            n_out,
            rows,
            plane_reduce,
            swiglu,
            dtype,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl::{self, values};

    fn reference(x: &[f32], w: &[f32], GemvShape { rows, k, n }: GemvShape) -> Vec<f32> {
        gl::product(x, w, [rows, k, n])
    }

    #[test]
    fn kernels_gemv_matches_an_f32_product() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        // Llama-3.2-1B's k (2048) with its q/k/v widths cut down; k 36 makes 4-wide vectors and
        // k 7 scalar ones; n 5 and 33 leave the last cube part empty.
        for shape in [
            GemvShape {
                rows: 1,
                k: 2048,
                n: 64,
            },
            GemvShape {
                rows: 3,
                k: 2048,
                n: 33,
            },
            GemvShape {
                rows: 8,
                k: 512,
                n: 96,
            },
            GemvShape { rows: 2, k: 36, n: 5 },
            GemvShape { rows: 5, k: 7, n: 9 },
        ] {
            let GemvShape { rows, k, n } = shape;
            let (x, w) = (values(rows * k, 1), values(n * k, 2));
            let out = client.empty(rows * n * 4);
            let handles = [gl::upload(&client, &x), gl::upload(&client, &w), out.clone()];
            launch(&client, handles, shape, (f32_type, 4), false).unwrap();
            let got = gl::download(&client, out);
            let want = reference(&x, &w, shape);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{shape:?} output {i}: kernel {g}, f32 product {e}"
                );
            }
        }
    }

    /// The fused launch is bit for bit the GEMV of the merged weight and then `silu_mul`.
    #[test]
    fn kernels_gemv_swiglu_is_the_gemv_then_silu_mul() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        // An odd width leaves the last cube half empty; k 36 makes 4-wide vectors.
        for (rows, k, width) in [(1, 64, 6), (3, 36, 5), (8, 128, 33)] {
            let (x, w) = (values(rows * k, 3), values(2 * width * k, 4));
            let merged = GemvShape {
                rows,
                k,
                n: 2 * width,
            };
            let gate_up = client.empty(rows * 2 * width * 4);
            let handles = [gl::upload(&client, &x), gl::upload(&client, &w), gate_up.clone()];
            launch(&client, handles, merged, (f32_type, 4), false).unwrap();
            let apart = client.empty(rows * width * 4);
            crate::model::kernels::silu_mul::launch(
                &client,
                [gate_up, apart.clone()],
                (rows, width),
                f32_type,
            )
            .unwrap();
            let fused = client.empty(rows * width * 4);
            let handles = [gl::upload(&client, &x), gl::upload(&client, &w), fused.clone()];
            let shape = GemvShape { rows, k, n: width };
            launch_swiglu(&client, handles, shape, (f32_type, 4), false).unwrap();
            let (apart, fused) = (gl::download(&client, apart), gl::download(&client, fused));
            assert_eq!(fused, apart, "rows {rows}, k {k}, width {width}");
            assert!(fused.iter().any(|v| *v != 0.0));
        }
    }

    #[test]
    fn kernels_gemv_refuses_what_it_cannot_run() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let h = || client.empty(4);
        for shape in [
            GemvShape {
                rows: GEMV_MAX_ROWS + 1,
                k: 8,
                n: 8,
            },
            GemvShape { rows: 0, k: 8, n: 8 },
            GemvShape { rows: 1, k: 0, n: 8 },
            // More outputs than one grid row of cubes holds (a 262,144-token vocabulary).
            GemvShape {
                rows: 1,
                k: 8,
                n: 4 * 65_536,
            },
        ] {
            assert!(
                launch(&client, [h(), h(), h()], shape, (f32_type, 4), false).is_err(),
                "{shape:?}"
            );
        }
    }
}
