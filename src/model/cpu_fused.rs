//! RoPE, RMSNorm (with its residual add) and the MLP's `silu(gate) · up` for the CPU backend,
//! each one pass over host rows.
//!
//! Why: burn Flex composes each from 4-7 ops, and several of them walk broadcast or sliced
//! operands through its strided iterator. In a `perf` profile of the server at concurrency 128 on
//! the embedded model, Flex's strided iterator took 13-16% of the samples, under RoPE's broadcast
//! products and sum. Each function here falls back to the burn composition (`llama::rms_norm`
//! and the others) when an operand is not a contiguous f32 tensor.
//!
//! RoPE and the activation round as the compositions do, operation for operation, so their
//! results are the same bits. RMSNorm sums each row's squares in another order, so its results
//! agree to f32's rounding of that sum. Every row is computed alone, so a row's result does not
//! depend on the rows beside it.

use std::sync::Arc;

use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData};

use super::llama::{self, FusedOps};

/// The CPU backend's [`FusedOps`]: the four row-wise ops here, none of the CUDA-only merges
/// (those stay `None`, so the model runs its projections and the cache's write as before).
pub fn fused_ops() -> FusedOps<Flex> {
    FusedOps {
        rms_norm: Arc::new(rms_norm),
        add_rms_norm: Arc::new(add_rms_norm),
        silu_mul: Arc::new(silu_mul_halves),
        gate_up_act: None,
        norm_project: None,
        norm_qkv_write: None,
        rope: Arc::new(rope),
        qkv_write: None,
        embed: None,
    }
}

/// `t`'s storage (shared, not copied); `.as_slice::<f32>()` then borrows its elements when it is
/// contiguous f32.
fn storage<const D: usize>(t: &Tensor<Flex, D>) -> FloatTensor<Flex> {
    t.clone().into_primitive().tensor()
}

/// A tensor of `values` on the device of `like`.
fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], like: &Tensor<Flex, D>) -> Tensor<Flex, D> {
    Tensor::from_data(TensorData::new(values, shape), &like.device())
}

/// Hugging Face's rotate-half RoPE of `x [tokens, heads, head_dim]` with `cos`/`sin`
/// `[tokens, 1, head_dim]`, as [`llama::rotate_half_rope`].
pub fn rope(x: Tensor<Flex, 3>, cos: Tensor<Flex, 3>, sin: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
    let [t, heads, d] = x.dims();
    let tables_fit = cos.dims() == [t, 1, d] && sin.dims() == [t, 1, d] && d % 2 == 0;
    let (xs, cs, ss) = (storage(&x), storage(&cos), storage(&sin));
    match (xs.as_slice::<f32>(), cs.as_slice::<f32>(), ss.as_slice::<f32>()) {
        (Some(xs), Some(cs), Some(ss)) if tables_fit => {
            tensor(rope_rows(xs, cs, ss, [t, heads, d]), [t, heads, d], &x)
        }
        _ => llama::rotate_half_rope(x, &cos, &sin),
    }
}

/// `x · cos + rotate_half(x) · sin` per head, rounded as the tensor composition rounds it.
fn rope_rows(x: &[f32], cos: &[f32], sin: &[f32], [t, heads, d]: [usize; 3]) -> Vec<f32> {
    let half = d / 2;
    let mut out = vec![0.0f32; x.len()];
    for token in 0..t {
        let (c, s) = (&cos[token * d..][..d], &sin[token * d..][..d]);
        for head in 0..heads {
            let at = (token * heads + head) * d;
            let (xs, o) = (&x[at..at + d], &mut out[at..at + d]);
            for i in 0..half {
                o[i] = xs[i] * c[i] + (-xs[i + half]) * s[i];
                o[i + half] = xs[i + half] * c[i + half] + xs[i] * s[i + half];
            }
        }
    }
    out
}

/// RMSNorm of each row of `x [rows, width]` with gain `weight [width]`, as [`llama::rms_norm`].
pub fn rms_norm(x: Tensor<Flex, 2>, weight: Tensor<Flex, 1>, eps: f64) -> Tensor<Flex, 2> {
    let dims = x.dims();
    let (xs, ws) = (storage(&x), storage(&weight));
    match (xs.as_slice::<f32>(), ws.as_slice::<f32>()) {
        (Some(xs), Some(ws)) if ws.len() == dims[1] => tensor(rms_norm_rows(xs, ws, eps), dims, &x),
        _ => llama::rms_norm(x, weight, eps),
    }
}

/// `(x + delta, rms_norm(x + delta))`, as [`llama::add_rms_norm`].
pub fn add_rms_norm(
    x: Tensor<Flex, 2>,
    delta: Tensor<Flex, 2>,
    weight: Tensor<Flex, 1>,
    eps: f64,
) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
    let dims = x.dims();
    let (xs, ds) = (storage(&x), storage(&delta));
    match (xs.as_slice::<f32>(), ds.as_slice::<f32>()) {
        (Some(xs), Some(ds)) if delta.dims() == dims => {
            let sum = tensor(xs.iter().zip(ds).map(|(a, b)| a + b).collect(), dims, &x);
            (sum.clone(), rms_norm(sum, weight, eps))
        }
        _ => llama::add_rms_norm(x, delta, weight, eps),
    }
}

