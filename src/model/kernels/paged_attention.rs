//! Attention read through block tables: each query token attends to its context's K/V where the
//! pages are, with no gather of the context into a contiguous copy. A query is a decode token or
//! one token of a prompt chunk (its context ends at its own position: causal).
//!
//! Why: burn's path (`Llama::attention`) gathers every context row of K and V into new tensors,
//! pads the group to its longest context and materialises the scores, so each step moves the
//! KV bytes several times. Here K and V are read in place, through the block table, and nothing
//! but the output is written.
//!
//! Layout: a cube of [`TILE`] units owns one (query, KV head) and the query heads of that KV
//! head's GQA group (Llama-3.2-1B: 4 of its 32 heads over each of 8 KV heads; a group above
//! [`MAX_GROUP`] is split over cubes of its largest divisor up to that, so registers stay
//! bounded). Grid `(heads / heads_per_cube, queries)`. Per tile of up to `TILE` positions:
//! - each unit takes one key, finds its slot through the block table, reads its K row once (in
//!   vectors) and computes one score per head of the group against the group's scaled queries,
//!   loaded into shared memory once per cube in vectors of the same width (one shared read per
//!   K vector and head);
//! - each head's tile maximum comes from a plane maximum per warp and one barrier (CUDA), or a
//!   halving over shared memory (GL, which has no plane operations). Every unit keeps the
//!   running max of each head in registers (all compute the same), applies flash-decoding's
//!   online-softmax correction and turns its key's scores into weights;
//! - the V pass: the units form `TILE / (head_dim / width)` parts of `head_dim / width` units;
//!   unit `(part, c)` reads vector `c` of the V rows of keys `part, part + parts, ...` and
//!   accumulates it, weighted, into one vector register per head of the group (with the
//!   weights' sum). A part's keys are a constant number of independent reads (8 for
//!   Llama-3.2-1B's `head_dim` 64 in bf16), so they can all be in flight at once. A decode of
//!   one sequence has only one cube per KV head, so its time is this chain's latency: with one
//!   element per unit, each unit read 64 keys in a loop (41 µs per launch at context 192 in the
//!   fourth run's profile, for 0.4 MB of K/V). At the end the parts meet in shared memory, one head at a time, and the
//!   group's `group × head_dim` outputs, contiguous in `out`, are written side by side.
//!
//! So each K and V row is read once per (query, KV head) instead of once per query head, and a V
//! row's read serves the whole group. Queries of one prompt chunk each read their whole prefix,
//! so a long chunk costs `queries × context` reads (from L2 mostly): the model sends only short
//! chunks here.

use cubecl::prelude::*;

use super::Refused;

/// Keys per tile, and units per cube; a head's dimension must fit in it.
pub const TILE: usize = 128;

/// Query heads one cube serves at most: each unit keeps a score, a weight sum and an output
/// accumulator per head in registers. A larger group is split over several cubes per KV head.
pub const MAX_GROUP: usize = 8;

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

/// The query heads one cube serves: the largest divisor of the GQA group up to [`MAX_GROUP`].
fn heads_per_cube(group: usize) -> usize {
    (1..=group.min(MAX_GROUP))
        .rev()
        .find(|g| group.is_multiple_of(*g))
        .unwrap_or(1)
}

/// Units of a V vector and the parts of a tile's keys the V pass splits over: unit `(part, c)`
/// reads vector `c` of a head's V row for keys `part, part + parts, ...` of a tile.
fn v_parts(head_dim: usize, width: usize) -> usize {
    TILE / (head_dim / width)
}

/// Planes of a cube the plane path's tile maximum has room for (planes of 4 lanes or more).
const MAX_PLANES: usize = TILE / 4;

