//! RMSNorm (alone or after its residual add), RoPE and the MLP's `silu(gate) · up` on CUDA in one
//! launch each
//! (`kernels::rms_norm`, `kernels::rope`, `kernels::silu_mul`), installed as the model's
//! [`FusedOps`] with `[cuda] fused_ops = true`; with `fused_kv_write` too, the RoPE of q and k
//! and the K/V write into the pages in one launch (`kernels::qkv_write`), reading q, k and v from
//! the merged projection in place.
//! Each falls back to burn's ops for an input it cannot take (mixed dtypes, a size past 32 bits,
//! a cache buffer shared with another tensor). Generic over the cubecl runtime like the kernels,
//! so that the tests run these hooks on wgpu's Vulkan backend (tests/model_device_kernels.rs).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::cuda_gemm::{self, Cube, GemmKernel, KernelRuntime, StreamAnd};
use super::kernels::qkv_write::{self, QkvStrides, QkvWriteShape};
use super::kernels::{gather, rms_norm, rope, silu_mul, Refused};
use super::llama::{
    self, FusedOps, GateUpActFn, KvWrite, NormProject, NormProjectFn, NormQkvWrite, NormQkvWriteFn, QkvWrite,
    QkvWriteFn, RopeAngles, WeightLayout,
};
use super::output_blocks;
use crate::config::CudaConfig;

/// The rows up to which our GEMV serves the projections (`[cuda] gemv = "gemv"` on `out_in`
/// weights): the batches the fused launches built on it (`[cuda] fused_gate_up`,
/// `fused_norm_gemv`) can take.
pub fn gemv_rows(cuda: &CudaConfig) -> Option<usize> {
    let choice = cuda.gemm_choice();
    let gemv = choice.small == GemmKernel::Gemv && cuda.weight_layout == WeightLayout::OutIn;
    (gemv && choice.small_max_rows > 0)
        .then_some(choice.small_max_rows.min(super::kernels::gemv::GEMV_MAX_ROWS))
}

