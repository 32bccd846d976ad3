//! The server driven by Python clients, as users drive it: the official `openai` SDK
//! (`tests/python/openai_sdk_check.py`) and schemathesis fuzzing every route of `/openapi.json`.
//! Python comes from `INFERFLUX_PYTHON` (set by `scripts/test.sh`), else `target/py-venv`;
//! without one these tests fail with a message saying how to get it; they never skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// The checks that must hold for every generated request: no 5xx; every status, content type,
/// body (SSE events one by one) and header as documented; and every request the schema forbids
/// refused (`negative_data_rejection`: nothing is silently ignored). `positive_data_acceptance`
/// is left out: the schema cannot say everything the server checks (prompt plus `max_tokens`
/// within the context, token ids within the vocabulary, the model's name).
const FUZZ_CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                           response_schema_conformance,response_headers_conformance,\
                           negative_data_rejection";

/// Cases per operation and phase; the whole run stays well under two minutes on two cores.
const FUZZ_MAX_EXAMPLES: &str = "40";

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("INFERFLUX_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with tests/python/requirements.txt: run the tests with scripts/test.sh (it creates \
         target/py-venv and sets INFERFLUX_PYTHON), or set INFERFLUX_PYTHON to such a python"
    );
    venv
}

/// A fixture checkpoint with a chat template (ChatML), so that chat is exercised too.
fn chat_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2")
}

/// Runs `cmd` to the end: its output when it exits 0, else a failure message carrying it.
fn run(mut cmd: Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if out.status.success() {
        Ok(format!("{stdout}{stderr}"))
    } else {
        Err(format!(
            "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        ))
    }
}

#[test]
fn openai_sdk_completions_and_chat_streamed_and_not() {
    let server = common::start(|s| s.model.path = Some(chat_fixture()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_sdk_check.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args(["--base-url", &format!("{}/v1", server.base)]);
    match run(cmd, "tests/python/openai_sdk_check.py") {
        Ok(out) => println!("{out}"),
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn openapi_fuzz_finds_no_server_error_or_schema_violation() {
    let server = common::start(|s| s.model.path = Some(chat_fixture()));
    let mut cmd = Command::new(python());
    cmd.args(["-m", "schemathesis.cli", "run"])
        .arg(format!("{}/openapi.json", server.base))
        .args(["--checks", FUZZ_CHECKS])
        .args(["--mode", "all", "--max-examples", FUZZ_MAX_EXAMPLES])
        // The same requests every run (schemathesis ignores `--seed` in this mode).
        .arg("--generation-deterministic")
        .args(["--phases", "examples,coverage,fuzzing"])
        // Draining would turn every later request into a 503; the rest of /admin is harmless.
        .args(["--exclude-path", "/admin/drain"])
        // The document requires a bearer token; without one every request would count as
        // "schema-violating" for negative_data_rejection. This server has no keys: any passes.
        .args(["-H", "Authorization: Bearer inferflux-fuzz"])
        .args(["--workers", "1", "--request-timeout", "60"])
        .arg("--no-color")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .current_dir(env!("CARGO_TARGET_TMPDIR"));
    let fuzzed = run(cmd, "schemathesis");
    if let Ok(out) = &fuzzed {
        println!("{out}");
    }

    // Whatever schemathesis found, the server is still healthy, serves, and holds no page for
    // any of the fuzzed requests.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let base = &server.base;
        let health = reqwest::get(format!("{base}/health")).await.unwrap();
        assert_eq!(health.status(), 200);
        let resp = common::post_completion(
            base,
            &json!({ "prompt": "Hello", "max_tokens": 4, "ignore_eos": true }),
        )
        .await;
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
        common::wait_until_no_page_is_referenced(base).await;
        assert_eq!(common::queue_report(base).await["draining"], false);
    });
    if let Err(failure) = fuzzed {
        panic!("{failure}");
    }
}
