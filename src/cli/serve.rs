//! `huginn serve` (also what `huginn` with no command runs): the OpenAI-compatible server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use huginn::server::{build_state, router};
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
    runtime.block_on(async move {
        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
        let local = listener.local_addr()?;
        let draining = state.draining.clone();
        eprintln!("huginn ready: serving `{}` on http://{local}", state.model_name);
        tracing::info!("ready on http://{local}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                draining.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("shutdown requested: finishing in-flight requests");
            })
            .await?;
        Ok(())
    })
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
