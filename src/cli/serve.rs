//! `huginn serve` (also what `huginn` with no command runs): the OpenAI-compatible server.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use huginn::model::{BackendChoice, DeviceList};
use huginn::server::{AppState, build_state, router};
use huginn::settings::Settings;

#[derive(Args, Default)]
pub struct ServeArgs {
    /// Checkpoint folder (default: `model.path` from the settings).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// One worker per entry, comma-separated: cpu, cuda:N, cuda:all (default: `model.devices`).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// auto (CPU kernels on the CPU, tensor ops elsewhere) or tensor (default: `model.backend`).
    #[arg(long)]
    backend: Option<BackendChoice>,
}

pub fn run(args: ServeArgs, mut settings: Settings) -> anyhow::Result<()> {
    if let Some(host) = args.host {
        settings.server.host = host;
    }
    if let Some(port) = args.port {
        settings.server.port = port;
    }
    if args.model.is_some() {
        settings.model.path = args.model;
    }
    if let Some(devices) = args.devices {
        settings.model.devices = DeviceList(devices.iter().map(|d| d.parse()).collect::<Result<_, _>>()?);
    }
    if let Some(backend) = args.backend {
        settings.model.backend = backend;
    }
    if settings.model.path.is_none() {
        settings.model.path = huginn::settings::default_model_dir();
    }
    let dir = settings
        .model
        .path
        .clone()
        .context("the default model is missing: give --model DIR (or set model.path / HUGINN_MODEL_PATH)")?;
    tracing::info!("effective settings:\n{}", toml::to_string(&settings).unwrap_or_default());
    let state =
        build_state(settings.clone(), &dir).with_context(|| format!("loading the model from {}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    runtime.block_on(async move {
        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
        let local = listener.local_addr()?;
        eprintln!("huginn ready: serving `{}` on http://{local}", state.model_name);
        tracing::info!("ready on http://{local}");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        let mut server = tokio::spawn(server.into_future());
        tokio::select! {
            outcome = &mut server => return Ok(outcome??),
            _ = shutdown_signal() => {}
        }
        drain(&state, grace, stop, server).await
    })?;
    // Workers finish or drop what is left (cancelled) when the engine is dropped; blocking tasks
    // (tokenization) get a moment.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Graceful shutdown: readiness fails and new generation requests get 503 at once (the listener
/// stays open so that clients get an answer while load balancers catch up); in-flight requests get
/// `grace` to finish; then the listener closes and open responses are flushed until the same
/// deadline.
async fn drain(
    state: &AppState,
    grace: Duration,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
) -> anyhow::Result<()> {
    state.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + grace;
    let in_flight = state.engine.in_flight();
    tracing::info!("shutdown requested: {in_flight} sequence(s) or queued job(s) in flight; grace {grace:?}");
    while state.engine.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    match tokio::time::timeout_at(deadline, server).await {
        Ok(outcome) => outcome??,
        Err(_) => tracing::warn!("grace period over: closing the responses still open"),
    }
    let left = state.engine.in_flight();
    if left > 0 {
        tracing::warn!("{left} sequence(s) or queued job(s) cancelled at shutdown");
    }
    eprintln!("huginn stopped");
    Ok(())
}

async fn shutdown_signal() {
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
