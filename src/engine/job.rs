//! What the HTTP layer hands to the engine (a [`Job`]: one prompt, `n` choices) and what flows back
//! (a stream of [`Event`]s on the job's own bounded channel).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::generate::{FinishReason, GenerationParams};

/// Why a token stopped iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The exit criterion fired.
    Converged,
    /// `num_steps` was reached.
    Cap,
    /// The request's `max_total_steps` ran out.
    Budget,
}

impl ExitReason {
    pub fn label(&self) -> &'static str {
        match self {
            ExitReason::Converged => "converged",
            ExitReason::Cap => "cap",
            ExitReason::Budget => "budget",
        }
    }
}

/// Log-probabilities of one position: the chosen token's and the top alternatives'.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Log-probabilities of the prompt tokens after the first (for `echo` with `logprobs`).
    PromptLogprobs { choice: usize, logprobs: Vec<TokenLogprobs> },
    /// One generated token; `text` is the new text it completes (held back while it may still turn
    /// into a stop string or an incomplete character).
    Token { choice: usize, id: u32, text: String, steps: usize, exit: ExitReason, logprobs: Option<TokenLogprobs> },
    /// The choice ended; `text` is any text released at the end.
    Finished { choice: usize, reason: FinishReason, text: String },
    /// The job failed inside the engine.
    Error { message: String },
}

/// Everything the engine needs to run one prompt.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// Number of independent choices (each its own sequence, seeded `seed + i`).
    pub n: usize,
    /// Cap on all core steps spent on this job's completion tokens, per choice.
    pub max_total_steps: Option<usize>,
    /// Stop strings: generation ends before any of them; they are not returned.
    pub stop: Vec<String>,
    /// Top alternatives to report per token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Report prompt log-probabilities (echo with logprobs).
    pub prompt_logprobs: bool,
}

/// A job on its way to a worker.
pub struct Job {
    pub spec: JobSpec,
    /// Worst-case K/V bytes of all its choices on its worker (computed once, when submitted): its
    /// worker's load while queued, its admission check, then its sequences' reservation.
    pub kv_reservation: usize,
    pub events: mpsc::Sender<Event>,
    pub cancelled: Arc<AtomicBool>,
    pub submitted: Instant,
}

impl Job {
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

/// The caller's end of a job: events, and cancellation when dropped.
pub struct JobHandle {
    pub events: mpsc::Receiver<Event>,
    cancelled: Arc<AtomicBool>,
}

impl JobHandle {
    pub fn new(events: mpsc::Receiver<Event>, cancelled: Arc<AtomicBool>) -> Self {
        Self { events, cancelled }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}
