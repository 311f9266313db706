//! Shared state of the HTTP handlers: a cheap-to-clone handle around `Arc`s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::engine::Engine;
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
}

impl AppState {
    pub fn model_config(&self) -> &HuginnConfig {
        &self.config
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

pub fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
