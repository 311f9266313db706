//! Turning the events of one or more jobs into a response: collected into one JSON body, or
//! streamed as server-sent events (one `data:` chunk per token, then `data: [DONE]`).

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use crate::engine::{Event, JobHandle, TokenLogprobs};
use crate::generate::FinishReason;

/// A choice as it accumulates.
#[derive(Debug, Default)]
pub struct Choice {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub steps: Vec<usize>,
    pub logprobs: Vec<TokenLogprobs>,
    /// Log-probabilities of the prompt tokens after the first (echo).
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    pub finish: Option<FinishReason>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub recurrence_steps: usize,
}

impl Usage {
    pub fn json(self) -> Value {
        let mean =
            if self.completion_tokens > 0 { self.recurrence_steps as f64 / self.completion_tokens as f64 } else { 0.0 };
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "recurrence_steps": self.recurrence_steps,
            "mean_steps_per_token": mean,
        })
    }
}

pub fn finish_name(reason: Option<FinishReason>) -> Value {
    match reason {
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        None => Value::Null,
    }
}

/// The jobs' events merged, each tagged with its global choice index (`base + choice`).
fn merged(jobs: Vec<(JobHandle, usize)>) -> impl Stream<Item = (usize, Event)> + Send {
    let streams = jobs.into_iter().map(|(mut handle, base)| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1);
        // Forward so that the handle (and with it cancellation on drop) lives in this task.
        tokio::spawn(async move {
            while let Some(event) = handle.events.recv().await {
                if tx.send(event).await.is_err() {
                    handle.cancel();
                    return;
                }
            }
        });
        ReceiverStream::new(rx).map(move |event| (base, event))
    });
    futures::stream::select_all(streams)
}

/// Waits for every choice to finish.
pub async fn collect(jobs: Vec<(JobHandle, usize)>, choices: usize) -> Result<Vec<Choice>, ApiError> {
    let mut out: Vec<Choice> = (0..choices).map(|_| Choice::default()).collect();
    let mut events = Box::pin(merged(jobs));
    while let Some((base, event)) = events.next().await {
        match event {
            Event::PromptLogprobs { choice, logprobs } => out[base + choice].prompt_logprobs = Some(logprobs),
            Event::Token { choice, id, text, steps, logprobs, .. } => {
                let c = &mut out[base + choice];
                c.text.push_str(&text);
                c.token_ids.push(id);
                c.steps.push(steps);
                c.logprobs.extend(logprobs);
            }
            Event::Finished { choice, reason, text } => {
                let c = &mut out[base + choice];
                c.text.push_str(&text);
                c.finish = Some(reason);
            }
            Event::Error { message } => return Err(ApiError::Internal(message)),
        }
    }
    if out.iter().any(|c| c.finish.is_none()) {
        return Err(ApiError::Internal("the engine stopped before the request finished".into()));
    }
    Ok(out)
}

/// What a streaming endpoint writes for each event.
pub trait ChunkWriter: Send + 'static {
    /// Chunks sent before any token (chat: the role delta of each choice).
    fn opening(&mut self, choices: usize) -> Vec<Value>;
    fn prompt_logprobs(&mut self, choice: usize, logprobs: &[TokenLogprobs]) -> Option<Value>;
    fn token(&mut self, choice: usize, text: &str, steps: usize, logprobs: Option<&TokenLogprobs>) -> Value;
    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason) -> Value;
    fn usage(&mut self, usage: &Usage) -> Value;
}

/// Streams the jobs as SSE: chunks flushed per token, an error event if the engine fails, a
/// usage-only chunk when asked for, then `[DONE]`.
pub fn stream(
    jobs: Vec<(JobHandle, usize)>,
    choices: usize,
    mut writer: impl ChunkWriter,
    mut usage: Usage,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(16);
    tokio::spawn(async move {
        let send = |value: Value| {
            let tx = tx.clone();
            async move { tx.send(SseEvent::default().data(value.to_string())).await.is_ok() }
        };
        for chunk in writer.opening(choices) {
            if !send(chunk).await {
                return;
            }
        }
        let mut events = Box::pin(merged(jobs));
        let mut failed = false;
        while let Some((base, event)) = events.next().await {
            let chunk = match event {
                Event::PromptLogprobs { choice, logprobs } => writer.prompt_logprobs(base + choice, &logprobs),
                Event::Token { choice, text, steps, logprobs, .. } => {
                    usage.completion_tokens += 1;
                    usage.recurrence_steps += steps;
                    Some(writer.token(base + choice, &text, steps, logprobs.as_ref()))
                }
                Event::Finished { choice, reason, text } => Some(writer.finish(base + choice, &text, reason)),
                Event::Error { message } => {
                    failed = true;
                    Some(ApiError::Internal(message).body())
                }
            };
            if let Some(chunk) = chunk
                && !send(chunk).await
            {
                return; // client gone: dropping the event stream cancels the jobs
            }
            if failed {
                break;
            }
        }
        if include_usage && !failed {
            let _ = send(writer.usage(&usage)).await;
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}
