//! The Llama decoder in burn, computing one step of a unified batch: prompt chunks and decode
//! tokens of many sequences in one pass.
//!
//! Projections and the MLP run once over all tokens of the step (`[T, hidden]`); attention runs
//! per sequence and reads K/V from the paged cache through that sequence's slot list, so the
//! model never holds a contiguous per-request cache. RoPE is Hugging Face's rotate-half layout.

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{DType, TensorData};

use super::config::LlamaConfig;
use super::paged_cache::PagedKvCache;
use super::weights::WeightIndex;
use super::ModelError;

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

struct LlamaLayer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    /// Projections stored `[in, out]`, so `x.matmul(w)`.
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    wo: Tensor<B, 2>,
    mlp_norm: Tensor<B, 1>,
    w_gate: Tensor<B, 2>,
    w_up: Tensor<B, 2>,
    w_down: Tensor<B, 2>,
}

/// Per-sequence attention inputs, built once per step and shared by every layer.
struct AttentionPlan<B: Backend> {
    q_start: usize,
    q_len: usize,
    ctx_len: usize,
    ctx_slots: Tensor<B, 1, Int>,
    /// Additive causal mask `[group * q_len, ctx_len]`; `None` for a single query token.
    mask: Option<Tensor<B, 2>>,
}

pub struct Llama<B: Backend> {
    config: LlamaConfig,
    device: B::Device,
    dtype: DType,
    embed: Tensor<B, 2>,
    layers: Vec<LlamaLayer<B>>,
    final_norm: Tensor<B, 1>,
    /// `[hidden, vocab]`.
    lm_head: Tensor<B, 2>,
    rope_cos: Tensor<B, 2>,
    rope_sin: Tensor<B, 2>,
}

