//! `inferctl bench` against a real server on the embedded tiny model: every request completes
//! with the exact prompt and output lengths asked for, and the summary's numbers are coherent.

mod common;

use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{start, TestServer};
use serde_json::Value;

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(|_| {}))
}

fn inferctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inferctl"))
        .args(args)
        .env_remove("INFERFLUX_URL")
        .env_remove("INFERFLUX_API_KEY")
        .output()
        .unwrap()
}

/// Runs `inferctl bench --json` for 8 requests of 16 prompt and 8 output tokens, with `extra`.
fn bench_json(extra: &[&str]) -> Value {
    let base = &server().base;
    let args = ["--url", base.as_str(), "bench", "--json", "--num-prompts", "8"];
    bench_json_with(
        &args,
        &[&["--input-len", "16", "--output-len", "8"][..], extra].concat(),
    )
}

/// Runs `inferctl ARGS EXTRA`, which must succeed, and returns the JSON object on its stdout.
fn bench_json_with(args: &[&str], extra: &[&str]) -> Value {
    let out = inferctl(&[args, extra].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {stderr}",
        out.status.code()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number: {v}"))
}

/// What every run of 8 requests of 16 prompt tokens and 8 output tokens must report.
fn assert_coherent(v: &Value) {
    assert_eq!(v["completed"], 8, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["total_input_tokens"], 8 * 16, "{v}");
    assert_eq!(v["total_output_tokens"], 8 * 8, "{v}");
    assert!(f(v, "duration_s") > 0.0);
    for key in [
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ] {
        assert!(f(v, key) > 0.0, "{key}: {v}");
    }
    let tput = f(v, "output_throughput") / f(v, "request_throughput");
    assert!((tput - 8.0).abs() < 1e-6, "8 output tokens per request: {v}");
    for metric in ["ttft", "tpot", "itl", "e2el"] {
        let (mean, median, p99) = (
            f(v, &format!("mean_{metric}_ms")),
            f(v, &format!("median_{metric}_ms")),
            f(v, &format!("p99_{metric}_ms")),
        );
        assert!(mean > 0.0 && median > 0.0, "{metric}: {v}");
        assert!(median <= p99, "{metric}: median {median} > p99 {p99}");
        assert!(f(v, &format!("std_{metric}_ms")) >= 0.0);
    }
    assert!(f(v, "p99_ttft_ms") <= f(v, "p99_e2el_ms"), "{v}");
    assert!(f(v, "mean_ttft_ms") <= f(v, "mean_e2el_ms"), "{v}");
    assert!(f(v, "p99_e2el_ms") <= f(v, "duration_s") * 1000.0, "{v}");
}

#[test]
fn inferctl_bench_concurrency_json_is_exact_and_coherent() {
    let v = bench_json(&["--concurrency", "4"]);
    assert_coherent(&v);
    assert_eq!(v["max_concurrency"], 4);
    assert_eq!(v["request_rate"], Value::Null);
    assert_eq!(v["model"], "inferflux-tiny-llama");
}

#[test]
fn inferctl_bench_request_rate_spreads_the_arrivals() {
    // Cut draws, as `vllm bench serve --top-p --top-k` sends them.
    let v = bench_json(&[
        "--request-rate",
        "40",
        "--seed",
        "7",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
    ]);
    assert_coherent(&v);
    assert_eq!(v["request_rate"], 40.0);
    assert_eq!(v["max_concurrency"], Value::Null);
    assert_eq!((f(&v, "top_p"), v["top_k"].as_u64()), (0.9, Some(20)), "{v}");
}

#[test]
fn inferctl_bench_prints_the_table() {
    let base = &server().base;
    let args = [
        "--url",
        base.as_str(),
        "bench",
        "--num-prompts",
        "2",
        "--input-len",
        "8",
    ];
    let out = inferctl(&[&args[..], &["--output-len", "4", "--warmup", "0"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("Successful requests:                     2\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Total input tokens:                      16\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Total generated tokens:                  8\n"),
        "{stdout}"
    );
    assert!(stdout.contains("P99 TTFT (ms):"), "{stdout}");
}

#[test]
fn inferctl_bench_counts_failed_requests_and_a_failed_warmup_ends_the_run() {
    let base = &server().base;
    // A file: a JSON line, a plain line, and a prompt longer than the model's context (refused).
    let file = std::env::temp_dir().join(format!("inferctl-bench-{}.jsonl", std::process::id()));
    let long = "hello ".repeat(2000);
    std::fs::write(
        &file,
        format!("{{\"prompt\": \"hello there\"}}\nplain line\n{long}\n"),
    )
    .unwrap();
    let v = bench_json_with(
        &["--url", base.as_str(), "bench", "--json", "--num-prompts", "3"],
        &[
            "--output-len",
            "4",
            "--warmup",
            "0",
            "--dataset",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        (v["completed"].as_u64(), v["failed"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    assert_eq!(v["total_output_tokens"], 8, "{v}");
    assert!(v["errors"][0].as_str().unwrap().contains("HTTP 400"), "{v}");

    // An unknown model: the warm-up fails and ends the run with the refusal's exit code.
    let args = [
        "--url",
        base.as_str(),
        "bench",
        "--model",
        "nope",
        "--num-prompts",
        "2",
    ];
    let out = inferctl(&[&args[..], &["--dataset", file.to_str().unwrap()]].concat());
    std::fs::remove_file(&file).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("warm-up request") && stderr.contains("nope"),
        "{stderr}"
    );
}
