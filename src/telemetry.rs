//! Logs (`tracing`) and the Prometheus recorder (`metrics`), installed once per process.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets for LLM serving: from milliseconds (inter-token) to minutes (long requests);
/// the fallback for every `_seconds` histogram without its own list below.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0,
];
/// Time to first token, queue and prefill time: 1 ms … 60 s.
pub const FIRST_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    60.0,
];
/// Inter-token latency: 1 ms … 5 s.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
];
/// End-to-end and decode time: 10 ms … 10 min.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 600.0,
];
/// Token counts (per step, per request) and sequences per step: powers of two, 1 … 32768.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32768.0,
];

/// Which bucket list each histogram gets. The exporter tries `Full` matchers before `Suffix` ones,
/// so exact names beat the `_seconds` fallback; a histogram no matcher covers would render as a
/// summary, which `tests/http_metrics.rs` refuses.
fn buckets(builder: PrometheusBuilder) -> Result<PrometheusBuilder, BuildError> {
    let full = |name: &str| Matcher::Full(name.to_string());
    builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(full("inferflux_time_to_first_token_seconds"), FIRST_TOKEN_BUCKETS)?
        .set_buckets_for_metric(full("inferflux_request_queue_time_seconds"), FIRST_TOKEN_BUCKETS)?
        .set_buckets_for_metric(
            full("inferflux_request_prefill_time_seconds"),
            FIRST_TOKEN_BUCKETS,
        )?
        .set_buckets_for_metric(full("inferflux_inter_token_latency_seconds"), INTER_TOKEN_BUCKETS)?
        .set_buckets_for_metric(full("inferflux_e2e_request_latency_seconds"), REQUEST_BUCKETS)?
        .set_buckets_for_metric(full("inferflux_request_decode_time_seconds"), REQUEST_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_per_step".into()), TOKEN_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_BUCKETS)?
        .set_buckets_for_metric(full("inferflux_batch_size"), TOKEN_BUCKETS)
}

/// Help text for every metric (Prometheus `# HELP`), so a scrape explains itself.
fn describe_all() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    // Requests.
    describe_counter!(
        "inferflux_requests_total",
        "Requests accepted into the waiting queue."
    );
    describe_counter!(
        "inferflux_requests_rejected_total",
        "Completion requests refused before queueing, by HTTP status."
    );
    describe_counter!(
        "inferflux_http_requests_total",
        "HTTP requests answered, by matched route pattern and status code."
    );
    describe_counter!(
        "inferflux_request_success_total",
        "Requests that finished, by OpenAI finish_reason."
    );
    describe_counter!(
        "inferflux_request_failure_total",
        "Requests that failed in the executor after acceptance."
    );
    describe_counter!(
        "inferflux_requests_cancelled_total",
        "Sequences cancelled by an operator or a gone client."
    );
    describe_counter!(
        "inferflux_executor_restarts_total",
        "Times the model executor failed (step error or panic) and was restarted with a fresh KV cache."
    );
    describe_counter!(
        "inferflux_dp_placements_total",
        "Requests placed on each data-parallel replica, by reason: prefix (it held the longest cached prefix) or least_loaded."
    );
    describe_counter!(
        "inferflux_prompt_tokens_total",
        "Prompt tokens of admitted requests."
    );
    describe_counter!("inferflux_generation_tokens_total", "Tokens generated.");
    // Latencies.
    describe_histogram!(
        "inferflux_time_to_first_token_seconds",
        Unit::Seconds,
        "Arrival to first generated token."
    );
    describe_histogram!(
        "inferflux_inter_token_latency_seconds",
        Unit::Seconds,
        "Time between consecutive generated tokens of a request."
    );
    describe_histogram!(
        "inferflux_e2e_request_latency_seconds",
        Unit::Seconds,
        "Arrival to last token of a finished request."
    );
    describe_histogram!(
        "inferflux_request_queue_time_seconds",
        Unit::Seconds,
        "Arrival to first admission by the scheduler."
    );
    describe_histogram!(
        "inferflux_request_prefill_time_seconds",
        Unit::Seconds,
        "First admission to first generated token."
    );
    describe_histogram!(
        "inferflux_request_decode_time_seconds",
        Unit::Seconds,
        "First generated token to the finish of a request."
    );
    describe_histogram!(
        "inferflux_request_prompt_tokens",
        Unit::Count,
        "Prompt length of finished requests."
    );
    describe_histogram!(
        "inferflux_request_generation_tokens",
        Unit::Count,
        "Generated length of finished requests."
    );
    // Scheduler and executor.
    describe_gauge!(
        "inferflux_num_requests_running",
        "Sequences in the running batch."
    );
    describe_gauge!(
        "inferflux_num_requests_waiting",
        "Sequences waiting for admission."
    );
    describe_gauge!(
        "inferflux_num_requests_preempted",
        "Preempted sequences waiting to resume."
    );
    describe_counter!(
        "inferflux_num_preemptions_total",
        "Preemptions, by mode (recompute or swap)."
    );
    describe_gauge!(
        "inferflux_fairness_jain_index",
        "Jain's fairness index of tokens served across clients."
    );
    describe_gauge!("inferflux_client_queue_depth", "Waiting sequences per client.");
    describe_histogram!(
        "inferflux_client_wait_seconds",
        Unit::Seconds,
        "Enqueue to admission, per client."
    );
    describe_counter!(
        "inferflux_client_tokens_served_total",
        "Tokens scheduled per client."
    );
    describe_gauge!(
        "inferflux_draining",
        "1 while the server drains (refuses new requests)."
    );
    describe_histogram!(
        "inferflux_step_duration_seconds",
        Unit::Seconds,
        "Executor time per batch step."
    );
    describe_histogram!(
        "inferflux_step_issue_seconds",
        Unit::Seconds,
        "Host time to issue a step's forward pass (on a GPU: to queue its kernels)."
    );
    describe_histogram!(
        "inferflux_step_read_seconds",
        Unit::Seconds,
        "Waiting for the device to finish a step and reading the sampled ids (and host rows) back."
    );
    describe_histogram!(
        "inferflux_batched_tokens_per_step",
        Unit::Count,
        "Tokens computed per batch step."
    );
    describe_histogram!("inferflux_batch_size", Unit::Count, "Sequences per batch step.");
    // KV cache.
    describe_gauge!(
        "inferflux_kv_cache_usage_perc",
        "Fraction (0..1) of KV pages in use."
    );
    describe_gauge!("inferflux_kv_free_pages", "Free KV pages.");
    describe_gauge!("inferflux_kv_used_pages", "KV pages held by sequences.");
    describe_gauge!(
        "inferflux_kv_cached_pages",
        "Unreferenced KV pages kept for the prefix cache."
    );
    describe_counter!(
        "inferflux_prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache."
    );
    describe_counter!(
        "inferflux_prefix_cache_hits_total",
        "Prompt tokens served from the prefix cache."
    );
    describe_counter!(
        "inferflux_kv_evicted_pages_total",
        "Cached KV pages evicted for reuse."
    );
    describe_counter!("inferflux_kv_copied_pages_total", "KV pages copied on write.");
    describe_gauge!("inferflux_kv_swap_used_pages", "Host swap pages in use.");
    describe_counter!(
        "inferflux_kv_swapped_out_pages_total",
        "KV pages swapped out to host memory."
    );
    describe_counter!("inferflux_kv_swapped_in_pages_total", "KV pages swapped back in.");
    // Identity.
    describe_gauge!(
        "inferflux_model_info",
        "Always 1; labels name the served model and backend."
    );
    describe_gauge!(
        "inferflux_build_info",
        "Always 1; the version label is the server's."
    );
}

/// How often the recorder's histograms are folded into their buckets between scrapes.
pub const METRICS_UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder; installing it twice (tests start several servers in one
/// process) returns the first handle.
///
/// A histogram keeps every recorded sample until the recorder's upkeep (or a scrape) folds them
/// into its buckets. With no Prometheus scraping, the histograms (inter-token latency most) grew
/// the heap by about 0.5 MiB a second under load (the soak, `heaptrack`), so a thread runs the upkeep
/// every [`METRICS_UPKEEP_PERIOD`], as the exporter's own `install` would on a tokio runtime.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = buckets(PrometheusBuilder::new()).expect("bucket lists are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which case ours stays unused.
            let _ = metrics::set_global_recorder(recorder);
            let upkept = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP_PERIOD);
                    upkept.run_upkeep();
                })
                .expect("spawning the metrics upkeep thread");
            describe_all();
            metrics::gauge!("inferflux_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Text or JSON logs filtered by `RUST_LOG`, else by `level`.
pub fn init_logging(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // JSON: the event's fields at the top level, and the `request{request_id, client, model}`
    // span it belongs to under `span`, so `jq 'select(.span.request_id == "…")'` follows one.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
}
