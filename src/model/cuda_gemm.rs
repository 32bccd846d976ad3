//! The projections' GEMMs on CUDA by a kernel we choose, instead of burn's one default.
//!
//! Without autotune (compiled out: it cost 20-30 s of NVRTC per shape), burn's `matmul` always
//! launches cubek's tensor-core tiling kernel. On the H100 that kernel moved decode-shaped
//! weights at about 250 GB/s, against 1.5-2.3 TB/s for cuBLAS in the same call: the step's
//! projections took 22 of its 26 ms. cubek also has GEMV kernels (vector-matrix, plane-parallel,
//! unit-perpendicular) that autotune would have tried, and cuBLAS is reachable through `cudarc`
//! on burn's own buffers. `benches/device_check.rs gemm` times every kernel here on the model's
//! shapes; serving takes the one `[cuda] gemm` / `[cuda] gemv` name (see the AdminGuide).
//!
//! cuBLAS cannot run on cubecl's streams (they are private to its device thread), so a cuBLAS
//! GEMM waits for the queued kernels, runs on the context's default stream and waits for itself:
//! two host synchronisations per call (`cublas`). The benchmark's timings include them.
//! `cublas-ordered` orders the same GEMM on a stream of its own by flags in device memory instead
//! (`kernels::stream_order`), so that the host never waits.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use super::cuda_fused::{contiguous, RopeTables};
use burn::prelude::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::matmul::init_matmul_output;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::cuda::CudaRuntime;
use cubek::matmul::components::tile::TileMatmulKind;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::Strategy;
use cubek::matmul::routines::double_unit::DoubleUnitSelectionArgs;
use cubek::matmul::routines::simple::SimpleArgs;
use cubek::matmul::routines::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::routines::{BlueprintStrategy, TileSizeSelection};
use cubek::std::InputBinding;

use super::kernels::gemv::{self, Epilogue, GemvShape, NormPrologue, RopeWrite};
use super::kernels::skinny_gemm::{self, SkinnyShape};
use super::kernels::stream_order;
use super::llama::{KvWrite, NormProject, NormQkvWrite, NormQkvWritten};
use super::output_blocks;
use super::ProjectFn;

/// burn's backend on the cubecl runtime `R`, without the fusion layer that `burn::backend::Cuda`
/// adds. Kernels other than burn's own are launched on its tensors directly, so serving with one
/// of them runs on this backend.
pub type Cube<R> = burn_cubecl::CubeBackend<R, f32, i32, u8>;

/// [`Cube`] on CUDA: what the server runs our kernels on.
pub type CudaCube = Cube<CudaRuntime>;

/// A cubecl runtime our kernels serve on. Every kernel here is generic over the runtime, so that
/// the tests run the CUDA server's kernels on wgpu (Vulkan over Mesa's lavapipe, a CPU driver);
/// only cuBLAS is CUDA's own.
pub trait KernelRuntime: CubeRuntime {
    /// `x · w` by cuBLAS (`kernel` is `Cublas` or `CublasOrdered`); a runtime without it refuses.
    fn cublas(
        kernel: GemmKernel,
        x: CubeTensor<Self>,
        w: CubeTensor<Self>,
    ) -> Result<CubeTensor<Self>, GemmError>;
}

impl KernelRuntime for CudaRuntime {
    fn cublas(
        kernel: GemmKernel,
        x: CubeTensor<Self>,
        w: CubeTensor<Self>,
    ) -> Result<CubeTensor<Self>, GemmError> {
        let ordering = match kernel {
            GemmKernel::CublasOrdered => Ordering::DeviceFlags,
            _ => Ordering::HostSync,
        };
        cublas_matmul(x, w, ordering)
    }
}

impl KernelRuntime for cubecl_wgpu::WgpuRuntime {
    fn cublas(
        kernel: GemmKernel,
        _: CubeTensor<Self>,
        _: CubeTensor<Self>,
    ) -> Result<CubeTensor<Self>, GemmError> {
        Err(GemmError::Unavailable {
            kernel,
            why: "cuBLAS runs on CUDA only".into(),
        })
    }
}

/// A kernel for `x [m, k] · w [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GemmKernel {
    /// burn's `matmul` (cubek's default, a tensor-core tiling kernel).
    Burn,
    /// cubek's tiling kernel on CMMA tiles (what `Burn` picks, named for comparison).
    Cmma,
    /// cubek's tiling kernel on PTX `mma` tiles.
    Mma,
    /// cubek's unit (no tensor core) tiling kernel, largest tile.
    Unit,
    /// As `Unit`, double-buffered.
    DoubleUnit,
    /// cubek's vector-matrix inner-product kernel.
    #[serde(rename = "vecmat")]
    VecMat,
    /// As `VecMat`, double-buffered.
    #[serde(rename = "double-vecmat")]
    DoubleVecMat,
    /// cubek's GEMV, a plane (warp) per output.
    GemvPlane,
    /// cubek's GEMV, a unit per output.
    GemvUnit,
    /// cuBLAS `GemmEx` through cudarc, with a host synchronisation before and after.
    Cublas,
    /// cuBLAS `GemmEx` on a stream of its own, ordered with cubecl's by device-memory flags
    /// (`kernels::stream_order`): no host synchronisation.
    CublasOrdered,
    /// Our GEMV (`kernels::gemv`): a plane per output, up to `GEMV_MAX_ROWS` rows, weights
    /// `[n, k]` only (`weight_layout = "out_in"`).
    Gemv,
    /// Our tensor-core GEMM for 9-128 rows (`kernels::skinny_gemm`), on cubecl's stream, so the
    /// host never waits; f16/bf16 weights `[n, k]` only (`weight_layout = "out_in"`).
    Skinny,
}

