//! `inferctl bench`: a load generator in the manner of `vllm bench serve`. It sends streamed
//! completions with a fixed number of output tokens (`ignore_eos`), at a bounded concurrency and
//! an optional Poisson arrival rate, and reports TTFT, TPOT, ITL and end-to-end latency with the
//! throughputs, as a table or one JSON object.

mod dataset;
mod report;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use crate::client::Api;
use crate::error::{CliError, Result};
use dataset::{Prompt, ServerTokens};
use report::{Report, Sample};

/// Which OpenAI endpoint the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// `/v1/completions` with a text prompt.
    Completions,
    /// `/v1/chat/completions` with the prompt as one user message (needs a chat template).
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model name (default: the first model of /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Requests measured (after the warm-up).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    num_prompts: u64,
    /// Prompt length in tokens, exact, for random prompts.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    input_len: u64,
    /// Tokens generated per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    output_len: u64,
    /// Most requests in flight at once (default: no bound).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: Option<u64>,
    /// Requests per second, Poisson arrivals (exponential gaps); `inf` sends all at once.
    #[arg(long, default_value = "inf", value_parser = positive_rate)]
    request_rate: f64,
    /// Seeds the random prompts and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `random`, or a FILE of prompts: one per line, JSON lines with a "prompt" field or plain text.
    #[arg(long, default_value = "random", value_name = "random|FILE")]
    dataset: String,
    /// Requests sent (all at once, within --concurrency) before the measured ones and not counted.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    endpoint: Endpoint,
    /// Sampling temperature (0: greedy, the cheapest to sample).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling's mass (as `vllm bench serve --top-p`); 1 keeps every token.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the most likely K tokens (as `vllm bench serve --top-k`); 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: u64,
    /// Print one JSON object with the results and the arguments (and nothing else) on stdout.
    #[arg(long)]
    json: bool,
}

fn positive_rate(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a positive number of requests per second (or `inf`)"
        )),
    }
}