impl<B: Backend> Llama<B> {
    /// Loads the weights of `config`'s model from `weights`, converted to `dtype` on `device`.
    pub fn load(
        config: &LlamaConfig,
        weights: &WeightIndex<'_>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let c = config;
        let (h, kv_dim, q_dim) = (
            c.hidden_size,
            c.num_kv_heads * c.head_dim,
            c.num_heads * c.head_dim,
        );
        let vector = |name: &str, n: usize| -> Result<Tensor<B, 1>, ModelError> {
            Ok(Tensor::from_data(
                weights.read(name, &[n], dtype)?,
                (device, dtype),
            ))
        };
        // HF Linear weights are `[out, in]`; transposing once here keeps every step's matmul plain.
        let linear = |name: &str, out_f: usize, in_f: usize| -> Result<Tensor<B, 2>, ModelError> {
            let data = weights.read_transposed(name, out_f, in_f, dtype)?;
            Ok(Tensor::from_data(data, (device, dtype)))
        };
        let embed_data = weights.read("model.embed_tokens.weight", &[c.vocab_size, h], dtype)?;
        let embed = Tensor::<B, 2>::from_data(embed_data, (device, dtype));
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(LlamaLayer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                wq: linear(&format!("{p}.self_attn.q_proj.weight"), q_dim, h)?,
                wk: linear(&format!("{p}.self_attn.k_proj.weight"), kv_dim, h)?,
                wv: linear(&format!("{p}.self_attn.v_proj.weight"), kv_dim, h)?,
                wo: linear(&format!("{p}.self_attn.o_proj.weight"), h, q_dim)?,
                mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                w_gate: linear(&format!("{p}.mlp.gate_proj.weight"), c.intermediate_size, h)?,
                w_up: linear(&format!("{p}.mlp.up_proj.weight"), c.intermediate_size, h)?,
                w_down: linear(&format!("{p}.mlp.down_proj.weight"), h, c.intermediate_size)?,
            });
        }
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            if !c.tie_word_embeddings {
                return Err(ModelError::Weights(
                    "missing tensor `lm_head.weight` and tie_word_embeddings is false".into(),
                ));
            }
            linear("model.embed_tokens.weight", c.vocab_size, h)?
        } else {
            linear("lm_head.weight", c.vocab_size, h)?
        };
        let (cos, sin) = rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta);
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
            embed,
            layers,
            final_norm: vector("model.norm.weight", h)?,
            lm_head,
            rope_cos: table(cos),
            rope_sin: table(sin),
        })
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

    /// Runs one step. Writes the K/V of every token into its page slot, and returns the logits
    /// `[n, vocab]` (f32) of the last token of each chunk with `wants_logits`, in chunk order.
    pub fn forward(&self, cache: &mut PagedKvCache<B>, chunks: &[SequenceChunk]) -> Tensor<B, 2> {
        let c = &self.config;
        let dev = &self.device;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let page_size = cache.page_size();

        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut logit_rows = Vec::new();
        let mut plans = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let q_start = tokens.len();
            for (j, &t) in chunk.tokens.iter().enumerate() {
                let pos = chunk.start_pos + j;
                tokens.push(t as i32);
                positions.push(pos as i32);
                slots.push(slot_of(&chunk.block_table, page_size, pos));
            }
            if chunk.wants_logits {
                logit_rows.push((tokens.len() - 1) as i32);
            }
            let ctx_len = chunk.end_pos();
            let ctx_slots: Vec<i32> = (0..ctx_len)
                .map(|p| slot_of(&chunk.block_table, page_size, p))
                .collect();
            plans.push(AttentionPlan {
                q_start,
                q_len: chunk.tokens.len(),
                ctx_len,
                ctx_slots: int_tensor(ctx_slots, dev),
                mask: causal_mask(
                    chunk.start_pos,
                    chunk.tokens.len(),
                    c.group_size(),
                    dev,
                    self.dtype,
                ),
            });
        }
        let t_total = tokens.len();
        let positions = int_tensor(positions, dev);
        let cos = self
            .rope_cos
            .clone()
            .select(0, positions.clone())
            .unsqueeze_dim::<3>(1);
        let sin = self.rope_sin.clone().select(0, positions).unsqueeze_dim::<3>(1);

        let mut x = self.embed.clone().select(0, int_tensor(tokens, dev));
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &layer.attn_norm);
            let q = h.clone().matmul(layer.wq.clone()).reshape([t_total, nh, hd]);
            let k = h.clone().matmul(layer.wk.clone()).reshape([t_total, nkv, hd]);
            let v = h.matmul(layer.wv.clone());
            let q = rotate_half_rope(q, &cos, &sin);
            let k = rotate_half_rope(k, &cos, &sin).reshape([t_total, nkv * hd]);
            cache.write(layer_idx, &slots, k, v);
            let attn = self.attention(cache, layer_idx, q, &plans);
            x = x + attn.matmul(layer.wo.clone());

            let h = self.rms_norm(x.clone(), &layer.mlp_norm);
            let gate = silu(h.clone().matmul(layer.w_gate.clone()));
            let up = h.matmul(layer.w_up.clone());
            x = x + (gate * up).matmul(layer.w_down.clone());
        }
        let x = self.rms_norm(x, &self.final_norm);
        let rows = int_tensor(logit_rows, dev);
        x.select(0, rows).matmul(self.lm_head.clone()).cast(DType::F32)
    }

    /// Attention of each sequence's queries over its whole context, read through its slots.
    fn attention(
        &self,
        cache: &PagedKvCache<B>,
        layer: usize,
        q: Tensor<B, 3>,
        plans: &[AttentionPlan<B>],
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let (nh, nkv, hd, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size());
        let scale = (hd as f64).powf(-0.5);
        let outputs: Vec<Tensor<B, 2>> = plans
            .iter()
            .map(|p| {
                let (t, l) = (p.q_len, p.ctx_len);
                // [t, nh, hd] -> [nkv, g * t, hd]: query head h uses KV head h / g, as HF's repeat_kv.
                let q = q
                    .clone()
                    .slice([p.q_start..p.q_start + t, 0..nh, 0..hd])
                    .reshape([t, nkv, g, hd])
                    .permute([1, 2, 0, 3])
                    .reshape([nkv, g * t, hd]);
                let (k, v) = cache.gather(layer, p.ctx_slots.clone());
                let k = k.reshape([l, nkv, hd]).permute([1, 2, 0]); // [nkv, hd, l]
                let v = v.reshape([l, nkv, hd]).swap_dims(0, 1); // [nkv, l, hd]
                let mut scores = q.matmul(k).mul_scalar(scale);
                if let Some(mask) = &p.mask {
                    scores = scores + mask.clone().unsqueeze_dim::<3>(0);
                }
                let probs = softmax(scores, 2);
                probs
                    .matmul(v)
                    .reshape([nkv, g, t, hd])
                    .permute([2, 0, 1, 3])
                    .reshape([t, nh * hd])
            })
            .collect();
        Tensor::cat(outputs, 0)
    }

    /// RMSNorm computed in f32 whatever the weights' dtype, as transformers does.
    fn rms_norm(&self, x: Tensor<B, 2>, weight: &Tensor<B, 1>) -> Tensor<B, 2> {
        let xf = if self.dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let inv_rms = xf
            .clone()
            .powi_scalar(2)
            .mean_dim(1)
            .add_scalar(self.config.rms_norm_eps)
            .sqrt()
            .recip();
        let normed = (xf * inv_rms).cast(self.dtype);
        normed * weight.clone().unsqueeze_dim::<2>(0)
    }
}

/// The cache slot of position `pos` of a sequence: page `block_table[pos / page_size]`.
fn slot_of(block_table: &[u32], page_size: usize, pos: usize) -> i32 {
    (block_table[pos / page_size] as usize * page_size + pos % page_size) as i32
}

fn int_tensor<B: Backend>(values: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// `-inf` where query `j` (at `start + j`) would see a later position, for every query head of a
/// KV group (rows ordered head-major, as `attention` lays them out).
fn causal_mask<B: Backend>(
    start: usize,
    q_len: usize,
    group: usize,
    device: &B::Device,
    dtype: DType,
) -> Option<Tensor<B, 2>> {
    if q_len <= 1 {
        return None;
    }
    let ctx = start + q_len;
    let mut values = Vec::with_capacity(group * q_len * ctx);
    for _ in 0..group {
        for j in 0..q_len {
            values.extend((0..ctx).map(|l| if l <= start + j { 0.0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Some(Tensor::from_data(
        TensorData::new(values, [group * q_len, ctx]),
        (device, dtype),
    ))
}

/// cos/sin tables `[max_pos, head_dim]` computed in f32 as transformers' default RoPE does.
fn rope_tables(head_dim: usize, max_pos: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(max_pos * head_dim);
    let mut sin = Vec::with_capacity(max_pos * head_dim);
    for p in 0..max_pos {
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// `x * cos + rotate_half(x) * sin`, where rotate_half pairs element `i` with `i + d/2`.
fn rotate_half_rope<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [t, heads, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..t, 0..heads, 0..half]);
    let x2 = x.clone().slice([0..t, 0..heads, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.clone() + rotated * sin.clone()
}
