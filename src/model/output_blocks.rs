//! Our kernels' outputs, carved out of larger device allocations.
//!
//! Every kernel output allocated through cubecl is a task of its own: the calling thread builds
//! it (about 2.1k instructions: a layout, a handle, a queued task), and cubecl's runner thread
//! reserves it in the memory pool. A decode step at batch 1 allocated some 24 outputs for its 20
//! launches, so half of the tasks the runner saw were allocations (docs/Performance.md).
//!
//! [`empty`] instead hands out views of a block of [`BLOCK_BYTES`], one device allocation, at
//! offsets on the runtime's binding alignment, as burn's `slice` and `step_indices` view one
//! buffer. A view costs the caller a handle clone and no task. A block is handed back to the
//! pool when its last view is dropped, so memory held beyond the pool's is at most one block per
//! view still alive from an older block. Outputs over [`MAX_CARVED_BYTES`] (a prefill's rows, a
//! large batch's logits) are allocated on their own, as before.
//!
//! The block is the calling thread's: cubecl gives each thread its own stream, and the
//! executor's thread issues every step. Tests run on many threads, each with its own block.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{DType, Shape};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::ComputeClient;
use cubecl::server::Handle;

/// The size of one block: a decode step of a 1B model at batch 8 carves some 6 MiB.
pub const BLOCK_BYTES: u64 = 8 << 20;

/// The largest output carved. Larger ones waste up to this much at a block's end; they are rare
/// on the decode path, where the issue cost matters.
pub const MAX_CARVED_BYTES: u64 = 1 << 20;

/// Views start on this many bytes at least: CUDA's binding alignment in cubecl (512), and a
/// multiple of every wgpu adapter's storage offset alignment.
const MIN_ALIGN: u64 = 512;

/// `[cuda] carve_outputs`: whether [`empty`] carves at all (on by default).
static CARVE: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// This thread's current block, of whichever runtime last carved on it.
    static CURRENT: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    /// The outputs this thread carved, and the blocks it allocated (for tests and benches).
    static COUNTS: Cell<Counts> = const { Cell::new(Counts { carved: 0, blocks: 0 }) };
}

/// What one thread's [`empty`] did: outputs carved, blocks allocated for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub carved: u64,
    pub blocks: u64,
}

/// One device allocation that views are carved from, front to back.
struct Block<R: CubeRuntime> {
    device: R::Device,
    handle: Handle,
    used: u64,
}

/// Turns carving on or off for every thread (`[cuda] carve_outputs`); views already handed out
/// stay valid.
pub fn set_carving(on: bool) {
    CARVE.store(on, Ordering::Relaxed);
}

/// Whether [`empty`] carves (`[cuda] carve_outputs`).
pub fn carving() -> bool {
    CARVE.load(Ordering::Relaxed)
}

/// What this thread's [`empty`] has done since the thread started.
pub fn counts() -> Counts {
    COUNTS.get()
}

fn count(f: impl FnOnce(&mut Counts)) {
    let mut c = COUNTS.get();
    f(&mut c);
    COUNTS.set(c);
}

/// An uninitialised contiguous tensor of `shape` and `dtype` on `device`: a view of this thread's
/// block where it fits, its own allocation otherwise.
pub fn empty<R: CubeRuntime>(
    client: &ComputeClient<R>,
    device: &R::Device,
    shape: Shape,
    dtype: DType,
) -> CubeTensor<R> {
    let bytes = (shape.num_elements() * dtype.size()) as u64;
    // A view of no bytes is no binding wgpu accepts, and wgpu binds whole 4-byte words.
    if !carving() || bytes == 0 || bytes > MAX_CARVED_BYTES || !bytes.is_multiple_of(4) {
        return empty_device_contiguous_dtype(client.clone(), device.clone(), shape, dtype);
    }
    let align = client.properties().memory.alignment.max(MIN_ALIGN);
    let handle = CURRENT.with_borrow_mut(|current| {
        let fits = |b: &Block<R>| b.device == *device && b.used + bytes <= BLOCK_BYTES;
        let block = match current.as_mut().and_then(|b| b.downcast_mut::<Block<R>>()) {
            Some(b) if fits(b) => b,
            _ => {
                count(|c| c.blocks += 1);
                let fresh = Block::<R> {
                    device: device.clone(),
                    handle: client.empty(BLOCK_BYTES as usize),
                    used: 0,
                };
                current
                    .insert(Box::new(fresh))
                    .downcast_mut()
                    .expect("a block of R")
            }
        };
        let start = block.used;
        block.used = (start + bytes).next_multiple_of(align);
        block
            .handle
            .clone()
            .offset_start(start)
            .offset_end(BLOCK_BYTES - start - bytes)
    });
    count(|c| c.carved += 1);
    CubeTensor::new_contiguous(client.clone(), device.clone(), shape, handle, dtype)
}
