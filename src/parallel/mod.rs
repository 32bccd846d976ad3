//! Tensor-parallel execution: which part of the model a rank holds ([`ParallelContext`]) and how
//! ranks exchange activations ([`Communicator`]).
//!
//! Ranks run the same step over the same batch plan; each holds a slice of the heads, of the MLP
//! and of the vocabulary, and the communicator sums or gathers the partial results. See the
//! DeveloperGuide's "Tensor parallel" note for how the shards are cut.

pub mod comm;
pub mod local;
pub mod nccl;

use std::ops::Range;

pub use comm::{CommError, Communicator};
pub use local::LocalCommunicator;

/// Where one worker stands among the others: its tensor-parallel rank out of `tp_size`, and its
/// data-parallel replica out of `dp_size` (always 0 of 1 for now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelContext {
    pub tp_size: usize,
    pub tp_rank: usize,
    pub dp_size: usize,
    pub dp_rank: usize,
}

impl Default for ParallelContext {
    fn default() -> Self {
        Self::single()
    }
}

impl ParallelContext {
    /// One rank holding the whole model.
    pub fn single() -> Self {
        Self {
            tp_size: 1,
            tp_rank: 0,
            dp_size: 1,
            dp_rank: 0,
        }
    }

    /// Rank `tp_rank` of a tensor-parallel group of `tp_size`.
    pub fn tensor(tp_rank: usize, tp_size: usize) -> Self {
        assert!(tp_rank < tp_size, "rank {tp_rank} of {tp_size}");
        Self {
            tp_size,
            tp_rank,
            ..Self::single()
        }
    }

    pub fn is_tensor_parallel(&self) -> bool {
        self.tp_size > 1
    }

    /// This rank's even share of `0..n` (`n` a multiple of `tp_size`).
    pub fn even_range(&self, n: usize) -> Range<usize> {
        let per = n / self.tp_size;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// `n` rounded up to a multiple of `tp_size` (the padded vocabulary).
    pub fn padded(&self, n: usize) -> usize {
        n.div_ceil(self.tp_size) * self.tp_size
    }

    /// This rank's query heads.
    pub fn q_heads(&self, num_heads: usize) -> Range<usize> {
        self.even_range(num_heads)
    }

    /// This rank's KV heads: an even share when there are at least as many KV heads as ranks,
    /// else the one KV head its query heads read (replicated on `tp_size / num_kv_heads` ranks,
    /// as vLLM does): rank `r` uses KV head `r * num_kv_heads / tp_size`.
    pub fn kv_heads(&self, num_kv_heads: usize) -> Range<usize> {
        if self.tp_size <= num_kv_heads {
            self.even_range(num_kv_heads)
        } else {
            let h = self.tp_rank * num_kv_heads / self.tp_size;
            h..h + 1
        }
    }

    /// This rank's rows of the vocabulary padded to a multiple of `tp_size`; rows past
    /// `vocab_size` are padding (zero weights, logits dropped).
    pub fn vocab_rows(&self, vocab_size: usize) -> Range<usize> {
        self.even_range(self.padded(vocab_size))
    }

    /// Why `config`'s shapes cannot be split `tp_size` ways, if they cannot.
    pub fn check_divisible(
        &self,
        num_heads: usize,
        num_kv_heads: usize,
        intermediate_size: usize,
    ) -> Result<(), String> {
        let tp = self.tp_size;
        if !num_heads.is_multiple_of(tp) {
            return Err(format!(
                "num_attention_heads = {num_heads} is not divisible by tensor_parallel_size = {tp}"
            ));
        }
        if tp <= num_kv_heads && !num_kv_heads.is_multiple_of(tp) {
            return Err(format!(
                "num_key_value_heads = {num_kv_heads} is not divisible by tensor_parallel_size = {tp}"
            ));
        }
        if tp > num_kv_heads && !tp.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "tensor_parallel_size = {tp} is not a multiple of num_key_value_heads = {num_kv_heads}"
            ));
        }
        if !intermediate_size.is_multiple_of(tp) {
            return Err(format!(
                "intermediate_size = {intermediate_size} is not divisible by tensor_parallel_size = {tp}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_context_cuts_heads_vocab_and_replicates_kv() {
        let r = |rank| ParallelContext::tensor(rank, 4);
        assert_eq!(r(1).q_heads(8), 2..4);
        assert_eq!(r(3).kv_heads(8), 6..8);
        // 2 KV heads, 4 ranks: ranks 0,1 read head 0 and ranks 2,3 head 1.
        assert_eq!(
            (0..4).map(|i| r(i).kv_heads(2).start).collect::<Vec<_>>(),
            [0, 0, 1, 1]
        );
        assert_eq!(r(0).padded(389), 392);
        assert_eq!(r(3).vocab_rows(389), 294..392);
        assert!(r(0).check_divisible(4, 2, 160).is_ok());
        assert!(r(0).check_divisible(6, 2, 160).is_err());
        assert!(ParallelContext::tensor(0, 3).check_divisible(6, 2, 159).is_err());
    }
}
