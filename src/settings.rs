//! Settings, in increasing precedence: built-in defaults < a TOML file (`config/default.toml` when
//! present, or `--settings FILE`) < `HUGINN_<SECTION>_<KEY>` environment variables < command-line flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::generate::defaults::Depth;
pub use crate::generate::defaults::{GenerationSettings, LimitSettings};
use crate::model::{BackendChoice, DTypeChoice, DeviceList, DeviceSpec, HuginnConfig};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("setting `{key}`: {message}")]
    Value { key: String, message: String },
}

pub const DEFAULT_FILE: &str = "config/default.toml";
const ENV_PREFIX: &str = "HUGINN_";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub model: ModelSettings,
    pub generation: GenerationSettings,
    pub server: ServerSettings,
    pub engine: EngineSettings,
    pub limits: LimitSettings,
    /// The environment variable that set each key (`section.key`), to name it in errors.
    #[serde(skip)]
    set_by: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Name under which the model is served (`model` in requests); empty: the folder's name.
    pub served_model_name: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// File of API keys, one per line (`#` comments); with the `HUGINN_API_KEYS` variable
    /// (comma-separated), requests must send one as `Authorization: Bearer KEY`. No keys: open.
    pub api_keys_file: Option<PathBuf>,
    /// Paths that need no API key even when keys are set.
    pub auth_open_paths: Vec<String>,
    /// Requests to the generation and tokenizer endpoints handled at once (parsing, tokenizing,
    /// queued, running or streaming); beyond it new ones get 429.
    pub max_concurrent_requests: usize,
    /// Deadline of a generation request, from its arrival to its last token; 0: none.
    pub request_timeout_seconds: u64,
    /// A stream whose client accepts no data for this long is ended and its work cancelled; 0: never.
    pub stream_idle_timeout_seconds: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the process exits.
    pub shutdown_grace_seconds: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: String::new(),
            max_body_bytes: 1 << 20,
            api_keys_file: None,
            auth_open_paths: ["/health", "/ready", "/metrics"].map(String::from).to_vec(),
            max_concurrent_requests: 256,
            request_timeout_seconds: 600,
            stream_idle_timeout_seconds: 60,
            shutdown_grace_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Jobs waiting per worker before new requests get 429.
    pub queue_capacity: usize,
    /// Sequences (choices) a worker iterates at once.
    pub max_active_sequences: usize,
    /// K/V cache bytes a worker may reserve for running sequences.
    pub max_kv_bytes: usize,
    /// Delay before a failed worker restarts; doubles while it keeps failing (at most 30 s).
    pub restart_backoff_ms: u64,
    /// Rows (token positions) one prelude, core-step or coda pass of a worker may hold; 0 is
    /// unlimited. Decoding rows go first; prompts fill the rest and are prefilled in pieces.
    pub max_tick_rows: usize,
    /// Bytes of prompt K/V (every step of a prefill) a worker keeps for reuse by later prompts
    /// with the same beginning; part of `max_kv_bytes`. 0 turns prefix caching off.
    pub prefix_cache_bytes: usize,
    /// Elastic depth: the inter-token latency (ms) each worker holds by scaling the depth of
    /// requests with a `min_num_steps` floor; unset: off.
    pub target_itl_ms: Option<u64>,
    /// Elastic depth: the queue wait (ms) each worker holds the same way; unset: off.
    pub target_queue_ms: Option<u64>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_active_sequences: 64,
            max_kv_bytes: 4 << 30,
            restart_backoff_ms: 1000,
            max_tick_rows: DEFAULT_MAX_TICK_ROWS,
            prefix_cache_bytes: 1 << 30,
            target_itl_ms: None,
            target_queue_ms: None,
        }
    }
}

/// The default row budget of a tick (docs/BENCHMARKS.md, long-prompt interference).
pub const DEFAULT_MAX_TICK_ROWS: usize = 64;

impl EngineSettings {
    /// The elastic-depth targets each worker's controller holds.
    pub fn elastic_targets(&self) -> crate::engine::ElasticTargets {
        let ms = |v: Option<u64>| v.map(std::time::Duration::from_millis);
        crate::engine::ElasticTargets { itl: ms(self.target_itl_ms), queue: ms(self.target_queue_ms) }
    }

