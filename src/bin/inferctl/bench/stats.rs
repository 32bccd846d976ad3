//! The summary statistics `inferctl bench` reports, computed as numpy computes them (so that
//! numbers compare with `vllm bench serve`): population standard deviation, linearly
//! interpolated percentiles.

use serde::Serialize;

/// Mean, median, standard deviation and 99th percentile of one metric, in the unit of the
/// samples (milliseconds in the report). All zero when there are no samples, as vLLM reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p99: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mean = mean(&sorted);
        Self {
            mean,
            median: percentile(&sorted, 50.0),
            std: std_dev(&sorted, mean),
            p99: percentile(&sorted, 99.0),
        }
    }
}

fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len() as f64
}

/// `np.std` (ddof = 0).
fn std_dev(samples: &[f64], mean: f64) -> f64 {
    (samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
}

/// `np.percentile(samples, p)` with its default linear interpolation: the value at rank
/// `p / 100 * (n - 1)` of the sorted samples, interpolated between the two neighbours.
/// `sorted` must be sorted and not empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn inferctl_bench_percentiles_interpolate_like_numpy() {
        // Values from numpy 2: np.percentile(x, p) for x = [1, 2, 3, 4, 10].
        let x = [1.0, 2.0, 3.0, 4.0, 10.0];
        for (p, want) in [
            (0.0, 1.0),
            (50.0, 3.0),
            (90.0, 7.6),
            (99.0, 9.76),
            (100.0, 10.0),
            (25.0, 2.0),
        ] {
            assert!(
                close(percentile(&x, p), want),
                "p{p}: {} != {want}",
                percentile(&x, p)
            );
        }
        // An even count: the median is the mean of the middle two.
        assert!(close(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5));
        assert!(close(percentile(&[7.0], 99.0), 7.0));
    }

    #[test]
    fn inferctl_bench_summary_matches_numpy() {
        // np.mean, np.median, np.std, np.percentile(.., 99) of [4, 1, 3, 2] (unsorted on purpose).
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]);
        assert!(close(s.mean, 2.5));
        assert!(close(s.median, 2.5));
        assert!(close(s.std, 1.118033988749895));
        assert!(close(s.p99, 3.97));
        assert_eq!(Summary::of(&[]), Summary::default());
        let one = Summary::of(&[5.0]);
        assert_eq!((one.mean, one.median, one.std, one.p99), (5.0, 5.0, 0.0, 5.0));
    }
}