/// Bytes of shared memory a cube of `group` heads of `head_dim`, in vectors of `width`, uses.
fn shared_bytes(group: usize, head_dim: usize, width: usize) -> usize {
    let parts = v_parts(head_dim, width);
    4 * (group * head_dim + group * TILE + TILE + group * MAX_PLANES + parts * group + TILE * width)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn paged_attention_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    query_seq: &Array<u32>,
    ctx_begin: &Array<u32>,
    ctx_end: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    partition_out: &mut Array<Vector<f32, N>>,
    partition_stats: &mut Array<f32>,
    max_blocks: u32,
    page_size: u32,
    kv_heads: u32,
    scale: f32,
    partition_len: u32,
    #[comptime] head_dim: usize,
    #[comptime] width: usize,
    #[comptime] group: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] split: bool,
    #[define(F)] _dtype: StorageType,
) {
    // Query `s` of the launch, query heads `h0 .. h0 + group` (all of one KV head `kvh`); the
    // query's sequence is row `table` of the tables.
    let (s, u) = (CUBE_POS_Y as usize, UNIT_POS_X as usize);
    let table = query_seq[s] as usize;
    let heads = CUBE_COUNT_X as usize * group;
    let h0 = CUBE_POS_X as usize * group;
    let kvh = h0 / (heads / kv_heads as usize);
    let kv_dim = kv_heads as usize * head_dim;
    let (row_vectors, head_vectors) = (kv_dim / width, comptime!(head_dim / width));
    let page_size = page_size as usize;
    // The V pass: `parts` sets of `head_vectors` units, unit `u` the vector `c` of every head of
    // the group over keys `part, part + parts, ...` of a tile; the parts add up at the end.
    let parts = comptime!(TILE / (head_dim / width));
    let (part, c) = (u / head_vectors, u % head_vectors);
    let outputs = comptime!(group * head_dim);

    // The group's queries in vectors of the K rows' width: one shared read per K vector and head.
    let q_vectors = comptime!(outputs / width);
    let mut q_scaled = SharedMemory::<Vector<f32, N>>::new(q_vectors);
    // Per head of the group, a tile's scores (the tree path reduces them in place) then weights.
    let mut scores = SharedMemory::<f32>::new(group * TILE);
    let mut slots = SharedMemory::<u32>::new(TILE);
    let mut plane_max_of = SharedMemory::<f32>::new(group * MAX_PLANES);
    let mut part_sums = SharedMemory::<f32>::new(parts * group);
    // The group's query rows are contiguous in `q`, as their outputs are in `out`.
    let base = (s * heads + h0) * head_dim;
    #[unroll]
    for i in 0..comptime!(q_vectors.div_ceil(TILE)) {
        let o = i * TILE + u;
        if o < q_vectors {
            q_scaled[o] = Vector::<f32, N>::cast_from(q[base / width + o]) * Vector::new(scale);
        }
    }
    sync_cube();

    let mut dots = Array::<f32>::new(group);
    let mut partial = Array::<Vector<f32, N>>::new(group);
    // Every unit keeps the running maximum of each head: all compute the same from the same
    // tile maxima, so no barrier is spent sharing it. -1e30 stands for minus infinity, which
    // WGSL cannot spell; every score is far above it.
    let mut running_max = Array::<f32>::new(group);
    let mut tile_max = Array::<f32>::new(group);
    let mut acc = Array::<Vector<f32, N>>::new(group);
    let mut sum = Array::<f32>::new(group);
    #[unroll]
    for g in 0..group {
        running_max[g] = f32::new(-1.0e30);
        acc[g] = Vector::new(0.0);
        sum[g] = 0.0;
    }
    // Split: partition `CUBE_POS_Z` of the context, `partition_len` keys; past the context's end
    // the range is empty and the partition's weight 0.
    let mut begin = ctx_begin[s] as usize;
    let mut end = ctx_end[s] as usize;
    if comptime!(split) {
        begin += CUBE_POS_Z as usize * partition_len as usize;
        end = min(end, begin + partition_len as usize);
    }
    let mut tile = begin;
    // `begin` and `end` are the query's, the same for every unit: the barriers below are
    // reached by all of them.
    while tile < end {
        // Unit `u` scores key `tile + u` for every head of the group from one read of its K row.
        let pos = tile + u;
        let mut slot = 0u32;
        #[unroll]
        for g in 0..group {
            dots[g] = f32::new(-1.0e30);
        }
        if pos < end {
            let page = block_tables[table * max_blocks as usize + pos / page_size];
            slot = page * page_size as u32 + (pos % page_size) as u32;
            let row = slot as usize * row_vectors + kvh * head_vectors;
            #[unroll]
            for g in 0..group {
                partial[g] = Vector::new(0.0);
            }
            // Not unrolled: llvmpipe takes tens of seconds to compile `head_dim × group` FMAs in
            // a row; the bound is a constant, so CUDA's compiler may unroll it.
            for i in 0..head_vectors {
                let k = Vector::<f32, N>::cast_from(k_cache[row + i]);
                #[unroll]
                for g in 0..group {
                    partial[g] += k * q_scaled[g * head_vectors + i];
                }
            }
            #[unroll]
            for g in 0..group {
                let v = partial[g];
                let mut dot = 0.0f32;
                #[unroll]
                for j in 0..width {
                    dot += v[j];
                }
                dots[g] = dot;
            }
        }
        slots[u] = slot;

        // Each head's tile maximum, into every unit's registers.
        if comptime!(plane_reduce) {
            // A plane maximum per warp, then the warps' maxima (one barrier).
            let planes = CUBE_DIM_X as usize / PLANE_DIM as usize;
            #[unroll]
            for g in 0..group {
                let m = plane_max(dots[g]);
                if UNIT_POS_PLANE == 0 {
                    plane_max_of[PLANE_POS as usize * group + g] = m;
                }
            }
            sync_cube();
            #[unroll]
            for g in 0..group {
                let mut m = plane_max_of[g];
                for w in 1..planes {
                    m = max(m, plane_max_of[w * group + g]);
                }
                tile_max[g] = m;
            }
        } else {
            // Halving over shared memory; the cube is `TILE` units wide.
            #[unroll]
            for g in 0..group {
                scores[g * TILE + u] = dots[g];
            }
            sync_cube();
            let mut stride = CUBE_DIM_X as usize / 2;
            while stride > 0 {
                if u < stride {
                    #[unroll]
                    for g in 0..group {
                        let i = g * TILE + u;
                        scores[i] = max(scores[i], scores[i + stride]);
                    }
                }
                sync_cube();
                stride /= 2;
            }
            #[unroll]
            for g in 0..group {
                tile_max[g] = scores[g * TILE];
            }
            // Everyone has read the maxima before the weights overwrite them.
            sync_cube();
        }
        // The running max and the correction of what was accumulated (flash-decoding's online
        // softmax); each unit turns its key's scores into weights once (0 past the context's
        // end).
        let mut correction = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            let new_max = max(running_max[g], tile_max[g]);
            correction[g] = (running_max[g] - new_max).exp();
            running_max[g] = new_max;
            scores[g * TILE + u] = (dots[g] - new_max).exp();
        }
        sync_cube();

        let mut count = end - tile;
        if count > TILE {
            count = TILE;
        }
        if u < parts * head_vectors {
            #[unroll]
            for g in 0..group {
                let c = correction[g];
                acc[g] *= Vector::new(c);
                sum[g] *= c;
            }
            // One read of each V vector serves every head of the group; a part's keys are a
            // fixed number of independent reads, so they can all be in flight at once.
            for i in 0..comptime!(TILE.div_ceil(TILE / (head_dim / width))) {
                let j = part + i * parts;
                if j < count {
                    let v = Vector::<f32, N>::cast_from(
                        v_cache[slots[j] as usize * row_vectors + kvh * head_vectors + c],
                    );
                    #[unroll]
                    for g in 0..group {
                        let p = scores[g * TILE + j];
                        sum[g] += p;
                        acc[g] += v * Vector::new(p);
                    }
                }
            }
        }
        sync_cube();
        tile += TILE;
    }

    // The parts' sums meet in shared memory, one head at a time; each output vector is written
    // by one unit, side by side.
    let mut part_acc = SharedMemory::<Vector<f32, N>>::new(TILE);
    if u < parts * head_vectors && c == 0 {
        #[unroll]
        for g in 0..group {
            part_sums[part * group + g] = sum[g];
        }
    }
    #[unroll]
    for g in 0..group {
        if u < parts * head_vectors {
            part_acc[u] = acc[g];
        }
        sync_cube();
        if u < head_vectors {
            let mut total = Vector::<f32, N>::new(0.0);
            let mut weight = 0.0f32;
            for p in 0..parts {
                total += part_acc[p * head_vectors + u];
                weight += part_sums[p * group + g];
            }
            if comptime!(split) {
                // Unnormalised, with the running max it is relative to and the weights' sum:
                // `combine_partitions_kernel` weighs the partitions against each other.
                let row = (s * heads + h0 + g) * CUBE_COUNT_Z as usize + CUBE_POS_Z as usize;
                partition_out[row * head_vectors + u] = total;
                if u == 0 {
                    partition_stats[2 * row] = running_max[g];
                    partition_stats[2 * row + 1] = weight;
                }
            } else if weight > 0.0 {
                out[(base + g * head_dim) / width + u] =
                    Vector::<F, N>::cast_from(total / Vector::new(weight));
            }
        }
        sync_cube();
    }
}

