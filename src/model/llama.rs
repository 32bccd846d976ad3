//! The Llama-family decoder in burn (Llama, Mistral, Qwen2, Qwen3: see [`LlamaConfig`] for the
//! switches), computing one step of a unified batch: prompt chunks and decode tokens of many
//! sequences in one pass.
//!
//! Projections and the MLP run once over all tokens of the step (`[T, hidden]`); attention runs
//! per sequence and reads K/V from the paged cache through that sequence's slot list (or, with a
//! [`PagedAttentionFn`], a kernel reads decodes' K/V through their block tables), so the model
//! never holds a contiguous per-request cache. RoPE is Hugging Face's rotate-half layout.

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{DType, IndexingUpdateOp, TensorData};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::config::{LlamaConfig, RopeScaling};
use super::host_attention::ChunkQueries;
use super::paged_cache::{KvStorage, PagedKvCache, SlotIndex, WriteSlots};
use super::shard::{self, Shard};
use super::step_indices::{int_tensor, IndexId, IndexViewFn, StepIndices, UploadedIndices};
use super::weights::WeightIndex;
use super::ModelError;
use crate::parallel::{Communicator, ParallelContext};

/// Prompt chunks whose queries × context positions are at most this go through a
/// [`PagedAttentionFn`] with the decodes: each query reads its whole prefix, so past this a
/// chunk is cheaper gathered once and multiplied as a matrix (a 128-token prompt's first chunk is
/// 16,384; a 512-token chunk at the end of a 2,048-token prompt would be about a million).
pub const PAGED_CHUNK_MAX_WORK: usize = 65_536;

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceChunk {
    /// Token ids computed in this step (a prompt chunk, or the one last sampled token).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`: how many tokens of this sequence are already in the cache.
    pub start_pos: usize,
    /// Page ids holding this sequence's K/V, in order; must cover `start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    /// Whether the logits of the last token are wanted (the chunk ends the known tokens).
    pub wants_logits: bool,
}

impl SequenceChunk {
    pub fn end_pos(&self) -> usize {
        self.start_pos + self.tokens.len()
    }
}

/// Inputs of a step that are still on the device: ids an earlier step sampled and nobody has
/// read yet (async scheduling queues a step before reading the one it follows).
pub struct FedTokens<B: Backend> {
    /// The earlier step's sampled ids.
    pub ids: Tensor<B, 1, Int>,
    /// `(chunk, at)`: the last token of chunk `chunk` (in step order) is `ids[at]`; the chunk's
    /// own last token is a placeholder.
    pub last_of_chunk: Vec<(usize, usize)>,
}

/// How the projection weights sit in device memory. Either way the model holds each as a
/// logical `[in, out]` tensor and computes `x · w`; the layout decides its strides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// Transposed once at load into row-major `[in, out]`: a plain matrix for burn's `matmul`.
    #[default]
    InOut,
    /// The checkpoint's `[out, in]`, used through a transposed view: each output's weights are
    /// contiguous, which is how GEMV kernels read fastest (see `cuda_gemm`).
    OutIn,
}

/// Multiplies activations `[rows, in]` by a projection weight (logical `[in, out]`). Set by the
/// server to run a chosen kernel on a backend (see `cuda_gemm`); burn's `matmul` otherwise.
pub type ProjectFn<B> = Arc<dyn Fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2> + Send + Sync>;

/// One layer's attention of some query tokens, read through block tables: what a
/// [`PagedAttentionFn`] gets. A query is a decode token or a token of a short prompt chunk.
#[derive(Clone)]
pub struct PagedAttention<B: Backend> {
    /// `[queries, heads, head_dim]`, after RoPE.
    pub q: Tensor<B, 3>,
    /// The layer's whole cache, `[slots, kv_heads * head_dim]` each; slot `page * page_size + i`.
    pub k_cache: Tensor<B, 2>,
    pub v_cache: Tensor<B, 2>,
    /// `[seqs, max_blocks]` page ids; a shorter table is padded with page 0, never read.
    pub block_tables: Tensor<B, 2, Int>,
    /// `[queries]`: the row of `block_tables` of each query's sequence.
    pub query_seq: Tensor<B, 1, Int>,
    /// `[queries]` each: query `i` attends to positions `ctx_begin[i] .. ctx_end[i]` of its
    /// sequence (causal: `ctx_end` is one past the query's own position).
    pub ctx_begin: Tensor<B, 1, Int>,
    pub ctx_end: Tensor<B, 1, Int>,
    pub page_size: usize,
    pub kv_heads: usize,
    /// Multiplies the scores: `head_dim^-0.5`.
    pub scale: f32,
}

/// Computes [`PagedAttention`] as `[queries, heads * head_dim]`. Set by the server to run a paged
/// attention kernel (`cuda_attention`) on a backend whose cache lives on the device; without it,
/// queries gather their context rows (`Llama::attention`).
pub type PagedAttentionFn<B> = Arc<dyn Fn(PagedAttention<B>) -> Tensor<B, 2> + Send + Sync>;

/// RMSNorm of `x [rows, width]` by `weight [width]` with epsilon `eps`, as [`rms_norm`].
pub type RmsNormFn<B> = Arc<dyn Fn(Tensor<B, 2>, Tensor<B, 1>, f64) -> Tensor<B, 2> + Send + Sync>;

/// `x + delta`, and its RMSNorm with `weight` and `eps`, as [`add_rms_norm`].
pub type AddRmsNormFn<B> =
    Arc<dyn Fn(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>, f64) -> (Tensor<B, 2>, Tensor<B, 2>) + Send + Sync>;
/// `silu(gate) · up` of `[rows, 2 * intermediate]` (each row: gate, then up) as
/// `[rows, intermediate]`, as [`silu_mul_halves`].
pub type SiluMulFn<B> = Arc<dyn Fn(Tensor<B, 2>) -> Tensor<B, 2> + Send + Sync>;
/// The MLP's activation straight from its input: `silu(h · gate) · (h · up)` from `h [rows, in]`
/// and the merged gate/up weight (logical `[in, 2 * intermediate]`) in one launch, as
/// [`silu_mul_halves`] of the projection. `None` where it cannot take the input; the model then
/// projects and applies [`FusedOps::silu_mul`].
pub type GateUpActFn<B> = Arc<dyn Fn(Tensor<B, 2>, Tensor<B, 2>) -> Option<Tensor<B, 2>> + Send + Sync>;
/// A block's RMSNorm and its first projection, what a [`NormProjectFn`] gets: the norm of `x`
/// (of `x + delta`, the residual add before it, when there is a `delta`) with `gain` and `eps`,
/// times `w` (logical `[in, out]`); with `swiglu`, `w` is the merged gate/up weight and the
/// product is the MLP's activation, as [`GateUpActFn`]'s.
#[derive(Clone)]
pub struct NormProject<B: Backend> {
    pub x: Tensor<B, 2>,
    pub delta: Option<Tensor<B, 2>>,
    pub gain: Tensor<B, 1>,
    pub eps: f64,
    pub w: Tensor<B, 2>,
    pub swiglu: bool,
}
/// Returns `(x + delta, product)` (`x` itself without a delta) of a [`NormProject`] in one launch
/// (CUDA's GEMV with a norm prologue, at decode-sized batches); `None` where it cannot take the
/// input, and the model then runs the norm and the projection apart.
pub type NormProjectFn<B> = Arc<dyn Fn(NormProject<B>) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> + Send + Sync>;
/// The attention's input in one launch, what a [`NormQkvWriteFn`] gets: `input`'s norm and
/// merged q/k/v projection (no bias, no q/k norms), then `write`: the RoPE of q and k and the
/// write of K and V into the layer's caches, as [`rope_qk_and_write_kv`].
pub struct NormQkvWrite<B: Backend> {
    pub input: NormProject<B>,
    pub write: KvWrite<B>,
}
/// What a [`NormQkvWriteFn`] leaves: the residual stream (`x + delta`), q after RoPE
/// (`[tokens, heads, head_dim]`) and the caches after the write.
pub struct NormQkvWritten<B: Backend> {
    pub x: Tensor<B, 2>,
    pub q: Tensor<B, 3>,
    pub k_cache: Tensor<B, 2>,
    pub v_cache: Tensor<B, 2>,
}
/// Runs a [`NormQkvWrite`] in one launch (CUDA's GEMV with a norm prologue and a RoPE and K/V
/// write epilogue, at decode-sized batches); `Err` hands the caches (K, V) back untouched where
/// it cannot take the step, and the model runs the norm, the projection and the write apart.
pub type NormQkvWriteFn<B> =
    Arc<dyn Fn(NormQkvWrite<B>) -> Result<NormQkvWritten<B>, Box<[Tensor<B, 2>; 2]>> + Send + Sync>;