impl GemmKernel {
    /// Known-good kernels first: a benchmark that walks this list measures them even if a
    /// later kernel leaves the device in an error state.
    pub const ALL: [GemmKernel; 13] = [
        GemmKernel::Burn,
        GemmKernel::Cublas,
        GemmKernel::Gemv,
        GemmKernel::Skinny,
        GemmKernel::CublasOrdered,
        GemmKernel::Cmma,
        GemmKernel::Mma,
        GemmKernel::Unit,
        GemmKernel::DoubleUnit,
        GemmKernel::VecMat,
        GemmKernel::DoubleVecMat,
        GemmKernel::GemvPlane,
        GemmKernel::GemvUnit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::Burn => "burn",
            GemmKernel::Cmma => "cmma",
            GemmKernel::Mma => "mma",
            GemmKernel::Unit => "unit",
            GemmKernel::DoubleUnit => "double-unit",
            GemmKernel::VecMat => "vecmat",
            GemmKernel::DoubleVecMat => "double-vecmat",
            GemmKernel::GemvPlane => "gemv-plane",
            GemmKernel::GemvUnit => "gemv-unit",
            GemmKernel::Cublas => "cublas",
            GemmKernel::CublasOrdered => "cublas-ordered",
            GemmKernel::Gemv => "gemv",
            GemmKernel::Skinny => "skinny",
        }
    }

    /// The cubek strategy; `None` for burn's own path, cuBLAS and our GEMV.
    fn strategy(self) -> Option<Strategy> {
        let tiling = |tile_matmul| {
            BlueprintStrategy::Inferred(SimpleArgs {
                multi_rows: false,
                tile_matmul,
            })
        };
        let tile_size = TileSizeSelection::MaxTileSize;
        Some(match self {
            GemmKernel::Burn
            | GemmKernel::Cublas
            | GemmKernel::CublasOrdered
            | GemmKernel::Gemv
            | GemmKernel::Skinny => return None,
            GemmKernel::Cmma => Strategy::SimpleCyclicCmma(tiling(TileMatmulKind::Cmma)),
            GemmKernel::Mma => Strategy::SimpleCyclicMma(tiling(TileMatmulKind::Mma)),
            GemmKernel::Unit => {
                Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs { tile_size }))
            }
            GemmKernel::DoubleUnit => {
                Strategy::DoubleUnit(BlueprintStrategy::Inferred(DoubleUnitSelectionArgs { tile_size }))
            }
            GemmKernel::VecMat => Strategy::SimpleVecMat(BlueprintStrategy::Inferred(().into())),
            GemmKernel::DoubleVecMat => Strategy::DoubleVecMat(BlueprintStrategy::Inferred(().into())),
            GemmKernel::GemvPlane => {
                Strategy::GemvPlaneParallel(BlueprintStrategy::Inferred(Default::default()))
            }
            GemmKernel::GemvUnit => {
                Strategy::GemvUnitPerpendicular(BlueprintStrategy::Inferred(Default::default()))
            }
        })
    }
}

impl fmt::Display for GemmKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown GEMM kernel `{0}` (one of: burn, cmma, mma, unit, double-unit, vecmat, double-vecmat, gemv-plane, gemv-unit, cublas, cublas-ordered, gemv, skinny)")]
pub struct UnknownGemmKernel(pub String);

impl FromStr for GemmKernel {
    type Err = UnknownGemmKernel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GemmKernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownGemmKernel(s.to_string()))
    }
}

/// A GEMM that could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GemmError {
    /// cubek refused the problem for this kernel (layout, size or hardware).
    #[error("{kernel} cannot run this problem: {why}")]
    Unavailable { kernel: GemmKernel, why: String },
    #[error("cuBLAS: {0}")]
    Cublas(String),
    /// No problem can run on cuBLAS in this process.
    #[error("libcublas was not found (install the CUDA runtime libraries or set LD_LIBRARY_PATH)")]
    CublasMissing,
    /// The launch panicked (cubek checks some problems with assertions, NVRTC may fail to
    /// compile a kernel); nothing was queued after the panic.
    #[error("{kernel} panicked: {why}")]
    Panicked { kernel: GemmKernel, why: String },
}

/// Which kernel the projections use: `small` for at most `small_max_rows` rows (decode-sized),
/// `large` above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmChoice {
    pub small: GemmKernel,
    pub large: GemmKernel,
    pub small_max_rows: usize,
}

impl GemmChoice {
    /// Whether every projection goes through burn's own `matmul`, so the fused backend can serve.
    pub fn is_burn_only(&self) -> bool {
        self.small == GemmKernel::Burn && self.large == GemmKernel::Burn
    }

    pub fn kernel_for(&self, rows: usize) -> GemmKernel {
        if rows <= self.small_max_rows {
            self.small
        } else {
            self.large
        }
    }
}

/// A residual stream `x + delta` and what a launch computed from it (its norm, or a product of
/// its norm).
pub type StreamAnd<R> = (Tensor<Cube<R>, 2>, Tensor<Cube<R>, 2>);

/// A kernel and the `(rows, k, n)` it was asked to run; `(kernel, 0, 0, 0)` stands for every
/// problem (the kernel cannot run at all).
type Problem = (GemmKernel, usize, usize, usize);

/// The server's projection hook on [`Cube`]: `choice`'s kernel for each call's row count,
/// burn's `matmul` where that kernel cannot run (logged once per kernel and problem), so a
/// choice never fails a step.
pub fn projector<R: KernelRuntime>(choice: GemmChoice) -> ProjectFn<Cube<R>> {
    let refused: Arc<Mutex<HashSet<Problem>>> = Arc::default();
    Arc::new(move |x: Tensor<Cube<R>, 2>, w: Tensor<Cube<R>, 2>| {
        let ([rows, k], n) = (x.dims(), w.dims()[1]);
        let kernel = choice.kernel_for(rows);
        let problem = (kernel, rows, k, n);
        let every = (kernel, 0, 0, 0);
        let is_refused = |r: &HashSet<Problem>| r.contains(&problem) || r.contains(&every);
        if kernel == GemmKernel::Burn || refused.lock().is_ok_and(|r| is_refused(&r)) {
            return x.matmul(w);
        }
        // A refusal hands the operands back, so none is copied against one.
        match matmul_primitives(kernel, x.into_primitive().tensor(), w.into_primitive().tensor()) {
            Ok(out) => float(out),
            Err(back) => {
                let (e, x, w) = *back;
                tracing::warn!(error = %e, rows, k, n, "GEMM kernel refused: burn's matmul runs this problem");
                if let Ok(mut r) = refused.lock() {
                    r.insert(if e == GemmError::CublasMissing {
                        every
                    } else {
                        problem
                    });
                }
                float(x).matmul(float(w))
            }
        }
    })
}