/// The server's fused operations on [`Cube`], as `cuda` asks: the fused RoPE and K/V write
/// (`fused_kv_write`), and at the batches the GEMV serves ([`gemv_rows`]) the MLP's gate/up GEMV
/// and activation in one launch (`fused_gate_up`) and the norms inside the GEMVs after them
/// (`fused_norm_gemv`; with `fused_kv_write`, the attention's norm, q/k/v GEMV, RoPE and K/V
/// write are then one launch).
pub fn fused_ops<R: KernelRuntime>(cuda: &CudaConfig) -> FusedOps<Cube<R>> {
    let gemv_rows = gemv_rows(cuda);
    let swiglu_rows = gemv_rows.filter(|_| cuda.fused_gate_up);
    let norm_rows = gemv_rows.filter(|_| cuda.fused_norm_gemv);
    let kv_write = cuda.fused_kv_write;
    let warned = Arc::new(AtomicBool::new(false));
    let warn = move |what: &str, e: Refused| {
        if !warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, what, "a fused kernel refused its input: burn's ops run it");
        }
    };
    let (warn_norm, warn_add_norm) = (warn.clone(), warn.clone());
    let (warn_rope, warn_write, warn_act) = (warn.clone(), warn.clone(), warn.clone());
    let (warn_norm_gemv, warn_norm_qkv, warn_embed) = (warn.clone(), warn.clone(), warn.clone());
    let norm_qkv_write: Option<NormQkvWriteFn<Cube<R>>> = norm_rows.filter(|_| kv_write).map(|max_rows| {
        Arc::new(move |a: NormQkvWrite<Cube<R>>| {
            if a.input.x.dims()[0] > max_rows {
                return Err(Box::new([a.write.k_cache, a.write.v_cache]));
            }
            cuda_gemm::norm_qkv_write(a).map_err(|refused| {
                let (e, caches) = *refused;
                warn_norm_qkv("norm_qkv_write", Refused(e.to_string()));
                Box::new(caches)
            })
        }) as NormQkvWriteFn<Cube<R>>
    });
    let norm_project: Option<NormProjectFn<Cube<R>>> = norm_rows.map(|max_rows| {
        Arc::new(move |input: NormProject<Cube<R>>| {
            if input.x.dims()[0] > max_rows {
                return None;
            }
            cuda_gemm::norm_gemv(input)
                .map_err(|e| warn_norm_gemv("norm_project", Refused(e.to_string())))
                .ok()
        }) as NormProjectFn<Cube<R>>
    });
    let gate_up_act: Option<GateUpActFn<Cube<R>>> = swiglu_rows.map(|max_rows| {
        Arc::new(move |h: Tensor<Cube<R>, 2>, w: Tensor<Cube<R>, 2>| {
            if h.dims()[0] > max_rows {
                return None;
            }
            cuda_gemm::swiglu_gemv(h, w)
                .map_err(|e| warn_act("gate_up_act", Refused(e.to_string())))
                .ok()
        }) as GateUpActFn<Cube<R>>
    });
    let qkv_write: Option<QkvWriteFn<Cube<R>>> = kv_write.then(|| {
        Arc::new(move |a: QkvWrite<Cube<R>>| {
            launch_qkv_write(a).unwrap_or_else(|refused| {
                let (e, a) = *refused;
                warn_write("qkv_write", e);
                llama::rope_qk_and_write_kv(a)
            })
        }) as QkvWriteFn<Cube<R>>
    });
    FusedOps {
        rms_norm: Arc::new(move |x: Tensor<Cube<R>, 2>, w: Tensor<Cube<R>, 1>, eps: f64| {
            launch_rms_norm(x, w, eps).unwrap_or_else(|refused| {
                let (e, (x, w)) = *refused;
                warn_norm("rms_norm", e);
                llama::rms_norm(x, w, eps)
            })
        }),
        add_rms_norm: Arc::new(
            move |x: Tensor<Cube<R>, 2>, delta: Tensor<Cube<R>, 2>, w: Tensor<Cube<R>, 1>, eps: f64| {
                launch_add_rms_norm(x, delta, w, eps).unwrap_or_else(|refused| {
                    let (e, (x, delta, w)) = *refused;
                    warn_add_norm("add_rms_norm", e);
                    llama::add_rms_norm(x, delta, w, eps)
                })
            },
        ),
        silu_mul: Arc::new(move |gate_up: Tensor<Cube<R>, 2>| {
            launch_silu_mul(gate_up).unwrap_or_else(|refused| {
                let (e, gate_up) = *refused;
                warn("silu_mul", e);
                llama::silu_mul_halves(gate_up)
            })
        }),
        gate_up_act,
        norm_project,
        norm_qkv_write,
        rope: Arc::new(
            move |x: Tensor<Cube<R>, 3>, cos: Tensor<Cube<R>, 3>, sin: Tensor<Cube<R>, 3>| {
                launch_rope(x, cos, sin).unwrap_or_else(|refused| {
                    let (e, (x, cos, sin)) = *refused;
                    warn_rope("rope", e);
                    llama::rotate_half_rope(x, &cos, &sin)
                })
            },
        ),
        qkv_write,
        embed: Some(Arc::new(
            move |table: Tensor<Cube<R>, 2>, ids: Tensor<Cube<R>, 1, Int>| {
                launch_gather(table, ids).unwrap_or_else(|refused| {
                    let (e, (table, ids)) = *refused;
                    warn_embed("embed", e);
                    table.select(0, ids)
                })
            },
        )),
    }
}

fn primitive<R: CubeRuntime, const D: usize>(t: Tensor<Cube<R>, D>, site: &'static str) -> CubeTensor<R> {
    contiguous(t.into_primitive().tensor(), site)
}

