//! Attention on CUDA by our paged kernel (`kernels::paged_attention`) for decodes and short
//! prompt chunks: each query reads K/V where its pages are, instead of burn gathering, padding
//! and re-reading them.
//! The server installs it as the model's [`PagedAttentionFn`] with `[cuda] attention =
//! "paged"` (see the AdminGuide); `device_check logits` holds it to the CPU path, and
//! tests/model_device_kernels.rs to transformers on wgpu's Vulkan backend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::cuda_fused::contiguous;
use super::output_blocks;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::cuda_gemm::Cube;
use super::kernels::paged_attention::{self, PagedAttentionShape, TILE};
use super::kernels::Refused;
use super::llama::{gathered_paged_attention, PagedAttention, PagedAttentionFn};
use super::LlamaConfig;

/// How decodes and short prompt chunks attend on CUDA (`[cuda] attention`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKernel {
    /// burn's ops: each context's K/V rows gathered, a group padded to its longest, softmax.
    #[default]
    Burn,
    /// Our paged kernel, reading K/V through the block tables.
    Paged,
}

/// Whether the kernel runs `config`'s attention (checked once, at start).
pub fn supports(config: &LlamaConfig) -> Result<(), Refused> {
    let (heads, kv_heads, head_dim) = (config.num_heads, config.num_kv_heads, config.head_dim);
    if head_dim > TILE {
        return Err(Refused(format!(
            "head_dim {head_dim} is above the kernel's {TILE}"
        )));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Refused(format!("{heads} heads over {kv_heads} KV heads")));
    }
    Ok(())
}

/// The server's decode attention on [`Cube`]: the paged kernel, or where it refuses a step
/// (a cache too large for 32-bit indices, an unexpected layout), burn's gather for that step,
/// with one warning. With `split`, long contexts of a batch too small to fill the GPU are
/// split in partitions (`[cuda] split_attention`, see `paged_attention::partition_len`).
pub fn paged<R: CubeRuntime>(split: bool) -> PagedAttentionFn<Cube<R>> {
    let warned = Arc::new(AtomicBool::new(false));
    Arc::new(move |a: PagedAttention<Cube<R>>| match launch(a, split) {
        Ok(out) => out,
        Err(refused) => {
            let (e, a) = *refused;
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "paged attention refused a step: burn's gather runs it");
            }
            gathered_paged_attention(a)
        }
    })
}

/// A step the kernel refused, with its inputs handed back for burn's gather: no step pays for
/// copies of its seven tensors kept against a refusal.
pub type RefusedAttention<R> = Box<(Refused, PagedAttention<Cube<R>>)>;

/// Queues the kernel on `a`'s tensors, split where `split` allows and it pays;
/// `[n, heads * head_dim]`.
pub fn launch<R: CubeRuntime>(
    a: PagedAttention<Cube<R>>,
    split: bool,
) -> Result<Tensor<Cube<R>, 2>, RefusedAttention<R>> {
    let [n, heads, head_dim] = a.q.dims();
    let [seqs, max_blocks] = a.block_tables.dims();
    let (page_size, kv_heads, scale) = (a.page_size, a.kv_heads, a.scale);
    let float = |t: Tensor<Cube<R>, 2>| t.into_primitive().tensor();
    let q: CubeTensor<R> = contiguous(a.q.into_primitive().tensor(), "paged attention q");
    let (k, v) = (float(a.k_cache), float(a.v_cache));
    let ints = [
        contiguous(a.block_tables.into_primitive(), "paged attention block tables"),
        contiguous(a.query_seq.into_primitive(), "paged attention query_seq"),
        contiguous(a.ctx_begin.into_primitive(), "paged attention ctx_begin"),
        contiguous(a.ctx_end.into_primitive(), "paged attention ctx_end"),
    ];
    let refused = if k.dtype != q.dtype || v.dtype != q.dtype {
        Some(Refused(format!("queries {:?}, cache {:?}", q.dtype, k.dtype)))
    } else if !k.is_contiguous() || !v.is_contiguous() {
        Some(Refused("the cache's rows are padded".into()))
    } else if ints.iter().any(|t| t.dtype != DType::I32) {
        Some(Refused("block tables are not 32-bit".into()))
    } else {
        None
    };
    let shape = PagedAttentionShape {
        queries: n,
        seqs,
        heads,
        kv_heads,
        head_dim,
        page_size,
        max_blocks,
        slots: k.meta.shape()[0],
    };
    // The inputs again, as the fallback takes them.
    let hand_back =
        |e: Refused, q: CubeTensor<R>, k, v, [tables, query_seq, begin, end]: [CubeTensor<R>; 4]| {
            let float = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
            Box::new((
                e,
                PagedAttention {
                    q: float(q).reshape([n, heads, head_dim]),
                    k_cache: float(k),
                    v_cache: float(v),
                    block_tables: Tensor::from_primitive(tables),
                    query_seq: Tensor::from_primitive(query_seq),
                    ctx_begin: Tensor::from_primitive(begin),
                    ctx_end: Tensor::from_primitive(end),
                    page_size,
                    kv_heads,
                    scale,
                },
            ))
        };
    if let Some(e) = refused {
        return Err(hand_back(e, q, k, v, ints));
    }
    let out = output_blocks::empty(&q.client, &q.device, [n, heads * head_dim].into(), q.dtype);
    let [tables, query_seq, begin, end] = &ints;
    // Page ids and positions are non-negative, so their i32 bits read as the kernel's u32.
    let handles = [
        q.handle.clone(),
        k.handle.clone(),
        v.handle.clone(),
        tables.handle.clone(),
        query_seq.handle.clone(),
        begin.handle.clone(),
        end.handle.clone(),
        out.handle.clone(),
    ];
    let partition_len = split
        .then(|| paged_attention::auto_partition_len(&q.client, &shape))
        .flatten();
    let launched = paged_attention::launch(
        &q.client,
        handles,
        shape,
        scale,
        (q.dtype.into(), q.dtype.size()),
        true,
        partition_len,
    );
    match launched {
        Ok(()) => Ok(Tensor::from_primitive(TensorPrimitive::Float(out))),
        Err(e) => Err(hand_back(e, q, k, v, ints)),
    }
}
