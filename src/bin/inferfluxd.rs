//! `inferfluxd`: the InferFlux server daemon.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use inferflux::config::{CliOverrides, DeviceKind, Settings};
use inferflux::server::ChosenBackend;

/// Serve a Hugging Face Llama checkpoint over an OpenAI-compatible API.
///
/// Settings come from built-in defaults, then config/inferflux.toml (or --config), then
/// INFERFLUX__SECTION__KEY environment variables, then these flags.
// No `Debug`: the arguments hold secrets.
#[derive(Parser)]
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
    /// API key that /v1/*, /tokenize and /detokenize require as `Authorization: Bearer KEY`;
    /// repeat for several. Replaces auth.api_keys when given.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "INFERFLUX_API_KEY",
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Bearer token that /admin/* requires (replaces auth.admin_token).
    #[arg(long, value_name = "TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

/// Small blocks from mimalloc, large ones from glibc (see `inferflux::heap`).
#[global_allocator]
static HEAP: inferflux::heap::ServerHeap = inferflux::heap::ServerHeap;

/// Errors end the process with one line on stderr (the whole cause chain) and exit status 1.
fn main() -> std::process::ExitCode {
    // Before any thread starts: see `heap`.
    let heap_tuned = inferflux::heap::keep_freed_memory();
    match run(Args::parse(), heap_tuned) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inferfluxd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args, heap_tuned: bool) -> anyhow::Result<()> {
    let cli = CliOverrides {
        model: args.model,
        host: args.host,
        port: args.port,
        device: args.device,
        api_keys: (!args.api_keys.is_empty()).then_some(args.api_keys),
        admin_token: args.admin_token,
    };
    // A GPU gets its own built-in defaults (`Settings::built_in`); `auto` probes for one here,
    // before logging is set up, and the server probes again when it starts.
    let is_cuda = |device| inferflux::server::choose_backend(device).is_ok_and(|b| b == ChosenBackend::Cuda);
    let settings = Settings::load(args.config.as_deref(), &cli, is_cuda)?;
    inferflux::telemetry::init_logging(&settings.log.level, settings.log.format == "json");
    tracing::debug!(
        kept = heap_tuned,
        "freed heap memory kept for reuse (mmap threshold 32 MiB, trim threshold 1 GiB) unless GLIBC_TUNABLES sets malloc"
    );
    let metrics = inferflux::telemetry::metrics_handle();
    let bind = format!("{}:{}", settings.server.host, settings.server.port);
    let listener = TcpListener::bind(&bind).with_context(|| format!("binding {bind}"))?;
    let grace = std::time::Duration::from_secs(settings.server.shutdown_grace_seconds);
    actix_web::rt::System::new().block_on(async move {
        let running = inferflux::server::start(&settings, listener, metrics)?;
        let (scheduler, handle) = (running.scheduler.clone(), running.server.handle());
        actix_web::rt::spawn(async move {
            let signal = inferflux::shutdown::signal().await;
            tracing::info!(signal, "shutdown requested");
            inferflux::shutdown::graceful(scheduler, handle, grace).await;
        });
        running.server.await.context("HTTP server")?;
        tracing::info!("shutdown complete");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_flags_repeat_and_replace() {
        let args = Args::try_parse_from([
            "inferfluxd",
            "--api-key",
            "sk-1",
            "--api-key",
            "sk-2",
            "--admin-token",
            "adm",
        ])
        .unwrap();
        assert_eq!(args.api_keys, ["sk-1", "sk-2"]);
        assert_eq!(args.admin_token.as_deref(), Some("adm"));
    }
}