/// `x [m, k] · w [k, n]` on burn's CUDA tensors by `kernel`. `w` may be a transposed view (a
/// weight stored `[n, k]`); every kernel reads it through its strides.
pub fn matmul<R: KernelRuntime>(
    kernel: GemmKernel,
    x: Tensor<Cube<R>, 2>,
    w: Tensor<Cube<R>, 2>,
) -> Result<Tensor<Cube<R>, 2>, GemmError> {
    if kernel == GemmKernel::Burn {
        return Ok(x.matmul(w));
    }
    matmul_primitives(kernel, x.into_primitive().tensor(), w.into_primitive().tensor())
        .map(float)
        .map_err(|back| back.0)
}

/// A kernel's refusal with its operands handed back: `x` (maybe made contiguous) and `w`.
type OperandsBack<R> = Box<(GemmError, CubeTensor<R>, CubeTensor<R>)>;

fn float<R: KernelRuntime>(t: CubeTensor<R>) -> Tensor<Cube<R>, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`matmul`] on burn's primitives, `kernel` not burn's. Our kernels take the operands and hand
/// them back with a refusal (a panic in their launch is one too); cubek's and cuBLAS's run on
/// copies, under `catch_unwind`, since they panic on some shapes.
fn matmul_primitives<R: KernelRuntime>(
    kernel: GemmKernel,
    x: CubeTensor<R>,
    w: CubeTensor<R>,
) -> Result<CubeTensor<R>, OperandsBack<R>> {
    let strategy = match (kernel, kernel.strategy()) {
        (GemmKernel::Gemv, None) => return own_gemv(x, w),
        (GemmKernel::Skinny, None) => return own_skinny(x, w),
        (_, strategy) => strategy,
    };
    let launched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &strategy {
        Some(strategy) => cubek_matmul(kernel, strategy, x.clone(), w.clone()),
        None => R::cublas(kernel, x.clone(), w.clone()),
    }));
    let panicked = |p| GemmError::Panicked {
        kernel,
        why: crate::actors::tp_ranks::panic_message(p),
    };
    match launched.map_err(panicked).and_then(|out| out) {
        Ok(out) => Ok(out),
        Err(e) => Err(Box::new((e, x, w))),
    }
}

fn cubek_matmul<R: KernelRuntime>(
    kernel: GemmKernel,
    strategy: &Strategy,
    x: CubeTensor<R>,
    w: CubeTensor<R>,
) -> Result<CubeTensor<R>, GemmError> {
    let dtype = x.dtype;
    let out = init_matmul_output(&x, &w, dtype);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype.into(),
        rhs: w.dtype.into(),
        out: dtype.into(),
    });
    let client = out.client.clone();
    let (lhs, rhs) = (
        InputBinding::new(x.binding(), dtype.into()),
        InputBinding::new(w.clone().binding(), w.dtype.into()),
    );
    cubek::matmul::launch::launch_ref(strategy, &client, lhs, rhs, out.clone().binding(), &mut dtypes)
        .map_err(|e| GemmError::Unavailable {
            kernel,
            why: format!("{e:?}"),
        })?;
    Ok(out)
}

/// The operands of our own kernels, checked: `x` made contiguous `[m, k]`, `w` the transposed
/// view of a contiguous `[n, k]` weight (`weight_layout = "out_in"`) of `x`'s dtype, starting on
/// `x_align`- and `w_align`-byte boundaries; and an empty contiguous `[m, out_cols]` output.
struct OutInOperands<R: KernelRuntime> {
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    out: CubeTensor<R>,
    m: usize,
    k: usize,
}

impl<R: KernelRuntime> OutInOperands<R> {
    fn check(
        kernel: GemmKernel,
        x: CubeTensor<R>,
        w: CubeTensor<R>,
        [x_align, w_align]: [u64; 2],
        out_cols: usize,
    ) -> Result<OutInOperands<R>, OperandsBack<R>> {
        let x = contiguous(x, "own GEMM x");
        let (m, k) = (x.meta.shape()[0], x.meta.shape()[1]);
        let ws = w.meta.strides();
        let offset = |t: &CubeTensor<R>| t.handle.offset_start.unwrap_or(0);
        let why = if ws[0] != 1 || ws[1] != k {
            Some(format!(
                "weight strides {:?} are not those of an [n, k] weight (weight_layout = \"out_in\")",
                &ws[..]
            ))
        } else if w.dtype != x.dtype {
            Some(format!("mixed dtypes {:?} x {:?}", x.dtype, w.dtype))
        } else if !offset(&x).is_multiple_of(x_align) || !offset(&w).is_multiple_of(w_align) {
            Some(format!(
                "x must start on a {x_align}-byte boundary and the weight on a {w_align}-byte one"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Box::new((GemmError::Unavailable { kernel, why }, x, w)));
        }
        // Contiguous, as the kernels write it (an allocation may pad rows otherwise).
        let out = output_blocks::empty(&x.client, &x.device, [m, out_cols].into(), x.dtype);
        Ok(OutInOperands { x, w, out, m, k })
    }

    /// Queues `launch` on the operands' handles, `[m, k, out_cols]` and dtype; the output. A
    /// refusal or a panic of `launch` hands the operands back.
    fn run(
        self,
        kernel: GemmKernel,
        launch: impl FnOnce(
            &cubecl::prelude::ComputeClient<R>,
            [cubecl::server::Handle; 3],
            [usize; 3],
            (cubecl::ir::StorageType, usize),
        ) -> Result<(), super::kernels::Refused>,
    ) -> Result<CubeTensor<R>, OperandsBack<R>> {
        let handles = [
            self.x.handle.clone(),
            self.w.handle.clone(),
            self.out.handle.clone(),
        ];
        let sizes = [self.m, self.k, self.out.meta.shape()[1]];
        let dtype = self.x.dtype;
        let launched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            launch(&self.out.client, handles, sizes, (dtype.into(), dtype.size()))
        }));
        let refused = match launched {
            Ok(Ok(())) => return Ok(self.out),
            Ok(Err(e)) => GemmError::Unavailable { kernel, why: e.0 },
            Err(p) => GemmError::Panicked {
                kernel,
                why: crate::actors::tp_ranks::panic_message(p),
            },
        };
        Err(Box::new((refused, self.x, self.w)))
    }
}