/// RoPE of `x [tokens, heads, head_dim]` with the step's `cos` and `sin` (`[tokens, 1,
/// head_dim]`), as [`rotate_half_rope`].
pub type RopeFn<B> = Arc<dyn Fn(Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3> + Send + Sync>;

/// The embedding's rows of the step's token ids, `table.select(0, ids)`.
pub type EmbedFn<B> = Arc<dyn Fn(Tensor<B, 2>, Tensor<B, 1, Int>) -> Tensor<B, 2> + Send + Sync>;

/// The step's RoPE: each row's position and the model's whole `cos` and `sin` tables
/// (`[max_position_embeddings, head_dim]`, the model's dtype). Our kernels index the tables by
/// position inside the launch that uses them; burn's ops and the RoPE hook take the step's rows
/// gathered ([`RopeAnglesOf::rows`]), gathered once per step however many layers ask. Gathering
/// up front cost two launches per step, which the host's issue paid at batch 1.
///
/// Every layer's K/V write carries a clone, so the tensors sit behind one `Arc`: a clone is a
/// count, not three tensor clones (`Deref` reaches the fields).
#[derive(Clone)]
pub struct RopeAngles<B: Backend>(Arc<RopeAnglesOf<B>>);

/// What a [`RopeAngles`] shares.
pub struct RopeAnglesOf<B: Backend> {
    /// `[tokens]`: each row's position, below the tables' length.
    pub positions: Tensor<B, 1, Int>,
    pub cos_table: Tensor<B, 2>,
    pub sin_table: Tensor<B, 2>,
    gathered: std::sync::OnceLock<[Tensor<B, 3>; 2]>,
    /// A hook's own form of the angles (`cuda_fused::RopeTables`: checked, on the kernels'
    /// terms), made by the first layer that asks and read by the step's others.
    prepared: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl<B: Backend> std::ops::Deref for RopeAngles<B> {
    type Target = RopeAnglesOf<B>;

    fn deref(&self) -> &RopeAnglesOf<B> {
        &self.0
    }
}

impl<B: Backend> RopeAngles<B> {
    pub fn new(positions: Tensor<B, 1, Int>, cos_table: Tensor<B, 2>, sin_table: Tensor<B, 2>) -> Self {
        Self(Arc::new(RopeAnglesOf {
            positions,
            cos_table,
            sin_table,
            gathered: Default::default(),
            prepared: Default::default(),
        }))
    }

    /// What `prepare` makes of these angles, made once per step: later calls get the first
    /// call's value, when it is a `T` (another type is made afresh each time, not kept).
    pub fn prepared<T: std::any::Any + Send + Sync>(&self, prepare: impl FnOnce() -> T) -> Arc<T> {
        let mut prepare = Some(prepare);
        let kept = self
            .0
            .prepared
            .get_or_init(|| Arc::new((prepare.take().expect("prepared once"))()));
        match (kept.clone().downcast::<T>(), prepare) {
            (Ok(kept), _) => kept,
            (Err(_), Some(prepare)) => Arc::new(prepare()),
            (Err(_), None) => unreachable!("the value just made is a T"),
        }
    }
}

impl<B: Backend> RopeAnglesOf<B> {
    /// The step's `cos` and `sin` rows, `[tokens, 1, head_dim]` each.
    pub fn rows(&self) -> [Tensor<B, 3>; 2] {
        self.gathered
            .get_or_init(|| {
                [&self.cos_table, &self.sin_table]
                    .map(|t| t.clone().select(0, self.positions.clone()).unsqueeze_dim::<3>(1))
            })
            .clone()
    }
}

/// Where a layer's new K and V rows go, and the step's RoPE: [`QkvWrite`] without the rows.
#[derive(Clone)]
pub struct KvWrite<B: Backend> {
    pub heads: usize,
    pub kv_heads: usize,
    pub rope: RopeAngles<B>,
    /// `[tokens, 1]`: each row's cache slot.
    pub slots: Tensor<B, 2, Int>,
    /// The layer's whole caches, `[cache_slots, kv_heads * head_dim]`.
    pub k_cache: Tensor<B, 2>,
    pub v_cache: Tensor<B, 2>,
}

impl<B: Backend> KvWrite<B> {
    /// The write of these q, k and v rows.
    pub fn with_rows(self, [q, k, v]: [Tensor<B, 2>; 3]) -> QkvWrite<B> {
        QkvWrite { q, k, v, write: self }
    }
}

/// One layer's new q, k and v rows and where K and V go: what a [`QkvWriteFn`] gets. `q`, `k`
/// and `v` may be column views of one merged projection (row stride past their width).
#[derive(Clone)]
pub struct QkvWrite<B: Backend> {
    /// `[tokens, heads * head_dim]`, before RoPE.
    pub q: Tensor<B, 2>,
    /// `[tokens, kv_heads * head_dim]`, before RoPE.
    pub k: Tensor<B, 2>,
    /// `[tokens, kv_heads * head_dim]`.
    pub v: Tensor<B, 2>,
    pub write: KvWrite<B>,
}

/// Returns `rope(q)` (`[tokens, heads, head_dim]`), stores `rope(k)` and `v` in their slots and
/// returns the layer's caches as they are after it (the same buffers when written in place), as
/// [`rope_qk_and_write_kv`]. Only for a cache on the device.
pub type QkvWriteFn<B> = Arc<dyn Fn(QkvWrite<B>) -> (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 2>) + Send + Sync>;

/// Kernels that do in one launch what burn composes from several (`cuda_fused`).
#[derive(Clone)]
pub struct FusedOps<B: Backend> {
    pub rms_norm: RmsNormFn<B>,
    /// The residual add and the RMSNorm that follows it (every one but the first layer's).
    pub add_rms_norm: AddRmsNormFn<B>,
    pub silu_mul: SiluMulFn<B>,
    /// The merged gate/up projection and its activation in one launch (decode-sized batches on
    /// CUDA's GEMV); `None`: always the projection, then `silu_mul`.
    pub gate_up_act: Option<GateUpActFn<B>>,
    /// The RMSNorms before the attention and the MLP inside their first projections (q/k/v when
    /// merged, gate/up when merged); `None`: the norm's own launch, then the projection.
    pub norm_project: Option<NormProjectFn<B>>,
    /// The attention's norm, merged q/k/v projection, RoPE and K/V write in one launch (device
    /// storage); `None`, or a refusal: `norm_project` or the norm, then the projection, then
    /// `qkv_write` or RoPE and the cache's write.
    pub norm_qkv_write: Option<NormQkvWriteFn<B>>,
    pub rope: RopeFn<B>,
    /// The RoPE of q and k and the K/V write into the pages in one launch, reading q, k and v
    /// from one merged projection; `None`: [`FusedOps::rope`] then the cache's own write.
    pub qkv_write: Option<QkvWriteFn<B>>,
    /// The embedding's row gather by a kernel cheaper to issue than burn's `select` (one launch
    /// either way); `None`: `select`.
    pub embed: Option<EmbedFn<B>>,
}

#[derive(Clone)]
struct LlamaLayer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    /// Projections, logical `[in, out]` (see [`WeightLayout`]), so `x · w`.
    qkv: Qkv<B>,
    wo: Tensor<B, 2>,
    o_bias: Option<Tensor<B, 1>>,
    /// Per-head RMSNorm gains `[head_dim]` of queries and keys (Qwen3).
    qk_norm: Option<[Tensor<B, 1>; 2]>,
    mlp_norm: Tensor<B, 1>,
    gate_up: GateUp<B>,
    w_down: Tensor<B, 2>,
}

/// The MLP's gate and up projections, logical `[in, out]` each: apart, or (with [`FusedOps`])
/// one `[in, 2 * out]` product whose output rows hold gate then up, one launch instead of two.
#[derive(Clone)]
enum GateUp<B: Backend> {
    Apart { gate: Tensor<B, 2>, up: Tensor<B, 2> },
    Merged(Tensor<B, 2>),
}

/// The attention's q, k and v projections, logical `[in, out]` each, with their biases
/// (`[q_dim]`, `[kv_dim]`, `[kv_dim]`) when the checkpoint has them: apart, or (with the fused
/// K/V write, which reads the three from one tensor) one `[in, q_dim + 2 * kv_dim]` product whose
/// output rows hold q, k then v, one launch instead of three.
#[derive(Clone)]
enum Qkv<B: Backend> {
    Apart {
        q: Tensor<B, 2>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
        bias: Option<[Tensor<B, 1>; 3]>,
    },
    Merged {
        w: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    },
}

/// The residual stream `x` and the block output still to be added to it before the next norm.
type ResidualInput<B> = (Tensor<B, 2>, Option<Tensor<B, 2>>);

/// Where one chunk's queries sit in the step and which cache slots they attend to.
struct ChunkContext<'a> {
    q_start: usize,
    q_len: usize,
    start_pos: usize,
    /// First position the chunk's queries can see (0, or the sliding window's reach).
    ctx_start: usize,
    /// The sequence's pages (paged decode attention reads through them).
    block_table: &'a [u32],
}

impl ChunkContext<'_> {
    /// How many positions the queries attend to: `ctx_start .. start_pos + q_len`.
    fn ctx_len(&self) -> usize {
        self.start_pos + self.q_len - self.ctx_start
    }

    /// The cache slots of those positions, for the attentions that gather them. Made only where
    /// one does: the paged path reads the block table, and a step of 128 decodes at context
    /// 2,048 would otherwise compute and drop 262,144 slots on the host.
    fn ctx_slots(&self, page_size: usize) -> Vec<i32> {
        (self.ctx_start..self.start_pos + self.q_len)
            .map(|p| slot_of(self.block_table, page_size, p))
            .collect()
    }
}

/// A prompt chunk's attention inputs.
struct AttentionPlan<B: Backend> {
    q_start: usize,
    q_len: usize,
    /// Keys this chunk can see: positions `end - ctx_len .. end` (all of them, or the sliding
    /// window's reach).
    ctx_len: usize,
    ctx_slots: SlotIndex<B>,
    /// Additive mask `[group * q_len, ctx_len]`; `None` when every query sees every key.
    mask: Option<Tensor<B, 2>>,
}

