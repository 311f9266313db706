//! One running choice inside a worker: its cache, latent state, exit tracking, sampler and text.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::job::{Event, ExitReason, Job, JobSpec, TokenLogprobs};
use crate::generate::sampling::sampler_seed;
use crate::generate::{FinishReason, Sampler};
use crate::model::exit::log_softmax;
use crate::model::{CacheStrategy, ExitTracker, HuginnConfig, HuginnModel, KvCache};
use crate::text::TextStream;

/// State shared by the choices of one job; counted in its worker's running-requests gauge while
/// it lives.
pub struct JobShared {
    pub job: Job,
    pub spec: Arc<JobSpec>,
    /// The worker's metric label.
    worker: Arc<str>,
    /// Choices that have not sent their last event.
    open_choices: AtomicUsize,
}

impl JobShared {
    pub fn new(job: Job, worker: Arc<str>) -> Self {
        metrics::gauge!(crate::metrics::REQUESTS_RUNNING, "worker" => worker.to_string()).increment(1.0);
        let spec = Arc::new(job.spec.clone());
        let open_choices = AtomicUsize::new(spec.n.max(1));
        Self { job, spec, worker, open_choices }
    }

    /// A choice is about to send its last event: the job leaves the running gauge with its last
    /// choice, before the client can hear of it.
    pub fn choice_done(&self) {
        if self.open_choices.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.leave_gauge();
        }
    }

    fn leave_gauge(&self) {
        metrics::gauge!(crate::metrics::REQUESTS_RUNNING, "worker" => self.worker.to_string()).decrement(1.0);
    }
}

impl Drop for JobShared {
    /// A job dropped with choices still open (cancelled, failed) leaves the gauge now.
    fn drop(&mut self) {
        if self.open_choices.load(Ordering::SeqCst) > 0 {
            self.leave_gauge();
        }
    }
}

/// Worst-case K/V bytes of one choice of `spec` (prompt plus every generated token).
pub fn kv_reservation(cfg: &HuginnConfig, dtype_bytes: usize, spec: &JobSpec) -> usize {
    let entries = match spec.params.cache {
        CacheStrategy::Full => {
            cfg.n_layers_in_prelude + spec.params.num_steps * cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda
        }
        CacheStrategy::Shared(k) => {
            cfg.n_layers_in_prelude
                + k.min(spec.params.num_steps) * cfg.n_layers_in_recurrent_block
                + cfg.n_layers_in_coda
        }
    };
    let tokens = (spec.prompt.len() + spec.params.max_tokens).min(cfg.block_size);
    spec.n * tokens * entries * 2 * cfg.n_embd * dtype_bytes
}

pub struct Running {
    pub shared: Arc<JobShared>,
    pub choice: usize,
    /// This choice's share of the job's K/V reservation.
    pub reserved_kv: usize,
    /// The last event was sent; the sequence leaves at the end of the tick.
    pub finished: bool,
    pub cache: KvCache,
    rng: StdRng,
    pub sampler: Sampler,
    pub text: TextStream,
    /// Prompt and generated ids.
    pub context: Vec<u32>,
    pub generated: usize,
    /// Positions of the chunk being iterated (the prompt, then one token at a time).
    pub start: usize,
    pub len: usize,
    /// Steps done on the current chunk and the cap for it.
    pub step: usize,
    pub cap: usize,
    /// The cap is the remaining step budget rather than `num_steps`.
    pub cap_is_budget: bool,
    pub prefill: bool,
    pub state: Tensor,
    pub injection: Tensor,
    pub tracker: ExitTracker,
    /// Logits of the current state, when already computed this tick.
    pub logits: Option<Vec<f32>>,
    /// Core steps spent so far (prompt prefill included).
    pub steps_spent: usize,
    pub last_token_at: Option<Instant>,
}

impl Running {
    pub fn new(shared: Arc<JobShared>, choice: usize, model: &HuginnModel) -> crate::model::Result<Self> {
        let spec = shared.spec.clone();
        let seed = spec.params.seed.wrapping_add(choice as u64);
        // Replaced by the first chunk's prelude before any step reads them.
        let placeholder = Tensor::zeros((1, 1), model.activation_dtype(), model.device())?;
        // This choice's share of the reservation computed when the job was submitted.
        let reserved_kv = shared.job.kv_reservation / spec.n.max(1);
        Ok(Self {
            choice,
            reserved_kv,
            finished: false,
            cache: model.new_cache(spec.params.cache),
            rng: StdRng::seed_from_u64(seed),
            sampler: Sampler::new(spec.params.sampling.clone(), sampler_seed(seed)),
            text: TextStream::new(spec.stop.clone()),
            context: spec.prompt.clone(),
            generated: 0,
            start: 0,
            len: spec.prompt.len(),
            step: 0,
            cap: 0,
            cap_is_budget: false,
            prefill: true,
            state: placeholder.clone(),
            injection: placeholder,
            tracker: ExitTracker::new(spec.params.exit, Vec::new()),
            logits: None,
            steps_spent: 0,
            last_token_at: None,
            shared,
        })
    }

    pub fn spec(&self) -> &JobSpec {
        &self.shared.spec
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Sets the cap of the chunk about to iterate from `num_steps` and the remaining budget.
    pub fn set_cap(&mut self) {
        let num_steps = self.spec().params.num_steps;
        match self.spec().max_total_steps {
            Some(budget) if budget.saturating_sub(self.steps_spent) < num_steps => {
                self.cap = budget.saturating_sub(self.steps_spent).max(1);
                self.cap_is_budget = true;
            }
            _ => {
                self.cap = num_steps;
                self.cap_is_budget = false;
            }
        }
    }

    pub fn budget_exhausted(&self) -> bool {
        self.spec().max_total_steps.is_some_and(|budget| self.steps_spent >= budget)
    }

    /// Sends an event; false when the receiver is gone or too far behind (the job is then cancelled).
    pub fn send(&self, event: Event) -> bool {
        if self.shared.job.events.try_send(event).is_err() {
            self.shared.job.cancelled.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn exit_reason(&self, converged: bool) -> ExitReason {
        if converged {
            ExitReason::Converged
        } else if self.cap_is_budget {
            ExitReason::Budget
        } else {
            ExitReason::Cap
        }
    }

    pub fn finish_reason_after(&self, token: u32, stopped_by_text: bool, limit: usize) -> Option<FinishReason> {
        let spec = self.spec();
        if stopped_by_text || spec.params.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= spec.params.max_tokens || self.context.len() >= limit || self.budget_exhausted() {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

/// A one-row latent state as float32 values (what the exit criteria compare).
pub(crate) fn latent_vec(state: &Tensor) -> crate::model::Result<Vec<f32>> {
    Ok(state.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
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