    /// `Err((key, message))` for a value that cannot work.
    pub fn validate(&self) -> Result<(), (String, String)> {
        at_least_one(
            "engine",
            [("queue_capacity", self.queue_capacity), ("max_active_sequences", self.max_active_sequences)],
        )?;
        if self.prefix_cache_bytes > self.max_kv_bytes {
            return Err((
                "engine.prefix_cache_bytes".into(),
                format!(
                    "must be at most engine.max_kv_bytes ({}): the cache's blocks are part of the worker's K/V \
                     memory, got {}",
                    self.max_kv_bytes, self.prefix_cache_bytes
                ),
            ));
        }
        for (key, value) in [("target_itl_ms", self.target_itl_ms), ("target_queue_ms", self.target_queue_ms)] {
            if value == Some(0) {
                return Err((
                    format!("engine.{key}"),
                    "must be at least 1 (leave it unset to turn elastic depth off)".into(),
                ));
            }
        }
        if self.max_tick_rows != 0 && self.max_tick_rows < self.max_active_sequences {
            return Err((
                "engine.max_tick_rows".into(),
                format!(
                    "must be 0 (unlimited) or at least engine.max_active_sequences ({}) so that every decoding \
                     row fits beside a prompt's, got {}",
                    self.max_active_sequences, self.max_tick_rows
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// Checkpoint folder.
    pub path: Option<PathBuf>,
    /// Weights dtype in memory: auto (the checkpoint's `torch_dtype`), f32, bf16 or f16.
    pub dtype: DTypeChoice,
    /// `cpu`, `cuda` or `cuda:N`: the device when `devices` is empty.
    pub device: DeviceSpec,
    /// One model replica and worker per entry (`cpu`, `cuda:N`, `cuda:all`); empty: `[device]`.
    pub devices: DeviceList,
    /// `auto` (the CPU kernels on the CPU, tensor ops elsewhere) or `tensor` (tensor ops everywhere).
    pub backend: BackendChoice,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: None,
            dtype: DTypeChoice::Auto,
            device: DeviceSpec::Cpu,
            devices: DeviceList::default(),
            backend: BackendChoice::Auto,
        }
    }
}

impl ModelSettings {
    /// The devices to start workers on: `devices`, else `[device]`, with `cuda:all` expanded.
    pub fn worker_devices(&self) -> crate::model::Result<Vec<DeviceSpec>> {
        let listed = if self.devices.0.is_empty() { vec![self.device] } else { self.devices.0.clone() };
        DeviceSpec::expand(&listed)
    }
}

impl Settings {
    /// Reads `file` (which must exist), or `config/default.toml` when present, then applies the
    /// process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let path = match file {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.is_file()),
        };
        let text = match &path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| SettingsError::File { path: path.clone(), message: e.to_string() })?,
            None => String::new(),
        };
        Self::from_sources(&text, path.as_deref().unwrap_or(Path::new("<defaults>")), std::env::vars())
    }

    /// Builds settings from a TOML document and `HUGINN_<SECTION>_<KEY>` variables.
    pub fn from_sources(
        toml_text: &str,
        origin: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let file_error = |message: String| SettingsError::File { path: origin.to_path_buf(), message };
        let from_file: Settings = toml::from_str(toml_text).map_err(|e| file_error(e.to_string()))?;
        let mut tree = toml::Value::try_from(&from_file).map_err(|e| file_error(e.to_string()))?;
        let sections: Vec<String> = tree.as_table().map(|t| t.keys().cloned().collect()).unwrap_or_default();
        // The variable that set each key, to name it when a rule fails.
        let mut set_by: Vec<(String, String)> = Vec::new();
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            let rest = rest.to_ascii_lowercase();
            let Some(section) = sections.iter().find(|s| rest.starts_with(&format!("{s}_"))) else { continue };
            let key = &rest[section.len() + 1..];
            // A TOML literal when it parses as one (numbers, booleans), else a plain string.
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
            if let Some(table) = tree.get_mut(section.as_str()).and_then(|s| s.as_table_mut()) {
                table.insert(key.to_string(), value);
            }
            // The file parsed: an unknown key or a value of the wrong type is this variable's.
            Settings::deserialize(tree.clone())
                .map_err(|e| SettingsError::Env { var: var.clone(), message: e.to_string() })?;
            set_by.push((format!("{section}.{key}"), var.clone()));
        }
        let mut settings = Settings::deserialize(tree).map_err(|e| file_error(e.to_string()))?;
        settings.set_by = set_by;
        // Every source merged, the rules that relate values are checked once, whatever the
        // variables' order.
        settings.validate().map_err(|(key, message)| settings.error(key, message))?;
        Ok(settings)
    }

    /// An error for `key`, named with the environment variable that set it, if one did.
    fn error(&self, key: String, message: String) -> SettingsError {
        match self.set_by.iter().rev().find(|(k, _)| *k == key) {
            Some((_, var)) => SettingsError::Env { var: var.clone(), message: format!("setting `{key}`: {message}") },
            None => SettingsError::Value { key, message },
        }
    }

    /// The rules that need the loaded model: `generation.num_steps` unset means its
    /// `mean_recurrence`, which the defaults that depend on the depth must fit, as must
    /// `limits.max_num_steps`, and what the model itself allows (the `gate` criterion, the
    /// parallel sampler and continuous compute: [`crate::generate::GenerationParams::check_model`]);
    /// checked when `serve` and `generate` start.
    pub fn check_for_model(&self, cfg: &HuginnConfig) -> Result<(), SettingsError> {
        let mean_recurrence = cfg.mean_recurrence;
        let value = |key: &str, message: String| self.error(key.to_string(), message);
        if self.generation.num_steps.is_none() && mean_recurrence > self.limits.max_num_steps {
            return Err(value(
                "limits.max_num_steps",
                format!(
                    "{} is below the model's mean_recurrence ({mean_recurrence}), the default num_steps: raise it or \
                     set generation.num_steps",
                    self.limits.max_num_steps
                ),
            ));
        }
        let depth = match self.generation.num_steps {
            Some(steps) => Depth { steps, source: "generation.num_steps" },
            None => Depth { steps: mean_recurrence, source: "the model's mean_recurrence" },
        };
        self.generation.check_at(depth).map_err(|(key, message)| value(&key, message))?;
        self.generation.check_model(cfg).map_err(|(key, message)| value(&key, message))
    }
}