/// Queries that go through attention in one pass.
enum AttentionGroup<B: Backend> {
    /// `n` single-token decodes, their contexts padded to the longest, `ctx_len`: a handful of
    /// kernels for the whole group instead of a handful per sequence.
    Decode {
        /// The queries' rows in the step.
        rows: IndexId,
        n: usize,
        ctx_len: usize,
        /// `[n * ctx_len]`: each sequence's context slots, then padding.
        slots: SlotIndex<B>,
        /// `[n, 1, 1, ctx_len]`, `-inf` on padding; `None` when no context is padded.
        mask: Option<Tensor<B, 4>>,
    },
    /// Every single-token decode of the step when there are two or more, on host storage:
    /// attended over the cache's rows in place (`PagedKvCache::attend_decodes`), without a
    /// gather, padding or a mask.
    HostDecode {
        /// The queries' rows in the step.
        rows: IndexId,
        /// Each query's context slots, in position order.
        contexts: Vec<Vec<i32>>,
    },
    /// Every single-token decode and every short prompt chunk of the step
    /// ([`PAGED_CHUNK_MAX_WORK`]), attended by the [`PagedAttentionFn`] through block tables:
    /// no gather, no padding, no mask.
    Paged {
        /// The queries' rows in the step; `None` when they are all of the step's rows, in
        /// order (every step of decodes and short chunks), which saves a copy of `q` per layer.
        rows: Option<IndexId>,
        /// `table_dims` (`[seqs, max_blocks]`), flat, padded with page 0.
        block_tables: IndexId,
        table_dims: [usize; 2],
        query_seq: IndexId,
        ctx_begin: IndexId,
        ctx_end: IndexId,
    },
    /// One sequence's prompt chunk (causal within the chunk).
    Chunk(AttentionPlan<B>),
    /// One sequence's prompt chunk on host storage: attended over the cache's rows in place,
    /// tiled with an online softmax (`PagedKvCache::attend_chunk`), without a gather or a mask.
    HostChunk {
        q_start: usize,
        q_len: usize,
        /// The context's slots, in position order.
        slots: Vec<i32>,
        /// Where in `slots` the chunk's first query is.
        first_query: usize,
        /// The position of `slots[0]`.
        first_position: usize,
    },
}

/// The step's attention groups and how to put their outputs back in token order.
struct AttentionLayout<B: Backend> {
    groups: Vec<AttentionGroup<B>>,
    /// Row `r` of the output is row `unpermute[r]` of the groups' outputs; `None` when the
    /// groups already produce the step's order.
    unpermute: Option<IndexId>,
    /// The step's integer arrays, the groups' among them.
    indices: UploadedIndices<B>,
}

/// `Clone` shares the weights (burn tensors are reference-counted): a restarted executor
/// reuses them without reading the checkpoint again.
#[derive(Clone)]
pub struct Llama<B: Backend> {
    config: LlamaConfig,
    device: B::Device,
    dtype: DType,
    /// This rank's heads, MLP features and vocabulary rows (everything with one rank).
    shard: Shard,
    /// `None` with one rank: the forward pass then calls no collective.
    comm: Option<Arc<dyn Communicator>>,
    /// `[vocab shard, hidden]`.
    embed: Tensor<B, 2>,
    layers: Vec<LlamaLayer<B>>,
    final_norm: Tensor<B, 1>,
    /// `[hidden, vocab shard]`.
    lm_head: Tensor<B, 2>,
    rope_cos: Tensor<B, 2>,
    rope_sin: Tensor<B, 2>,
    /// `None`: burn's `matmul`.
    project: Option<ProjectFn<B>>,
    /// `None`: decodes gather their context (see [`PagedAttentionFn`]).
    paged_attention: Option<PagedAttentionFn<B>>,
    /// `None`: burn's ops for RMSNorm, RoPE and the MLP's activation.
    fused: Option<FusedOps<B>>,
    /// `Some`: a step's integer arrays go to the device in one upload, each a view of it
    /// (see [`StepIndices`]); `None`: one upload each.
    index_view: Option<IndexViewFn<B>>,
    /// How many uploads the last step's integer arrays took (for tests and `device_check`).
    index_uploads: Arc<AtomicUsize>,
    /// How the projection weights are kept (what merging gate and up must preserve).
    layout: WeightLayout,
}

impl<B: Backend> Llama<B> {
    /// Loads the weights of `config`'s model from `weights`, converted to `dtype` on `device`.
    pub fn load(
        config: &LlamaConfig,
        weights: &WeightIndex<'_>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::load_shard(config, weights, device, dtype, None)
    }

    /// Loads only rank `comm.rank()`'s shard of the weights (the whole model without `comm`);
    /// every rank of the group must then run the same `forward` calls.
    pub fn load_shard(
        config: &LlamaConfig,
        weights: &WeightIndex<'_>,
        device: &B::Device,
        dtype: DType,
        comm: Option<Arc<dyn Communicator>>,
    ) -> Result<Self, ModelError> {
        Self::load_shard_in(config, weights, (device, dtype), comm, WeightLayout::InOut)
    }

