//! `huginn serve` (also what `huginn` with no command runs): the OpenAI-compatible server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use huginn::model::{BackendChoice, DeviceList, ExitKv};
use huginn::server::{StartError, build_state, serve_until, shutdown_signal};
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
    /// What an early exit does to the K/V of the loops a token skips, for requests that do not
    /// say: skip or fill (default: `generation.exit_kv`).
    #[arg(long)]
    exit_kv: Option<ExitKv>,
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
    if let Some(exit_kv) = args.exit_kv {
        settings.generation.exit_kv = exit_kv;
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
    let state = build_state(settings.clone(), &dir).map_err(|e| match e {
        StartError::Model(e) => anyhow::Error::new(e).context(format!("loading the model from {}", dir.display())),
        other => other.into(),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    runtime.block_on(async move {
        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
        let local = listener.local_addr()?;
        eprintln!("huginn ready: serving `{}` on http://{local}", state.model_name);
        tracing::info!("ready on http://{local}");
        serve_until(listener, state, grace, shutdown_signal()).await?;
        eprintln!("huginn stopped");
        anyhow::Ok(())
    })?;
    // Workers finish or drop what is left (cancelled) when the engine is dropped; blocking tasks
    // (tokenization) get a moment.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
