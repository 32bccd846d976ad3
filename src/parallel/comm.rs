//! The collective operations tensor parallelism needs, on host `f32` buffers.
//!
//! Host buffers keep the trait backend-agnostic (the CPU backend's tensors live on the host
//! anyway); a GPU implementation moves them to its device and back (see `nccl`). Every rank of
//! a group must call the same operations in the same order with buffers of the same length.

/// Why a collective did not complete. After an error the group is poisoned: every rank's next
/// call fails too, until [`Communicator::reset`] once every rank has left the failed step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank} failed: {reason}")]
    Poisoned { rank: usize, reason: String },
    #[error("no answer from every rank within {0:?}")]
    Timeout(std::time::Duration),
    #[error("rank {rank} passed {got} values, rank 0 passed {want}")]
    Length { rank: usize, got: usize, want: usize },
    #[error("communicator backend: {0}")]
    Backend(String),
}

pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `buf` with the element-wise sum of every rank's `buf`, added in rank order so
    /// that every rank gets the same bits.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `local`, concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError>;
    /// Replaces `buf` with rank `root`'s `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Marks the group failed so that no rank waits for this one (called by a rank that failed
    /// outside a collective).
    fn poison(&self, reason: &str);
    /// Clears a poisoned state; only call when no rank is inside a collective.
    fn reset(&self);
}
