//! `POST /v1/chat/completions`: messages through the model's chat template.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use serde_json::{Value, json};

use super::error::ApiError;
use super::handler;
use super::request::{self, ChatRequest, Content, Message, Request};
use super::respond::{Choice, ChunkWriter, Streamed, Usage, finish_name, waves_json};
use super::state::{AppState, unique_id, unix_time};
use crate::engine::{TokenLogprobs, WaveCounts};
use crate::generate::{FinishReason, ranges};
use crate::text::{ChatMessage, TextTokenizer};

const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// The messages as the chat template takes them: known roles (`developer` is `system`), text
/// content only.
pub(crate) fn messages(items: Option<Vec<Message>>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = items.ok_or_else(|| ApiError::param("messages", "`messages` is required"))?;
    if items.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let param = format!("messages[{i}]");
            let role = message
                .role
                .ok_or_else(|| ApiError::param(&format!("{param}.role"), "each message needs a string `role`"))?;
            if !ROLES.contains(&role.as_str()) {
                return Err(ApiError::param(
                    &format!("{param}.role"),
                    format!("role `{role}` is not supported (use system, user or assistant)"),
                ));
            }
            let content = match message.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|part| match (part.kind.as_deref(), part.text) {
                        (Some("text"), Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::Unsupported {
                            param: format!("{param}.content"),
                            message: format!(
                                "content part of type `{}` is not supported: only text",
                                kind.unwrap_or("?")
                            ),
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            let role = if role == "developer" { "system" } else { role.as_str() };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

pub async fn create(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (lease, parsed) = handler::begin::<ChatRequest>(&state, &body)?;
    let Request { common, mut generation, tools, endpoint: chat } = parsed;
    let refused = [("audio", chat.audio.is_some()), ("prediction", chat.prediction.is_some())];
    if let Some(name) = tools.given().or(refused.into_iter().find_map(|(name, given)| given.then_some(name))) {
        let message = format!("`{name}` is not supported by this server");
        return Err(ApiError::Unsupported { param: name.into(), message });
    }
    if let Some(format) = &chat.response_format
        && format.kind.as_deref() != Some("text")
    {
        let message = "only `response_format` of type `text` is supported".into();
        return Err(ApiError::Unsupported { param: "response_format".into(), message });
    }
    let with_logprobs = chat.logprobs.unwrap_or(false);
    let top = chat
        .top_logprobs
        .map(|k| ranges::top_logprobs(k).map_err(|e| ApiError::param("top_logprobs", format!("`top_logprobs` {e}"))))
        .transpose()?;
    if top.is_some() && !with_logprobs {
        return Err(ApiError::param("top_logprobs", "`top_logprobs` requires `logprobs` to be true"));
    }
    let logprobs = with_logprobs.then(|| top.unwrap_or(0));
    let max_tokens_field = if chat.max_completion_tokens.is_some() {
        generation.max_tokens = chat.max_completion_tokens;
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let common = request::common(&common, &generation, &state, max_tokens_field)?;
    let messages = messages(chat.messages)?;
    let text =
        state.tokenizer.apply_chat_template(&messages, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
    let ids = handler::tokenize_blocking(&state, vec![Err(text)]).await?;
    let spec = request::job_spec(&state, ids[0].clone(), &common, logprobs, false)?;
    let usage = Usage {
        prompt_tokens: ids[0].len() * common.n,
        speculative: spec.params.speculation().is_some(),
        parallel: spec.params.parallel().is_some(),
        ..Default::default()
    };
    let writer = ChatWriter {
        id: format!("chatcmpl-{}", unique_id()),
        created: unix_time(),
        model: state.model_name.to_string(),
        tokenizer: state.tokenizer.clone(),
    };
    handler::deliver(&state, lease, vec![spec], &common, writer, usage, |writer, done, usage| {
        writer.body(done, with_logprobs, usage)
    })
    .await
}

pub struct ChatWriter {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<TextTokenizer>,
}

impl ChatWriter {
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices})
    }

    fn entry(&self, id: u32, logprob: f32) -> Value {
        let token = self.tokenizer.token_text(id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    }

    fn logprobs_json(&self, lps: &[TokenLogprobs]) -> Value {
        let content: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let mut entry = self.entry(lp.token, lp.logprob);
                entry["top_logprobs"] = lp.top.iter().map(|(id, p)| self.entry(*id, *p)).collect();
                entry
            })
            .collect();
        json!({"content": content})
    }

    fn body(&self, done: &[Choice], with_logprobs: bool, mut usage: Usage) -> Value {
        let choices: Vec<Value> = done
            .iter()
            .enumerate()
            .map(|(index, c)| {
                usage.add_choice(c);
                let mut choice = json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": with_logprobs.then(|| self.logprobs_json(&c.logprobs)),
                    "finish_reason": finish_name(c.finish),
                    "steps_per_token": c.steps,
                });
                if usage.parallel {
                    choice["parallel"] = waves_json(&c.waves);
                }
                choice
            })
            .collect();
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": choices, "usage": usage.json(),
        })
    }
}

impl ChunkWriter for ChatWriter {
    fn opening(&mut self, choices: usize) -> Vec<Value> {
        (0..choices)
            .map(|i| self.chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])))
            .collect()
    }

    fn prompt_logprobs(&mut self, _choice: usize, _logprobs: &[TokenLogprobs]) -> Option<Value> {
        None
    }

    fn token(&mut self, choice: usize, tokens: &[Streamed]) -> Value {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let steps: Vec<usize> = tokens.iter().map(|t| t.steps).collect();
        let listed: Vec<TokenLogprobs> = tokens.iter().filter_map(|t| t.logprobs.clone()).collect();
        let logprobs = (!listed.is_empty()).then(|| self.logprobs_json(&listed));
        self.chunk(json!([{"index": choice, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null, "steps_per_token": steps}]))
    }

    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason, waves: Option<&WaveCounts>) -> Value {
        let delta = if text.is_empty() { json!({}) } else { json!({"content": text}) };
        let mut entry = json!({"index": choice, "delta": delta, "logprobs": null, "finish_reason": finish_name(Some(reason)), "steps_per_token": []});
        if let Some(waves) = waves {
            entry["parallel"] = waves_json(waves);
        }
        self.chunk(json!([entry]))
    }

    fn usage(&mut self, usage: &Usage) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = usage.json();
        chunk
    }
}
