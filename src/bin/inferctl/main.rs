//! `inferctl`: the InferFlux command-line client.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use inferflux::actors::kv_pages::KvReportBody;
use inferflux::actors::scheduler::QueueReportBody;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(version, about = "Client for an InferFlux server")]
struct Cli {
    /// Server base URL.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        env = "INFERFLUX_URL"
    )]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Complete a prompt with /v1/completions.
    Completion {
        prompt: String,
        /// Stream tokens as they are generated (SSE).
        #[arg(long)]
        stream: bool,
        /// Write the raw SSE events to FILE (implies --stream).
        #[arg(long, value_name = "FILE")]
        dump_sse: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        max_tokens: u32,
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long)]
        seed: Option<i64>,
        /// Stop string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Model name (default: the server's only model).
        #[arg(long)]
        model: Option<String>,
    },
    /// List the served models.
    Models,
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Print the server's InferFlux metrics (Prometheus text, comments dropped), then the
    /// queue depth and fair share per client as a table.
    Metrics,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = reqwest::Client::new();
    let base = cli.url.trim_end_matches('/');
    match cli.command {
        Command::Completion {
            prompt,
            stream,
            dump_sse,
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            model,
        } => {
            let stream = stream || dump_sse.is_some();
            let mut body = json!({ "prompt": prompt, "max_tokens": max_tokens, "stream": stream });
            for (key, value) in [
                ("temperature", temperature.map(|t| json!(t))),
                ("top_p", top_p.map(|t| json!(t))),
                ("seed", seed.map(|s| json!(s))),
                ("model", model.map(|m| json!(m))),
            ] {
                if let Some(v) = value {
                    body[key] = v;
                }
            }
            if !stop.is_empty() {
                body["stop"] = json!(stop);
            }
            let resp = client
                .post(format!("{base}/v1/completions"))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("POST {base}/v1/completions"))?;
            let status = resp.status();
            if !status.is_success() {
                bail!(
                    "server answered {status}: {}",
                    resp.text().await.unwrap_or_default()
                );
            }
            if stream {
                let mut dump = match &dump_sse {
                    Some(path) => Some(
                        std::fs::File::create(path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    ),
                    None => None,
                };
                let mut events = resp.bytes_stream().eventsource();
                let mut out = std::io::stdout();
                while let Some(event) = events.next().await {
                    let event = event.context("reading the event stream")?;
                    if let Some(f) = dump.as_mut() {
                        writeln!(f, "data: {}\n", event.data)?;
                    }
                    if event.data == "[DONE]" {
                        break;
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(&event.data).context("parsing an SSE chunk")?;
                    if let Some(err) = v.get("error") {
                        bail!("server error mid-stream: {err}");
                    }
                    if let Some(text) = v["choices"][0]["text"].as_str() {
                        write!(out, "{text}")?;
                        out.flush()?;
                    }
                }
                writeln!(out)?;
            } else {
                let v: serde_json::Value = resp.json().await?;
                println!("{}", v["choices"][0]["text"].as_str().unwrap_or_default());
                eprintln!(
                    "finish_reason={} usage={}",
                    v["choices"][0]["finish_reason"], v["usage"]
                );
            }
        }
        Command::Models => {
            let v: serde_json::Value = client
                .get(format!("{base}/v1/models"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Admin {
            command: AdminCommand::Metrics,
        } => {
            let text = client
                .get(format!("{base}/metrics"))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            for line in text.lines().filter(|l| l.starts_with("inferflux_")) {
                println!("{line}");
            }
            println!();
            print_fairness_table(&text);
        }
        Command::Admin {
            command: AdminCommand::Queue { json },
        } => {
            show_report(&client, &format!("{base}/admin/queue"), json, print_queue).await?;
        }
        Command::Admin {
            command: AdminCommand::Drain { resume },
        } => {
            let report: QueueReportBody = client
                .post(format!("{base}/admin/drain"))
                .json(&json!({ "drain": !resume }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            print_queue(&report);
        }
        Command::Admin {
            command: AdminCommand::Cancel { request_id },
        } => {
            let resp = client
                .post(format!("{base}/admin/requests/{request_id}/cancel"))
                .send()
                .await?;
            let status = resp.status();
            if !status.is_success() {
                bail!(
                    "server answered {status}: {}",
                    resp.text().await.unwrap_or_default()
                );
            }
            println!("cancelled {request_id}");
        }
        Command::Admin {
            command:
                AdminCommand::Kv {
                    reset_prefix_cache,
                    json,
                },
        } => {
            if reset_prefix_cache {
                let v: serde_json::Value = client
                    .post(format!("{base}/admin/kv/reset_prefix_cache"))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                println!("prefix cache reset: {} keys dropped", v["dropped_keys"]);
            }
            show_report(&client, &format!("{base}/admin/kv"), json, print_kv).await?;
        }
    }
    Ok(())
}

/// GETs an admin report and prints it as raw JSON (`--json`) or as `table` does.
async fn show_report<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    json: bool,
    table: fn(&T),
) -> anyhow::Result<()> {
    let v: serde_json::Value = client.get(url).send().await?.error_for_status()?.json().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table(&serde_json::from_value(v)?);
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
