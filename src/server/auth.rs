//! Optional API keys: when any are configured, every request outside the open paths must carry
//! `Authorization: Bearer KEY` with one of them. Keys come from a file (one per line, `#` comments:
//! a mounted Kubernetes Secret) and from the `HUGINN_API_KEYS` variable (comma-separated); they
//! are never logged and are compared in constant time.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::error::StartError;
use super::state::AppState;

/// Environment variable with comma-separated API keys.
pub const API_KEYS_ENV: &str = "HUGINN_API_KEYS";

pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys from `file` (if given) and from `env` (the variable's value, if set).
    pub fn load(file: Option<&Path>, env: Option<&str>) -> Result<Self, StartError> {
        let mut keys = Vec::new();
        if let Some(path) = file {
            let bad = |message: String| StartError::ApiKeys { path: path.display().to_string(), message };
            let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
            if keys.is_empty() {
                return Err(bad("holds no key".into()));
            }
        }
        if let Some(value) = env {
            keys.extend(value.split(',').map(str::trim).filter(|k| !k.is_empty()).map(String::from));
        }
        Ok(Self(keys.into_iter().map(String::into_bytes).collect()))
    }

    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is one of the keys; every key is compared, each in constant time.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(subtle::Choice::from(0), |found, key| found | key.as_slice().ct_eq(presented)).into()
    }
}

/// Rejects requests without a valid key (401, OpenAI error body) when keys are configured.
pub async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = &state.api_keys;
    if !keys.is_enabled() || state.settings.server.auth_open_paths.iter().any(|p| p == request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match presented {
        Some(key) if keys.accepts(key.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::Unauthorized("Incorrect API key provided.".into()).into_response(),
        None => ApiError::Unauthorized("Missing API key: send it in the Authorization header as `Bearer KEY`.".into())
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_file_and_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team keys\nsk-one\n\n  sk-two  \n").unwrap();
        let keys = ApiKeys::load(Some(&file), Some("sk-three, sk-four,")).unwrap();
        assert_eq!(keys.len(), 4);
        for good in ["sk-one", "sk-two", "sk-three", "sk-four"] {
            assert!(keys.accepts(good.as_bytes()), "{good}");
        }
        for bad in ["", "sk-on", "sk-one ", "sk-five", "# team keys"] {
            assert!(!keys.accepts(bad.as_bytes()), "{bad:?}");
        }
        assert!(!ApiKeys::load(None, None).unwrap().is_enabled());
        assert!(!ApiKeys::load(None, Some(" , ")).unwrap().is_enabled());
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(ApiKeys::load(Some(&file), None).is_err());
        assert!(format!("{keys:?}").contains("4 keys") && !format!("{keys:?}").contains("sk-"));
    }
}
