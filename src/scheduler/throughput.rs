//! Rates over the last minute for `/admin/metrics`: what an operator asks first ("how busy is
//! it now?"), which Prometheus answers only with a query. One bucket per second in a ring, so
//! recording is O(1) per step and a snapshot O(window).

use std::time::{Duration, Instant};

/// The window the rates are averaged over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Counts of one second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bucket {
    /// Seconds since the window's origin; tells a live bucket from a stale one.
    second: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    finished_requests: u64,
    steps: u64,
}

/// Per-second counters of the last [`WINDOW`].
#[derive(Debug, Clone)]
pub struct ThroughputWindow {
    origin: Instant,
    buckets: Vec<Bucket>,
}

/// Average rates over the last minute (or since start, when that is shorter).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Throughput {
    /// Seconds the rates are averaged over: 60, or the uptime while it is shorter.
    pub window_seconds: f64,
    /// Prompt tokens the model ran (prefill and recompute; cached prefixes excluded) per second.
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    /// Sequences that finished (stop, length) or whose client left; `n` choices count `n`.
    pub finished_requests_per_second: f64,
    pub steps_per_second: f64,
}

impl ThroughputWindow {
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            buckets: vec![Bucket::default(); WINDOW.as_secs() as usize],
        }
    }

    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let n = self.buckets.len();
        let b = &mut self.buckets[(second % n as u64) as usize];
        if b.second != second {
            *b = Bucket {
                second,
                ..Bucket::default()
            };
        }
        b
    }

    /// Records one finished step: prompt tokens computed, tokens generated, requests finished.
    pub fn record_step(&mut self, now: Instant, prompt_tokens: u64, generation_tokens: u64, finished: u64) {
        let b = self.bucket(now);
        b.prompt_tokens += prompt_tokens;
        b.generation_tokens += generation_tokens;
        b.finished_requests += finished;
        b.steps += 1;
    }

    /// Records a sequence that ended outside a step (a stop string, its client gone).
    pub fn record_finished(&mut self, now: Instant) {
        self.bucket(now).finished_requests += 1;
    }

    /// Rates over the seconds before `now`'s; the current, partial second is left out so that a
    /// rate does not dip at every second's start.
    pub fn snapshot(&self, now: Instant) -> Throughput {
        let current = now.saturating_duration_since(self.origin).as_secs();
        let n = self.buckets.len() as u64;
        let first = current.saturating_sub(n);
        let mut sum = Bucket::default();
        for b in &self.buckets {
            if b.second >= first && b.second < current {
                sum.prompt_tokens += b.prompt_tokens;
                sum.generation_tokens += b.generation_tokens;
                sum.finished_requests += b.finished_requests;
                sum.steps += b.steps;
            }
        }
        let seconds = (current - first) as f64;
        let rate = |v: u64| if seconds > 0.0 { v as f64 / seconds } else { 0.0 };
        Throughput {
            window_seconds: seconds,
            prompt_tokens_per_second: rate(sum.prompt_tokens),
            generation_tokens_per_second: rate(sum.generation_tokens),
            finished_requests_per_second: rate(sum.finished_requests),
            steps_per_second: rate(sum.steps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_window_averages_the_last_minute() {
        let t0 = Instant::now();
        let at = |s: u64, ms: u64| t0 + Duration::from_secs(s) + Duration::from_millis(ms);
        let mut w = ThroughputWindow::new(t0);
        assert_eq!(w.snapshot(t0).window_seconds, 0.0);
        assert_eq!(w.snapshot(t0).generation_tokens_per_second, 0.0);
        // Two seconds of 10 generated tokens each; the current second does not count yet.
        w.record_step(at(0, 100), 30, 10, 0);
        w.record_step(at(1, 500), 0, 10, 1);
        w.record_step(at(2, 10), 0, 99, 0);
        let s = w.snapshot(at(2, 20));
        assert_eq!(s.window_seconds, 2.0);
        assert_eq!(s.generation_tokens_per_second, 10.0);
        assert_eq!(s.prompt_tokens_per_second, 15.0);
        assert_eq!(s.finished_requests_per_second, 0.5);
        assert_eq!(s.steps_per_second, 1.0);
    }

    #[test]
    fn throughput_window_forgets_what_is_older_than_a_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = ThroughputWindow::new(t0);
        for s in 0..60 {
            w.record_step(at(s), 0, 6, 0);
        }
        assert_eq!(w.snapshot(at(60)).generation_tokens_per_second, 6.0);
        // Thirty idle seconds later half of the minute is empty.
        let s = w.snapshot(at(90));
        assert_eq!(s.window_seconds, 60.0);
        assert_eq!(s.generation_tokens_per_second, 3.0);
        // A bucket reused for a new second starts from zero.
        w.record_step(at(95), 0, 1, 0);
        let tokens = w.snapshot(at(96)).generation_tokens_per_second * 60.0;
        assert!((tokens - (6.0 * 24.0 + 1.0)).abs() < 1e-9, "{tokens}");
        assert_eq!(w.snapshot(at(500)).generation_tokens_per_second, 0.0);
    }
}
