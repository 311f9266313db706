//! Turning the events of one or more jobs into a response: collected into one JSON body, or
//! streamed as server-sent events (one `data:` chunk per token, then `data: [DONE]`).

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::state::Lease;
use super::wire::{PromptTokensDetails, UsageBody};
use crate::engine::{Event, JobHandle, StrategyCounts, TokenLogprobs};
use crate::generate::{FinishReason, GenerationParams};

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
    /// What its decoding strategy did.
    pub counts: StrategyCounts,
    /// Prompt tokens the prefix cache supplied.
    pub cached_tokens: usize,
    /// Steps its tokens did not spend under a lowered elastic cap.
    pub elastic_steps_shed: usize,
}

/// One token of a streamed chunk.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub text: String,
    pub steps: usize,
    pub logprobs: Option<TokenLogprobs>,
}

/// A request's usage as it accumulates.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens the prefix cache supplied (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub recurrence_steps: usize,
    /// The decoding strategy's figures, summed over the choices.
    pub strategy: StrategyCounts,
    /// Steps shed under elastic depth, when the request is elastic (`usage.elastic_steps_shed`).
    pub elastic_steps_shed: Option<usize>,
}

impl Usage {
    /// No completion yet: `prompt_tokens`, and zero figures of the strategy `params` use (a
    /// speculating request reports its drafts even when it made none; an elastic one its shed
    /// steps even when it shed none).
    pub fn new(prompt_tokens: usize, params: &GenerationParams) -> Self {
        Self {
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            recurrence_steps: 0,
            strategy: StrategyCounts::zero_for(&params.decoding),
            elastic_steps_shed: params.min_num_steps.map(|_| 0),
        }
    }

    /// Adds a finished choice's tokens, steps and strategy figures.
    pub fn add_choice(&mut self, choice: &Choice) {
        self.completion_tokens += choice.token_ids.len();
        self.cached_tokens += choice.cached_tokens;
        self.add_shed(choice.elastic_steps_shed);
        self.recurrence_steps += choice.steps.iter().sum::<usize>();
        self.strategy += choice.counts;
    }

    fn add_shed(&mut self, steps: usize) {
        if let Some(shed) = &mut self.elastic_steps_shed {
            *shed += steps;
        }
    }

    pub fn body(&self) -> UsageBody {
        let mean =
            if self.completion_tokens > 0 { self.recurrence_steps as f64 / self.completion_tokens as f64 } else { 0.0 };
        UsageBody {
            prompt_tokens: self.prompt_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: self.cached_tokens },
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
            recurrence_steps: self.recurrence_steps,
            mean_steps_per_token: mean,
            strategy: self.strategy.into(),
            elastic_steps_shed: self.elastic_steps_shed,
        }
    }
}

/// The jobs' events merged, each tagged with its global choice index (`base + choice`).
fn merged(jobs: Vec<(JobHandle, usize)>) -> impl Stream<Item = (usize, Event)> + Send {
    let streams = jobs.into_iter().map(|(mut handle, base)| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1);
        // Forward so that the handle (and with it cancellation on drop) lives in this task, which
        // ends as soon as the receiving side is gone, even while the job still waits in a queue.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    event = handle.events.recv() => {
                        let Some(event) = event else { break };
                        if tx.send(event).await.is_err() {
                            break;
                        }
                    }
                }
            }
            handle.cancel();
        });
        ReceiverStream::new(rx).map(move |event| (base, event))
    });
    futures::stream::select_all(streams)
}

/// Waits for every choice to finish, until the lease's deadline (then the jobs are cancelled).
pub async fn collect(jobs: Vec<(JobHandle, usize)>, choices: usize, lease: Lease) -> Result<Vec<Choice>, ApiError> {
    let work = collect_events(jobs, choices);
    match lease.deadline {
        Some(deadline) => {
            tokio::time::timeout_at(deadline, work).await.map_err(|_| ApiError::Timeout(lease.timeout_seconds))?
        }
        None => work.await,
    }
}

async fn collect_events(jobs: Vec<(JobHandle, usize)>, choices: usize) -> Result<Vec<Choice>, ApiError> {
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
            Event::Finished { choice, reason, text, counts, cached_tokens, elastic_steps_shed, .. } => {
                let c = &mut out[base + choice];
                c.cached_tokens = cached_tokens;
                c.elastic_steps_shed = elastic_steps_shed;
                c.text.push_str(&text);
                c.finish = Some(reason);
                c.counts = counts;
            }
            Event::Logits { .. } => {}
            Event::Error { failure } => return Err(failure.into()),
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
    /// One chunk of the tokens one step emitted (one, or several from a speculative round or a
    /// parallel freeze).
    fn token(&mut self, choice: usize, tokens: &[Streamed]) -> Value;
    /// The last chunk of a choice, with what its strategy did.
    fn finish(&mut self, choice: usize, text: &str, reason: FinishReason, counts: &StrategyCounts) -> Value;
    fn usage(&mut self, usage: &Usage) -> Value;
}