    /// As [`Llama::load_shard`], with the projection weights in `layout`.
    pub fn load_shard_in(
        config: &LlamaConfig,
        weights: &WeightIndex<'_>,
        (device, dtype): (&B::Device, DType),
        comm: Option<Arc<dyn Communicator>>,
        layout: WeightLayout,
    ) -> Result<Self, ModelError> {
        let c = config;
        let ctx = comm.as_ref().map_or_else(ParallelContext::single, |m| {
            ParallelContext::tensor(m.rank(), m.size())
        });
        let sh = Shard::new(c, ctx)?;
        let comm = comm.filter(|m| m.size() > 1);
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (kv_dim, q_dim) = (c.num_kv_heads * hd, c.num_heads * hd);
        let (q_rows, kv_rows) = (
            Shard::head_rows(&sh.q_heads, hd),
            Shard::head_rows(&sh.kv_heads, hd),
        );
        let vector = |name: &str, n: usize| -> Result<Tensor<B, 1>, ModelError> {
            Ok(Tensor::from_data(
                weights.read(name, &[n], dtype)?,
                (device, dtype),
            ))
        };
        let vector_part =
            |name: &str, n: usize, part: &std::ops::Range<usize>| -> Result<Tensor<B, 1>, ModelError> {
                let data = weights.read_range(name, n, part.clone(), dtype)?;
                Ok(Tensor::from_data(data, (device, dtype)))
            };
        // HF Linear weights are `[out, in]`; see `WeightLayout` for how they are kept.
        // Column-parallel layers take some output rows, row-parallel ones some inputs.
        let linear = |name: &str,
                      out_f: usize,
                      in_f: usize,
                      rows: std::ops::Range<usize>,
                      cols: std::ops::Range<usize>| {
            Ok::<_, ModelError>(match layout {
                WeightLayout::InOut => {
                    let data = weights.read_block_transposed(name, [out_f, in_f], rows, cols, dtype)?;
                    Tensor::<B, 2>::from_data(data, (device, dtype))
                }
                WeightLayout::OutIn => {
                    let data = weights.read_block(name, [out_f, in_f], rows, cols, dtype)?;
                    Tensor::<B, 2>::from_data(data, (device, dtype)).transpose()
                }
            })
        };
        let column = |name: &str, out_f: usize, in_f: usize, rows: &std::ops::Range<usize>| {
            linear(name, out_f, in_f, rows.clone(), 0..in_f)
        };
        let row = |name: &str, out_f: usize, in_f: usize, cols: &std::ops::Range<usize>| {
            linear(name, out_f, in_f, 0..out_f, cols.clone())
        };
        let embed_data = weights.read_block(
            "model.embed_tokens.weight",
            [c.vocab_size, h],
            sh.vocab.clone(),
            0..h,
            dtype,
        )?;
        let embed = Tensor::<B, 2>::from_data(embed_data, (device, dtype));
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let qkv_bias = if c.qkv_bias {
                Some([
                    vector_part(&format!("{attn}.q_proj.bias"), q_dim, &q_rows)?,
                    vector_part(&format!("{attn}.k_proj.bias"), kv_dim, &kv_rows)?,
                    vector_part(&format!("{attn}.v_proj.bias"), kv_dim, &kv_rows)?,
                ])
            } else {
                None
            };
            let o_bias = if c.o_bias {
                Some(vector(&format!("{attn}.o_proj.bias"), h)?)
            } else {
                None
            };
            let qk_norm = if c.qk_norm {
                Some([
                    vector(&format!("{attn}.q_norm.weight"), c.head_dim)?,
                    vector(&format!("{attn}.k_norm.weight"), c.head_dim)?,
                ])
            } else {
                None
            };
            layers.push(LlamaLayer {
                o_bias,
                qk_norm,
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                qkv: Qkv::Apart {
                    q: column(&format!("{attn}.q_proj.weight"), q_dim, h, &q_rows)?,
                    k: column(&format!("{attn}.k_proj.weight"), kv_dim, h, &kv_rows)?,
                    v: column(&format!("{attn}.v_proj.weight"), kv_dim, h, &kv_rows)?,
                    bias: qkv_bias,
                },
                wo: row(&format!("{attn}.o_proj.weight"), h, q_dim, &q_rows)?,
                mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up: GateUp::Apart {
                    gate: column(
                        &format!("{p}.mlp.gate_proj.weight"),
                        c.intermediate_size,
                        h,
                        &sh.ffn,
                    )?,
                    up: column(
                        &format!("{p}.mlp.up_proj.weight"),
                        c.intermediate_size,
                        h,
                        &sh.ffn,
                    )?,
                },
                w_down: row(
                    &format!("{p}.mlp.down_proj.weight"),
                    h,
                    c.intermediate_size,
                    &sh.ffn,
                )?,
            });
        }
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            if !c.tie_word_embeddings {
                return Err(ModelError::Weights(
                    "missing tensor `lm_head.weight` and tie_word_embeddings is false".into(),
                ));
            }
            column("model.embed_tokens.weight", c.vocab_size, h, &sh.vocab)?
        } else {
            column("lm_head.weight", c.vocab_size, h, &sh.vocab)?
        };
        let inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, &c.rope_scaling);
        let (cos, sin) = rope_tables(&inv_freq, c.max_position_embeddings);
        let table = |v: Vec<f32>| {
            Tensor::<B, 2>::from_data(
                TensorData::new(v, [c.max_position_embeddings, c.head_dim]),
                (device, DType::F32),
            )
            .cast(dtype)
        };
        Ok(Self {
            config: c.clone(),
            device: device.clone(),
            dtype,
            shard: sh,
            comm,
            embed,
            layers,
            final_norm: vector("model.norm.weight", h)?,
            lm_head,
            rope_cos: table(cos),
            rope_sin: table(sin),
            project: None,
            paged_attention: None,
            fused: None,
            index_view: None,
            index_uploads: Arc::default(),
            layout,
        })
    }

    /// Runs every projection (and `lm_head`) through `project` instead of burn's `matmul`.
    pub fn with_projection(mut self, project: Option<ProjectFn<B>>) -> Self {
        self.project = project;
        self
    }

    /// Runs single-token decodes' attention through `attend` instead of gathering their context;
    /// used only while the cache keeps its pages on the device.
    pub fn with_paged_attention(mut self, attend: Option<PagedAttentionFn<B>>) -> Self {
        self.paged_attention = attend;
        self
    }

    /// Uploads each step's integer arrays at once, viewed by `view`
    /// ([`super::step_indices::cube_view`] on a cubecl runtime); `None`: one upload each.
    pub fn with_index_view(mut self, view: Option<IndexViewFn<B>>) -> Self {
        self.index_view = view;
        self
    }

    /// How many uploads the last forward step's integer arrays took (positions, write slots,
    /// tokens, the paged attention's tables and bounds, row orders): one with an index view.
    pub fn last_step_index_uploads(&self) -> usize {
        self.index_uploads.load(Ordering::Relaxed)
    }

    /// Runs RMSNorm (every one, q/k norms included), RoPE and the MLP's `silu(gate) · up`
    /// through `fused` instead of burn's ops.
    pub fn with_fused_ops(mut self, fused: Option<FusedOps<B>>) -> Self {
        if let Some(f) = &fused {
            // The fused activation reads gate and up from one tensor, and the fused K/V write q,
            // k and v: fewer projections per layer. The weights are moved, not copied twice: the
            // old ones are dropped.
            let layout = self.layout;
            for layer in &mut self.layers {
                if let GateUp::Apart { gate, up } = &layer.gate_up {
                    layer.gate_up = GateUp::Merged(merge_outputs(layout, [gate, up]));
                }
                if let (Qkv::Apart { q, k, v, bias }, Some(_)) = (&layer.qkv, &f.qkv_write) {
                    layer.qkv = Qkv::Merged {
                        w: merge_outputs(layout, [q, k, v]),
                        bias: bias.clone().map(|b| Tensor::cat(b.to_vec(), 0)),
                    };
                }
            }
        }
        self.fused = fused;
        self
    }

    /// `x · w` by the chosen kernel.
    fn project(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.project {
            Some(f) => f(x, w.clone()),
            None => x.matmul(w.clone()),
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// This rank's part of the model.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Width of one token's K (or V) in this rank's cache: its KV heads only.
    pub fn kv_dim(&self) -> usize {
        self.shard.num_kv_heads() * self.config.head_dim
    }

    /// Elements this rank holds of each kind of weight, summed over the layers (for checking
    /// that a rank holds its share and nothing more).
    pub fn weight_elements(&self) -> BTreeMap<&'static str, usize> {
        let n = |t: &Tensor<B, 2>| t.dims().iter().product::<usize>();
        let n1 = |t: &Tensor<B, 1>| t.dims()[0];
        let mut m = BTreeMap::new();
        let mut add = |k: &'static str, v: usize| *m.entry(k).or_insert(0) += v;
        add("embed", n(&self.embed));
        add("lm_head", n(&self.lm_head));
        add("norms", n1(&self.final_norm));
        for l in &self.layers {
            match &l.qkv {
                Qkv::Apart { q, k, v, bias } => {
                    add("q_proj", n(q));
                    add("k_proj", n(k));
                    add("v_proj", n(v));
                    if let Some([q, k, v]) = bias {
                        add("q_bias", n1(q));
                        add("kv_bias", n1(k) + n1(v));
                    }
                }
                Qkv::Merged { w, bias } => {
                    add("qkv_proj", n(w));
                    if let Some(b) = bias {
                        add("qkv_bias", n1(b));
                    }
                }
            }
            add("o_proj", n(&l.wo));
            match &l.gate_up {
                GateUp::Apart { gate, up } => {
                    add("gate_proj", n(gate));
                    add("up_proj", n(up));
                }
                GateUp::Merged(gate_up) => add("gate_up_proj", n(gate_up)),
            }
            add("down_proj", n(&l.w_down));
            add("norms", n1(&l.attn_norm) + n1(&l.mlp_norm));
        }
        m
    }

    /// Runs one step. Writes the K/V of every token into its page slot, and returns the logits
    /// `[n, vocab]` (f32) of the last token of each chunk with `wants_logits`, in chunk order
    /// (an empty `[0, vocab]` when none wants them; on CUDA, where an operation on zero
    /// elements fails, use [`Self::forward_fed`]).
    pub fn forward(&self, cache: &mut PagedKvCache<B>, chunks: &[SequenceChunk]) -> Tensor<B, 2> {
        self.forward_fed(cache, chunks, None)
            .map(|logits| logits.cast(DType::F32))
            .unwrap_or_else(|| Tensor::empty([0, self.config.vocab_size], (&self.device, DType::F32)))
    }

    /// [`Self::forward`] with some chunks' last tokens taken from `fed` on the device (one
    /// rank only: a vocabulary-sharded embedding looks its tokens up on the host), and `None`
    /// for a step whose chunks want no logits (the chunks of a prompt before its last): such a
    /// step ends at the last layer's K/V writes. The head would run on zero rows otherwise,
    /// and CUDA refuses a launch of zero cubes (`CUDA_ERROR_INVALID_VALUE`). The logits are the
    /// head's output as it is, in the model's dtype (f32 with a sharded vocabulary, gathered on
    /// the host): a greedy step's argmax reads them so, and only what needs f32 casts them.
    pub fn forward_fed(
        &self,
        cache: &mut PagedKvCache<B>,
        chunks: &[SequenceChunk],
        fed: Option<&FedTokens<B>>,
    ) -> Option<Tensor<B, 2>> {
        let c = &self.config;
        let dev = &self.device;
        let (nh, nkv, hd) = (self.shard.num_heads(), self.shard.num_kv_heads(), c.head_dim);
        let page_size = cache.page_size();

        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut logit_rows = Vec::new();
        let mut contexts = Vec::with_capacity(chunks.len());
        // Where each chunk's last token is in `tokens`.
        let mut last_token = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let q_start = tokens.len();
            for (j, &t) in chunk.tokens.iter().enumerate() {
                let pos = chunk.start_pos + j;
                tokens.push(t as i32);
                positions.push(pos as i32);
                slots.push(slot_of(&chunk.block_table, page_size, pos));
            }
            last_token.push(tokens.len().wrapping_sub(1));
            if chunk.wants_logits {
                logit_rows.push((tokens.len() - 1) as i32);
            }
            // With a sliding window, the first query sees nothing before `start - (w - 1)`.
            let ctx_start = c
                .sliding_window
                .map_or(0, |w| chunk.start_pos.saturating_sub(w - 1));
            contexts.push(ChunkContext {
                q_start,
                q_len: chunk.tokens.len(),
                start_pos: chunk.start_pos,
                ctx_start,
                block_table: &chunk.block_table,
            });
        }
        let t_total = tokens.len();
        // Every integer array the step needs on the device, pushed here and uploaded together.
        let mut ix = StepIndices::default();
        let positions = ix.push(positions);
        let device_slots = (cache.storage() == KvStorage::Device).then(|| ix.push(slots.clone()));
        let token_ids = match (&self.comm, fed) {
            (None, fed) => Some(TokenIds::plan(&tokens, &last_token, fed, &mut ix)),
            (Some(_), None) => None,
            (Some(_), Some(_)) => panic!("fed-back device tokens with a sharded vocabulary"),
        };
        // A decode-only step wants every row's logits: no upload and no gather for it.
        let every_row =
            logit_rows.iter().enumerate().all(|(i, &r)| r as usize == i) && logit_rows.len() == t_total;
        // Past its K/V write, the last layer carries only the rows whose logits are wanted (as
        // llama.cpp's `inp_out_ids` does): a prompt chunk's other rows need nothing more.
        let wanted = (!every_row && !logit_rows.is_empty()).then(|| ix.push(logit_rows));
        let (groups, unpermute) = self.attention_groups(cache, contexts, t_total, &mut ix);
        let indices = ix.upload(dev, self.index_view.as_ref());
        self.index_uploads.store(indices.uploads(), Ordering::Relaxed);
        let write_slots = cache.write_slots_uploaded(slots, device_slots.map(|id| indices.get(id)));
        let rope = RopeAngles::new(
            indices.get(positions),
            self.rope_cos.clone(),
            self.rope_sin.clone(),
        );
        let mut x = match (token_ids, &self.comm) {
            (Some(ids), _) => {
                let ids = ids.on_device(fed, &indices);
                match self.fused.as_ref().and_then(|f| f.embed.as_ref()) {
                    Some(embed) => embed(self.embed.clone(), ids),
                    None => self.embed.clone().select(0, ids),
                }
            }
            (None, Some(comm)) => shard::embed_lookup(&**comm, &self.embed, &self.shard.vocab, &tokens),
            (None, None) => unreachable!("one rank plans its token ids"),
        };
        let wanted = wanted.map(|id| indices.get(id));
        let layout = AttentionLayout {
            groups,
            unpermute,
            indices,
        };
        // Each block's output is added to the residual stream `x` by the norm that follows it (one
        // launch with the fused ops, or inside the next projection with `norm_project`).
        let mut delta = None;
        let mut rows_selected = every_row;
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let last = layer_idx + 1 == self.layers.len();
            let input = self.fused_attention_input(cache, layer_idx, &write_slots, (x, delta.take()), &rope);
            let (x_attn, q) = match input {
                Ok(done) => done,
                Err((x, delta)) => {
                    let (x_attn, [mut q, mut k, v]) = self.normed_qkv(x, delta, &layer.attn_norm, &layer.qkv);
                    if let Some([nq, nk]) = &layer.qk_norm {
                        q = self
                            .rms_norm(q.reshape([t_total * nh, hd]), nq)
                            .reshape([t_total, nh * hd]);
                        k = self
                            .rms_norm(k.reshape([t_total * nkv, hd]), nk)
                            .reshape([t_total, nkv * hd]);
                    }
                    let q = self.rope_qk_and_write_kv(cache, layer_idx, &write_slots, [q, k, v], &rope);
                    (x_attn, q)
                }
            };
            let (attn, x_attn) = match (last, &wanted) {
                // No row wants logits: the K/V writes were all this step had to do.
                (true, None) if !every_row => return None,
                (true, Some(rows)) => {
                    rows_selected = true;
                    let attn = self.attention(cache, layer_idx, q, &layout);
                    (attn.select(0, rows.clone()), x_attn.select(0, rows.clone()))
                }
                _ => (self.attention(cache, layer_idx, q, &layout), x_attn),
            };
            let mut out = self.project(attn, &layer.wo);
            if let Some(comm) = &self.comm {
                out = shard::all_reduce(&**comm, out);
            }
            if let Some(bo) = &layer.o_bias {
                out = out + bo.clone().unsqueeze_dim::<2>(0);
            }
            let (x_mid, act) = self.normed_mlp_act(x_attn, out, &layer.mlp_norm, &layer.gate_up);
            x = x_mid;
            let mut down = self.project(act, &layer.w_down);
            if let Some(comm) = &self.comm {
                down = shard::all_reduce(&**comm, down);
            }
            delta = Some(down);
        }
        let (_, x) = self.residual_norm(x, delta, &self.final_norm);
        // The last layer selected the wanted rows; a model without layers selects them here.
        let x = match (rows_selected, wanted) {
            (true, _) => x,
            (false, Some(rows)) => x.select(0, rows),
            (false, None) => return None,
        };
        let logits = self.project(x, &self.lm_head);
        Some(match &self.comm {
            None => logits,
            Some(comm) => shard::gather_logits(&**comm, logits.cast(DType::F32), self.shard.vocab_size),
        })
    }

    /// Groups the step's queries for attention: single-token decodes of similar context length
    /// go together (one batched pass per group, whatever the batch size), each prompt chunk on
    /// its own. Built once per step and shared by every layer: the groups and `unpermute` of
    /// [`AttentionLayout`], their integer arrays pushed into `ix` (uploaded with the step's).
    fn attention_groups(
        &self,
        cache: &PagedKvCache<B>,
        contexts: Vec<ChunkContext<'_>>,
        t_total: usize,
        ix: &mut StepIndices,
    ) -> (Vec<AttentionGroup<B>>, Option<IndexId>) {
        let (dev, page_size) = (&self.device, cache.page_size());
        let (window, group) = (self.config.sliding_window, self.shard.group_size());
        let decodes: Vec<usize> = (0..contexts.len()).filter(|&i| contexts[i].q_len == 1).collect();
        let lens: Vec<usize> = decodes.iter().map(|&i| contexts[i].ctx_len()).collect();
        let mut groups = Vec::new();
        // Token rows in the order the groups produce them.
        let mut grouped_rows: Vec<i32> = Vec::with_capacity(t_total);
        let paged = self.paged_attention.is_some() && cache.storage() == KvStorage::Device;
        let through_pages =
            |c: &ChunkContext| paged && (c.q_len == 1 || c.q_len * c.ctx_len() <= PAGED_CHUNK_MAX_WORK);
        let members: Vec<&ChunkContext> = contexts.iter().filter(|c| through_pages(c)).collect();
        if !members.is_empty() {
            let (n, max_blocks) = (members.len(), members.iter().map(|m| m.block_table.len()).max());
            let max_blocks = max_blocks.unwrap_or(1).max(1);
            let mut tables = Vec::with_capacity(n * max_blocks);
            let (mut rows, mut query_seq) = (Vec::new(), Vec::new());
            let (mut begin, mut end) = (Vec::new(), Vec::new());
            for (seq, m) in members.iter().enumerate() {
                tables.extend(m.block_table.iter().map(|&p| p as i32));
                tables.extend(std::iter::repeat_n(0, max_blocks - m.block_table.len()));
                for j in 0..m.q_len {
                    // Query `j` sees positions up to its own, within the window if there is one.
                    let pos = m.start_pos + j;
                    rows.push((m.q_start + j) as i32);
                    query_seq.push(seq as i32);
                    begin.push(window.map_or(0, |w| (pos + 1).saturating_sub(w)) as i32);
                    end.push((pos + 1) as i32);
                }
            }
            let every_row = rows.len() == t_total && rows.iter().enumerate().all(|(i, &r)| r as usize == i);
            grouped_rows.extend_from_slice(&rows);
            groups.push(AttentionGroup::Paged {
                rows: (!every_row).then(|| ix.push(rows)),
                block_tables: ix.push(tables),
                table_dims: [n, max_blocks],
                query_seq: ix.push(query_seq),
                ctx_begin: ix.push(begin),
                ctx_end: ix.push(end),
            });
        }
        // A lone decode stays with the gather and Flex's batched matmul, measured faster for it
        // (docs/Performance.md, "Decode attention over host pages").
        let on_host = cache.storage() == KvStorage::Host && decodes.len() >= 2;
        if on_host {
            let rows: Vec<i32> = decodes.iter().map(|&i| contexts[i].q_start as i32).collect();
            grouped_rows.extend_from_slice(&rows);
            groups.push(AttentionGroup::HostDecode {
                rows: ix.push(rows),
                contexts: decodes
                    .iter()
                    .map(|&i| contexts[i].ctx_slots(page_size))
                    .collect(),
            });
        }
        let gathered_decodes = if paged || on_host {
            Vec::new()
        } else {
            decode_groups(&lens)
        };
        for members in gathered_decodes {
            let members: Vec<&ChunkContext> = members.iter().map(|&m| &contexts[decodes[m]]).collect();
            let ctx_len = members.iter().map(|m| m.ctx_len()).max().unwrap_or(0);
            let mut slots = Vec::with_capacity(members.len() * ctx_len);
            let mut mask = Vec::with_capacity(members.len() * ctx_len);
            for m in &members {
                // Padding repeats a slot of the sequence itself (any valid row) and is masked out.
                let ctx = m.ctx_slots(page_size);
                let pad = ctx_len - ctx.len();
                slots.extend_from_slice(&ctx);
                slots.extend(std::iter::repeat_n(ctx[0], pad));
                mask.extend(std::iter::repeat_n(0.0f32, ctx.len()));
                mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, pad));
                grouped_rows.push(m.q_start as i32);
            }
            let n = members.len();
            let padded = members.iter().any(|m| m.ctx_len() < ctx_len);
            groups.push(AttentionGroup::Decode {
                rows: ix.push(members.iter().map(|m| m.q_start as i32).collect()),
                n,
                ctx_len,
                slots: cache.slot_index(slots),
                mask: padded.then(|| {
                    Tensor::<B, 2>::from_data(TensorData::new(mask, [n, ctx_len]), (dev, self.dtype))
                        .reshape([n, 1, 1, ctx_len])
                }),
            });
        }
        for ctx in contexts.into_iter().filter(|c| c.q_len > 1 && !through_pages(c)) {
            grouped_rows.extend((ctx.q_start..ctx.q_start + ctx.q_len).map(|r| r as i32));
            if cache.storage() == KvStorage::Host {
                groups.push(AttentionGroup::HostChunk {
                    q_start: ctx.q_start,
                    q_len: ctx.q_len,
                    slots: ctx.ctx_slots(page_size),
                    first_query: ctx.start_pos - ctx.ctx_start,
                    first_position: ctx.ctx_start,
                });
                continue;
            }
            groups.push(AttentionGroup::Chunk(AttentionPlan {
                q_start: ctx.q_start,
                q_len: ctx.q_len,
                ctx_len: ctx.ctx_len(),
                mask: attention_mask(
                    ctx.ctx_start,
                    ctx.start_pos,
                    ctx.q_len,
                    window,
                    group,
                    dev,
                    self.dtype,
                ),
                ctx_slots: cache.slot_index(ctx.ctx_slots(page_size)),
            }));
        }
        // Output row `r` of the step is row `position_of[r]` of the groups' concatenation.
        let mut position_of = vec![0i32; t_total];
        for (i, &r) in grouped_rows.iter().enumerate() {
            position_of[r as usize] = i as i32;
        }
        let in_order = position_of.iter().enumerate().all(|(i, &p)| i as i32 == p);
        (groups, (!in_order).then(|| ix.push(position_of)))
    }

    /// Attention of each sequence's queries over its whole context, read through its slots:
    /// `[tokens, q_dim]` in the step's token order.
    fn attention(
        &self,
        cache: &PagedKvCache<B>,
        layer: usize,
        q: Tensor<B, 3>,
        layout: &AttentionLayout<B>,
    ) -> Tensor<B, 2> {
        let s = &self.shard;
        let (nh, nkv, hd, g) = (
            s.num_heads(),
            s.num_kv_heads(),
            self.config.head_dim,
            s.group_size(),
        );
        let scale = (hd as f64).powf(-0.5);
        let ints = |id: &IndexId| layout.indices.get(*id);
        let outputs: Vec<Tensor<B, 2>> = layout
            .groups
            .iter()
            .map(|group| match group {
                AttentionGroup::Paged {
                    rows,
                    block_tables,
                    table_dims,
                    query_seq,
                    ctx_begin,
                    ctx_end,
                } => {
                    let attend = self
                        .paged_attention
                        .as_ref()
                        .expect("paged groups are planned only with a decode attention");
                    let (k_cache, v_cache) = cache
                        .device_layer(layer)
                        .expect("paged groups are planned only for a device cache");
                    attend(PagedAttention {
                        q: match rows {
                            Some(rows) => q.clone().select(0, ints(rows)),
                            None => q.clone(),
                        },
                        k_cache,
                        v_cache,
                        block_tables: ints(block_tables).reshape(*table_dims),
                        query_seq: ints(query_seq),
                        ctx_begin: ints(ctx_begin),
                        ctx_end: ints(ctx_end),
                        page_size: cache.page_size(),
                        kv_heads: nkv,
                        scale: scale as f32,
                    })
                }
                AttentionGroup::HostDecode { rows, contexts } => {
                    let n = contexts.len();
                    let q = q.clone().select(0, ints(rows)).into_data().convert::<f32>();
                    let q = q.as_slice::<f32>().expect("f32 queries");
                    let out = cache
                        .attend_decodes(layer, q, contexts, [nh, hd], scale as f32)
                        .expect("host decodes are planned only for host storage");
                    Tensor::from_data(TensorData::new(out, [n, nh * hd]), (&self.device, self.dtype))
                }
                AttentionGroup::HostChunk {
                    q_start,
                    q_len,
                    slots,
                    first_query,
                    first_position,
                } => {
                    let q = q
                        .clone()
                        .slice([*q_start..q_start + q_len, 0..nh, 0..hd])
                        .into_data()
                        .convert::<f32>();
                    let chunk = ChunkQueries {
                        q: q.as_slice::<f32>().expect("f32 queries"),
                        slots,
                        first_query: *first_query,
                        first_position: *first_position,
                        window: self.config.sliding_window,
                    };
                    let out = cache
                        .attend_chunk(layer, &chunk, [nh, hd], scale as f32)
                        .expect("host chunks are planned only for host storage");
                    Tensor::from_data(
                        TensorData::new(out, [*q_len, nh * hd]),
                        (&self.device, self.dtype),
                    )
                }
                AttentionGroup::Decode {
                    rows,
                    n,
                    ctx_len,
                    slots,
                    mask,
                } => {
                    let (n, l) = (*n, *ctx_len);
                    // [n, nh, hd] -> [n, nkv, g, hd]: query head h uses KV head h / g.
                    let q = q.clone().select(0, ints(rows)).reshape([n, nkv, g, hd]);
                    let (k, v) = cache.gather(layer, slots);
                    let k = k.reshape([n, l, nkv, hd]).permute([0, 2, 3, 1]); // [n, nkv, hd, l]
                    let v = v.reshape([n, l, nkv, hd]).swap_dims(1, 2); // [n, nkv, l, hd]
                    let mut scores = q.matmul(k).mul_scalar(scale);
                    if let Some(mask) = mask {
                        scores = scores + mask.clone();
                    }
                    softmax(scores, 3).matmul(v).reshape([n, nh * hd])
                }
                AttentionGroup::Chunk(p) => {
                    let (t, l) = (p.q_len, p.ctx_len);
                    // [t, nh, hd] -> [nkv, g * t, hd], as HF's repeat_kv pairs heads.
                    let q = q
                        .clone()
                        .slice([p.q_start..p.q_start + t, 0..nh, 0..hd])
                        .reshape([t, nkv, g, hd])
                        .permute([1, 2, 0, 3])
                        .reshape([nkv, g * t, hd]);
                    let (k, v) = cache.gather(layer, &p.ctx_slots);
                    let k = k.reshape([l, nkv, hd]).permute([1, 2, 0]); // [nkv, hd, l]
                    let v = v.reshape([l, nkv, hd]).swap_dims(0, 1); // [nkv, l, hd]
                    let mut scores = q.matmul(k).mul_scalar(scale);
                    if let Some(mask) = &p.mask {
                        scores = scores + mask.clone().unsqueeze_dim::<3>(0);
                    }
                    softmax(scores, 2)
                        .matmul(v)
                        .reshape([nkv, g, t, hd])
                        .permute([2, 0, 1, 3])
                        .reshape([t, nh * hd])
                }
            })
            .collect();
        let out = match <[_; 1]>::try_from(outputs) {
            Ok([only]) => only,
            Err(outputs) => Tensor::cat(outputs, 0),
        };
        match &layout.unpermute {
            Some(order) => out.select(0, ints(order)),
            None => out,
        }
    }

    /// The attention's input in one launch by `norm_qkv_write` where it is set and takes the
    /// step: the residual stream after the add, and the layer's queries after RoPE, its K and V
    /// rows stored. `Err` hands `x` and `delta` back, nothing done: no hook, q/k/v not merged or
    /// with a bias or q/k norms, host storage, or a refusal.
    fn fused_attention_input(
        &self,
        cache: &mut PagedKvCache<B>,
        layer_idx: usize,
        slots: &WriteSlots<B>,
        (x, delta): (Tensor<B, 2>, Option<Tensor<B, 2>>),
        rope: &RopeAngles<B>,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 3>), ResidualInput<B>> {
        let layer = &self.layers[layer_idx];
        let hook = self.fused.as_ref().and_then(|f| f.norm_qkv_write.as_ref());
        let (Some(hook), Qkv::Merged { w, bias: None }, None) = (hook, &layer.qkv, &layer.qk_norm) else {
            return Err((x, delta));
        };
        let mut done = None;
        cache.write_device(layer_idx, slots, |k_cache, v_cache, index| {
            let input = NormQkvWrite {
                input: NormProject {
                    x: x.clone(),
                    delta: delta.clone(),
                    gain: layer.attn_norm.clone(),
                    eps: self.config.rms_norm_eps,
                    w: w.clone(),
                    swiglu: false,
                },
                write: self.kv_write(rope, index, [k_cache, v_cache]),
            };
            match hook(input) {
                Ok(written) => {
                    done = Some((written.x, written.q));
                    (written.k_cache, written.v_cache)
                }
                Err(caches) => {
                    let [k_cache, v_cache] = *caches;
                    (k_cache, v_cache)
                }
            }
        });
        done.ok_or((x, delta))
    }

    /// The residual stream after the add before the attention's norm, and the layer's q, k and v
    /// rows (`[tokens, width]` each, biases added): column views of one product when the
    /// projections are merged, which the norm then runs inside where `norm_project` takes it.
    fn normed_qkv(
        &self,
        x: Tensor<B, 2>,
        delta: Option<Tensor<B, 2>>,
        gain: &Tensor<B, 1>,
        qkv: &Qkv<B>,
    ) -> (Tensor<B, 2>, [Tensor<B, 2>; 3]) {
        let (q, k, v, bias) = match qkv {
            Qkv::Merged { w, bias } => {
                if let Some((x, product)) = self.norm_project(&x, &delta, gain, w, false) {
                    return (x, self.split_qkv(product, bias));
                }
                let (x, h) = self.residual_norm(x, delta, gain);
                return (x, self.split_qkv(self.project(h, w), bias));
            }
            Qkv::Apart { q, k, v, bias } => (q, k, v, bias),
        };
        let (x, h) = self.residual_norm(x, delta, gain);
        let (mut q, mut k, mut v) = (
            self.project(h.clone(), q),
            self.project(h.clone(), k),
            self.project(h, v),
        );
        if let Some([bq, bk, bv]) = bias {
            q = q + bq.clone().unsqueeze_dim::<2>(0);
            k = k + bk.clone().unsqueeze_dim::<2>(0);
            v = v + bv.clone().unsqueeze_dim::<2>(0);
        }
        (x, [q, k, v])
    }

    /// q, k and v as column views of the merged projection's product, its bias added.
    fn split_qkv(&self, mut qkv: Tensor<B, 2>, bias: &Option<Tensor<B, 1>>) -> [Tensor<B, 2>; 3] {
        if let Some(b) = bias {
            qkv = qkv + b.clone().unsqueeze_dim::<2>(0);
        }
        let [t, width] = qkv.dims();
        let q_dim = self.shard.num_heads() * self.config.head_dim;
        let kv_dim = (width - q_dim) / 2;
        [
            qkv.clone().slice([0..t, 0..q_dim]),
            qkv.clone().slice([0..t, q_dim..q_dim + kv_dim]),
            qkv.slice([0..t, q_dim + kv_dim..width]),
        ]
    }

    /// The residual stream after the add before the MLP's norm (of the attention's output
    /// `delta`), and the MLP's activation `silu(h · gate) · (h · up)` of the normalised rows `h`:
    /// inside the merged gate/up projection where `norm_project` takes it, else by
    /// `gate_up_act`'s one launch where that takes it, else the projection, then `silu_mul`.
    fn normed_mlp_act(
        &self,
        x: Tensor<B, 2>,
        delta: Tensor<B, 2>,
        gain: &Tensor<B, 1>,
        gate_up: &GateUp<B>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let delta = Some(delta);
        if let (GateUp::Merged(w), Some(f)) = (gate_up, &self.fused) {
            let swiglu = f.gate_up_act.is_some();
            if let Some((x, product)) = self.norm_project(&x, &delta, gain, w, swiglu) {
                return (x, if swiglu { product } else { (f.silu_mul)(product) });
            }
        }
        let (x, h) = self.residual_norm(x, delta, gain);
        let act = match (gate_up, &self.fused) {
            (GateUp::Merged(w), Some(f)) => {
                let fused = f.gate_up_act.as_ref().and_then(|act| act(h.clone(), w.clone()));
                fused.unwrap_or_else(|| (f.silu_mul)(self.project(h, w)))
            }
            (GateUp::Merged(w), None) => silu_mul_halves(self.project(h, w)),
            (GateUp::Apart { gate, up }, _) => silu_mul(self.project(h.clone(), gate), self.project(h, up)),
        };
        (x, act)
    }

    /// `(x + delta, product)` by the fused `norm_project` when one is set and takes the rows.
    fn norm_project(
        &self,
        x: &Tensor<B, 2>,
        delta: &Option<Tensor<B, 2>>,
        gain: &Tensor<B, 1>,
        w: &Tensor<B, 2>,
        swiglu: bool,
    ) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        let f = self.fused.as_ref()?.norm_project.as_ref()?;
        f(NormProject {
            x: x.clone(),
            delta: delta.clone(),
            gain: gain.clone(),
            eps: self.config.rms_norm_eps,
            w: w.clone(),
            swiglu,
        })
    }

    /// `(x + delta, rms_norm(x + delta))`, or `(x, rms_norm(x))` without a delta.
    fn residual_norm(
        &self,
        x: Tensor<B, 2>,
        delta: Option<Tensor<B, 2>>,
        gain: &Tensor<B, 1>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        match delta {
            Some(delta) => self.add_rms_norm(x, delta, gain),
            None => {
                let h = self.rms_norm(x.clone(), gain);
                (x, h)
            }
        }
    }

    /// Returns the layer's queries after RoPE (`[tokens, heads, head_dim]`) and stores its new K
    /// (after RoPE) and V rows: in one launch by the fused K/V write when one is set and the cache
    /// is on the device, else RoPE of each then the cache's write.
    fn rope_qk_and_write_kv(
        &self,
        cache: &mut PagedKvCache<B>,
        layer: usize,
        slots: &WriteSlots<B>,
        [q, k, v]: [Tensor<B, 2>; 3],
        rope: &RopeAngles<B>,
    ) -> Tensor<B, 3> {
        let (nh, nkv, hd) = (
            self.shard.num_heads(),
            self.shard.num_kv_heads(),
            self.config.head_dim,
        );
        // Moved into the fused write when the cache is on the device, not cloned against the
        // host cache's path.
        let mut rows = Some([q, k, v]);
        if let Some(write) = self.fused.as_ref().and_then(|f| f.qkv_write.as_ref()) {
            let mut roped_q = None;
            cache.write_device(layer, slots, |k_cache, v_cache, index| {
                let rows = rows.take().expect("q, k and v until the write");
                let (q, k_cache, v_cache) =
                    write(self.kv_write(rope, index, [k_cache, v_cache]).with_rows(rows));
                roped_q = Some(q);
                (k_cache, v_cache)
            });
            if let Some(q) = roped_q {
                return q;
            }
        }
        let [q, k, v] = rows.expect("q, k and v when the fused write did not take them");
        let t = q.dims()[0];
        let q = self.rope(q.reshape([t, nh, hd]), rope);
        let k = self.rope(k.reshape([t, nkv, hd]), rope).reshape([t, nkv * hd]);
        cache.write(layer, slots, k, v);
        q
    }

    /// This rank's write of the step's K and V rows into `caches` at `slots`, with the step's RoPE.
    fn kv_write(
        &self,
        rope: &RopeAngles<B>,
        slots: Tensor<B, 2, Int>,
        [k_cache, v_cache]: [Tensor<B, 2>; 2],
    ) -> KvWrite<B> {
        KvWrite {
            heads: self.shard.num_heads(),
            kv_heads: self.shard.num_kv_heads(),
            rope: rope.clone(),
            slots,
            k_cache,
            v_cache,
        }
    }

    /// [`rotate_half_rope`] by the fused kernel when one is set.
    fn rope(&self, x: Tensor<B, 3>, rope: &RopeAngles<B>) -> Tensor<B, 3> {
        let [cos, sin] = rope.rows();
        match &self.fused {
            Some(f) => (f.rope)(x, cos, sin),
            None => rotate_half_rope(x, &cos, &sin),
        }
    }

    /// [`add_rms_norm`] by the fused kernel when one is set.
    fn add_rms_norm(
        &self,
        x: Tensor<B, 2>,
        delta: Tensor<B, 2>,
        weight: &Tensor<B, 1>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        match &self.fused {
            Some(f) => (f.add_rms_norm)(x, delta, weight.clone(), self.config.rms_norm_eps),
            None => add_rms_norm(x, delta, weight.clone(), self.config.rms_norm_eps),
        }
    }

    /// [`rms_norm`] by the fused kernel when one is set.
    fn rms_norm(&self, x: Tensor<B, 2>, weight: &Tensor<B, 1>) -> Tensor<B, 2> {
        match &self.fused {
            Some(f) => (f.rms_norm)(x, weight.clone(), self.config.rms_norm_eps),
            None => rms_norm(x, weight.clone(), self.config.rms_norm_eps),
        }
    }
}