impl Settings {
    /// The checks no single value's type makes: ranges and combinations.
    fn validate(&self) -> Result<(), (String, String)> {
        self.engine.validate()?;
        self.server.validate()?;
        self.limits.validate()?;
        // Before the model is known, the depth is `generation.num_steps` or the most a request
        // may ask: only what can never run is refused here (the rest at `check_for_model`).
        let depth = match self.generation.num_steps {
            Some(steps) => Depth { steps, source: "generation.num_steps" },
            None => Depth { steps: self.limits.max_num_steps, source: "limits.max_num_steps" },
        };
        self.generation.check_at(depth)?;
        let fail = |key: &str, message: String| Err((key.to_string(), message));
        let (generation, limits) = (&self.generation, &self.limits);
        if let Some(steps) = generation.num_steps.filter(|&steps| steps > limits.max_num_steps) {
            return fail(
                "generation.num_steps",
                format!("must be at most limits.max_num_steps ({}), got {steps}", limits.max_num_steps),
            );
        }
        if generation.max_tokens > limits.max_tokens {
            let message =
                format!("must be at most limits.max_tokens ({}), got {}", limits.max_tokens, generation.max_tokens);
            return fail("generation.max_tokens", message);
        }
        let most = limits.max_draft_tokens;
        if generation.draft_tokens > most {
            let message = format!("must be at most limits.max_draft_tokens ({most}), got {}", generation.draft_tokens);
            return fail("generation.draft_tokens", message);
        }
        let widest = limits.max_wavefront;
        if generation.max_wavefront == 0 || generation.max_wavefront > widest {
            let message =
                format!("must be between 1 and limits.max_wavefront ({widest}), got {}", generation.max_wavefront);
            return fail("generation.max_wavefront", message);
        }
        Ok(())
    }
}

impl LimitSettings {
    /// Every limit lets something through (a limit of 0 would refuse every request).
    fn validate(&self) -> Result<(), (String, String)> {
        at_least_one(
            "limits",
            [
                ("max_num_steps", self.max_num_steps),
                ("max_tokens", self.max_tokens),
                ("max_n", self.max_n),
                ("max_total_steps", self.max_total_steps),
                ("max_prompt_tokens", self.max_prompt_tokens.unwrap_or(1)),
                ("max_draft_tokens", self.max_draft_tokens),
                ("max_wavefront", self.max_wavefront),
                ("max_constraint_bytes", self.max_constraint_bytes),
            ],
        )
    }
}

impl ServerSettings {
    fn validate(&self) -> Result<(), (String, String)> {
        at_least_one(
            "server",
            [("max_concurrent_requests", self.max_concurrent_requests), ("max_body_bytes", self.max_body_bytes)],
        )
    }
}

/// `Err` naming the first of `counts` (keys of `section`) that is 0.
fn at_least_one<const N: usize>(section: &str, counts: [(&str, usize); N]) -> Result<(), (String, String)> {
    match counts.into_iter().find(|&(_, value)| value == 0) {
        Some((name, _)) => Err((format!("{section}.{name}"), "must be at least 1".into())),
        None => Ok(()),
    }
}

/// Folder of the default model, shipped in the repository.
pub const DEFAULT_MODEL: &str = "models/huginn-addition";

/// The default model's folder: `models/huginn-addition` under the working directory, else under
/// the source tree the binary was built from; `None` when neither exists.
pub fn default_model_dir() -> Option<PathBuf> {
    let here = PathBuf::from(DEFAULT_MODEL);
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL);
    [here, built].into_iter().find(|dir| dir.join("config.json").is_file())
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