/// `x · w` by our GEMV: at most `GEMV_MAX_ROWS` rows of `x`, both operands 16-byte aligned.
fn own_gemv<R: KernelRuntime>(x: CubeTensor<R>, w: CubeTensor<R>) -> Result<CubeTensor<R>, OperandsBack<R>> {
    let n = w.meta.shape()[1];
    let ops = OutInOperands::check(GemmKernel::Gemv, x, w, [16, 16], n)?;
    ops.run(GemmKernel::Gemv, |client, handles, [rows, k, n], dtype| {
        gemv::launch(
            client,
            handles,
            Epilogue::Plain,
            GemvShape { rows, k, n },
            dtype,
            true,
        )
    })
}

/// `silu(x · gate) · (x · up)` by our GEMV in one launch (`kernels::gemv::Epilogue::SwiGlu`), `w`
/// the transposed view of the merged `[gate; up]` weight `[2 n, k]`; at most `GEMV_MAX_ROWS`
/// rows of `x`, both 16-byte aligned. Bit for bit the GEMV of `w` and then `silu_mul`.
pub fn swiglu_gemv<R: KernelRuntime>(
    x: Tensor<Cube<R>, 2>,
    w: Tensor<Cube<R>, 2>,
) -> Result<Tensor<Cube<R>, 2>, GemmError> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let merged = w.meta.shape()[1];
    if !merged.is_multiple_of(2) {
        return Err(GemmError::Unavailable {
            kernel: GemmKernel::Gemv,
            why: format!("an odd merged gate/up width {merged}"),
        });
    }
    let ops = OutInOperands::check(GemmKernel::Gemv, x, w, [16, 16], merged / 2).map_err(|back| back.0)?;
    let out = ops
        .run(GemmKernel::Gemv, |client, handles, [rows, k, n], dtype| {
            gemv::launch(
                client,
                handles,
                Epilogue::SwiGlu,
                GemvShape { rows, k, n },
                dtype,
                true,
            )
        })
        .map_err(|back| back.0)?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// `(x + delta, product)` by our GEMV with the RMSNorm of `x + delta` (of `x` without a delta)
/// by `gain` and `eps` as its prologue (`kernels::gemv::launch_normed`): the product with `w`
/// (the transposed view of an `[n, k]` weight), or with `swiglu` the activation of the merged
/// gate/up weight, as [`swiglu_gemv`]. At most `GEMV_MAX_ROWS` rows, every operand 16-byte
/// aligned, the rows staged within `NORM_STAGE_MAX_BYTES`.
pub fn norm_gemv<R: KernelRuntime>(input: NormProject<Cube<R>>) -> Result<StreamAnd<R>, GemmError> {
    let swiglu = input.swiglu;
    let width = input.w.dims()[1];
    if swiglu && !width.is_multiple_of(2) {
        return Err(refused(format!("an odd merged gate/up width {width}")));
    }
    let normed = NormedGemv::check(input, if swiglu { width / 2 } else { width })?;
    let epilogue = if swiglu { Epilogue::SwiGlu } else { Epilogue::Plain };
    let (stream, out) = normed.run(epilogue)?;
    let float = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
    Ok((float(stream), float(out)))
}

/// Why [`norm_qkv_write`] refused its step, and the caches (K, V) it hands back untouched.
pub type QkvWriteRefused<R> = (GemmError, [Tensor<Cube<R>, 2>; 2]);

/// The attention's input in one launch: [`norm_gemv`] of the merged q/k/v weight, then the RoPE
/// of q and k and the write of K and V into their slots of the caches, in place
/// (`kernels::gemv::Epilogue::RopeWrite`). A refusal hands the caches back untouched.
pub fn norm_qkv_write<R: KernelRuntime>(
    a: NormQkvWrite<Cube<R>>,
) -> Result<NormQkvWritten<Cube<R>>, Box<QkvWriteRefused<R>>> {
    let NormQkvWrite { input, write } = a;
    let KvWrite {
        heads,
        kv_heads,
        rope,
        slots,
        k_cache,
        v_cache,
    } = write;
    let [rows, width] = [input.x.dims()[0], input.w.dims()[1]];
    let head_dim = width / (heads + 2 * kv_heads).max(1);
    let [cache_slots, kv_dim] = k_cache.dims();
    let float = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
    let (k_cache, v_cache) = (
        k_cache.into_primitive().tensor(),
        v_cache.into_primitive().tensor(),
    );
    let launched = (|| {
        if head_dim * (heads + 2 * kv_heads) != width || kv_dim != kv_heads * head_dim {
            return Err(refused(format!(
                "a q/k/v width {width} for {heads} and {kv_heads} heads, cache width {kv_dim}"
            )));
        }
        let slots = contiguous(slots.into_primitive(), "norm_qkv_write slots");
        let normed = NormedGemv::check(input, heads * head_dim)?;
        let dtype = normed.ops.x.dtype;
        let rope = RopeTables::of(&rope, rows, head_dim, dtype).map_err(|e| refused(e.0))?;
        for t in [&k_cache, &v_cache] {
            if t.dtype != dtype {
                return Err(refused(format!("mixed dtypes {:?} and {dtype:?}", t.dtype)));
            }
        }
        if slots.meta.shape()[0] != rows || slots.dtype != DType::I32 {
            return Err(refused(format!(
                "slots {:?} of {:?}",
                slots.meta.shape(),
                slots.dtype
            )));
        }
        // Written in place: no other tensor may see these buffers change.
        if !k_cache.can_mut() || !v_cache.can_mut() || !k_cache.is_contiguous() || !v_cache.is_contiguous() {
            return Err(refused("the cache buffers are shared or padded".into()));
        }
        let rope = RopeWrite {
            cos: rope.cos.handle.clone(),
            sin: rope.sin.handle.clone(),
            positions: rope.positions.handle.clone(),
            slots: slots.handle.clone(),
            k_cache: k_cache.handle.clone(),
            v_cache: v_cache.handle.clone(),
            heads,
            kv_heads,
            head_dim,
            cache_slots,
            table_rows: rope.table_rows,
        };
        let (stream, q) = normed.run(Epilogue::RopeWrite(Box::new(rope)))?;
        let q = CubeTensor::new_contiguous(
            q.client,
            q.device,
            [rows, heads, head_dim].into(),
            q.handle,
            q.dtype,
        );
        Ok((stream, q))
    })();
    match launched {
        Ok((x, q)) => Ok(NormQkvWritten {
            x: float(x),
            q: Tensor::from_primitive(TensorPrimitive::Float(q)),
            k_cache: float(k_cache),
            v_cache: float(v_cache),
        }),
        Err(e) => Err(Box::new((e, [float(k_cache), float(v_cache)]))),
    }
}

