//! What one tensor-parallel rank holds of a Llama, and the collectives its forward pass calls.
//!
//! Megatron's cut: q/k/v and MLP gate/up are column-parallel (a rank holds some heads, some
//! intermediate features), o_proj and down_proj row-parallel (partial sums, all-reduced), and
//! the embedding and `lm_head` are split by vocabulary (padded to a multiple of the ranks). With
//! one rank every range is the whole dimension and no collective is called.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use super::config::LlamaConfig;
use super::ModelError;
use crate::parallel::{Communicator, ParallelContext};

/// This rank's ranges of every split dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub ctx: ParallelContext,
    /// Query heads (and the matching `o_proj` input columns).
    pub q_heads: Range<usize>,
    /// KV heads; the same head on several ranks when there are fewer KV heads than ranks.
    pub kv_heads: Range<usize>,
    /// MLP intermediate features.
    pub ffn: Range<usize>,
    /// Vocabulary rows of the embedding and `lm_head`, in the padded vocabulary.
    pub vocab: Range<usize>,
    pub vocab_size: usize,
}

impl Shard {
    pub fn new(c: &LlamaConfig, ctx: ParallelContext) -> Result<Self, ModelError> {
        ctx.check_divisible(c.num_heads, c.num_kv_heads, c.intermediate_size)
            .map_err(ModelError::Unsupported)?;
        Ok(Self {
            ctx,
            q_heads: ctx.q_heads(c.num_heads),
            kv_heads: ctx.kv_heads(c.num_kv_heads),
            ffn: ctx.even_range(c.intermediate_size),
            vocab: ctx.vocab_rows(c.vocab_size),
            vocab_size: c.vocab_size,
        })
    }

    pub fn num_heads(&self) -> usize {
        self.q_heads.len()
    }

    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }

    /// Query heads per KV head on this rank.
    pub fn group_size(&self) -> usize {
        self.num_heads() / self.num_kv_heads()
    }

    /// Rows of a `[heads * head_dim, ..]` projection for `heads`.
    pub fn head_rows(heads: &Range<usize>, head_dim: usize) -> Range<usize> {
        heads.start * head_dim..heads.end * head_dim
    }
}

fn comm_failed(what: &str, e: impl std::fmt::Display) -> ! {
    // The executor catches the unwind and fails the step; the other ranks see the group
    // poisoned when this rank's failure reaches them.
    panic!("tensor parallel {what} failed: {e}")
}

fn to_host<B: Backend>(x: Tensor<B, 2>) -> Vec<f32> {
    x.cast(DType::F32)
        .into_data()
        .to_vec::<f32>()
        .unwrap_or_else(|e| comm_failed("read-back", format!("{e:?}")))
}

/// Sums `x` (`[rows, cols]`, a row-parallel layer's partial output) over the ranks.
pub fn all_reduce<B: Backend>(comm: &dyn Communicator, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let (dims, dtype, device) = (x.dims(), x.dtype(), x.device());
    let mut values = to_host(x);
    if let Err(e) = comm.all_reduce_sum(&mut values) {
        comm_failed("all-reduce", e);
    }
    Tensor::<B, 2>::from_data(TensorData::new(values, dims), (&device, DType::F32)).cast(dtype)
}

/// Joins every rank's vocabulary slice of the logits (`[n, vocab_shard]`, f32) into
/// `[n, vocab_size]`, dropping the padding.
pub fn gather_logits<B: Backend>(
    comm: &dyn Communicator,
    local: Tensor<B, 2>,
    vocab_size: usize,
) -> Tensor<B, 2> {
    let ([n, shard], device) = (local.dims(), local.device());
    let all = comm
        .all_gather(&to_host(local))
        .unwrap_or_else(|e| comm_failed("all-gather", e));
    let mut rows = Vec::with_capacity(n * vocab_size);
    for i in 0..n {
        let mut row: Vec<f32> = (0..comm.size())
            .flat_map(|r| &all[(r * n + i) * shard..(r * n + i + 1) * shard])
            .copied()
            .collect();
        row.truncate(vocab_size);
        rows.extend(row);
    }
    Tensor::from_data(TensorData::new(rows, [n, vocab_size]), (&device, DType::F32))
}

/// Looks up `tokens` in this rank's vocabulary rows (zeros for the others' tokens) and sums over
/// the ranks: exactly one rank contributes each row, so the result equals a whole-table lookup.
pub fn embed_lookup<B: Backend>(
    comm: &dyn Communicator,
    embed: &Tensor<B, 2>,
    vocab: &Range<usize>,
    tokens: &[i32],
) -> Tensor<B, 2> {
    let device = embed.device();
    let local = |t: i32| vocab.contains(&(t as usize));
    let index: Vec<i32> = tokens
        .iter()
        .map(|&t| if local(t) { t - vocab.start as i32 } else { 0 })
        .collect();
    let mask: Vec<f32> = tokens.iter().map(|&t| if local(t) { 1.0 } else { 0.0 }).collect();
    let n = tokens.len();
    let rows = embed.clone().select(
        0,
        Tensor::<B, 1, Int>::from_data(TensorData::new(index, [n]), &device),
    );
    let mask =
        Tensor::<B, 2>::from_data(TensorData::new(mask, [n, 1]), (&device, DType::F32)).cast(rows.dtype());
    all_reduce(comm, rows * mask)
}
