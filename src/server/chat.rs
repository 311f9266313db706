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
use super::tools::ToolCalls;
use super::validate::{self, PromptInput};
use super::wire::{
    ChatChoice, ChatLogprobs, ChatText, ChatTokenLogprob, Envelope, FunctionCall, ParallelFigures, ToolCall, UsageBody,
    finish_name, to_value,
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
    let usage = Usage::new(prompt.len() * common.n, &common.params);
    let job = valid.job(&state, prompt)?;
    let writer = ChatWriter {
        id: format!("chatcmpl-{}", unique_id()),
        created: unix_time(),
        model: state.model_name.to_string(),
        tokenizer: state.tokenizer.clone(),
        calls: valid.tool_calls.take().map(|calls| ToolCallWriter::new(calls, common.n)),
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
    /// Present when the output is a tool call.
    calls: Option<ToolCallWriter>,
}

/// A tool-call choice as it streams: its text so far, its call's id once the name is out, and
/// how much of the arguments has been sent.
#[derive(Default)]
struct CallStream {
    text: String,
    id: Option<String>,
    sent: usize,
}

/// Turns the constrained output of each choice into OpenAI `tool_calls`.
struct ToolCallWriter {
    calls: ToolCalls,
    streams: Vec<CallStream>,
}

fn call_id() -> String {
    format!("call_{}", unique_id())
}

impl ToolCallWriter {
    fn new(calls: ToolCalls, choices: usize) -> Self {
        Self { calls, streams: (0..choices).map(|_| CallStream::default()).collect() }
    }

    /// A finished choice's message and finish reason: a complete call is `tool_calls` (finish
    /// `tool_calls`); one cut by `max_tokens` after its name is the call so far (finish `length`);
    /// anything else is text.
    fn message(&self, text: &str, finish: Option<FinishReason>) -> (ChatText, Option<&'static str>) {
        let call = |name: &str, arguments: &str| ChatText {
            role: Some("assistant"),
            content: None,
            tool_calls: Some(vec![ToolCall {
                index: None,
                id: Some(call_id()),
                kind: Some("function"),
                function: FunctionCall { name: Some(name.to_string()), arguments: arguments.to_string() },
            }]),
        };
        match (finish, self.calls.complete(text), self.calls.split(text)) {
            (Some(FinishReason::Stop), Some((name, arguments)), _) => (call(name, arguments), Some("tool_calls")),
            (Some(FinishReason::Length), _, Some((name, arguments))) => (call(name, arguments), Some("length")),
            _ => (assistant_text(text), finish_name(finish)),
        }
    }

    /// The delta of a choice's new text: the call's first part once its name is out, then the
    /// arguments as they come (none before the name).
    fn delta(&mut self, choice: usize, text: &str) -> ChatText {
        let Some(stream) = self.streams.get_mut(choice) else { return ChatText::default() };
        stream.text.push_str(text);
        let Some((name, arguments)) = self.calls.split(&stream.text) else { return ChatText::default() };
        let upto = self.calls.streamable(arguments);
        let fragment = arguments.get(stream.sent..upto).unwrap_or_default().to_string();
        stream.sent = stream.sent.max(upto);
        let name = name.to_string();
        Self::call_delta(stream, name, fragment)
    }

    /// The last delta of a choice (`text`: what the choice released at its end): the rest of a
    /// complete call (finish `tool_calls`), the rest of one cut short, or, when no call began,
    /// the whole text.
    fn last(&mut self, choice: usize, text: &str, reason: FinishReason) -> (ChatText, Option<&'static str>) {
        let Some(stream) = self.streams.get_mut(choice) else { return (ChatText::default(), None) };
        stream.text.push_str(text);
        let (rest, finish) = match (reason, self.calls.complete(&stream.text), self.calls.split(&stream.text)) {
            (FinishReason::Stop, Some(call), _) => (Some(call), Some("tool_calls")),
            (_, _, Some(call)) if stream.id.is_some() => (Some(call), finish_name(Some(reason))),
            _ => (None, finish_name(Some(reason))),
        };
        let delta = match rest {
            Some((name, arguments)) => {
                let fragment = arguments.get(stream.sent..).unwrap_or_default().to_string();
                let name = name.to_string();
                Self::call_delta(stream, name, fragment)
            }
            None => ChatText { content: (!stream.text.is_empty()).then(|| stream.text.clone()), ..ChatText::default() },
        };
        (delta, finish)
    }

    fn call_delta(stream: &mut CallStream, name: String, arguments: String) -> ChatText {
        let first = stream.id.is_none();
        if first {
            stream.id = Some(call_id());
        } else if arguments.is_empty() {
            return ChatText::default();
        }
        let call = ToolCall {
            index: Some(0),
            id: first.then(|| stream.id.clone()).flatten(),
            kind: first.then_some("function"),
            function: FunctionCall { name: first.then_some(name), arguments },
        };
        ChatText { tool_calls: Some(vec![call]), ..ChatText::default() }
    }
}

fn assistant_text(text: &str) -> ChatText {
    ChatText { role: Some("assistant"), content: Some(text.to_string()), tool_calls: None }
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
                let (message, finish_reason) = match &self.calls {
                    Some(calls) => calls.message(&c.text, c.finish),
                    None => (assistant_text(&c.text), finish_name(c.finish)),
                };
                ChatChoice {
                    message: Some(message),
                    logprobs: with_logprobs.then(|| self.logprobs(&c.logprobs)),
                    finish_reason,
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
        let calls = self.calls.is_some();
        let role = || ChatText { role: Some("assistant"), content: (!calls).then(String::new), tool_calls: None };
        (0..choices).map(|i| self.chunk(delta_choice(i, Some(role())))).collect()
    }

    fn prompt_logprobs(&mut self, _choice: usize, _logprobs: &[TokenLogprobs]) -> Option<Value> {
        None
    }

    fn token(&mut self, choice: usize, tokens: &[Streamed]) -> Value {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let steps: Vec<usize> = tokens.iter().map(|t| t.steps).collect();
        let listed: Vec<TokenLogprobs> = tokens.iter().filter_map(|t| t.logprobs.clone()).collect();
        let delta = match &mut self.calls {
            Some(calls) => calls.delta(choice, &text),
            None => ChatText { content: Some(text), ..ChatText::default() },
        };
        self.chunk(ChatChoice {
            logprobs: (!listed.is_empty()).then(|| self.logprobs(&listed)),
            steps_per_token: Some(steps),
            ..delta_choice(choice, Some(delta))
        })
    }

    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason, counts: &StrategyCounts) -> Value {
        let (delta, finish_reason) = match &mut self.calls {
            Some(calls) => calls.last(choice, text, reason),
            None => (
                ChatText { content: (!text.is_empty()).then(|| text.to_string()), ..ChatText::default() },
                finish_name(Some(reason)),
            ),
        };
        self.chunk(ChatChoice {
            finish_reason,
            steps_per_token: Some(Vec::new()),
            parallel: ParallelFigures::of(counts),
            ..delta_choice(choice, Some(delta))
        })
    }

    fn usage(&mut self, usage: &Usage) -> Value {
        self.envelope("chat.completion.chunk", Vec::new(), Some(usage.body()))
    }
}
