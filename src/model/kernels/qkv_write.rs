//! The step's queries through RoPE and its new K and V rows stored into the paged cache, in one
//! launch: `q_out = rope(q)`, `k_cache[slot] = rope(k)`, `v_cache[slot] = v`, the caches in place.
//! q, k and v are read through a row stride, so they may be the column views of one merged
//! q/k/v projection.
//!
//! Why: without it a layer runs three projections, the RoPE of q and of k (two launches, and a
//! tensor only the cache reads) and one `scatter_nd` each for K and V. Decode at small batches is
//! bound by the host's time per launch: with the merged projection, seven launches become two.
//! The RoPE is the same arithmetic as `kernels::rope` (rotate-half, in the model's type). It
//! reads the model's whole `cos` and `sin` tables at each row's position, so that the step needs no
//! launch to gather its rows of them first.

use cubecl::prelude::*;

use super::Refused;

const UNITS: u32 = 256;

/// One unit per element of a row's q, k and v (`q_dim + 2 * kv_dim` per token).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn qkv_write_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    positions: &Array<u32>,
    slots: &Array<u32>,
    q_out: &mut Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    q_stride: u32,
    k_stride: u32,
    v_stride: u32,
    q_dim: u32,
    kv_dim: u32,
    len: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let idx = ABSOLUTE_POS;
    if idx < len as usize {
        let (q_dim, kv_dim) = (q_dim as usize, kv_dim as usize);
        let half = comptime!(head_dim / 2);
        let token = idx / (q_dim + 2 * kv_dim);
        let e = idx % (q_dim + 2 * kv_dim);
        if e < q_dim + kv_dim {
            // q or k: rotate-half within the element's head.
            let is_q = e < q_dim;
            let col = if is_q { e } else { e - q_dim };
            let i = col % head_dim;
            let at = positions[token] as usize * head_dim + i;
            let (c, s) = (cos[at], sin[at]);
            if is_q {
                let src = token * q_stride as usize + col;
                let rotated = if i < half { -q[src + half] } else { q[src - half] };
                q_out[token * q_dim + col] = q[src] * c + rotated * s;
            } else {
                let src = token * k_stride as usize + col;
                let rotated = if i < half { -k[src + half] } else { k[src - half] };
                let dst = slots[token] as usize * kv_dim + col;
                k_cache[dst] = k[src] * c + rotated * s;
            }
        } else {
            let col = e - q_dim - kv_dim;
            let src = token * v_stride as usize + col;
            let dst = slots[token] as usize * kv_dim + col;
            v_cache[dst] = v[src];
        }
    }
}

/// The problem's sizes: `tokens` rows of `heads` query heads and `kv_heads` K and V heads of
/// `head_dim`, into caches of `cache_slots` rows, with RoPE tables of `positions` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvWriteShape {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cache_slots: usize,
    pub positions: usize,
}

/// Row strides, in elements, of the `q`, `k` and `v` inputs (their widths when each is a tensor of
/// its own; the merged row's width when they are views of one projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvStrides {
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

