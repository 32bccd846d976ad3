//! Attention read through block tables: each query token attends to its context's K/V where the
//! pages are, with no gather of the context into a contiguous copy. A query is a decode token or
//! one token of a prompt chunk (its context ends at its own position: causal).
//!
//! Why: burn's path (`Llama::attention`) gathers every context row of K and V into new tensors,
//! pads the group to its longest context and materialises the scores, so each step moves the
//! KV bytes several times. Here a cube owns one (sequence, query head): each tile of up to
//! [`TILE`] positions has one unit per key compute its score from the K row in place (found
//! through the block table), then the units of the head's dimensions accumulate the V rows
//! weighted by an online softmax (flash-decoding's running max and sum), so K and V are read
//! once per query head and nothing but the output is written. Queries of one prompt chunk each
//! read their whole prefix, so a long chunk costs `queries × context` reads (from L2 mostly):
//! the model sends only short chunks here.

use cubecl::prelude::*;

use super::Refused;

/// Keys per tile, and units per cube; a head's dimension must fit in it.
pub const TILE: usize = 128;

/// Sizes of one launch. `q` and `out` are `[queries, heads * head_dim]`, the caches
/// `[slots, kv_heads * head_dim]`, `block_tables` `[seqs, max_blocks]` (u32 page ids),
/// `query_seq` `[queries]` (the table row of each query), and `ctx_begin`/`ctx_end` `[queries]`
/// (u32): query `i` attends to positions `ctx_begin[i] .. ctx_end[i]` of its sequence (a sliding
/// window starts after 0), at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedAttentionShape {
    pub queries: usize,
    pub seqs: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub max_blocks: usize,
    pub slots: usize,
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn paged_attention_kernel<F: Float, N: Size>(
    q: &Array<F>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<F>,
    block_tables: &Array<u32>,
    query_seq: &Array<u32>,
    ctx_begin: &Array<u32>,
    ctx_end: &Array<u32>,
    out: &mut Array<F>,
    max_blocks: u32,
    page_size: u32,
    kv_heads: u32,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    // Query `s` of the launch, query head `h`; the query's sequence is row `table` of the tables.
    let (s, h, u) = (CUBE_POS_Y as usize, CUBE_POS_X as usize, UNIT_POS_X as usize);
    let table = query_seq[s] as usize;
    let heads = CUBE_COUNT_X as usize;
    let kvh = h / (heads / kv_heads as usize);
    let kv_dim = kv_heads as usize * head_dim;
    let (row_vectors, head_vectors) = (kv_dim / width, head_dim / width);
    let page_size = page_size as usize;

    let mut q_scaled = SharedMemory::<f32>::new(head_dim);
    let mut scores = SharedMemory::<f32>::new(TILE);
    let mut slots = SharedMemory::<u32>::new(TILE);
    if u < head_dim {
        q_scaled[u] = f32::cast_from(q[(s * heads + h) * head_dim + u]) * scale;
    }
    sync_cube();

    let (begin, end) = (ctx_begin[s] as usize, ctx_end[s] as usize);
    // -1e30 stands for minus infinity, which WGSL cannot spell; every score is far above it.
    let mut max_so_far = f32::new(-1.0e30);
    let mut sum = 0.0f32;
    let mut acc = 0.0f32;
    let mut tile = begin;
    // `begin` and `end` are the query's, the same for every unit: the barriers below are
    // reached by all of them.
    while tile < end {
        let pos = tile + u;
        let mut score = f32::new(-1.0e30);
        let mut slot = 0u32;
        if pos < end {
            let page = block_tables[table * max_blocks as usize + pos / page_size];
            slot = page * page_size as u32 + (pos % page_size) as u32;
            let row = slot as usize * row_vectors + kvh * head_vectors;
            let mut dot = 0.0f32;
            #[unroll]
            for i in 0..comptime!(head_dim / width) {
                let k = Vector::<f32, N>::cast_from(k_cache[row + i]);
                #[unroll]
                for j in 0..width {
                    dot += k[j] * q_scaled[i * width + j];
                }
            }
            score = dot;
        }
        scores[u] = score;
        slots[u] = slot;
        sync_cube();

        let mut count = end - tile;
        if count > TILE {
            count = TILE;
        }
        let mut tile_max = f32::new(-1.0e30);
        for j in 0..count {
            tile_max = max(tile_max, scores[j]);
        }
        let new_max = max(max_so_far, tile_max);
        let correction = (max_so_far - new_max).exp();
        sync_cube();
        // Each unit turns its own score into a weight once.
        scores[u] = (score - new_max).exp();
        sync_cube();

        let mut tile_sum = 0.0f32;
        let mut tile_acc = 0.0f32;
        for j in 0..count {
            let p = scores[j];
            tile_sum += p;
            if u < head_dim {
                tile_acc += p * f32::cast_from(v_cache[slots[j] as usize * kv_dim + kvh * head_dim + u]);
            }
        }
        sum = sum * correction + tile_sum;
        acc = acc * correction + tile_acc;
        max_so_far = new_max;
        sync_cube();
        tile += TILE;
    }
    if u < head_dim && sum > 0.0 {
        out[(s * heads + h) * head_dim + u] = F::cast_from(acc / sum);
    }
}

