//! How the scheduler starts prompt prefills with its prefix cache: the lookup that lets a prompt
//! skip its cached beginning, the room set aside for the blocks a prefill records, their
//! insertion when it ends, and the choices of one job sharing one prefill.

use std::sync::Arc;

use metrics::counter;

use super::Scheduler;
use crate::engine::job::JobSpec;
use crate::engine::prefix::{Digest32, PrefillKey, PromptChain, model_fingerprint};
use crate::engine::running::{PrefillStart, Running, Stage};
use crate::engine::shared::JobShared;
use crate::metrics as m;
use crate::model::{HuginnModel, PREFIX_BLOCK_TOKENS, PrefixCapture, PrefixLayout, Result, dtype_name};

/// What identifies `model` in the prefix cache's keys: its configuration, dtype and kernels.
pub(super) fn fingerprint(model: &HuginnModel) -> Digest32 {
    let config = serde_json::to_string(model.config()).unwrap_or_default();
    model_fingerprint(&config, dtype_name(model.dtype()), model.backend().name())
}

/// The steps a prompt's prefill runs: `num_steps`, or the step budget when smaller.
pub fn prefill_steps(spec: &JobSpec) -> usize {
    let steps = spec.params.num_steps;
    match spec.max_total_steps {
        Some(budget) if budget < steps => budget.max(1),
        _ => steps,
    }
}

/// What a prompt's K/V depends on besides its tokens, for `spec` prefilled over `steps` on the
/// model `fingerprint`.
pub fn prefill_key(fingerprint: &Digest32, spec: &JobSpec, steps: usize) -> PrefillKey {
    let exit = spec.params.exit;
    let gate = exit.criterion.needs_gate().then_some(exit.threshold);
    PrefillKey::new(fingerprint, steps, spec.params.init_scale, gate)
}

impl Scheduler {
    /// The prefix cache's bytes that cannot be given back now: blocks in use, and the room set
    /// aside for the blocks prefills are recording.
    pub(super) fn prefix_held(&self) -> usize {
        let pinned = self.prefix.as_ref().map_or(0, |cache| cache.pinned_bytes());
        pinned + self.capturing()
    }

    /// Room set aside for the blocks being recorded.
    fn capturing(&self) -> usize {
        self.running.iter().map(Running::capture_bytes).sum()
    }

    /// The most the prefix cache may hold now: its budget, and what the running sequences'
    /// reservations and the recordings leave of `engine.max_kv_bytes`.
    fn prefix_room(&self) -> usize {
        let reserved: usize = self.running.iter().map(Running::reserved_kv).sum();
        let budget = self.prefix.as_ref().map_or(0, |cache| cache.budget());
        budget.min(self.limits.max_kv_bytes.saturating_sub(reserved)).saturating_sub(self.capturing())
    }

    /// After an admission: unused blocks give way to the sequences' reservations.
    pub(super) fn fit_prefix_cache(&mut self) {
        let room = self.prefix_room();
        if let Some(cache) = &mut self.prefix {
            cache.shrink_to(room);
        }
    }

    /// The prompt's block keys (its prefill over `steps`), when the worker caches prefixes.
    pub(super) fn block_keys(&self, steps: usize) -> impl FnOnce(&JobSpec, &PromptChain) -> Vec<Digest32> + use<> {
        let (caching, fingerprint) = (self.prefix.is_some(), self.fingerprint);
        move |spec, chain| if caching { chain.block_keys(&prefill_key(&fingerprint, spec, steps)) } else { Vec::new() }
    }

    /// A new job's choices start their prefills: the first from the cache; the others too, or,
    /// when the first records blocks the others will find, they wait for its prefill.
    pub(super) fn start_prefills(&mut self, shared: &Arc<JobShared>, mut fresh: Vec<Running>) -> Result<Vec<Running>> {
        let mut share = false;
        for (c, r) in fresh.iter_mut().enumerate() {
            if share {
                r.wait();
                continue;
            }
            let start = self.prefill_start(shared, c == 0);
            share = c == 0 && start.capture.is_some() && shared.spec.n > 1;
            r.begin_prefill(start)?;
        }
        Ok(fresh)
    }

    /// Where a prefill of `shared`'s prompt starts: the cached blocks of its beginning (all but
    /// the last position at most: that one's logits are the first token's), and, if `record`,
    /// the complete blocks after them to record, as many as the cache has room for.
    fn prefill_start(&mut self, shared: &JobShared, record: bool) -> PrefillStart {
        let room = self.prefix_room();
        let Some(cache) = &mut self.prefix else {
            return PrefillStart::default();
        };
        let spec = &shared.spec;
        let prompt = spec.prompt.len();
        let keys = &shared.block_keys;
        let mut blocks = cache.lookup(keys);
        let len = (blocks.len() * PREFIX_BLOCK_TOKENS).min(prompt.saturating_sub(1));
        blocks.truncate(len.div_ceil(PREFIX_BLOCK_TOKENS));
        counter!(m::PREFIX_QUERIES, "worker" => self.worker.to_string()).increment(prompt as u64);
        counter!(m::PREFIX_HITS, "worker" => self.worker.to_string()).increment(len as u64);
        let cfg = self.model.config();
        let layout = PrefixLayout::new(cfg, shared.prefill_steps);
        let block_bytes = layout.block_bytes(cfg, self.model.kv_dtype(), self.model.activation_dtype());
        let first = blocks.len();
        let wanted = if record { keys.len().saturating_sub(first) } else { 0 };
        let count = wanted.min(room.saturating_sub(cache.pinned_bytes()) / block_bytes.max(1));
        if count > 0 {
            cache.shrink_to(room - count * block_bytes);
        }
        PrefillStart {
            blocks,
            len,
            layout: Some(layout),
            capture: (count > 0).then(|| PrefixCapture::new(layout, first, count)),
            capture_bytes: count * block_bytes,
        }
    }

    /// Sequence `i`'s prompt went through its coda: the blocks it recorded join the cache, and
    /// the choices of its job waiting for them start.
    pub(super) fn prefill_done(&mut self, i: usize) {
        if let Some(capture) = self.running[i].take_capture() {
            let room = self.prefix_room();
            let shared = self.running[i].shared().clone();
            match (capture.finish(), &mut self.prefix) {
                (Some(blocks), Some(cache)) => {
                    cache.insert(&shared.block_keys, blocks, room);
                }
                (None, _) => tracing::warn!(worker = %self.worker, "a prompt's recorded blocks were incomplete"),
                _ => {}
            }
        }
        let shared = self.running[i].shared().clone();
        for j in 0..self.running.len() {
            if self.running[j].stage() != Stage::Waiting || !self.running[j].same_job(&shared) {
                continue;
            }
            let start = self.prefill_start(&shared, false);
            if let Err(e) = self.running[j].begin_prefill(start) {
                self.fail_sequence(j, e.into());
            }
        }
    }
}
