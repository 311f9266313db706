//! Attention of single query positions over the cache, on the CPU.
//!
//! Each query row attends one position per head to the cached keys it may see: in a decode tick
//! one new position per sequence, in a prompt chunk each position over its causal prefix. As
//! matmul + softmax + matmul this is three tensor ops per head and, for a prompt of n tokens, an
//! `[heads, n, n]` score matrix; here the rows of a chunk go in tiles of 4 consecutive rows
//! ([`attention_tile`](super::attention_tile)), each tile reading each key and value of a head
//! once for its rows, with one score per row and position as scratch. The tasks are (head, tile)
//! pairs, head-major, so a thread's consecutive tiles find one head's keys and values in its
//! cache. A row's numbers do not depend on its tile: decode rows, prompt rows and any chunking
//! of a prompt get the same bits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::attention_tile::{CacheValue, TILE_ROWS, Tile, attend_tile};
use super::support::OutPtr;
use crate::model::error::{ModelError, Result};

/// Below this many multiply-adds (all rows together) one thread is faster than the pool.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// Nanoseconds spent in [`attend_rows`] by every caller since the process started.
static BUSY_NANOS: AtomicU64 = AtomicU64::new(0);

/// Time spent in CPU attention since the process started, all callers together: what
/// `huginn bench --attention` compares with a prefill's time.
pub fn attention_time() -> Duration {
    Duration::from_nanos(BUSY_NANOS.load(Ordering::Relaxed))
}

/// Attention of many query rows in one call, in chunks: chunk `c` holds the `spans[c].1` rows of
/// `q` after those of the chunks before it (`q`: `[rows, heads, head_dim]`, already scaled; any
/// row and head strides), and its row `i` attends over the first `spans[c].0 + i + 1` positions of
/// `kv[c]` (`[kv_heads, positions, head_dim]` views of the cache, float32 or bfloat16, holding at
/// least that many; with fewer key/value heads than query heads, query head `h` reads head
/// `h / (heads / kv_heads)`). Returns `[rows, heads * head_dim]` float32; tensors that are not CPU tensors
/// of that layout and those dtypes are an error. Every row is computed the same way whatever the
/// other rows, so a sequence gets the same bits alone or in a batch.
pub fn attend_rows(q: &Tensor, spans: &[(usize, usize)], kv: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let started = Instant::now();
    let out = match kv.first().map(|(k, _)| k.dtype()) {
        Some(DType::BF16) => attend_rows_of::<bf16>(q, spans, kv),
        _ => attend_rows_of::<f32>(q, spans, kv),
    };
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    BUSY_NANOS.fetch_add(nanos, Ordering::Relaxed);
    out
}

