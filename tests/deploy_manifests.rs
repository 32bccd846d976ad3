//! `deploy/`: the Grafana dashboard queries only series a live `/metrics` exports, and the
//! Kubernetes manifests validate against the Kubernetes schemas and agree with the server they
//! run (config accepted by the real loader, secrets reaching the right keys, probes and the
//! preStop drain doing what the rollout relies on, the endpoint picker's metrics exported).
//! The manifest checks run `tests/python/k8s_manifests_check.py` with `INFERFLUX_PYTHON` (set by
//! `scripts/test.sh`), else `target/py-venv`; without one the test fails, it never skips.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use inferflux::config::{CliOverrides, DeviceKind, PreemptionMode, Settings};
use serde_json::{json, Value};

const DASHBOARD: &str = "deploy/grafana/inferflux.json";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Words that may stand where a series name could, but are PromQL operators or modifiers
/// (aggregations too: `sum by (le) (...)` puts `by` between `sum` and its parenthesis).
const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "start",
    "end",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Modifiers whose parenthesised list holds label names, not series.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The series names a PromQL expression selects. A small tokenizer: string literals, label
/// matchers (`{...}`), ranges (`[...]`), numbers and Grafana variables are skipped; an
/// identifier followed by `(` is a function (or, for `by`/`on`/..., a list of label names,
/// skipped); the keywords above are not series; every other identifier is a series selector.
fn series_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening delimiter to its closing one, stepping over string literals.
    let skip_to = |mut i: usize, close: char| -> usize {
        while i < chars.len() && chars[i] != close {
            if chars[i] == '"' || chars[i] == '\'' || chars[i] == '`' {
                let quote = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != quote {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = next < chars.len() && chars[next] == '(';
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                if called {
                    i = skip_to(next + 1, ')');
                }
            } else if !called && !PROMQL_KEYWORDS.contains(&word.to_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every panel, rows' nested panels included, rows themselves left out.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// Every PromQL expression of the dashboard: each target's `expr` and each query variable's
/// query (`label_values(SERIES, label)`: only its first argument selects series).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or("");
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(series, _label)| series)
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: expected label_values(SERIES, label): {query}",
                    v["name"]
                )
            });
        out.push((format!("variable {}", v["name"]), inner.to_string()));
    }
    out
}

/// The sample names of a Prometheus text scrape (histograms as `_bucket`, `_sum`, `_count`).
fn sample_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// The series the dashboard's queries name that the scrape lacks, with the panel naming them.
fn missing_series(dashboard: &Value, scrape: &str) -> Vec<String> {
    let exported = sample_names(scrape);
    let mut missing = Vec::new();
    for (panel, expr) in dashboard_queries(dashboard) {
        for name in series_names(&expr) {
            if !exported.contains(&name) {
                missing.push(format!("{name} (panel {panel:?})"));
            }
        }
    }
    missing
}

#[test]
fn deploy_promql_tokenizer_finds_series_and_skips_functions() {
    let expr = r#"histogram_quantile(0.99, sum by (le, client) (rate(inferflux_client_wait_seconds_bucket{instance=~"$instance", client!="a{b}"}[$__rate_interval])))"#;
    assert_eq!(
        series_names(expr),
        BTreeSet::from(["inferflux_client_wait_seconds_bucket".to_string()])
    );
    let expr = "sum(rate(a_total[5m])) / on(instance) group_left(model) b_info or vector(0) > bool 1e3";
    assert_eq!(
        series_names(expr),
        BTreeSet::from(["a_total".to_string(), "b_info".to_string()])
    );
    assert_eq!(
        series_names("max(x) without (pod) offset 5m"),
        BTreeSet::from(["x".to_string()])
    );
    assert_eq!(
        series_names(r#"sum(rate(c{status=~"4..|5.."}[1m])) by (status)"#),
        BTreeSet::from(["c".to_string()])
    );
}

#[test]
fn deploy_dashboard_is_valid_grafana_json_with_a_query_per_panel() {
    let d = dashboard();
    assert_eq!(d["uid"], "inferflux");
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 36,
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert!(var("model")["query"]["query"]
        .as_str()
        .unwrap()
        .contains("inferflux_model_info"));

    let panels = panels(&d);
    assert!(panels.len() >= 20, "an SRE dashboard: {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            g["w"].as_u64().unwrap() + g["x"].as_u64().unwrap() <= 24,
            "{} overflows the grid",
            p["title"]
        );
    }
    for p in panels {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.trim().is_empty(), "a panel without a title: {p}");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: the datasource variable"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(
                !series_names(expr).is_empty(),
                "{title}: target without a series: {t}"
            );
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "{title}: not filtered by $instance: {expr}"
            );
        }
    }
}

