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
//! [`Epilogue::SwiGlu`] is the MLP's first half in one launch: `silu(x · gateᵀ) · (x · upᵀ)` from
//! the merged `[gate; up]` weight. A cube's four warps take the gate and up rows of two outputs,
//! meet in shared memory and write the activation, rounded as the GEMV and `kernels::silu_mul`
//! would round it apart (each product to the model's type, SiLU in f32 to that type, then the
//! product in that type), so it is bit for bit the two launches it replaces.
//!
//! [`launch_normed`] adds the RMSNorm before a projection (and the residual add before it) as a
//! prologue: each cube normalises the rows into shared memory, then reads them there. With
//! [`Epilogue::RopeWrite`] the merged q/k/v product is not written out: q goes through RoPE into
//! the output and K (through RoPE) and V into their slots of the paged cache. So at decode-sized
//! batches a layer's attention input and its MLP input are one launch each.

use cubecl::prelude::*;

use super::Refused;

/// Rows of `x` one launch takes: each lane keeps a vector accumulator per row, so registers
/// bound it. Larger batches go to a tiling kernel.
pub const GEMV_MAX_ROWS: usize = 8;
/// Lanes per output on the shared-memory path; the plane path takes one plane's, which is this
/// on NVIDIA (see [`lanes_per_output`]).
const LANES: usize = 32;
/// Outputs per cube (a cube of 128 units).
const OUTPUTS_PER_CUBE: u32 = 4;

/// The problem's sizes: `x` is `[rows, k]`, `w` is `[n, k]`, both contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvShape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

/// The GEMV with every prologue and epilogue array bound; the comptime switches pick which
/// are read or written (those a launch does not use are bound to `x` and `out`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    delta: &Array<Vector<F, N>>,
    gain: &Array<Vector<F, N>>,
    sum: &mut Array<Vector<F, N>>,
    cos: &Array<F>,
    sin: &Array<F>,
    positions: &Array<u32>,
    slots: &Array<u32>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    k_vectors: u32,
    outputs: u32,
    eps: f32,
    q_dim: u32,
    kv_dim: u32,
    #[comptime] rows: usize,
    #[comptime] lanes: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] swiglu: bool,
    #[comptime] rope_write: bool,
    #[comptime] head_dim: usize,
    #[comptime] norm: bool,
    #[comptime] residual: bool,
    #[comptime] staged_len: usize,
    #[define(F)] _dtype: StorageType,
) {
    gemv_body::<F, N>(
        x,
        w,
        out,
        delta,
        gain,
        sum,
        cos,
        sin,
        positions,
        slots,
        k_cache,
        v_cache,
        k_vectors,
        outputs,
        eps,
        q_dim,
        kv_dim,
        rows,
        lanes,
        plane_reduce,
        swiglu,
        rope_write,
        head_dim,
        norm,
        residual,
        staged_len,
    );
}

/// The GEMV without a norm (plain, or with the SwiGlu epilogue), with its three arrays alone.
///
/// Why: each array a launch binds costs the host a registration, a handle and its metadata
/// (about 0.3k instructions on the caller's thread, docs/Performance.md), and cubecl's runner a
/// binding; a decode step's GEMVs are mostly plain. The body's other arrays are one-element
/// locals here, which it never touches with its switches off.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_plain_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    k_vectors: u32,
    outputs: u32,
    #[comptime] rows: usize,
    #[comptime] lanes: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] swiglu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let mut sum = Array::<Vector<F, N>>::new(1usize);
    let table = Array::<F>::new(1usize);
    let indices = Array::<u32>::new(1usize);
    let mut k_cache = Array::<F>::new(1usize);
    let mut v_cache = Array::<F>::new(1usize);
    gemv_body::<F, N>(
        x,
        w,
        out,
        x, // delta
        x, // gain
        &mut sum,
        &table,
        &table,
        &indices,
        &indices,
        &mut k_cache,
        &mut v_cache,
        k_vectors,
        outputs,
        0.0f32, // eps
        0u32,   // q_dim
        0u32,   // kv_dim
        rows,
        lanes,
        plane_reduce,
        swiglu,
        false,  // rope_write
        2usize, // head_dim
        false,  // norm
        false,  // residual
        1usize, // staged_len
    );
}

