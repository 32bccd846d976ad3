//! `inferctl tokenize` and `inferctl detokenize`: the server's own tokenizer (`/tokenize`,
//! `/detokenize`), so that counts match what a request will use.

use serde_json::json;

use crate::client::Api;
use crate::error::{CliError, Result};

pub async fn tokenize(
    api: &Api,
    text: String,
    no_special: bool,
    model: Option<String>,
    json: bool,
) -> Result<()> {
    let mut body = json!({ "prompt": text, "add_special_tokens": !no_special });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let v = api.post_json("/tokenize", &body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let ids = v["tokens"]
        .as_array()
        .ok_or_else(|| CliError::server(format!("/tokenize answered without `tokens`: {v}")))?;
    let line: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    println!("{}", line.join(" "));
    eprintln!("count: {}", v["count"]);
    Ok(())
}

pub async fn detokenize(api: &Api, ids: Vec<u32>, model: Option<String>) -> Result<()> {
    let mut body = json!({ "tokens": ids });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let v = api.post_json("/detokenize", &body).await?;
    let text = v["prompt"]
        .as_str()
        .ok_or_else(|| CliError::server(format!("/detokenize answered without `prompt`: {v}")))?;
    println!("{text}");
    Ok(())
}
