//! Per-sequence key/value cache of a recurrent-depth model.
//!
//! Every attention call stores this token's K/V under a layer-slot: one slot per prelude layer, one
//! per coda layer, and for the core block one slot per (recurrence slot, core layer). The strategy
//! decides how many recurrence slots a token keeps:
//! - [`CacheStrategy::Full`]: one per recurrence step (memory grows with `num_steps`);
//! - [`CacheStrategy::Shared`]`(k)`: step t uses slot `t mod k`, so a token costs
//!   `prelude + k·core + coda` entries whatever `num_steps` is (k = 1 is the default).
//!
//! When a token stopped iterating before reaching a slot (adaptive exit), later tokens that read
//! that slot see the token's deepest available entry of the same core layer instead.
//! Buffers live outside the model weights, so one model serves many sequences.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use super::backend::Backend;
use super::config::HuginnConfig;
use super::error::{ModelError, Result};

mod prefix;
pub use prefix::{PREFIX_BLOCK_TOKENS, PrefixBlock, PrefixCapture, PrefixLayout};

/// How many recurrence slots of K/V a token keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CacheStrategy {
    /// One slot per recurrence step.
    Full,
    /// `k` slots shared round-robin by the steps (`k >= 1`).
    Shared(usize),
}

impl Default for CacheStrategy {
    fn default() -> Self {
        CacheStrategy::Shared(1)
    }
}

impl CacheStrategy {
    /// Recurrence slot used by core step `step`.
    pub fn slot_of_step(&self, step: usize) -> usize {
        match self {
            CacheStrategy::Full => step,
            CacheStrategy::Shared(k) => step % k,
        }
    }
}

string_setting!(CacheStrategy);

impl fmt::Display for CacheStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheStrategy::Full => write!(f, "full"),
            CacheStrategy::Shared(k) => write!(f, "shared:{k}"),
        }
    }
}

impl FromStr for CacheStrategy {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || ModelError::InvalidArgument(format!("kv cache strategy `{s}`: use `full` or `shared:K` with K >= 1"));
        match s {
            "full" => Ok(CacheStrategy::Full),
            "shared" => Ok(CacheStrategy::Shared(1)),
            _ => {
                let k: usize = s.strip_prefix("shared:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
                if k == 0 {
                    return Err(bad());
                }
                Ok(CacheStrategy::Shared(k))
            }
        }
    }
}

/// The attention layer-slot a call reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSlot {
    Prelude(usize),
    Core { layer: usize, step: usize },
    Coda(usize),
}

/// Position has no core entry yet (the token has not iterated).
const NO_SLOT: u32 = u32::MAX;

/// K and V of one layer-slot, positions `0..len` valid: `[heads, capacity, head_dim]` for the CPU
/// kernels, `[capacity, heads, head_dim]` for tensor ops ([`Backend::kv_positions_dim`]).
struct KvBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
    /// The dimension of positions.
    positions: usize,
}

impl KvBuffer {
    fn capacity(&self) -> usize {
        self.k.dim(self.positions).unwrap_or(0)
    }
}

pub struct KvCache {
    strategy: CacheStrategy,
    heads: usize,
    head_dim: usize,
    max_len: usize,
    core_layers: usize,
    backend: Backend,
    dtype: DType,
    device: Device,
    prelude: Vec<Option<KvBuffer>>,
    /// `[recurrence slot][core layer]`.
    core: Vec<Vec<Option<KvBuffer>>>,
    coda: Vec<Option<KvBuffer>>,
    /// Per position: the recurrence slot written by the token's latest core step.
    deepest_slot: Vec<u32>,
    /// A cached prompt prefix this cache started from, while its prefill runs.
    prefix: Option<prefix::AttachedPrefix>,
}

impl KvCache {
    /// An empty cache, in the K/V dtype and layout of `backend`.
    pub fn new(cfg: &HuginnConfig, strategy: CacheStrategy, backend: Backend, device: &Device) -> Self {
        Self {
            strategy,
            heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
            max_len: cfg.block_size,
            core_layers: cfg.n_layers_in_recurrent_block,
            backend,
            dtype: backend.kv_dtype(),
            device: device.clone(),
            prelude: (0..cfg.n_layers_in_prelude).map(|_| None).collect(),
            core: Vec::new(),
            coda: (0..cfg.n_layers_in_coda).map(|_| None).collect(),
            deepest_slot: Vec::new(),
            prefix: None,
        }
    }

