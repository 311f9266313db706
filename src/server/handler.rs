//! The steps every generation endpoint takes, in this order: take a lease (a request slot and
//! its deadline), parse the JSON body into its types (`request.rs`) and check the model name
//! ([`begin`]), validate it into a typed valid request (`validate.rs`), tokenize off the runtime
//! ([`tokenize_blocking`]), make the engine's valid jobs (`validate.rs`), then submit them and
//! stream or collect the answer ([`deliver`]). `completions.rs` and `chat.rs` add only their OpenAI
//! shapes (`wire.rs`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::request::Request;
use super::respond::{self, Choice, ChunkWriter, Usage};
use super::state::{AppState, Lease};
use super::validate::{CommonParams, PromptInput};
use crate::engine::{JobHandle, ValidJob};

/// The lease and the typed body of a request (whose `model`, if given, must be the served one).
pub(crate) fn begin<E: DeserializeOwned>(
    state: &AppState,
    body: &Result<Bytes, BytesRejection>,
) -> Result<(Lease, Request<E>), ApiError> {
    let lease = state.lease()?;
    let request = Request::<E>::parse(&parse_body(state, body)?)?;
    match &request.common.model {
        Some(name) if name != &*state.model_name => Err(ApiError::ModelNotFound(name.clone())),
        _ => Ok((lease, request)),
    }
}

/// Submits `specs` (one job per prompt, `common.n` choices each) and answers: an SSE stream
/// through `writer`, or the JSON body `body` makes of the finished choices.
pub(crate) async fn deliver<W: ChunkWriter>(
    state: &AppState,
    lease: Lease,
    jobs: Vec<ValidJob>,
    common: &CommonParams,
    writer: W,
    usage: Usage,
    body: impl FnOnce(&W, &[Choice], Usage) -> Value,
) -> Result<Response, ApiError> {
    let jobs = submit_all(state, jobs)?;
    let choices = jobs.len() * common.n;
    if common.stream {
        return Ok(respond::stream(jobs, choices, writer, usage, common.include_usage, lease).into_response());
    }
    let done = respond::collect(jobs, choices, lease).await?;
    Ok(axum::Json(body(&writer, &done, usage)).into_response())
}

pub(crate) fn parse_body(state: &AppState, body: &Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::PayloadTooLarge(state.settings.server.max_body_bytes));
        }
        Err(rejection) => return Err(ApiError::invalid(rejection.body_text())),
    };
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))
}

/// A request of `prompts` prompts (one job each) must fit the workers' queues when the engine is
/// idle: one that never could is a 400 naming `prompt`, not a 429 to retry.
pub(crate) fn check_prompt_count(state: &AppState, prompts: usize) -> Result<(), ApiError> {
    let most = state.engine.max_jobs_per_request();
    if prompts > most {
        let message = format!(
            "`prompt` holds {prompts} prompts; a request may hold at most {most} (engine.queue_capacity per worker)"
        );
        return Err(ApiError::param("prompt", message));
    }
    Ok(())
}

/// Tokenizes text prompts off the async runtime; `Ok` entries are already token ids.
pub(crate) async fn tokenize_blocking(state: &AppState, prompts: Vec<PromptInput>) -> Result<Vec<Vec<u32>>, ApiError> {
    let tokenizer = state.tokenizer.clone();
    tokio::task::spawn_blocking(move || {
        prompts
            .into_iter()
            .map(|p| match p {
                PromptInput::Ids(ids) => Ok(ids),
                PromptInput::Text(text) => {
                    tokenizer.encode(&text).map_err(|e| ApiError::param("prompt", e.to_string()))
                }
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
}

/// Submits every job (one per prompt); the first refusal fails the request and cancels the rest.
fn submit_all(state: &AppState, valid: Vec<ValidJob>) -> Result<Vec<(JobHandle, usize)>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::shutting_down());
    }
    let mut jobs = Vec::with_capacity(valid.len());
    let mut base = 0;
    for job in valid {
        let n = job.spec().n;
        jobs.push((state.engine.submit(job)?, base));
        base += n;
    }
    Ok(jobs)
}
