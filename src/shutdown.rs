//! Graceful shutdown on SIGTERM/SIGINT, in an order of our own (actix-web's signal handling is
//! off, see `server::start`): stop admitting (503 with `Retry-After`, `/ready` 503), let what
//! runs or waits finish for up to `server.shutdown_grace_seconds`, cancel the rest with an
//! error event or body, then stop the HTTP server. No request is left without a last event.

use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::dev::ServerHandle;

use crate::actors::dp_router::DpRouter;
use crate::actors::scheduler::{BeginShutdown, CancelAll, QueueReport};

/// How often the queue is checked while requests finish.
const POLL: Duration = Duration::from_millis(50);

/// What a request still running when the grace period ends receives.
pub const CANCELLED_MESSAGE: &str =
    "The server shut down before this request finished; retry it on another replica.";

/// Resolves on the first SIGTERM or SIGINT, with the signal's name.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Drains the scheduler within `grace`, cancels what is left, and stops the HTTP server.
pub async fn graceful(scheduler: Addr<DpRouter>, server: ServerHandle, grace: Duration) {
    let started = Instant::now();
    match scheduler.send(BeginShutdown).await {
        Ok(q) => tracing::info!(
            running = q.running,
            waiting = q.waiting,
            grace_s = grace.as_secs_f64(),
            "shutdown: admitting no new requests (503); letting running ones finish"
        ),
        Err(e) => tracing::error!(error = %e, "shutdown: the scheduler does not answer"),
    }
    loop {
        let left = match scheduler.send(QueueReport).await {
            Ok(q) => q.running + q.waiting,
            Err(_) => 0,
        };
        if left == 0 {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "shutdown: every request finished"
            );
            break;
        }
        if started.elapsed() >= grace {
            let cancelled = scheduler
                .send(CancelAll {
                    message: CANCELLED_MESSAGE.into(),
                })
                .await
                .unwrap_or(0);
            tracing::warn!(
                cancelled_requests = cancelled,
                sequences = left,
                "shutdown: grace period over; cancelled what was left with an error"
            );
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    tracing::info!("shutdown: stopping the HTTP server");
    server.stop(true).await;
}