fn refused(why: String) -> GemmError {
    GemmError::Unavailable {
        kernel: GemmKernel::Gemv,
        why,
    }
}

/// A GEMV's operands with its norm prologue's, checked: what [`norm_gemv`] and
/// [`norm_qkv_write`] share.
struct NormedGemv<R: KernelRuntime> {
    ops: OutInOperands<R>,
    norm: NormPrologue,
    /// The residual stream the launch leaves: `x + delta`'s new buffer, or `x`.
    stream: CubeTensor<R>,
}

impl<R: KernelRuntime> NormedGemv<R> {
    fn check(input: NormProject<Cube<R>>, out_cols: usize) -> Result<NormedGemv<R>, GemmError> {
        let NormProject {
            x,
            delta,
            gain,
            eps,
            w,
            swiglu: _,
        } = input;
        let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
        let ops = OutInOperands::check(GemmKernel::Gemv, x, w, [16, 16], out_cols).map_err(|back| back.0)?;
        let x = &ops.x;
        let operand = |t: CubeTensor<R>, site, dims: &[usize]| {
            let t = contiguous(t, site);
            if t.dtype != x.dtype || t.meta.shape()[..] != *dims {
                return Err(refused(format!(
                    "{site} {:?} {:?} beside x {:?} {:?}",
                    t.dtype,
                    t.meta.shape(),
                    x.dtype,
                    x.meta.shape()
                )));
            }
            if !t.handle.offset_start.unwrap_or(0).is_multiple_of(16) {
                return Err(refused(format!("{site} must start on a 16-byte boundary")));
            }
            Ok(t)
        };
        let dims = x.meta.shape()[..].to_vec();
        let gain = operand(gain.into_primitive().tensor(), "norm gain", &dims[1..])?;
        let (residual, stream) = match delta {
            Some(delta) => {
                let delta = operand(delta.into_primitive().tensor(), "norm delta", &dims)?;
                let sum = output_blocks::empty(&x.client, &x.device, dims.clone().into(), x.dtype);
                (Some([delta.handle.clone(), sum.handle.clone()]), sum)
            }
            None => (None, x.clone()),
        };
        let norm = NormPrologue {
            gain: gain.handle.clone(),
            eps: eps as f32,
            residual,
        };
        Ok(NormedGemv { ops, norm, stream })
    }

    /// Queues the launch; the residual stream and the output.
    fn run(self, epilogue: Epilogue) -> Result<(CubeTensor<R>, CubeTensor<R>), GemmError> {
        let NormedGemv { ops, norm, stream } = self;
        let out = ops
            .run(GemmKernel::Gemv, |client, handles, [rows, k, n], dtype| {
                gemv::launch_normed(
                    client,
                    handles,
                    norm,
                    epilogue,
                    GemvShape { rows, k, n },
                    dtype,
                    true,
                )
            })
            .map_err(|back| back.0)?;
        Ok((stream, out))
    }
}

/// `x · w` by our tensor-core GEMM: 1 to `SKINNY_MAX_ROWS` rows of f16/bf16, `k` and `n`
/// multiples of 16, the weight 32-byte aligned (CMMA's loads; `x` is staged element by
/// element). Larger products (prompt chunks) go to cuBLAS, whose two host waits are small
/// beside such a GEMM.
fn own_skinny<R: KernelRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
) -> Result<CubeTensor<R>, OperandsBack<R>> {
    if x.meta.shape()[0] > skinny_gemm::SKINNY_MAX_ROWS {
        return matmul_primitives(GemmKernel::Cublas, x, w);
    }
    if !matches!(x.dtype, DType::F16 | DType::BF16) {
        let why = format!("no tensor-core GEMM for {:?}", x.dtype);
        return Err(Box::new((
            GemmError::Unavailable {
                kernel: GemmKernel::Skinny,
                why,
            },
            x,
            w,
        )));
    }
    let n = w.meta.shape()[1];
    let ops = OutInOperands::check(GemmKernel::Skinny, x, w, [2, 32], n)?;
    ops.run(GemmKernel::Skinny, |client, handles, [rows, k, n], dtype| {
        skinny_gemm::launch(client, handles, SkinnyShape { rows, k, n }, dtype, true)
    })
}