    pub fn strategy(&self) -> CacheStrategy {
        self.strategy
    }

    /// Tokens stored (positions with prelude entries).
    pub fn len(&self) -> usize {
        self.deepest_slot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn buffers(&self) -> impl Iterator<Item = &KvBuffer> {
        self.prelude.iter().chain(self.core.iter().flatten()).chain(self.coda.iter()).flatten()
    }

    /// Bytes of the K/V entries held (valid rows of every layer-slot).
    pub fn bytes(&self) -> usize {
        let entry = 2 * self.heads * self.head_dim * self.dtype.size_in_bytes();
        self.buffers().map(|b| b.len * entry).sum()
    }

    /// Bytes allocated, including the unused tail of each buffer.
    pub fn allocated_bytes(&self) -> usize {
        let entry = 2 * self.heads * self.head_dim * self.dtype.size_in_bytes();
        self.buffers().map(|b| b.capacity() * entry).sum()
    }

    /// Registers `n` new tokens at positions `start..start + n`; `start` must be the current length.
    /// Called once per chunk before its prelude runs.
    pub fn begin_tokens(&mut self, start: usize, n: usize) -> Result<()> {
        if start != self.len() {
            return Err(ModelError::InvalidArgument(format!(
                "new tokens must start at position {}, got {start}",
                self.len()
            )));
        }
        if start + n > self.max_len {
            return Err(ModelError::ContextOverflow { needed: start + n, limit: self.max_len });
        }
        self.deepest_slot.resize(start + n, NO_SLOT);
        Ok(())
    }

    /// Forgets every position from `len` on (a speculative round's rejected drafts): the entries of
    /// positions `0..len` stay as they are, the buffers keep their capacity, and the next chunk
    /// starts at `len`.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        self.deepest_slot.truncate(len);
        let buffers = self.prelude.iter_mut().chain(self.core.iter_mut().flatten()).chain(self.coda.iter_mut());
        for buffer in buffers.flatten() {
            buffer.len = buffer.len.min(len);
        }
    }

    /// Writes the K/V of positions `start..start + n` (`k`, `v`: `[n, heads, head_dim]`) into `slot`
    /// and returns the keys and values of positions `0..start + n`, views of the buffers in the
    /// backend's layout (`[heads, start + n, head_dim]` on the CPU kernels).
    pub fn append(&mut self, slot: LayerSlot, start: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(0)?;
        let end = start + n;
        if end > self.max_len {
            return Err(ModelError::ContextOverflow { needed: end, limit: self.max_len });
        }
        if end > self.len() {
            return Err(ModelError::InvalidArgument(format!(
                "cache write up to position {end} but only {} tokens went through the prelude",
                self.len()
            )));
        }
        self.load_prefix(slot, end)?;
        if let LayerSlot::Core { layer, step } = slot {
            let rslot = self.strategy.slot_of_step(step);
            self.fill_missing(rslot, layer, start)?;
            for pos in start..end {
                self.deepest_slot[pos] = rslot as u32;
            }
        }
        let shape = self.shape();
        let backend = self.backend;
        let buffer = self.buffer_mut(slot);
        let buf = ensure_capacity(buffer, end, &shape)?;
        if start > buf.len {
            return Err(ModelError::InvalidArgument(format!(
                "cache slot {slot:?} holds {} positions, cannot write at {start}",
                buf.len
            )));
        }
        backend.write_kv(&buf.k, k, start)?;
        backend.write_kv(&buf.v, v, start)?;
        buf.len = buf.len.max(end);
        Ok((buf.k.narrow(shape.positions, 0, end)?, buf.v.narrow(shape.positions, 0, end)?))
    }