/// RMSNorm as transformers computes it: the statistics in f32 whatever `x`'s dtype, the
/// normalised rows cast back to it, then multiplied by `weight [width]`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let dtype = x.dtype();
    let xf = if dtype == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    };
    let inv_rms = xf
        .clone()
        .powi_scalar(2)
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    let normed = (xf * inv_rms).cast(dtype);
    normed * weight.unsqueeze_dim::<2>(0)
}

/// The residual add then [`rms_norm`]: `(x + delta, rms_norm(x + delta))`, the sum in `x`'s type.
pub fn add_rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    delta: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let sum = x + delta;
    (sum.clone(), rms_norm(sum, weight, eps))
}

/// [`QkvWrite`] in burn's ops: RoPE of `q` and `k`, then a `scatter_nd` of K and of V into the
/// caches.
pub fn rope_qk_and_write_kv<B: Backend>(a: QkvWrite<B>) -> (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 2>) {
    let QkvWrite { q, k, v, write: w } = a;
    let [t, q_dim] = q.dims();
    let hd = q_dim / w.heads;
    let [cos, sin] = w.rope.rows();
    let q = rotate_half_rope(q.reshape([t, w.heads, hd]), &cos, &sin);
    let k = rotate_half_rope(k.reshape([t, w.kv_heads, hd]), &cos, &sin).reshape([t, w.kv_heads * hd]);
    (
        q,
        w.k_cache.scatter_nd(w.slots.clone(), k, IndexingUpdateOp::Assign),
        w.v_cache.scatter_nd(w.slots, v, IndexingUpdateOp::Assign),
    )
}

