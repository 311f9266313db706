//! `POST /v1/chat/completions`: messages through the model's chat template.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::handler;
use super::request::ChatRequest;
use super::respond::{Choice, ChunkWriter, Streamed, Usage};
use super::state::{AppState, unique_id, unix_time};
use super::structured;
use super::validate::{self, PromptInput};
use super::wire::{
    ChatChoice, ChatLogprobs, ChatText, ChatTokenLogprob, Envelope, ParallelFigures, UsageBody, finish_name, to_value,
};
use crate::engine::{StrategyCounts, TokenLogprobs};
use crate::generate::FinishReason;
use crate::text::TextTokenizer;

pub async fn create(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (lease, parsed) = handler::begin::<ChatRequest>(&state, &body)?;
    let mut valid = validate::chat(&state, parsed)?;
    let prompt = std::mem::take(&mut valid.prompt);
    let mut ids = handler::tokenize_blocking(&state, vec![PromptInput::Text(prompt)]).await?;
    let prompt = ids.pop().unwrap_or_default();
    valid.common.compiled = structured::compile(&state, valid.common.constraint.take()).await?;
    let common = &valid.common;
    let usage = Usage::new(prompt.len() * common.n, &common.params.decoding);
    let job = valid.job(&state, prompt)?;
    let writer = ChatWriter {
        id: format!("chatcmpl-{}", unique_id()),
        created: unix_time(),
        model: state.model_name.to_string(),
        tokenizer: state.tokenizer.clone(),
    };
    let with_logprobs = valid.logprobs.is_some();
    handler::deliver(&state, lease, vec![job], common, writer, usage, |writer, done, usage| {
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
    fn envelope(&self, object: &'static str, choices: Vec<ChatChoice>, usage: Option<UsageBody>) -> Value {
        let (id, model) = (&self.id, &self.model);
        to_value(Envelope { id, object, created: self.created, model, choices, usage })
    }

    fn chunk(&self, choice: ChatChoice) -> Value {
        self.envelope("chat.completion.chunk", vec![choice], None)
    }

    fn entry(&self, id: u32, logprob: f32) -> ChatTokenLogprob {
        let token = self.tokenizer.token_text(id);
        let bytes = token.as_bytes().to_vec();
        ChatTokenLogprob { token, logprob: f64::from(logprob), bytes, top_logprobs: None }
    }

    fn logprobs(&self, lps: &[TokenLogprobs]) -> ChatLogprobs {
        let content = lps
            .iter()
            .map(|lp| ChatTokenLogprob {
                top_logprobs: Some(lp.top.iter().map(|(id, p)| self.entry(*id, *p)).collect()),
                ..self.entry(lp.token, lp.logprob)
            })
            .collect();
        ChatLogprobs { content }
    }

    fn body(&self, done: &[Choice], with_logprobs: bool, mut usage: Usage) -> Value {
        let choices: Vec<ChatChoice> = done
            .iter()
            .enumerate()
            .map(|(index, c)| {
                usage.add_choice(c);
                ChatChoice {
                    message: Some(ChatText { role: Some("assistant"), content: Some(c.text.clone()) }),
                    logprobs: with_logprobs.then(|| self.logprobs(&c.logprobs)),
                    finish_reason: finish_name(c.finish),
                    steps_per_token: Some(c.steps.clone()),
                    parallel: ParallelFigures::of(&c.counts),
                    ..delta_choice(index, None)
                }
            })
            .collect();
        self.envelope("chat.completion", choices, Some(usage.body()))
    }
}

/// A choice of a chunk carrying `delta` (none in a body's choice).
fn delta_choice(index: usize, delta: Option<ChatText>) -> ChatChoice {
    ChatChoice {
        index,
        message: None,
        delta,
        logprobs: None,
        finish_reason: None,
        steps_per_token: None,
        parallel: None,
    }
}

impl ChunkWriter for ChatWriter {
    fn opening(&mut self, choices: usize) -> Vec<Value> {
        let role = || ChatText { role: Some("assistant"), content: Some(String::new()) };
        (0..choices).map(|i| self.chunk(delta_choice(i, Some(role())))).collect()
    }

    fn prompt_logprobs(&mut self, _choice: usize, _logprobs: &[TokenLogprobs]) -> Option<Value> {
        None
    }

    fn token(&mut self, choice: usize, tokens: &[Streamed]) -> Value {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let steps: Vec<usize> = tokens.iter().map(|t| t.steps).collect();
        let listed: Vec<TokenLogprobs> = tokens.iter().filter_map(|t| t.logprobs.clone()).collect();
        let delta = ChatText { role: None, content: Some(text) };
        self.chunk(ChatChoice {
            logprobs: (!listed.is_empty()).then(|| self.logprobs(&listed)),
            steps_per_token: Some(steps),
            ..delta_choice(choice, Some(delta))
        })
    }

    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason, counts: &StrategyCounts) -> Value {
        let delta = ChatText { role: None, content: (!text.is_empty()).then(|| text.to_string()) };
        self.chunk(ChatChoice {
            finish_reason: finish_name(Some(reason)),
            steps_per_token: Some(Vec::new()),
            parallel: ParallelFigures::of(counts),
            ..delta_choice(choice, Some(delta))
        })
    }

    fn usage(&mut self, usage: &Usage) -> Value {
        self.envelope("chat.completion.chunk", Vec::new(), Some(usage.body()))
    }
}
