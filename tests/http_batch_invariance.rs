//! Batch invariance over HTTP: at temperature 0 on the CPU f32 backend, 16 requests of mixed
//! lengths give token-identical output sent alone or all at once, with chunked prefill on or off,
//! prefix caching on or off, and a KV pool so small that preemption happens (recompute and swap).

mod common;

use common::{goldens, start, stream_completion};
use inferflux::config::{OverlapSteps, PreemptionMode, Settings};
use serde_json::json;

const MAX_TOKENS: usize = 24;

/// The five golden prompts (text) and eleven token-id prompts from 3 to 220 tokens.
fn prompts() -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = goldens().prompts.iter().map(|p| json!(p.prompt)).collect();
    for (k, len) in [3usize, 9, 17, 31, 48, 64, 90, 120, 150, 180, 220]
        .into_iter()
        .enumerate()
    {
        let ids: Vec<u32> = (0..len).map(|i| ((i * 37 + k * 11) % 370 + 10) as u32).collect();
        out.push(json!(ids));
    }
    assert_eq!(out.len(), 16);
    out
}

fn body(prompt: &serde_json::Value) -> serde_json::Value {
    json!({ "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true, "ignore_eos": true })
}

async fn all_at_once(base: &str, prompts: &[serde_json::Value]) -> Vec<String> {
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (base, body) = (base.to_string(), body(p));
            tokio::spawn(async move { stream_completion(&base, body).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        let got = h.await.unwrap();
        assert_eq!(got.finish_reason(), Some("length"));
        out.push(got.text);
    }
    out
}

#[tokio::test]
async fn unified_batch_http_outputs_are_batch_invariant() {
    let prompts = prompts();
    // Reference: each request alone on a default server.
    let reference = start(|_| {});
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(stream_completion(&reference.base, body(p)).await.text);
    }
    for (p, text) in goldens().prompts.iter().zip(&solo) {
        assert_eq!(text, &p.greedy_text, "solo vs transformers for {:?}", p.prompt);
    }
    let same_config = all_at_once(&reference.base, &prompts).await;
    assert_eq!(same_config, solo, "all at once vs alone");

    type Tweak = fn(&mut Settings);
    let configs: [(&str, Tweak, bool); 6] = [
        (
            "chunked prefill, prefix caching",
            |s| s.scheduler.max_batched_tokens = 16,
            false,
        ),
        (
            "chunked prefill, no prefix caching",
            |s| {
                s.scheduler.max_batched_tokens = 16;
                s.kv.enable_prefix_caching = false;
            },
            false,
        ),
        (
            "no chunking (budget above the longest prompt), no prefix caching",
            |s| {
                s.scheduler.max_batched_tokens = 256;
                s.kv.enable_prefix_caching = false;
            },
            false,
        ),
        (
            "tiny pool, recompute preemption",
            |s| {
                s.kv.num_pages = 64;
                s.kv.page_size = 4;
                s.scheduler.max_batched_tokens = 32;
            },
            true,
        ),
        (
            "tiny pool, swap preemption, no prefix caching",
            |s| {
                s.kv.num_pages = 64;
                s.kv.page_size = 4;
                s.kv.enable_prefix_caching = false;
                s.scheduler.max_batched_tokens = 48;
                s.scheduler.preemption = PreemptionMode::Swap;
            },
            true,
        ),
        (
            "overlapped steps (greedy decodes fed back on the device), tiny pool, swap preemption",
            |s| {
                s.kv.num_pages = 64;
                s.kv.page_size = 4;
                s.kv.enable_prefix_caching = false;
                s.scheduler.max_batched_tokens = 48;
                s.scheduler.preemption = PreemptionMode::Swap;
                s.scheduler.overlap_steps = OverlapSteps::On;
            },
            true,
        ),
    ];
    for (name, tweak, preempts) in configs {
        // Where the wave must meet in the pool to preempt, steps are slowed, so that it does
        // however fast the machine serves.
        let server = match preempts {
            true => common::start_slowed(tweak, 2).await,
            false => start(tweak),
        };
        let got = all_at_once(&server.base, &prompts).await;
        for (i, (g, s)) in got.iter().zip(&solo).enumerate() {
            assert_eq!(g, s, "{name}: request {i} differs from its solo output");
        }
        // A second wave, with the prefix cache (if on) warm.
        assert_eq!(
            all_at_once(&server.base, &prompts).await,
            solo,
            "{name}: second wave"
        );
        let q = common::queue_report(&server.base).await;
        if preempts {
            assert!(
                q["preemptions_total"].as_u64().unwrap() > 0,
                "{name}: no preemption: {q}"
            );
        }
        assert_eq!(
            (q["running"].as_u64(), q["waiting"].as_u64()),
            (Some(0), Some(0)),
            "{q}"
        );
        common::wait_until_no_page_is_referenced(&server.base).await;
    }
    // Only the overlapped server feeds back on the device (the recorder is the process's).
    let fed = common::metrics_text(&reference.base).await.lines().find_map(|l| {
        l.strip_prefix("inferflux_steps_fed_on_device_total ")?
            .parse::<f64>()
            .ok()
    });
    assert!(fed.unwrap_or(0.0) > 0.0, "no step was fed back on the device");
}

/// Request `i` with seeded sampling (penalties on every third) and `stop`.
fn sampled_body(prompt: &serde_json::Value, i: usize, stop: Option<&str>) -> serde_json::Value {
    let mut b = json!({
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": 100 + i,
        "stream": true, "ignore_eos": true, "stream_options": { "include_usage": true },
    });
    if i.is_multiple_of(3) {
        b["presence_penalty"] = json!(0.5);
        b["frequency_penalty"] = json!(0.3);
    }
    if let Some(stop) = stop {
        b["stop"] = json!([stop]);
    }
    b
}

/// `(text, finish reason, completion tokens)` of every request, sent all at once.
type Outputs = Vec<(String, Option<String>, Option<serde_json::Value>)>;

async fn all_sampled_at_once(base: &str, prompts: &[serde_json::Value], stops: &[Option<String>]) -> Outputs {
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (base, body) = (base.to_string(), sampled_body(p, i, stops[i].as_deref()));
            tokio::spawn(async move { stream_completion(&base, body).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        let got = h.await.unwrap();
        let reason = got.finish_reason().map(str::to_string);
        out.push((
            got.text,
            reason,
            got.usage.map(|u| u["completion_tokens"].clone()),
        ));
    }
    out
}

/// Seeded sampling, penalties and stop strings, 16 requests at once in a pool small enough to
/// preempt (swap): planning each step while the last one runs (async scheduling) changes no
/// byte, finish reason or token count against planning one step at a time.
#[tokio::test]
async fn unified_batch_http_async_scheduling_changes_no_output() {
    let prompts = prompts();
    let tiny_pool = |async_scheduling: bool, overlap_steps: OverlapSteps| {
        move |s: &mut Settings| {
            s.kv.num_pages = 64;
            s.kv.page_size = 4;
            s.kv.enable_prefix_caching = false;
            s.scheduler.max_batched_tokens = 48;
            s.scheduler.preemption = PreemptionMode::Swap;
            s.scheduler.async_scheduling = async_scheduling;
            s.scheduler.overlap_steps = overlap_steps;
        }
    };
    // Slowed, so that each wave meets in the pool and preempts however fast the machine serves.
    let one_step = common::start_slowed(tiny_pool(false, OverlapSteps::Off), 2).await;
    let ahead = common::start_slowed(tiny_pool(true, OverlapSteps::Off), 2).await;
    // Held steps whose sampled rows the host feeds back (the CPU draws on the host).
    let overlapped = common::start_slowed(tiny_pool(true, OverlapSteps::On), 2).await;
    let no_stops = vec![None; prompts.len()];
    let want = all_sampled_at_once(&one_step.base, &prompts, &no_stops).await;
    let got = all_sampled_at_once(&ahead.base, &prompts, &no_stops).await;
    assert_eq!(got, want, "without stop strings");
    let got = all_sampled_at_once(&overlapped.base, &prompts, &no_stops).await;
    assert_eq!(got, want, "overlapped, without stop strings");
    // Stop strings that each output meets halfway, so the detector ends it mid-stream.
    let stops: Vec<Option<String>> = want
        .iter()
        .map(|(text, _, _)| {
            let chars: Vec<char> = text.chars().collect();
            Some(chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect())
        })
        .collect();
    let want = all_sampled_at_once(&one_step.base, &prompts, &stops).await;
    let stopped = want
        .iter()
        .filter(|(_, r, _)| r.as_deref() == Some("stop"))
        .count();
    assert!(stopped >= 12, "{stopped} of 16 stopped: {want:?}");
    let got = all_sampled_at_once(&ahead.base, &prompts, &stops).await;
    assert_eq!(got, want, "with stop strings");
    let got = all_sampled_at_once(&overlapped.base, &prompts, &stops).await;
    assert_eq!(got, want, "overlapped, with stop strings");
    for server in [&one_step, &ahead, &overlapped] {
        let q = common::queue_report(&server.base).await;
        assert!(q["preemptions_total"].as_u64().unwrap() > 0, "no preemption: {q}");
        common::wait_until_no_page_is_referenced(&server.base).await;
    }
}
