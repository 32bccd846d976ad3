//! `inferctl admin …`: the operator endpoints, sent with the admin token, shown as tables.

use clap::Subcommand;
use inferflux::actors::kv_pages::KvReportBody;
use inferflux::actors::scheduler::QueueReportBody;
use inferflux::http::admin::MetricsSnapshot;
use serde_json::json;

use crate::client::Api;
use crate::error::{CliError, Result};

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Show queues, fair share, KV pool and last-minute throughput (`GET /admin/metrics`).
    Metrics {
        /// Refresh every SECS seconds (default 2) until interrupted, redrawing the screen.
        #[arg(
            long,
            value_name = "SECS",
            num_args = 0..=1,
            default_missing_value = "2",
            value_parser = positive_seconds
        )]
        watch: Option<f64>,
        /// With --watch: stop after N refreshes.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
        /// Print the raw JSON instead of a table.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print the InferFlux lines of the Prometheus scrape (`/metrics`) and a per-client
        /// table built from them instead.
        #[arg(long)]
        prometheus: bool,
    },
    /// Show the scheduler's queues, per-client share and drain state (`GET /admin/queue`).
    Queue {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop admitting new requests (`POST /admin/drain`); `--resume` admits them again.
    Drain {
        #[arg(long)]
        resume: bool,
    },
    /// Cancel a request by its id (`POST /admin/requests/{id}/cancel`).
    Cancel { request_id: String },
    /// Show the KV page pool and prefix cache (`GET /admin/kv`).
    Kv {
        /// Forget every cached prefix first (`POST /admin/kv/reset_prefix_cache`).
        #[arg(long)]
        reset_prefix_cache: bool,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(api: &Api, command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Metrics {
            watch,
            count,
            json,
            prometheus,
        } => {
            if let Some(secs) = watch {
                return watch_metrics(api, secs, count, json, prometheus).await;
            }
            show_metrics(api, json, prometheus).await?;
        }
        AdminCommand::Queue { json } => show_report(api, "/admin/queue", json, print_queue).await?,
        AdminCommand::Drain { resume } => {
            let v = api
                .post_json("/admin/drain", &json!({ "drain": !resume }))
                .await?;
            print_queue(&parse(v)?);
        }
        AdminCommand::Cancel { request_id } => {
            api.post(&format!("/admin/requests/{request_id}/cancel"), None)
                .await?;
            println!("cancelled {request_id}");
        }
        AdminCommand::Kv {
            reset_prefix_cache,
            json,
        } => {
            if reset_prefix_cache {
                let resp = api.post("/admin/kv/reset_prefix_cache", None).await?;
                let v = crate::client::json(resp).await?;
                println!("prefix cache reset: {} keys dropped", v["dropped_keys"]);
            }
            show_report(api, "/admin/kv", json, print_kv).await?;
        }
    }
    Ok(())
}

/// `--watch`'s interval: a positive, finite number of seconds (clap reports anything else as a
/// usage error, exit 2).
fn positive_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number of seconds, got `{s}`")),
    }
}

/// One rendering of the metrics: the snapshot as a table or JSON, or the Prometheus lines.
async fn show_metrics(api: &Api, json: bool, prometheus: bool) -> Result<()> {
    if !prometheus {
        return show_report(api, "/admin/metrics", json, print_snapshot).await;
    }
    let text = api
        .get("/metrics")
        .await?
        .text()
        .await
        .map_err(|e| CliError::server(format!("reading /metrics: {e}")))?;
    for line in text.lines().filter(|l| l.starts_with("inferflux_")) {
        println!("{line}");
    }
    println!();
    print_fairness_table(&text);
    Ok(())
}

/// `--watch`: redraw every `secs` seconds, `count` times or until interrupted. A failed fetch
/// ends the watch with its error, as a single call would.
async fn watch_metrics(api: &Api, secs: f64, count: Option<u64>, json: bool, prometheus: bool) -> Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut shown = 0u64;
    loop {
        if tty {
            // Clear the screen and go home, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        println!("every {secs}s: {}  (Ctrl-C to stop)\n", api.base());
        show_metrics(api, json, prometheus).await?;
        shown += 1;
        if count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        if !tty {
            println!();
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
    }
}

fn print_snapshot(s: &MetricsSnapshot) {
    println!(
        "model         {} on {}, up {}",
        s.model,
        s.backend,
        uptime(s.uptime_seconds)
    );
    let t = &s.throughput;
    println!(
        "throughput    {:.1} generated tok/s, {:.1} prompt tok/s, {:.2} finished req/s, {:.1} steps/s (last {:.0}s)",
        t.generation_tokens_per_second,
        t.prompt_tokens_per_second,
        t.finished_requests_per_second,
        t.steps_per_second,
        t.window_seconds
    );
    print_queue(&s.queue);
    print_kv(&s.kv);
}

fn uptime(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| CliError::server(format!("unexpected report shape: {e}")))
}