/// Each row times the reciprocal of its root mean square (f32), then times the gain.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let width = weight.len();
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean_square = sum_of_squares(row) / width as f32;
        let inv_rms = 1.0 / (mean_square + eps as f32).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * inv_rms) * w;
        }
    }
    out
}

/// `Σ v²` in eight interleaved sums, so that the compiler can keep them in a vector register.
fn sum_of_squares(row: &[f32]) -> f32 {
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let mut lanes = [0.0f32; 8];
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `silu(gate) · up` of `[rows, 2 * intermediate]` (each row: gate, then up), as
/// [`llama::silu_mul_halves`].
pub fn silu_mul_halves(gate_up: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
    let [rows, width] = gate_up.dims();
    let half = width / 2;
    let gs = storage(&gate_up);
    match gs.as_slice::<f32>() {
        Some(gs) if width % 2 == 0 => {
            let mut out = Vec::with_capacity(rows * half);
            for row in gs.chunks_exact(width) {
                let (gate, up) = row.split_at(half);
                out.extend(gate.iter().zip(up).map(|(&g, &u)| (g * sigmoid(g)) * u));
            }
            tensor(out, [rows, half], &gate_up)
        }
        _ => llama::silu_mul_halves(gate_up),
    }
}

/// The logistic function as burn Flex computes it (no overflow of `exp` on either side).
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tolerance;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 250.0 - 4.0)
            .collect()
    }

    fn t<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// RoPE over host rows is burn's composition bit for bit: several heads, tokens with their
    /// own tables, a head dim whose halves are not a multiple of 8.
    #[test]
    fn cpu_fused_rope_is_the_burn_composition() {
        for [tokens, heads, d] in [[1, 1, 2], [3, 4, 16], [5, 3, 24], [2, 8, 64]] {
            let x = t(values(tokens * heads * d, 1), [tokens, heads, d]);
            let (cos, sin) = (
                t(values(tokens * d, 2), [tokens, 1, d]),
                t(values(tokens * d, 3), [tokens, 1, d]),
            );
            let want = llama::rotate_half_rope(x.clone(), &cos, &sin).into_data();
            let got = rope(x, cos, sin).into_data();
            assert_eq!(got, want, "tokens {tokens}, heads {heads}, head_dim {d}");
        }
    }

    /// The activation over host rows is burn's `silu(gate) · up` bit for bit, large gates of both
    /// signs included.
    #[test]
    fn cpu_fused_silu_mul_is_the_burn_composition() {
        for [rows, half] in [[1, 1], [3, 11], [4, 64]] {
            let mut v = values(rows * 2 * half, 4);
            v[0] = 95.0;
            v[rows * 2 * half - 1] = -95.0;
            let x = t(v, [rows, 2 * half]);
            let want = llama::silu_mul_halves(x.clone()).into_data();
            assert_eq!(
                silu_mul_halves(x).into_data(),
                want,
                "rows {rows}, intermediate {half}"
            );
        }
    }

    /// RMSNorm and its residual add over host rows agree with burn's composition to f32 rounding
    /// (only the order of the squares' sum differs); the sum itself is exact.
    #[test]
    fn cpu_fused_rms_norm_matches_the_burn_composition() {
        for [rows, width] in [[1, 7], [3, 64], [5, 100]] {
            let (x, delta) = (values(rows * width, 5), values(rows * width, 6));
            let weight = t(values(width, 7), [width]);
            let eps = 1e-5;
            let want = llama::rms_norm(t(x.clone(), [rows, width]), weight.clone(), eps).into_data();
            let got = rms_norm(t(x.clone(), [rows, width]), weight.clone(), eps).into_data();
            got.assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-6));

            let (want_sum, want_norm) = llama::add_rms_norm(
                t(x.clone(), [rows, width]),
                t(delta.clone(), [rows, width]),
                weight.clone(),
                eps,
            );
            let (sum, norm) = add_rms_norm(t(x, [rows, width]), t(delta, [rows, width]), weight, eps);
            assert_eq!(sum.into_data(), want_sum.into_data());
            norm.into_data()
                .assert_approx_eq::<f32>(&want_norm.into_data(), Tolerance::rel_abs(1e-5, 1e-6));
        }
    }

    /// An operand that is not contiguous (a transposed view) takes the burn composition.
    #[test]
    fn cpu_fused_ops_fall_back_on_strided_operands() {
        let x = t(values(64 * 3, 8), [64, 3]).transpose();
        let weight = t(values(64, 9), [64]);
        let want = llama::rms_norm(x.clone(), weight.clone(), 1e-6).into_data();
        assert_eq!(rms_norm(x, weight, 1e-6).into_data(), want);
    }
}
