//! The step's new K and V rows stored into the paged cache in one launch, with the RoPE of K
//! done on the way: `k_cache[slot] = rope(k)`, `v_cache[slot] = v`, in place.
//!
//! Why: without it a layer runs the RoPE of k (one launch, and a tensor only the cache reads) and
//! one `scatter_nd` each for K and V. Decode at small batches is bound by the host's time per
//! launch, so three launches per layer become one. The RoPE is the same arithmetic as
//! `kernels::rope` (rotate-half, in the model's type).

use cubecl::prelude::*;

use super::Refused;

const UNITS: u32 = 256;

#[cube(launch_unchecked)]
fn kv_write_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    slots: &Array<u32>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    kv_dim: u32,
    rows_len: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let idx = ABSOLUTE_POS;
    if idx < rows_len as usize {
        let width = kv_dim as usize;
        let half = comptime!(head_dim / 2);
        let token = idx / width;
        let e = idx % width;
        let i = e % head_dim;
        let rotated = if i < half { -k[idx + half] } else { k[idx - half] };
        let at = token * head_dim + i;
        let dst = slots[token] as usize * width + e;
        k_cache[dst] = k[idx] * cos[at] + rotated * sin[at];
        v_cache[dst] = v[idx];
    }
}

/// The problem's sizes: `tokens` new rows of `kv_heads * head_dim` each, into caches of
/// `cache_slots` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvWriteShape {
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cache_slots: usize,
}

/// Queues the write. The handles hold, contiguous and of `dtype`: `k` before RoPE and `v`
/// (`[tokens, kv_heads * head_dim]`), the step's `cos` and `sin` rows (`[tokens, head_dim]`),
/// the slots (`[tokens]`, 32-bit, each below `cache_slots`), and the two caches
/// (`[cache_slots, kv_heads * head_dim]`), written in place.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [k, v, cos, sin, slots, k_cache, v_cache]: [cubecl::server::Handle; 7],
    shape: KvWriteShape,
    dtype: StorageType,
) -> Result<(), Refused> {
    let KvWriteShape {
        tokens,
        kv_heads,
        head_dim,
        cache_slots,
    } = shape;
    let kv_dim = kv_heads * head_dim;
    let rows_len = tokens * kv_dim;
    if rows_len == 0 {
        return Ok(());
    }
    if head_dim % 2 != 0 {
        return Err(Refused(format!("RoPE over an odd head_dim {head_dim}")));
    }
    let too_large = |what: &str| Refused(format!("{what} does not fit in 32 bits"));
    let rows_u32 = u32::try_from(rows_len).map_err(|_| too_large("the rows"))?;
    u32::try_from(cache_slots * kv_dim).map_err(|_| too_large("the cache"))?;
    let cubes = super::elementwise_cubes(rows_len, UNITS)?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract). The kernel checks
    // `idx < rows_len`, reads `k` within the same head and `cos`/`sin` within the token's row,
    // and writes row `slots[token]`, below `cache_slots` by the caller's contract.
    unsafe {
        kv_write_kernel::launch_unchecked::<R>(
            client,
            cubes,
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(k, rows_len),
            ArrayArg::from_raw_parts(v, rows_len),
            ArrayArg::from_raw_parts(cos, tokens * head_dim),
            ArrayArg::from_raw_parts(sin, tokens * head_dim),
            ArrayArg::from_raw_parts(slots, tokens),
            ArrayArg::from_raw_parts(k_cache, cache_slots * kv_dim),
            ArrayArg::from_raw_parts(v_cache, cache_slots * kv_dim),
            kv_dim as u32,
            rows_u32,
            head_dim,
            dtype,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl::{self, values};

    #[test]
    fn kernels_kv_write_stores_rope_of_k_and_v_in_their_slots() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        // One decode; a chunk of 3 tokens with GQA's 2 KV heads of 64; 5 tokens of head_dim 128
        // into scattered slots.
        for (kv_heads, head_dim, slots) in [
            (1, 8, vec![6u32]),
            (2, 64, vec![0, 1, 2]),
            (1, 128, vec![9, 3, 14, 4, 10]),
        ] {
            let (tokens, kv_dim, cache_slots) = (slots.len(), kv_heads * head_dim, 16);
            let (k, v) = (values(tokens * kv_dim, 1), values(tokens * kv_dim, 2));
            let angle = |t: usize, i: usize| (t as f32 + 1.0) * 0.37 * (i % (head_dim / 2) + 1) as f32;
            let trig = |f: fn(f32) -> f32| -> Vec<f32> {
                (0..tokens * head_dim)
                    .map(|j| f(angle(j / head_dim, j % head_dim)))
                    .collect()
            };
            let (cos, sin) = (trig(f32::cos), trig(f32::sin));
            // Rows the step does not write must keep what they held.
            let (k_before, v_before) = (values(cache_slots * kv_dim, 3), values(cache_slots * kv_dim, 4));
            let (k_cache, v_cache) = (gl::upload(&client, &k_before), gl::upload(&client, &v_before));
            let handles = [
                gl::upload(&client, &k),
                gl::upload(&client, &v),
                gl::upload(&client, &cos),
                gl::upload(&client, &sin),
                client.create_from_slice(u32::as_bytes(&slots)),
                k_cache.clone(),
                v_cache.clone(),
            ];
            let shape = KvWriteShape {
                tokens,
                kv_heads,
                head_dim,
                cache_slots,
            };
            launch(&client, handles, shape, f32_type).unwrap();
            let (k_got, v_got) = (gl::download(&client, k_cache), gl::download(&client, v_cache));
            let (mut k_want, mut v_want) = (k_before, v_before);
            for (t, &slot) in slots.iter().enumerate() {
                for e in 0..kv_dim {
                    let (idx, i, half) = (t * kv_dim + e, e % head_dim, head_dim / 2);
                    let rotated = if i < half { -k[idx + half] } else { k[idx - half] };
                    let at = t * head_dim + i;
                    k_want[slot as usize * kv_dim + e] = k[idx] * cos[at] + rotated * sin[at];
                    v_want[slot as usize * kv_dim + e] = v[idx];
                }
            }
            let name = format!("{kv_heads}x{head_dim} into {slots:?}");
            for (j, (g, w)) in k_got.iter().zip(&k_want).enumerate() {
                assert!((g - w).abs() <= 1e-6, "{name}: k_cache[{j}] {g} vs {w}");
            }
            assert_eq!(v_got, v_want, "{name}: v_cache");
        }
    }

    #[test]
    fn kernels_kv_write_refuses_an_odd_head_dim() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let handle = || gl::upload(&client, &[0.0; 16]);
        let shape = KvWriteShape {
            tokens: 1,
            kv_heads: 1,
            head_dim: 3,
            cache_slots: 2,
        };
        let handles = [
            handle(),
            handle(),
            handle(),
            handle(),
            handle(),
            handle(),
            handle(),
        ];
        assert!(launch(&client, handles, shape, f32_type).is_err());
    }
}