/// GETs an admin report and prints it as raw JSON (`--json`) or as `table` does.
async fn show_report<T: serde::de::DeserializeOwned>(
    api: &Api,
    path: &str,
    json: bool,
    table: fn(&T),
) -> Result<()> {
    let v = api.get_json(path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        table(&parse(v)?);
    }
    Ok(())
}

fn print_kv(r: &KvReportBody) {
    println!(
        "pages         {} used, {} cached, {} free of {} ({} tokens each)",
        r.used_pages, r.cached_pages, r.free_pages, r.num_pages, r.page_size
    );
    println!("usage         {:.1}%", r.usage * 100.0);
    println!(
        "prefix cache  {} ({} of {} tokens hit, {:.1}%)",
        if r.prefix_caching { "on" } else { "off" },
        r.prefix_cache_hit_tokens,
        r.prefix_cache_queried_tokens,
        r.prefix_cache_hit_rate * 100.0
    );
    println!(
        "pages moved   {} evicted, {} copied on write",
        r.evicted_pages, r.copied_pages
    );
    if !r.largest_cached_prefixes.is_empty() {
        println!("largest cached prefixes:");
        println!("  {:>8}  {:>4}  key", "tokens", "refs");
        for p in &r.largest_cached_prefixes {
            println!("  {:>8}  {:>4}  {}", p.tokens, p.ref_count, p.hash);
        }
    }
}

fn print_queue(r: &QueueReportBody) {
    println!(
        "requests      {} running, {} waiting ({} preempted, {} swapped out)",
        r.running, r.waiting, r.preempted, r.swapped
    );
    println!("draining      {}", if r.draining { "yes" } else { "no" });
    println!("steps         {} ({} preemptions)", r.steps, r.preemptions_total);
    println!(
        "fairness      {:.3} (Jain's index, 1 = shares equal to weights)",
        r.fairness_index
    );
    if !r.clients.is_empty() {
        println!(
            "  {:<24}  {:>6}  {:>7}  {:>7}  {:>12}  {:>12}",
            "client", "weight", "waiting", "running", "recent tok", "virtual time"
        );
        for c in &r.clients {
            println!(
                "  {:<24}  {:>6.2}  {:>7}  {:>7}  {:>12.1}  {:>12.1}",
                c.client, c.weight, c.waiting, c.running, c.recent_tokens, c.virtual_time
            );
        }
    }
}

/// The value of `name{client="…"}` lines, by client.
fn per_client(text: &str, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}{{client=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (client, value) = rest.split_once("\"}")?;
            Some((client.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn print_fairness_table(text: &str) {
    let gauge = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
    println!("{:<28}  {:>10}", "queue", "value");
    for (label, name) in [
        ("running", "inferflux_num_requests_running"),
        ("waiting", "inferflux_num_requests_waiting"),
        ("preempted", "inferflux_num_requests_preempted"),
        ("fairness (Jain's index)", "inferflux_fairness_jain_index"),
    ] {
        println!("{label:<28}  {:>10}", show(gauge(name)));
    }
    let depth = per_client(text, "inferflux_client_queue_depth");
    let served = per_client(text, "inferflux_client_tokens_served_total");
    let waits = per_client(text, "inferflux_client_wait_seconds_sum");
    let admitted = per_client(text, "inferflux_client_wait_seconds_count");
    let mut clients: Vec<&String> = depth.iter().chain(&served).map(|(c, _)| c).collect();
    clients.sort();
    clients.dedup();
    if clients.is_empty() {
        return;
    }
    let find = |v: &[(String, f64)], c: &str| v.iter().find(|(k, _)| k == c).map(|(_, x)| *x);
    println!();
    println!(
        "{:<24}  {:>11}  {:>14}  {:>13}",
        "client", "queue depth", "tokens served", "mean wait (s)"
    );
    for c in clients {
        let mean_wait = match (find(&waits, c), find(&admitted, c)) {
            (Some(sum), Some(n)) if n > 0.0 => format!("{:.3}", sum / n),
            _ => "-".into(),
        };
        println!(
            "{c:<24}  {:>11}  {:>14}  {mean_wait:>13}",
            show(find(&depth, c)),
            show(find(&served, c)),
        );
    }
}