/// Queues the launch. The handles hold, of `dtype`: `q` (`[tokens, heads * head_dim]`), `k` and
/// `v` before RoPE (`[tokens, kv_heads * head_dim]`), each row `strides` apart and its elements
/// contiguous (the handles may be views of one buffer at different offsets); the model's `cos` and
/// `sin` tables (`[positions, head_dim]`, contiguous); each row's position (`[tokens]`, 32-bit,
/// each below `positions`) and slot (`[tokens]`, 32-bit, each below `cache_slots`); `q_out`
/// (`[tokens, heads * head_dim]`, contiguous); and the two caches (`[cache_slots, kv_heads *
/// head_dim]`, contiguous), written in place.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [q, k, v, cos, sin, positions, slots, q_out, k_cache, v_cache]: [cubecl::server::Handle; 10],
    shape: QkvWriteShape,
    strides: QkvStrides,
    dtype: StorageType,
) -> Result<(), Refused> {
    let QkvWriteShape {
        tokens,
        heads,
        kv_heads,
        head_dim,
        cache_slots,
        positions: table_rows,
    } = shape;
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    let len = tokens * (q_dim + 2 * kv_dim);
    if len == 0 {
        return Ok(());
    }
    if head_dim % 2 != 0 {
        return Err(Refused(format!("RoPE over an odd head_dim {head_dim}")));
    }
    if strides.q < q_dim || strides.k < kv_dim || strides.v < kv_dim {
        return Err(Refused(format!("row strides {strides:?} below the rows' widths")));
    }
    let too_large = |what: &str| Refused(format!("{what} does not fit in 32 bits"));
    let len_u32 = u32::try_from(len).map_err(|_| too_large("the rows"))?;
    u32::try_from(cache_slots * kv_dim).map_err(|_| too_large("the cache"))?;
    u32::try_from(table_rows * head_dim).map_err(|_| too_large("the RoPE tables"))?;
    let stride_u32 = |s: usize| {
        u32::try_from(s * tokens)
            .map(|_| s as u32)
            .map_err(|_| too_large("a stride"))
    };
    let (q_stride, k_stride, v_stride) = (
        stride_u32(strides.q)?,
        stride_u32(strides.k)?,
        stride_u32(strides.v)?,
    );
    // Elements each input spans from its first: the last row ends at its width.
    let span = |stride: usize, width: usize| (tokens - 1) * stride + width;
    let cubes = super::elementwise_cubes(len, UNITS)?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract). The kernel checks
    // `idx < len`, reads `q`/`k`/`v` within the token's row and the element's head, `cos`/`sin`
    // within the token's position's row (below `positions`, the caller's contract), and writes `q_out`'s row `token` and the caches' row
    // `slots[token]`, below `cache_slots` by the caller's contract.
    unsafe {
        queue_kernel!(
            qkv_write_kernel::QkvWriteKernel<R>(
                client,
                cubes,
                CubeDim::new_1d(UNITS),
            ),
            define [F = dtype],
            args [
                Array<F> = ArrayArg::from_raw_parts(q, span(strides.q, q_dim)),
                Array<F> = ArrayArg::from_raw_parts(k, span(strides.k, kv_dim)),
                Array<F> = ArrayArg::from_raw_parts(v, span(strides.v, kv_dim)),
                Array<F> = ArrayArg::from_raw_parts(cos, table_rows * head_dim),
                Array<F> = ArrayArg::from_raw_parts(sin, table_rows * head_dim),
                Array<u32> = ArrayArg::from_raw_parts(positions, tokens),
                Array<u32> = ArrayArg::from_raw_parts(slots, tokens),
                Array<F> = ArrayArg::from_raw_parts(q_out, tokens * q_dim),
                Array<F> = ArrayArg::from_raw_parts(k_cache, cache_slots * kv_dim),
                Array<F> = ArrayArg::from_raw_parts(v_cache, cache_slots * kv_dim),
                u32 = q_stride,
                u32 = k_stride,
                u32 = v_stride,
                u32 = q_dim as u32,
                u32 = kv_dim as u32,
                u32 = len_u32,
            ],
            comptime [head_dim, dtype],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl::{self, values};

    /// `rope(x)` of one head's row, rotate-half, as transformers' `apply_rotary_pos_emb`.
    fn rope_row(x: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let half = x.len() / 2;
        (0..x.len())
            .map(|i| {
                let rotated = if i < half { -x[i + half] } else { x[i - half] };
                x[i] * cos[i] + rotated * sin[i]
            })
            .collect()
    }

    /// Runs the kernel on `tokens` rows of one merged `[q | k | v]` buffer (`merged`), or of
    /// three buffers of their own, and checks q_out and both caches against an f32 reference.
    fn check(heads: usize, kv_heads: usize, head_dim: usize, slots: &[u32], merged: bool) {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let (tokens, cache_slots, table_rows) = (slots.len(), 16, 12);
        // Rows at positions out of order: each must read its own row of the tables.
        let positions: Vec<u32> = (0..tokens as u32)
            .map(|t| (7 * t + 3) % table_rows as u32)
            .collect();
        let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
        let width = q_dim + 2 * kv_dim;
        let rows = values(tokens * width, 1);
        let part = |t: usize, from: usize, n: usize| rows[t * width + from..t * width + from + n].to_vec();
        let angle = |t: usize, i: usize| (t as f32 + 1.0) * 0.37 * (i % (head_dim / 2) + 1) as f32;
        let trig = |f: fn(f32) -> f32| -> Vec<f32> {
            (0..table_rows * head_dim)
                .map(|j| f(angle(j / head_dim, j % head_dim)))
                .collect()
        };
        let (cos, sin) = (trig(f32::cos), trig(f32::sin));
        // Rows the step does not write must keep what they held.
        let (k_before, v_before) = (values(cache_slots * kv_dim, 3), values(cache_slots * kv_dim, 4));
        let (k_cache, v_cache) = (gl::upload(&client, &k_before), gl::upload(&client, &v_before));
        let q_out = gl::upload(&client, &vec![0.0; tokens * q_dim]);
        let (inputs, strides) = if merged {
            // Views of one buffer: k and v start at their column's byte offset.
            let all = gl::upload(&client, &rows);
            let at = |col: usize| all.clone().offset_start((col * 4) as u64);
            let views = [all.clone(), at(q_dim), at(q_dim + kv_dim)];
            let strides = QkvStrides {
                q: width,
                k: width,
                v: width,
            };
            (views, strides)
        } else {
            let gather =
                |from: usize, n: usize| (0..tokens).flat_map(|t| part(t, from, n)).collect::<Vec<_>>();
            let bufs = [
                gl::upload(&client, &gather(0, q_dim)),
                gl::upload(&client, &gather(q_dim, kv_dim)),
                gl::upload(&client, &gather(q_dim + kv_dim, kv_dim)),
            ];
            let strides = QkvStrides {
                q: q_dim,
                k: kv_dim,
                v: kv_dim,
            };
            (bufs, strides)
        };
        let [q, k, v] = inputs;
        let handles = [
            q,
            k,
            v,
            gl::upload(&client, &cos),
            gl::upload(&client, &sin),
            client.create_from_slice(u32::as_bytes(&positions)),
            client.create_from_slice(u32::as_bytes(slots)),
            q_out.clone(),
            k_cache.clone(),
            v_cache.clone(),
        ];
        let shape = QkvWriteShape {
            tokens,
            heads,
            kv_heads,
            head_dim,
            cache_slots,
            positions: table_rows,
        };
        launch(&client, handles, shape, strides, f32_type).unwrap();
        let q_got = gl::download(&client, q_out);
        let (k_got, v_got) = (gl::download(&client, k_cache), gl::download(&client, v_cache));
        let (mut q_want, mut k_want, mut v_want) = (Vec::new(), k_before, v_before);
        for (t, &slot) in slots.iter().enumerate() {
            let p = positions[t] as usize;
            let (c, s) = (
                &cos[p * head_dim..(p + 1) * head_dim],
                &sin[p * head_dim..(p + 1) * head_dim],
            );
            for h in 0..heads {
                q_want.extend(rope_row(&part(t, h * head_dim, head_dim), c, s));
            }
            for h in 0..kv_heads {
                let dst = slot as usize * kv_dim + h * head_dim;
                let k_row = rope_row(&part(t, q_dim + h * head_dim, head_dim), c, s);
                k_want[dst..dst + head_dim].copy_from_slice(&k_row);
                let v_row = part(t, q_dim + kv_dim + h * head_dim, head_dim);
                v_want[dst..dst + head_dim].copy_from_slice(&v_row);
            }
        }
        let name = format!("{heads}/{kv_heads}x{head_dim} into {slots:?}, merged {merged}");
        for (what, got, want) in [("q_out", &q_got, &q_want), ("k_cache", &k_got, &k_want)] {
            for (j, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() <= 1e-6, "{name}: {what}[{j}] {g} vs {w}");
            }
        }
        assert_eq!(v_got, v_want, "{name}: v_cache");
    }

    #[test]
    fn kernels_qkv_write_ropes_q_and_stores_rope_of_k_and_v_in_their_slots() {
        // One decode; a chunk of 3 tokens with GQA's 2 KV heads of 64; 5 tokens of head_dim 128
        // into scattered slots. Widths are multiples of 64 floats, so that the views of the
        // merged rows start where wgpu allows a binding to.
        for (heads, kv_heads, head_dim, slots) in [
            (1, 1, 64, vec![6u32]),
            (4, 2, 64, vec![0, 1, 2]),
            (2, 1, 128, vec![9, 3, 14, 4, 10]),
        ] {
            check(heads, kv_heads, head_dim, &slots, true);
        }
        // Apart (models that normalise q and k per head first): any widths.
        check(1, 1, 8, &[6], false);
        check(3, 1, 16, &[2, 7], false);
    }

    #[test]
    fn kernels_qkv_write_refuses_an_odd_head_dim_and_short_strides() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let handles = || std::array::from_fn(|_| gl::upload(&client, &[0.0; 64]));
        let shape = |head_dim| QkvWriteShape {
            tokens: 1,
            heads: 1,
            kv_heads: 1,
            head_dim,
            cache_slots: 2,
            positions: 1,
        };
        let strides = |q| QkvStrides { q, k: 4, v: 4 };
        assert!(launch(&client, handles(), shape(3), strides(3), f32_type).is_err());
        assert!(launch(&client, handles(), shape(4), strides(3), f32_type).is_err());
        assert!(launch(&client, handles(), shape(4), strides(4), f32_type).is_ok());
    }
}
