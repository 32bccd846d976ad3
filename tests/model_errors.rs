//! A wrong or partial checkpoint stops `inferfluxd` with one line on stderr that names the file
//! and the problem, and a non-zero exit status.

use std::path::{Path, PathBuf};

/// A copy of the tiny Qwen2 fixture, broken by `damage`.
fn broken_copy(tag: &str, damage: impl FnOnce(&Path)) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
    let dir = std::env::temp_dir().join(format!("inferflux-broken-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    damage(&dir);
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Starts the daemon on `dir` and returns its stderr; it must fail.
fn start_fails(dir: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inferfluxd"))
        .args(["--model", dir.to_str().unwrap(), "--device", "cpu", "--port", "0"])
        .env("INFERFLUX__LOG__LEVEL", "error")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the daemon started on a broken checkpoint");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    std::fs::remove_dir_all(dir).unwrap();
    stderr
}

#[test]
fn model_errors_name_the_file_and_the_problem() {
    let missing_tokenizer = broken_copy("tokenizer", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap()
    });
    let err = start_fails(&missing_tokenizer);
    assert!(
        err.contains("tokenizer.json") && err.contains("No such file"),
        "{err}"
    );

    let unknown_arch = broken_copy("arch", |d| {
        edit_config(d, |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]))
    });
    let err = start_fails(&unknown_arch);
    assert!(
        err.contains("config.json") && err.contains("GPT2LMHeadModel") && err.contains("Qwen2ForCausalLM"),
        "{err}"
    );

    let wrong_shape = broken_copy("shape", |d| {
        edit_config(d, |c| c["intermediate_size"] = serde_json::json!(128))
    });
    let err = start_fails(&wrong_shape);
    assert!(
        err.contains("model.safetensors") && err.contains("mlp") && err.contains("shape"),
        "{err}"
    );

    let missing_tensor = broken_copy("tensor", |d| {
        // Qwen2 has q/k/v biases; as Llama it would need an o_proj bias the checkpoint lacks.
        edit_config(d, |c| {
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            c["attention_bias"] = serde_json::json!(true);
        })
    });
    let err = start_fails(&missing_tensor);
    assert!(
        err.contains("model.safetensors") && err.contains("missing tensor") && err.contains("o_proj.bias"),
        "{err}"
    );

    let no_weights = broken_copy("weights", |d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap()
    });
    let err = start_fails(&no_weights);
    assert!(
        err.contains("model.safetensors") && err.contains("No such file"),
        "{err}"
    );
}
