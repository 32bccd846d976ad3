//! The process-wide recorder folds histogram samples into their buckets on its own, so a server
//! that nobody scrapes does not keep every latency it ever recorded (the soak's memory bound
//! caught this). Its own binary: the counting allocator below sees the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mib() -> f64 {
    LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
}

#[test]
fn metrics_histogram_samples_are_drained_without_a_scrape() {
    let handle = inferflux::telemetry::metrics_handle();
    let before = live_mib();
    // 2 million samples: about 30 MiB of sample blocks, held until upkeep.
    let latency = metrics::histogram!("inferflux_inter_token_latency_seconds");
    for i in 0..2_000_000u32 {
        latency.record(f64::from(i % 1000) * 1e-4);
    }
    let held = live_mib() - before;
    assert!(
        held > 12.0,
        "the samples should be held until upkeep, but only {held:.1} MiB were"
    );

    // No scrape: the upkeep thread alone must give the samples back. Traffic goes on meanwhile, as
    // in a server: the histogram frees drained blocks through epochs that its recorders advance.
    let deadline = Instant::now() + inferflux::telemetry::METRICS_UPKEEP_PERIOD * 3;
    let mut recorded = 2_000_000u64;
    while live_mib() - before > 2.0 && Instant::now() < deadline {
        for _ in 0..1000 {
            latency.record(0.01);
        }
        recorded += 1000;
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = live_mib() - before;
    assert!(
        left <= 2.0,
        "{left:.1} MiB of samples still held after three upkeep periods"
    );

    // Folded, not lost: a scrape counts every sample.
    let scrape = handle.render();
    let count = scrape
        .lines()
        .find(|l| l.starts_with("inferflux_inter_token_latency_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(count, Some(recorded), "scrape: {scrape}");
}