    fn shape(&self) -> BufferShape {
        BufferShape {
            heads: self.heads,
            head_dim: self.head_dim,
            positions: self.backend.kv_positions_dim(),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    fn buffer_mut(&mut self, slot: LayerSlot) -> &mut Option<KvBuffer> {
        match slot {
            LayerSlot::Prelude(i) => &mut self.prelude[i],
            LayerSlot::Coda(j) => &mut self.coda[j],
            LayerSlot::Core { layer, step } => {
                let rslot = self.strategy.slot_of_step(step);
                let core_layers = self.core_layers;
                while self.core.len() <= rslot {
                    self.core.push((0..core_layers).map(|_| None).collect());
                }
                &mut self.core[rslot][layer]
            }
        }
    }

    /// Before writing `(rslot, layer)` at `start`, gives every earlier position that never reached
    /// this slot the K/V of its deepest available core step (same layer).
    fn fill_missing(&mut self, rslot: usize, layer: usize, start: usize) -> Result<()> {
        let have = match self.core.get(rslot).and_then(|row| row.get(layer)).and_then(|b| b.as_ref()) {
            Some(buf) => buf.len,
            None => 0,
        };
        if have >= start {
            return Ok(());
        }
        let mut rows_k = Vec::with_capacity(start - have);
        let mut rows_v = Vec::with_capacity(start - have);
        for pos in have..start {
            let source = self.deepest_slot[pos];
            let src = (source != NO_SLOT)
                .then(|| self.core.get(source as usize).and_then(|row| row.get(layer)).and_then(|b| b.as_ref()))
                .flatten();
            match src {
                Some(buf) if buf.len > pos => {
                    rows_k.push(buf.k.narrow(buf.positions, pos, 1)?);
                    rows_v.push(buf.v.narrow(buf.positions, pos, 1)?);
                }
                _ => {
                    let zeros = self.shape().zeros(1)?;
                    rows_k.push(zeros.clone());
                    rows_v.push(zeros);
                }
            }
        }
        let shape = self.shape();
        let k = Tensor::cat(&rows_k, shape.positions)?.contiguous()?;
        let v = Tensor::cat(&rows_v, shape.positions)?.contiguous()?;
        let buffer = self.buffer_mut(LayerSlot::Core { layer, step: rslot });
        let buf = ensure_capacity(buffer, start, &shape)?;
        buf.k.slice_set(&k, shape.positions, have)?;
        buf.v.slice_set(&v, shape.positions, have)?;
        buf.len = start;
        Ok(())
    }
}

/// The layout of a cache's buffers.
struct BufferShape {
    heads: usize,
    head_dim: usize,
    /// The dimension of positions: 1 (`[heads, positions, head_dim]`) or 0 (`[positions, heads,
    /// head_dim]`).
    positions: usize,
    dtype: DType,
    device: Device,
}

impl BufferShape {
    fn zeros(&self, positions: usize) -> Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        let dims = if self.positions == 0 { (positions, h, d) } else { (h, positions, d) };
        Ok(Tensor::zeros(dims, self.dtype, &self.device)?)
    }
}

/// Grows a buffer to hold `needed` positions (amortised: at least half again, at most +512 rows),
/// copying what it held: a sequence's buffers are reallocated only when it outgrows them.
fn ensure_capacity<'a>(
    buffer: &'a mut Option<KvBuffer>,
    needed: usize,
    shape: &BufferShape,
) -> Result<&'a mut KvBuffer> {
    let current = buffer.as_ref().map(|b| b.capacity()).unwrap_or(0);
    if needed > current {
        let grown = current + (current / 2).clamp(16, 512);
        let capacity = needed.max(grown);
        let (k, v) = (shape.zeros(capacity)?, shape.zeros(capacity)?);
        let len = match buffer.take() {
            Some(old) => {
                k.slice_set(&old.k, shape.positions, 0)?;
                v.slice_set(&old.v, shape.positions, 0)?;
                old.len
            }
            None => 0,
        };
        *buffer = Some(KvBuffer { k, v, len, positions: shape.positions });
    }
    buffer.as_mut().ok_or_else(|| ModelError::InvalidArgument("cache buffer missing".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset;

    fn kv(value: f32) -> Tensor {
        Tensor::full(value, (1, 4, 16), &Device::Cpu).unwrap()
    }

    fn cache(strategy: CacheStrategy) -> KvCache {
        KvCache::new(&preset("tiny").unwrap(), strategy, Backend::Cpu { bf16: false }, &Device::Cpu)
    }

    #[test]
    fn truncation_forgets_later_positions_and_keeps_earlier_entries() {
        let mut c = cache(CacheStrategy::Full);
        c.begin_tokens(0, 3).unwrap();
        for step in 0..2 {
            c.append(
                LayerSlot::Core { layer: 0, step },
                0,
                &kv(1.0).repeat((3, 1, 1)).unwrap(),
                &kv(2.0).repeat((3, 1, 1)).unwrap(),
            )
            .unwrap();
        }
        c.append(LayerSlot::Prelude(0), 0, &kv(3.0).repeat((3, 1, 1)).unwrap(), &kv(3.0).repeat((3, 1, 1)).unwrap())
            .unwrap();
        let before = c.bytes();
        c.truncate(1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), before / 3, "a third of the positions remain");
        assert!(c.begin_tokens(2, 1).is_err(), "the next chunk starts at the truncated length");
        c.begin_tokens(1, 1).unwrap();
        let (k, _) = c.append(LayerSlot::Core { layer: 0, step: 0 }, 1, &kv(9.0), &kv(9.0)).unwrap();
        let at = |pos: usize| -> Vec<f32> { k.narrow(1, pos, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        assert!(at(0).iter().all(|&x| x == 1.0) && at(1).iter().all(|&x| x == 9.0));
        c.truncate(5);
        assert_eq!(c.len(), 2, "truncating beyond the length changes nothing");
    }

    /// Token 0 stops after two steps; token 1 runs three. At step 2 token 1 must see token 0's
    /// deepest entry (step 1) of the same layer.
    #[test]
    fn missing_steps_fall_back_to_the_deepest_entry() {
        let mut c = cache(CacheStrategy::Full);
        c.begin_tokens(0, 1).unwrap();
        for step in 0..2 {
            c.append(LayerSlot::Core { layer: 1, step }, 0, &kv(10.0 + step as f32), &kv(-10.0 - step as f32)).unwrap();
        }
        c.begin_tokens(1, 1).unwrap();
        for step in 0..3 {
            let (k, v) = c.append(LayerSlot::Core { layer: 1, step }, 1, &kv(20.0 + step as f32), &kv(0.0)).unwrap();
            let first_k: Vec<f32> = k.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let first_v: Vec<f32> = v.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let expected = 10.0 + step.min(1) as f32;
            assert!(first_k.iter().all(|&x| x == expected), "step {step}: {first_k:?}");
            assert!(first_v.iter().all(|&x| x == -expected));
            let own: Vec<f32> = k.narrow(1, 1, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(own.iter().all(|&x| x == 20.0 + step as f32));
        }
    }

    #[test]
    fn shared_slots_are_reused_round_robin() {
        let mut c = cache(CacheStrategy::Shared(2));
        c.begin_tokens(0, 1).unwrap();
        for step in 0..5 {
            c.append(LayerSlot::Core { layer: 0, step }, 0, &kv(step as f32), &kv(0.0)).unwrap();
        }
        // Slots hold the last step of each parity: 4 in slot 0, 3 in slot 1.
        c.begin_tokens(1, 1).unwrap();
        let (k0, _) = c.append(LayerSlot::Core { layer: 0, step: 0 }, 1, &kv(9.0), &kv(0.0)).unwrap();
        let (k1, _) = c.append(LayerSlot::Core { layer: 0, step: 1 }, 1, &kv(9.0), &kv(0.0)).unwrap();
        assert_eq!(k0.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 4.0);
        assert_eq!(k1.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 3.0);
        let entry = 2 * 64 * 4;
        assert_eq!(c.bytes(), 2 * 2 * entry, "two tokens, two core slots");
    }

    #[test]
    fn parses_strategies() {
        assert_eq!("full".parse::<CacheStrategy>().unwrap(), CacheStrategy::Full);
        assert_eq!("shared:4".parse::<CacheStrategy>().unwrap(), CacheStrategy::Shared(4));
        for bad in ["shared:0", "shared:x", "compress", ""] {
            assert!(bad.parse::<CacheStrategy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn writes_beyond_the_context_or_out_of_order_are_errors() {
        let mut c = cache(CacheStrategy::Shared(1));
        assert!(c.append(LayerSlot::Core { layer: 0, step: 0 }, 0, &kv(1.0), &kv(1.0)).is_err(), "no tokens yet");
        assert!(c.begin_tokens(3, 1).is_err(), "positions must follow the cached ones");
        assert!(matches!(c.begin_tokens(0, 257), Err(ModelError::ContextOverflow { .. })));
    }
}