pub async fn run(api: Api, args: BenchArgs) -> Result<()> {
    let api = Arc::new(api);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&api).await?,
    };
    let prompts = prompts(&api, &model, &args).await?;
    // Measured request `i` sends prompt `i`; the warm-up sends the prompts after the measured ones
    // (random prompts are built for both), so that no measured prompt is already in the prefix cache.
    let body = |i: usize| request_body(&args, &model, &prompts[i % prompts.len()].text);
    let n = args.num_prompts as usize;
    let sem = Arc::new(Semaphore::new(
        args.concurrency.map_or(Semaphore::MAX_PERMITS, |c| c as usize),
    ));

    if args.warmup > 0 {
        eprintln!("inferctl bench: {} warm-up request(s)", args.warmup);
        let warm: Vec<_> = (0..args.warmup as usize)
            .map(|j| spawn(&api, &sem, args.endpoint, body(n + j)))
            .collect();
        for task in warm {
            task.await
                .map_err(|e| anyhow::anyhow!("a warm-up request panicked: {e}"))?
                .map_err(warmup_failed)?;
        }
    }

    eprintln!(
        "inferctl bench: {} requests to {}{}, concurrency {}, rate {} req/s",
        args.num_prompts,
        api.base(),
        args.endpoint.path(),
        args.concurrency
            .map_or("unbounded".to_string(), |c| c.to_string()),
        args.request_rate
    );
    let mut arrivals = StdRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.num_prompts as usize);
    for i in 0..n {
        if i > 0 && args.request_rate.is_finite() {
            tokio::time::sleep(poisson_gap(&mut arrivals, args.request_rate)).await;
        }
        tasks.push(spawn(&api, &sem, args.endpoint, body(i)));
    }
    let (mut samples, mut errors) = (Vec::new(), Vec::new());
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok(mut s)) => {
                // The server's usage counts the prompt; without it, the length the prompt was built to.
                if s.prompt_tokens == 0 {
                    s.prompt_tokens = prompts[i % prompts.len()].tokens.unwrap_or(0);
                }
                samples.push(s)
            }
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("the request's task panicked: {e}")),
        }
    }
    let duration = start.elapsed().as_secs_f64();
    let report = Report::new(&samples, &errors, duration, args.concurrency.map(|c| c as usize));
    if args.json {
        let v = report.to_json(arguments(&args, &model, api.base()));
        println!("{v}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// A failed warm-up ends the run: the server cannot serve the benchmark's requests at all.
fn warmup_failed(e: CliError) -> CliError {
    match e {
        CliError::Local(e) => CliError::Local(e.context("warm-up request")),
        CliError::Refused { status, message } => CliError::Refused {
            status,
            message: format!("warm-up request: {message}"),
        },
        CliError::Server { status, message } => CliError::Server {
            status,
            message: format!("warm-up request: {message}"),
        },
        other => other,
    }
}

/// The arguments, as the JSON output records them.
fn arguments(args: &BenchArgs, model: &str, base: &str) -> Map<String, Value> {
    let v = json!({
        "url": base,
        "endpoint": args.endpoint.name(),
        "model": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_concurrency": args.concurrency,
        // JSON has no infinity: `null` means all at once.
        "request_rate": args.request_rate.is_finite().then_some(args.request_rate),
        "seed": args.seed,
        "warmup": args.warmup,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    });
    match v {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The gap before the next arrival of a Poisson process of `rate` per second.
fn poisson_gap(rng: &mut StdRng, rate: f64) -> Duration {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u: f64 = rng.random();
    Duration::from_secs_f64(-(1.0 - u).ln() / rate)
}

async fn first_model(api: &Api) -> Result<String> {
    let v = api.get_json("/v1/models").await?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::server(format!("/v1/models lists no model: {v}")))
}

async fn prompts(api: &Api, model: &str, args: &BenchArgs) -> Result<Vec<Prompt>> {
    if args.dataset == "random" {
        eprintln!(
            "inferctl bench: building {} random prompts of {} tokens",
            args.num_prompts + args.warmup,
            args.input_len
        );
        let tokens = ServerTokens {
            api,
            model,
            endpoint: args.endpoint,
        };
        let n = (args.num_prompts + args.warmup) as usize;
        return dataset::random_prompts(api, &tokens, n, args.input_len as usize, args.seed).await;
    }
    dataset::file_prompts(&PathBuf::from(&args.dataset))
}

fn request_body(args: &BenchArgs, model: &str, prompt: &str) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": args.output_len,
        "ignore_eos": true,
        "temperature": args.temperature,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    // Sent only when set, so that a server without the extension still takes the default run.
    if args.top_p < 1.0 {
        body["top_p"] = json!(args.top_p);
    }
    if args.top_k > 0 {
        body["top_k"] = json!(args.top_k);
    }
    match args.endpoint {
        Endpoint::Completions => body["prompt"] = json!(prompt),
        Endpoint::Chat => body["messages"] = json!([{ "role": "user", "content": prompt }]),
    }
    body
}

/// Runs one request once a slot of the concurrency bound is free; its clock starts at the send.
fn spawn(
    api: &Arc<Api>,
    sem: &Arc<Semaphore>,
    endpoint: Endpoint,
    body: Value,
) -> tokio::task::JoinHandle<Result<Sample>> {
    let (api, sem) = (Arc::clone(api), Arc::clone(sem));
    tokio::spawn(async move {
        let _slot = sem
            .acquire_owned()
            .await
            .map_err(|e| anyhow::anyhow!("the concurrency bound closed: {e}"))?;
        measure(&api, endpoint.path(), &body).await
    })
}

/// Sends one streamed request and times its chunks with text.
async fn measure(api: &Api, path: &str, body: &Value) -> Result<Sample> {
    let start = Instant::now();
    let resp = api.post(path, Some(body)).await?;
    let mut events = resp.bytes_stream().eventsource();
    let (mut first, mut last) = (None::<Instant>, start);
    let mut sample = Sample::default();
    let mut chunks = 0;
    let mut done = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| CliError::server(format!("the stream broke off: {e}")))?;
        let now = Instant::now();
        if event.data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&event.data)
            .map_err(|e| CliError::server(format!("an SSE chunk is not JSON ({e}): {}", event.data)))?;
        if let Some(err) = v.get("error") {
            let message = err["message"]
                .as_str()
                .map_or_else(|| err.to_string(), str::to_string);
            return Err(CliError::server(format!("error event mid-stream: {message}")));
        }
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            sample.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            sample.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let (text, _) = crate::sse::choice_delta(&v, 0);
        if text.is_some_and(|t| !t.is_empty()) {
            match first {
                None => first = Some(now),
                Some(_) => sample.itl.push((now - last).as_secs_f64()),
            }
            last = now;
            chunks += 1;
        }
    }
    if !done {
        return Err(CliError::server("the stream ended without `data: [DONE]`"));
    }
    sample.e2el = start.elapsed().as_secs_f64();
    let first = first.ok_or_else(|| CliError::server("the stream carried no text"))?;
    sample.ttft = (first - start).as_secs_f64();
    if sample.output_tokens == 0 {
        // No usage chunk: count chunks, each at least one token.
        sample.output_tokens = chunks;
    }
    Ok(sample)
}
