//! What the choices of one running job share, and the K/V memory a job reserves.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::job::{Job, JobSpec};
use super::prefix::{Digest32, PromptChain};
use crate::model::{CacheStrategy, HuginnConfig};

/// State shared by the choices of one job; counted in its worker's running-requests gauge while
/// it lives.
pub struct JobShared {
    pub job: Job,
    pub spec: Arc<JobSpec>,
    /// The worker's metric label.
    worker: Arc<str>,
    /// Choices that have not sent their last event.
    open_choices: AtomicUsize,
    /// The prompt's hash chain (its initial states' noise seeds).
    pub chain: PromptChain,
    /// The keys of the prompt's complete blocks in the worker's prefix cache (none without one).
    pub block_keys: Vec<Digest32>,
    /// The steps its prompt's prefill runs (set at admission: `num_steps`, or less under a step
    /// budget or elastic depth).
    pub prefill_steps: usize,
}

impl JobShared {
    /// `keys` gives the prompt's block keys from its hash chain (when the worker caches prefixes);
    /// the prompt's prefill runs `prefill_steps`.
    pub fn new(
        job: Job,
        worker: Arc<str>,
        prefill_steps: usize,
        keys: impl FnOnce(&JobSpec, &PromptChain) -> Vec<Digest32>,
    ) -> Self {
        metrics::gauge!(crate::metrics::REQUESTS_RUNNING, "worker" => worker.to_string()).increment(1.0);
        let spec = Arc::new(job.spec.clone());
        let open_choices = AtomicUsize::new(spec.n.max(1));
        let chain = PromptChain::new(&spec.prompt);
        let block_keys = keys(&spec, &chain);
        Self { job, spec, worker, open_choices, chain, block_keys, prefill_steps }
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
    spec.n * tokens * entries * 2 * cfg.kv_heads() * cfg.head_dim() * dtype_bytes
}
