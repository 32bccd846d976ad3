//! `inferctl`: the InferFlux command-line client.

mod admin;
mod bench;
mod chat;
mod client;
mod completion;
mod error;
mod spinner;
mod sse;
mod tokens;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use client::Api;
use error::Result;

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  local error: a file that cannot be read or written, a malformed dump, a bad URL
  2  usage error: unknown flag, missing or malformed argument (clap)
  3  cannot connect to the server
  4  the server refused the request (HTTP 4xx); its error message is printed
  5  server error: HTTP 5xx, an error event mid-stream, or a stream that broke off

Environment:
  INFERFLUX_URL          server base URL (--url)
  INFERFLUX_API_KEY      API key (--api-key)
  INFERFLUX_ADMIN_TOKEN  admin token (--admin-token)";

#[derive(Parser, Debug)]
#[command(version, about = "Client for an InferFlux server", after_help = AFTER_HELP)]
struct Cli {
    /// Server base URL.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        env = "INFERFLUX_URL"
    )]
    url: String,
    /// API key, sent as `Authorization: Bearer KEY` on every request but `admin` ones.
    #[arg(long, global = true, env = "INFERFLUX_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Admin token, sent as `Authorization: Bearer TOKEN` on `admin` commands (instead of the
    /// API key).
    #[arg(long, global = true, env = "INFERFLUX_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Complete a prompt with /v1/completions.
    Completion(completion::CompletionArgs),
    /// Chat with /v1/chat/completions (streamed): interactive at a terminal, else one turn per
    /// stdin line. Commands: /reset clears the history, /exit (or EOF) quits.
    Chat(chat::ChatArgs),
    /// Print the token ids of TEXT (`/tokenize`), `count: N` on stderr.
    Tokenize {
        text: String,
        /// Do not add the tokenizer's special tokens (BOS).
        #[arg(long)]
        no_special: bool,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        model: Option<String>,
    },
    /// Print the text of token ids (`/detokenize`).
    Detokenize {
        #[arg(required = true)]
        ids: Vec<u32>,
        #[arg(long)]
        model: Option<String>,
    },
    /// Print the text of a `--dump-sse` file as it streamed, the finish reason on stderr.
    Replay {
        file: PathBuf,
        /// Which choice to print when the stream has several (`n` > 1).
        #[arg(long, default_value_t = 0)]
        choice: u64,
    },
    /// List the served models.
    Models,
    /// Load the server like `vllm bench serve`: streamed requests of fixed prompt and output
    /// lengths; reports TTFT, TPOT, ITL, end-to-end latency and throughput.
    Bench(bench::BenchArgs),
    /// Operator commands (sent with the admin token).
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inferctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let api = Api::new(&cli.url, cli.api_key);
    match cli.command {
        Command::Completion(args) => completion::run(&api, args).await,
        Command::Chat(args) => chat::run(&api, args).await,
        Command::Bench(args) => bench::run(api, args).await,
        Command::Tokenize {
            text,
            no_special,
            json,
            model,
        } => tokens::tokenize(&api, text, no_special, model, json).await,
        Command::Detokenize { ids, model } => tokens::detokenize(&api, ids, model).await,
        Command::Replay { file, choice } => sse::replay(&file, choice).await,
        Command::Models => {
            let v = api.get_json("/v1/models").await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        Command::Admin { command } => admin::run(&Api::new(&cli.url, cli.admin_token), command).await,
    }
}