/// `t`, made contiguous. A copy launches a `CopyKernel` over the whole tensor; the first at each
/// `site` is logged with its shape and strides, so that the copies cubecl's profiler counts in a
/// decode step (one per layer, not yet attributed: docs/Performance.md) can be traced to where
/// they come from.
pub(crate) fn contiguous<R: CubeRuntime>(t: CubeTensor<R>, site: &'static str) -> CubeTensor<R> {
    // Returned as it is rather than through `into_contiguous`, which checks again and moves the
    // tensor in and out: most inputs are contiguous, and this runs some 40 times a decode step.
    if t.is_contiguous() {
        return t;
    }
    static REPORTED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    if REPORTED.lock().is_ok_and(|mut sites| sites.insert(site)) {
        tracing::info!(
            site,
            shape = ?t.meta.shape(),
            strides = ?t.meta.strides(),
            "a CUDA kernel's input is copied to be contiguous (logged once per site)"
        );
    }
    into_contiguous(t)
}

/// The step's RoPE as our kernels read it: the model's tables (`[table_rows, head_dim]`) and each
/// row's position (`[rows]`, 32-bit), all contiguous.
pub(crate) struct RopeTables<R: CubeRuntime> {
    pub cos: CubeTensor<R>,
    pub sin: CubeTensor<R>,
    pub positions: CubeTensor<R>,
    pub table_rows: usize,
}

/// [`RopeTables::of`]'s answer for one `(rows, head_dim, dtype)`, kept with the step's angles.
struct PreparedRope<R: CubeRuntime> {
    asked: (usize, usize, DType),
    tables: Result<Arc<RopeTables<R>>, Refused>,
}

