//! What one benchmark run measured, summed up as `vllm bench serve` sums it up: a table for
//! people, one JSON object with the same numbers (and the arguments) for scripts.

use serde_json::{json, Map, Value};

use super::stats::Summary;

/// The timings of one request that completed.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Send to the first chunk with text, in seconds.
    pub ttft: f64,
    /// Gaps between consecutive chunks with text, in seconds (one per chunk, as vLLM counts; a
    /// chunk may carry several tokens when the detokenizer held bytes back).
    pub itl: Vec<f64>,
    /// Send to `data: [DONE]`, in seconds.
    pub e2el: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

impl Sample {
    /// Time per output token after the first: `(e2el - ttft) / (output_tokens - 1)`; none for
    /// a single token, as in vLLM.
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.e2el - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// The metrics, in the order and with the names (`{stat}_{name}_ms`) of vLLM's result JSON.
const METRICS: [(&str, &str, &str); 4] = [
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
];

/// The summary of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub max_concurrency: Option<usize>,
    /// In milliseconds, in the order of [`METRICS`].
    pub metrics: [Summary; 4],
    /// The first failures' messages.
    pub errors: Vec<String>,
}

/// How many failure messages a report keeps.
const KEPT_ERRORS: usize = 10;

impl Report {
    pub fn new(
        samples: &[Sample],
        errors: &[String],
        duration_s: f64,
        max_concurrency: Option<usize>,
    ) -> Self {
        let ms = |xs: Vec<f64>| Summary::of(&xs.iter().map(|x| x * 1000.0).collect::<Vec<_>>());
        Self {
            completed: samples.len(),
            failed: errors.len(),
            duration_s,
            total_input_tokens: samples.iter().map(|s| s.prompt_tokens).sum(),
            total_output_tokens: samples.iter().map(|s| s.output_tokens).sum(),
            max_concurrency,
            metrics: [
                ms(samples.iter().map(|s| s.ttft).collect()),
                ms(samples.iter().filter_map(Sample::tpot).collect()),
                ms(samples.iter().flat_map(|s| s.itl.iter().copied()).collect()),
                ms(samples.iter().map(|s| s.e2el).collect()),
            ],
            errors: errors.iter().take(KEPT_ERRORS).cloned().collect(),
        }
    }

    fn per_second(&self, x: usize) -> f64 {
        if self.duration_s > 0.0 {
            x as f64 / self.duration_s
        } else {
            0.0
        }
    }

    pub fn request_throughput(&self) -> f64 {
        self.per_second(self.completed)
    }

    pub fn output_throughput(&self) -> f64 {
        self.per_second(self.total_output_tokens)
    }

    pub fn total_token_throughput(&self) -> f64 {
        self.per_second(self.total_input_tokens + self.total_output_tokens)
    }

    /// The JSON object of `--json`: `args` merged in first, then the results.
    pub fn to_json(&self, args: Map<String, Value>) -> Value {
        let mut out = args;
        for (key, value) in [
            ("completed", json!(self.completed)),
            ("failed", json!(self.failed)),
            ("duration_s", json!(self.duration_s)),
            ("total_input_tokens", json!(self.total_input_tokens)),
            ("total_output_tokens", json!(self.total_output_tokens)),
            ("request_throughput", json!(self.request_throughput())),
            ("output_throughput", json!(self.output_throughput())),
            ("total_token_throughput", json!(self.total_token_throughput())),
        ] {
            out.insert(key.into(), value);
        }
        for ((name, _, _), s) in METRICS.iter().zip(&self.metrics) {
            for (stat, value) in [
                ("mean", s.mean),
                ("median", s.median),
                ("std", s.std),
                ("p99", s.p99),
            ] {
                out.insert(format!("{stat}_{name}_ms"), json!(value));
            }
        }
        out.insert("errors".into(), json!(self.errors));
        Value::Object(out)
    }

    /// The table vLLM prints.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut line = |label: &str, value: String| t.push_str(&format!("{label:<40} {value}\n"));
        line("Successful requests:", self.completed.to_string());
        line("Failed requests:", self.failed.to_string());
        if let Some(c) = self.max_concurrency {
            line("Maximum request concurrency:", c.to_string());
        }
        line("Benchmark duration (s):", format!("{:.2}", self.duration_s));
        line("Total input tokens:", self.total_input_tokens.to_string());
        line("Total generated tokens:", self.total_output_tokens.to_string());
        line(
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput()),
        );
        line(
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput()),
        );
        line(
            "Total token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput()),
        );
        for ((_, short, title), s) in METRICS.iter().zip(&self.metrics) {
            t.push_str(&format!("{:-^50}\n", title));
            for (stat, value) in [
                ("Mean", s.mean),
                ("Median", s.median),
                ("Std", s.std),
                ("P99", s.p99),
            ] {
                t.push_str(&format!("{:<40} {value:.2}\n", format!("{stat} {short} (ms):")));
            }
        }
        for e in &self.errors {
            t.push_str(&format!("error: {e}\n"));
        }
        format!("{:=^50}\n{t}{}\n", " Serving Benchmark Result ", "=".repeat(50))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inferctl_bench_report_sums_and_names_the_fields() {
        let samples = [
            Sample {
                ttft: 0.1,
                itl: vec![0.01, 0.03],
                e2el: 0.14,
                prompt_tokens: 16,
                output_tokens: 3,
            },
            Sample {
                ttft: 0.2,
                itl: vec![],
                e2el: 0.2,
                prompt_tokens: 16,
                output_tokens: 1,
            },
        ];
        let r = Report::new(&samples, &["boom".to_string()], 2.0, Some(4));
        let v = r.to_json(Map::new());
        assert_eq!(v["completed"], 2);
        assert_eq!(v["failed"], 1);
        assert_eq!(v["total_input_tokens"], 32);
        assert_eq!(v["total_output_tokens"], 4);
        assert_eq!(v["request_throughput"], 1.0);
        assert_eq!(v["output_throughput"], 2.0);
        assert_eq!(v["total_token_throughput"], 18.0);
        let close = |key: &str, want: f64| {
            let got = v[key].as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{key}: {got} != {want}");
        };
        close("mean_ttft_ms", 150.0);
        // Only the 3-token request has a TPOT: (140 - 100) / 2.
        close("mean_tpot_ms", 20.0);
        close("median_itl_ms", 20.0);
        close("p99_e2el_ms", 140.0 + 0.99 * 60.0);
        assert_eq!(v["errors"], json!(["boom"]));
        let table = r.table();
        assert!(
            table.contains("Successful requests:                     2\n"),
            "{table}"
        );
        assert!(
            table.contains("Mean TPOT (ms):                          20.00\n"),
            "{table}"
        );
    }
}
