//! The scheduler driven on the calling thread: no worker thread, no async runtime. `huginn
//! generate`, `huginn eval`, the batch-1 benchmark and the model tests run their jobs through
//! it, so every token anywhere is produced by the one token loop the server runs
//! ([`Scheduler::tick`]).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::error::TryRecvError;

use super::elastic::ElasticTargets;
use super::job::EngineFailure;
use super::job::{DraftCounts, Event, ExitReason, Job, JobHandle, JobSpec, StrategyCounts, TokenLogprobs, WaveCounts};
use super::scheduler::{Scheduler, SchedulerLimits};
use super::shared::kv_reservation;
use crate::generate::FieldError;
use crate::generate::FinishReason;
use crate::model::{HuginnModel, ModelError};
use crate::text::TextTokenizer;

/// What one choice of a job produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub token_ids: Vec<u32>,
    /// `steps_per_token[i]`: core steps spent on the logits that produced `token_ids[i]` (the
    /// prompt's depth for the first).
    pub steps_per_token: Vec<usize>,
    pub exits: Vec<ExitReason>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// K/V bytes the sequence held when it ended.
    pub kv_bytes: usize,
    /// Prompt positions the prefix cache supplied.
    pub cached_tokens: usize,
    /// Steps its tokens did not spend under a lowered elastic cap.
    pub elastic_steps_shed: usize,
    /// What its decoding strategy did.
    pub counts: StrategyCounts,
    /// With `report_logits`: the logits of every prompt position.
    pub prompt_logits: Vec<Vec<f32>>,
    /// With `report_logits`: the logits that produced each token (the first is the prompt's last).
    pub token_logits: Vec<Vec<f32>>,
    /// With `logprobs`: each token's log-probability and top alternatives.
    pub logprobs: Vec<TokenLogprobs>,
    /// With `prompt_logprobs`.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    /// Seconds from the start of the run to this choice's first token and to its end.
    pub first_token_seconds: f64,
    pub seconds: f64,
}

impl Completion {
    fn new() -> Self {
        Self {
            token_ids: Vec::new(),
            steps_per_token: Vec::new(),
            exits: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            kv_bytes: 0,
            cached_tokens: 0,
            elastic_steps_shed: 0,
            counts: StrategyCounts::default(),
            prompt_logits: Vec::new(),
            token_logits: Vec::new(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            first_token_seconds: 0.0,
            seconds: 0.0,
        }
    }

    /// Tokens speculation drafted and kept.
    pub fn drafts(&self) -> DraftCounts {
        self.counts.drafts()
    }

    /// What the parallel sampler did.
    pub fn waves(&self) -> WaveCounts {
        self.counts.waves()
    }

    /// Core steps spent after the prompt's pass (the decoded tokens').
    pub fn decode_steps(&self) -> usize {
        self.steps_per_token.iter().skip(1).sum()
    }
}

/// Why a run through the [`Driver`] did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A job's parameters or prompt (the field named).
    #[error("`{}`: {}", .0.field, .0.message)]
    Invalid(#[from] FieldError),
    /// A pass of the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A job failed inside the engine.
    #[error("job {job} failed: {failure}")]
    Failed { job: usize, failure: EngineFailure },
    /// A job's choices did not all finish (an engine bug).
    #[error("job {0} ended with choices still open")]
    Unfinished(usize),
}

/// Runs jobs to completion through a [`Scheduler`], driven from this thread. Each tick runs on
/// the driver's compute threads, as a server worker's does, so that the serial parts of a tick
/// and the parallel kernels share threads instead of this one handing every kernel call over.
pub struct Driver {
    model: Arc<HuginnModel>,
    scheduler: Scheduler,
    pool: Option<rayon::ThreadPool>,
}

/// A job in a run: its handle and what its choices produced so far.
struct Tracked {
    handle: JobHandle,
    choices: Vec<Completion>,
    open: usize,
}

impl Driver {
    /// A driver for `model`; `max_active_sequences` bounds how many sequences share a tick (jobs
    /// beyond it wait their turn, in order).
    pub fn new(model: Arc<HuginnModel>, tokenizer: Arc<TextTokenizer>, max_active_sequences: usize) -> Self {
        Self::with_tick_rows(model, tokenizer, max_active_sequences, 0)
    }

