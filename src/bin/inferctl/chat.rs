//! `inferctl chat`: a conversation through `/v1/chat/completions` (always streamed). At a terminal
//! it is interactive (`> ` prompt, `/reset`, `/exit`); otherwise each stdin line is a user turn.

use std::fs::File;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use crate::client::Api;
use crate::completion::{create_dump, Sampling};
use crate::error::{CliError, Result};
use crate::spinner::Spinner;
use crate::sse::{self, Printer};

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// One user turn, answered, then exit (instead of reading stdin).
    #[arg(long, value_name = "TEXT")]
    message: Option<String>,
    /// A system message that opens the conversation (kept by /reset).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Tokens per reply (default: the server's, up to the context length).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Write every turn's raw SSE bytes, exactly as received, to FILE (created anew, then one turn
    /// after another).
    #[arg(long, value_name = "FILE")]
    dump_sse: Option<PathBuf>,
    #[command(flatten)]
    sampling: Sampling,
}

/// The conversation so far, as OpenAI messages.
struct Conversation {
    messages: Vec<Value>,
    /// How many leading messages `/reset` keeps (the system message).
    kept: usize,
}

impl Conversation {
    fn new(system: Option<&str>) -> Self {
        let messages: Vec<Value> = system
            .map(|s| json!({ "role": "system", "content": s }))
            .into_iter()
            .collect();
        Self {
            kept: messages.len(),
            messages,
        }
    }

    fn reset(&mut self) {
        self.messages.truncate(self.kept);
    }
}

pub async fn run(api: &Api, args: ChatArgs) -> Result<()> {
    let mut dump = args.dump_sse.as_deref().map(create_dump).transpose()?;
    let mut chat = Conversation::new(args.system.as_deref());
    if let Some(message) = &args.message {
        chat.messages.push(json!({ "role": "user", "content": message }));
        return turn(api, &args, &chat.messages, dump.as_mut()).await.map(drop);
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut line = String::new();
    loop {
        if interactive {
            print!("> ");
            std::io::stdout()
                .flush()
                .map_err(|e| CliError::io("writing stdout", e))?;
        }
        line.clear();
        let read = stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::io("reading stdin", e))?;
        if read == 0 {
            if interactive {
                println!();
            }
            return Ok(());
        }
        let text = line.trim_end_matches(['\r', '\n']);
        match text.trim() {
            "" => continue,
            "/exit" => return Ok(()),
            "/reset" => {
                chat.reset();
                if interactive {
                    eprintln!("(history cleared)");
                }
                continue;
            }
            _ => {}
        }
        chat.messages.push(json!({ "role": "user", "content": text }));
        match turn(api, &args, &chat.messages, dump.as_mut()).await {
            Ok(reply) => chat
                .messages
                .push(json!({ "role": "assistant", "content": reply })),
            // At a terminal a failed turn is reported and forgotten; the session goes on.
            Err(e) if interactive => {
                eprintln!("inferctl: {e}");
                chat.messages.pop();
            }
            Err(e) => return Err(e),
        }
    }
}

/// Streams one reply to stdout; returns its text for the history.
async fn turn(api: &Api, args: &ChatArgs, messages: &[Value], dump: Option<&mut File>) -> Result<String> {
    let mut body = json!({ "messages": messages, "stream": true });
    if let Some(n) = args.max_tokens {
        body["max_tokens"] = json!(n);
    }
    args.sampling.apply(&mut body);
    let mut spinner = Spinner::start();
    let resp = api.post("/v1/chat/completions", Some(&body)).await?;
    let mut printer = Printer::new(std::io::stdout().lock(), 0, Some(&mut spinner));
    Ok(sse::stream_live(resp, dump, &mut printer).await?.text)
}
