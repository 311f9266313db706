//! Serving until a shutdown signal, then draining: readiness fails and new generation requests
//! get 503 at once (the listener stays open so that clients get an answer while load balancers
//! catch up); in-flight requests get the grace period to finish (the engine wakes the drain as
//! work leaves it); then the listener closes and open responses are flushed until the same
//! deadline.

use std::future::{Future, IntoFuture};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{AppState, router};

/// Serves `state` on `listener` until `signal` completes, then drains within `grace`.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    state: AppState,
    grace: Duration,
    signal: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async move {
        let _ = stopped.await;
    });
    let mut server = tokio::spawn(server.into_future());
    tokio::select! {
        outcome = &mut server => return outcome.map_err(std::io::Error::other)?,
        _ = signal => {}
    }
    state.draining.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + grace;
    let in_flight = state.engine.in_flight();
    tracing::info!("shutdown requested: {in_flight} sequence(s) or queued job(s) in flight; grace {grace:?}");
    let _ = tokio::time::timeout_at(deadline, state.engine.wait_idle()).await;
    let _ = stop.send(());
    match tokio::time::timeout_at(deadline, server).await {
        Ok(outcome) => outcome.map_err(std::io::Error::other)??,
        Err(_) => tracing::warn!("grace period over: closing the responses still open"),
    }
    let left = state.engine.in_flight();
    if left > 0 {
        tracing::warn!("{left} sequence(s) or queued job(s) cancelled at shutdown");
    }
    Ok(())
}

/// Completes on SIGINT or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => return interrupt.await.unwrap_or(()),
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await.unwrap_or(());
}