/// Projections that read the same input as one: `parts` (logical `[in, out_i]` each, kept as
/// `layout` says) side by side, `[in, sum of out_i]`, whose product's columns are the parts'
/// products in order.
fn merge_outputs<B: Backend, const N: usize>(
    layout: WeightLayout,
    parts: [&Tensor<B, 2>; N],
) -> Tensor<B, 2> {
    let parts = parts.into_iter().cloned();
    match layout {
        WeightLayout::InOut => Tensor::cat(parts.collect(), 1),
        // Keep the `[out, in]` rows contiguous: concatenate the stored tensors.
        WeightLayout::OutIn => Tensor::cat(parts.map(|p| p.transpose()).collect(), 0).transpose(),
    }
}

/// The MLP's activation: `silu(gate) · up`.
pub fn silu_mul<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(gate) * up
}

/// [`silu_mul`] of the merged gate/up product `[rows, 2 * intermediate]`: each row's first half
/// is gate, its second half up.
pub fn silu_mul_halves<B: Backend>(gate_up: Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, width] = gate_up.dims();
    let half = width / 2;
    let gate = gate_up.clone().slice([0..rows, 0..half]);
    silu_mul(gate, gate_up.slice([0..rows, half..width]))
}

/// [`PagedAttention`] in burn's ops, one query at a time: the slots of `ctx_begin..ctx_end`
/// found through its sequence's block table and gathered, then softmax attention with each KV head serving
/// its group of query heads. The fallback of a paged kernel that refuses a step, and the
/// reference its plumbing is tested against (`tests/model_goldens.rs`); it reads the tables back
/// to the host, so it is not a fast path.
pub fn gathered_paged_attention<B: Backend>(a: PagedAttention<B>) -> Tensor<B, 2> {
    let [n, heads, hd] = a.q.dims();
    let (kv, ps) = (a.kv_heads, a.page_size);
    let [seqs, max_blocks] = a.block_tables.dims();
    let ints = |t: Tensor<B, 1, Int>| t.into_data().iter::<i64>().collect::<Vec<i64>>();
    let tables = ints(a.block_tables.reshape([seqs * max_blocks]));
    let (query_seq, begin, end) = (ints(a.query_seq), ints(a.ctx_begin), ints(a.ctx_end));
    let device = a.q.device();
    let rows: Vec<Tensor<B, 2>> = (0..n)
        .map(|s| {
            let table = &tables[query_seq[s] as usize * max_blocks..][..max_blocks];
            let slots: Vec<i32> = (begin[s] as usize..end[s] as usize)
                .map(|p| (table[p / ps] as usize * ps + p % ps) as i32)
                .collect();
            let len = slots.len();
            let index = int_tensor(slots, &device);
            let k = a.k_cache.clone().select(0, index.clone()).reshape([len, kv, hd]);
            let v = a.v_cache.clone().select(0, index).reshape([len, kv, hd]);
            let q = a.q.clone().narrow(0, s, 1).reshape([kv, heads / kv, hd]);
            let scores = q.matmul(k.permute([1, 2, 0])).mul_scalar(a.scale);
            softmax(scores, 2)
                .matmul(v.swap_dims(0, 1))
                .reshape([1, heads * hd])
        })
        .collect();
    Tensor::cat(rows, 0)
}