/// The GEMV with its norm prologue and without the RoPE epilogue (plain, or SwiGlu): the six
/// arrays of the product and the norm, not the RoPE's six (see [`gemv_plain_kernel`]'s why).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_norm_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    delta: &Array<Vector<F, N>>,
    gain: &Array<Vector<F, N>>,
    sum: &mut Array<Vector<F, N>>,
    k_vectors: u32,
    outputs: u32,
    eps: f32,
    #[comptime] rows: usize,
    #[comptime] lanes: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] swiglu: bool,
    #[comptime] residual: bool,
    #[comptime] staged_len: usize,
    #[define(F)] _dtype: StorageType,
) {
    let table = Array::<F>::new(1usize);
    let indices = Array::<u32>::new(1usize);
    let mut k_cache = Array::<F>::new(1usize);
    let mut v_cache = Array::<F>::new(1usize);
    gemv_body::<F, N>(
        x,
        w,
        out,
        delta,
        gain,
        sum,
        &table,
        &table,
        &indices,
        &indices,
        &mut k_cache,
        &mut v_cache,
        k_vectors,
        outputs,
        eps,
        0u32, // q_dim
        0u32, // kv_dim
        rows,
        lanes,
        plane_reduce,
        swiglu,
        false,  // rope_write
        2usize, // head_dim
        true,   // norm
        residual,
        staged_len,
    );
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn gemv_body<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    delta: &Array<Vector<F, N>>,
    gain: &Array<Vector<F, N>>,
    sum: &mut Array<Vector<F, N>>,
    cos: &Array<F>,
    sin: &Array<F>,
    positions: &Array<u32>,
    slots: &Array<u32>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    k_vectors: u32,
    outputs: u32,
    eps: f32,
    q_dim: u32,
    kv_dim: u32,
    #[comptime] rows: usize,
    #[comptime] lanes: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] swiglu: bool,
    #[comptime] rope_write: bool,
    #[comptime] head_dim: usize,
    #[comptime] norm: bool,
    #[comptime] residual: bool,
    #[comptime] staged_len: usize,
) {
    let (kv, n) = (k_vectors as usize, outputs as usize);
    // With `norm`, the rows the product reads are those of `x` (plus `delta`'s, with `residual`)
    // after RMSNorm with `gain`, staged in shared memory by the whole cube first.
    let mut staged = SharedMemory::<Vector<F, N>>::new(staged_len);
    if norm {
        stage_normed_rows::<F, N>(
            x,
            delta,
            gain,
            sum,
            &mut staged,
            kv,
            eps,
            rows,
            lanes,
            plane_reduce,
            residual,
        );
    }
    // This warp's output and its row of `w`. With `swiglu`, `n` is the activation's width, `w`
    // has `2 n` rows (gate, then up), and the cube's warps 0-1 take the gate rows of outputs
    // `2 c`, `2 c + 1`, warps 2-3 their up rows. With `rope_write`, `n` counts the pairs of
    // columns RoPE rotates together (`d` and `d + head_dim / 2` of a head: q's heads, k's, then
    // v's, paired alike), warps 0-1 take the first of pairs `2 c`, `2 c + 1`, warps 2-3 the second.
    let mut o = (CUBE_POS_X * OUTPUTS_PER_CUBE + UNIT_POS_Y) as usize;
    let mut w_row = o;
    if swiglu {
        o = (CUBE_POS_X * 2 + UNIT_POS_Y % 2) as usize;
        w_row = o + (UNIT_POS_Y / 2) as usize * n;
    }
    if rope_write {
        let half = comptime!(head_dim / 2);
        o = (CUBE_POS_X * 2 + UNIT_POS_Y % 2) as usize;
        w_row = (o / half) * head_dim + o % half + (UNIT_POS_Y / 2) as usize * half;
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
                let xv = if norm { staged[r * kv + i] } else { x[r * kv + i] };
                acc[r] += wv * Vector::<f32, N>::cast_from(xv);
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
        let mut partial = SharedMemory::<f32>::new(rows * lanes * OUTPUTS_PER_CUBE as usize);
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
    if swiglu || rope_write {
        // Every unit reaches the barrier; lane 0 of each warp holds its sums.
        let mut pair = SharedMemory::<f32>::new(rows * OUTPUTS_PER_CUBE as usize);
        if UNIT_POS_X == 0 {
            #[unroll]
            for r in 0..rows {
                pair[UNIT_POS_Y as usize * rows + r] = sums[r];
            }
        }
        sync_cube();
        if rope_write {
            if UNIT_POS_X == 0 && UNIT_POS_Y < 2 && o < n {
                let (q_dim, kv_dim) = (q_dim as usize, kv_dim as usize);
                #[unroll]
                for r in 0..rows {
                    // Rounded to the model's type as the GEMV writes its output.
                    let first = F::cast_from(pair[UNIT_POS_Y as usize * rows + r]);
                    let second = F::cast_from(pair[(UNIT_POS_Y as usize + 2) * rows + r]);
                    write_roped_pair::<F>(
                        first,
                        second,
                        o,
                        r,
                        (cos, sin, positions, slots),
                        out,
                        k_cache,
                        v_cache,
                        (q_dim, kv_dim),
                        head_dim,
                    );
                }
            }
        } else if UNIT_POS_X == 0 && UNIT_POS_Y < 2 && o < n {
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

/// The `rope_write` epilogue of pair `o` (columns `d` and `d + head_dim / 2` of one head) of row
/// `r`: a q head's pair rotated into `q_out`, a K head's rotated into its slot of `k_cache`, a V
/// head's stored as it is into `v_cache`; the rotation is `kernels::qkv_write`'s, in the
/// model's type.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_roped_pair<F: Float>(
    first: F,
    second: F,
    o: usize,
    r: usize,
    tables: (&Array<F>, &Array<F>, &Array<u32>, &Array<u32>),
    q_out: &mut Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    dims: (usize, usize),
    #[comptime] head_dim: usize,
) {
    let (cos, sin, positions, slots) = tables;
    let (q_dim, kv_dim) = dims;
    let half = comptime!(head_dim / 2);
    let (d, col) = (o % half, (o / half) * head_dim + o % half);
    let at = positions[r] as usize * head_dim + d;
    if col < q_dim + kv_dim {
        let a = first * cos[at] + -second * sin[at];
        let b = second * cos[at + half] + first * sin[at + half];
        if col < q_dim {
            q_out[r * q_dim + col] = a;
            q_out[r * q_dim + col + half] = b;
        } else {
            let dst = slots[r] as usize * kv_dim + col - q_dim;
            k_cache[dst] = a;
            k_cache[dst + half] = b;
        }
    } else {
        let dst = slots[r] as usize * kv_dim + col - q_dim - kv_dim;
        v_cache[dst] = first;
        v_cache[dst + half] = second;
    }
}

/// The GEMV's RMSNorm prologue, by the whole cube: stages `x` (or `x + delta`, rounded to the
/// model's type and written to `sum` by the first cube) into `staged`, sums its squares per row
/// in f32, then normalises each element in place as `kernels::rms_norm` does (the normalised
/// value rounded to the model's type, then multiplied by `gain` in that type). Every unit ends
/// at the barrier, so the product may read any staged element.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_normed_rows<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    delta: &Array<Vector<F, N>>,
    gain: &Array<Vector<F, N>>,
    sum: &mut Array<Vector<F, N>>,
    staged: &mut SharedMemory<Vector<F, N>>,
    kv: usize,
    eps: f32,
    #[comptime] rows: usize,
    #[comptime] lanes: usize,
    #[comptime] plane_reduce: bool,
    #[comptime] residual: bool,
) {
    // The cube's units: `lanes` × [`OUTPUTS_PER_CUBE`].
    let cube_units = comptime!(lanes * OUTPUTS_PER_CUBE as usize);
    let unit = UNIT_POS_Y as usize * lanes + UNIT_POS_X as usize;
    let mut squares = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        let mut s = 0.0f32;
        let mut i = unit;
        while i < kv {
            let mut v = x[r * kv + i];
            if residual {
                v += delta[r * kv + i];
                if CUBE_POS_X == 0 {
                    sum[r * kv + i] = v;
                }
            }
            staged[r * kv + i] = v;
            let f = Vector::<f32, N>::cast_from(v);
            let f2 = f * f;
            #[unroll]
            for j in 0..f2.vector_size() {
                s += f2[j];
            }
            i += cube_units;
        }
        squares[r] = s;
    }
    // The rows' sums of squares over the cube, in a fixed order.
    let mut totals = Array::<f32>::new(rows);
    if comptime!(plane_reduce) {
        let mut per_warp = SharedMemory::<f32>::new(rows * OUTPUTS_PER_CUBE as usize);
        #[unroll]
        for r in 0..rows {
            let s = plane_sum(squares[r]);
            if UNIT_POS_X == 0 {
                per_warp[r * OUTPUTS_PER_CUBE as usize + UNIT_POS_Y as usize] = s;
            }
        }
        sync_cube();
        #[unroll]
        for r in 0..rows {
            let mut t = 0.0f32;
            #[unroll]
            for y in 0..OUTPUTS_PER_CUBE as usize {
                t += per_warp[r * OUTPUTS_PER_CUBE as usize + y];
            }
            totals[r] = t;
        }
    } else {
        let mut partial = SharedMemory::<f32>::new(rows * cube_units);
        #[unroll]
        for r in 0..rows {
            partial[r * cube_units + unit] = squares[r];
        }
        sync_cube();
        let mut stride = CUBE_DIM as usize / 2;
        while stride > 0 {
            if unit < stride {
                #[unroll]
                for r in 0..rows {
                    partial[r * cube_units + unit] += partial[r * cube_units + unit + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
        #[unroll]
        for r in 0..rows {
            totals[r] = partial[r * cube_units];
        }
    }
    let width = f32::cast_from(kv * gain.vector_size());
    #[unroll]
    for r in 0..rows {
        let inv_rms = Vector::<f32, N>::new(1.0f32 / (totals[r] / width + eps).sqrt());
        // Each unit rewrites only the elements it staged.
        let mut i = unit;
        while i < kv {
            let f = Vector::<f32, N>::cast_from(staged[r * kv + i]);
            staged[r * kv + i] = Vector::<F, N>::cast_from(f * inv_rms) * gain[i];
            i += cube_units;
        }
    }
    sync_cube();
}

/// Queues `out = x · wᵀ` on `client` (or, per `epilogue`, the activation or the RoPE and K/V
/// write of that product). The handles hold contiguous `[rows, k]`, `[n, k]` and `[rows, n]`
/// elements of `dtype`, `elem_bytes` each (`[2 n, k]` weights with [`Epilogue::SwiGlu`]).
/// `plane_reduce` sums a plane's lanes with a plane operation (CUDA); without it, through shared
/// memory (any runtime).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    handles: [cubecl::server::Handle; 3],
    epilogue: Epilogue,
    shape: GemvShape,
    dtype: (StorageType, usize),
    plane_reduce: bool,
) -> Result<(), Refused> {
    launch_kernel(client, handles, None, epilogue, shape, dtype, plane_reduce)
}

/// The RMSNorm a GEMV applies to its input first ([`launch_normed`]).
#[derive(Debug, Clone)]
pub struct NormPrologue {
    /// The norm's gain, `[k]` elements of the GEMV's type.
    pub gain: cubecl::server::Handle,
    pub eps: f32,
    /// `[delta, sum]`, both `[rows, k]`: the rows normalised are `x + delta`, written to `sum`
    /// (the residual stream the next layer adds to).
    pub residual: Option<[cubecl::server::Handle; 2]>,
}

/// Where the merged q/k/v product goes instead of a plain output ([`Epilogue::RopeWrite`]): q
/// through RoPE into the output (`[rows, heads * head_dim]`), K through RoPE and V into their
/// slots of the caches, as `kernels::qkv_write` would store them.
#[derive(Debug, Clone)]
pub struct RopeWrite {
    /// The model's `cos` and `sin` tables (`[table_rows, head_dim]` each), and each row's
    /// position (below `table_rows`) and cache slot (`[rows]` each, 32-bit).
    pub cos: cubecl::server::Handle,
    pub sin: cubecl::server::Handle,
    pub positions: cubecl::server::Handle,
    pub slots: cubecl::server::Handle,
    /// The layer's caches, `[cache_slots, kv_heads * head_dim]` each, written in place.
    pub k_cache: cubecl::server::Handle,
    pub v_cache: cubecl::server::Handle,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cache_slots: usize,
    /// Rows of the RoPE tables.
    pub table_rows: usize,
}

/// What a GEMV does with its sums.
#[derive(Debug, Clone)]
pub enum Epilogue {
    /// Writes them.
    Plain,
    /// `silu(x · gateᵀ) · (x · upᵀ)` of the merged `[gate; up]` weight (`[2 n, k]`) into
    /// `out` (`[rows, n]`).
    SwiGlu,
    /// RoPE and the K/V write of the merged q/k/v product.
    RopeWrite(Box<RopeWrite>),
}

/// Rows of `x` staged in shared memory by [`launch_normed`] at most, in bytes (8 rows of a
/// 2,048-wide bf16 model take 32 KiB): more would leave an SM too few cubes, and so too few
/// weight reads in flight, for a memory-bound GEMV.
pub const NORM_STAGE_MAX_BYTES: usize = 48 * 1024;

/// Queues the GEMV with `epilogue` on the RMSNorm of `x`'s rows, or of `x + delta`'s, in one
/// launch: the norm's launch before the GEMV, and the write and read back of its output, are
/// saved. The normalised rows are rounded as `kernels::rms_norm` rounds them; their statistics
/// are summed in another order, so the result matches the two launches to f32's rounding, not
/// bit for bit. With [`Epilogue::RopeWrite`], `w` is the merged `[q; k; v]` weight
/// (`[(heads + 2 kv_heads) head_dim, k]`) and `out` receives q after RoPE; `shape.n` is ignored.
pub fn launch_normed<R: Runtime>(
    client: &ComputeClient<R>,
    handles: [cubecl::server::Handle; 3],
    norm: NormPrologue,
    epilogue: Epilogue,
    shape: GemvShape,
    dtype: (StorageType, usize),
    plane_reduce: bool,
) -> Result<(), Refused> {
    let staged = shape.rows * shape.k * dtype.1;
    let limit = NORM_STAGE_MAX_BYTES.min(client.properties().hardware.max_shared_memory_size);
    if staged > limit {
        return Err(Refused(format!(
            "{} rows of {} staged for the norm take {staged} bytes of shared memory, past {limit}",
            shape.rows, shape.k
        )));
    }
    launch_kernel(client, handles, Some(norm), epilogue, shape, dtype, plane_reduce)
}

/// Lanes per output column: on the plane path one plane's, since a plane sum must span exactly
/// one output's lanes (32 on NVIDIA; lavapipe, which the tests run it on, has 8); 32 otherwise.
fn lanes_per_output<R: Runtime>(client: &ComputeClient<R>, plane_reduce: bool) -> Result<usize, Refused> {
    if !plane_reduce {
        return Ok(LANES);
    }
    let hardware = &client.properties().hardware;
    let (min, max) = (hardware.plane_size_min, hardware.plane_size_max);
    if min != max || !(4..=LANES as u32).contains(&max) || !max.is_power_of_two() {
        return Err(Refused(format!(
            "plane sums need planes of one width from 4 to {LANES} lanes, not {min} to {max}"
        )));
    }
    Ok(max as usize)
}

fn launch_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    [x, w, out]: [cubecl::server::Handle; 3],
    norm: Option<NormPrologue>,
    epilogue: Epilogue,
    shape: GemvShape,
    (dtype, elem_bytes): (StorageType, usize),
    plane_reduce: bool,
) -> Result<(), Refused> {
    let GemvShape { rows, k, mut n } = shape;
    // The rows of `w` and the elements of `out`; with RoPE, `n` counts pairs of columns.
    let (w_rows, out_len) = match &epilogue {
        Epilogue::Plain => (n, rows * n),
        Epilogue::SwiGlu => (2 * n, rows * n),
        Epilogue::RopeWrite(r) => {
            let (q_dim, kv_dim) = (r.heads * r.head_dim, r.kv_heads * r.head_dim);
            if !r.head_dim.is_multiple_of(2) || r.heads == 0 || r.kv_heads == 0 {
                return Err(Refused(format!(
                    "RoPE of {} and {} heads of {}",
                    r.heads, r.kv_heads, r.head_dim
                )));
            }
            if u32::try_from(r.cache_slots * kv_dim).is_err() {
                return Err(Refused("the cache does not fit in 32 bits".into()));
            }
            n = (q_dim + 2 * kv_dim) / 2;
            (2 * n, rows * q_dim)
        }
    };
    if rows == 0 || rows > GEMV_MAX_ROWS {
        return Err(Refused(format!(
            "the GEMV takes 1 to {GEMV_MAX_ROWS} rows, not {rows}"
        )));
    }
    if k == 0 || n == 0 {
        return Err(Refused("an empty GEMV".into()));
    }
    let lanes = lanes_per_output(client, plane_reduce)?;
    let max_vector = client.properties().hardware.max_vector_size;
    let width = super::vector_width(k, elem_bytes, max_vector);
    let kv = k / width;
    let (k_vectors, n_out) = match (u32::try_from(kv), u32::try_from(n)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(Refused(format!("a GEMV of k {k}, n {n} is too large"))),
    };
    let outputs_per_cube = match epilogue {
        Epilogue::Plain => OUTPUTS_PER_CUBE,
        Epilogue::SwiGlu | Epilogue::RopeWrite(_) => 2,
    };
    let cubes = n_out.div_ceil(outputs_per_cube);
    if cubes > super::MAX_CUBES_PER_DIM {
        return Err(Refused(format!(
            "{n} outputs need more than one grid row of cubes"
        )));
    }
    let swiglu = matches!(epilogue, Epilogue::SwiGlu);
    if norm.is_none() && !matches!(epilogue, Epilogue::RopeWrite(_)) {
        // SAFETY: the arrays' lengths are those of the handles' buffers (the caller's contract)
        // and every index the kernel makes is below them: `o < n` (`2 n` rows of `w` for
        // SwiGlu), `i < kv`, `r < rows`; the body's other arrays are not touched without a norm
        // or the RoPE epilogue.
        unsafe {
            queue_kernel!(
                gemv_plain_kernel::GemvPlainKernel<R>(
                    client,
                    CubeCount::Static(cubes, 1, 1),
                    CubeDim::new_2d(lanes as u32, OUTPUTS_PER_CUBE),
                ),
                define [F = dtype],
                size [N = width],
                args [
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(x, rows * kv),
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(w, w_rows * kv),
                    Array<F> = ArrayArg::from_raw_parts(out, out_len),
                    u32 = k_vectors,
                    u32 = n_out,
                ],
                comptime [width, rows, lanes, plane_reduce, swiglu, dtype],
            );
        }
        return Ok(());
    }
    // Without a norm, the prologue's arrays are bound to `x` (never read or written); without a
    // residual, `delta` and `sum` are.
    let (is_norm, eps, staged_len) = match &norm {
        Some(p) => (true, p.eps, rows * kv),
        None => (false, 0.0, 1),
    };
    let residual = norm.as_ref().is_some_and(|p| p.residual.is_some());
    let (gain, gain_len) = match &norm {
        Some(p) => (p.gain.clone(), kv),
        None => (x.clone(), rows * kv),
    };
    let [delta, sum] = norm
        .and_then(|p| p.residual)
        .unwrap_or_else(|| [x.clone(), x.clone()]);
    let Epilogue::RopeWrite(r) = epilogue else {
        // SAFETY: as the full kernel's below, without the RoPE tables and caches, which this
        // kernel does not bind.
        unsafe {
            queue_kernel!(
                gemv_norm_kernel::GemvNormKernel<R>(
                    client,
                    CubeCount::Static(cubes, 1, 1),
                    CubeDim::new_2d(lanes as u32, OUTPUTS_PER_CUBE),
                ),
                define [F = dtype],
                size [N = width],
                args [
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(x, rows * kv),
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(w, w_rows * kv),
                    Array<F> = ArrayArg::from_raw_parts(out, out_len),
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(delta, rows * kv),
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(gain, gain_len),
                    Array<Vector<F, N>> = ArrayArg::from_raw_parts(sum, rows * kv),
                    u32 = k_vectors,
                    u32 = n_out,
                    f32 = eps,
                ],
                comptime [width, rows, lanes, plane_reduce, swiglu, residual, staged_len, dtype],
            );
        }
        return Ok(());
    };
    // Only the RoPE epilogue binds all twelve arrays.
    let (rope_write, head_dim) = (true, r.head_dim);
    let (q_dim, kv_dim) = (r.heads * head_dim, r.kv_heads * head_dim);
    let (table_len, slots_len, cache_len) = (r.table_rows * head_dim, rows, r.cache_slots * kv_dim);
    let [cos, sin, positions, slots, k_cache, v_cache] =
        [r.cos, r.sin, r.positions, r.slots, r.k_cache, r.v_cache];
    // SAFETY: the arrays' lengths are those of the handles' buffers (the caller's contract) and
    // every index the kernel makes is below them: `o < n` (so the row of `w` is below `w_rows`),
    // `i < kv`, `r < rows`; the prologue's arrays are only indexed with a norm, then below
    // `rows * kv` (`kv` for the gain); the RoPE tables and the caches only with `rope_write`,
    // then at the rows' positions (below `table_rows`) and slots (below `cache_slots`), the
    // caller's contract.
    unsafe {
        queue_kernel!(
            gemv_kernel::GemvKernel<R>(
                client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_2d(lanes as u32, OUTPUTS_PER_CUBE),
            ),
            define [F = dtype],
            size [N = width],
            args [
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(x, rows * kv),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(w, w_rows * kv),
                Array<F> = ArrayArg::from_raw_parts(out, out_len),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(delta, rows * kv),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(gain, gain_len),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(sum, rows * kv),
                Array<F> = ArrayArg::from_raw_parts(cos, table_len),
                Array<F> = ArrayArg::from_raw_parts(sin, table_len),
                Array<u32> = ArrayArg::from_raw_parts(positions, slots_len),
                Array<u32> = ArrayArg::from_raw_parts(slots, slots_len),
                Array<F> = ArrayArg::from_raw_parts(k_cache, cache_len),
                Array<F> = ArrayArg::from_raw_parts(v_cache, cache_len),
                u32 = k_vectors,
                u32 = n_out,
                f32 = eps,
                u32 = q_dim as u32,
                u32 = kv_dim as u32,
            ],
            comptime [
                width, rows, lanes, plane_reduce, swiglu, rope_write, head_dim, is_norm, residual,
                staged_len, dtype,
            ],
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
        for (client, plane_reduce) in gl::reduction_paths() {
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
                launch(
                    &client,
                    handles,
                    Epilogue::Plain,
                    shape,
                    (f32_type, 4),
                    plane_reduce,
                )
                .unwrap();
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
    }

    /// The fused launch is bit for bit the GEMV of the merged weight and then `silu_mul`.
    #[test]
    fn kernels_gemv_swiglu_is_the_gemv_then_silu_mul() {
        for (client, plane_reduce) in gl::reduction_paths() {
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
                launch(
                    &client,
                    handles,
                    Epilogue::Plain,
                    merged,
                    (f32_type, 4),
                    plane_reduce,
                )
                .unwrap();
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
                launch(
                    &client,
                    handles,
                    Epilogue::SwiGlu,
                    shape,
                    (f32_type, 4),
                    plane_reduce,
                )
                .unwrap();
                let (apart, fused) = (gl::download(&client, apart), gl::download(&client, fused));
                assert_eq!(fused, apart, "rows {rows}, k {k}, width {width}");
                assert!(fused.iter().any(|v| *v != 0.0));
            }
        }
    }

    /// The norm prologue is RMSNorm (after the residual add, with `delta`) and then the GEMV, or
    /// the fused gate/up GEMV, to f32's rounding; the residual's sum is the add's, bit for bit.
    #[test]
    fn kernels_gemv_norm_prologue_is_rms_norm_then_the_gemv() {
        use crate::model::kernels::rms_norm;
        for (client, plane_reduce) in gl::reduction_paths() {
            let f32_type = f32::as_type_native_unchecked().storage_type();
            let eps = 1e-5f32;
            // k 2048 gives each of the cube's 128 units 4 vectors, k 64 leaves units idle, k 36 makes
            // 4-wide vectors and k 7 scalar ones; n 5 and 33 leave the last cube part empty.
            for (rows, k, n, swiglu, residual) in [
                (1, 2048, 64, false, true),
                (3, 2048, 33, true, true),
                (8, 64, 5, false, false),
                (5, 36, 9, true, false),
                (2, 7, 6, false, true),
                (8, 128, 33, true, true),
            ] {
                let what = format!("rows {rows}, k {k}, n {n}, swiglu {swiglu}, residual {residual}");
                let x = values(rows * k, 5);
                let delta = values(rows * k, 6);
                let gain: Vec<f32> = (0..k).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
                let w_rows = if swiglu { 2 * n } else { n };
                // Scrambled: `values`' near-linear rows would make every gate a large negative sum.
                let w: Vec<f32> = (0..w_rows * k)
                    .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 53) as f32 / 1024.0 - 1.0)
                    .collect();
                // Apart: the norm's launch, then the GEMV's.
                let (sum_apart, normed) = (client.empty(rows * k * 4), client.empty(rows * k * 4));
                if residual {
                    let handles = [
                        gl::upload(&client, &x),
                        gl::upload(&client, &delta),
                        gl::upload(&client, &gain),
                        sum_apart.clone(),
                        normed.clone(),
                    ];
                    rms_norm::launch_add(&client, handles, (rows, k), eps, f32_type).unwrap();
                } else {
                    let handles = [
                        gl::upload(&client, &x),
                        gl::upload(&client, &gain),
                        normed.clone(),
                    ];
                    rms_norm::launch(&client, handles, (rows, k), eps, f32_type).unwrap();
                }
                let apart = client.empty(rows * n * 4);
                let handles = [normed, gl::upload(&client, &w), apart.clone()];
                let shape = GemvShape { rows, k, n };
                let epilogue = || if swiglu { Epilogue::SwiGlu } else { Epilogue::Plain };
                launch(&client, handles, epilogue(), shape, (f32_type, 4), plane_reduce).unwrap();
                // Fused.
                let (sum, fused) = (client.empty(rows * k * 4), client.empty(rows * n * 4));
                let norm = NormPrologue {
                    gain: gl::upload(&client, &gain),
                    eps,
                    residual: residual.then(|| [gl::upload(&client, &delta), sum.clone()]),
                };
                let handles = [gl::upload(&client, &x), gl::upload(&client, &w), fused.clone()];
                launch_normed(
                    &client,
                    handles,
                    norm,
                    epilogue(),
                    shape,
                    (f32_type, 4),
                    plane_reduce,
                )
                .unwrap();
                let (apart, fused) = (gl::download(&client, apart), gl::download(&client, fused));
                for (i, (f, a)) in fused.iter().zip(&apart).enumerate() {
                    assert!(
                        (f - a).abs() <= 1e-5 * (1.0 + a.abs()),
                        "{what}, output {i}: fused {f}, apart {a}"
                    );
                }
                assert!(fused.iter().any(|v| *v != 0.0), "{what}");
                if residual {
                    let want: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
                    assert_eq!(gl::download(&client, sum), want, "{what}: x + delta");
                }
            }
        }
    }

    /// With the RoPE epilogue, one launch leaves q, the caches' K and V rows (and every other
    /// row of the caches untouched) as the norm's launch, three GEMVs and `qkv_write` do.
    #[test]
    fn kernels_gemv_rope_write_is_the_gemv_then_qkv_write() {
        use crate::model::kernels::qkv_write::{self, QkvStrides, QkvWriteShape};
        use crate::model::kernels::rms_norm;
        for (client, plane_reduce) in gl::reduction_paths() {
            let f32_type = f32::as_type_native_unchecked().storage_type();
            let (eps, cache_slots) = (1e-5f32, 24);
            // GQA (4 query heads over 2 KV heads), one KV head, and as many KV heads as query heads;
            // k 36 makes 4-wide vectors.
            for (rows, k, heads, kv_heads, head_dim) in
                [(1, 64, 4, 2, 16), (3, 36, 2, 1, 8), (8, 128, 4, 4, 32)]
            {
                let what = format!("rows {rows}, k {k}, heads {heads}/{kv_heads} of {head_dim}");
                let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
                let x = values(rows * k, 8);
                let delta = values(rows * k, 9);
                let gain: Vec<f32> = (0..k).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
                let w: Vec<f32> = (0..(q_dim + 2 * kv_dim) * k)
                    .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 53) as f32 / 1024.0 - 1.0)
                    .collect();
                let table_rows = 11;
                let (cos, sin) = (
                    values(table_rows * head_dim, 10),
                    values(table_rows * head_dim, 11),
                );
                // Distinct slots, out of order, and positions out of order (some repeated).
                let slots: Vec<u32> = (0..rows as u32)
                    .map(|r| (r * 7 + 5) % cache_slots as u32)
                    .collect();
                let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 3 + 4) % 9).collect();
                let upload_positions = || client.create_from_slice(u32::as_bytes(&positions));
                let cache_init = values(cache_slots * kv_dim, 12);
                let upload_slots = || client.create_from_slice(u32::as_bytes(&slots));
                // Apart: the norm, q, k and v's GEMVs, then the RoPE and the write.
                let (sum_apart, normed) = (client.empty(rows * k * 4), client.empty(rows * k * 4));
                let handles = [
                    gl::upload(&client, &x),
                    gl::upload(&client, &delta),
                    gl::upload(&client, &gain),
                    sum_apart,
                    normed.clone(),
                ];
                rms_norm::launch_add(&client, handles, (rows, k), eps, f32_type).unwrap();
                let mut parts = Vec::new();
                for (begin, width) in [(0, q_dim), (q_dim, kv_dim), (q_dim + kv_dim, kv_dim)] {
                    let part = client.empty(rows * width * 4);
                    let w_part = gl::upload(&client, &w[begin * k..(begin + width) * k]);
                    let shape = GemvShape { rows, k, n: width };
                    launch(
                        &client,
                        [normed.clone(), w_part, part.clone()],
                        Epilogue::Plain,
                        shape,
                        (f32_type, 4),
                        plane_reduce,
                    )
                    .unwrap();
                    parts.push(part);
                }
                let (q_apart, k_apart, v_apart) = (
                    client.empty(rows * q_dim * 4),
                    gl::upload(&client, &cache_init),
                    gl::upload(&client, &cache_init),
                );
                let [q, kp, vp]: [_; 3] = parts.try_into().unwrap();
                let handles = [
                    q,
                    kp,
                    vp,
                    gl::upload(&client, &cos),
                    gl::upload(&client, &sin),
                    upload_positions(),
                    upload_slots(),
                    q_apart.clone(),
                    k_apart.clone(),
                    v_apart.clone(),
                ];
                let shape = QkvWriteShape {
                    tokens: rows,
                    heads,
                    kv_heads,
                    head_dim,
                    cache_slots,
                    positions: table_rows,
                };
                let strides = QkvStrides {
                    q: q_dim,
                    k: kv_dim,
                    v: kv_dim,
                };
                qkv_write::launch(&client, handles, shape, strides, f32_type).unwrap();
                // Fused.
                let (sum, q_fused) = (client.empty(rows * k * 4), client.empty(rows * q_dim * 4));
                let (k_fused, v_fused) = (gl::upload(&client, &cache_init), gl::upload(&client, &cache_init));
                let norm = NormPrologue {
                    gain: gl::upload(&client, &gain),
                    eps,
                    residual: Some([gl::upload(&client, &delta), sum]),
                };
                let rope = RopeWrite {
                    cos: gl::upload(&client, &cos),
                    sin: gl::upload(&client, &sin),
                    positions: upload_positions(),
                    slots: upload_slots(),
                    k_cache: k_fused.clone(),
                    v_cache: v_fused.clone(),
                    heads,
                    kv_heads,
                    head_dim,
                    cache_slots,
                    table_rows,
                };
                let handles = [gl::upload(&client, &x), gl::upload(&client, &w), q_fused.clone()];
                let shape = GemvShape { rows, k, n: 0 };
                let epilogue = Epilogue::RopeWrite(Box::new(rope));
                launch_normed(
                    &client,
                    handles,
                    norm,
                    epilogue,
                    shape,
                    (f32_type, 4),
                    plane_reduce,
                )
                .unwrap();
                for (name, fused, apart) in [
                    ("q", q_fused, q_apart),
                    ("K", k_fused, k_apart),
                    ("V", v_fused, v_apart),
                ] {
                    let (fused, apart) = (gl::download(&client, fused), gl::download(&client, apart));
                    for (i, (f, a)) in fused.iter().zip(&apart).enumerate() {
                        assert!(
                            (f - a).abs() <= 1e-5 * (1.0 + a.abs()),
                            "{what}: {name} element {i}: fused {f}, apart {a}"
                        );
                    }
                }
            }
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
                launch(
                    &client,
                    [h(), h(), h()],
                    Epilogue::Plain,
                    shape,
                    (f32_type, 4),
                    false
                )
                .is_err(),
                "{shape:?}"
            );
        }
        // Rows staged for the norm past the shared memory it may take.
        let norm = NormPrologue {
            gain: h(),
            eps: 1e-5,
            residual: None,
        };
        let shape = GemvShape {
            rows: GEMV_MAX_ROWS,
            k: NORM_STAGE_MAX_BYTES / 4 / GEMV_MAX_ROWS + 4,
            n: 8,
        };
        let plain = Epilogue::Plain;
        assert!(launch_normed(&client, [h(), h(), h()], norm, plain, shape, (f32_type, 4), false).is_err());
    }
}
