//! Rotary position embedding, transformers' rotate-half layout, in one launch:
//! `out = x · cos + rotate_half(x) · sin`, where `rotate_half` pairs element `i` of a head with
//! `i + head_dim / 2` (`[-x₂, x₁]`). The products and the sum are in the model's type, as
//! transformers and burn's path compute them.
//!
//! Why: burn's path slices the two halves, negates one, concatenates them and runs three
//! element-wise products and sums: about six launches for q and six for k in every layer.

use cubecl::prelude::*;

use super::Refused;

const UNITS: u32 = 256;

#[cube(launch_unchecked)]
fn rope_kernel<F: Float>(
    x: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    out: &mut Array<F>,
    heads: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let idx = ABSOLUTE_POS;
    if idx < out.len() {
        let half = comptime!(head_dim / 2);
        let i = idx % head_dim;
        let token = idx / (heads as usize * head_dim);
        let rotated = if i < half { -x[idx + half] } else { x[idx - half] };
        let at = token * head_dim + i;
        out[idx] = x[idx] * cos[at] + rotated * sin[at];
    }
}

/// Queues RoPE of `x` (`[tokens, heads, head_dim]`, contiguous) with the step's `cos` and `sin`
/// rows (`[tokens, head_dim]`) into `out`, all of `dtype`.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [x, cos, sin, out]: [cubecl::server::Handle; 4],
    (tokens, heads, head_dim): (usize, usize, usize),
    dtype: StorageType,
) -> Result<(), Refused> {
    let len = tokens * heads * head_dim;
    if len == 0 {
        return Ok(());
    }
    if head_dim % 2 != 0 {
        return Err(Refused(format!("RoPE over an odd head_dim {head_dim}")));
    }
    let heads_u32 = u32::try_from(heads).map_err(|_| Refused(format!("RoPE over {heads} heads")))?;
    let cubes = super::elementwise_cubes(len, UNITS)?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract); the kernel checks
    // `idx < len` and reads `x` within the same head, `cos`/`sin` within the token's row.
    unsafe {
        queue_kernel!(
            rope_kernel::RopeKernel<R>(
                client,
                cubes,
                CubeDim::new_1d(UNITS),
            ),
            define [F = dtype],
            args [
                Array<F> = ArrayArg::from_raw_parts(x, len),
                Array<F> = ArrayArg::from_raw_parts(cos, tokens * head_dim),
                Array<F> = ArrayArg::from_raw_parts(sin, tokens * head_dim),
                Array<F> = ArrayArg::from_raw_parts(out, len),
                u32 = heads_u32,
            ],
            comptime [head_dim, dtype],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;

    #[test]
    fn kernels_rope_matches_rotate_half() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        for (tokens, heads, hd) in [(1, 1, 8), (3, 4, 64), (5, 2, 128)] {
            let x: Vec<f32> = (0..tokens * heads * hd)
                .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let angle = |t: usize, i: usize| (t as f32 + 1.0) * 0.37 * (i % (hd / 2) + 1) as f32;
            let cos: Vec<f32> = (0..tokens * hd).map(|j| angle(j / hd, j % hd).cos()).collect();
            let sin: Vec<f32> = (0..tokens * hd).map(|j| angle(j / hd, j % hd).sin()).collect();
            let out = client.empty(x.len() * 4);
            let handles = [
                gl::upload(&client, &x),
                gl::upload(&client, &cos),
                gl::upload(&client, &sin),
                out.clone(),
            ];
            launch(&client, handles, (tokens, heads, hd), f32_type).unwrap();
            let got = gl::download(&client, out);
            for (idx, g) in got.iter().enumerate() {
                let (t, i) = (idx / (heads * hd), idx % hd);
                let half = hd / 2;
                let rotated = if i < half { -x[idx + half] } else { x[idx - half] };
                let want = x[idx] * cos[t * hd + i] + rotated * sin[t * hd + i];
                assert!(
                    (g - want).abs() <= 1e-6,
                    "{tokens}x{heads}x{hd} [{idx}]: {g} vs {want}"
                );
            }
        }
    }
}