/// Splits decodes with context lengths `lens` into groups attended in one batched pass each,
/// as indices into `lens`. Contexts are padded to the group's longest, so a group takes
/// sequences in order of length while the padded size stays within twice the real one: a long
/// context never pads many short ones, and equal lengths always share one group.
pub(crate) fn decode_groups(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut real = 0;
    for i in order {
        let len = lens[i];
        match groups.last_mut() {
            // Sorted ascending: `len` is the group's longest once added.
            Some(g) if (g.len() + 1) * len <= 2 * (real + len) => {
                g.push(i);
                real += len;
            }
            _ => {
                groups.push(vec![i]);
                real = len;
            }
        }
    }
    groups
}

/// The cache slot of position `pos` of a sequence: page `block_table[pos / page_size]`.
fn slot_of(block_table: &[u32], page_size: usize, pos: usize) -> i32 {
    (block_table[pos / page_size] as usize * page_size + pos % page_size) as i32
}

/// How the step's token ids reach the device (for one rank's embedding): `tokens`, with the
/// fed-back ones taken from `fed.ids` so that nothing waits for the step that sampled them.
enum TokenIds {
    /// Every token from the host.
    Host(IndexId),
    /// Every token fed, and `fed.ids` in the step's order (overlapped decoding's steady state):
    /// the fed ids as they are, no launch, no upload.
    Fed,
    /// Every token fed, gathered from `fed.ids` at these indices (one launch).
    FedGathered(IndexId),
    /// Tokens of the step's own (a prompt chunk) and fed ones: a gather over
    /// `tokens ++ fed.ids` at `gather` (a concatenation and a gather).
    Mixed { tokens: IndexId, gather: IndexId },
}

