//! RMSNorm, RoPE and the MLP's `silu(gate) · up` on CUDA in one launch each
//! (`kernels::rms_norm`, `kernels::rope`, `kernels::silu_mul`), installed as the model's
//! [`FusedOps`] with `[cuda] fused_ops = true`.
//! Each falls back to burn's ops for an input it cannot take (mixed dtypes, a size past 32 bits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;

use super::cuda_gemm::CudaCube;
use super::kernels::{rms_norm, rope, silu_mul, Refused};
use super::llama::{self, FusedOps};

/// The server's fused operations on [`CudaCube`].
pub fn fused_ops() -> FusedOps<CudaCube> {
    let warned = Arc::new(AtomicBool::new(false));
    let warn = move |what: &str, e: Refused| {
        if !warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, what, "a fused kernel refused its input: burn's ops run it");
        }
    };
    let (warn_norm, warn_rope) = (warn.clone(), warn.clone());
    FusedOps {
        rms_norm: Arc::new(move |x: Tensor<CudaCube, 2>, w: Tensor<CudaCube, 1>, eps: f64| {
            launch_rms_norm(x.clone(), w.clone(), eps).unwrap_or_else(|e| {
                warn_norm("rms_norm", e);
                llama::rms_norm(x, w, eps)
            })
        }),
        silu_mul: Arc::new(move |gate: Tensor<CudaCube, 2>, up: Tensor<CudaCube, 2>| {
            launch_silu_mul(gate.clone(), up.clone()).unwrap_or_else(|e| {
                warn("silu_mul", e);
                llama::silu_mul(gate, up)
            })
        }),
        rope: Arc::new(
            move |x: Tensor<CudaCube, 3>, cos: Tensor<CudaCube, 3>, sin: Tensor<CudaCube, 3>| {
                launch_rope(x.clone(), cos.clone(), sin.clone()).unwrap_or_else(|e| {
                    warn_rope("rope", e);
                    llama::rotate_half_rope(x, &cos, &sin)
                })
            },
        ),
    }
}

fn primitive<const D: usize>(t: Tensor<CudaCube, D>) -> CubeTensor<CudaRuntime> {
    into_contiguous(t.into_primitive().tensor())
}

fn same_dtype(a: &CubeTensor<CudaRuntime>, b: &CubeTensor<CudaRuntime>) -> Result<(), Refused> {
    match a.dtype == b.dtype {
        true => Ok(()),
        false => Err(Refused(format!("mixed dtypes {:?} and {:?}", a.dtype, b.dtype))),
    }
}

fn launch_rms_norm(
    x: Tensor<CudaCube, 2>,
    w: Tensor<CudaCube, 1>,
    eps: f64,
) -> Result<Tensor<CudaCube, 2>, Refused> {
    let [rows, width] = x.dims();
    let (x, w) = (primitive(x), primitive(w));
    same_dtype(&x, &w)?;
    let out =
        empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), [rows, width].into(), x.dtype);
    let handles = [x.handle.clone(), w.handle.clone(), out.handle.clone()];
    rms_norm::launch(&x.client, handles, (rows, width), eps as f32, x.dtype.into())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

fn launch_silu_mul(
    gate: Tensor<CudaCube, 2>,
    up: Tensor<CudaCube, 2>,
) -> Result<Tensor<CudaCube, 2>, Refused> {
    let dims = gate.dims();
    if up.dims() != dims {
        return Err(Refused(format!("gate {dims:?} and up {:?}", up.dims())));
    }
    let (gate, up) = (primitive(gate), primitive(up));
    same_dtype(&gate, &up)?;
    let out =
        empty_device_contiguous_dtype(gate.client.clone(), gate.device.clone(), dims.into(), gate.dtype);
    let handles = [gate.handle.clone(), up.handle.clone(), out.handle.clone()];
    silu_mul::launch(&gate.client, handles, dims[0] * dims[1], gate.dtype.into())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

fn launch_rope(
    x: Tensor<CudaCube, 3>,
    cos: Tensor<CudaCube, 3>,
    sin: Tensor<CudaCube, 3>,
) -> Result<Tensor<CudaCube, 3>, Refused> {
    let dims = x.dims();
    let [tokens, heads, head_dim] = dims;
    if cos.dims() != [tokens, 1, head_dim] || sin.dims() != [tokens, 1, head_dim] {
        return Err(Refused(format!(
            "x {dims:?}, cos {:?}, sin {:?}",
            cos.dims(),
            sin.dims()
        )));
    }
    let (x, cos, sin) = (primitive(x), primitive(cos), primitive(sin));
    same_dtype(&x, &cos)?;
    same_dtype(&x, &sin)?;
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), dims.into(), x.dtype);
    let handles = [
        x.handle.clone(),
        cos.handle.clone(),
        sin.handle.clone(),
        out.handle.clone(),
    ];
    rope::launch(&x.client, handles, (tokens, heads, head_dim), x.dtype.into())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}
