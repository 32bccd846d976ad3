//! The prompts of a benchmark: random ones of an exact token length (built with the server's own
//! `/tokenize` and `/detokenize`, so that the length is what the server counts), or the lines of
//! a file.

use std::path::Path;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::Endpoint;
use crate::client::Api;
use crate::error::{CliError, Result};

/// Ordinary English, tokenized once per run: its token ids are the pool random prompts draw
/// from. Drawing from real text keeps the tokenizer's special tokens out and gives ids of every
/// vocabulary (the server tells no vocabulary size).
const WORDS: &str = "the of and to in is was for that on as with by he it at from his an were are which \
this be or had not but first one their its new after who they have her she two been other when there all \
during into school time may years more most only over city some world would where later up such used many \
can state about national out known university united then made high him through year under well part \
between because long company each system life south number house being while team north music day water \
government small early group people game general family great called second three around member film \
public several both before following river history war own work found best however major since based \
again language local place power built north west east station world army order field market light";

/// How many times a random prompt is re-drawn before its length is given up on.
const FIT_TRIES: usize = 64;

/// How many prompts are built at once (each costs a few `/tokenize` round trips).
const BUILD_PARALLEL: usize = 8;

/// One prompt: its text and, when known, its length in tokens as the endpoint counts it.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub tokens: Option<usize>,
}

/// The server's tokenizer, as the benchmark needs it.
pub trait Tokens {
    /// The number of prompt tokens the endpoint will count for `text`.
    async fn count(&self, text: &str) -> Result<usize>;
    /// The text of token ids.
    async fn text(&self, ids: &[u32]) -> Result<String>;
}

/// [`Tokens`] over `/tokenize` and `/detokenize`.
pub struct ServerTokens<'a> {
    pub api: &'a Api,
    pub model: &'a str,
    pub endpoint: Endpoint,
}

impl Tokens for ServerTokens<'_> {
    async fn count(&self, text: &str) -> Result<usize> {
        // Chat prompts are counted as the chat template renders them, with the generation prompt.
        let body = match self.endpoint {
            Endpoint::Completions => json!({ "model": self.model, "prompt": text }),
            Endpoint::Chat => json!({
                "model": self.model,
                "messages": [{ "role": "user", "content": text }],
            }),
        };
        let v = self.api.post_json("/tokenize", &body).await?;
        v["count"]
            .as_u64()
            .map(|c| c as usize)
            .ok_or_else(|| CliError::server(format!("/tokenize answered without `count`: {v}")))
    }

    async fn text(&self, ids: &[u32]) -> Result<String> {
        let v = self
            .api
            .post_json("/detokenize", &json!({ "model": self.model, "tokens": ids }))
            .await?;
        v["prompt"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CliError::server(format!("/detokenize answered without `prompt`: {v}")))
    }
}

/// `n` random prompts of exactly `input_len` tokens each, prompt `i` drawn from `seed + i` (so the
/// set does not depend on the order the server answers in).
pub async fn random_prompts(
    api: &Api,
    tokens: &ServerTokens<'_>,
    n: usize,
    input_len: usize,
    seed: u64,
) -> Result<Vec<Prompt>> {
    let v = api
        .post_json(
            "/tokenize",
            &json!({ "model": tokens.model, "prompt": WORDS, "add_special_tokens": false }),
        )
        .await?;
    let mut pool: Vec<u32> = v["tokens"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_u64())
                .map(|id| id as u32)
                .collect()
        })
        .unwrap_or_default();
    pool.sort_unstable();
    pool.dedup();
    if pool.is_empty() {
        return Err(CliError::server(format!(
            "/tokenize gave no tokens for the word list: {v}"
        )));
    }
    // What the endpoint adds around any prompt (BOS, the chat template).
    let overhead = tokens.count("").await?;
    if input_len <= overhead {
        return Err(anyhow::anyhow!(
            "--input-len {input_len} leaves no room for text: the endpoint adds {overhead} tokens to every prompt"
        )
        .into());
    }
    futures::stream::iter(0..n)
        .map(|i| {
            let pool = &pool;
            async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
                fit(tokens, pool, input_len, overhead, &mut rng).await
            }
        })
        .buffered(BUILD_PARALLEL)
        .try_collect()
        .await
}