impl<R: CubeRuntime> RopeTables<R> {
    /// Refuses tables not of `dtype` or not `head_dim` wide, and positions not one per row of
    /// 32 bits (the tables' length bounds them: the model takes no longer context). Made once per
    /// step and shared by its layers (`RopeAngles::prepared`), which all ask the same.
    pub fn of(
        rope: &RopeAngles<Cube<R>>,
        rows: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Arc<Self>, Refused> {
        let asked = (rows, head_dim, dtype);
        let prepare = || PreparedRope {
            asked,
            tables: Self::check(rope, rows, head_dim, dtype).map(Arc::new),
        };
        let prepared = rope.prepared(prepare);
        match prepared.asked == asked {
            true => prepared.tables.clone(),
            false => prepare().tables,
        }
    }

    fn check(
        rope: &RopeAngles<Cube<R>>,
        rows: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Self, Refused> {
        let (cos, sin) = (
            contiguous(rope.cos_table.clone().into_primitive().tensor(), "rope cos table"),
            contiguous(rope.sin_table.clone().into_primitive().tensor(), "rope sin table"),
        );
        let positions = contiguous(rope.positions.clone().into_primitive(), "rope positions");
        if cos.dtype != dtype || sin.dtype != dtype {
            return Err(Refused(format!(
                "RoPE tables of {:?} for {dtype:?} rows",
                cos.dtype
            )));
        }
        let table = cos.meta.shape();
        if table.len() != 2 || table[1] != head_dim || sin.meta.shape()[..] != table[..] {
            return Err(Refused(format!(
                "RoPE tables {table:?} for a head_dim of {head_dim}"
            )));
        }
        let table_rows = table[0];
        if positions.meta.shape()[..] != [rows] || positions.dtype != DType::I32 {
            return Err(Refused(format!(
                "positions {:?} of {:?} for {rows} rows",
                positions.meta.shape(),
                positions.dtype
            )));
        }
        Ok(Self {
            cos,
            sin,
            positions,
            table_rows,
        })
    }
}

fn same_dtype<R: CubeRuntime>(a: &CubeTensor<R>, b: &CubeTensor<R>) -> Result<(), Refused> {
    match a.dtype == b.dtype {
        true => Ok(()),
        false => Err(Refused(format!("mixed dtypes {:?} and {:?}", a.dtype, b.dtype))),
    }
}

/// A fused launch's refusal, with its inputs (made contiguous) handed back for burn's ops: no
/// call keeps copies of its inputs against a refusal.
type Refusal<T> = Box<(Refused, T)>;

fn float<R: CubeRuntime, const D: usize>(t: CubeTensor<R>) -> Tensor<Cube<R>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

type NormInputs<R> = (Tensor<Cube<R>, 2>, Tensor<Cube<R>, 1>);

fn launch_rms_norm<R: CubeRuntime>(
    x: Tensor<Cube<R>, 2>,
    w: Tensor<Cube<R>, 1>,
    eps: f64,
) -> Result<Tensor<Cube<R>, 2>, Refusal<NormInputs<R>>> {
    let [rows, width] = x.dims();
    let (x, w) = (primitive(x, "rms_norm x"), primitive(w, "rms_norm weight"));
    let launched = same_dtype(&x, &w).and_then(|()| {
        let out = output_blocks::empty(&x.client, &x.device, [rows, width].into(), x.dtype);
        let handles = [x.handle.clone(), w.handle.clone(), out.handle.clone()];
        rms_norm::launch(&x.client, handles, (rows, width), eps as f32, x.dtype.into())?;
        Ok(out)
    });
    launched
        .map(float)
        .map_err(|e| Box::new((e, (float(x), float(w)))))
}

type AddNormInputs<R> = (Tensor<Cube<R>, 2>, Tensor<Cube<R>, 2>, Tensor<Cube<R>, 1>);

/// `(x + delta, rms_norm(x + delta))` in one launch.
fn launch_add_rms_norm<R: CubeRuntime>(
    x: Tensor<Cube<R>, 2>,
    delta: Tensor<Cube<R>, 2>,
    w: Tensor<Cube<R>, 1>,
    eps: f64,
) -> Result<StreamAnd<R>, Refusal<AddNormInputs<R>>> {
    let dims = x.dims();
    if delta.dims() != dims {
        let e = Refused(format!("x {dims:?} + delta {:?}", delta.dims()));
        return Err(Box::new((e, (x, delta, w))));
    }
    let [rows, width] = dims;
    let (x, delta, w) = (
        primitive(x, "add_rms_norm x"),
        primitive(delta, "add_rms_norm delta"),
        primitive(w, "add_rms_norm weight"),
    );
    let launched = same_dtype(&x, &delta)
        .and_then(|()| same_dtype(&x, &w))
        .and_then(|()| {
            let empty = || output_blocks::empty(&x.client, &x.device, dims.into(), x.dtype);
            let (sum, out) = (empty(), empty());
            let handles = [
                x.handle.clone(),
                delta.handle.clone(),
                w.handle.clone(),
                sum.handle.clone(),
                out.handle.clone(),
            ];
            rms_norm::launch_add(&x.client, handles, (rows, width), eps as f32, x.dtype.into())?;
            Ok((float(sum), float(out)))
        });
    launched.map_err(|e| Box::new((e, (float(x), float(delta), float(w)))))
}

fn launch_silu_mul<R: CubeRuntime>(
    gate_up: Tensor<Cube<R>, 2>,
) -> Result<Tensor<Cube<R>, 2>, Refusal<Tensor<Cube<R>, 2>>> {
    let [rows, both] = gate_up.dims();
    if both % 2 != 0 {
        return Err(Box::new((
            Refused(format!("gate and up of {both} columns")),
            gate_up,
        )));
    }
    let gate_up = primitive(gate_up, "silu_mul gate_up");
    let out = output_blocks::empty(
        &gate_up.client,
        &gate_up.device,
        [rows, both / 2].into(),
        gate_up.dtype,
    );
    let handles = [gate_up.handle.clone(), out.handle.clone()];
    match silu_mul::launch(&gate_up.client, handles, (rows, both / 2), gate_up.dtype.into()) {
        Ok(()) => Ok(float(out)),
        Err(e) => Err(Box::new((e, float(gate_up)))),
    }
}

type GatherInputs<R> = (Tensor<Cube<R>, 2>, Tensor<Cube<R>, 1, Int>);

/// The embedding's rows of `ids` (`table.select(0, ids)`) by `kernels::gather`.
fn launch_gather<R: CubeRuntime>(
    table: Tensor<Cube<R>, 2>,
    ids: Tensor<Cube<R>, 1, Int>,
) -> Result<Tensor<Cube<R>, 2>, Refusal<GatherInputs<R>>> {
    let ([table_rows, width], [rows]) = (table.dims(), ids.dims());
    let (table, ids) = (
        primitive(table, "embedding table"),
        contiguous(ids.into_primitive(), "embedding ids"),
    );
    let launched = match ids.dtype.size() {
        4 => {
            let out = output_blocks::empty(&table.client, &table.device, [rows, width].into(), table.dtype);
            let handles = [table.handle.clone(), ids.handle.clone(), out.handle.clone()];
            let shape = gather::GatherShape {
                rows,
                width,
                table_rows,
            };
            gather::launch(
                &table.client,
                handles,
                shape,
                (table.dtype.into(), table.dtype.size()),
            )
            .map(|()| out)
        }
        _ => Err(Refused(format!("token ids of {:?}", ids.dtype))),
    };
    launched
        .map(float)
        .map_err(|e| Box::new((e, (float(table), Tensor::from_primitive(ids)))))
}

type RopeInputs<R> = (Tensor<Cube<R>, 3>, Tensor<Cube<R>, 3>, Tensor<Cube<R>, 3>);

fn launch_rope<R: CubeRuntime>(
    x: Tensor<Cube<R>, 3>,
    cos: Tensor<Cube<R>, 3>,
    sin: Tensor<Cube<R>, 3>,
) -> Result<Tensor<Cube<R>, 3>, Refusal<RopeInputs<R>>> {
    let dims = x.dims();
    let [tokens, heads, head_dim] = dims;
    if cos.dims() != [tokens, 1, head_dim] || sin.dims() != [tokens, 1, head_dim] {
        let e = Refused(format!("x {dims:?}, cos {:?}, sin {:?}", cos.dims(), sin.dims()));
        return Err(Box::new((e, (x, cos, sin))));
    }
    let (x, cos, sin) = (
        primitive(x, "rope x"),
        primitive(cos, "rope cos"),
        primitive(sin, "rope sin"),
    );
    let launched = same_dtype(&x, &cos)
        .and_then(|()| same_dtype(&x, &sin))
        .and_then(|()| {
            let out = output_blocks::empty(&x.client, &x.device, dims.into(), x.dtype);
            let handles = [
                x.handle.clone(),
                cos.handle.clone(),
                sin.handle.clone(),
                out.handle.clone(),
            ];
            rope::launch(&x.client, handles, (tokens, heads, head_dim), x.dtype.into())?;
            Ok(out)
        });
    launched
        .map(float)
        .map_err(|e| Box::new((e, (float(x), float(cos), float(sin)))))
}

/// The queries after RoPE and the layer's K and V caches after the write.
type RopedQAndCaches<R> = (Tensor<Cube<R>, 3>, Tensor<Cube<R>, 2>, Tensor<Cube<R>, 2>);

/// `t`, and the stride between its rows: `t` itself when its elements are contiguous within each
/// row (a column view of a merged projection is), else a contiguous copy.
fn row_strided<R: CubeRuntime>(t: CubeTensor<R>) -> (CubeTensor<R>, usize) {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    if shape.len() == 2 && (strides[1] == 1 || shape[1] == 1) && (strides[0] >= shape[1] || shape[0] == 1) {
        let stride = strides[0].max(shape[1]);
        return (t, stride);
    }
    let t = contiguous(t, "qkv_write q/k/v rows");
    let stride = t.meta.shape()[1];
    (t, stride)
}

/// The fused RoPE of q and k and K/V write, in place on the layer's caches. A refusal hands the
/// write back intact, for burn's ops to run.
#[allow(clippy::type_complexity)]
fn launch_qkv_write<R: CubeRuntime>(
    a: QkvWrite<Cube<R>>,
) -> Result<RopedQAndCaches<R>, Refusal<QkvWrite<Cube<R>>>> {
    let QkvWrite { q, k, v, write: w } = a;
    let (heads, kv_heads) = (w.heads, w.kv_heads);
    let [tokens, q_dim] = q.dims();
    let [cache_slots, kv_dim] = w.k_cache.dims();
    let head_dim = q_dim / heads.max(1);
    let float2 = |t: Tensor<Cube<R>, 2>| row_strided(t.into_primitive().tensor());
    let ((q, q_stride), (k, k_stride), (v, v_stride)) = (float2(q), float2(k), float2(v));
    let rope = RopeTables::of(&w.rope, tokens, head_dim, q.dtype);
    let slots = contiguous(w.slots.into_primitive(), "qkv_write slots");
    let (k_cache, v_cache) = (
        w.k_cache.into_primitive().tensor(),
        w.v_cache.into_primitive().tensor(),
    );
    let check = || -> Result<&Arc<RopeTables<R>>, Refused> {
        let rope = rope.as_ref().map_err(|e| e.clone())?;
        for t in [&k, &v, &k_cache, &v_cache] {
            same_dtype(&q, t)?;
        }
        let widths = [q.meta.shape(), k.meta.shape(), v.meta.shape()];
        if heads * head_dim != q_dim
            || kv_dim != kv_heads * head_dim
            || widths[0][..] != [tokens, q_dim]
            || widths[1][..] != [tokens, kv_dim]
            || widths[2][..] != [tokens, kv_dim]
        {
            return Err(Refused(format!(
                "q, k, v {widths:?} for {heads} and {kv_heads} heads, cache width {kv_dim}"
            )));
        }
        if slots.meta.shape()[0] != tokens {
            return Err(Refused(format!("slots {:?}", slots.meta.shape())));
        }
        if slots.dtype != DType::I32 {
            return Err(Refused("slots are not 32-bit".into()));
        }
        // Written in place: no other tensor may see these buffers change.
        if !k_cache.can_mut() || !v_cache.can_mut() || !k_cache.is_contiguous() || !v_cache.is_contiguous() {
            return Err(Refused("the cache buffers are shared or padded".into()));
        }
        Ok(rope)
    };
    let launched = check().and_then(|rope| {
        let q_out = output_blocks::empty(&q.client, &q.device, [tokens, heads, head_dim].into(), q.dtype);
        let handles = [
            q.handle.clone(),
            k.handle.clone(),
            v.handle.clone(),
            rope.cos.handle.clone(),
            rope.sin.handle.clone(),
            rope.positions.handle.clone(),
            slots.handle.clone(),
            q_out.handle.clone(),
            k_cache.handle.clone(),
            v_cache.handle.clone(),
        ];
        let shape = QkvWriteShape {
            tokens,
            heads,
            kv_heads,
            head_dim,
            cache_slots,
            positions: rope.table_rows,
        };
        let strides = QkvStrides {
            q: q_stride,
            k: k_stride,
            v: v_stride,
        };
        qkv_write::launch(&q.client, handles, shape, strides, q.dtype.into())?;
        Ok(q_out)
    });
    match launched {
        Ok(q_out) => Ok((float(q_out), float(k_cache), float(v_cache))),
        Err(e) => Err(Box::new((
            e,
            KvWrite {
                heads,
                kv_heads,
                rope: w.rope,
                slots: Tensor::from_primitive(slots),
                k_cache: float(k_cache),
                v_cache: float(v_cache),
            }
            .with_rows([float(q), float(k), float(v)]),
        ))),
    }
}
