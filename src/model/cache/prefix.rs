//! A prompt's K/V kept for reuse: blocks of [`PREFIX_BLOCK_TOKENS`] positions holding the entries
//! of *every* layer-slot of the prefill (the prelude's, each (step, core layer)'s, the coda's) and
//! the positions' final latent states, whatever layout the sequence that computed them keeps.
//!
//! In a prefill at step t every position attends to the others' K/V of step t, so a suffix that
//! reuses a prefix is exact only if it reads the prefix's entries of the very step it runs. A
//! cache given a prefix ([`KvCache::attach_prefix`]) therefore loads them lazily: the first write
//! of a layer-slot at a step copies the prefix's entries of that step into the slot's buffer (for a
//! `shared:K` cache, slot `t mod K` is reloaded at each of its steps), so the suffix's attention
//! reads exactly what a one-piece prefill's would. A prefill records its blocks the other way
//! ([`KvCache::record_step`] after each step, [`KvCache::record_ends`] after the coda).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{KvCache, LayerSlot, ensure_capacity};
use crate::model::config::HuginnConfig;
use crate::model::error::{ModelError, Result};

/// Positions per cached block.
pub const PREFIX_BLOCK_TOKENS: usize = 16;

/// Which entries a prefill of `steps` steps has, and where each layer-slot's sit in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLayout {
    prelude: usize,
    core: usize,
    coda: usize,
    steps: usize,
}

impl PrefixLayout {
    pub fn new(cfg: &HuginnConfig, steps: usize) -> Self {
        Self {
            prelude: cfg.n_layers_in_prelude,
            core: cfg.n_layers_in_recurrent_block,
            coda: cfg.n_layers_in_coda,
            steps,
        }
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Layer-slots per position: the `full` layout's at `steps`.
    pub fn entries(&self) -> usize {
        self.prelude + self.steps * self.core + self.coda
    }

    fn index(&self, slot: LayerSlot) -> Option<usize> {
        match slot {
            LayerSlot::Prelude(i) => (i < self.prelude).then_some(i),
            LayerSlot::Core { layer, step } => {
                (layer < self.core && step < self.steps).then_some(self.prelude + step * self.core + layer)
            }
            LayerSlot::Coda(j) => (j < self.coda).then_some(self.prelude + self.steps * self.core + j),
        }
    }

    /// Bytes of one block: its K/V entries in `kv_dtype` and its states in `state_dtype`.
    pub fn block_bytes(&self, cfg: &HuginnConfig, kv_dtype: DType, state_dtype: DType) -> usize {
        let kv = self.entries() * 2 * cfg.kv_heads() * cfg.head_dim() * kv_dtype.size_in_bytes();
        PREFIX_BLOCK_TOKENS * (kv + cfg.n_embd * state_dtype.size_in_bytes())
    }
}

/// One block of a prompt's prefill: every layer-slot's K and V of its positions (in the backend's
/// buffer layout) and their final latent states (`[16, n_embd]`, the coda's input).
pub struct PrefixBlock {
    entries: Vec<(Tensor, Tensor)>,
    states: Tensor,
    bytes: usize,
}

impl PrefixBlock {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn states(&self) -> &Tensor {
        &self.states
    }

