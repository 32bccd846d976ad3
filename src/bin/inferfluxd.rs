//! `inferfluxd`: the InferFlux server daemon.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use inferflux::config::{CliOverrides, DeviceKind, Settings};

/// Serve a Hugging Face Llama checkpoint over an OpenAI-compatible API.
///
/// Settings come from built-in defaults, then config/inferflux.toml (or --config), then
/// INFERFLUX__SECTION__KEY environment variables, then these flags.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML config file (default: config/inferflux.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hugging Face model directory; without it the embedded tiny model is served.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to bind (default 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind (default 8080; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Compute device: auto (CUDA when a GPU answers, else CPU), cpu or cuda.
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
}

/// Errors end the process with one line on stderr (the whole cause chain) and exit status 1.
fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inferfluxd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cli = CliOverrides {
        model: args.model,
        host: args.host,
        port: args.port,
        device: args.device,
    };
    let settings = Settings::load(args.config.as_deref(), &cli)?;
    inferflux::telemetry::init_logging(&settings.log.level, settings.log.format == "json");
    let metrics = inferflux::telemetry::metrics_handle();
    let bind = format!("{}:{}", settings.server.host, settings.server.port);
    let listener = TcpListener::bind(&bind).with_context(|| format!("binding {bind}"))?;
    actix_web::rt::System::new().block_on(async move {
        let running = inferflux::server::start(&settings, listener, metrics)?;
        running.server.await.context("HTTP server")
    })
}