/// The cuBLAS data type of a burn float type.
fn cuda_data_type(dtype: DType) -> Result<cudarc::cublas::sys::cudaDataType, GemmError> {
    use cudarc::cublas::sys::cudaDataType::*;
    match dtype {
        DType::F32 => Ok(CUDA_R_32F),
        DType::F16 => Ok(CUDA_R_16F),
        DType::BF16 => Ok(CUDA_R_16BF),
        other => Err(GemmError::Cublas(format!("no cuBLAS GEMM for {other:?}"))),
    }
}

/// How a cuBLAS GEMM is ordered with cubecl's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ordering {
    /// The host waits for cubecl's queue, runs the GEMM on the context's default stream and waits
    /// for it.
    HostSync,
    /// cubecl signals a flag that cuBLAS's own stream waits for, and holds its stream until
    /// cuBLAS's stream sets another one (`kernels::stream_order`); the host never waits.
    DeviceFlags,
}

/// `Ordering::DeviceFlags`' state: cuBLAS's own non-blocking stream, a handle bound to it, and
/// the flags `[cubecl → cuBLAS, cuBLAS → cubecl, polls left]` in cubecl's memory.
struct OrderedStream {
    handle: cudarc::cublas::sys::cublasHandle_t,
    stream: cudarc::driver::sys::CUstream,
    flags: cubecl::server::Handle,
    flags_ptr: u64,
    /// The last value signalled; each GEMM uses the next (never 0, the flags' initial value).
    seq: u32,
    side: FlagOps,
}

/// How the ordered stream waits for cubecl's flag and sets its own.
enum FlagOps {
    /// The driver's stream memory operations (`cuStreamWaitValue32`, `cuStreamWriteValue32`):
    /// no kernel and no SM held while waiting.
    MemOps,
    /// One-thread kernels of our own on the ordered stream, compiled by NVRTC, where the driver
    /// refuses memory operations on cubecl's buffer (cubecl allocates from a stream-ordered
    /// pool): the first H100 run of `cublas-ordered` got `CUDA_ERROR_INVALID_VALUE`.
    Kernels {
        wait: cudarc::driver::sys::CUfunction,
        set: cudarc::driver::sys::CUfunction,
    },
}

/// The ordered stream's side of [`FlagOps::Kernels`]: `wait_flag` polls as cubecl's
/// `stream_order` wait kernel does (volatile loads go through the L2), `set_flag` stores after
/// the GEMM before it on the stream has finished.
const FLAG_KERNELS: &str = r#"
extern "C" __global__ void wait_flag(volatile unsigned int *flag, unsigned int value, unsigned int max_polls) {
    for (unsigned int left = max_polls; left > 0 && *flag != value; left--) {
    }
}
extern "C" __global__ void set_flag(volatile unsigned int *flag, unsigned int value) {
    __threadfence_system();
    *flag = value;
    __threadfence_system();
}
"#;

impl FlagOps {
    /// Memory operations if the driver takes them on `flags_ptr` (probed with a wait that holds
    /// at once, then a write of the same value), else the kernels.
    fn choose(stream: cudarc::driver::sys::CUstream, flags_ptr: u64) -> Result<Self, GemmError> {
        let report = flags_ptr + 8;
        // SAFETY: `report` is the third flag, zero since cubecl's queue (which wrote it) was
        // synchronised; the wait holds at once and the write stores what is there.
        let probe = unsafe {
            wait_value(stream, report, 0)
                .and_then(|()| write_value(stream, report, 0))
                .and_then(|()| cudarc::driver::result::stream::synchronize(stream))
        };
        let Err(refused) = probe else {
            return Ok(Self::MemOps);
        };
        tracing::info!(error = ?refused, "cublas-ordered: the driver refuses stream memory operations on cubecl's buffers; ordering by kernels");
        let ptx = cudarc::nvrtc::compile_ptx(FLAG_KERNELS)
            .map_err(|e| GemmError::Cublas(format!("compiling the flag kernels: {e:?}")))?;
        let image = std::ffi::CString::new(ptx.to_src())
            .map_err(|e| GemmError::Cublas(format!("flag kernels' PTX: {e}")))?;
        let function = |module, name: &str| {
            let name = std::ffi::CString::new(name).expect("no NUL in a kernel name");
            // SAFETY: `module` was just loaded and is never unloaded.
            unsafe { cudarc::driver::result::module::get_function(module, name) }
                .map_err(|e| GemmError::Cublas(format!("flag kernel: {e:?}")))
        };
        // SAFETY: a NUL-terminated PTX image; the module lives for the process.
        let module = unsafe { cudarc::driver::result::module::load_data(image.as_ptr().cast()) }
            .map_err(|e| GemmError::Cublas(format!("loading the flag kernels: {e:?}")))?;
        Ok(Self::Kernels {
            wait: function(module, "wait_flag")?,
            set: function(module, "set_flag")?,
        })
    }

    /// Queues on `stream`: wait until `*wait_on == seq`, then `gemm`, then `*set == seq`.
    ///
    /// # Safety
    /// Both pointers are live device flags; `gemm` queues on `stream`.
    unsafe fn around(
        &self,
        stream: cudarc::driver::sys::CUstream,
        (wait_on, set): (u64, u64),
        seq: u32,
        gemm: impl FnOnce() -> Result<(), GemmError>,
    ) -> Result<(), GemmError> {
        let named = |call: &'static str| move |e| GemmError::Cublas(format!("{call}: {e:?}"));
        match self {
            FlagOps::MemOps => {
                // SAFETY: the caller's contract.
                unsafe { wait_value(stream, wait_on, seq) }.map_err(named("cuStreamWaitValue32"))?;
                gemm()?;
                // SAFETY: the caller's contract.
                unsafe { write_value(stream, set, seq) }.map_err(named("cuStreamWriteValue32"))
            }
            FlagOps::Kernels { wait, set: store } => {
                let (mut flag, mut value, mut polls) = (wait_on, seq, ORDER_MAX_POLLS);
                let mut params = [
                    (&mut flag as *mut u64).cast(),
                    (&mut value as *mut u32).cast(),
                    (&mut polls as *mut u32).cast(),
                ];
                // SAFETY: `wait_flag(unsigned *, unsigned, unsigned)` with its three arguments.
                unsafe {
                    cudarc::driver::result::launch_kernel(*wait, (1, 1, 1), (1, 1, 1), 0, stream, &mut params)
                }
                .map_err(named("wait_flag"))?;
                gemm()?;
                let mut flag = set;
                let mut params = [(&mut flag as *mut u64).cast(), (&mut value as *mut u32).cast()];
                // SAFETY: `set_flag(unsigned *, unsigned)` with its two arguments.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        *store,
                        (1, 1, 1),
                        (1, 1, 1),
                        0,
                        stream,
                        &mut params,
                    )
                }
                .map_err(named("set_flag"))
            }
        }
    }
}

