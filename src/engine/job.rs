//! What the HTTP layer hands to the engine (a [`Job`]: one prompt, `n` choices) and what flows back
//! (a stream of [`Event`]s on the job's own bounded channel).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::generate::check::named;
use crate::generate::constraint::Constraint;
use crate::generate::{FieldError, FinishReason, GenerationParams, ranges};
use crate::model::exit::log_softmax;

/// Why a token stopped iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The exit criterion fired.
    Converged,
    /// `num_steps` was reached.
    Cap,
    /// The request's `max_total_steps` ran out.
    Budget,
    /// Parallel sampler: frozen with a later position that converged.
    Carried,
}

impl ExitReason {
    pub fn label(&self) -> &'static str {
        match self {
            ExitReason::Converged => "converged",
            ExitReason::Cap => "cap",
            ExitReason::Budget => "budget",
            ExitReason::Carried => "carried",
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
    /// into a stop string or an incomplete character). `more`: further tokens of this choice
    /// follow from the same step (a speculative round, a parallel freeze), to be sent as one chunk.
    Token {
        choice: usize,
        id: u32,
        text: String,
        steps: usize,
        exit: ExitReason,
        logprobs: Option<TokenLogprobs>,
        more: bool,
    },
    /// The choice ended; `text` is any text released at the end, `kv_bytes` what its K/V cache
    /// held (freed before this event is sent), `counts` what its decoding strategy did,
    /// `cached_tokens` the prompt positions the prefix cache supplied to its prefill,
    /// `elastic_steps_shed` the steps its tokens did not spend under a lowered elastic cap.
    Finished {
        choice: usize,
        reason: FinishReason,
        text: String,
        kv_bytes: usize,
        counts: StrategyCounts,
        cached_tokens: usize,
        elastic_steps_shed: usize,
    },
    /// Raw next-token logits (only for a job with `report_logits`): every prompt position after
    /// the prompt's pass, then, before each later token's `Token` event, the row that produced it.
    Logits { choice: usize, rows: Vec<Vec<f32>> },
    /// The job failed inside the engine.
    Error { failure: EngineFailure },
}

/// Why the engine could not finish a job (the details are for the server's log, not its client).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineFailure {
    /// The job's first pass (its prompt's prelude) failed.
    #[error("the job could not start: {0}")]
    Start(String),
    /// The worker running the job failed (a model error or a fault); its other jobs failed too.
    #[error("the model worker failed: {0}")]
    Worker(String),
    /// One of the job's sequences failed on its own (its state, its text, an engine invariant);
    /// the worker's other jobs went on.
    #[error("a sequence of the job failed: {0}")]
    Sequence(String),
}

/// Room of a job's event channel per choice. A tick sends a choice at most
/// [`EVENTS_PER_TICK`] events; a sequence whose job's channel has less room than that for every
/// open choice waits (holds its state, skips ticks) until its reader catches up, so the channel
/// never overflows and its size does not depend on the output's length.
pub const EVENTS_PER_CHOICE: usize = 16;

/// The most events one tick sends one choice (prompt log-probabilities, logits, token, end),
/// plus two per drafted token of a speculative round or window row of the parallel sampler
/// ([`JobSpec::events_per_tick`]).
pub const EVENTS_PER_TICK: usize = 4;

/// What a choice's decoding strategy did: the one type its figures reach responses through
/// (`usage.draft_tokens`, `usage.sampler_steps`, a choice's `parallel` object, `huginn generate`'s
/// report). Sums of choices of the same strategy add up; a sequential choice adds nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StrategyCounts {
    #[default]
    Sequential,
    Speculative(DraftCounts),
    Parallel(WaveCounts),
}

impl StrategyCounts {
    /// Zero figures of the strategy `decoding` uses (reported even when nothing was drafted).
    pub fn zero_for(decoding: &crate::generate::Decoding) -> Self {
        use crate::generate::Decoding;
        match decoding {
            Decoding::Sequential { .. } => Self::Sequential,
            Decoding::Speculative(_) => Self::Speculative(DraftCounts::default()),
            Decoding::Parallel(_) => Self::Parallel(WaveCounts::default()),
        }
    }

    /// The speculative figures (zero for another strategy).
    pub fn drafts(&self) -> DraftCounts {
        match self {
            Self::Speculative(drafts) => *drafts,
            _ => DraftCounts::default(),
        }
    }

    /// The parallel sampler's figures (zero for another strategy).
    pub fn waves(&self) -> WaveCounts {
        match self {
            Self::Parallel(waves) => *waves,
            _ => WaveCounts::default(),
        }
    }
}

impl std::ops::AddAssign for StrategyCounts {
    fn add_assign(&mut self, other: Self) {
        *self = match (*self, other) {
            (Self::Speculative(mut a), Self::Speculative(b)) => {
                a += b;
                Self::Speculative(a)
            }
            (Self::Parallel(mut a), Self::Parallel(b)) => {
                a += b;
                Self::Parallel(a)
            }
            (Self::Sequential, other) => other,
            (this, _) => this,
        };
    }
}

/// Drafted tokens a choice's verification weighed, and how many of them it kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftCounts {
    pub drafted: usize,
    pub accepted: usize,
}

impl std::ops::AddAssign for DraftCounts {
    fn add_assign(&mut self, other: Self) {
        self.drafted += other.drafted;
        self.accepted += other.accepted;
    }
}

/// What the parallel sampler did for one choice: sampler steps, the tokens they froze (and of
/// those, the guesses frozen as the window ran them, not drawn again), the window rows they
/// iterated and the core steps of those rows (each summed over the steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveCounts {
    pub steps: usize,
    pub frozen: usize,
    pub guesses_frozen: usize,
    pub rows: usize,
    pub row_steps: usize,
}

