//! The MLP's `silu(gate) · up` in one launch, as transformers computes it in half precision:
//! SiLU in f32 rounded to the model's type, then the product in that type. It reads the merged
//! gate/up product `[rows, 2 * width]` (each row: gate, then up), so the model runs one
//! projection for both.
//!
//! Why: burn runs SiLU and the product as two kernels (and SiLU itself as several without
//! fusion); this runs once per layer per step.

use cubecl::prelude::*;

use super::Refused;

const UNITS: u32 = 256;

#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float>(
    gate_up: &Array<F>,
    out: &mut Array<F>,
    width: u32,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < out.len() {
        let w = width as usize;
        let at = (ABSOLUTE_POS / w) * 2 * w + ABSOLUTE_POS % w;
        let g = f32::cast_from(gate_up[at]);
        let silu = F::cast_from(g / (1.0f32 + (-g).exp()));
        out[ABSOLUTE_POS] = silu * gate_up[at + w];
    }
}

/// Queues `out [rows, width] = silu(gate) · up` from `gate_up [rows, 2 * width]`, both
/// contiguous and of `dtype`.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [gate_up, out]: [cubecl::server::Handle; 2],
    (rows, width): (usize, usize),
    dtype: StorageType,
) -> Result<(), Refused> {
    let len = rows * width;
    if len == 0 {
        return Ok(());
    }
    let width_u32 = u32::try_from(width).map_err(|_| Refused(format!("an MLP {width} wide")))?;
    let cubes = super::elementwise_cubes(len, UNITS)?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract); the kernel checks
    // `ABSOLUTE_POS < rows * width` and reads row `ABSOLUTE_POS / width` of `gate_up`.
    unsafe {
        queue_kernel!(
            silu_mul_kernel::SiluMulKernel<R>(
                client,
                cubes,
                CubeDim::new_1d(UNITS),
            ),
            define [F = dtype],
            args [
                Array<F> = ArrayArg::from_raw_parts(gate_up, 2 * len),
                Array<F> = ArrayArg::from_raw_parts(out, len),
                u32 = width_u32,
            ],
            comptime [dtype],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;

    #[test]
    fn kernels_silu_mul_matches_the_formula() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        for (rows, width) in [(1usize, 1usize), (3, 85), (2, 256), (2, 8192 + 3)] {
            let len = rows * width;
            let gate: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
                .collect();
            let up: Vec<f32> = (0..len)
                .map(|i| ((i * 104_729) % 997) as f32 / 300.0 - 1.5)
                .collect();
            // Each row: its gate, then its up.
            let gate_up: Vec<f32> = (0..rows)
                .flat_map(|r| [&gate[r * width..(r + 1) * width], &up[r * width..(r + 1) * width]].concat())
                .collect();
            let out = client.empty(len * 4);
            let handles = [gl::upload(&client, &gate_up), out.clone()];
            launch(&client, handles, (rows, width), f32_type).unwrap();
            let got = gl::download(&client, out);
            for i in 0..len {
                let g = gate[i] as f64;
                let want = (g / (1.0 + (-g).exp()) * up[i] as f64) as f32;
                assert!(
                    (got[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "[{i}] of {rows}x{width}: {} vs {want}",
                    got[i]
                );
            }
        }
    }
}