    /// A block that only has a size, for tests of the cache's bookkeeping.
    #[cfg(test)]
    pub(crate) fn sized(bytes: usize) -> Self {
        let states =
            Tensor::zeros((0, 1), candle_core::DType::F32, &candle_core::Device::Cpu).expect("an empty tensor");
        Self { entries: Vec::new(), states, bytes }
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The blocks `first..first + count` of a prompt, being recorded while it is prefilled.
pub struct PrefixCapture {
    layout: PrefixLayout,
    first: usize,
    /// `[block][entry]`.
    entries: Vec<Vec<Option<(Tensor, Tensor)>>>,
    states: Vec<Option<Tensor>>,
}

impl PrefixCapture {
    pub fn new(layout: PrefixLayout, first: usize, count: usize) -> Self {
        Self {
            layout,
            first,
            entries: (0..count).map(|_| vec![None; layout.entries()]).collect(),
            states: vec![None; count],
        }
    }

    fn block_positions(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let first = self.first;
        (0..self.states.len()).map(move |b| (b, (first + b) * PREFIX_BLOCK_TOKENS))
    }

    /// The final states of the chunk starting at position `start` (`[rows, n_embd]`): the rows of
    /// the recorded blocks are kept.
    pub fn record_states(&mut self, start: usize, states: &Tensor) -> Result<()> {
        let rows = states.dim(0)?;
        for (b, at) in self.block_positions() {
            if at >= start && at + PREFIX_BLOCK_TOKENS <= start + rows {
                self.states[b] = Some(states.narrow(0, at - start, PREFIX_BLOCK_TOKENS)?.force_contiguous()?);
            }
        }
        Ok(())
    }

    /// The recorded blocks, by index; `None` when an entry was never recorded (an engine bug).
    pub fn finish(self) -> Option<Vec<(usize, PrefixBlock)>> {
        let first = self.first;
        self.entries
            .into_iter()
            .zip(self.states)
            .enumerate()
            .map(|(b, (entries, states))| {
                let entries: Vec<(Tensor, Tensor)> = entries.into_iter().collect::<Option<_>>()?;
                let states = states?;
                let bytes = entries.iter().map(|(k, v)| tensor_bytes(k) + tensor_bytes(v)).sum::<usize>()
                    + tensor_bytes(&states);
                Some((first + b, PrefixBlock { entries, states, bytes }))
            })
            .collect()
    }
}

/// The prefix a cache was given: its blocks and which step's entries each buffer holds.
pub(super) struct AttachedPrefix {
    blocks: Vec<Arc<PrefixBlock>>,
    len: usize,
    layout: PrefixLayout,
    /// Per layer-slot (a core slot by its recurrence slot): the step whose entries it holds.
    loaded: HashMap<(u8, usize, usize), usize>,
}

impl KvCache {
    /// Starts an empty cache with the first `len` positions of `blocks` (a prefill of `layout`):
    /// the positions count as stored, and each layer-slot's entries are loaded when it is first
    /// written at a step (see the module's notes).
    pub fn attach_prefix(&mut self, blocks: Vec<Arc<PrefixBlock>>, len: usize, layout: PrefixLayout) -> Result<()> {
        if !self.is_empty() || len == 0 || len > blocks.len() * PREFIX_BLOCK_TOKENS || layout.steps == 0 {
            return Err(ModelError::InvalidArgument(format!(
                "a prefix of {len} positions from {} blocks on a cache of {}",
                blocks.len(),
                self.len()
            )));
        }
        self.begin_tokens(0, len)?;
        let deepest = self.strategy.slot_of_step(layout.steps - 1) as u32;
        self.deepest_slot.iter_mut().for_each(|slot| *slot = deepest);
        self.prefix = Some(AttachedPrefix { blocks, len, layout, loaded: HashMap::new() });
        Ok(())
    }

    /// Lets go of the prefix's blocks (the prefill is over: every slot it needs was loaded).
    pub fn detach_prefix(&mut self) {
        self.prefix = None;
    }

    /// Before a write of `slot` up to `end`: the prefix's entries of that slot's step, unless the
    /// buffer holds them already.
    pub(super) fn load_prefix(&mut self, slot: LayerSlot, end: usize) -> Result<()> {
        let Some(prefix) = &self.prefix else {
            return Ok(());
        };
        let (key, step) = match slot {
            LayerSlot::Prelude(i) => ((0, i, 0), 0),
            LayerSlot::Core { layer, step } => ((1, self.strategy.slot_of_step(step), layer), step),
            LayerSlot::Coda(j) => ((2, j, 0), 0),
        };
        if prefix.loaded.get(&key) == Some(&step) {
            return Ok(());
        }
        let index = prefix.layout.index(slot).ok_or_else(|| {
            ModelError::InvalidArgument(format!("{slot:?} is beyond the prefix's {} steps", prefix.layout.steps))
        })?;
        let (blocks, len) = (prefix.blocks.clone(), prefix.len);
        let shape = self.shape();
        let buf = ensure_capacity(self.buffer_mut(slot), end.max(len), &shape)?;
        for (b, block) in blocks.iter().enumerate() {
            let at = b * PREFIX_BLOCK_TOKENS;
            if at >= len {
                break;
            }
            let rows = PREFIX_BLOCK_TOKENS.min(len - at);
            let (k, v) = &block.entries[index];
            for (dst, src) in [(&buf.k, k), (&buf.v, v)] {
                let src = if rows < PREFIX_BLOCK_TOKENS {
                    src.narrow(shape.positions, 0, rows)?.force_contiguous()?
                } else {
                    src.clone()
                };
                dst.slice_set(&src, shape.positions, at)?;
            }
        }
        buf.len = buf.len.max(len);
        if let Some(prefix) = &mut self.prefix {
            prefix.loaded.insert(key, step);
        }
        Ok(())
    }

    /// A copy of positions `at..at + 16` of `slot`'s buffer.
    fn block_entry(&self, slot: LayerSlot, at: usize) -> Result<(Tensor, Tensor)> {
        let buffer = match slot {
            LayerSlot::Prelude(i) => self.prelude.get(i),
            LayerSlot::Core { layer, step } => {
                self.core.get(self.strategy.slot_of_step(step)).and_then(|row| row.get(layer))
            }
            LayerSlot::Coda(j) => self.coda.get(j),
        };
        match buffer.and_then(|b| b.as_ref()) {
            Some(buf) if buf.len >= at + PREFIX_BLOCK_TOKENS => Ok((
                buf.k.narrow(buf.positions, at, PREFIX_BLOCK_TOKENS)?.force_contiguous()?,
                buf.v.narrow(buf.positions, at, PREFIX_BLOCK_TOKENS)?.force_contiguous()?,
            )),
            _ => Err(ModelError::InvalidArgument(format!("{slot:?} holds no entries at {at}"))),
        }
    }

    fn record(&self, capture: &mut PrefixCapture, slots: impl Iterator<Item = LayerSlot>) -> Result<()> {
        for slot in slots {
            let index = capture.layout.index(slot).ok_or_else(|| {
                ModelError::InvalidArgument(format!("{slot:?} is beyond the capture's {} steps", capture.layout.steps))
            })?;
            for (b, at) in capture.block_positions() {
                capture.entries[b][index] = Some(self.block_entry(slot, at)?);
            }
        }
        Ok(())
    }

    /// Step `step` of a prefill covered its chunk: its entries of the captured blocks are copied
    /// (a `shared:K` slot is overwritten K steps later).
    pub fn record_step(&self, capture: &mut PrefixCapture, step: usize) -> Result<()> {
        self.record(capture, (0..self.core_layers).map(|layer| LayerSlot::Core { layer, step }))
    }

    /// The prefill's coda is done: the prelude's and the coda's entries of the captured blocks.
    pub fn record_ends(&self, capture: &mut PrefixCapture) -> Result<()> {
        let prelude = (0..self.prelude.len()).map(LayerSlot::Prelude);
        let coda = (0..self.coda.len()).map(LayerSlot::Coda);
        self.record(capture, prelude.chain(coda))
    }
}