/// The partitions of a split context, each relative to its own running max, put together: unit
/// `d` of cube `(head, query)` rescales each partition's output element and weight sum to the
/// largest of the maxima and divides. An empty partition has weight 0 and a max far below.
#[cube(launch_unchecked)]
fn combine_partitions_kernel<F: Float>(
    partition_out: &Array<f32>,
    partition_stats: &Array<f32>,
    out: &mut Array<F>,
    partitions: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let d = UNIT_POS_X as usize;
    let partitions = partitions as usize;
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    if d < head_dim {
        let first = row * partitions;
        // Mutable variables start from runtime values: a literal would make them constants.
        let mut max_all = partition_stats[2 * first];
        for p in 1..partitions {
            max_all = max(max_all, partition_stats[2 * (first + p)]);
        }
        let mut total = 0.0f32;
        let mut weight = 0.0f32;
        for p in 0..partitions {
            let scaled = (partition_stats[2 * (first + p)] - max_all).exp();
            weight += partition_stats[2 * (first + p) + 1] * scaled;
            total += partition_out[(first + p) * head_dim + d] * scaled;
        }
        if weight > 0.0 {
            out[row * head_dim + d] = F::cast_from(total / weight);
        }
    }
}

/// Keys a partition of a split context holds at least: each extra partition costs its cube's
/// setup and the combine reads its outputs, and splitting needs a second launch, so contexts
/// up to this length are never split.
pub const SPLIT_MIN_KEYS: usize = 4 * TILE;