impl WaveCounts {
    /// Tokens frozen per sampler step (0 without any step).
    pub fn tokens_per_step(&self) -> f64 {
        self.frozen as f64 / self.steps.max(1) as f64
    }

    /// Mean window rows per sampler step (0 without any step).
    pub fn mean_wavefront(&self) -> f64 {
        self.rows as f64 / self.steps.max(1) as f64
    }
}

impl std::ops::AddAssign for WaveCounts {
    fn add_assign(&mut self, other: Self) {
        self.steps += other.steps;
        self.frozen += other.frozen;
        self.guesses_frozen += other.guesses_frozen;
        self.rows += other.rows;
        self.row_steps += other.row_steps;
    }
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
    /// Send raw logits ([`Event::Logits`]): for tests and tools, never set by the HTTP layer.
    pub report_logits: bool,
    /// What the output must match (structured outputs), compiled; each choice matches its own copy.
    pub constraint: Option<Constraint>,
}

impl JobSpec {
    /// A job of one choice for `prompt` with `params` and nothing else requested.
    pub fn new(prompt: Vec<u32>, params: GenerationParams) -> Self {
        Self {
            prompt,
            params,
            n: 1,
            max_total_steps: None,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            report_logits: false,
            constraint: None,
        }
    }

    /// The most events one tick sends one choice: a verification round emits up to
    /// `draft_tokens + 1` tokens, a parallel sampler step up to `max_wavefront`, each with its
    /// logits when reported.
    pub fn events_per_tick(&self) -> usize {
        EVENTS_PER_TICK + 2 * self.params.decoding.extra_tokens_per_settle()
    }

    /// What the engine requires of a job on a model with `cfg`: the one check of its parameters,
    /// a prompt inside the context and the vocabulary, at least one choice. The only way to a
    /// [`ValidJob`], which is all the engine takes, so a library caller cannot queue what the
    /// server would refuse.
    pub fn validate(self, cfg: &crate::model::HuginnConfig) -> Result<ValidJob, FieldError> {
        self.params.check()?;
        self.params.check_model(cfg)?;
        let (len, context, vocab) = (self.prompt.len(), cfg.block_size, cfg.vocab_size);
        if len == 0 {
            return Err(FieldError::new("prompt", "the prompt is empty"));
        }
        if len >= context {
            let message =
                format!("the prompt has {len} tokens; the context length {context} leaves no room for a token");
            return Err(FieldError::new("prompt", message));
        }
        let outside = |ids: &[u32]| ids.iter().copied().find(|&id| id as usize >= vocab);
        if let Some(id) = outside(&self.prompt) {
            return Err(FieldError::new("prompt", format!("token id {id} is outside the vocabulary (size {vocab})")));
        }
        if let Some(id) = outside(&self.params.stop_token_ids) {
            let message = format!("`stop_token_ids`: token id {id} is outside the vocabulary (size {vocab})");
            return Err(FieldError::new("stop_token_ids", message));
        }
        if self.n == 0 {
            return Err(FieldError::new("n", "`n` must be at least 1"));
        }
        if self.max_total_steps == Some(0) {
            return Err(FieldError::new("max_total_steps", "`max_total_steps` must be at least 1"));
        }
        if let Some(top) = self.logprobs {
            named("logprobs", ranges::top_logprobs(top as i64).map(|_| ()))?;
        }
        Ok(ValidJob(self))
    }
}

/// A job that passed [`JobSpec::validate`]; nothing else makes one:
///
/// ```compile_fail
/// fn forge(spec: huginn::engine::JobSpec) -> huginn::engine::ValidJob {
///     huginn::engine::ValidJob(spec)
/// }
/// ```
#[derive(Debug, Clone)]
pub struct ValidJob(JobSpec);

impl ValidJob {
    pub fn spec(&self) -> &JobSpec {
        &self.0
    }
}

/// A job on its way to a worker.
pub struct Job {
    pub(crate) spec: JobSpec,
    /// Worst-case K/V bytes of all its choices on its worker (computed once, when submitted): its
    /// worker's load while queued, its admission check, then its sequences' reservation.
    pub(crate) kv_reservation: usize,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) submitted: Instant,
}

impl Job {
    /// A job for `valid` reserving `kv_reservation` bytes, and its caller's handle (events on a
    /// channel of [`EVENTS_PER_CHOICE`] per choice).
    pub fn new(valid: ValidJob, kv_reservation: usize) -> (Self, JobHandle) {
        let spec = valid.0;
        let per_choice = EVENTS_PER_CHOICE + spec.events_per_tick() - EVENTS_PER_TICK;
        let (events, receiver) = mpsc::channel(per_choice * spec.n.max(1));
        let cancelled = Arc::new(AtomicBool::new(false));
        let job = Self { spec, kv_reservation, events, cancelled: cancelled.clone(), submitted: Instant::now() };
        (job, JobHandle::new(receiver, cancelled))
    }

    /// Whether the channel has room for every open choice's events of one tick.
    pub fn can_take_a_tick(&self) -> bool {
        self.events.capacity() >= self.spec.events_per_tick() * self.spec.n.max(1)
    }

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

/// The chosen token's log-probability and the `top` most likely tokens, from raw logits.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let log_probs = log_softmax(logits);
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    let top = top.min(order.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |a, b| log_probs[*b].total_cmp(&log_probs[*a]));
        order.truncate(top);
        order.sort_by(|a, b| log_probs[*b].total_cmp(&log_probs[*a]));
    } else {
        order.clear();
    }
    TokenLogprobs {
        token,
        logprob: log_probs.get(token as usize).copied().unwrap_or(f64::NEG_INFINITY) as f32,
        top: order.into_iter().map(|i| (i as u32, log_probs[i] as f32)).collect(),
    }
}