fn attend_rows_of<T: CacheValue>(q: &Tensor, spans: &[(usize, usize)], kv: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let unsupported = || {
        ModelError::InvalidArgument(format!(
            "CPU attention takes float32 queries {:?} and {} float32 or bfloat16 CPU caches of [heads, positions, head_dim] for chunks {spans:?}",
            q.dims(),
            kv.len()
        ))
    };
    let (rows, heads, dim) = q.dims3()?;
    // Grouped-query attention: fewer key/value heads than query heads, each read by a group.
    let kv_heads = kv.first().map_or(heads, |(k, _)| k.dims().first().copied().unwrap_or(0));
    let on_cpu = |t: &Tensor, dtype: DType| t.device().is_cpu() && t.dtype() == dtype;
    if spans.len() != kv.len()
        || spans.iter().map(|&(_, len)| len).sum::<usize>() != rows
        || !on_cpu(q, DType::F32)
        || q.stride()[2] != 1
        || !kv.iter().zip(spans).all(|((k, v), &(start, len))| {
            on_cpu(k, T::DTYPE)
                && on_cpu(v, T::DTYPE)
                && rows_contiguous(k)
                && rows_contiguous(v)
                && k.dims() == v.dims()
                && {
                    let d = k.dims();
                    d[0] == kv_heads
                        && kv_heads > 0
                        && heads.is_multiple_of(kv_heads)
                        && d[2] == dim
                        && d[1] >= start + len
                }
        })
    {
        return Err(unsupported());
    }
    let (q_storage, q_layout) = q.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(q_data)) = &*q_storage else { return Err(unsupported()) };
    let guards: Vec<_> = kv.iter().map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout())).collect();
    // One view of each chunk's cache, shared by its rows: row `i` of a chunk sees its first
    // `start + i + 1` positions.
    let mut chunks = Vec::with_capacity(kv.len());
    for ((ks, kl), (vs, vl)) in &guards {
        let (Storage::Cpu(k), Storage::Cpu(v)) = (&**ks, &**vs) else { return Err(unsupported()) };
        let (Some(k), Some(v)) = (T::slice(k), T::slice(v)) else { return Err(unsupported()) };
        chunks.push(HeadViews {
            k,
            k_start: kl.start_offset(),
            k_head: kl.stride()[0],
            v,
            v_start: vl.start_offset(),
            v_head: vl.stride()[0],
        });
    }
    // Tiles of up to TILE_ROWS consecutive rows of a chunk: (chunk, its first row in `q`, the
    // row's index in the chunk, rows).
    let mut tiles = Vec::new();
    let mut first_row = 0;
    for (c, &(_, len)) in spans.iter().enumerate() {
        for i in (0..len).step_by(TILE_ROWS) {
            tiles.push((c, first_row + i, i, TILE_ROWS.min(len - i)));
        }
        first_row += len;
    }
    let (q_start, q_row, q_head) = (q_layout.start_offset(), q_layout.stride()[0], q_layout.stride()[1]);
    // Query head `h` reads key/value head `h / group`.
    let group = heads / kv_heads;
    let width = heads * dim;
    let mut out: Vec<f32> = Vec::with_capacity(rows * width);
    let base = OutPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let base = &base;
    let work: usize = spans.iter().map(|&(start, len)| len * (start + len) * width * 2).sum();
    // Head-major, so that a thread's consecutive tasks read one head's keys and values.
    let task = |scratch: &mut Vec<f32>, index: usize| {
        let (h, (chunk, first, i, count)) = (index / tiles.len(), tiles[index % tiles.len()]);
        let (view, (start, _)) = (&chunks[chunk], spans[chunk]);
        // Row r of the tile sees one more position than the row before it.
        let counts: [usize; TILE_ROWS] = std::array::from_fn(|r| start + i + r + 1);
        let positions = counts[count - 1];
        let q = std::array::from_fn(|r| &q_data[q_start + (first + r.min(count - 1)) * q_row + h * q_head..][..dim]);
        let k = &view.k[view.k_start + (h / group) * view.k_head..][..positions * dim];
        let v = &view.v[view.v_start + (h / group) * view.v_head..][..positions * dim];
        // Each row's head h (no allocation per task: a tile has at most TILE_ROWS rows).
        let mut outs: [&mut [f32]; TILE_ROWS] = Default::default();
        for (r, out) in outs.iter_mut().enumerate().take(count) {
            // SAFETY: this task alone writes head h's `dim` values of these rows, inside the output.
            *out = unsafe { std::slice::from_raw_parts_mut(base.at((first + r) * width + h * dim), dim) };
        }
        attend_tile(&Tile { q, counts: &counts[..count], k, v, dim }, scratch, &mut outs[..count]);
    };
    let tasks = heads * tiles.len();
    if work < PARALLEL_MIN_WORK {
        let mut scratch = Vec::new();
        (0..tasks).for_each(|index| task(&mut scratch, index));
    } else {
        (0..tasks).into_par_iter().for_each_init(Vec::new, task);
    }
    // SAFETY: every (row, head) was written by the task of its tile and head.
    unsafe { out.set_len(rows * width) };
    drop(guards);
    drop(q_storage);
    Ok(Tensor::from_vec(out, (rows, width), q.device())?)
}

/// One sequence's cache, as slices of the buffers' storage.
struct HeadViews<'a, T> {
    k: &'a [T],
    k_start: usize,
    k_head: usize,
    v: &'a [T],
    v_start: usize,
    v_head: usize,
}