/// Flash-decoding's split-K: the keys per partition, when a launch of `cubes` cubes (queries ×
/// KV-head groups) over contexts of at most `max_context` keys leaves SMs idle (`sms` of them,
/// unknown on GL) and its contexts are long enough to share; `None` runs one cube per context.
/// Partitions fill about one wave of cubes, at least [`SPLIT_MIN_KEYS`] keys each, in whole
/// tiles. A decode of one sequence at context 4,096 (Llama-3.2-1B on an H100: 8 cubes, 132
/// SMs) becomes 8 partitions of 512 keys instead of 8 cubes walking 32 tiles each.
pub fn partition_len(cubes: usize, max_context: usize, sms: Option<u32>) -> Option<usize> {
    let sms = sms? as usize;
    if cubes == 0 || cubes * 2 > sms || max_context <= SPLIT_MIN_KEYS {
        return None;
    }
    let partitions = (sms / cubes).min(max_context.div_ceil(SPLIT_MIN_KEYS));
    (partitions >= 2).then(|| max_context.div_ceil(partitions).div_ceil(TILE) * TILE)
}

/// Queues paged attention on `client`: handles `[q, k_cache, v_cache, block_tables, query_seq,
/// ctx_begin, ctx_end, out]`, laid out as [`PagedAttentionShape`] says, floats of `dtype`
/// (`elem_bytes` each); `scale` multiplies the scores (`head_dim^-0.5`). `plane_reduce` takes
/// each tile's maxima with plane operations (CUDA) instead of a halving through shared memory.
/// With `partition_len`, each context is split in partitions of that many keys (a multiple of
/// [`TILE`]), attended by cubes of their own and put together by a second launch (see
/// [`auto_partition_len`]).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    handles: [cubecl::server::Handle; 8],
    shape: PagedAttentionShape,
    scale: f32,
    (dtype, elem_bytes): (StorageType, usize),
    plane_reduce: bool,
    partition_len: Option<usize>,
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
    u32::try_from(slots * kv_heads * head_dim).map_err(|_| too_large("the cache"))?;
    let group = heads_per_cube(heads / kv_heads);
    let max_vector = client.properties().hardware.max_vector_size;
    let width = super::vector_width(head_dim, elem_bytes, max_vector);
    let shared = shared_bytes(group, head_dim, width);
    let max_shared = client.properties().hardware.max_shared_memory_size;
    if shared > max_shared {
        return Err(Refused(format!(
            "{group} heads of {head_dim} need {shared} bytes of shared memory, above {max_shared}"
        )));
    }
    let cubes_u32 = u32::try_from(heads / group).map_err(|_| too_large("heads"))?;
    let max_context = max_blocks * page_size;
    let partitions = match partition_len {
        Some(len) if len == 0 || !len.is_multiple_of(TILE) => {
            return Err(Refused(format!("partitions of {len} keys are not whole tiles")));
        }
        Some(len) => max_context.div_ceil(len),
        None => 1,
    };
    let partitions_u32 = u32::try_from(partitions)
        .ok()
        .filter(|&p| p <= super::MAX_CUBES_PER_DIM)
        .ok_or_else(|| Refused(format!("{partitions} partitions in one grid")))?;
    let [q, k, v, tables, query_seq, begin, end, out] = handles;
    let q_len = queries * heads * head_dim;
    let cache_len = slots * kv_heads * head_dim;
    // Split: each partition's unnormalised outputs and (running max, weight sum) per query head,
    // in f32. Unsplit, the kernel never touches them, and they are bound to `out`.
    let split = partition_len.is_some();
    let scratch = |len: usize| if split { client.empty(len * 4) } else { out.clone() };
    let (partition_out, partition_stats) = (
        scratch(queries * heads * partitions * head_dim),
        scratch(queries * heads * partitions * 2),
    );
    let (out_len, stats_len) = match split {
        true => (q_len * partitions, queries * heads * partitions * 2),
        false => (0, 0),
    };
    // SAFETY: the arrays' lengths are the handles' (the caller's contract); the kernel indexes
    // below them as long as every page id is below `slots / page_size` and every `ctx_end[s]`
    // is at most `max_blocks * page_size` and every `query_seq[i]` below `seqs`, which the
    // caller's block tables guarantee. The partitions' arrays are only indexed when split, then
    // below `queries * heads * partitions` rows; `partitions * partition_len` covers
    // `max_blocks * page_size`, so every key of a context falls in a partition.
    unsafe {
        queue_kernel!(
            paged_attention_kernel::PagedAttentionKernel<R>(
                client,
                CubeCount::Static(cubes_u32, queries_u32, partitions_u32),
                CubeDim::new_1d(TILE as u32),
            ),
            define [F = dtype],
            size [N = width],
            args [
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(q, q_len / width),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(k, cache_len / width),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(v, cache_len / width),
                Array<u32> = ArrayArg::from_raw_parts(tables, seqs * max_blocks),
                Array<u32> = ArrayArg::from_raw_parts(query_seq, queries),
                Array<u32> = ArrayArg::from_raw_parts(begin, queries),
                Array<u32> = ArrayArg::from_raw_parts(end, queries),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(out.clone(), q_len / width),
                Array<Vector<f32, N>> =
                    ArrayArg::from_raw_parts(partition_out.clone(), out_len / width),
                Array<f32> = ArrayArg::from_raw_parts(partition_stats.clone(), stats_len),
                u32 = max_blocks as u32,
                u32 = page_size as u32,
                u32 = kv_heads as u32,
                f32 = scale,
                u32 = partition_len.unwrap_or(0) as u32,
            ],
            comptime [width, head_dim, width, group, plane_reduce, split, dtype],
        );
        if split {
            queue_kernel!(
                combine_partitions_kernel::CombinePartitionsKernel<R>(
                    client,
                    CubeCount::Static(heads as u32, queries_u32, 1),
                    CubeDim::new_1d(head_dim as u32),
                ),
                define [F = dtype],
                args [
                    Array<f32> = ArrayArg::from_raw_parts(partition_out, out_len),
                    Array<f32> = ArrayArg::from_raw_parts(partition_stats, stats_len),
                    Array<F> = ArrayArg::from_raw_parts(out, q_len),
                    u32 = partitions_u32,
                ],
                comptime [head_dim, dtype],
            );
        }
    }
    Ok(())
}

