//! [`NcclCommunicator`]: the [`Communicator`] over NCCL through `cudarc`, one rank per GPU
//! It keeps the trait's host-buffer contract: each call copies the buffer to the rank's device,
//! runs the NCCL collective and copies the result back. Untested here: it needs two GPUs. It is
//! compiled in every build (cudarc loads NCCL at run time), so it cannot rot unnoticed.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::comm::{CommError, Communicator};

/// One rank's NCCL communicator. NCCL sums in its own ring/tree order, so unlike
/// `LocalCommunicator` ranks get equal bits only as far as NCCL guarantees it (it does for a
/// fixed topology).
pub struct NcclCommunicator {
    rank: usize,
    size: usize,
    stream: Arc<CudaStream>,
    comm: Mutex<Comm>,
}

// SAFETY: `Comm` holds a raw NCCL handle that is only used under the mutex, one thread at a time,
// which is what NCCL requires of a communicator.
unsafe impl Send for NcclCommunicator {}
// SAFETY: as above; every use of the handle goes through the mutex.
unsafe impl Sync for NcclCommunicator {}

fn backend(e: impl std::fmt::Debug) -> CommError {
    CommError::Backend(format!("{e:?}"))
}

impl NcclCommunicator {
    /// A fresh group id; rank 0 creates it and hands `id.internal()` to the other ranks.
    pub fn new_id() -> Result<Id, CommError> {
        Id::new().map_err(backend)
    }

    /// Joins the group `id` as `rank` of `size`, on CUDA device `device`. Blocks until every
    /// rank has joined.
    pub fn join(device: usize, rank: usize, size: usize, id: Id) -> Result<Self, CommError> {
        let ctx = CudaContext::new(device).map_err(backend)?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, size, id).map_err(backend)?;
        Ok(Self {
            rank,
            size,
            stream,
            comm: Mutex::new(comm),
        })
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let comm = self.comm();
        let mut dev = self.stream.clone_htod(buf).map_err(backend)?;
        comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(backend)?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(backend)?;
        self.stream.synchronize().map_err(backend)
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let comm = self.comm();
        let send = self.stream.clone_htod(local).map_err(backend)?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.size)
            .map_err(backend)?;
        comm.all_gather(&send, &mut recv).map_err(backend)?;
        let out = self.stream.clone_dtoh(&recv).map_err(backend)?;
        self.stream.synchronize().map_err(backend)?;
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let comm = self.comm();
        let mut dev = self.stream.clone_htod(buf).map_err(backend)?;
        comm.broadcast_in_place(&mut dev, root as i32).map_err(backend)?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(backend)?;
        self.stream.synchronize().map_err(backend)
    }

    /// NCCL has no poisoning of its own; a failed rank's peers see the failure as an NCCL error
    /// or a watchdog abort, so this only logs.
    fn poison(&self, reason: &str) {
        tracing::error!(rank = self.rank, reason, "NCCL rank failed");
    }

    fn reset(&self) {}
}
