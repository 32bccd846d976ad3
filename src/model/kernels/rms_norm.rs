//! RMSNorm in one launch: `out = (x / sqrt(mean(x²) + eps)) · weight` per row, as transformers
//! computes it (the statistics in f32, the normalised row rounded to the model's type, then
//! multiplied by the weight in that type).
//!
//! Why: burn composes it from some eight kernels (cast, square, mean, add, sqrt, reciprocal,
//! multiply, cast, multiply); a decode step runs it twice per layer, and at small batches the
//! step's time is mostly launches (docs/Performance.md).
//!
//! [`launch_add`] also adds the residual first (`sum = x + delta`, rounded to the model's type,
//! then normalised), writing both: every RMSNorm of a layer but the first follows a residual add,
//! so that is one launch fewer per norm.

use cubecl::prelude::*;

use super::Refused;

/// Units per row (one cube per row).
const UNITS: usize = 256;

/// One cube per row. With `residual`, the row is `x + delta`, stored into `sum` on the way;
/// otherwise `delta` and `sum` are not touched.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_kernel<F: Float>(
    x: &Array<F>,
    delta: &Array<F>,
    weight: &Array<F>,
    sum: &mut Array<F>,
    out: &mut Array<F>,
    width: u32,
    eps: f32,
    #[comptime] residual: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (row, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let width = width as usize;
    let base = row * width;
    let mut squares = 0.0f32;
    let mut i = u;
    while i < width {
        let mut value = x[base + i];
        if residual {
            value += delta[base + i];
            sum[base + i] = value;
        }
        let v = f32::cast_from(value);
        squares += v * v;
        i += UNITS;
    }
    let mut partial = SharedMemory::<f32>::new(UNITS);
    partial[u] = squares;
    sync_cube();
    // Tree sum over the cube's units (a power of two).
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if u < stride {
            partial[u] += partial[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let inv_rms = 1.0f32 / (partial[0] / f32::cast_from(width) + eps).sqrt();
    let mut i = u;
    while i < width {
        // Each unit reads back only the elements it wrote itself.
        let value = if residual { sum[base + i] } else { x[base + i] };
        let normed = F::cast_from(f32::cast_from(value) * inv_rms);
        out[base + i] = normed * weight[i];
        i += UNITS;
    }
}

/// Queues RMSNorm of the `rows` rows of `x` (`[rows, width]`, contiguous) with `weight`
/// (`[width]`) into `out` (`[rows, width]`), all of `dtype`.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [x, weight, out]: [cubecl::server::Handle; 3],
    (rows, width): (usize, usize),
    eps: f32,
    dtype: StorageType,
) -> Result<(), Refused> {
    // `delta` and `sum` are bound but not read or written without the residual.
    let handles = [x.clone(), x, weight, out.clone(), out];
    launch_inner(client, handles, (rows, width), eps, false, dtype)
}

/// Queues `sum = x + delta` and RMSNorm of `sum` with `weight` into `out`: `x`, `delta`, `sum`
/// and `out` are `[rows, width]`, contiguous, `weight` `[width]`, all of `dtype`.
pub fn launch_add<R: Runtime>(
    client: &ComputeClient<R>,
    [x, delta, weight, sum, out]: [cubecl::server::Handle; 5],
    (rows, width): (usize, usize),
    eps: f32,
    dtype: StorageType,
) -> Result<(), Refused> {
    launch_inner(
        client,
        [x, delta, weight, sum, out],
        (rows, width),
        eps,
        true,
        dtype,
    )
}

fn launch_inner<R: Runtime>(
    client: &ComputeClient<R>,
    [x, delta, weight, sum, out]: [cubecl::server::Handle; 5],
    (rows, width): (usize, usize),
    eps: f32,
    residual: bool,
    dtype: StorageType,
) -> Result<(), Refused> {
    if rows == 0 {
        return Ok(());
    }
    let (Ok(cubes), Ok(width_u32)) = (u32::try_from(rows), u32::try_from(width)) else {
        return Err(Refused(format!("an RMSNorm of {rows} rows of {width}")));
    };
    if width == 0 {
        return Err(Refused("an RMSNorm of empty rows".into()));
    }
    if cubes > super::MAX_CUBES_PER_DIM {
        return Err(Refused(format!(
            "an RMSNorm of {rows} rows (a cube each) in one grid row"
        )));
    }
    // SAFETY: the arrays' lengths are the handles' (the caller's contract); the kernel indexes
    // rows below `rows` and columns below `width`.
    unsafe {
        queue_kernel!(
            rms_norm_kernel::RmsNormKernel<R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(UNITS as u32),
            ),
            define [F = dtype],
            args [
                Array<F> = ArrayArg::from_raw_parts(x, rows * width),
                Array<F> = ArrayArg::from_raw_parts(delta, rows * width),
                Array<F> = ArrayArg::from_raw_parts(weight, width),
                Array<F> = ArrayArg::from_raw_parts(sum, rows * width),
                Array<F> = ArrayArg::from_raw_parts(out, rows * width),
                u32 = width_u32,
                f32 = eps,
            ],
            comptime [residual, dtype],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;

    /// `got` is transformers' RMSNorm of the rows of `x` (f64 statistics) within float error.
    fn assert_normed(x: &[f32], w: &[f32], eps: f32, width: usize, got: &[f32]) {
        let rows = x.len() / width;
        for r in 0..rows {
            let row = &x[r * width..(r + 1) * width];
            let mean = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (mean + eps as f64).sqrt();
            for i in 0..width {
                let want = (row[i] as f64 * inv) as f32 * w[i];
                let g = got[r * width + i];
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{rows}x{width} [{r}, {i}]: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn kernels_rms_norm_matches_transformers_formula() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        // Hidden sizes below, at and above the cube's units, and one not a power of two.
        for (rows, width) in [(1, 64), (3, 256), (2, 2048), (5, 100)] {
            let x: Vec<f32> = (0..rows * width)
                .map(|i| ((i * 7919) % 2001) as f32 / 500.0 - 2.0)
                .collect();
            let w: Vec<f32> = (0..width).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let eps = 1e-5f32;
            let out = client.empty(rows * width * 4);
            let handles = [gl::upload(&client, &x), gl::upload(&client, &w), out.clone()];
            launch(&client, handles, (rows, width), eps, f32_type).unwrap();
            let got = gl::download(&client, out);
            assert_normed(&x, &w, eps, width, &got);
        }
    }

    #[test]
    fn kernels_rms_norm_adds_the_residual_first() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        for (rows, width) in [(1, 64), (3, 300), (2, 2048)] {
            let x = gl::values(rows * width, 1);
            let delta = gl::values(rows * width, 2);
            let w: Vec<f32> = (0..width).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
            let eps = 1e-6f32;
            let (sum, out) = (client.empty(rows * width * 4), client.empty(rows * width * 4));
            let handles = [
                gl::upload(&client, &x),
                gl::upload(&client, &delta),
                gl::upload(&client, &w),
                sum.clone(),
                out.clone(),
            ];
            launch_add(&client, handles, (rows, width), eps, f32_type).unwrap();
            let (sum_got, got) = (gl::download(&client, sum), gl::download(&client, out));
            let sum_want: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
            assert_eq!(sum_got, sum_want, "{rows}x{width}: x + delta");
            assert_normed(&sum_want, &w, eps, width, &got);
        }
    }
}