/// A tiny pool (40 pages of 4 tokens) so that the concurrent goldens preempt and the prefix
/// cache both hits and evicts: the series those events create exist for the check.
fn small_pool(s: &mut Settings) {
    s.kv.num_pages = 40;
    s.kv.page_size = 4;
    s.scheduler.max_batched_tokens = 32;
    s.scheduler.preemption = PreemptionMode::Recompute;
}

#[tokio::test]
async fn deploy_dashboard_queries_name_only_exported_series() {
    // Slowed, so that the streams meet in the pool and preempt (the dashboard's preemption
    // series exists only after one) however fast the machine serves.
    let base = &common::start_slowed(small_pool, 2).await.base;
    let goldens = common::goldens();
    let streams: Vec<_> = goldens
        .prompts
        .iter()
        .chain(goldens.prompts.iter())
        .map(|p| {
            let body = json!({ "prompt": p.prompt, "max_tokens": 24, "temperature": 0, "stream": true, "user": "alice" });
            let base = base.to_string();
            tokio::spawn(async move { common::stream_completion(&base, body).await })
        })
        .collect();
    for s in streams {
        assert!(s.await.unwrap().done);
    }
    let resp = common::post_completion(
        base,
        &json!({ "prompt": "Hello", "max_tokens": 4, "user": "bob" }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let bad = common::post_completion(base, &json!({ "prompt": "Hello", "max_tokens": -1 })).await;
    assert_eq!(bad.status(), 400, "an error so that error series exist");
    assert_eq!(
        reqwest::get(format!("{base}/no/such/path"))
            .await
            .unwrap()
            .status(),
        404
    );
    common::wait_until_no_page_is_referenced(base).await;
    // A drain and a resume, as a rollout's preStop hook does: `inferflux_draining` exists from then on.
    for drain in [true, false] {
        let resp = reqwest::Client::new()
            .post(format!("{base}/admin/drain"))
            .json(&json!({ "drain": drain }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    let scrape = common::metrics_text(base).await;
    let d = dashboard();
    let missing = missing_series(&d, &scrape);
    assert!(
        missing.is_empty(),
        "the dashboard queries series /metrics does not export:\n{}\n\nscrape:\n{scrape}",
        missing.join("\n")
    );
    let used: BTreeSet<String> = dashboard_queries(&d)
        .iter()
        .flat_map(|(_, e)| series_names(e))
        .collect();
    assert!(
        used.len() >= 30,
        "the dashboard covers the exported metrics: {used:?}"
    );

    // The check catches a renamed metric: the dashboard still saying the old name fails.
    let renamed = scrape.replace("inferflux_time_to_first_token_seconds", "inferflux_ttft_seconds");
    let missing = missing_series(&d, &renamed);
    assert!(
        missing
            .iter()
            .any(|m| m.starts_with("inferflux_time_to_first_token_seconds_bucket")),
        "{missing:?}"
    );
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("INFERFLUX_PYTHON") {
        return p.into();
    }
    let venv = repo("target/py-venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with tests/python/requirements.txt: run the tests with scripts/test.sh (it creates \
         target/py-venv and sets INFERFLUX_PYTHON), or set INFERFLUX_PYTHON to such a python"
    );
    venv
}

/// Runs the schema and cross-reference checks; returns their summary of the model server pod.
fn check_manifests_with_python() -> Value {
    let summary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy_k8s_summary.json");
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(python())
        .arg(repo("tests/python/k8s_manifests_check.py"))
        .arg("--manifests")
        .arg(repo("deploy/kubernetes"))
        .arg("--schemas")
        .arg(repo("tests/fixtures/k8s-schemas"))
        .arg("--admin-guide")
        .arg(repo("docs/AdminGuide.md"))
        // The oldest and the newest Kubernetes the manifests are written for.
        .args(["--k8s-version", "1.31", "--k8s-version", "1.37"])
        .arg("--summary")
        .arg(&summary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", python()));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}");
    assert!(
        out.status.success(),
        "k8s_manifests_check.py failed:\n{stderr}\n{stdout}"
    );
    serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap()
}

/// `GET path`'s status.
async fn status_of(base: &str, path: &str) -> u16 {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn deploy_k8s_manifests_validate() {
    let pod = check_manifests_with_python();

    // The pod's configuration through the server's own loader: the ConfigMap's file, the
    // environment the Deployment builds from the Secret. Unknown keys or env names fail here.
    let config = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy_k8s_inferflux.toml");
    std::fs::write(&config, pod["config_toml"].as_str().unwrap()).unwrap();
    let env: Vec<(String, String)> = pod["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let loaded = Settings::load_with_env(Some(&config), &CliOverrides::default(), env.clone())
        .unwrap_or_else(|e| panic!("the ConfigMap's inferflux.toml with the pod's env: {e}"));
    assert_eq!(
        u64::from(loaded.server.port),
        pod["container_port"].as_u64().unwrap()
    );
    assert!(
        !loaded.auth.protect_metrics,
        "the endpoint picker scrapes /metrics without a key"
    );
    let admin_token = env
        .iter()
        .find(|(k, _)| k == "INFERFLUX__AUTH__ADMIN_TOKEN")
        .unwrap()
        .1
        .clone();
    let api_key = loaded
        .auth
        .api_keys
        .first()
        .cloned()
        .expect("the Secret's API keys reach the server");

    // That configuration served here: the embedded model on the CPU, on a free local port, with
    // a pool the test machine holds (the pod sizes it from GPU memory).
    let base = common::start(move |s| {
        *s = loaded;
        s.server.host = "127.0.0.1".into();
        s.server.port = 0;
        s.model.path = None;
        s.model.device = DeviceKind::Cpu;
        s.kv.num_pages = 64;
    })
    .base;
    let client = reqwest::Client::new();
    let complete = || {
        client
            .post(format!("{base}/v1/completions"))
            .bearer_auth(&api_key)
            .json(&json!({ "prompt": "Hello", "max_tokens": 4 }))
            .send()
    };
    assert_eq!(complete().await.unwrap().status(), 200);

    let probes = pod["probes"].as_object().unwrap();
    for (probe, path) in probes {
        assert_eq!(
            status_of(&base, path.as_str().unwrap()).await,
            200,
            "{probe} {path} on a serving pod"
        );
    }

    // The endpoint picker's metric names are in a live scrape, read without a key.
    let scrape = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(scrape.status(), 200);
    let exported = sample_names(&scrape.text().await.unwrap());
    let epp = pod["epp_metrics"].as_object().unwrap();
    assert_eq!(epp.len(), 3, "{epp:?}");
    for (field, name) in epp {
        assert!(
            exported.contains(name.as_str().unwrap()),
            "EPP {field} {name} is not in /metrics"
        );
    }

    // The preStop hook's call: refused without the admin token from the Secret, accepted with it;
    // then readiness fails (the pod leaves the Service and the pool), liveness holds (no restart),
    // and new completions are refused with 503 while the pod finishes what it has.
    let drain = &pod["drain"];
    assert_eq!(drain["method"], "POST");
    let drain_url = format!("{base}{}", drain["path"].as_str().unwrap());
    let anonymous = client.post(&drain_url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "drain needs the admin token");
    let drained = client
        .post(&drain_url)
        .bearer_auth(&admin_token)
        .json(&json!({ "drain": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200, "{:?}", drained.text().await);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&base, probes["readinessProbe"].as_str().unwrap()).await != 503 {
        assert!(
            Instant::now() < deadline,
            "readiness still passes after the drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status_of(&base, probes["livenessProbe"].as_str().unwrap()).await,
        200
    );
    assert_eq!(complete().await.unwrap().status(), 503);
}
