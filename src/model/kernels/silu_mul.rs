//! The MLP's `silu(gate) · up` in one launch, as transformers computes it in half precision:
//! SiLU in f32 rounded to the model's type, then the product in that type.
//!
//! Why: burn runs SiLU and the product as two kernels (and SiLU itself as several without
//! fusion); this runs once per layer per step.

use cubecl::prelude::*;

use super::Refused;

const UNITS: u32 = 256;

#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float>(
    gate: &Array<F>,
    up: &Array<F>,
    out: &mut Array<F>,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < out.len() {
        let g = f32::cast_from(gate[ABSOLUTE_POS]);
        let silu = F::cast_from(g / (1.0f32 + (-g).exp()));
        out[ABSOLUTE_POS] = silu * up[ABSOLUTE_POS];
    }
}

/// Queues `out = silu(gate) · up` over `len` contiguous elements of `dtype` each.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [gate, up, out]: [cubecl::server::Handle; 3],
    len: usize,
    dtype: StorageType,
) -> Result<(), Refused> {
    if len == 0 {
        return Ok(());
    }
    let cubes = super::elementwise_cubes(len, UNITS)?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract); the kernel checks
    // `ABSOLUTE_POS < len`.
    unsafe {
        silu_mul_kernel::launch_unchecked::<R>(
            client,
            cubes,
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(gate, len),
            ArrayArg::from_raw_parts(up, len),
            ArrayArg::from_raw_parts(out, len),
            dtype,
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
        for len in [1usize, 255, 256, 8192 + 3] {
            let gate: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
                .collect();
            let up: Vec<f32> = (0..len)
                .map(|i| ((i * 104_729) % 997) as f32 / 300.0 - 1.5)
                .collect();
            let out = client.empty(len * 4);
            let handles = [gl::upload(&client, &gate), gl::upload(&client, &up), out.clone()];
            launch(&client, handles, len, f32_type).unwrap();
            let got = gl::download(&client, out);
            for i in 0..len {
                let g = gate[i] as f64;
                let want = (g / (1.0 + (-g).exp()) * up[i] as f64) as f32;
                assert!(
                    (got[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "[{i}] of {len}: {} vs {want}",
                    got[i]
                );
            }
        }
    }
}
