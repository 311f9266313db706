//! Small endpoints: models, health, readiness, metrics, tokenize / detokenize, and the JSON 404/405.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::handler::{parse_body, tokenize_blocking};
use super::request::{DetokenizeRequest, TokenizeRequest, parse};
use super::state::AppState;
use super::validate::{PromptInput, messages as chat_messages};
use super::wire::{Detokenized, ModelCard, ModelList, Status, Tokenized};

pub async fn models(State(state): State<AppState>) -> Response {
    let card = ModelCard {
        id: &state.model_name,
        object: "model",
        created: state.created,
        owned_by: "huginn",
        max_model_len: state.config.block_size,
    };
    axum::Json(ModelList { object: "list", data: vec![card] }).into_response()
}

/// Liveness: the process answers.
pub async fn health() -> Response {
    axum::Json(Status { status: "ok" }).into_response()
}

/// Readiness: the model is loaded, every worker is running and the server is not shutting down.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        ApiError::shutting_down().into_response()
    } else if !state.engine.ready() {
        ApiError::Unavailable("not ready: a model worker is starting, restarting or not answering".into())
            .into_response()
    } else {
        axum::Json(Status { status: "ready" }).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// `{"prompt": "..."}` or `{"messages": [...]}` to token ids.
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _slot = state.lease()?;
    let request: TokenizeRequest = parse(&parse_body(&state, &body)?)?;
    let text = if request.messages.is_some() {
        let messages = chat_messages(request.messages)?;
        state.tokenizer.apply_chat_template(&messages, true).map_err(|e| ApiError::param("messages", e.to_string()))?
    } else {
        request.prompt.ok_or_else(|| ApiError::param("prompt", "give `prompt` or `messages`"))?
    };
    let ids = tokenize_blocking(&state, vec![PromptInput::Text(text)]).await?.remove(0);
    let max_model_len = state.config.block_size;
    Ok(axum::Json(Tokenized { count: ids.len(), tokens: ids, max_model_len }).into_response())
}

/// `{"tokens": [...]}` to text.
pub async fn detokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _slot = state.lease()?;
    let request: DetokenizeRequest = parse(&parse_body(&state, &body)?)?;
    let ids = request.tokens.ok_or_else(|| ApiError::param("tokens", "`tokens` is required"))?;
    let vocab = state.config.vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::param("tokens", format!("token id {bad} is outside the vocabulary (size {vocab})")));
    }
    let tokenizer = state.tokenizer.clone();
    let text = tokio::task::spawn_blocking(move || tokenizer.decode(&ids))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(axum::Json(Detokenized { prompt: text }).into_response())
}

pub async fn not_found() -> Response {
    ApiError::NotFound("no such route".into()).into_response()
}

pub async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_response()
}
