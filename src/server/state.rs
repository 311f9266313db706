//! Shared state of the HTTP handlers: a cheap-to-clone handle around `Arc`s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::error::ApiError;

use crate::engine::Engine;
use crate::generate::constraint::ConstraintVocab;
use crate::model::HuginnConfig;
use crate::settings::Settings;
use crate::text::TextTokenizer;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub engine: Arc<Engine>,
    pub tokenizer: Arc<TextTokenizer>,
    pub config: Arc<HuginnConfig>,
    /// Name clients use in `model`.
    pub model_name: Arc<str>,
    pub metrics: PrometheusHandle,
    /// Set when shutdown begins: readiness fails and new work is refused.
    pub draining: Arc<AtomicBool>,
    pub created: u64,
    /// API keys requests must present (none: the API is open).
    pub api_keys: Arc<super::auth::ApiKeys>,
    /// Slots for generation requests in flight (`server.max_concurrent_requests`).
    pub request_slots: Arc<Semaphore>,
    /// The model's vocabulary for structured outputs, or why it could not be built.
    pub constraints: Result<Arc<ConstraintVocab>, Arc<str>>,
}

/// A generation request's hold on the server: its concurrency slot (released when the lease is
/// dropped, after the last byte of a stream) and its time limits.
pub struct Lease {
    _slot: OwnedSemaphorePermit,
    /// When the request must be done (`server.request_timeout_seconds`).
    pub deadline: Option<Instant>,
    pub timeout_seconds: u64,
    /// How long a stream may wait for its client to accept data.
    pub idle: Option<Duration>,
}

impl Lease {
    /// Limits in seconds from now; 0 means none.
    pub(crate) fn new(slot: OwnedSemaphorePermit, timeout_seconds: u64, idle_seconds: u64) -> Self {
        let seconds = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Lease {
            _slot: slot,
            deadline: seconds(timeout_seconds).map(|d| Instant::now() + d),
            timeout_seconds,
            idle: seconds(idle_seconds),
        }
    }
}

impl AppState {
    pub fn model_config(&self) -> &HuginnConfig {
        &self.config
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Takes a slot for a generation request, at once: 503 while shutting down, 429 when every
    /// slot is taken.
    pub fn lease(&self) -> Result<Lease, ApiError> {
        if self.is_draining() {
            return Err(ApiError::shutting_down());
        }
        let slot = self.request_slots.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded)?;
        let server = &self.settings.server;
        Ok(Lease::new(slot, server.request_timeout_seconds, server.stream_idle_timeout_seconds))
    }
}

pub fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A unique-enough id for responses and request ids: time and a process-wide counter.
pub fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{:06x}", nanos, COUNTER.fetch_add(1, Ordering::Relaxed) & 0xff_ffff)
}