    /// Like [`Self::new`], each pass of a tick holding at most `max_tick_rows` rows (0: unlimited).
    pub fn with_tick_rows(
        model: Arc<HuginnModel>,
        tokenizer: Arc<TextTokenizer>,
        max_active_sequences: usize,
        max_tick_rows: usize,
    ) -> Self {
        let limits = SchedulerLimits {
            max_active_sequences: max_active_sequences.max(1),
            max_kv_bytes: usize::MAX,
            max_tick_rows,
            prefix_cache_bytes: 0,
            elastic: ElasticTargets::default(),
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(crate::cpu_threads::configured()).build().ok();
        Self { scheduler: Scheduler::new(model.clone(), tokenizer, limits, "driver"), model, pool }
    }

    /// Keeps up to `bytes` of prompt K/V in a prefix cache across the runs of this driver (0:
    /// none, the default).
    pub fn with_prefix_cache(mut self, bytes: usize) -> Self {
        self.scheduler.set_prefix_cache(bytes);
        self
    }

    /// Bytes the prefix cache holds.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.scheduler.prefix_cache_bytes()
    }

    /// Runs one job of one choice.
    pub fn run_one(&mut self, spec: JobSpec) -> Result<Completion, RunError> {
        let mut outcomes = self.run(vec![spec], |_, _| {})?;
        outcomes.pop().and_then(|mut choices| choices.drain(..).next()).ok_or(RunError::Unfinished(0))
    }

    /// Runs `specs` together (batched as the server batches them), calling `on_event(job, event)`
    /// for every event as it happens; returns each job's choices. The first invalid spec or
    /// engine failure ends the run with its error.
    pub fn run(
        &mut self,
        specs: Vec<JobSpec>,
        mut on_event: impl FnMut(usize, &Event),
    ) -> Result<Vec<Vec<Completion>>, RunError> {
        let cfg = self.model.config().clone();
        let specs = specs.into_iter().map(|spec| spec.validate(&cfg)).collect::<Result<Vec<_>, _>>()?;
        let started = Instant::now();
        let mut waiting = std::collections::VecDeque::new();
        let mut tracked = Vec::with_capacity(specs.len());
        for spec in specs {
            let n = spec.spec().n;
            let reservation = kv_reservation(&cfg, self.model.kv_dtype().size_in_bytes(), spec.spec());
            let (job, handle) = Job::new(spec, reservation);
            waiting.push_back(job);
            tracked.push(Tracked { handle, choices: (0..n).map(|_| Completion::new()).collect(), open: n });
        }
        loop {
            while waiting.front().is_some_and(|job| self.scheduler.has_room_for(job)) {
                if let Some(job) = waiting.pop_front() {
                    self.scheduler.admit(job)?;
                }
            }
            let scheduler = &mut self.scheduler;
            match &self.pool {
                Some(pool) => pool.install(|| scheduler.tick())?,
                None => scheduler.tick()?,
            };
            for (index, job) in tracked.iter_mut().enumerate() {
                drain(index, job, started, &mut on_event)?;
            }
            if waiting.is_empty() && self.scheduler.is_idle() {
                break;
            }
        }
        // Every event was sent before its sequence left the scheduler.
        for (index, job) in tracked.iter_mut().enumerate() {
            drain(index, job, started, &mut on_event)?;
            if job.open > 0 {
                return Err(RunError::Unfinished(index));
            }
        }
        Ok(tracked.into_iter().map(|job| job.choices).collect())
    }
}

/// Takes every event of `job` that has arrived.
fn drain(
    index: usize,
    job: &mut Tracked,
    started: Instant,
    on_event: &mut impl FnMut(usize, &Event),
) -> Result<(), RunError> {
    loop {
        let event = match job.handle.events.try_recv() {
            Ok(event) => event,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return Ok(()),
        };
        on_event(index, &event);
        let seconds = started.elapsed().as_secs_f64();
        match event {
            Event::PromptLogprobs { choice, logprobs } => job.choices[choice].prompt_logprobs = logprobs,
            Event::Logits { choice, rows } => {
                let c = &mut job.choices[choice];
                if c.prompt_logits.is_empty() && c.token_ids.is_empty() {
                    c.token_logits.extend(rows.last().cloned());
                    c.prompt_logits = rows;
                } else {
                    c.token_logits.extend(rows);
                }
            }
            Event::Token { choice, id, text, steps, exit, logprobs, .. } => {
                let c = &mut job.choices[choice];
                if c.token_ids.is_empty() {
                    c.first_token_seconds = seconds;
                }
                c.token_ids.push(id);
                c.steps_per_token.push(steps);
                c.exits.push(exit);
                c.text.push_str(&text);
                c.logprobs.extend(logprobs);
            }
            Event::Finished { choice, reason, text, kv_bytes, counts, cached_tokens, elastic_steps_shed } => {
                let c = &mut job.choices[choice];
                c.cached_tokens = cached_tokens;
                c.elastic_steps_shed = elastic_steps_shed;
                c.counts = counts;
                c.text.push_str(&text);
                c.finish_reason = reason;
                c.kv_bytes = kv_bytes;
                c.seconds = seconds;
                job.open -= 1;
            }
            Event::Error { failure } => return Err(RunError::Failed { job: index, failure }),
        }
    }
}
