//! How the process's heap treats freed memory.
//!
//! A step allocates and frees many tensor buffers of a few hundred KiB to a few MiB. glibc's
//! defaults hand buffers of that size back to the kernel on free (`mmap`/`munmap`, heap trimming),
//! so the next step's buffers fault their pages in again and the kernel zeroes them: a quarter of
//! a CPU decode step's time went to page faults, `clear_page` and `memmove` into fresh pages
//! (`perf`, batch 128). Keeping freed memory in the process for reuse made the model step about 3x
//! faster at batch 32 and 128 (`device_check profile`, same run), and served throughput 1.1-1.2x.
//! The cost: resident memory stays at its peak, as with any server that keeps its buffers.

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
