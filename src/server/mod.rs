//! The OpenAI-compatible HTTP server (axum): routes, request handling, metrics and shutdown.

pub mod auth;
mod chat;
mod completions;
pub mod error;
mod handler;
mod misc;
mod request;
mod respond;
pub mod shutdown;
pub mod state;
mod structured;
mod tools;
mod validate;
mod wire;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::{counter, histogram};

use crate::engine::{Engine, EngineConfig, SchedulerLimits};
use crate::generate::constraint::ConstraintVocab;
use crate::metrics as m;
use crate::model::{DeviceSpec, HuginnModel, dtype_name};
use crate::settings::Settings;
use crate::text::TextTokenizer;
pub use error::{ApiError, StartError};
pub use shutdown::{serve_until, shutdown_signal};
pub use state::AppState;

/// Loads one model replica per device (entries naming the same device share one), the tokenizer,
/// and starts one engine worker per device entry.
fn load_replicas(settings: &Settings, dir: &Path) -> Result<Vec<Arc<HuginnModel>>, StartError> {
    let specs = settings.model.worker_devices()?;
    let mut replicas: Vec<(DeviceSpec, Arc<HuginnModel>)> = Vec::new();
    let mut models = Vec::with_capacity(specs.len());
    for spec in specs {
        let model = match replicas.iter().find(|(loaded, _)| *loaded == spec) {
            Some((_, model)) => model.clone(),
            None => {
                let device = spec.open()?;
                let (dtype, backend) = (settings.model.dtype.fixed(), settings.model.backend);
                let model = Arc::new(HuginnModel::load_with(dir, &device, dtype, backend)?);
                tracing::info!(
                    "model loaded on {spec}: {} weights, {} backend",
                    dtype_name(model.dtype()),
                    model.backend().name()
                );
                replicas.push((spec, model.clone()));
                model
            }
        };
        models.push(model);
    }
    Ok(models)
}

/// Loads the model and tokenizer from `dir` and starts the engine's workers.
pub fn build_state(settings: Settings, dir: &Path) -> Result<AppState, StartError> {
    let api_keys = auth::ApiKeys::load(
        settings.server.api_keys_file.as_deref(),
        std::env::var(auth::API_KEYS_ENV).ok().as_deref(),
    )?;
    if api_keys.is_enabled() {
        tracing::info!(
            "API keys required ({} configured) except on {:?}",
            api_keys.len(),
            settings.server.auth_open_paths
        );
    }
    let models = load_replicas(&settings, dir)?;
    let model = models.first().cloned().ok_or(StartError::NoDevice)?;
    settings.check_for_model(model.config())?;
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let constraints = ConstraintVocab::load(dir, tokenizer.clone(), model.config().vocab_size, Default::default())
        .map(Arc::new)
        .map_err(|e| {
            tracing::warn!("structured outputs are unavailable: {e}");
            Arc::<str>::from(e.0.as_str())
        });
    let config = Arc::new(model.config().clone());
    let limits = SchedulerLimits {
        max_active_sequences: settings.engine.max_active_sequences,
        max_kv_bytes: settings.engine.max_kv_bytes,
        max_tick_rows: settings.engine.max_tick_rows,
        prefix_cache_bytes: settings.engine.prefix_cache_bytes,
        elastic: settings.engine.elastic_targets(),
    };
    // The recorder first: the workers register their series (at zero) as they start.
    let metrics = crate::metrics::install();
    let engine = Engine::start(
        models,
        tokenizer.clone(),
        EngineConfig {
            queue_capacity: settings.engine.queue_capacity,
            limits,
            restart_backoff: std::time::Duration::from_millis(settings.engine.restart_backoff_ms),
        },
    );
    let settings_slots = settings.server.max_concurrent_requests;
    let model_name: Arc<str> = if settings.server.served_model_name.is_empty() {
        dir.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "huginn".into())
            .into()
    } else {
        settings.server.served_model_name.as_str().into()
    };
    Ok(AppState {
        settings: Arc::new(settings),
        engine: Arc::new(engine),
        tokenizer,
        config,
        model_name,
        metrics,
        draining: Arc::new(AtomicBool::new(false)),
        created: state::unix_time(),
        api_keys: Arc::new(api_keys),
        request_slots: Arc::new(tokio::sync::Semaphore::new(settings_slots)),
        constraints,
    })
}

pub fn router(state: AppState) -> Router {
    let limit = state.settings.server.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(misc::models))
        .route("/health", get(misc::health))
        .route("/ready", get(misc::ready))
        .route("/metrics", get(misc::metrics))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .fallback(misc::not_found)
        .method_not_allowed_fallback(misc::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(require_json))
        .layer(middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Counts requests by endpoint (the matched route, never the raw path) and status. A request whose
/// client goes away before the answer (its handler is dropped) counts as 499, nginx's "client
/// closed request".
async fn track(request: Request, next: Next) -> Response {
    let endpoint =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let mut tracked = Tracked { endpoint, started: Instant::now(), status: None };
    let response = next.run(request).await;
    tracked.status = Some(response.status().as_u16());
    response
}

/// One request's count and duration, recorded when it is dropped: with its status once the
/// handler answered, else as abandoned by the client.
struct Tracked {
    endpoint: String,
    started: Instant,
    status: Option<u16>,
}

/// The status a request is counted with when its client closed the connection first.
pub const CLIENT_CLOSED: u16 = 499;

impl Drop for Tracked {
    fn drop(&mut self) {
        let status = self.status.unwrap_or(CLIENT_CLOSED).to_string();
        let endpoint = std::mem::take(&mut self.endpoint);
        counter!(m::REQUESTS, "endpoint" => endpoint.clone(), "status" => status).increment(1);
        histogram!(m::REQUEST_DURATION, "endpoint" => endpoint).record(self.started.elapsed().as_secs_f64());
    }
}

/// POST bodies are JSON: a declared content type that is not JSON gets 415 (a missing one is
/// accepted, and the body must still parse as JSON).
async fn require_json(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST
        && let Some(kind) = request.headers().get(axum::http::header::CONTENT_TYPE)
    {
        let kind = kind.to_str().unwrap_or("").to_string();
        let essence = kind.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return ApiError::UnsupportedMediaType(kind).into_response();
        }
    }
    next.run(request).await
}