/// [`partition_len`] for `shape` on `client`'s device: its contexts are at most its block
/// tables' `max_blocks * page_size` keys.
pub fn auto_partition_len<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &PagedAttentionShape,
) -> Option<usize> {
    let kv_heads = shape.kv_heads.max(1);
    let cubes = shape.queries * shape.heads / heads_per_cube(shape.heads / kv_heads).max(1);
    let sms = client.properties().hardware.num_streaming_multiprocessors;
    partition_len(cubes, shape.max_blocks * shape.page_size, sms)
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
        check_split(shape, queries, None);
    }

    fn check_split(shape: PagedAttentionShape, queries: &[Query], partition_len: Option<usize>) {
        check_scaled(shape, queries, partition_len, 4.0);
    }

    /// The kernel against the reference on both reduction paths, with scores scaled by
    /// `score_scale / sqrt(head_dim)`.
    fn check_scaled(
        shape: PagedAttentionShape,
        queries: &[Query],
        partition_len: Option<usize>,
        score_scale: f32,
    ) {
        for (client, plane_reduce) in gl::reduction_paths() {
            check_on(&client, plane_reduce, shape, queries, partition_len, score_scale);
        }
    }

    fn check_on(
        client: &ComputeClient<gl::Gl>,
        plane_reduce: bool,
        shape: PagedAttentionShape,
        queries: &[Query],
        partition_len: Option<usize>,
        score_scale: f32,
    ) {
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
        // Each sequence's pages scattered over the pool, as a long-running pool's free list
        // would hand them out: a shuffle of the pool's page ids (xorshift, fixed seed), none
        // shared while the tables hold no more entries than the pool has pages.
        let mut pool: Vec<u32> = (0..pages as u32).collect();
        let mut state = 0x9e37_79b9_u32;
        for i in (1..pages).rev() {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            pool.swap(i, state as usize % (i + 1));
        }
        let tables: Vec<u32> = (0..seqs * max_blocks).map(|i| pool[i % pages]).collect();
        let q = values(queries.len() * heads * head_dim, 1);
        let k = values(slots * kv_heads * head_dim, 2);
        let v = values(slots * kv_heads * head_dim, 3);
        let column = |f: fn(&Query) -> u32| queries.iter().map(f).collect::<Vec<u32>>();
        let scale = (head_dim as f32).powf(-0.5) * score_scale;
        let out = client.empty(q.len() * 4);
        let up = |x: &[u32]| client.create_from_slice(u32::as_bytes(x));
        let handles = [
            gl::upload(client, &q),
            gl::upload(client, &k),
            gl::upload(client, &v),
            up(&tables),
            up(&column(|q| q.seq)),
            up(&column(|q| q.begin)),
            up(&column(|q| q.end)),
            out.clone(),
        ];
        launch(
            client,
            handles,
            shape,
            scale,
            (f32_type, 4),
            plane_reduce,
            partition_len,
        )
        .unwrap();
        let got = gl::download(client, out);
        let want = reference(shape, (&q, &k, &v), &tables, queries, scale);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4,
                "{shape:?} split {partition_len:?} plane_reduce {plane_reduce} output {i} (query {}): \
                 kernel {g}, reference {e}",
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

    /// Scores hundreds apart, as a sharp attention head's are: `exp` of a score less the
    /// wrong maximum overflows, so this fails where a tile's maximum (plane or tree) or the
    /// online rescaling is wrong, as the mild scores above cannot show.
    #[test]
    fn kernels_paged_attention_large_scores_stay_finite() {
        let queries = [decode(0, 0, 300), decode(1, 37, 170), decode(2, 0, 700)];
        let shape = PagedAttentionShape {
            queries: queries.len(),
            seqs: 3,
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            page_size: 16,
            max_blocks: 44,
            slots: 16 * 140,
        };
        for partition_len in [None, Some(2 * TILE)] {
            check_scaled(shape, &queries, partition_len, 400.0);
        }
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
    fn kernels_paged_attention_serves_a_gqa_group_per_cube() {
        // Every head of a group must read its own query against the group's one K/V head:
        // groups of 1, 2, 4 and 8 query heads per KV head (two KV heads, so the second group's
        // rows are offset), 12 (two cubes of 6 per KV head) and 16 (two of 8); head_dim 16, 64
        // and 128 (eight, two and one V parts per tile) and 96 (one part, 32 units idle in the
        // V pass). Queries: one key; 300 keys (three
        // tiles, ending mid-page); a sliding window over 100..260 (starting mid-tile, crossing a
        // tile boundary); a prompt chunk at 126..129 (contexts ending on both sides of a tile).
        let mut queries = vec![decode(0, 0, 1), decode(1, 0, 300), decode(2, 100, 260)];
        queries.extend((126..129).map(|p| decode(3, 0, p + 1)));
        let cases = [
            (16, 7, [1, 2, 4, 8].as_slice()),
            (64, 16, &[1, 2, 4, 8, 12, 16]),
            (128, 5, &[1, 2, 4, 8]),
            (96, 11, &[4]),
        ];
        for (head_dim, page_size, groups) in cases {
            for &group in groups {
                let max_blocks = 300usize.div_ceil(page_size);
                let shape = PagedAttentionShape {
                    queries: queries.len(),
                    seqs: 4,
                    heads: 2 * group,
                    kv_heads: 2,
                    head_dim,
                    page_size,
                    max_blocks,
                    slots: (4 * max_blocks + 3) * page_size,
                };
                check(shape, &queries);
            }
        }
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
                launch(&client, handles, shape, 1.0, (f32_type, 4), false, None).is_err(),
                "{shape:?}"
            );
        }
        // Partitions must be whole tiles.
        for len in [0, TILE / 2, TILE + 1] {
            let handles = std::array::from_fn(|_| client.empty(4));
            assert!(
                launch(&client, handles, base, 1.0, (f32_type, 4), false, Some(len)).is_err(),
                "partitions of {len}"
            );
        }
    }

    #[test]
    fn kernels_paged_attention_split_contexts_match_softmax_attention() {
        // Partitions of one and two tiles over: one key (every other partition empty); 300 keys
        // (the last partition partial); a sliding window over 100..260 (its partitions start at
        // 100, not at a tile of the sequence); a chunk at 126..129; and 700 keys over a pool
        // whose tables allow 750 (six partitions of 128, the sixth past every context). GQA
        // groups of 1, 4 and 12 (two cubes per KV head), head_dim 16, 64 and 96.
        let mut queries = vec![decode(0, 0, 1), decode(1, 0, 300), decode(2, 100, 260)];
        queries.extend((126..129).map(|p| decode(3, 0, p + 1)));
        queries.push(decode(4, 0, 700));
        for (head_dim, page_size, group) in [(16, 7, 1), (64, 16, 4), (64, 5, 12), (96, 11, 4)] {
            let max_blocks = 750usize.div_ceil(page_size);
            let shape = PagedAttentionShape {
                queries: queries.len(),
                seqs: 5,
                heads: 2 * group,
                kv_heads: 2,
                head_dim,
                page_size,
                max_blocks,
                slots: (5 * max_blocks + 3) * page_size,
            };
            for len in [TILE, 2 * TILE] {
                check_split(shape, &queries, Some(len));
            }
        }
    }

    #[test]
    fn kernels_paged_attention_splits_only_long_contexts_on_idle_sms() {
        // Llama-3.2-1B on an H100: 8 cubes per decode, 132 SMs.
        assert_eq!(partition_len(8, 4096, Some(132)), Some(512));
        // Up to four tiles per context: one cube walks them.
        assert_eq!(partition_len(8, SPLIT_MIN_KEYS, Some(132)), None);
        assert_eq!(partition_len(8, 192, Some(132)), None);
        // Just past: two partitions, in whole tiles.
        assert_eq!(partition_len(8, SPLIT_MIN_KEYS + 1, Some(132)), Some(3 * TILE));
        // Batch 8: 64 cubes, two partitions fill the SMs.
        assert_eq!(partition_len(64, 4096, Some(132)), Some(2048));
        // Enough cubes already, or an unknown device (GL).
        assert_eq!(partition_len(128, 4096, Some(132)), None);
        assert_eq!(partition_len(8, 4096, None), None);
        // A very long context: one wave of partitions, each longer than the minimum.
        let len = partition_len(8, 131_072, Some(132)).unwrap();
        assert!(
            len.is_multiple_of(TILE) && 131_072usize.div_ceil(len) <= 16,
            "{len}"
        );
    }
}