/// Flags of [`OrderedStream`]: cubecl → cuBLAS, cuBLAS → cubecl, and the wait's polls left.
const ORDER_FLAGS: usize = 3;

/// Polls before cubecl's wait gives up: about a second at a poll per few hundred ns, far past any
/// GEMM. A wait that ends this way means a lost signal: the step's results are then wrong (which
/// `device_check gemm` reports against its reference) rather than the GPU hung for good.
const ORDER_MAX_POLLS: u32 = 1 << 22;

/// A cuBLAS handle on the primary context (the one cubecl uses), made once per thread: the
/// executor's thread runs every step.
struct Cublas {
    handle: cudarc::cublas::sys::cublasHandle_t,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    /// Made on the first `cublas-ordered` GEMM.
    ordered: Option<OrderedStream>,
}

thread_local! {
    static CUBLAS: std::cell::RefCell<Option<Cublas>> = const { std::cell::RefCell::new(None) };
}

fn cublas_error(e: impl fmt::Debug) -> GemmError {
    GemmError::Cublas(format!("{e:?}"))
}

fn with_cublas<T>(
    device: usize,
    f: impl FnOnce(&mut Cublas) -> Result<T, GemmError>,
) -> Result<T, GemmError> {
    CUBLAS.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            // SAFETY: only asks whether the library loads.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(GemmError::CublasMissing);
            }
            let ctx = cudarc::driver::CudaContext::new(device).map_err(cublas_error)?;
            ctx.bind_to_thread().map_err(cublas_error)?;
            let stream = ctx.default_stream();
            let handle = cudarc::cublas::result::create_handle().map_err(cublas_error)?;
            // SAFETY: the handle was just created; the stream lives as long as `Cublas`.
            unsafe { cudarc::cublas::result::set_stream(handle, stream.cu_stream() as _) }
                .map_err(cublas_error)?;
            *slot = Some(Cublas {
                handle,
                stream,
                ordered: None,
            });
        }
        let blas = slot.as_mut().expect("set above");
        blas.stream.context().bind_to_thread().map_err(cublas_error)?;
        f(blas)
    })
}

impl Cublas {
    /// The ordered stream, made on first use with its flags in `client`'s memory.
    fn ordered(
        &mut self,
        client: &cubecl::prelude::ComputeClient<CudaRuntime>,
    ) -> Result<&mut OrderedStream, GemmError> {
        if self.ordered.is_none() {
            use cubecl::prelude::CubeElement;
            let stream = cudarc::driver::result::stream::create(
                cudarc::driver::result::stream::StreamKind::NonBlocking,
            )
            .map_err(|e| GemmError::Cublas(format!("creating the ordered stream: {e:?}")))?;
            let handle = cudarc::cublas::result::create_handle().map_err(cublas_error)?;
            // SAFETY: the handle was just created; the stream is never destroyed (one per thread).
            unsafe { cudarc::cublas::result::set_stream(handle, stream as _) }.map_err(cublas_error)?;
            let flags = client.create_from_slice(u32::as_bytes(&[0; ORDER_FLAGS]));
            // The flags are zero before the other stream first reads them.
            cubecl::future::block_on(client.sync()).map_err(|e| GemmError::Cublas(format!("sync: {e:?}")))?;
            // cubecl keeps a buffer where it was allocated while its handle lives (it is kept
            // here for the thread's life).
            let flags_ptr = client
                .get_resource(flags.clone())
                .map_err(|e| GemmError::Cublas(format!("flags: {e:?}")))?
                .resource()
                .ptr;
            self.ordered = Some(OrderedStream {
                handle,
                stream,
                flags,
                flags_ptr,
                seq: 0,
                side: FlagOps::choose(stream, flags_ptr)?,
            });
        }
        Ok(self.ordered.as_mut().expect("set above"))
    }
}

/// Queues on `stream` a wait until the u32 at `addr` equals `value`.
///
/// # Safety
/// `addr` is a live device u32 that something will set to `value`.
unsafe fn wait_value(
    stream: cudarc::driver::sys::CUstream,
    addr: u64,
    value: u32,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ;
    // SAFETY: the caller's contract.
    unsafe {
        cudarc::driver::sys::cuStreamWaitValue32_v2(stream, addr, value, CU_STREAM_WAIT_VALUE_EQ as u32)
    }
    .result()
}

/// Queues on `stream` the store of `value` into the u32 at `addr`.
///
/// # Safety
/// `addr` is a live device u32.
unsafe fn write_value(
    stream: cudarc::driver::sys::CUstream,
    addr: u64,
    value: u32,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT;
    // SAFETY: the caller's contract.
    unsafe {
        cudarc::driver::sys::cuStreamWriteValue32_v2(
            stream,
            addr,
            value,
            CU_STREAM_WRITE_VALUE_DEFAULT as u32,
        )
    }
    .result()
}

/// A validated cuBLAS problem: `out [m, n] = x [m, k] · w [k, n]`.
struct CublasProblem {
    m: usize,
    k: usize,
    n: usize,
    op_w: cudarc::cublas::sys::cublasOperation_t,
    ld_w: usize,
    ty: cudarc::cublas::sys::cudaDataType,
}