/// Queues paged attention on `client`: handles `[q, k_cache, v_cache, block_tables, query_seq,
/// ctx_begin, ctx_end, out]`, laid out as [`PagedAttentionShape`] says, floats of `dtype`
/// (`elem_bytes` each); `scale` multiplies the scores (`head_dim^-0.5`).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    handles: [cubecl::server::Handle; 8],
    shape: PagedAttentionShape,
    scale: f32,
    (dtype, elem_bytes): (StorageType, usize),
) -> Result<(), Refused> {
    let PagedAttentionShape {
        queries,
        seqs,
        heads,
        kv_heads,
        head_dim,
        page_size,
        max_blocks,
        slots,
    } = shape;
    if queries == 0 {
        return Ok(());
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Refused(format!("{heads} query heads over {kv_heads} KV heads")));
    }
    if head_dim == 0 || head_dim > TILE {
        return Err(Refused(format!("head_dim {head_dim} is not in 1..={TILE}")));
    }
    if page_size == 0 || max_blocks == 0 {
        return Err(Refused("no pages".into()));
    }
    if queries.max(heads) > super::MAX_CUBES_PER_DIM as usize {
        return Err(Refused(format!("{queries} queries of {heads} heads in one grid")));
    }
    let too_large = |what: &str| Refused(format!("{what} does not fit in 32 bits"));
    let queries_u32 = u32::try_from(queries).map_err(|_| too_large("queries"))?;
    let heads_u32 = u32::try_from(heads).map_err(|_| too_large("heads"))?;
    u32::try_from(slots * kv_heads * head_dim).map_err(|_| too_large("the cache"))?;
    let max_vector = client.properties().hardware.max_vector_size;
    let width = super::vector_width(head_dim, elem_bytes, max_vector);
    let [q, k, v, tables, query_seq, begin, end, out] = handles;
    let q_len = queries * heads * head_dim;
    let cache_len = slots * kv_heads * head_dim;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract); the kernel indexes
    // below them as long as every page id is below `slots / page_size` and every `ctx_end[s]`
    // is at most `max_blocks * page_size` and every `query_seq[i]` below `seqs`, which the
    // caller's block tables guarantee.
    unsafe {
        paged_attention_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(heads_u32, queries_u32, 1),
            CubeDim::new_1d(TILE as u32),
            width,
            ArrayArg::from_raw_parts(q, q_len),
            ArrayArg::from_raw_parts(k, cache_len / width),
            ArrayArg::from_raw_parts(v, cache_len),
            ArrayArg::from_raw_parts(tables, seqs * max_blocks),
            ArrayArg::from_raw_parts(query_seq, queries),
            ArrayArg::from_raw_parts(begin, queries),
            ArrayArg::from_raw_parts(end, queries),
            ArrayArg::from_raw_parts(out, q_len),
            max_blocks as u32,
            page_size as u32,
            kv_heads as u32,
            scale,
            head_dim,
            width,
            dtype,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl::{self, values};

    /// One query: the table row of its sequence and the positions `begin..end` it attends to.
    struct Query {
        seq: u32,
        begin: u32,
        end: u32,
    }

    /// Softmax attention in f64 of each query over its positions, its K/V rows found through its
    /// sequence's block table.
    fn reference(
        shape: PagedAttentionShape,
        (q, k, v): (&[f32], &[f32], &[f32]),
        tables: &[u32],
        queries: &[Query],
        scale: f32,
    ) -> Vec<f32> {
        let PagedAttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            page_size,
            max_blocks,
            ..
        } = shape;
        let kv_dim = kv_heads * hd;
        let mut out = vec![0.0f32; queries.len() * heads * hd];
        for (i, query) in queries.iter().enumerate() {
            let s = query.seq as usize;
            let slot = |p: usize| tables[s * max_blocks + p / page_size] as usize * page_size + p % page_size;
            let positions = query.begin as usize..query.end as usize;
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qrow = &q[(i * heads + h) * hd..][..hd];
                let scores: Vec<f64> = positions
                    .clone()
                    .map(|p| {
                        let krow = &k[slot(p) * kv_dim + kvh * hd..][..hd];
                        let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let value: f64 = positions
                        .clone()
                        .zip(&weights)
                        .map(|(p, w)| w * v[slot(p) * kv_dim + kvh * hd + d] as f64)
                        .sum();
                    out[(i * heads + h) * hd + d] = (value / total) as f32;
                }
            }
        }
        out
    }

    fn check(shape: PagedAttentionShape, queries: &[Query]) {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let PagedAttentionShape {
            seqs,
            heads,
            kv_heads,
            head_dim,
            page_size,
            max_blocks,
            slots,
            ..
        } = shape;
        assert_eq!(shape.queries, queries.len());
        let pages = slots / page_size;
        // Each sequence's pages scattered over the pool, none shared: page ids walk the pool
        // backwards with a stride, as a long-running pool's free list would hand them out.
        let tables: Vec<u32> = (0..seqs * max_blocks)
            .map(|i| ((pages - 1) - (i * 7) % pages) as u32)
            .collect();
        let q = values(queries.len() * heads * head_dim, 1);
        let k = values(slots * kv_heads * head_dim, 2);
        let v = values(slots * kv_heads * head_dim, 3);
        let column = |f: fn(&Query) -> u32| queries.iter().map(f).collect::<Vec<u32>>();
        let scale = (head_dim as f32).powf(-0.5) * 4.0;
        let out = client.empty(q.len() * 4);
        let up = |x: &[u32]| client.create_from_slice(u32::as_bytes(x));
        let handles = [
            gl::upload(&client, &q),
            gl::upload(&client, &k),
            gl::upload(&client, &v),
            up(&tables),
            up(&column(|q| q.seq)),
            up(&column(|q| q.begin)),
            up(&column(|q| q.end)),
            out.clone(),
        ];
        launch(&client, handles, shape, scale, (f32_type, 4)).unwrap();
        let got = gl::download(&client, out);
        let want = reference(shape, (&q, &k, &v), &tables, queries, scale);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4,
                "{shape:?} output {i} (query {}): kernel {g}, reference {e}",
                i / (heads * head_dim)
            );
        }
    }

    /// A decode: one query at the end of its context.
    fn decode(seq: u32, begin: u32, end: u32) -> Query {
        Query { seq, begin, end }
    }

    #[test]
    fn kernels_paged_attention_matches_softmax_attention() {
        // Decodes: one key; a context inside one page; three tiles (300 > 2 * TILE) ending
        // mid-page; a sliding window that starts mid-page. GQA: 2 query heads per KV head.
        let queries = [
            decode(0, 0, 1),
            decode(1, 0, 11),
            decode(2, 0, 300),
            decode(3, 37, 170),
        ];
        let shape = PagedAttentionShape {
            queries: queries.len(),
            seqs: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            page_size: 16,
            max_blocks: 20,
            slots: 16 * 100,
        };
        check(shape, &queries);
        // Llama-3.2-1B's head_dim (the whole tile), no GQA, odd page size.
        let queries = [decode(0, 0, 129), decode(1, 0, 200)];
        let shape = PagedAttentionShape {
            queries: 2,
            seqs: 2,
            heads: 2,
            kv_heads: 2,
            head_dim: 128,
            page_size: 5,
            max_blocks: 40,
            slots: 5 * 64,
        };
        check(shape, &queries);
    }

    #[test]
    fn kernels_paged_attention_prompt_chunks_are_causal() {
        // A 6-token chunk at positions 130..136 of sequence 1 (each query sees up to itself),
        // between a decode of sequence 0 and the first chunk of sequence 2 (positions 0..5), in
        // the order the model lists them; and a windowed chunk (window 50) of sequence 0.
        let mut queries = vec![decode(0, 0, 40)];
        queries.extend((130..136).map(|p| decode(1, 0, p + 1)));
        queries.extend((0..5).map(|p| decode(2, 0, p + 1)));
        queries.extend((60..64).map(|p| decode(0, p + 1 - 50, p + 1)));
        let shape = PagedAttentionShape {
            queries: queries.len(),
            seqs: 3,
            heads: 4,
            kv_heads: 1,
            head_dim: 32,
            page_size: 16,
            max_blocks: 10,
            slots: 16 * 40,
        };
        check(shape, &queries);
    }

    #[test]
    fn kernels_paged_attention_refuses_shapes_it_cannot_run() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let base = PagedAttentionShape {
            queries: 1,
            seqs: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            page_size: 16,
            max_blocks: 1,
            slots: 16,
        };
        for shape in [
            PagedAttentionShape { kv_heads: 3, ..base },
            PagedAttentionShape {
                head_dim: TILE + 1,
                ..base
            },
            PagedAttentionShape { page_size: 0, ..base },
        ] {
            let handles = std::array::from_fn(|_| client.empty(4));
            assert!(
                launch(&client, handles, shape, 1.0, (f32_type, 4)).is_err(),
                "{shape:?}"
            );
        }
    }
}