/// A text of exactly `target` tokens as `tokens` counts them: draws `target - overhead` ids from
/// `pool`, renders them, and while the count of the rendered text is off (a rendered text can
/// tokenize into fewer or more tokens than it was made of), cuts or adds ids by the difference
/// and re-draws the last one.
pub async fn fit<T: Tokens>(
    tokens: &T,
    pool: &[u32],
    target: usize,
    overhead: usize,
    rng: &mut StdRng,
) -> Result<Prompt> {
    let draw = |rng: &mut StdRng| pool[rng.random_range(0..pool.len())];
    let mut ids: Vec<u32> = (0..target - overhead).map(|_| draw(rng)).collect();
    let mut last = 0;
    for _ in 0..FIT_TRIES {
        let text = tokens.text(&ids).await?;
        let count = tokens.count(&text).await?;
        if count == target {
            return Ok(Prompt {
                text,
                tokens: Some(count),
            });
        }
        last = count;
        if count > target {
            let cut = (count - target).min(ids.len() - 1);
            ids.truncate(ids.len() - cut);
        } else {
            ids.extend((count..target).map(|_| draw(rng)));
        }
        if let Some(id) = ids.last_mut() {
            *id = draw(rng);
        }
    }
    Err(anyhow::anyhow!(
        "no random prompt of exactly {target} tokens after {FIT_TRIES} tries (the last had {last})"
    )
    .into())
}

/// The prompts of a file: one per line, a JSON object's `prompt` where the line is one (JSON
/// lines as vLLM's custom dataset has), else the line's text; blank lines are skipped.
pub fn file_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts = parse_prompts(&text);
    if prompts.is_empty() {
        return Err(anyhow::anyhow!("{} holds no prompts", path.display()).into());
    }
    Ok(prompts)
}

fn parse_prompts(text: &str) -> Vec<Prompt> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let text = match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(o)) if o.get("prompt").is_some_and(Value::is_string) => {
                    o["prompt"].as_str().unwrap_or_default().to_string()
                }
                _ => line.to_string(),
            };
            Prompt { text, tokens: None }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer where ids 0..10 are the letters a..j, a BOS is added, and "ab" tokenizes to
    /// one token (a merge), so that rendered ids can count fewer than they were.
    struct Fake;

    impl Tokens for Fake {
        async fn count(&self, text: &str) -> Result<usize> {
            Ok(1 + text.len() - text.matches("ab").count())
        }
        async fn text(&self, ids: &[u32]) -> Result<String> {
            Ok(ids.iter().map(|&id| char::from(b'a' + id as u8)).collect())
        }
    }

    #[test]
    fn inferctl_bench_random_prompts_fit_the_length_exactly() {
        let pool: Vec<u32> = (0..10).collect();
        for seed in 0..200 {
            for target in [2, 3, 16, 40] {
                let mut rng = StdRng::seed_from_u64(seed);
                let p = futures::executor::block_on(fit(&Fake, &pool, target, 1, &mut rng)).unwrap();
                let count = futures::executor::block_on(Fake.count(&p.text)).unwrap();
                assert_eq!(
                    (count, p.tokens),
                    (target, Some(target)),
                    "seed {seed}: {:?}",
                    p.text
                );
            }
        }
        // A length the tokenizer cannot give is an error, not a loop or a wrong length.
        let mut rng = StdRng::seed_from_u64(0);
        let err = futures::executor::block_on(fit(&Doubling, &pool, 4, 1, &mut rng)).unwrap_err();
        assert!(err.to_string().contains("exactly 4 tokens"), "{err}");
    }

    /// Every character counts two tokens: no text gives an even count past the BOS.
    struct Doubling;

    impl Tokens for Doubling {
        async fn count(&self, text: &str) -> Result<usize> {
            Ok(1 + 2 * text.len())
        }
        async fn text(&self, ids: &[u32]) -> Result<String> {
            Fake.text(ids).await
        }
    }

    #[test]
    fn inferctl_bench_file_prompts_read_json_lines_and_plain_lines() {
        let text = "{\"prompt\": \"one\", \"other\": 1}\n\nplain two\n{\"not_prompt\": 3}\n[1, 2]\n";
        let got: Vec<String> = parse_prompts(text).into_iter().map(|p| p.text).collect();
        assert_eq!(got, ["one", "plain two", "{\"not_prompt\": 3}", "[1, 2]"]);
    }
}