impl CublasProblem {
    /// cuBLAS is column-major: the row-major `out [m, n]` is the column-major `[n, m]` =
    /// `wᵀ [n, k] · xᵀ [k, m]`, where row-major `w [k, n]` already is column-major `wᵀ` (ld n),
    /// and a transposed view of `[n, k]` is column-major `w` (so `op = T`, ld k).
    fn new(x: &CubeTensor<CudaRuntime>, w: &CubeTensor<CudaRuntime>) -> Result<Self, GemmError> {
        use cudarc::cublas::sys::cublasOperation_t;
        let (m, k) = (x.meta.shape()[0], x.meta.shape()[1]);
        let n = w.meta.shape()[1];
        let ws = w.meta.strides();
        let (op_w, ld_w) = if ws[1] == 1 && ws[0] == n {
            (cublasOperation_t::CUBLAS_OP_N, n)
        } else if ws[0] == 1 && ws[1] == k {
            (cublasOperation_t::CUBLAS_OP_T, k)
        } else {
            return Err(GemmError::Cublas(format!(
                "weight strides {:?} are neither [n, 1] nor [1, k]",
                &ws[..]
            )));
        };
        if w.dtype != x.dtype {
            return Err(GemmError::Cublas(format!(
                "mixed dtypes {:?} x {:?}",
                x.dtype, w.dtype
            )));
        }
        let ty = cuda_data_type(x.dtype)?;
        Ok(Self {
            m,
            k,
            n,
            op_w,
            ld_w,
            ty,
        })
    }

    /// Queues the GEMM on `handle`'s stream.
    ///
    /// # Safety
    /// The pointers are live device buffers of the problem's sizes, not written by anything
    /// else until the GEMM has run.
    unsafe fn gemm(
        &self,
        handle: cudarc::cublas::sys::cublasHandle_t,
        (x, w, out): (u64, u64, u64),
    ) -> Result<(), GemmError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the caller's contract; the scalars live across the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                handle,
                self.op_w,
                cublasOperation_t::CUBLAS_OP_N,
                self.n as i32,
                self.m as i32,
                self.k as i32,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                self.ty,
                self.ld_w as i32,
                x as *const std::ffi::c_void,
                self.ty,
                self.k as i32,
                (&beta as *const f32).cast(),
                out as *mut std::ffi::c_void,
                self.ty,
                self.n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas_error)
    }
}

/// `x · w` by cuBLAS, ordered with cubecl's queue as `ordering` says.
fn cublas_matmul(
    x: CubeTensor<CudaRuntime>,
    w: CubeTensor<CudaRuntime>,
    ordering: Ordering,
) -> Result<CubeTensor<CudaRuntime>, GemmError> {
    let x = contiguous(x, "cublas x");
    let problem = CublasProblem::new(&x, &w)?;
    let out = init_matmul_output(&x, &w, x.dtype);
    let client = out.client.clone();
    let device = out.device.index;
    if ordering == Ordering::HostSync {
        // Everything queued so far (the producer of `x`) has run once this returns.
        <CudaCube as Backend>::sync(&out.device).map_err(|e| GemmError::Cublas(format!("sync: {e:?}")))?;
    }
    let ptr = |t: &CubeTensor<CudaRuntime>| {
        client
            .get_resource(t.handle.clone())
            .map_err(|e| GemmError::Cublas(format!("buffer: {e:?}")))
    };
    let (rx, rw, ro) = (ptr(&x)?, ptr(&w)?, ptr(&out)?);
    let ptrs = (rx.resource().ptr, rw.resource().ptr, ro.resource().ptr);
    with_cublas(device, |blas| match ordering {
        Ordering::HostSync => {
            // SAFETY: the three buffers are live (held by the resources above) and sized by
            // their tensors' shapes; cubecl's queue has run and waits for the GEMM below.
            unsafe { problem.gemm(blas.handle, ptrs) }?;
            blas.stream.synchronize().map_err(cublas_error)
        }
        Ordering::DeviceFlags => ordered_gemm(blas.ordered(&client)?, &client, &problem, ptrs),
    })?;
    Ok(out)
}

/// The GEMM on the ordered stream, between cubecl's signal and its wait (see
/// `kernels::stream_order`). Buffers stay safe to reuse: cubecl reallocates a freed buffer only
/// for kernels queued later on its stream, which start after the wait.
fn ordered_gemm(
    order: &mut OrderedStream,
    client: &cubecl::prelude::ComputeClient<CudaRuntime>,
    problem: &CublasProblem,
    ptrs: (u64, u64, u64),
) -> Result<(), GemmError> {
    order.seq = order.seq.wrapping_add(1).max(1);
    let seq = order.seq;
    let refused = |e: super::kernels::Refused| GemmError::Cublas(e.0);
    stream_order::launch_signal(client, order.flags.clone(), ORDER_FLAGS, 0, seq).map_err(refused)?;
    // The signal reaches the driver before the ordered stream waits for it: were it still in
    // cubecl's queue, a wait that shares a hardware queue with it could block it.
    client
        .flush()
        .map_err(|e| GemmError::Cublas(format!("flush: {e:?}")))?;
    let flags = (order.flags_ptr, order.flags_ptr + 4);
    // SAFETY: the flags are live for the thread's life; the buffers' contract is the caller's,
    // and cubecl's stream waits below for the GEMM before anything may reuse them.
    let queued = unsafe {
        order
            .side
            .around(order.stream, flags, seq, || problem.gemm(order.handle, ptrs))
    };
    if let Err(e) = queued {
        // Whatever was queued must finish before `out` goes back to cubecl's pool: nothing on
        // cubecl's stream waits for it now.
        // SAFETY: a stream made by `OrderedStream`.
        let _ = unsafe { cudarc::driver::result::stream::synchronize(order.stream) };
        return Err(e);
    }
    stream_order::launch_wait(
        client,
        order.flags.clone(),
        ORDER_FLAGS,
        (1, seq),
        ORDER_MAX_POLLS,
        2,
    )
    .map_err(refused)
}