/// Streams the jobs as SSE: chunks flushed per token, an error event if the engine fails or the
/// deadline passes, a usage-only chunk when asked for, then `[DONE]`. A client that accepts no data
/// for the lease's idle time is dropped; dropping the stream cancels the jobs.
pub fn stream(
    jobs: Vec<(JobHandle, usize)>,
    choices: usize,
    mut writer: impl ChunkWriter,
    mut usage: Usage,
    include_usage: bool,
    lease: Lease,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(16);
    tokio::spawn(async move {
        let idle = lease.idle;
        let send = |data: String| {
            let tx = tx.clone();
            async move {
                let delivery = tx.send(SseEvent::default().data(data));
                match idle {
                    Some(idle) => matches!(tokio::time::timeout(idle, delivery).await, Ok(Ok(()))),
                    None => delivery.await.is_ok(),
                }
            }
        };
        for chunk in writer.opening(choices) {
            if !send(chunk.to_string()).await {
                return;
            }
        }
        let mut events = Box::pin(merged(jobs));
        let mut failed = false;
        let mut finished = 0;
        // Tokens of one step held until its last, per choice.
        let mut pending: Vec<Vec<Streamed>> = (0..choices).map(|_| Vec::new()).collect();
        loop {
            let next = match lease.deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, events.next()).await,
                None => Ok(events.next().await),
            };
            let (base, event) = match next {
                Ok(Some(item)) => item,
                Ok(None) if finished < choices => {
                    failed = true;
                    let stopped = ApiError::Internal("the engine stopped before the request finished".into());
                    let _ = send(stopped.body().to_string()).await;
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    if !send(ApiError::Timeout(lease.timeout_seconds).body().to_string()).await {
                        return;
                    }
                    break;
                }
            };
            let chunk = match event {
                Event::PromptLogprobs { choice, logprobs } => writer.prompt_logprobs(base + choice, &logprobs),
                Event::Token { choice, text, steps, logprobs, more, .. } => {
                    usage.completion_tokens += 1;
                    usage.recurrence_steps += steps;
                    let held = &mut pending[base + choice];
                    held.push(Streamed { text, steps, logprobs });
                    (!more).then(|| writer.token(base + choice, &std::mem::take(held)))
                }
                Event::Finished { choice, reason, text, counts, cached_tokens, elastic_steps_shed, .. } => {
                    finished += 1;
                    usage.strategy += counts;
                    usage.cached_tokens += cached_tokens;
                    usage.add_shed(elastic_steps_shed);
                    let held = std::mem::take(&mut pending[base + choice]);
                    if !held.is_empty() && !send(writer.token(base + choice, &held).to_string()).await {
                        return;
                    }
                    Some(writer.finish(base + choice, &text, reason, &counts))
                }
                Event::Logits { .. } => None,
                Event::Error { failure } => {
                    failed = true;
                    Some(ApiError::from(failure).body())
                }
            };
            if let Some(chunk) = chunk
                && !send(chunk.to_string()).await
            {
                return; // client gone: dropping the event stream cancels the jobs
            }
            if failed {
                break;
            }
        }
        drop(events); // cancels whatever is left after a failure
        if include_usage && !failed {
            let _ = send(writer.usage(&usage).to_string()).await;
        }
        let _ = send("[DONE]".into()).await;
        drop(lease);
    });
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::engine::ExitReason;

    struct Plain;

    impl ChunkWriter for Plain {
        fn opening(&mut self, _: usize) -> Vec<Value> {
            Vec::new()
        }
        fn prompt_logprobs(&mut self, _: usize, _: &[TokenLogprobs]) -> Option<Value> {
            None
        }
        fn token(&mut self, _: usize, tokens: &[Streamed]) -> Value {
            json!(tokens.iter().map(|t| t.text.as_str()).collect::<String>())
        }
        fn finish(&mut self, _: usize, _: &str, _: FinishReason, _: &StrategyCounts) -> Value {
            json!("end")
        }
        fn usage(&mut self, _: &Usage) -> Value {
            json!("usage")
        }
    }

    /// A client that stops reading: once the buffers are full and nothing is accepted for the idle
    /// time, the stream ends and its job is cancelled. Time is paused (it moves only when every
    /// task waits), so the check does not depend on the host's speed.
    #[tokio::test(start_paused = true)]
    async fn a_stream_nobody_reads_is_dropped_after_the_idle_time() {
        let slot = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        let (events, receiver) = tokio::sync::mpsc::channel(1024);
        let cancelled = Arc::new(AtomicBool::new(false));
        let handle = JobHandle::new(receiver, cancelled.clone());
        let lease = Lease::new(slot, 0, 1);
        let usage = Usage::new(0, &crate::generate::GenerationParams::new(1));
        let sse = stream(vec![(handle, 0)], 1, Plain, usage, false, lease);
        for i in 0..200 {
            let token = Event::Token {
                choice: 0,
                id: i,
                text: "x".into(),
                steps: 1,
                exit: ExitReason::Cap,
                logprobs: None,
                more: false,
            };
            if events.try_send(token).is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!cancelled.load(Ordering::Relaxed), "cancelled before the idle time");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(cancelled.load(Ordering::Relaxed), "a stream nobody reads must be cancelled");
        drop(sse);
    }
}
