//! `inferctl completion`: one prompt through `/v1/completions`, streamed or whole.

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use crate::client::{self, Api};
use crate::error::{CliError, Result};
use crate::spinner::Spinner;
use crate::sse::{self, Printer};

/// The sampling flags `completion` and `chat` share; each is sent only when given.
#[derive(Args, Debug, Clone)]
pub struct Sampling {
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub seed: Option<i64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Model name (default: the server's only model).
    #[arg(long)]
    pub model: Option<String>,
}

impl Sampling {
    pub fn apply(&self, body: &mut Value) {
        for (key, value) in [
            ("temperature", self.temperature.map(|t| json!(t))),
            ("top_p", self.top_p.map(|t| json!(t))),
            ("seed", self.seed.map(|s| json!(s))),
            ("model", self.model.as_ref().map(|m| json!(m))),
        ] {
            if let Some(v) = value {
                body[key] = v;
            }
        }
        if !self.stop.is_empty() {
            body["stop"] = json!(self.stop);
        }
    }
}

#[derive(Args, Debug)]
pub struct CompletionArgs {
    prompt: String,
    /// Stream tokens as they are generated (SSE).
    #[arg(long)]
    stream: bool,
    /// Write the raw SSE bytes, exactly as received, to FILE (implies --stream).
    #[arg(long, value_name = "FILE")]
    dump_sse: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    #[command(flatten)]
    sampling: Sampling,
}

pub async fn run(api: &Api, args: CompletionArgs) -> Result<()> {
    let stream = args.stream || args.dump_sse.is_some();
    let mut body = json!({ "prompt": args.prompt, "max_tokens": args.max_tokens, "stream": stream });
    args.sampling.apply(&mut body);
    // Opened before the request, so that an unwritable path fails without using the server.
    let mut dump = args.dump_sse.as_deref().map(create_dump).transpose()?;
    let mut spinner = Spinner::start();
    let resp = api.post("/v1/completions", Some(&body)).await?;
    if stream {
        let mut printer = Printer::new(std::io::stdout().lock(), 0, Some(&mut spinner));
        sse::stream_live(resp, dump.as_mut(), &mut printer).await?;
    } else {
        let v = client::json(resp).await?;
        spinner.stop();
        println!("{}", v["choices"][0]["text"].as_str().unwrap_or_default());
        eprintln!(
            "finish_reason={} usage={}",
            v["choices"][0]["finish_reason"], v["usage"]
        );
    }
    Ok(())
}

/// Creates (or truncates) a dump file.
pub fn create_dump(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(|e| CliError::io(&format!("creating {}", path.display()), e))
}