/// Each `[positions, head_dim]` slice is contiguous (the head stride may be anything).
fn rows_contiguous(t: &Tensor) -> bool {
    let stride = t.stride();
    t.rank() == 3 && stride[2] == 1 && stride[1] == t.dims()[2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_matmul_softmax_matmul_on_strided_cache_views() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (4, 1, 16), &dev).unwrap();
        // A cache buffer with spare capacity, viewed up to 7 positions.
        let k = Tensor::randn(0f32, 1.0, (4, 12, 16), &dev).unwrap().narrow(1, 0, 7).unwrap();
        let v = Tensor::randn(0f32, 1.0, (4, 12, 16), &dev).unwrap().narrow(1, 0, 7).unwrap();
        let fast = attend_rows(&q.transpose(0, 1).unwrap(), &[(6, 1)], &[(k.clone(), v.clone())]).unwrap();
        let fast = fast.reshape((4, 1, 16)).unwrap();
        let scores = q.matmul(&k.t().unwrap()).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        let diff = (fast - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn rows_in_one_call_give_the_bits_of_one_at_a_time() {
        let dev = Device::Cpu;
        let (heads, dim) = (4, 16);
        // Rows taken from a wider [rows, 2 * heads, dim] tensor, as the layer passes them.
        let q = Tensor::randn(0f32, 1.0, (3, 2 * heads, dim), &dev).unwrap().narrow(1, 0, heads).unwrap();
        let kv: Vec<(Tensor, Tensor)> = [1, 5, 9]
            .iter()
            .map(|&positions| {
                let view = |t: Tensor| t.narrow(1, 0, positions).unwrap();
                (
                    view(Tensor::randn(0f32, 1.0, (heads, 12, dim), &dev).unwrap()),
                    view(Tensor::randn(0f32, 1.0, (heads, 12, dim), &dev).unwrap()),
                )
            })
            .collect();
        let spans = [(0, 1), (4, 1), (8, 1)];
        let together = attend_rows(&q, &spans, &kv).unwrap();
        assert_eq!(together.dims(), &[3, heads * dim]);
        for (row, (k, v)) in kv.iter().enumerate() {
            let alone = attend_rows(&q.narrow(0, row, 1).unwrap(), &[spans[row]], &[(k.clone(), v.clone())]).unwrap();
            let alone = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(together.get(row).unwrap().to_vec1::<f32>().unwrap(), alone);
        }
        // A chunk of rows gives each row the bits of its own prefix.
        let chunk = attend_rows(&q, &[(6, 3)], &kv[2..]).unwrap();
        for i in 0..3 {
            let view = |t: &Tensor| t.narrow(1, 0, 7 + i).unwrap();
            let alone =
                attend_rows(&q.narrow(0, i, 1).unwrap(), &[(6 + i, 1)], &[(view(&kv[2].0), view(&kv[2].1))]).unwrap();
            assert_eq!(
                chunk.get(i).unwrap().to_vec1::<f32>().unwrap(),
                alone.get(0).unwrap().to_vec1::<f32>().unwrap()
            );
        }
        // Other layouts, and chunks that do not cover the rows or need more positions than the
        // cache holds, are errors.
        let bf16 = q.to_dtype(DType::BF16).unwrap();
        assert!(attend_rows(&bf16, &spans, &kv).is_err());
        assert!(attend_rows(&q, &spans[..2], &kv[..2]).is_err());
        assert!(attend_rows(&q, &[(0, 1), (4, 1), (9, 1)], &kv).is_err());
    }

    #[test]
    fn grouped_query_heads_read_their_group_s_key_value_head() {
        let dev = Device::Cpu;
        let (heads, kv_heads, dim) = (4, 2, 16);
        let q = Tensor::randn(0f32, 1.0, (3, heads, dim), &dev).unwrap();
        let grouped = |n: usize| Tensor::randn(0f32, 1.0, (kv_heads, n, dim), &dev).unwrap();
        let kv: Vec<(Tensor, Tensor)> = [4, 9].iter().map(|&n| (grouped(n), grouped(n))).collect();
        // The same keys and values, one copy per query head (heads 0, 1 read 0; heads 2, 3 read 1).
        let copies = Tensor::new(&[0u32, 0, 1, 1], &dev).unwrap();
        let repeat = |t: &Tensor| t.index_select(&copies, 0).unwrap();
        let full: Vec<(Tensor, Tensor)> = kv.iter().map(|(k, v)| (repeat(k), repeat(v))).collect();
        let spans = [(1, 2), (8, 1)];
        let gqa = attend_rows(&q, &spans, &kv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mha = attend_rows(&q, &spans, &full).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gqa, mha);
        // Key/value heads that do not divide the query heads, or differ between chunks, are errors.
        let three = |n: usize| Tensor::randn(0f32, 1.0, (3, n, dim), &dev).unwrap();
        assert!(attend_rows(&q, &[(1, 2)], &[(three(4), three(4))]).is_err());
        assert!(attend_rows(&q, &spans, &[kv[0].clone(), full[1].clone()]).is_err());
    }

    #[test]
    fn a_bf16_cache_gives_the_bits_of_its_values_in_float32() {
        let dev = Device::Cpu;
        let (heads, dim) = (4, 16);
        let q = Tensor::randn(0f32, 1.0, (2, heads, dim), &dev).unwrap();
        let buffer = || Tensor::randn(0f32, 1.0, (heads, 12, dim), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let kv_bf16: Vec<(Tensor, Tensor)> =
            [3, 9].iter().map(|&n| (buffer().narrow(1, 0, n).unwrap(), buffer().narrow(1, 0, n).unwrap())).collect();
        let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let kv_f32: Vec<(Tensor, Tensor)> = kv_bf16.iter().map(|(k, v)| (widen(k), widen(v))).collect();
        let spans = [(2, 1), (8, 1)];
        let from_bf16 = attend_rows(&q, &spans, &kv_bf16).unwrap();
        let from_f32 = attend_rows(&q, &spans, &kv_f32).unwrap();
        assert_eq!(from_bf16.to_vec2::<f32>().unwrap(), from_f32.to_vec2::<f32>().unwrap());
    }
}
