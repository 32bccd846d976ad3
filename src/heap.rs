//! How the process's heap treats freed memory.
//!
//! A step allocates and frees many tensor buffers of a few hundred KiB to a few MiB. glibc's
//! defaults hand buffers of that size back to the kernel on free (`mmap`/`munmap`, heap trimming),
//! so the next step's buffers fault their pages in again and the kernel zeroes them: a quarter of
//! a CPU decode step's time went to page faults, `clear_page` and `memmove` into fresh pages
//! (`perf`, batch 128). Keeping freed memory in the process for reuse made the model step about 3x
//! faster at batch 32 and 128 (`device_check profile`, same run), and served throughput 1.1-1.2x.
//! The cost: resident memory stays at its peak, as with any server that keeps its buffers.
//!
//! Small blocks are another matter. Issuing a step on a GPU allocates and frees thousands of
//! blocks of a few dozen to a few hundred bytes per step (burn's tensor handles, cubecl's launch
//! arguments and queued tasks), and glibc's malloc and free took a quarter of the issuing
//! thread's instructions (`scripts/issue-instructions.sh`). [`ServerHeap`] sends blocks up to
//! [`SMALL_BLOCK`] to mimalloc, whose size-class pages serve them in a few dozen instructions,
//! and leaves larger ones to glibc with the thresholds above. mimalloc alone is not an option:
//! it gives the pages of large freed blocks back to the kernel, which made the CPU step at batch
//! 128 1.2-2.2x slower (docs/Performance.md).

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest block [`ServerHeap`] takes from mimalloc.
pub const SMALL_BLOCK: usize = 1024;

/// The binaries' global allocator: blocks up to [`SMALL_BLOCK`] bytes from mimalloc, larger
/// ones from the system's malloc. A block's size decides both its allocation and its free, and
/// a reallocation across the boundary moves the block.
pub struct ServerHeap;

fn small(size: usize) -> bool {
    size <= SMALL_BLOCK
}

// SAFETY: each block is freed (or reallocated) by the allocator that made it, chosen by the size
// its layout carries, which Rust passes unchanged from allocation to free; both allocators meet
// `GlobalAlloc`'s contract on their own.
unsafe impl GlobalAlloc for ServerHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match small(layout.size()) {
            true => unsafe { mimalloc::MiMalloc.alloc(layout) },
            false => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match small(layout.size()) {
            true => unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) },
            false => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match small(layout.size()) {
            true => unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) },
            false => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (small(layout.size()), small(new_size)) {
            (true, true) => unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) },
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: `realloc`'s contract makes `new_size`, rounded up to the alignment,
                // fit in an `isize`.
                let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    // SAFETY: both blocks are live and distinct, each at least this long.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                moved
            }
        }
    }
}

/// Buffers up to this size come from the heap, not from their own mapping (glibc's maximum).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is given back to the kernel only beyond this.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Keeps freed heap memory for reuse (glibc on Linux; elsewhere nothing to do). Skipped when the
/// operator set `GLIBC_TUNABLES` for malloc, which then decides. Returns whether it applied.
pub fn keep_freed_memory() -> bool {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc")) {
        return false;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    // SAFETY: `mallopt` only changes allocator parameters; it is called before the server's
    // threads start, and glibc takes its own lock anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block keeps its bytes through reallocations within each allocator and across the
    /// boundary, both ways, and zeroed blocks are zero on both sides.
    #[test]
    fn heap_blocks_keep_their_bytes_across_the_small_block_boundary() {
        let heap = ServerHeap;
        let pattern = |i: usize| (i * 31 + 7) as u8;
        let sizes = [
            24,
            SMALL_BLOCK,
            SMALL_BLOCK + 1,
            3 * SMALL_BLOCK,
            SMALL_BLOCK - 8,
            40,
        ];
        unsafe {
            let mut layout = Layout::from_size_align(sizes[0], 8).unwrap();
            let mut ptr = heap.alloc(layout);
            assert!(!ptr.is_null());
            for i in 0..layout.size() {
                *ptr.add(i) = pattern(i);
            }
            for &size in &sizes[1..] {
                ptr = heap.realloc(ptr, layout, size);
                assert!(!ptr.is_null());
                let kept = layout.size().min(size);
                for i in 0..kept {
                    assert_eq!(
                        *ptr.add(i),
                        pattern(i),
                        "byte {i} of {} after {} -> {size}",
                        kept,
                        layout.size()
                    );
                }
                for i in kept..size {
                    *ptr.add(i) = pattern(i);
                }
                layout = Layout::from_size_align(size, 8).unwrap();
            }
            heap.dealloc(ptr, layout);
            for size in [64, SMALL_BLOCK + 64] {
                let layout = Layout::from_size_align(size, 64).unwrap();
                let ptr = heap.alloc_zeroed(layout);
                assert_eq!(ptr as usize % 64, 0, "alignment of a {size}-byte block");
                assert!((0..size).all(|i| *ptr.add(i) == 0), "a zeroed {size}-byte block");
                heap.dealloc(ptr, layout);
            }
        }
    }
}