impl TokenIds {
    /// `last_token[chunk]` is where chunk `chunk`'s last token is in `tokens`; the arrays the
    /// plan needs are pushed into `ix`.
    fn plan<B: Backend>(
        tokens: &[i32],
        last_token: &[usize],
        fed: Option<&FedTokens<B>>,
        ix: &mut StepIndices,
    ) -> Self {
        let Some(fed) = fed else {
            return Self::Host(ix.push(tokens.to_vec()));
        };
        let n = tokens.len();
        let mut fed_at: Vec<Option<i32>> = vec![None; n];
        for &(chunk, at) in &fed.last_of_chunk {
            fed_at[last_token[chunk]] = Some(at as i32);
        }
        if let Some(at) = fed_at.iter().copied().collect::<Option<Vec<i32>>>() {
            let in_order = at.iter().enumerate().all(|(i, &a)| a == i as i32);
            return match in_order && fed.ids.dims()[0] == n {
                true => Self::Fed,
                false => Self::FedGathered(ix.push(at)),
            };
        }
        let gather = (0..n)
            .map(|i| fed_at[i].map_or(i as i32, |at| n as i32 + at))
            .collect();
        Self::Mixed {
            tokens: ix.push(tokens.to_vec()),
            gather: ix.push(gather),
        }
    }

    /// The ids on the device, once `indices` holds the plan's arrays.
    fn on_device<B: Backend>(
        self,
        fed: Option<&FedTokens<B>>,
        indices: &UploadedIndices<B>,
    ) -> Tensor<B, 1, Int> {
        // The fed ids in the backend's own int type (the argmax kernel's are i32).
        let dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let fed_ids = || {
            let ids = fed.expect("a plan with fed tokens has them").ids.clone();
            match ids.dtype() == dtype {
                true => ids,
                false => ids.cast(dtype),
            }
        };
        match self {
            Self::Host(tokens) => indices.get(tokens),
            Self::Fed => fed_ids(),
            Self::FedGathered(at) => fed_ids().select(0, indices.get(at)),
            Self::Mixed { tokens, gather } => {
                let host = indices.get(tokens);
                Tensor::cat(vec![host.clone(), fed_ids().cast(host.dtype())], 0)
                    .select(0, indices.get(gather))
            }
        }
    }
}

/// `-inf` where query `j` (at `start + j`) must not see key position `ctx_start + l`: a later
/// position, or one `window` or more behind it. Rows are ordered head-major for every query head
/// of a KV group, as `attention` lays them out. `None` when every query sees every key.
fn attention_mask<B: Backend>(
    ctx_start: usize,
    start: usize,
    q_len: usize,
    window: Option<usize>,
    group: usize,
    device: &B::Device,
    dtype: DType,
) -> Option<Tensor<B, 2>> {
    let ctx_end = start + q_len;
    let visible = |q: usize, k: usize| k <= q && window.is_none_or(|w| q - k < w);
    let all_visible = (start..ctx_end).all(|q| visible(q, ctx_start) && visible(q, ctx_end - 1));
    if all_visible {
        return None;
    }
    let ctx = ctx_end - ctx_start;
    let mut values = Vec::with_capacity(group * q_len * ctx);
    for _ in 0..group {
        for q in start..ctx_end {
            values
                .extend((ctx_start..ctx_end).map(|k| if visible(q, k) { 0.0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Some(Tensor::from_data(
        TensorData::new(values, [group * q_len, ctx]),
        (device, dtype),
    ))
}

/// RoPE inverse frequencies in f32, as transformers computes them (`_compute_default_rope_parameters`
/// and `_compute_llama3_parameters`).
fn rope_inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
            let old_len = original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (old_len / low, old_len / high);
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos/sin tables `[max_pos, head_dim]` computed in f32 as transformers does.
fn rope_tables(inv_freq: &[f32], max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let head_dim = inv_freq.len() * 2;
    let mut cos = Vec::with_capacity(max_pos * head_dim);
    let mut sin = Vec::with_capacity(max_pos * head_dim);
    for p in 0..max_pos {
        for _ in 0..2 {
            for f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// `x * cos + rotate_half(x) * sin`, where rotate_half pairs element `i` with `i + d/2`.
pub fn rotate_half_rope<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [t, heads, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..t, 0..heads, 0..half]);
    let x2 = x.clone().slice([0..t, 0..heads, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.clone() + rotated * sin.clone()
}

#[cfg(test)]
mod tests {
    use super::decode_groups;

    /// A step's angles keep the first prepared value for every later caller of its type, clones
    /// included (the layers' K/V writes hold clones), and make a value of another type afresh.
    #[test]
    fn paged_kv_rope_angles_prepare_once_per_step() {
        use super::RopeAngles;
        use burn::tensor::{Int, Tensor};
        type Cpu = burn::backend::Flex;
        let device = Default::default();
        let table = Tensor::<Cpu, 2>::zeros([4, 2], &device);
        let rope = RopeAngles::new(Tensor::<Cpu, 1, Int>::zeros([1], &device), table.clone(), table);
        let made = std::cell::Cell::new(0);
        let make = |v: u32| {
            made.set(made.get() + 1);
            v
        };
        assert_eq!(*rope.prepared(|| make(1)), 1);
        assert_eq!(
            *rope.clone().prepared(|| make(2)),
            1,
            "a clone shares the step's value"
        );
        assert_eq!(made.get(), 1);
        assert_eq!(*rope.prepared(|| String::from("other")), "other");
        assert_eq!(*rope.prepared(|| make(3)), 1, "another type's value is not kept");
        assert_eq!(made.get(), 1);
        let next_step = RopeAngles::new(
            rope.positions.clone(),
            rope.cos_table.clone(),
            rope.sin_table.clone(),
        );
        assert_eq!(*next_step.prepared(|| make(4)), 4);
    }

    #[test]
    fn unified_batch_decode_groups_cover_every_sequence_once_with_bounded_padding() {
        for lens in [
            vec![],
            vec![5],
            vec![7, 7, 7, 7],
            vec![3, 100, 4, 90, 5, 2000, 6],
            (1..300).map(|i| (i * 37) % 1000 + 1).collect::<Vec<_>>(),
        ] {
            let groups = decode_groups(&lens);
            let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>(), "{lens:?}");
            for g in &groups {
                let longest = g.iter().map(|&i| lens[i]).max().unwrap();
                let real: usize = g.iter().map(|&i| lens[i]).sum();
                assert!(
                    g.len() * longest <= 2 * real,
                    "{lens:?}: group {g:?} pads too much"
                );
            }
        }
        assert_eq!(decode_groups(&[7, 7, 7, 7]), vec![vec![0, 1, 2, 3]]);
        // A long context is not padded into the short ones.
        assert_eq!(decode_groups(&[3, 2000, 4]), vec![vec![0, 2], vec![1]]);
    }
}
